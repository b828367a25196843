"""Matmul layout pass: sibling linears fused over concatenated weights, unaligned N padded (CPU, fp32).

Node counts are derived from the model configs, not from the pass; outputs must match eager to float rounding,
greedy tokens with the automatic KV cache must be identical, and the user's model must be left as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxopt import models
from fxopt.generate import build_generator
from fxopt.optimize import optimize
from fxopt.passes import matmul, rules
from fxopt.pipeline import compile_model

aten = torch.ops.aten
LINEAR = aten.linear.default
MATMULS = (aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default)
NEW = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def matmul_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MATMULS]


def weight_of(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return matmul.fetch(gm, node.args[1].target)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key


@torch.no_grad()
def recompute(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1)[:, None]], dim=1)
    return ids


def stale_meta_vals(gm: fx.GraphModule) -> set[str]:
    """Names of the call_functions whose meta['val'] differs from a fresh fake run of their op (shape, strides,
    dtype). Some other passes leave strides approximate; this pass must add none."""
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    fake_mode = detect_fake_mode(vals)
    stale = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.Tensor):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        with fake_mode:
            fresh = node.target(*args, **kwargs)
        if (fresh.shape, fresh.stride(), fresh.dtype) != (val.shape, val.stride(), val.dtype):
            stale.add(node.name)
    return stale


# --------------------------------------------------------------------------------------------- alignment rule
@pytest.mark.parametrize("n, dtype, expected", [
    (50257, torch.bfloat16, 50304),  # gpt2's vocabulary: the next multiple of 64 costs 0.09%
    (509, torch.float32, 512),
    (1001, torch.float16, 1008),  # 1024 would cost 2.3% more weight bytes: only to the multiple of 8
    (176, torch.float32, 176),  # a multiple of 8 stays
    (4096, torch.bfloat16, 4096),
    (30, torch.int8, 32),  # 16 bytes of int8
])
def test_aligned_size(n, dtype, expected):
    assert matmul.aligned_size(n, dtype) == expected


# --------------------------------------------------------------------------------------------- gpt2: pad lm_head
GPT_VOCAB = 509


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return models.build("gpt2-tiny", vocab_size=GPT_VOCAB).eval()


def test_gpt2_lm_head_padded_embedding_keeps_original(gpt2):
    cfg = gpt2.config
    before = snapshot(gpt2)
    kwargs = gpt2.example_inputs(2, 8)
    optimized = optimize(gpt2, kwargs, epilogues=False)  # every linear stays aten.linear (c_fc: no GELU fold)
    result = optimized.program.results["matmul"]
    assert result.counts["pad_n"] == 1 and result.counts["fuse_siblings"] == 0
    gm = optimized.gm
    nodes = matmul_nodes(gm)
    assert len(nodes) == 4 * cfg.n_layers + 1  # c_attn, attn c_proj, c_fc, mlp c_proj per block; lm_head
    padded = [n for n in nodes if weight_of(gm, n).shape[0] != cfg.vocab_size and n.args[1].target.startswith("fxopt")]
    assert len(padded) == 1
    assert tuple(weight_of(gm, padded[0]).shape) == (512, cfg.d_model)
    assert torch.equal(weight_of(gm, padded[0])[:GPT_VOCAB], gpt2.lm_head.weight)
    assert not weight_of(gm, padded[0])[GPT_VOCAB:].any()
    embedding = next(n for n in gm.graph.nodes if n.target == aten.embedding.default and n.args[0].op == "get_attr"
                     and matmul.fetch(gm, n.args[0].target).shape[0] == GPT_VOCAB)
    assert matmul.fetch(gm, embedding.args[0].target) is gpt2.wte.weight  # the lookup reads the original
    with torch.no_grad():
        got, eager = optimized(**kwargs), gpt2(**kwargs)
    assert got.shape == eager.shape == (2, 8, GPT_VOCAB)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert_untouched(gpt2, before)
    assert gpt2.lm_head.weight is gpt2.wte.weight  # still tied


def test_gpt2_matmul_option_off(gpt2):
    optimized = optimize(gpt2, gpt2.example_inputs(2, 8), matmul=False, fuse=False)
    assert "matmul" not in optimized.program.results
    assert all(not n.args[1].target.startswith("fxopt") for n in matmul_nodes(optimized.gm))


def test_gpt2_generate_with_padded_programs(gpt2):
    before = snapshot(gpt2)
    gen = optimize(gpt2, gpt2.example_inputs(1, 8), kv_cache=True, max_seq_len=8 + NEW, max_batch=2)
    for program in (gen.programs.prefill, gen.programs.prefill_last, gen.programs.decode):
        lm_head = [n for n in matmul_nodes(program) if n.args[1].target.startswith("fxopt")]
        assert len(lm_head) == 1 and tuple(weight_of(program, lm_head[0]).shape) == (512, gpt2.config.d_model)
    # prefill_last still projects only the last position: the padded linear reads a dim-1 slice
    last = next(n for n in matmul_nodes(gen.programs.prefill_last) if n.args[1].target.startswith("fxopt"))
    assert last.args[0].target == aten.slice.Tensor and last.args[0].args[1:3] == (1, -1)
    ids = gpt2.example_inputs(1, 8, seed=3)["input_ids"]
    assert torch.equal(gen.generate(ids, NEW), recompute(gpt2, ids, NEW))
    with torch.no_grad():
        logits = gen.prefill(ids, all_logits=True)
    assert logits.shape[-1] == GPT_VOCAB
    torch.testing.assert_close(logits, gpt2(ids), rtol=1e-5, atol=1e-5)
    assert_untouched(gpt2, before)


# --------------------------------------------------------------------------------------------- llama: fuse
@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return models.build("llama-tiny").eval()


def test_llama_siblings_fused(llama):
    cfg = llama.config
    before = snapshot(llama)
    kwargs = llama.example_inputs(2, 8)
    optimized = optimize(llama, kwargs)
    counts = optimized.program.results["matmul"].counts
    assert counts["fuse_siblings"] == 2 * cfg.n_layers and counts["fused_linears"] == 5 * cfg.n_layers
    assert counts["pad_n"] == 0  # 176 + 176 = 352 is a multiple of 8; padding to 384 would cost 9%
    gm = optimized.gm
    nodes = matmul_nodes(gm)
    assert len(nodes) == 4 * cfg.n_layers + 1  # was 7 per layer (q, k, v, o, gate, up, down) + lm_head
    hd = cfg.d_model // cfg.n_heads
    shapes = sorted(tuple(weight_of(gm, n).shape) for n in nodes if n.args[1].target.startswith("fxopt"))
    qkv = (cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd, cfg.d_model)
    assert shapes == sorted([qkv] * cfg.n_layers + [(2 * cfg.d_ff, cfg.d_model)] * cfg.n_layers)
    attn = gm.get_submodule("layers.0.self_attn.q_proj")  # the originals are no longer held by the graph module
    assert not hasattr(attn, "weight") and counts["dropped_weights"] == 5 * cfg.n_layers
    with torch.no_grad():
        got, eager = optimized(**kwargs), llama(**kwargs)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert_untouched(llama, before)
    assert isinstance(llama.layers[0].self_attn.q_proj.weight, nn.Parameter)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_meta_vals_stay_correct(name, llama, gpt2):
    model = {"llama": llama, "gpt2": gpt2}[name]
    on = compile_model(model, model.example_inputs(2, 8), attention=True, matmul=True)
    off = compile_model(model, model.example_inputs(2, 8), attention=True, matmul=False)
    assert sum(on.results["matmul"].counts[r] for r in ("fuse_siblings", "pad_n")) > 0
    assert stale_meta_vals(on.gm) <= stale_meta_vals(off.gm)


def test_llama_generate_fused_programs(llama):
    cfg = llama.config
    before = snapshot(llama)
    gen = build_generator(llama, llama.example_inputs(1, 8), max_seq_len=8 + NEW, max_batch=2)
    assert len(matmul_nodes(gen.programs.decode)) == 4 * cfg.n_layers + 1
    plain = build_generator(llama, llama.example_inputs(1, 8), max_seq_len=8 + NEW, max_batch=2, matmul=False)
    assert len(matmul_nodes(plain.programs.decode)) == 7 * cfg.n_layers + 1
    gen_a = torch.Generator().manual_seed(5)
    a = torch.randint(0, cfg.vocab_size, (1, 8), generator=gen_a)
    b = torch.randint(0, cfg.vocab_size, (1, 5), generator=gen_a)
    ref_a, ref_b = recompute(llama, a, NEW), recompute(llama, b, NEW)
    assert torch.equal(gen.generate(a, NEW), ref_a)
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = b[0], 1
    ids[1], mask[1] = a[0], 1
    out = gen.generate(ids, NEW, attention_mask=mask)
    assert torch.equal(out[0, 3:], ref_b[0]) and torch.equal(out[1], ref_a[0])
    assert torch.equal(plain.generate(a, NEW), ref_a)
    assert_untouched(llama, before)


# --------------------------------------------------------------------------------------------- small graphs
class Siblings(nn.Module):
    """Three linears of one input (widths 20, 30, 14: fused 64), one more of another; biases on all."""

    def __init__(self, widths=(20, 30, 14), k=32, reshape_first=False):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(k, w) for w in widths)
        self.other = nn.Linear(k, 24)
        self.reshape_first = reshape_first

    def forward(self, x):
        outs = [head(x) for head in self.heads]
        if self.reshape_first:  # merges the last dim with the one before: impossible as a view of a slice
            outs[0] = outs[0].view(x.shape[0], -1)
        return [o * 2 for o in outs] + [self.other(x.relu())]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_siblings_with_bias_fused_and_padded():
    torch.manual_seed(0)
    model = Siblings(widths=(20, 30, 7)).eval()  # fused N = 57, padded to 64
    x = _rand(3, 5, 32)
    optimized = optimize(model, {"x": x}, fuse=False)
    counts = optimized.program.results["matmul"].counts
    assert counts["fuse_siblings"] == 1 and counts["fused_linears"] == 3 and counts["pad_n"] == 1
    nodes = matmul_nodes(optimized.gm)
    assert len(nodes) == 2
    fused = next(n for n in nodes if len(n.args) == 3 and weight_of(optimized.gm, n).shape[0] != 24)
    assert tuple(weight_of(optimized.gm, fused).shape) == (matmul.aligned_size(57, torch.float32), 32)
    # the pieces slice the padded output directly (no slice of a slice); the unpadded concatenation is not kept
    assert all(u.target == aten.slice.Tensor for u in fused.users)
    buffers = sorted(name for name, _ in optimized.gm.named_buffers())
    assert buffers == sorted([fused.args[1].target, fused.args[2].target])
    # three weights and biases, then their concatenations
    assert counts["dropped_weights"] == 2 * 3 + 2
    with torch.no_grad():
        for got, ref in zip(optimized(x=x), model(x)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fusion_refused_when_a_view_needs_contiguous_rows():
    model = Siblings(reshape_first=True).eval()
    x = _rand(3, 5, 32)
    optimized = optimize(model, {"x": x}, fuse=False)
    result = optimized.program.results["matmul"]
    assert result.counts["fuse_siblings"] == 0
    assert any("fails over the new strides" in note for note in result.notes)
    with torch.no_grad():
        for got, ref in zip(optimized(x=x), model(x)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class WeightMatmuls(nn.Module):
    """addmm with a (K, N) weight (HF Conv1D), x @ W.T with W (N, K), N unaligned; K unaligned is left alone."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_rand(32, 50))
        self.b = nn.Parameter(_rand(50, seed=1))
        self.w2 = nn.Parameter(_rand(37, 32, seed=2))
        self.w3 = nn.Parameter(_rand(37, 21, seed=3))

    def forward(self, x):
        y = torch.addmm(self.b, x.reshape(-1, 32), self.w)
        z = x @ self.w2.t()
        return y, z, z @ self.w3  # K = 37 unaligned: never padded


def test_addmm_and_transposed_weights_padded():
    model = WeightMatmuls().eval()
    before = snapshot(model)
    x = _rand(2, 5, 32, seed=4)
    optimized = optimize(model, {"x": x}, fuse=False)
    counts = optimized.program.results["matmul"].counts
    assert counts["pad_n"] == 2 and counts["k_unaligned"] == 1
    shapes = sorted(tuple(weight_of(optimized.gm, n).shape) for n in matmul_nodes(optimized.gm)
                    if n.args[1].op == "get_attr" and n.args[1].target.startswith("fxopt"))
    assert shapes == [(40, 32), (56, 32)]
    with torch.no_grad():
        for got, ref in zip(optimized(x=x), model(x)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert_untouched(model, before)


class FlattenedHead(torch.nn.Module):
    """A vocab projection written as view -> mm -> view (how some exports spell a 3-D linear)."""

    def __init__(self, d=64, vocab=509):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, d, generator=torch.Generator().manual_seed(3)))

    def forward(self, x):  # (b, s, d)
        b, s, d = x.shape
        flat = x.reshape(b * s, d) @ self.weight.t()  # (b*s, vocab)
        return flat.view(b, s, -1), flat.view(b, -1)  # the second merges the (padded) vocab dim


def test_unaligned_head_behind_views_is_padded_and_a_merging_view_becomes_a_reshape():
    from fxopt.optimize import optimize

    model = FlattenedHead()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    optimized = optimize(model, (x,), dynamic_dims={})
    counts = optimized.program.results["matmul"].counts
    assert counts.get("pad_n") == 1 and counts.get("view_to_reshape") == 1  # only the merging view copies
    for got, want in zip(optimized(x), model(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (2, 3, 4, 16)])
def test_linear_value_from_shapes_matches_linear(shape):
    """The rule engine's shape-built linear value (no fake kernel run, see rules._linear_val) equals what
    aten.linear returns:
    shape, strides and dtype, for a symbolic batch too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    x, w = torch.randn(shape), torch.randn(24, 16)
    real = torch.nn.functional.linear(x, w)
    built = rules._linear_val(x, w)
    assert (built.shape, built.stride(), built.dtype) == (real.shape, real.stride(), real.dtype)

    mode = FakeTensorMode(shape_env=ShapeEnv())
    fx_ = mode.from_tensor(x)  # dynamic dims: symbolic sizes
    with mode:
        fw = torch.empty(24, 16)
        sym = rules._linear_val(fx_, fw)
    assert len(sym.shape) == len(shape) and int(sym.shape[-1]) == 24
    assert [int(d) for d in sym.shape] == list(real.shape)


# ------------------------------------------------------------------------------------------ decode: gemv_qkv
QKV = torch.ops.fxopt.gemv_qkv.default


def _decode_program_before_qkv_fold(name: str, batch: int = 1):
    """A preset's batch-`batch` decode program after the rope pass and every decode rule except gemv_qkv."""
    from fxopt.generate import Generator
    from fxopt.passes import kv_cache as kv
    from fxopt.passes import rope
    from fxopt.passes.infra import PassContext

    model = models.build(name, n_layers=2)
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=24, max_batch=batch)
    gen = Generator(gen.programs, max_seq_len=24, max_batch=batch, device=torch.device("cpu"))
    program = fx.GraphModule(gen.programs.decode, copy.deepcopy(gen.programs.decode.graph))
    ids = torch.zeros(batch, 1, dtype=torch.long)
    kv.propagate_meta(program, ids, gen._slot, torch.zeros(batch, dtype=torch.long), *gen.caches)
    ctx = PassContext()
    rope.run(program, ctx)
    rules = tuple(r for r in matmul.DECODE_RULES if r.name != "gemv_qkv")
    matmul.run_rules(program, ctx, rules, matmul._describe, "matmul")
    return program


@pytest.mark.parametrize("name, rotated", [("llama-tiny", True), ("gpt2-tiny", False)])
def test_qkv_fold_matches_each_layer(name, rotated):
    """Every layer's q/k/v GEMV matches (Llama: slices + RoPE; GPT-2: split, no RoPE) and passes the checks
    (tests/test_generate.py runs the folded programs against full recompute)."""
    program = _decode_program_before_qkv_fold(name)
    matches = matmul.qkv_heads_after_gemv(program)
    assert len(matches) == 2
    assert all((m.q is not m.heads[0]) == rotated for m in matches)
    assert [matmul.check_qkv(_rewriter(program), m) for m in matches] == [None, None]


def _rewriter(program):
    from fxopt.passes.infra import PassContext

    return matmul.Rewriter.over(program, PassContext())


def test_qkv_fold_refuses_writes_at_other_positions_or_other_tables():
    """The checks name why a near-match stays unfolded: V written at another position than K, K rotated by
    another table than q."""
    program = _decode_program_before_qkv_fold("llama-tiny")
    rw = _rewriter(program)
    m = matmul.qkv_heads_after_gemv(program)[0]
    k_write, v_write = m.writes
    pos = v_write.args[2]
    with program.graph.inserting_before(v_write):
        other = program.graph.call_function(torch.ops.aten.add.Tensor, (pos, 1))
    other.meta["val"] = pos.meta["val"]
    v_write.update_arg(2, other)
    assert matmul.check_qkv(rw, m) == "k and v are written at different positions"
    v_write.update_arg(2, pos)
    cos, sin = k_write.args[2:4]
    k_write.update_arg(2, sin)  # k rotated by (sin, sin): not q's tables
    assert matmul.check_qkv(rw, m) == "q and k are rotated by different tables"
    k_write.update_arg(2, cos)
    assert matmul.check_qkv(rw, m) is None


def test_qkv_fold_not_applied_at_batch_two():
    program = _decode_program_before_qkv_fold("llama-tiny", batch=2)
    assert matmul.qkv_heads_after_gemv(program) == []  # no GEMVs at batch 2


# ------------------------------------------------------------------------------------------ epilogues
def _matches_eager_at_two_lengths(program, model) -> None:
    for s in (8, 19):
        x = torch.randn(3, s, 32)
        with torch.no_grad():
            out = program.gm(x=x)
            torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, model(x), rtol=1e-5,
                                       atol=1e-5)


class UpProjection(nn.Module):
    """linear -> GELU, with the GELU's approximation and a second use of the linear's output as knobs."""

    def __init__(self, approximate="tanh", reuse=False):
        super().__init__()
        self.up, self.down = nn.Linear(32, 128), nn.Linear(128, 32)
        self.approximate, self.reuse = approximate, reuse

    def forward(self, x):
        h = self.up(x)
        y = self.down(F.gelu(h, approximate=self.approximate))
        return y + h[..., :32] if self.reuse else y


@pytest.mark.parametrize("approximate, reuse, folded", [("tanh", False, 1), ("none", False, 0), ("tanh", True, 0)])
def test_bias_gelu_tanh_folds_into_the_gemm_only_when_exact(approximate, reuse, folded):
    torch.manual_seed(0)
    model = UpProjection(approximate, reuse).eval()
    x = torch.randn(2, 8, 32)
    program = compile_model(model, {"x": x}, dynamic_dims={"x": {0: "batch", 1: "seq"}}, matmul=True,
                            epilogues=True)
    assert program.results["epilogues"].counts["gelu_tanh_epilogue"] == folded
    gelus = [n for n in program.gm.graph.nodes if n.target == torch.ops.aten.gelu.default]
    assert len(gelus) == 1 - folded
    _matches_eager_at_two_lengths(program, model)


class SwigluMLP(nn.Module):
    """A Llama MLP, with a bias on the gate/up projections and a second use of the gate as knobs."""

    def __init__(self, bias=False, reuse=False):
        super().__init__()
        self.gate, self.up = nn.Linear(32, 48, bias=bias), nn.Linear(32, 48, bias=bias)
        self.down = nn.Linear(48, 32, bias=False)
        self.reuse = reuse

    def forward(self, x):
        gate = self.gate(x)
        y = self.down(F.silu(gate) * self.up(x))
        return y + gate[..., :32] if self.reuse else y


@pytest.mark.parametrize("bias, reuse, knob, folded", [
    (False, False, True, 1), (True, False, True, 0), (False, True, True, 0), (False, False, False, 0)])
def test_swiglu_product_folds_into_the_gate_up_gemm(bias, reuse, knob, folded):
    from fxopt import config

    torch.manual_seed(0)
    model = SwigluMLP(bias, reuse).eval()
    x = torch.randn(2, 8, 32)
    with config.override(swiglu_gemm=knob):
        program = compile_model(model, {"x": x}, dynamic_dims={"x": {0: "batch", 1: "seq"}}, matmul=True,
                                epilogues=True)
    assert program.results["epilogues"].counts["swiglu_epilogue"] == folded
    folds = [n for n in program.gm.graph.nodes if n.target == torch.ops.fxopt.linear_swiglu.default]
    assert len(folds) == folded
    if bias:  # a match the check refuses: the reason is in the pass's notes
        assert any("has a bias" in note for note in program.results["epilogues"].notes)
    _matches_eager_at_two_lengths(program, model)
