"""Regions of one structure share one generated kernel module (one import, one Triton compile).

A transformer repeats a few region structures once per layer. The kernel code is generated from
the region's structure alone, and the loader keys modules by that code, so every copy loads
once; each region still gets its own dump file whose header names its own graph nodes.
Anything baked into the code (a constant, a dtype) must keep regions apart.
"""

import torch
from torch import fx

from fxopt import models
from fxopt.codegen import loader
from fxopt.codegen.fused import compile_region, generate_kernel, region_from_fn
from fxopt.optimize import optimize
from fxopt.passes.fusion import FusedRegionModule


def scaled_rmsnorm(x, r, w, eps, scale):
    h = x + r
    return h, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w * scale


def layer_3_norm(hidden, residual, weight, eps, scale):
    """The same computation under other parameter names (another layer's copy)."""
    return scaled_rmsnorm(hidden, residual, weight, eps, scale)


def norm_inputs(dtype=torch.float32, rows=4, cols=8):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(rows, cols, generator=gen).to(dtype) for _ in range(2)] + [torch.randn(cols).to(dtype)]


def renamed(region: fx.GraphModule, prefix: str) -> fx.GraphModule:
    """`region` with every node renamed, as the fusion pass names another layer's copy."""
    for node in region.graph.nodes:
        if node.op != "output":
            node.name = f"{prefix}_{node.name}"
    region.recompile()
    return region


def header_node_names(source: str) -> list[str]:
    """The graph node names a generated source's header lists (first column of its node table)."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# region nodes"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# outputs:"))
    return [line[1:].split()[0] for line in lines[start + 1:end]]


def compile_norm(fn, args, eps, scale, name, tmp_path):
    return compile_region(region_from_fn(fn, *args, eps, scale), name, dump_dir=tmp_path)


def test_renamed_copies_share_one_module_and_keep_their_own_dump(tmp_path):
    args = norm_inputs()
    first = region_from_fn(scaled_rmsnorm, *args, 3.7e-4, 0.731)  # constants no other test uses: a fresh module
    second = renamed(region_from_fn(layer_3_norm, *args, 3.7e-4, 0.731), "layers_3")
    loads, hits = loader.STATS["loads"], loader.STATS["hits"]
    k1 = compile_region(first, "fused_2", dump_dir=tmp_path, header_lines=["predicted bytes: 111"])
    k2 = compile_region(second, "fused_9", dump_dir=tmp_path, header_lines=["predicted bytes: 222"])

    assert k1.name == k2.name and k1.name.isidentifier() and k1.name.startswith("fused_")
    assert k1.source != k2.source and loader.code_of(k1.source) == loader.code_of(k2.source)
    assert k2.module is k1.module and k2.module.__file__ == str(k1.path)
    assert (loader.STATS["loads"] - loads, loader.STATS["hits"] - hits) == (1, 1)
    # each region has its own dump file, naming its own nodes and its own predictions
    assert k1.path != k2.path and k1.path.parent == k2.path.parent == tmp_path
    for kernel, region, predicted in ((k1, first, "111"), (k2, second, "222")):
        assert kernel.path.read_text() == kernel.source
        own = [n.name for n in region.graph.nodes if n.op != "output"]
        assert header_node_names(kernel.source) == own
        assert f"# predicted bytes: {predicted}" in kernel.source
        assert f"# fxopt fused kernel: {kernel.name}" in kernel.source
    assert k1.region_name == "fused_2" and "# region: fused_9" in k2.source
    assert all(name.startswith("layers_3_") for name in header_node_names(k2.source))
    # the shared module computes the second region right
    for got, want in zip(k2(*args), scaled_rmsnorm(*args, 3.7e-4, 0.731)):
        torch.testing.assert_close(got, want)


def test_sizes_are_not_baked_in():
    """Sizes are read at call time: the same structure at other sizes is the same kernel."""
    small = generate_kernel(region_from_fn(scaled_rmsnorm, *norm_inputs(rows=4, cols=8), 1e-6, 1.0))
    large = generate_kernel(region_from_fn(scaled_rmsnorm, *norm_inputs(rows=6, cols=40), 1e-6, 1.0))
    assert small.name == large.name and small.code == large.code


def test_baked_constants_and_dtypes_keep_regions_apart(tmp_path):
    base = (norm_inputs(), 1e-6, 0.5)
    variants = {
        "eps": (norm_inputs(), 1e-5, 0.5),
        "scale": (norm_inputs(), 1e-6, 0.25),
        "dtype": (norm_inputs(torch.float16), 1e-6, 0.5),
    }
    k0 = compile_norm(scaled_rmsnorm, *base, "base", tmp_path)
    for what, (args, eps, scale) in variants.items():
        kernel = compile_norm(scaled_rmsnorm, args, eps, scale, f"differs_in_{what}", tmp_path)
        assert kernel.name != k0.name, what
        assert loader.code_of(kernel.source) != loader.code_of(k0.source), what
        assert kernel.module is not k0.module, what
        for got, want in zip(kernel(*args), scaled_rmsnorm(*args, eps, scale)):
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def structure(region: fx.GraphModule) -> tuple:
    """What a region computes, blind to its node names: every node's op, target, arguments (graph
    values by position, constants as they are) and value type. Sizes are read at call time, so a
    value's type is its dtype and which of its dims are 1 (q and k of grouped-query attention,
    with different head counts, are one structure)."""
    position: dict[fx.Node, int] = {}
    key = []
    for index, node in enumerate(region.graph.nodes):
        position[node] = index
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"node{position[n]}")
        val = node.meta.get("val")
        typ = type(val).__name__
        if isinstance(val, torch.Tensor):
            typ = (val.dtype, tuple(str(s) == "1" for s in val.shape))
        key.append((node.op, "" if node.op == "placeholder" else str(node.target), repr(args), typ))
    return tuple(key)


def test_transformer_layers_share_kernels(tmp_path):
    model = models.build("llama-tiny", n_layers=3)
    inputs = model.example_inputs(2, 16)
    loads, hits = loader.STATS["loads"], loader.STATS["hits"]
    optimized = optimize(model, inputs, dump_dir=tmp_path)
    kernels = [m.kernel for m in optimized.gm.modules() if isinstance(m, FusedRegionModule)]
    structures = {structure(k.region) for k in kernels}
    modules = {id(k.module) for k in kernels}

    assert len(modules) == len({k.name for k in kernels}) == len(structures)
    assert len(structures) <= len(kernels) // 2  # three layers repeat their structures
    assert loader.STATS["loads"] - loads <= len(structures)
    assert loader.STATS["hits"] - hits >= len(kernels) - len(structures)
    # one dump file per region, each naming that region's nodes
    assert sorted(tmp_path.glob("*.py")) == sorted(k.path for k in kernels)
    for kernel in kernels:
        assert header_node_names(kernel.source) == [n.name for n in kernel.region.graph.nodes if n.op != "output"]
    torch.testing.assert_close(optimized(**inputs), model(**inputs), rtol=1e-4, atol=1e-4)


def test_autotune_setting_gives_its_own_module(tmp_path, monkeypatch):
    """A module reads FXOPT_FUSED_AUTOTUNE when imported: the same code asked for under another setting is
    imported again (a module without tuning must not be handed to a caller who asked for it)."""
    x, r, w = norm_inputs(rows=3, cols=5)
    region = region_from_fn(scaled_rmsnorm, x, r, w, 1e-6, 0.5)
    monkeypatch.delenv("FXOPT_FUSED_AUTOTUNE", raising=False)
    monkeypatch.delenv("FXOPT_AUTOTUNE", raising=False)
    plain = compile_region(region, "plain", dump_dir=tmp_path)
    monkeypatch.setenv("FXOPT_FUSED_AUTOTUNE", "1")
    tuned = compile_region(region, "tuned", dump_dir=tmp_path)
    assert plain.module is not tuned.module
    assert not plain.module.AUTOTUNE and tuned.module.AUTOTUNE
    assert compile_region(region, "tuned_again", dump_dir=tmp_path).module is tuned.module
