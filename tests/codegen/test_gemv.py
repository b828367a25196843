"""codegen/gemv.py: the one-row GEMV kernel against a float64 reference, run by the Triton interpreter on
CPU (odd N, K not a multiple of the chunk, bias or none, fp32/fp16/bf16), and the op's CPU fallback."""

import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fxopt.codegen import gemv  # noqa: E402

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test (tests/gpu covers the GPU)")

# the error against float64 may be at most 3x eager's in fp16/bf16 (2x fp32) plus a small floor (DESIGN.md)
FACTOR = {torch.float32: 2.0, torch.float16: 3.0, torch.bfloat16: 3.0}


def _assert_qkv_within(got, eager, exact, slot: int, dtype) -> None:
    """q and the cache rows written at `slot`: error against float64 within FACTOR x eager's."""
    q = got[0]
    for out, ours, ref in zip(got, eager, exact):
        if out is not q:
            out, ours, ref = out[:, :, slot], ours[:, :, slot], ref[:, :, slot]
        error = (out.double() - ref).abs().max().item()
        eager_error = (ours.double() - ref).abs().max().item()
        assert error <= FACTOR[dtype] * eager_error + 1e-5, (error, eager_error)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, bias", [(37, 64, False), (8, 70, True), (130, 96, True), (5, 33, False)])
def test_gemv_matches_float64(dtype, n, k, bias):
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, 1, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = gemv.gemv(x, w, b)
    assert out.shape == (1, 1, n) and out.dtype == dtype
    reference = F.linear(x.double(), w.double(), None if b is None else b.double())
    eager = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    error = (out.double() - reference).abs().max().item()
    eager_error = (eager.double() - reference).abs().max().item()
    assert error <= FACTOR[dtype] * eager_error + 1e-5, (error, eager_error)


@interpreted
def test_gemv_reads_strided_rows_of_a_wider_weight():
    w_full = torch.randn(16, 80)
    w = w_full[:, :64]  # rows 80 apart: stride_wn is honoured
    x = torch.randn(64)
    torch.testing.assert_close(gemv.gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_supports_names_what_the_kernel_does_not_cover():
    w = torch.randn(8, 16)
    assert gemv.supports(torch.randn(1, 16), w, None) is None
    assert gemv.supports(torch.randn(2, 16), w, None) == "more than one row"
    assert gemv.supports(torch.randn(1, 16), w.t().contiguous().t(), None) is not None  # column-major
    assert gemv.supports(torch.randn(1, 16, dtype=torch.float16), w, None) == "dtypes"


def test_op_on_cpu_is_linear():
    x, w, b = torch.randn(1, 1, 24), torch.randn(10, 24), torch.randn(10)
    assert torch.equal(torch.ops.fxopt.gemv(x, w, b), F.linear(x, w, b))


def _float64(ep: gemv.Folded) -> gemv.Folded:
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    return replace(ep, bias=as64(ep.bias), residual=as64(ep.residual), norm_weight=as64(ep.norm_weight),
                   norm_bias=as64(ep.norm_bias))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm, glu, residual", [(True, False, False), (False, True, False), (False, False, True),
                                                 (True, True, False), (True, False, True)])
def test_prologue_and_epilogues_match_the_eager_ops(dtype, norm, glu, residual):
    """RMSNorm before, silu(gate) * up and + residual after: the kernel against the eager chain it replaces
    (gemv_reference, itself checked against float64), with K and N not multiples of the tile."""
    gen = torch.Generator().manual_seed(int(norm) + 2 * int(glu) + 4 * int(residual))
    k, n_out = 72, 22
    n_w = 2 * n_out if glu else n_out
    x = torch.randn(1, 1, k, generator=gen).mul(3).to(dtype)
    w = (torch.randn(n_w, k, generator=gen) / k**0.5).to(dtype)
    ep = gemv.Folded(residual=torch.randn(1, 1, n_out, generator=gen).to(dtype) if residual else None,
                       norm_weight=(1 + 0.1 * torch.randn(k, generator=gen)).to(dtype) if norm else None,
                       eps=1e-5, glu=glu)
    out = gemv.gemv(x, w, None, ep)
    eager = gemv.gemv_reference(x, w, None, ep)
    reference = gemv.gemv_reference(x.double(), w.double(), None, _float64(ep))
    assert out.shape == eager.shape == (1, 1, n_out)
    error = (out.double() - reference).abs().max().item()
    eager_error = (eager.double() - reference).abs().max().item()
    assert error <= FACTOR[dtype] * eager_error + 1e-5, (error, eager_error)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_two_residual_adds_match_the_parallel_residual_block(dtype):
    """GPT-NeoX / Phi's fc2: mlp + attn + x, each sum rounded as eager's tensors are, against float64; the
    reference is the model's own spelling (mlp_output + attn_output + hidden_states)."""
    gen = torch.Generator().manual_seed(11)
    k, n = 72, 22
    x = torch.randn(1, 1, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b, attn, hidden = (torch.randn(1, 1, n, generator=gen).mul(4).to(dtype) for _ in range(3))
    ep = gemv.Folded(residual=attn, residual2=hidden)
    out = gemv.gemv(x, w, b.reshape(-1), ep)
    eager = F.linear(x, w, b.reshape(-1)) + attn + hidden
    torch.testing.assert_close(gemv.gemv_reference(x, w, b.reshape(-1), ep), eager, rtol=0, atol=0)
    reference = F.linear(x.double(), w.double(), b.reshape(-1).double()) + attn.double() + hidden.double()
    error = (out.double() - reference).abs().max().item()
    eager_error = (eager.double() - reference).abs().max().item()
    assert error <= FACTOR[dtype] * eager_error + 1e-5, (error, eager_error)
    assert "second residual" in gemv.supports(x, w, None, gemv.Folded(residual2=hidden))


def test_reference_is_the_llama_spelling():
    """gemv_reference (the CPU path of fxopt::gemv) is models/llama.py's RMSNorm -> linear -> SwiGLU -> +."""
    from fxopt.models.llama import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.randn(16)
    x, w, res = torch.randn(1, 16), torch.randn(12, 16), torch.randn(1, 6)
    y = F.linear(norm(x), w)
    expected = res + F.silu(y[..., :6]) * y[..., 6:]
    got = gemv.gemv_reference(x, w, None, gemv.Folded(residual=res, norm_weight=norm.weight, eps=1e-6, glu=True))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# GPT-2's folds: LayerNorm (with or without its bias) before the product, GELU (tanh or erf) after the bias
# --------------------------------------------------------------------------------------------------
def _gpt2_case(dtype, k, n, *, norm_bias=True, act="none", residual=False, bias=True, offset=0.0, seed=0):
    """x (1, 1, K) with a mean far from 0 (offset: LayerNorm's mean must be taken out exactly), W (N, K), the
    projection's bias, and the Folded LayerNorm / activation / residual."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 1, k, generator=gen) * 3 + offset).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ep = gemv.Folded(norm_weight=(1 + 0.2 * torch.randn(k, generator=gen)).to(dtype),
                     norm_bias=(0.5 * torch.randn(k, generator=gen)).to(dtype) if norm_bias else None,
                     eps=1e-5, layer_norm=True, act=act,
                     residual=torch.randn(1, 1, n, generator=gen).to(dtype) if residual else None)
    return x, w, b, ep


def _check_against_float64(x, w, b, ep):
    """The kernel's result against the eager chain's, both against float64: within FACTOR of eager's error."""
    out = gemv.gemv(x, w, b, ep)
    eager = gemv.gemv_reference(x, w, b, ep)
    reference = gemv.gemv_reference(x.double(), w.double(), None if b is None else b.double(), _float64(ep))
    assert out.shape == eager.shape and out.dtype == eager.dtype == x.dtype
    error = (out.double() - reference).abs().max().item()
    eager_error = (eager.double() - reference).abs().max().item()
    assert error <= FACTOR[x.dtype] * eager_error + 1e-5, (error, eager_error)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k, n, norm_bias, offset", [(72, 22, True, 0.0), (33, 37, False, 0.0), (100, 5, True, 40.0),
                                                     (64, 16, False, -7.0), (31, 9, True, 3.0)])
def test_layer_norm_prologue_matches_float64(dtype, k, n, norm_bias, offset):
    """LayerNorm(x) * g (+ b) before the product, over K and N that are not multiples of the tile (interpreter:
    32 x 4), one chunk or several, with a mean far from 0."""
    _check_against_float64(*_gpt2_case(dtype, k, n, norm_bias=norm_bias, offset=offset, seed=k + n))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act, norm, residual, k, n", [
    ("gelu_tanh", False, False, 70, 13), ("gelu_tanh", True, False, 64, 38), ("gelu_tanh", False, True, 40, 21),
    ("gelu_tanh", True, True, 33, 6), ("gelu", False, False, 50, 17), ("gelu", True, True, 96, 10)])
def test_gelu_epilogue_matches_float64(dtype, act, norm, residual, k, n):
    """+ bias, then GELU (tanh, as GPT-2; or erf), then + residual: with and without the LayerNorm prologue."""
    x, w, b, ep = _gpt2_case(dtype, k, n, act=act, residual=residual, seed=k * n)
    _check_against_float64(x, w, b, ep if norm else replace(ep, norm_weight=None, norm_bias=None, layer_norm=False))


@interpreted
def test_layer_norm_prologue_stats_survive_a_large_mean():
    """fp32 rows of mean 1000 and std 1: E[x²] - E[x]² would lose every digit; the shifted sums do not."""
    x, w, b, ep = _gpt2_case(torch.float32, 96, 12, offset=1000.0, seed=5)
    x = x - x.mean() + 1000.0 + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _check_against_float64(x, w, b, ep)


def test_gpt2_reference_is_the_eager_block():
    """gemv_reference (the op's CPU path) is nn.LayerNorm -> linear -> GELU(tanh) -> + residual exactly, and the
    tanh GELU equals HF's spelled-out NewGELU (what the decode pass folds) to fp32 rounding."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(24)
    norm.weight.data, norm.bias.data = torch.randn(24), torch.randn(24)
    x, w, b, res = torch.randn(1, 1, 24), torch.randn(40, 24), torch.randn(40), torch.randn(1, 1, 40)
    y = F.linear(norm(x), w, b)
    expected = res + F.gelu(y, approximate="tanh")
    ep = gemv.Folded(residual=res, norm_weight=norm.weight, norm_bias=norm.bias, eps=norm.eps, layer_norm=True,
                     act="gelu_tanh")
    torch.testing.assert_close(gemv.gemv_reference(x, w, b, ep), expected, rtol=0, atol=0)
    spelled = 0.5 * y * (1.0 + torch.tanh(0.7978845608028654 * (y + 0.044715 * torch.pow(y, 3.0))))
    torch.testing.assert_close(F.gelu(y, approximate="tanh"), spelled, rtol=1e-6, atol=1e-6)
    erf = gemv.gemv_reference(x, w, b, replace(ep, act="gelu", residual=None))
    torch.testing.assert_close(erf, F.gelu(y), rtol=0, atol=0)


def test_op_on_cpu_takes_the_layer_norm_and_gelu_arguments():
    """fxopt::gemv's new trailing arguments (norm_bias, layer_norm, act) by position and by keyword."""
    x, w, b, ep = _gpt2_case(torch.float32, 24, 10, act="gelu_tanh", residual=True)
    expected = gemv.gemv_reference(x, w, b, ep)
    got = torch.ops.fxopt.gemv(x, w, b, ep.residual, ep.norm_weight, ep.eps, False, ep.norm_bias, True, "gelu_tanh")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got = torch.ops.fxopt.gemv(x, w, b, ep.residual, ep.norm_weight, ep.eps, norm_bias=ep.norm_bias, layer_norm=True,
                               act="gelu_tanh")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(torch.ops.fxopt.gemv(x, w, b), F.linear(x, w, b))  # the old calls are unchanged


def test_supports_names_the_norm_and_activation_it_does_not_cover():
    x, w, b, ep = _gpt2_case(torch.float32, 16, 8, act="gelu_tanh")
    assert gemv.supports(x, w, b, ep) is None
    assert gemv.supports(x, w, b, replace(ep, norm_weight=None)) == "a LayerNorm without a weight"
    assert gemv.supports(x, w, b, replace(ep, layer_norm=False)) == "a norm bias without LayerNorm"
    assert "norm bias" in gemv.supports(x, w, b, replace(ep, norm_bias=ep.norm_bias.half()))
    assert gemv.supports(x, w, b, replace(ep, act="relu")) == "activation 'relu'"


_AOT_SCRIPT = r"""
from fxopt.codegen import gemv as G

def signature(ptr):
    ints = {"N": "i32", "K": "i32", "stride_wn": "i32", "up_row": "i32", "eps": "fp32"}
    return {p.name: ints.get(p.name, ptr) for p in G._gemv_kernel.params if not p.is_constexpr}

# (norm, layer_norm, norm bias, glu, act, residual, pdl, even K): RMSNorm + SwiGLU, LayerNorm + GELU (GPT-2's
# c_fc), LayerNorm without bias + erf GELU + residual over a ragged K, ...
CASES = ((False, False, False, False, 0, False, False, True), (True, False, False, True, 0, False, True, True),
         (False, False, False, False, 0, True, True, True), (True, True, True, False, 1, False, True, True),
         (True, True, False, False, 2, True, False, False), (False, False, False, False, 1, True, True, True))
for ptr in ("*bf16", "*fp32"):
    for norm, layer, norm_bias, glu, act, residual, pdl, even_k in CASES:
        constexprs = dict(HAS_BIAS=True, RESIDUAL=residual, NORM=norm, LAYER=layer, NORM_BIAS=norm_bias, GLU=glu,
                          ACT=act, PDL=pdl, BLOCK_N=2, BLOCK_K=1024, EVEN_K=even_k,
                          RESIDUAL2=residual and not glu)  # GPT-NeoX's fc2: + attn + x
        compiled = compile_sm90(G._gemv_kernel, signature(ptr), constexprs, num_warps=4)
        ptx = compiled.asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == pdl
        if pdl:  # the weights' first chunk is requested before waiting for the previous kernel
            assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), "weight loads after the wait"
        print("compiled gemv", ptr, norm, layer, glu, act, residual, pdl)
"""


def test_gemv_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """Every prologue / epilogue combination the decode pass makes (RMSNorm + SwiGLU, LayerNorm + GELU, ...),
    and the PDL variant, lower to sm_90 PTX (the interpreter tests above never lower the kernel)."""
    from aot_sm90 import run_script

    assert run_script(tmp_path, "aot_gemv", _AOT_SCRIPT).count("compiled gemv") == 12


# --------------------------------------------------------------------------------------------------
# fxopt::gemv_qkv: the q/k/v projection with its head split, RoPE and both cache writes
# --------------------------------------------------------------------------------------------------
def _qkv_case(dtype, *, q_heads=4, kv_heads=2, d=16, k=40, norm=True, rope=True, bias=False, slot=5, seed=0):
    """Inputs of one decode step: x (1, 1, K), [W_q; W_k; W_v], tables for one position, caches holding
    random earlier rows (so a write to the wrong slot shows)."""
    from fxopt.models.llama import rope_tables

    gen = torch.Generator().manual_seed(seed)
    n = (q_heads + 2 * kv_heads) * d
    x = torch.randn(1, 1, k, generator=gen).mul(2).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ep = gemv.Folded(norm_weight=(1 + 0.1 * torch.randn(k, generator=gen)).to(dtype) if norm else None, eps=1e-5)
    cos, sin = (t[slot].reshape(1, 1, 1, d).to(dtype) for t in rope_tables(slot + 1, d, 10000.0)) if rope \
        else (None, None)
    caches = [torch.randn(1, kv_heads, 12, d, generator=gen).to(dtype) for _ in range(2)]
    return x, w, b, ep, cos, sin, caches, torch.tensor([slot])


def _qkv_eager(x, w, b, ep, cos, sin, caches, pos, *, n_heads, n_kv_heads):
    """models/llama.py's spelling of the same step: linear, split_heads, apply_rope, cache[:, :, pos] = ..."""
    from fxopt.models.llama import apply_rope

    y = F.linear(gemv.gemv_reference(x, torch.eye(x.shape[-1], dtype=x.dtype), None, ep) if ep.norm_weight
                 is not None else x, w, b)
    d = caches[0].shape[-1]
    q, k, v = (t.view(1, 1, -1, d).transpose(1, 2) for t in y.split([n_heads * d, n_kv_heads * d, n_kv_heads * d], -1))
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache, v_cache = (c.clone() for c in caches)
    k_cache[:, :, pos] = k.to(k_cache.dtype)
    v_cache[:, :, pos] = v.to(v_cache.dtype)
    return q, k_cache, v_cache


def test_qkv_reference_is_the_llama_spelling():
    """gemv_qkv_reference (the op's CPU path) is the chain it replaces, written as models/llama.py does."""
    x, w, b, ep, cos, sin, caches, pos = _qkv_case(torch.float32, norm=False, bias=True)
    q_eager, k_eager, v_eager = _qkv_eager(x, w, b, ep, cos, sin, caches, pos, n_heads=4, n_kv_heads=2)
    k_cache, v_cache = (c.clone() for c in caches)
    q = gemv.gemv_qkv_reference(x, w, b, ep, cos, sin, k_cache, v_cache, pos)
    torch.testing.assert_close(q, q_eager, rtol=0, atol=0)
    torch.testing.assert_close(k_cache, k_eager, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_eager, rtol=0, atol=0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm, rope, bias, heads", [(True, True, False, (4, 2)), (False, True, True, (2, 2)),
                                                     (True, False, True, (6, 1)), (False, False, False, (1, 1))])
def test_qkv_kernel_matches_the_eager_chain(dtype, norm, rope, bias, heads):
    """The kernel's q and caches against the eager chain in float64: only slot `pos` of each cache changes,
    to within eager's own rounding (GQA head counts, K not a multiple of the tile, with and without RoPE)."""
    q_heads, kv_heads = heads
    case = _qkv_case(dtype, q_heads=q_heads, kv_heads=kv_heads, norm=norm, rope=rope, bias=bias, seed=q_heads)
    x, w, b, ep, cos, sin, caches, pos = case
    assert gemv.supports_qkv(x, w, b, ep, cos, sin, *caches, pos) is None
    k_cache, v_cache = (c.clone() for c in caches)
    q = gemv.gemv_qkv(x, w, b, ep, cos, sin, k_cache, v_cache, pos)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    eager = _qkv_eager(x, w, b, ep, cos, sin, caches, pos, n_heads=q_heads, n_kv_heads=kv_heads)
    exact = _qkv_eager(x.double(), w.double(), as64(b), _float64(ep), as64(cos), as64(sin),
                       [c.double() for c in caches], pos, n_heads=q_heads, n_kv_heads=kv_heads)
    slot = int(pos)
    for got, ours, ref in zip((q, k_cache, v_cache), eager, exact):
        assert got.shape == ours.shape and got.dtype == ours.dtype
        if got is not q:  # every other slot is untouched
            keep = [i for i in range(got.shape[2]) if i != slot]
            assert torch.equal(got[:, :, keep], ours[:, :, keep])
            got, ours, ref = got[:, :, slot], ours[:, :, slot], ref[:, :, slot]
        error = (got.double() - ref).abs().max().item()
        eager_error = (ours.double() - ref).abs().max().item()
        assert error <= FACTOR[dtype] * eager_error + 1e-5, (error, eager_error)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_bias, k, heads", [(True, 40, (4, 4)), (False, 33, (2, 1))])
def test_qkv_kernel_with_layer_norm_matches_the_eager_chain(dtype, norm_bias, k, heads):
    """GPT-2's attention input: LayerNorm(x) (with or without its bias), the fused c_attn GEMV with its bias,
    the head split and both cache writes, no RoPE: against the eager chain in float64."""
    q_heads, kv_heads = heads
    x, w, b, _, cos, sin, caches, pos = _qkv_case(dtype, q_heads=q_heads, kv_heads=kv_heads, k=k, norm=False,
                                                  rope=False, bias=True, seed=k)
    gen = torch.Generator().manual_seed(k + 1)
    x = x + 4.0  # LayerNorm's mean matters
    ep = gemv.Folded(norm_weight=(1 + 0.2 * torch.randn(k, generator=gen)).to(dtype), eps=1e-5, layer_norm=True,
                     norm_bias=torch.randn(k, generator=gen).to(dtype) if norm_bias else None)
    assert gemv.supports_qkv(x, w, b, ep, cos, sin, *caches, pos) is None
    k_cache, v_cache = (c.clone() for c in caches)
    q = gemv.gemv_qkv(x, w, b, ep, cos, sin, k_cache, v_cache, pos)
    eager = _qkv_eager(x, w, b, ep, cos, sin, caches, pos, n_heads=q_heads, n_kv_heads=kv_heads)
    exact = _qkv_eager(x.double(), w.double(), b.double(), _float64(ep), None, None, [c.double() for c in caches],
                       pos, n_heads=q_heads, n_kv_heads=kv_heads)
    _assert_qkv_within((q, k_cache, v_cache), eager, exact, int(pos), dtype)
    q_op = torch.ops.fxopt.gemv_qkv(x, w, b, ep.norm_weight, ep.eps, None, None, *(c.clone() for c in caches), pos,
                                    norm_bias=ep.norm_bias, layer_norm=True)  # the CPU path: the eager chain
    torch.testing.assert_close(q_op, eager[0], rtol=0, atol=0)


def _qwen3_head_norm(t, weight, eps):
    """Qwen3RMSNorm as HF writes it, over the head dim of (1, heads, 1, d)."""
    hidden = t.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps)).to(t.dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d, heads, rope", [(16, (4, 2), True), (20, (2, 1), True), (16, (2, 2), False)])
def test_qkv_kernel_with_per_head_qk_norm_matches_the_eager_chain(dtype, d, heads, rope):
    """Qwen3's attention input: RMSNorm of x, the q/k/v GEMV, q_norm and k_norm over each head's d (one
    program per head; d/2 not a power of two too), RoPE, the cache writes: against the eager chain in float64."""
    from fxopt.models.llama import apply_rope

    q_heads, kv_heads = heads
    x, w, b, ep, cos, sin, caches, pos = _qkv_case(dtype, q_heads=q_heads, kv_heads=kv_heads, d=d, rope=rope,
                                                  seed=d + q_heads)
    gen = torch.Generator().manual_seed(d)
    ep = replace(ep, q_norm_weight=(1 + 0.3 * torch.randn(d, generator=gen)).to(dtype),
                 k_norm_weight=(1 + 0.3 * torch.randn(d, generator=gen)).to(dtype), qk_eps=1e-6)
    assert gemv.supports_qkv(x, w, b, ep, cos, sin, *caches, pos) is None
    k_cache, v_cache = (c.clone() for c in caches)
    q = gemv.gemv_qkv(x, w, b, ep, cos, sin, k_cache, v_cache, pos)

    def eager(x, w, ep, cos, sin, caches):
        y = F.linear(gemv.gemv_reference(x, torch.eye(x.shape[-1], dtype=x.dtype), None, ep), w)
        qs, ks, vs = (t.view(1, 1, -1, d).transpose(1, 2) for t in y.split([q_heads * d, kv_heads * d,
                                                                              kv_heads * d], -1))
        qs, ks = _qwen3_head_norm(qs, ep.q_norm_weight, ep.qk_eps), _qwen3_head_norm(ks, ep.k_norm_weight, ep.qk_eps)
        if cos is not None:
            qs, ks = apply_rope(qs, cos, sin), apply_rope(ks, cos, sin)
        kc, vc = (c.clone() for c in caches)
        kc[:, :, pos], vc[:, :, pos] = ks.to(kc.dtype), vs.to(vc.dtype)
        return qs, kc, vc

    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    ours = eager(x, w, ep, cos, sin, caches)
    exact = eager(x.double(), w.double(), replace(_float64(ep), q_norm_weight=ep.q_norm_weight.double(),
                                                  k_norm_weight=ep.k_norm_weight.double()),
                  as64(cos), as64(sin), [c.double() for c in caches])
    _assert_qkv_within((q, k_cache, v_cache), ours, exact, int(pos), dtype)
    k_ref, v_ref = (c.clone() for c in caches)  # the op's CPU path is the same chain
    q_ref = torch.ops.fxopt.gemv_qkv(x, w, b, ep.norm_weight, ep.eps, cos, sin, k_ref, v_ref, pos,
                                     q_norm_weight=ep.q_norm_weight, k_norm_weight=ep.k_norm_weight, qk_eps=1e-6)
    torch.testing.assert_close(q_ref, ours[0], rtol=0, atol=0)
    torch.testing.assert_close(k_ref, ours[1], rtol=0, atol=0)


def _hf_partial_rope(t, cos, sin, adjacent=False):
    """HF's apply_rotary_pos_emb with tables narrower than the head: rotate t[..., :r], keep the rest (with
    adjacent, GPT-J's rotate_every_two)."""
    r = cos.shape[-1]
    rot, rest = t[..., :r], t[..., r:]
    rotated = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2) if adjacent \
        else torch.cat((-rot[..., r // 2:], rot[..., :r // 2]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved, d, r, heads, qk_norm, adjacent", [
    (True, 16, 4, (4, 4), False, False),  # GPT-NeoX: [q_h; k_h; v_h] rows, rotary_pct 0.25
    (True, 16, 16, (2, 2), False, False),  # interleaved rows, full rotary
    (True, 16, 16, (4, 2), False, False),  # Falcon's new decoder architecture: [q, q; k; v] per KV head
    (True, 16, 4, (6, 2), False, False),  # three q heads a group, partial rotary
    (False, 20, 8, (4, 2), False, False),  # Phi / StableLM: partial rotary, GQA, d/2 not a power of two
    (False, 16, 8, (2, 1), True, False),  # partial rotary after per-head q/k norms (the two-kernel path)
    (False, 16, 8, (4, 4), False, True),  # GPT-J: adjacent pairs (rotate_every_two), partial
    (False, 16, 16, (2, 1), True, True),  # adjacent pairs after q/k norms
])
def test_qkv_kernel_interleaved_heads_and_partial_rotary(dtype, interleaved, d, r, heads, qk_norm, adjacent):
    """The fused q/k/v projection laid out as GPT-NeoX's query_key_value (rows per head [q_h; k_h; v_h]) and
    rotated over only the tables' r columns: against HF's spelling of the same step in float64."""
    from fxopt.models.llama import rope_tables

    q_heads, kv_heads = heads
    x, w, b, ep, _, _, caches, pos = _qkv_case(dtype, q_heads=q_heads, kv_heads=kv_heads, d=d, rope=False,
                                               bias=True, seed=d + r)
    slot = int(pos)
    cos, sin = (t[slot].reshape(1, 1, 1, r).to(dtype) for t in rope_tables(slot + 1, r, 10000.0))
    gen = torch.Generator().manual_seed(r)
    ep = replace(ep, heads_interleaved=interleaved, rope_adjacent=adjacent)
    if qk_norm:
        ep = replace(ep, q_norm_weight=(1 + 0.3 * torch.randn(d, generator=gen)).to(dtype),
                     k_norm_weight=(1 + 0.3 * torch.randn(d, generator=gen)).to(dtype), qk_eps=1e-6)
    assert gemv.supports_qkv(x, w, b, ep, cos, sin, *caches, pos) is None
    k_cache, v_cache = (c.clone() for c in caches)
    q = gemv.gemv_qkv(x, w, b, ep, cos, sin, k_cache, v_cache, pos)

    def eager(x, w, b, ep, cos, sin, caches):
        y = F.linear(gemv.gemv_reference(x, torch.eye(x.shape[-1], dtype=x.dtype), None, ep), w, b)
        if interleaved and q_heads == kv_heads:  # GPT-NeoX's spelling
            qs, ks, vs = y.view(1, 1, q_heads, 3 * d).transpose(1, 2).chunk(3, dim=-1)
        elif interleaved:  # Falcon's: (b, s, kv, g + 2, d), the last two of each group k and v
            qkv = y.view(1, 1, kv_heads, q_heads // kv_heads + 2, d)
            qs, ks, vs = (t.transpose(1, 2) for t in (qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2],
                                                      qkv[:, :, :, -1]))
        else:
            qs, ks, vs = (t.view(1, 1, -1, d).transpose(1, 2)
                          for t in y.split([q_heads * d, kv_heads * d, kv_heads * d], -1))
        if qk_norm:
            qs, ks = (_qwen3_head_norm(qs, ep.q_norm_weight, ep.qk_eps),
                      _qwen3_head_norm(ks, ep.k_norm_weight, ep.qk_eps))
        qs, ks = _hf_partial_rope(qs, cos, sin, adjacent), _hf_partial_rope(ks, cos, sin, adjacent)
        kc, vc = (c.clone() for c in caches)
        kc[:, :, pos], vc[:, :, pos] = ks.to(kc.dtype), vs.to(vc.dtype)
        return qs, kc, vc

    ours = eager(x, w, b, ep, cos, sin, caches)
    ep64 = _float64(ep)
    if qk_norm:
        ep64 = replace(ep64, q_norm_weight=ep.q_norm_weight.double(), k_norm_weight=ep.k_norm_weight.double())
    exact = eager(x.double(), w.double(), b.double(), ep64, cos.double(), sin.double(), [c.double() for c in caches])
    _assert_qkv_within((q, k_cache, v_cache), ours, exact, slot, dtype)
    keep = [i for i in range(k_cache.shape[2]) if i != slot]
    assert torch.equal(k_cache[:, :, keep], caches[0][:, :, keep]) and torch.equal(v_cache[:, :, keep],
                                                                                   caches[1][:, :, keep])
    k_ref, v_ref = (c.clone() for c in caches)  # the op's CPU path is the same chain
    q_ref = torch.ops.fxopt.gemv_qkv(x, w, b, ep.norm_weight, ep.eps, cos, sin, k_ref, v_ref, pos,
                                     q_norm_weight=ep.q_norm_weight, k_norm_weight=ep.k_norm_weight,
                                     qk_eps=ep.qk_eps, interleaved=interleaved, adjacent=adjacent)
    torch.testing.assert_close(q_ref, ours[0], rtol=0, atol=0)
    torch.testing.assert_close(k_ref, ours[1], rtol=0, atol=0)


def test_qkv_refuses_uneven_head_groups_and_odd_tables():
    x, w, b, ep, cos, sin, caches, pos = _qkv_case(torch.float32, q_heads=3, kv_heads=2)
    assert "grouped per KV head" in gemv.supports_qkv(x, w, b, replace(ep, heads_interleaved=True), cos, sin,
                                                      *caches, pos)
    x, w, b, ep, cos, sin, caches, pos = _qkv_case(torch.float32)  # 4 q heads, 2 kv heads
    assert "r <= d" in gemv.supports_qkv(x, w, b, ep, cos[..., :5], sin[..., :5], *caches, pos)
    assert "interleaved" in gemv.supports(x, w, None, replace(ep, heads_interleaved=True))


def test_qkv_refuses_a_norm_on_only_q():
    x, w, b, ep, cos, sin, caches, pos = _qkv_case(torch.float32)
    one_sided = replace(ep, q_norm_weight=torch.ones(16), qk_eps=1e-6)
    assert "only one" in gemv.supports_qkv(x, w, b, one_sided, cos, sin, *caches, pos)
    assert "q/k norm" in gemv.supports(x, w, None, one_sided)


@interpreted
@pytest.mark.parametrize("qk_norm", [False, True], ids=["gemv_qkv", "with-qk-norm"])
def test_qkv_kernel_honours_strides(qk_norm):
    """Caches that are views of a larger buffer (first row of a batch, head dim padded), W rows of a wider
    matrix, cos/sin read every other element: the kernel writes the same values as the eager chain (with the
    q/k head norms: the GEMV, then the per-head kernel writing through the same strides)."""
    x, w, b, ep, cos, sin, caches, pos = _qkv_case(torch.float32, bias=True, seed=3)
    d = caches[0].shape[-1]
    if qk_norm:
        gen = torch.Generator().manual_seed(7)
        ep = replace(ep, q_norm_weight=1 + 0.3 * torch.randn(d, generator=gen),
                     k_norm_weight=1 + 0.3 * torch.randn(d, generator=gen), qk_eps=1e-6)
    w_wide = torch.zeros(w.shape[0], w.shape[1] + 5)
    w_wide[:, :w.shape[1]] = w
    w_view = w_wide[:, :w.shape[1]]  # stride_wn = K + 5
    tables = [torch.stack([t, torch.full_like(t, 9.0)], dim=-1).reshape(*t.shape[:-1], 2 * d)[..., ::2]
              for t in (cos, sin)]  # element stride 2
    buffers = [torch.randn(2, c.shape[1], c.shape[2], d + 8) for c in caches]
    for buffer, c in zip(buffers, caches):
        buffer[:1, :, :, :d] = c
    views = [buffer[:1, :, :, :d] for buffer in buffers]
    assert not any(v.is_contiguous() for v in views + tables) and not w_view.is_contiguous()
    assert gemv.supports_qkv(x, w_view, b, ep, *tables, *views, pos) is None
    before = [buffer.clone() for buffer in buffers]
    q = gemv.gemv_qkv(x, w_view, b, ep, *tables, *views, pos)
    if qk_norm:  # the op's CPU path, checked against HF's spelling in the qk-norm test above
        caches_eager = [c.clone() for c in caches]
        q_eager = gemv.gemv_qkv_reference(x, w, b, ep, cos, sin, *caches_eager, pos)
    else:
        q_eager, *caches_eager = _qkv_eager(x, w, b, ep, cos, sin, caches, pos, n_heads=4, n_kv_heads=2)
    torch.testing.assert_close(q, q_eager, rtol=1e-5, atol=1e-5)
    for view, expected, buffer, old in zip(views, caches_eager, buffers, before):
        torch.testing.assert_close(view, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(buffer[1:], old[1:]) and torch.equal(buffer[..., d:], old[..., d:])  # nothing else


def test_qkv_supports_names_what_the_kernel_does_not_cover():
    x, w, b, ep, cos, sin, caches, pos = _qkv_case(torch.float32)
    assert gemv.supports_qkv(x, w, b, ep, cos, sin, *caches, pos) is None
    assert "heads" in gemv.supports_qkv(x, w[:-8], b, ep, cos, sin, *caches, pos)
    assert gemv.supports_qkv(x, w, b, ep, cos, sin, *caches, torch.tensor([1, 2])) == "pos is not one integer slot"
    two_rows = [torch.cat([c, c]) for c in caches]
    assert "one sequence" in gemv.supports_qkv(x, w, b, ep, cos, sin, *two_rows, pos)
    assert "one row of" in gemv.supports_qkv(x, w, b, ep, cos.expand(1, 1, 2, 16), sin, *caches, pos)
    two_narrow_rows = cos[..., :8].expand(1, 1, 2, 8)  # 16 elements, but two rows of 8: not one row
    assert "one row of" in gemv.supports_qkv(x, w, b, ep, two_narrow_rows, two_narrow_rows, *caches, pos)


def test_qkv_op_on_cpu_writes_the_caches_and_returns_q():
    x, w, b, ep, cos, sin, caches, pos = _qkv_case(torch.float32)
    k_cache, v_cache = (c.clone() for c in caches)
    q = torch.ops.fxopt.gemv_qkv(x, w, b, ep.norm_weight, ep.eps, cos, sin, k_cache, v_cache, pos)
    q_eager, k_eager, v_eager = _qkv_eager(x, w, b, ep, cos, sin, caches, pos, n_heads=4, n_kv_heads=2)
    torch.testing.assert_close(q, q_eager)
    torch.testing.assert_close(k_cache, k_eager)
    torch.testing.assert_close(v_cache, v_eager)


_AOT_QKV_SCRIPT = r"""
from fxopt.codegen import gemv as G

ints = {"K": "i32", "stride_wn": "i32", "eps": "fp32", "qk_eps": "fp32", "q_heads": "i32", "kv_heads": "i32",
        "s_cos": "i32", "s_sin": "i32", "s_kh": "i32", "s_ks": "i32", "s_kd": "i32", "s_vh": "i32", "s_vs": "i32",
        "s_vd": "i32"}
for ptr in ("*bf16", "*fp32"):
    signature = {p.name: ints.get(p.name, "*i64" if p.name == "pos_ptr" else ptr)
                 for p in G._gemv_qkv_kernel.params if not p.is_constexpr}
    for norm, layer, rope, pdl in ((True, False, True, True), (False, False, False, False), (True, True, False, True)):
        # the LayerNorm variant as GPT-NeoX's: [q_h; k_h; v_h] rows, a quarter of each head rotated
        constexprs = dict(HAS_BIAS=layer, NORM=norm, LAYER=layer, NORM_BIAS=layer, ROPE=rope or layer, PDL=pdl,
                          HEAD_DIM=64, BLOCK_N=1, BLOCK_K=1024, EVEN_K=True, ROT=16 if layer else 64,
                          INTERLEAVED=layer, ADJACENT=not layer and rope)  # and GPT-J's adjacent pairs
        ptx = compile_sm90(G._gemv_qkv_kernel, signature, constexprs, num_warps=4).asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl
        if pdl:  # the weights' first chunk is requested before waiting for the previous kernel
            assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), "weight loads after the wait"
        print("compiled gemv_qkv", ptr, norm, layer, rope, pdl)
    heads_signature = {p.name: ints.get(p.name, "*i64" if p.name == "pos_ptr" else ptr)
                       for p in G._qkv_heads_kernel.params if not p.is_constexpr}
    for rope, pdl in ((True, True), (False, False)):  # the per-head q/k norm kernel after the GEMV
        constexprs = dict(ROPE=rope, PDL=pdl, HEAD_DIM=128, BLOCK_H=64, ROT=64 if rope else 128, INTERLEAVED=False,
                          ADJACENT=False)
        ptx = compile_sm90(G._qkv_heads_kernel, heads_signature, constexprs, num_warps=1).asm["ptx"]
        assert "rsqrt" in ptx and ("griddepcontrol.wait" in ptx) == pdl
        print("compiled gemv_qkv heads", ptr, rope, pdl)
"""


def test_gemv_qkv_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    from aot_sm90 import run_script

    assert run_script(tmp_path, "aot_gemv_qkv", _AOT_QKV_SCRIPT).count("compiled gemv_qkv") == 10
