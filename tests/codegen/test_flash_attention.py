"""FlashAttention kernel vs the float64 reference, on small random inputs.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 must be set
before triton is imported, hence the top of this file). With a GPU the same tests run compiled on CUDA.
bf16 is left to tests/gpu: the interpreter's bf16 tl.dot is wrong (see DESIGN.md, Numerics).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FXOPT_ATTN_AUTOTUNE", "0")  # on a GPU: one compile per case, not a tuning sweep

import pytest  # noqa: E402
import sympy  # noqa: E402
from attention_checks import allowed_mask, assert_close_to_reference, eager_attention  # noqa: E402

from fxopt.codegen import flash_attention as fa  # noqa: E402
from fxopt.codegen.flash_attention import (  # noqa: E402
    attention_flops,
    attention_hbm_bytes,
    attention_reference,
    flash_attention,
    supports,
)

INTERPRET = fa._INTERPRET  # the mode the kernels were built in (TRITON_INTERPRET at import)
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")


# ------------------------------------------------------------------ helpers








def make_qkv(b, hq, hkv, sq, skv, d, dtype, *, layout="bhsd", seed=0, device=DEVICE):
    """Random q, k, v. layout 'bshd': transposes of (b, s, h, d) tensors; 'dlast': d not unit-stride."""
    gen = torch.Generator().manual_seed(seed)

    def make(h, s):
        if layout == "bshd":
            return torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        if layout == "dlast":
            return torch.randn(b, h, d, s, generator=gen).to(device=device, dtype=dtype).transpose(2, 3)
        return torch.randn(b, h, s, d, generator=gen).to(device=device, dtype=dtype)

    return make(hq, sq), make(hkv, skv), make(hkv, skv)


def check(q, k, v, *, causal, key_padding_mask=None, q_offset=0, kv_len=None, scale=None, tile=None, tma=None,
          what=""):
    b, _, sq, _ = q.shape
    skv = k.shape[2]
    allowed = allowed_mask(b, sq, skv, causal=causal, key_padding_mask=key_padding_mask, q_offset=q_offset,
                           kv_len=kv_len, device=q.device)
    mask = allowed_mask(b, 1, skv, causal=False, key_padding_mask=key_padding_mask, kv_len=kv_len,
                        device=q.device)[:, 0]
    if tile is None and tma is None:
        out = flash_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                              q_offset=q_offset, kv_len=kv_len)
    else:
        out = fa.launch(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                         q_offset=q_offset, kv_len=kv_len, tile=tile, tma=tma)
    ref64 = attention_reference(q.double(), k.double(), v.double(), causal=causal, scale=scale,
                                key_padding_mask=mask, q_offset=q_offset)
    eager = eager_attention(q, k, v, allowed, scale)
    # the output is dense in q's memory order: (b, s, h, d) when q is a head-transposed view
    dense = out.transpose(1, 2) if q.stride(1) < q.stride(2) else out
    assert dense.is_contiguous()
    assert_close_to_reference(out, ref64, eager, q.dtype, what)
    return out, allowed


# ------------------------------------------------------------------ the grid

# (b, hq, hkv, sq, skv, d, layout, padding mask, q_offset, kv_len)
CASES = [
    pytest.param(2, 4, 4, 33, 33, 64, "bhsd", False, 0, None, id="prefill-mha-d64"),
    pytest.param(2, 8, 2, 7, 45, 32, "bshd", True, 0, None, id="gqa4-pad-bshd-d32"),
    pytest.param(1, 8, 1, 1, 70, 80, "bhsd", False, 69, None, id="gqa8-q1-offset-d80"),
    pytest.param(2, 4, 1, 33, 50, 80, "bshd", True, "tensor", "kvlen", id="gqa4-offsets-kvlen-d80"),
    pytest.param(3, 2, 2, 7, 20, 64, "dlast", False, "tensor", None, id="dlast-offsets"),
    pytest.param(2, 8, 8, 1, 37, 32, "bhsd", True, 36, "kvlen", id="q1-pad-kvlen"),
    pytest.param(1, 4, 1, 33, 61, 64, "bshd", False, 28, None, id="gqa4-chunked-prefill"),
    pytest.param(2, 8, 1, 7, 7, 64, "bhsd", False, 0, "kvlen", id="gqa8-square-kvlen"),
    pytest.param(1, 2, 2, 33, 16, 32, "bhsd", False, 0, None, id="sq-gt-skv"),
    pytest.param(2, 2, 1, 20, 45, 80, "bshd", True, 0, None, id="gqa2-pad-d80"),
]


def _materialise(b, skv, pad, q_offset, kv_len, device, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    mask = None
    if pad:
        mask = torch.rand(b, skv, generator=gen) > 0.3
        mask[:, 0] = True
        mask = mask.to(device)
    if q_offset == "tensor":
        q_offset = torch.randint(0, skv, (b,), generator=gen).to(device)
    if kv_len == "kvlen":
        kv_len = torch.randint(1, skv + 1, (b,), generator=gen, dtype=torch.int32)
        kv_len[0] = skv - 1 if skv > 1 else 1
        kv_len = kv_len.to(device)
    return mask, q_offset, kv_len


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("b, hq, hkv, sq, skv, d, layout, pad, q_offset, kv_len", CASES)
def test_matches_reference(b, hq, hkv, sq, skv, d, layout, pad, q_offset, kv_len, dtype, causal):
    seed = b * 1000 + hq * 100 + sq * 10 + skv + d
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, dtype, layout=layout, seed=seed)
    mask, q_offset, kv_len = _materialise(b, skv, pad, q_offset, kv_len, q.device, seed)
    check(q, k, v, causal=causal, key_padding_mask=mask, q_offset=q_offset, kv_len=kv_len,
          what=f"{dtype} causal={causal}")


TMA_CASES = [case for case in CASES if case.values[6] != "dlast"]  # a descriptor needs d unit-stride


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b, hq, hkv, sq, skv, d, layout, pad, q_offset, kv_len", TMA_CASES)
def test_tma_loads_match_reference(b, hq, hkv, sq, skv, d, layout, pad, q_offset, kv_len, causal):
    """K/V tiles of the unmasked fast path loaded through TMA descriptors (forced on here; on a GPU use_tma
    decides), with GQA heads picked by descriptor coordinates and d80 padded to 128 by the descriptor's zero
    fill; the masked tiles stay pointer loads."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or later")
    seed = b * 1000 + hq * 100 + sq * 10 + skv + d
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, torch.float16, layout=layout, seed=seed)
    assert fa.tma_compatible(k, v)
    mask, q_offset, kv_len = _materialise(b, skv, pad, q_offset, kv_len, q.device, seed)
    check(q, k, v, causal=causal, key_padding_mask=mask, q_offset=q_offset, kv_len=kv_len, tma=True,
          what=f"tma causal={causal}")


def test_tma_compatibility_rules():
    k = torch.zeros(2, 4, 40, 64, dtype=torch.float16)
    assert fa.tma_compatible(k, k)
    assert not fa.tma_compatible(k.float(), k.float())  # 16-bit elements only
    assert not fa.tma_compatible(k.transpose(2, 3))  # d must be unit-stride
    assert fa.tma_compatible(k[..., :20])  # a slice of d keeps 128-byte rows
    assert not fa.tma_compatible(torch.zeros(2, 4, 40, 20, dtype=torch.float16))  # 40-byte rows
    assert not fa.tma_compatible(torch.zeros(k.numel() + 4, dtype=torch.float16)[4:].view(k.shape))  # 8-byte base
    assert not fa.tma_compatible(k[:, :, :0])  # no empty dim
    assert not fa.use_tma(k, k)  # never chosen by default for CPU tensors (tests force it)


@pytest.mark.parametrize("tile", [(16, 32, 4, 1), (64, 16, 4, 1)], ids=["m16n32", "m64n16"])
def test_other_tiles(tile):
    """Diagonal/tail logic with BLOCK_N > BLOCK_M and with several key tiles per diagonal."""
    q, k, v = make_qkv(2, 4, 2, 40, 70, 64, torch.float16, layout="bshd", seed=5)
    offs = torch.tensor([30, 3], device=q.device)
    kv_len = torch.tensor([70, 50], device=q.device, dtype=torch.int32)
    check(q, k, v, causal=True, q_offset=offs, kv_len=kv_len, tile=tile, what=str(tile))
    check(q, k, v, causal=False, kv_len=kv_len, tile=tile, what=str(tile))


def test_fully_masked_rows_are_zero():
    b, hq, hkv, sq, skv, d = 3, 4, 2, 9, 40, 32
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, torch.float16, seed=11)
    mask = torch.rand(b, skv, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[0] = False  # batch 0: every key padded
    mask[1, 0] = True
    mask = mask.to(q.device)
    out, _ = check(q, k, v, causal=False, key_padding_mask=mask)
    assert (out[0] == 0).all()
    # kv_len 0 for one sequence, and a negative offset that hides every key from the first rows
    kv_len = torch.tensor([0, 40, 17], dtype=torch.int32, device=q.device)
    out, allowed = check(q, k, v, causal=True, q_offset=-3, kv_len=kv_len)
    assert (out[0] == 0).all()
    assert (out[:, :, :3] == 0).all()
    assert not allowed[:, :3].any()


def test_broadcast_inputs_mask_and_scale():
    """Stride-0 inputs: K/V broadcast over heads, q over the batch, a (b, skv) mask expanded from one
    row; and an explicit scale."""
    q, k, v = make_qkv(3, 4, 4, 7, 30, 64, torch.float32, seed=2)
    q = q[:1].expand(3, -1, -1, -1)
    k, v = k[:, :1].expand(-1, 4, -1, -1), v[:, :1].expand(-1, 4, -1, -1)
    assert q.stride(0) == 0 and k.stride(1) == 0
    row = torch.rand(1, 30, generator=torch.Generator().manual_seed(4)) > 0.4
    mask = row.to(q.device).expand(3, 30)
    assert mask.stride(0) == 0
    check(q, k, v, causal=True, key_padding_mask=mask, scale=0.3, q_offset=23)


def test_offsets_tensor_matches_int():
    q, k, v = make_qkv(2, 4, 4, 7, 40, 32, torch.float32, seed=9)
    by_int = flash_attention(q, k, v, causal=True, q_offset=20)
    by_tensor = flash_attention(q, k, v, causal=True, q_offset=torch.tensor([20, 20], device=q.device))
    torch.testing.assert_close(by_int, by_tensor, rtol=0, atol=0)


def test_kernel_path_is_active():
    """Guards against silently testing the reference: the kernel must run for DEVICE tensors."""
    assert fa._use_kernel(torch.empty(1, device=DEVICE))


def test_cpu_fallback_uses_reference(monkeypatch):
    """CPU tensors without the interpreter compute the reference (same semantics, kv_len included)."""
    from fxopt.codegen import attention_common

    monkeypatch.setattr(attention_common, "_INTERPRET", False)  # where _use_kernel reads it
    q, k, v = make_qkv(1, 2, 1, 5, 9, 32, torch.float32, device="cpu")
    kv_len = torch.tensor([6])
    out = flash_attention(q, k, v, causal=True, q_offset=4, kv_len=kv_len)
    mask = torch.arange(9)[None] < kv_len[:, None]
    ref = attention_reference(q, k, v, causal=True, q_offset=4, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ------------------------------------------------------------------ support check and cost formulas


def test_supports_reasons():
    q, k, v = make_qkv(1, 4, 2, 3, 5, 32, torch.float32, device="cpu")
    assert supports(q, k, v) is None
    big = torch.randn(1, 4, 3, 512)
    assert supports(big, big, big) == "head dim 512 > 256"
    assert supports(q.double(), k.double(), v.double()) == "dtype float64"
    assert "multiple" in supports(q, k[:, :1].expand(1, 3, 5, 32), v[:, :1].expand(1, 3, 5, 32))
    assert "mixed dtypes" in supports(q, k.half(), v)
    assert "key_padding_mask" in supports(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.int32))
    assert "scale" in supports(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="head dim 512"):
        flash_attention(big, big, big)


def test_cost_formulas_numbers_and_symbols():
    assert attention_flops(2, 8, 128, 128, 64, False) == 4 * 2 * 8 * 128 * 128 * 64
    assert attention_flops(2, 8, 128, 128, 64, True) == 4 * 2 * 8 * 128 * 128 * 64 // 2
    # one new token over 100 cached keys: all 100 pairs visible (minus the half-pair of the formula)
    assert attention_flops(1, 1, 1, 100, 64, True) == 2 * 64 * 199
    expected = 2 * (2 * 2 * 8 * 128 * 64 + 2 * 2 * 2 * 256 * 64)
    assert attention_hbm_bytes(2, 8, 2, 128, 256, 64, 2, True) == expected
    b, h, s, d = sympy.symbols("b h s d", positive=True, integer=True)
    flops = attention_flops(b, h, s, s, d, True)
    assert sympy.simplify(flops - 2 * b * h * s**2 * d) == 0
    assert sympy.simplify(attention_hbm_bytes(b, h, h, s, s, d, 2, False) - 8 * b * h * s * d) == 0


def test_cost_formulas_with_a_window():
    """Visible keys per row min(p + 1, window), in the causal formula's continuous count: every row capped
    gives exactly sq * window pairs, a window past the length gives the causal count, window 0 is none."""
    b, h, d = 1, 32, 128
    pairs = lambda flops: flops // (4 * b * h * d)  # noqa: E731
    assert pairs(attention_flops(b, h, 1, 16384, d, True, window=4096)) == 4096  # one decode token
    assert pairs(attention_flops(b, h, 16, 16384, d, True, window=4096)) == 16 * 4096
    n, w = 16384, 4096
    assert pairs(attention_flops(b, h, n, n, d, True, window=w)) == n * w - w * w // 2  # prefill
    for window in (0, n, 10 * n):
        assert attention_flops(b, h, n, n, d, True, window=window) == attention_flops(b, h, n, n, d, True)
    brute = sum(min(p + 1, w) for p in range(n))  # the discrete count differs only by the causal half-pairs
    assert abs(pairs(attention_flops(b, h, n, n, d, True, window=w)) - brute) <= w
    assert attention_hbm_bytes(1, 32, 8, 1, n, d, 2, True, window=w) == 2 * 32 * d * 2 + 2 * 8 * w * d * 2
    assert attention_hbm_bytes(1, 32, 8, n, n, d, 2, True, window=w) == attention_hbm_bytes(1, 32, 8, n, n, d, 2, True)
    s = sympy.symbols("s", positive=True, integer=True)
    flops = attention_flops(b, h, s, s, d, True, window=w)  # symbolic lengths: a Max() that settles per length
    assert flops.subs(s, n) == attention_flops(b, h, n, n, d, True, window=w)
    assert flops.subs(s, 100) == attention_flops(b, h, 100, 100, d, True)
    assert attention_hbm_bytes(b, h, h, s, s, d, 2, True, window=w).subs(s, 7) == attention_hbm_bytes(
        b, h, h, 7, 7, d, 2, True)


def test_reference_gqa_matches_repeated_heads():
    q, k, v = make_qkv(2, 8, 2, 5, 11, 16, torch.float64, device="cpu")
    ref = attention_reference(q, k, v, causal=True, q_offset=6)
    k4, v4 = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    torch.testing.assert_close(ref, attention_reference(q, k4, v4, causal=True, q_offset=6))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k4, v4)
    torch.testing.assert_close(attention_reference(q, k, v), sdpa)
