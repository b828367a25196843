"""Generated fused kernels vs eager PyTorch, run through the Triton interpreter on CPU.

Every chain is exported with `region_from_fn`, compiled with `compile_region` and compared
on random inputs (never zeros or constants) in fp32/fp16/bf16 with contiguous, transposed,
sliced and broadcast (stride 0) layouts. Numerics rule (DESIGN.md): the error against a
float64 reference may be at most 2x eager's (3x for fp16/bf16) plus a tiny absolute floor.
"""

import os

import torch

# Before Triton is imported: kernels run in Triton's CPU interpreter. Only without a GPU, so that
# collecting this module on a GPU machine does not switch every other test to the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fused_chains import (  # noqa: E402
    casts,
    chain_e,
    gelu_exact,
    gelu_tanh,
    layer_norm,
    rms_norm_op,
    rmsnorm_residual,
    softmax_scale_mask,
    swiglu,
)

from fxopt.codegen import fused_runtime as rt  # noqa: E402
from fxopt.codegen import loader, ops  # noqa: E402
from fxopt.codegen.fused import (  # noqa: E402
    FusedKernel,
    UnsupportedRegion,
    compile_region,
    generate_kernel,
    generate_source,
    region_from_fn,
)
from fxopt.codegen.tuning import TunedKernel  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not loader.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy on masked-off lanes (log(0), 0/0)
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


# ----------------------------------------------------------------------------- helpers


def assert_matches(got, eager, ref, name=""):
    """got vs eager against a float64 reference: err(got) <= k * err(eager) + floor."""
    assert got.shape == eager.shape, (name, got.shape, eager.shape)
    assert got.dtype == eager.dtype, (name, got.dtype, eager.dtype)
    if not got.dtype.is_floating_point:
        assert torch.equal(got, eager), name
        return
    g, e, r = got.double(), eager.double(), ref.double()
    assert torch.equal(g.isnan(), e.isnan()), f"{name}: NaN pattern differs"
    inf = r.isinf()
    assert torch.equal(g[inf], r[inf]), f"{name}: infinities differ"
    ok = ~(g.isnan() | inf)
    g, e, r = g[ok], e[ok], r[ok]
    if g.numel() == 0:
        return
    factor = 2.0 if got.dtype == torch.float32 else 3.0
    err = (g - r).abs().max().item()
    eager_err = (e - r).abs().max().item()
    scale = max(1.0, r.abs().max().item())
    bound = factor * eager_err + FLOOR[got.dtype] * scale
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (eager error {eager_err:.3g})"


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def upcast(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def run_check(fn, *args, tmp_path=None, whole_row_max_n=None, name=None, monkeypatch=None):
    region = region_from_fn(fn, *args)
    kernel = compile_region(region, name or fn.__name__, dump_dir=tmp_path)
    if whole_row_max_n is not None and hasattr(kernel.module, "WHOLE_ROW_MAX_N"):  # row kernels only
        monkeypatch.setattr(kernel.module, "WHOLE_ROW_MAX_N", whole_row_max_n)
    got = kernel(*args)
    eager = as_tuple(fn(*args))
    ref = as_tuple(fn(*[upcast(a) for a in args]))
    assert len(got) == len(eager)
    for i, (g, e, r) in enumerate(zip(got, eager, ref)):
        assert_matches(g, e, r, f"{fn.__name__} output {i}")
    return kernel


def make(shape, dtype, layout, slot=0, gen=None):
    """A random tensor of `shape` laid out as asked (values never constant)."""
    shape = tuple(shape)
    g = gen
    if layout == "contiguous" or len(shape) == 0:
        return torch.randn(shape, generator=g).to(dtype)
    if layout == "transposed":
        t = torch.randn(shape[::-1], generator=g).to(dtype)
        return t.permute(*reversed(range(len(shape))))
    if layout == "sliced":
        if len(shape) == 1:
            return torch.randn(2 * shape[0], generator=g).to(dtype)[::2]
        big = torch.randn((shape[0] + 1,) + shape[1:-1] + (2 * shape[-1],), generator=g).to(dtype)
        return big[1:, ..., ::2]
    if layout == "broadcast":
        if len(shape) == 1:
            return torch.randn(1, generator=g).to(dtype).expand(shape) if slot % 2 else make(shape, dtype, "sliced")
        if slot % 2 == 0:  # one row shared by all rows: stride 0 on the leading dims
            return torch.randn((1,) * (len(shape) - 1) + shape[-1:], generator=g).to(dtype).expand(shape)
        # one value per row: stride 0 along the last dim
        return torch.randn(shape[:-1] + (1,), generator=g).to(dtype).expand(shape)
    raise ValueError(layout)


def make_mask(shape, layout, gen=None):
    """A bool mask that never masks a whole row (column 0 stays visible)."""
    m = torch.rand(shape, generator=gen) > 0.6
    m[..., 0] = False
    if layout == "transposed":
        return m.permute(*reversed(range(len(shape)))).contiguous().permute(*reversed(range(len(shape))))
    if layout == "broadcast":
        row = torch.rand(shape[-1:], generator=gen) > 0.6
        row[0] = False
        return row.expand(shape)
    if layout == "sliced":
        big = torch.rand((shape[0] + 1,) + tuple(shape[1:-1]) + (2 * shape[-1],), generator=gen) > 0.6
        big[..., 0] = False
        return big[1:, ..., ::2]
    return m


# ----------------------------------------------------------------------------- chains







def log_softmax(x):
    return F.log_softmax(x, dim=-1)






def row_reductions(x):
    return x.mean(-1), x.sum(-1, keepdim=True), x.amax(-1), x.amax(-1, keepdim=True)


# (fn, [input kinds]): "x" full, "w" per-column (N,), "m" mask
CHAINS = {
    "chain_e": (chain_e, "xxxx"),
    "rmsnorm_residual": (rmsnorm_residual, "xxw"),
    "rms_norm_op": (rms_norm_op, "xxw"),
    "layer_norm": (layer_norm, "xww"),
    "softmax_scale_mask": (softmax_scale_mask, "xm"),
    "log_softmax": (log_softmax, "x"),
    "swiglu": (swiglu, "xx"),
    "gelu_tanh": (gelu_tanh, "xw"),
    "gelu_exact": (gelu_exact, "x"),
    "casts": (casts, "xx"),
    "row_reductions": (row_reductions, "x"),
}
LAYOUTS = ["contiguous", "transposed", "sliced", "broadcast"]


def chain_inputs(kinds, shape, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    args = []
    for slot, kind in enumerate(kinds):
        if kind == "x":
            args.append(make(shape, dtype, layout, slot, gen))
        elif kind == "w":
            w_layout = "sliced" if layout in ("sliced", "broadcast") else "contiguous"
            args.append(make(shape[-1:], dtype, w_layout, slot, gen))
        else:
            args.append(make_mask(shape, layout, gen))
    return args


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chain", list(CHAINS))
def test_chain(chain, dtype, layout, tmp_path):
    fn, kinds = CHAINS[chain]
    shape = (3, 5, 37) if len(chain) % 2 else (7, 13)
    shape = (3, 5, 37) if chain in ("softmax_scale_mask", "layer_norm", "chain_e") else shape
    args = chain_inputs(kinds, shape, dtype, layout, seed=len(chain))
    run_check(fn, *args, tmp_path=tmp_path)


@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 37), (6, 1), (1, 9), (37,), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("chain", ["rmsnorm_residual", "layer_norm", "softmax_scale_mask", "log_softmax",
                                   "row_reductions", "chain_e", "swiglu"])
def test_odd_shapes(chain, shape, tmp_path):
    fn, kinds = CHAINS[chain]
    args = chain_inputs(kinds, shape, torch.float32, "contiguous", seed=3)
    run_check(fn, *args, tmp_path=tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chain", ["log_softmax", "softmax_scale_mask", "layer_norm", "rmsnorm_residual",
                                   "row_reductions"])
def test_long_rows_multipass(chain, dtype, tmp_path, monkeypatch):
    """N = 5003 through the loop over column blocks (the whole-row threshold lowered)."""
    fn, kinds = CHAINS[chain]
    args = chain_inputs(kinds, (3, 5003), dtype, "contiguous", seed=5)
    run_check(fn, *args, tmp_path=tmp_path, whole_row_max_n=1024, monkeypatch=monkeypatch)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "broadcast"])
def test_multipass_strided(layout, tmp_path, monkeypatch):
    fn, kinds = CHAINS["layer_norm"]
    args = chain_inputs(kinds, (2, 3, 301), torch.float16, layout, seed=9)
    run_check(fn, *args, tmp_path=tmp_path, whole_row_max_n=64, monkeypatch=monkeypatch)


def test_vocab_log_softmax_default_threshold(tmp_path):
    """A vocab-sized row (> WHOLE_ROW_MAX_N) takes the loop without any override."""
    x = torch.randn(2, 9001)
    k = run_check(log_softmax, x, tmp_path=tmp_path)
    assert x.shape[-1] > k.module.WHOLE_ROW_MAX_N


# ----------------------------------------------------------------------------- more ops and inputs


def test_broadcast_inputs_of_other_ranks(tmp_path):
    def fn(x, row, col, s):
        return torch.sigmoid(x * row + col) - s, torch.tanh(x) * 3.0

    x = torch.randn(2, 3, 7)
    run_check(fn, x, torch.randn(3, 1), torch.randn(7), torch.randn(()), tmp_path=tmp_path)


def test_per_row_and_zero_dim_inputs_in_reduction(tmp_path):
    def fn(x, scale, bias, temp):
        y = torch.softmax(x * scale / temp, dim=-1) + bias
        return y, (x * scale).sum(-1, keepdim=True)

    x = torch.randn(4, 6, 11)
    run_check(fn, x, torch.randn(4, 6, 1), torch.randn(11), torch.rand(()) + 0.5, tmp_path=tmp_path)


def test_reduction_then_epilogue_per_row_output(tmp_path):
    def fn(x):
        m = x.mean(-1, keepdim=True)
        v = ((x - m) ** 2).mean(-1, keepdim=True)
        return torch.rsqrt(v + 1e-5), (x - m) * torch.rsqrt(v + 1e-5)

    run_check(fn, torch.randn(5, 19), tmp_path=tmp_path)


def test_masks_comparisons_where_and_ints(tmp_path):
    def fn(x, y, ids, keep):
        pos = ids.eq(3) | (ids > 5)
        z = torch.where(pos & keep, x, y * 2)
        return z, x > y, (ids * 2 + 1), torch.clamp(x, -0.5, 0.5), torch.maximum(x, y), z.to(torch.int64)

    x, y = torch.randn(6, 10), torch.randn(6, 10)
    ids = torch.randint(0, 9, (6, 10))
    keep = torch.rand(6, 10) > 0.3
    run_check(fn, x, y, ids, keep, tmp_path=tmp_path)


def test_unary_ops(tmp_path):
    def fn(x):
        p = x.abs() + 0.5
        return (
            torch.exp(x), torch.log(p), torch.sqrt(p), torch.rsqrt(p), torch.sin(x), torch.cos(x), torch.erf(x),
            torch.sigmoid(x), torch.tanh(x * 3), torch.tanh(x * 0.01), F.relu(x), -x, p.reciprocal(), x ** 3,
            p ** 0.5, p ** -1.5, torch.minimum(x, p), 1.0 - x, x / p, F.hardtanh(x),
        )

    run_check(fn, torch.randn(9, 17) * 2, tmp_path=tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_explicit_casts_round(dtype, tmp_path):
    """A cast to fp16/bf16 inside a region rounds (x.to(half).float() is not x)."""

    def fn(x):
        y = x.to(dtype).float() * 3.0
        return y, (y - x)

    run_check(fn, torch.randn(4, 33), tmp_path=tmp_path)


def test_layout_views_of_inputs(tmp_path):
    """unsqueeze / permute / slice of a region input are applied by the launcher."""

    def fn(x, mask, bias):
        scores = x.masked_fill(mask.unsqueeze(1), -1e4) + bias.t()
        return torch.softmax(scores, dim=-1)

    x = torch.randn(2, 3, 8)
    mask = torch.rand(2, 8) > 0.6
    mask[:, 0] = False
    run_check(fn, x, mask, torch.randn(8, 3), tmp_path=tmp_path)


def test_dynamic_shapes(tmp_path):
    """A region exported with symbolic sizes runs at other sizes (no size is baked in)."""

    def fn(x, r, w):
        h = x + r
        return h, F.rms_norm(h, (h.shape[-1],), w, 1e-6)

    region = region_from_fn(fn, torch.randn(4, 6, 16), torch.randn(4, 6, 16), torch.randn(16), dynamic=True)
    dims = [s for n in region.graph.nodes if n.op == "placeholder" for s in n.meta["val"].shape]
    assert any(isinstance(s, torch.SymInt) for s in dims)
    kernel = compile_region(region, "dyn_rms", dump_dir=tmp_path)
    for shape in [(4, 6, 16), (2, 9, 16), (3, 1, 16)]:
        args = (torch.randn(shape), torch.randn(shape), torch.randn(16))
        for g, e, r in zip(kernel(*args), fn(*args), fn(*[a.double() for a in args])):
            assert_matches(g, e, r, str(shape))


def test_scalar_placeholder(tmp_path):
    """A Python-scalar input (a placeholder whose meta['val'] is a float) becomes a kernel argument."""
    region = region_from_fn(lambda x: torch.softmax(x * 0.5, -1), torch.randn(3, 10))
    graph = region.graph
    mul = next(n for n in graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    first = next(iter(graph.nodes))
    with graph.inserting_after(first):
        scale = graph.placeholder("scale")
    scale.meta["val"] = 0.5
    mul.args = (mul.args[0], scale)
    region.recompile()
    kernel = compile_region(region, "scalar_arg", dump_dir=tmp_path)
    launch = kernel.source.split("def launch")[1]
    assert launch.splitlines()[0] == "(in0, in1):"  # x, then the scale (inputs are named by position)
    assert "in1" in launch.split("[grid](")[1]  # passed on to the kernel
    x = torch.randn(3, 10)
    for s in (0.5, 2.0):
        (got,) = kernel(x, s)
        torch.testing.assert_close(got, torch.softmax(x * s, -1))


def test_outputs_that_are_inputs_or_repeated(tmp_path):
    def fn(x, y):
        z = x * y
        return z, x, z

    x, y = torch.randn(3, 4), torch.randn(3, 4)
    region = region_from_fn(fn, x, y)
    kernel = compile_region(region, "passthrough", dump_dir=tmp_path)
    got = kernel(x, y)
    assert got[1] is x and got[0] is got[2]
    torch.testing.assert_close(got[0], x * y)


def test_int64_index_path(tmp_path, monkeypatch):
    """Force the int64 offset variants (real ones need > 2**31 elements) and compare."""
    cases = [(chain_e, "xxxx", "transposed"), (chain_e, "xxxx", "contiguous"), (softmax_scale_mask, "xm", "sliced")]
    for fn, kinds, layout in cases:
        args = chain_inputs(kinds, (4, 9), torch.float32, layout)
        kernel = run_check(fn, *args, tmp_path=tmp_path)
        make = rt.pointwise_plan if hasattr(kernel.module, "ELEMENT_BYTES") else rt.row_plan
        monkeypatch.setattr(rt, "needs_int64", lambda numel, tensors: True)
        rt.PLANS.clear()
        try:
            assert rt.plan(make, [a for a in args], 2)[-1] is True
            torch.testing.assert_close(kernel(*args)[0], fn(*args))
        finally:
            monkeypatch.undo()
            rt.PLANS.clear()


# ----------------------------------------------------------------------------- source, cache, dispatch


def test_header_names_nodes(tmp_path):
    region = region_from_fn(rmsnorm_residual, torch.randn(4, 8), torch.randn(4, 8), torch.randn(8))
    lines = ["predicted bytes: 1234", "predicted FLOPs: 56"]
    kernel = compile_region(region, "rms_header", dump_dir=tmp_path, header_lines=lines)
    header = kernel.source[: len(kernel.source) - len(loader.code_of(kernel.source))]
    for node in region.graph.nodes:
        if node.op == "call_function":
            assert node.name in header and str(node.target) in header
    for line in lines:
        assert f"# {line}" in header
    assert kernel.path.exists() and kernel.path.parent == tmp_path
    assert kernel.path.name.startswith("rms_header_") and kernel.path.read_text() == kernel.source
    assert "tl.constexpr" in kernel.source and "Each program" in kernel.source
    compile(kernel.source, str(kernel.path), "exec")


def test_identical_regions_load_once(tmp_path):
    args = [torch.randn(3, 4) for _ in range(2)]
    r1 = region_from_fn(swiglu, *args)
    r2 = region_from_fn(swiglu, *args)
    k1 = compile_region(r1, "same", dump_dir=tmp_path)
    loads, hits = loader.STATS["loads"], loader.STATS["hits"]
    k2 = compile_region(r2, "same", dump_dir=tmp_path)
    assert k1.source == k2.source and k1.module is k2.module
    assert loader.STATS["loads"] == loads and loader.STATS["hits"] == hits + 1
    assert len(list(tmp_path.glob("same_*.py"))) == 1
    assert loader.load_kernel_module(k1.source, tmp_path) is k1.module


def test_dump_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FXOPT_DUMP_DIR", str(tmp_path / "dumps"))
    kernel = compile_region(region_from_fn(gelu_exact, torch.randn(2, 3)), "env_dir")
    assert kernel.path.parent == tmp_path / "dumps" and kernel.path.exists()


def test_cpu_without_interpreter_uses_reference(tmp_path, monkeypatch):
    args = chain_inputs("xxw", (4, 8), torch.float32, "contiguous")
    kernel = compile_region(region_from_fn(rmsnorm_residual, *args), "ref_path", dump_dir=tmp_path)
    assert isinstance(kernel, FusedKernel)
    calls = []
    original = kernel.reference
    monkeypatch.setattr(kernel, "reference", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = kernel(*args)
    assert calls == [1]
    for g, e in zip(out, kernel.region(*args)):
        assert torch.equal(g, e)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel(*args)
    assert calls == [1]  # the interpreter path again


def test_unsupported_regions_raise():
    with pytest.raises(UnsupportedRegion, match="only the last dim"):
        generate_source(region_from_fn(lambda x: x.sum(0), torch.randn(3, 4)), "bad")
    with pytest.raises(UnsupportedRegion, match="no rule"):
        generate_source(region_from_fn(lambda x, y: x @ y, torch.randn(3, 4), torch.randn(4, 2)), "bad")
    with pytest.raises(UnsupportedRegion, match="normalization"):
        generate_source(region_from_fn(lambda x: F.layer_norm(x, x.shape[-2:]), torch.randn(3, 4, 5)), "bad")


def test_classify_and_flops():
    gm = region_from_fn(
        lambda x, w: (torch.softmax(x, -1), x.sum(1), x.mean(-1), F.gelu(x, approximate="tanh"), x @ w,
                      F.layer_norm(x, (4,)), x.amax(0)),
        torch.randn(2, 3, 4), torch.randn(4, 4),
    )
    by_target = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            by_target.setdefault(str(n.target), []).append(ops.classify(n))
    assert by_target["aten.softmax.int"] == ["reduction"]
    assert by_target["aten.sum.dim_IntList"] == ["other"]  # dim 1 of 3
    assert by_target["aten.mean.dim"] == ["reduction"]
    assert by_target["aten.gelu.default"] == ["pointwise"]
    assert by_target["aten.layer_norm.default"] == ["reduction"]
    assert by_target["aten.amax.default"] == ["other"]
    assert all(c == "other" for t, cs in by_target.items() if "matmul" in t or "mm" in t for c in cs)
    gelu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.gelu.default)
    assert ops.flops_per_element(gelu) >= 8
    assert ops.unsupported_reason(gelu) is None


def test_generated_source_is_valid_python_for_every_chain():
    for name, (fn, kinds) in CHAINS.items():
        args = chain_inputs(kinds, (2, 8), torch.float16, "contiguous")
        src = generate_source(region_from_fn(fn, *args), name)
        compile(src, name, "exec")
        assert "@triton.jit" in src and "def launch(" in src, name


def test_outputs_smaller_than_the_iteration_space(tmp_path):
    """An output computed from broadcast inputs only keeps its own (smaller) shape."""

    def fn(x, w, s, b):
        w2 = w * 2.0 + 1.0  # (N,)
        s2 = torch.sigmoid(s)  # (R, 1)
        return x * w2 + s2, w2, s2, torch.softmax(x * s2, -1), (b * 3.0)  # b: (R, 1, 1)

    x = torch.randn(3, 4, 9)
    args = (x, torch.randn(9), torch.randn(4, 1), torch.randn(3, 1, 1))
    region = region_from_fn(fn, *args)
    kernel = compile_region(region, "small_outputs", dump_dir=tmp_path)
    for g, e in zip(kernel(*args), fn(*args)):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e)
    pointwise_only = region_from_fn(lambda x, w: (x + w, w * 2.0), torch.randn(3, 9), torch.randn(9))
    kernel = compile_region(pointwise_only, "small_pw", dump_dir=tmp_path)
    x, w = torch.randn(3, 9), torch.randn(9)
    got = kernel(x, w)
    torch.testing.assert_close(got[0], x + w)
    torch.testing.assert_close(got[1], w * 2.0)


def test_aten_overload_variants(tmp_path):
    """Overloads a fusion pass may hand over besides the ones torch.export usually emits."""
    aten = torch.ops.aten

    def fn(x, m, k):
        a = aten._softmax.default(x, -1, False)
        b = aten._log_softmax.default(x, -1, False)
        c = aten._to_copy.default(x, dtype=torch.float16)
        d = aten.where.self(m, x, aten.neg.default(x))
        e = aten.logical_not.default(m)
        f = aten.bitwise_not.default(k)
        g = aten.logical_not.default(k)
        return a, b, c, d, e, f, g, aten.add.Tensor(m, m), aten.sub.Tensor(x, a, alpha=2)

    x = torch.randn(4, 7)
    run_check(fn, x, torch.rand(4, 7) > 0.5, torch.randint(-3, 3, (4, 7)), tmp_path=tmp_path)


def test_mixing_dropped_reductions_is_refused():
    # x.sum(-1) is shaped like the rows; adding a (R,) input would broadcast it along N instead
    with pytest.raises(UnsupportedRegion, match="keepdim=False"):
        generate_source(region_from_fn(lambda x, s: x.sum(-1) * s, torch.randn(5, 5), torch.randn(5)), "bad")


@pytest.mark.parametrize("chain", ["chain_e", "layer_norm", "softmax_scale_mask"])
def test_rank6_permuted_inputs(chain, tmp_path, monkeypatch):
    """Index math over many non-collapsible dims (pointwise NDIM and row LEAD_DIMS up to 5)."""
    fn, kinds = CHAINS[chain]
    shape = (2, 3, 2, 3, 2, 7)
    gen = torch.Generator().manual_seed(11)
    perm = (3, 0, 5, 1, 4, 2)
    inverse = [perm.index(i) for i in range(6)]

    def permuted():
        base = torch.randn([shape[p] for p in perm], generator=gen)
        return base.permute(*inverse)

    args = []
    for kind in kinds:
        if kind == "x":
            args.append(permuted())
        elif kind == "w":
            args.append(torch.randn(shape[-1], generator=gen))
        else:
            m = permuted() > 0.6
            m[..., 0] = False
            args.append(m)
    assert not args[0].is_contiguous()
    run_check(fn, *args, tmp_path=tmp_path)
    if chain != "chain_e":
        run_check(fn, *args, tmp_path=tmp_path, whole_row_max_n=4, monkeypatch=monkeypatch)


def test_names_that_collide_with_generated_identifiers(tmp_path):
    """Inputs named like kernel internals (mask, N, rows, the kernel itself) are renamed."""

    def fn(mask, N, rows, clash_contiguous, offs):
        return torch.softmax(mask * N + rows, -1), clash_contiguous * offs

    args = [torch.randn(3, 6) for _ in range(5)]
    run_check(fn, *args, tmp_path=tmp_path, name="clash")
    run_check(lambda mask, N: mask + N, *args[:2], tmp_path=tmp_path, name="clash")


@pytest.mark.filterwarnings("ignore:std\\(\\)|var\\(\\):UserWarning")
@pytest.mark.parametrize("shape", [(5, 19), (4, 1), (2, 3, 300)])
def test_var_std_norm(shape, tmp_path, monkeypatch):
    def fn(x):
        mu = x.mean(-1, keepdim=True)
        ln = (x - mu) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5)
        return (ln, x.std(-1), torch.var(x, -1, correction=0), x.norm(dim=-1, keepdim=True),
                torch.linalg.vector_norm(x, 1, dim=-1), F.normalize(x, dim=-1))

    x = torch.randn(shape)
    run_check(fn, x, tmp_path=tmp_path)
    run_check(fn, x, tmp_path=tmp_path, whole_row_max_n=64, monkeypatch=monkeypatch)


def test_layout_ops_on_values(tmp_path, monkeypatch):
    """expand / unsqueeze(-1) / squeeze(-1) / view of computed values that only re-index."""

    def fn(x, w):
        s = x.sum(-1)  # (R,)
        m = s.unsqueeze(-1) / x.shape[-1]  # back to (R, 1)
        y = (x - m.expand_as(x)) * w.expand(x.shape)
        r = torch.rsqrt((y * y).mean(-1, keepdim=True) + 1e-5)
        return y * r, r.squeeze(-1), r.expand(-1, x.shape[-1]), m.view(x.shape[0], 1)

    run_check(fn, torch.randn(6, 10), torch.randn(10), tmp_path=tmp_path)
    run_check(fn, torch.randn(6, 10), torch.randn(10), tmp_path=tmp_path, whole_row_max_n=4, monkeypatch=monkeypatch)


def test_nan_propagates_through_max_and_min(tmp_path, monkeypatch):
    x = torch.randn(4, 300)
    x[1, 7] = float("nan")
    x[3, 250] = float("nan")

    def fn(x):
        return x.amax(-1), x.amin(-1, keepdim=True), torch.softmax(x, -1)

    run_check(fn, x, tmp_path=tmp_path)
    run_check(fn, x, tmp_path=tmp_path, whole_row_max_n=64, monkeypatch=monkeypatch)


_AOT_SCRIPT = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxopt.codegen.fused import compile_region, region_from_fn

def chain_e(a, b, c, d):
    return d + (a + b) * c

def rmsnorm_residual(x, r, w):
    h = x + r
    return h, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w

bf = torch.bfloat16
cases = [
    ("aot_rms", rmsnorm_residual, [torch.randn(4, 64, dtype=bf), torch.randn(4, 64, dtype=bf),
                                  torch.randn(64, dtype=bf)], "*bf16",
     {"row": dict(ROWS=1, BLOCK_N=4096, INDEX_64=False, LEAD_DIMS=1),
      "loop": dict(ROWS=1, BLOCK_N=2048, INDEX_64=True, LEAD_DIMS=1)}),
    ("aot_chain", chain_e, [torch.randn(8, 8) for _ in range(4)], "*fp32",
     {"contiguous": dict(BLOCK=1024, INDEX_64=False, IN0_SCALAR=False, IN1_SCALAR=True, IN2_SCALAR=False,
                         IN3_SCALAR=False),
      "strided": dict(BLOCK=1024, INDEX_64=False, NDIM=2),
      "tiled": dict(ROWS_T=2, BLOCK_C=1024, INDEX_64=False)}),
]
for name, fn, args, ptr_type, variants in cases:
    kernel = compile_region(region_from_fn(fn, *args), name, dump_dir=sys.argv[1])
    module = kernel.module
    assert not module.INTERPRET
    for suffix, constexprs in variants.items():
        jit = getattr(module, f"{kernel.name}_{suffix}")
        while not isinstance(jit, triton.runtime.jit.JITFunction):
            jit = jit.fn
        sig = {p.name: "constexpr" if p.is_constexpr else (ptr_type if p.name.endswith("_ptr") else "i32")
               for p in jit.params}
        try:
            src = ASTSource(jit, sig, constexprs=constexprs)
        except TypeError:
            print("SKIP: ASTSource takes another signature format")
            sys.exit(0)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert "ld.global" in compiled.asm["ptx"], name
        print("compiled", name, suffix)
"""


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The GPU path (not the interpreter) compiles to PTX and cubin for sm_90, ahead of time.

    In a subprocess: Triton decides interpreter-or-not when it is imported."""
    pytest.importorskip("triton.backends.nvidia")
    script = tmp_path / "aot.py"
    script.write_text(_AOT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    if "SKIP:" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 5


def test_symbolic_sizes_as_values(tmp_path):
    """x.shape[-1] in arithmetic under dynamic shapes: the launcher passes the size as a scalar."""

    def fn(x, y):
        return x.sum(-1, keepdim=True) / x.shape[-1] + (y + x) * x.shape[0]

    region = region_from_fn(fn, torch.randn(4, 6), torch.randn(4, 6), dynamic=True)
    assert any(n.target == torch.ops.aten.sym_size.int for n in region.graph.nodes)
    kernel = compile_region(region, "sym_scalar", dump_dir=tmp_path)
    for shape in [(4, 6), (3, 11)]:
        x, y = torch.randn(shape), torch.randn(shape)
        torch.testing.assert_close(kernel(x, y)[0], fn(x, y))


def test_gpu_config_lists_and_defaults(tmp_path, monkeypatch):
    """The GPU configs (read without a GPU): every row width keeps configs, and the default
    (first kept, used when FXOPT_FUSED_AUTOTUNE=0) is a sensible tile."""
    region = region_from_fn(layer_norm, torch.randn(2, 8), torch.randn(8), torch.randn(8))
    src = generate_source(region, "cfg")
    src += "\n# variant for this test\n"  # its own module-cache entry
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FXOPT_FUSED_AUTOTUNE", "0")
    scope = vars(loader.load_kernel_module(src, tmp_path))  # decorates only: nothing is compiled
    assert not scope["INTERPRET"] and not scope["AUTOTUNE"]
    assert isinstance(scope[f"{generate_kernel(region).name}_row"], TunedKernel)
    prune, configs = scope["prune_rows"], scope["ROW_CONFIGS"]
    for block_n in [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]:
        kept = prune(configs, {"n_bucket": block_n})
        assert kept, block_n
        for c in kept:
            tile = c.kwargs["ROWS"] * block_n
            assert 1024 <= tile <= 8192 and 8 <= tile // (32 * c.num_warps) <= 32, (block_n, c)
        first = kept[0]
        assert first.num_warps in (4, 8, 16) or block_n <= 64, (block_n, first)
    assert scope["LOOP_CONFIGS"][0].kwargs["BLOCK_N"] >= 1024


def _spy_variants(module, used):
    """Wrap the module's kernels so each launch records which variant ran."""
    for name in dir(module):
        if name.endswith(("_contiguous", "_strided", "_tiled", "_row", "_loop")):
            kernel = getattr(module, name)

            class Spy:
                def __init__(self, kernel, name):
                    self.kernel, self.name = kernel, name

                def __getitem__(self, grid):
                    used.append(self.name.rsplit("_", 1)[1])
                    return self.kernel[grid]

            setattr(module, name, Spy(kernel, name))


@pytest.mark.parametrize("case", ["row_bias", "col_bias", "transposed", "3d_strided", "bf16_bias"])
def test_two_dim_pointwise_takes_tiles(case, tmp_path, monkeypatch):
    """Inputs that collapse to two dims (a broadcast row or column, a transposed operand) run the
    2-D tiled kernel (no per-element index division); three dims still take the strided one."""

    def mul_add(x, y):
        return F.gelu(x * y + 1.0, approximate="tanh")

    args = {
        "row_bias": [torch.randn(37, 23), torch.randn(23)],
        "col_bias": [torch.randn(37, 23), torch.randn(37, 1)],
        "transposed": [torch.randn(23, 37).t(), torch.randn(37, 23)],
        "3d_strided": [torch.randn(3, 5, 7), torch.randn(5, 1)],
        "bf16_bias": [torch.randn(37, 23, dtype=torch.bfloat16), torch.randn(23, dtype=torch.bfloat16)],
    }[case]
    kernel = compile_region(region_from_fn(mul_add, *args), f"tiles_{case}", dump_dir=tmp_path)
    used = []
    for name in list(vars(kernel.module)):
        if name.startswith(f"{kernel.name}_"):
            monkeypatch.setattr(kernel.module, name, getattr(kernel.module, name))  # restored after the test
    _spy_variants(kernel.module, used)
    (got,) = kernel(*args)
    assert used == (["strided"] if case == "3d_strided" else ["tiled"])
    assert_matches(got, mul_add(*args), mul_add(*[upcast(a) for a in args]), case)


def test_row_invariant_inputs_load_once_per_column_block(tmp_path):
    """A norm's weight and bias (no leading dims) are loaded as one vector per column block, kept in
    cache; per-row inputs and full inputs still go through their row offsets."""
    region = region_from_fn(layer_norm, torch.randn(2, 8), torch.randn(8), torch.randn(8))
    name, src = generate_kernel(region).name, generate_source(region, "inv")
    row = src[src.index(f"def {name}_row("):src.index(f"def {name}_loop(")]
    # inputs are named by position: x -> in0, w -> in1, b -> in2
    assert 'tl.load(in1_ptr + cols * in1_stride_n, mask=col_mask, other=0, eviction_policy="evict_last")' in row
    assert "in1_row" not in row and "in2_row" not in row and "in0_row = rows * in0_stride_r0" in row
    # a (1, N) weight in a 3-d space is row-invariant too; a (B, 1, N) one is not
    x = torch.randn(2, 3, 8)
    region = region_from_fn(lambda x, w, v: torch.softmax(x, -1) * w + v, x, torch.randn(1, 8), torch.randn(2, 1, 8))
    src = generate_source(region, "m")
    assert f"def {generate_kernel(region).name}_row(" in src and "in1_row" not in src and "in2_row" in src


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_reciprocal_only_for_half_outputs(dtype, tmp_path):
    """bf16/fp16 softmax multiplies by a per-row reciprocal; fp32 keeps the exact division."""
    x = torch.randn(6, 40, dtype=dtype)
    src = generate_source(region_from_fn(lambda x: torch.softmax(x * 0.125, -1), x), "sm")
    assert ("_inv = 1.0 / " in src) == (dtype != torch.float32)
    run_check(lambda x: torch.softmax(x * 0.125, -1), x, tmp_path=tmp_path, name=f"sm_{str(dtype)[6:]}")


def test_default_row_tile_moves_about_32_kb_per_program(tmp_path):
    """Without autotuning the first config the row pruner keeps runs: ROWS chosen from the bytes a
    column of a row moves (LayerNorm: x in, y out, weight and bias broadcast = 4 bytes in bf16;
    RMSNorm + residual: x, r in, sum and normed out = 8 bytes)."""
    import triton

    x = torch.randn(8, 4096, dtype=torch.bfloat16)
    w, b = torch.randn(4096, dtype=torch.bfloat16), torch.randn(4096, dtype=torch.bfloat16)
    ln = compile_region(region_from_fn(layer_norm, x, w, b), "ln_tile", dump_dir=tmp_path).module
    rms = compile_region(region_from_fn(rmsnorm_residual, x, x.clone(), w), "rms_tile", dump_dir=tmp_path).module
    assert (ln.ROW_BYTES_PER_COLUMN, rms.ROW_BYTES_PER_COLUMN) == (4, 8)
    configs = [triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8) for w in (8, 4, 16)]
    first = {m.ROW_BYTES_PER_COLUMN: m.prune_rows(configs, {"n_bucket": 4096})[0] for m in (ln, rms)}
    assert first[4].kwargs["ROWS"] * 4096 * 4 == 32 * 1024
    assert first[8].kwargs["ROWS"] * 4096 * 8 == 32 * 1024
    short_rows = ln.prune_rows(configs, {"n_bucket": 1024})[0]  # 4 KB a row -> 8 rows
    assert short_rows.kwargs["ROWS"] == 8


def test_fixed_config_prunes_once_per_key_value(tmp_path, monkeypatch):
    """Without autotuning, a launch picks its config by the autotune key's value: prune runs on the first launch
    of each key value (with that launch's arguments), later launches look the choice up."""
    region = region_from_fn(layer_norm, torch.randn(2, 8), torch.randn(8), torch.randn(8))
    src = generate_source(region, "cfg_once") + "\n# variant for this test\n"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FXOPT_FUSED_AUTOTUNE", "0")
    scope = vars(loader.load_kernel_module(src, tmp_path))
    row = scope[f"{generate_kernel(region).name}_row"]
    seen = []

    def prune(configs, named_args, **kwargs):
        seen.append(named_args["n_bucket"])
        return scope["prune_rows"](configs, named_args, **kwargs)

    row.prune = prune
    names = row.fn.arg_names
    args_for = lambda n: tuple(n if name == "n_bucket" else 0 for name in names)  # noqa: E731
    picks = {n: [row.config(args_for(n), {}) for _ in range(3)] for n in (512, 4096)}
    assert seen == [512, 4096]
    for n, configs in picks.items():
        assert all(c is configs[0] for c in configs)
        assert configs[0] is scope["prune_rows"](scope["ROW_CONFIGS"], {"n_bucket": n})[0]
    assert picks[512][0] is not picks[4096][0]
    by_keyword = row.config(args_for(512)[:names.index("n_bucket")], {"n_bucket": 4096})  # key passed by name
    assert by_keyword is picks[4096][0] and seen == [512, 4096]


def test_default_pointwise_block_loads_32_bytes_per_thread(tmp_path):
    import triton

    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (2048, 1024, 4096) for w in (8, 4)]
    bf16 = [torch.randn(64, 64, dtype=torch.bfloat16) for _ in range(2)]
    swiglu_mod = compile_region(region_from_fn(swiglu, *bf16), "sw_block", dump_dir=tmp_path).module
    chain_mod = compile_region(region_from_fn(chain_e, *[torch.randn(64, 64)] * 4), "e_block",
                               dump_dir=tmp_path).module
    assert (swiglu_mod.ELEMENT_BYTES, chain_mod.ELEMENT_BYTES) == (2, 4)
    for mod in (swiglu_mod, chain_mod):
        first = mod.prune_pointwise(configs, {})[0]
        assert first.kwargs["BLOCK"] * mod.ELEMENT_BYTES / (32 * first.num_warps) == 32
        assert len(mod.prune_pointwise(configs, {})) == len(configs)  # autotuning still sees all
