"""Sliding window, logit soft-cap and ALiBi in both attention kernels (and the custom ops), against a float64
oracle written here from the definitions alone: an explicit boolean band mask and an explicit bias.

    query at absolute position p sees key j  iff  valid[j] and j <= p (causal) and j > p - window
    score = softcap * tanh(scale * q.k / softcap) + slope[h] * (j - p)

Without a GPU the kernels run in the Triton interpreter (fp16/fp32 only: its bf16 tl.dot is wrong); sizes are
small so each case takes a fraction of a second or two on a 2-core CI box.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FXOPT_ATTN_AUTOTUNE", "0")

import pytest  # noqa: E402
from attention_checks import assert_close_to_reference  # noqa: E402

from fxopt.codegen import attention_op  # noqa: E402
from fxopt.codegen import flash_attention as fa  # noqa: E402
from fxopt.codegen import flash_decoding as fd  # noqa: E402

INTERPRET = fa._INTERPRET
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")


# ------------------------------------------------------------------ the oracle (independent of the package)


def oracle(q, k, v, *, pos, valid, causal, window=0, softcap=0.0, slopes=None, scale=None, dtype=torch.float64):
    """Attention with explicit masks. pos: (b, sq) absolute query positions; valid: (b, skv) bool keys.
    Computed in `dtype` (float64: the reference; the input dtype: the 'eager' error yardstick).
    Returns (output (b, hq, sq, d), band (b, sq, skv) bool)."""
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    group = hq // k.shape[1]
    qf = q.to(dtype)
    kf = k.to(dtype).repeat_interleave(group, 1)
    vf = v.to(dtype).repeat_interleave(group, 1)
    scale = d**-0.5 if scale is None else scale
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    rel = torch.arange(skv, device=q.device)[None, None, :] - pos.to(q.device)[:, :, None]  # j - p
    if slopes is not None:  # the bias in fp32 at least (a half-precision distance would round)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        scores = (scores.to(wide) + slopes.to(wide)[None, :, None, None] * rel[:, None].to(wide)).to(dtype)
    band = valid.to(q.device)[:, None, :].expand(b, sq, skv).clone()
    if causal:
        band &= rel <= 0
    if window:
        band &= rel > -window
    scores = scores.masked_fill(~band[:, None], float("-inf"))
    return (torch.softmax(scores, dim=-1).nan_to_num(0.0) @ vf), band


def check_against_oracle(out, q, k, v, *, pos, valid, what="", **kw):
    ref64, band = oracle(q, k, v, pos=pos, valid=valid, **kw)
    eager, _ = oracle(q, k, v, pos=pos, valid=valid, dtype=q.dtype, **kw)
    assert_close_to_reference(out, ref64, eager, q.dtype, what)
    return band


def rand(*shape, dtype, seed, layout="bhsd"):
    gen = torch.Generator().manual_seed(seed)
    if layout == "bshd":
        b, h, s, d = shape
        return torch.randn(b, s, h, d, generator=gen).to(device=DEVICE, dtype=dtype).transpose(1, 2)
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def bloom_slopes(h):
    """ALiBi slopes 2^(-8 i / h), i = 1..h (Press et al.; Bloom / MPT for powers of two)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], dtype=torch.float32, device=DEVICE)


def positions(b, sq, q_offset):
    offs = q_offset if isinstance(q_offset, torch.Tensor) else torch.full((b,), int(q_offset))
    return offs.cpu().long().reshape(-1, 1) + torch.arange(sq)[None, :]


def valid_keys(b, skv, key_padding_mask=None, kv_len=None, kv_start=None):
    cols = torch.arange(skv)[None, :]
    valid = torch.ones(b, skv, dtype=torch.bool)
    if key_padding_mask is not None:
        valid &= key_padding_mask.cpu()
    if kv_len is not None:
        valid &= cols < kv_len.cpu().long().reshape(-1, 1)
    if kv_start is not None:
        valid &= cols >= kv_start.cpu().long().reshape(-1, 1)
    return valid


def run_prefill(q, k, v, *, causal=True, key_padding_mask=None, q_offset=0, kv_len=None, tile=None, tma=None,
                what="", **features):
    b, _, sq, _ = q.shape
    if tile is None and tma is None:
        out = fa.flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, q_offset=q_offset,
                                 kv_len=kv_len, **features)
    else:
        out = fa.launch(q, k, v, causal=causal, scale=None, key_padding_mask=key_padding_mask, q_offset=q_offset,
                         kv_len=kv_len, tile=tile, tma=tma, **features)
    slopes = features.get("alibi_slopes")
    band = check_against_oracle(
        out.cpu(), q.cpu(), k.cpu(), v.cpu(), pos=positions(b, sq, q_offset),
        valid=valid_keys(b, k.shape[2], key_padding_mask, kv_len), causal=causal, window=features.get("window", 0),
        softcap=features.get("softcap", 0.0), slopes=None if slopes is None else slopes.cpu(), what=what)
    return out, band


# ------------------------------------------------------------------ prefill: sliding window


@pytest.mark.parametrize("window", [1, 7, 20, 33, 100], ids=lambda w: f"w{w}")
def test_prefill_window(window):
    """GQA 4/2, 45 tokens: windows of one key, a few tiles, about the block size, and past the length (= causal).
    With the interpreter's 32x16 tiles the lead (masked), fast and diagonal ranges all occur."""
    q = rand(1, 4, 45, 16, dtype=torch.float16, seed=window)
    k = rand(1, 2, 45, 16, dtype=torch.float16, seed=window + 1)
    v = rand(1, 2, 45, 16, dtype=torch.float16, seed=window + 2)
    out, band = run_prefill(q, k, v, window=window, what=f"window {window}")
    assert band.sum(-1).max() == min(window, 45)  # the oracle's band really is `window` keys wide
    if window >= 45:  # a window past the length changes nothing
        torch.testing.assert_close(out, fa.flash_attention(q, k, v, causal=True), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_prefill_window_offsets_kvlen_padding(dtype):
    """A chunk of prefill (per-batch query offsets) over a cache with kv_len and a padding mask, window 13."""
    b, hq, hkv, sq, skv, d = 2, 2, 1, 20, 48, 32
    q = rand(b, hq, sq, d, dtype=dtype, seed=1, layout="bshd")
    k = rand(b, hkv, skv, d, dtype=dtype, seed=2, layout="bshd")
    v = rand(b, hkv, skv, d, dtype=dtype, seed=3, layout="bshd")
    gen = torch.Generator().manual_seed(4)
    mask = (torch.rand(b, skv, generator=gen) > 0.25).to(DEVICE)
    offs = torch.tensor([28, 5], device=DEVICE)
    kv_len = torch.tensor([48, 30], dtype=torch.int32, device=DEVICE)
    run_prefill(q, k, v, key_padding_mask=mask, q_offset=offs, kv_len=kv_len, window=13, what="tensor offsets")
    run_prefill(q, k, v, q_offset=17, kv_len=kv_len, window=9, what="int offset")


@pytest.mark.parametrize("tile", [(16, 32, 4, 1), (64, 16, 4, 1)], ids=["m16n32", "m64n16"])
def test_prefill_window_other_tiles(tile):
    """Band edges with key tiles wider than the query block, and several masked tiles per block."""
    q = rand(1, 2, 40, 16, dtype=torch.float16, seed=5)
    k = rand(1, 2, 70, 16, dtype=torch.float16, seed=6)
    v = rand(1, 2, 70, 16, dtype=torch.float16, seed=7)
    for window in (5, 24, 50):
        run_prefill(q, k, v, q_offset=30, tile=tile, window=window, what=f"{tile} window {window}")


# ------------------------------------------------------------------ prefill: soft-cap and ALiBi


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_prefill_softcap(dtype, causal):
    q = rand(1, 2, 33, 32, dtype=dtype, seed=8) * 2  # scores of a few units: a cap of 1.5 bites
    k = rand(1, 2, 40, 32, dtype=dtype, seed=9)
    v = rand(1, 2, 40, 32, dtype=dtype, seed=10)
    run_prefill(q, k, v, causal=causal, q_offset=7, softcap=1.5, what=f"softcap {dtype} causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_prefill_alibi(causal):
    """Slopes per query head under GQA 4/1, absolute positions (q_offset 10: bias j - p, not j - i)."""
    q = rand(1, 4, 20, 16, dtype=torch.float32, seed=11)
    k = rand(1, 1, 30, 16, dtype=torch.float32, seed=12)
    v = rand(1, 1, 30, 16, dtype=torch.float32, seed=13)
    run_prefill(q, k, v, causal=causal, q_offset=10, alibi_slopes=bloom_slopes(4), what=f"alibi causal={causal}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_prefill_all_variants_combined(dtype):
    """Window + soft-cap + ALiBi + GQA + padding + kv_len + per-batch offsets at once."""
    b, hq, hkv, sq, skv, d = 2, 4, 2, 17, 45, 32
    q = rand(b, hq, sq, d, dtype=dtype, seed=14) * 2
    k = rand(b, hkv, skv, d, dtype=dtype, seed=15)
    v = rand(b, hkv, skv, d, dtype=dtype, seed=16)
    mask = (torch.rand(b, skv, generator=torch.Generator().manual_seed(17)) > 0.2).to(DEVICE)
    offs = torch.tensor([28, 3], device=DEVICE)
    kv_len = torch.tensor([45, 33], dtype=torch.int32, device=DEVICE)
    run_prefill(q, k, v, key_padding_mask=mask, q_offset=offs, kv_len=kv_len, window=11, softcap=2.0,
                alibi_slopes=bloom_slopes(hq), what=f"combined {dtype}")


def test_prefill_tma_path_with_variants():
    """The TMA fast path (forced on; descriptor loads in the interpreter) with a window (lead + fast + diagonal
    ranges), soft-cap and ALiBi: the variants keep the TMA/pointer split."""
    q = rand(1, 4, 40, 32, dtype=torch.float16, seed=18, layout="bshd")
    k = rand(1, 2, 64, 32, dtype=torch.float16, seed=19, layout="bshd")
    v = rand(1, 2, 64, 32, dtype=torch.float16, seed=20, layout="bshd")
    assert fa.tma_compatible(k, v)
    run_prefill(q, k, v, q_offset=24, tma=True, window=30, softcap=3.0, alibi_slopes=bloom_slopes(4), what="tma")
    run_prefill(q, k, v, causal=False, tma=True, alibi_slopes=bloom_slopes(4), what="tma alibi full")


def test_prefill_fully_masked_rows_are_zero():
    """Rows whose band holds only padded keys, a sequence of kv_len 0 and rows before position 0: all 0."""
    b, sq, skv = 3, 12, 30
    q = rand(b, 2, sq, 16, dtype=torch.float16, seed=21)
    k = rand(b, 1, skv, 16, dtype=torch.float16, seed=22)
    v = rand(b, 1, skv, 16, dtype=torch.float16, seed=23)
    mask = torch.ones(b, skv, dtype=torch.bool)
    mask[0, :20] = False  # batch 0 (offset 10, window 4): rows at positions 10..19 see only padded keys
    mask = mask.to(DEVICE)
    kv_len = torch.tensor([30, 30, 0], dtype=torch.int32, device=DEVICE)
    out, band = run_prefill(q, k, v, key_padding_mask=mask, q_offset=torch.tensor([10, -5, 3], device=DEVICE),
                            kv_len=kv_len, window=4, softcap=5.0, alibi_slopes=bloom_slopes(2))
    empty = ~band.any(-1)  # (b, sq)
    assert empty[0, :10].all() and empty[1, :5].all() and empty[2].all()
    assert (out.cpu().permute(0, 2, 1, 3)[empty] == 0).all()


def test_prefill_huge_window_is_causal():
    """A window wider than any position (clamped to MAX_WINDOW inside) equals plain causal attention."""
    q, k, v = (rand(1, 2, 20, 16, dtype=torch.float32, seed=s) for s in (24, 25, 26))
    out = fa.flash_attention(q, k, v, causal=True, q_offset=-3, window=1 << 40)
    torch.testing.assert_close(out, fa.flash_attention(q, k, v, causal=True, q_offset=-3), rtol=1e-5, atol=1e-6)


def test_supports_and_reference_reject_bad_variants():
    q, k, v = (torch.randn(1, 4, 5, 16) for _ in range(3))
    assert fa.supports(q, k, v, causal=True, window=3, softcap=2.0, alibi_slopes=torch.ones(4)) is None
    assert "causal" in fa.supports(q, k, v, causal=False, window=3)
    assert "window" in fa.supports(q, k, v, causal=True, window=-1)
    assert "softcap" in fa.supports(q, k, v, softcap=-1.0)
    assert "softcap" in fa.supports(q, k, v, softcap=float("inf"))
    assert "alibi_slopes" in fa.supports(q, k, v, alibi_slopes=torch.ones(2))
    assert "alibi_slopes" in fa.supports(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="causal"):
        fa.attention_reference(q, k, v, window=2)
    with pytest.raises(ValueError, match="causal"):
        fa.flash_attention(q, k, v, window=2)
    kv_len = torch.tensor([5])
    with pytest.raises(ValueError, match="causal"):
        fd.decode_attention(q[:, :, :1], k, v, kv_len, causal=False, window=2)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fd.decode_attention(q[:, :, :1], k, v, kv_len, alibi_slopes=torch.ones(3))


# ------------------------------------------------------------------ decode


def run_decode(q, k, v, kv_len, *, q_offset=None, kv_start=None, num_splits=None, what="", **features):
    b, _, sq, _ = q.shape
    out = fd.decode_attention(q, k, v, kv_len, q_offset=q_offset, kv_start=kv_start, num_splits=num_splits,
                              **features)
    offs = kv_len.long() - sq if q_offset is None else q_offset
    slopes = features.get("alibi_slopes")
    band = check_against_oracle(
        out.cpu(), q.cpu(), k.cpu(), v.cpu(), pos=positions(b, sq, offs),
        valid=valid_keys(b, k.shape[2], kv_len=kv_len, kv_start=kv_start), causal=True,
        window=features.get("window", 0), softcap=features.get("softcap", 0.0),
        slopes=None if slopes is None else slopes.cpu(), what=what)
    return out, band


@pytest.mark.parametrize("window", [1, 30, 130, 500], ids=lambda w: f"w{w}")
def test_decode_window(window):
    """One new token, GQA 4/1, window from one key to past the cache: the chunks split only the band."""
    b, hq, hkv, max_len, d = 2, 4, 1, 300, 32
    q = rand(b, hq, 1, d, dtype=torch.float16, seed=window)
    k = rand(b, hkv, max_len, d, dtype=torch.float16, seed=window + 1)
    v = rand(b, hkv, max_len, d, dtype=torch.float16, seed=window + 2)
    kv_len = torch.tensor([300, 77], dtype=torch.int32, device=DEVICE)
    fd._PLANS.clear()
    for splits in (None, 3):
        run_decode(q, k, v, kv_len, num_splits=splits, window=window, what=f"window {window} splits {splits}")
    for plan in fd._PLANS.values():  # work proportional to the window: the chunks cover its span, no more
        chunk, num_splits = plan.ints[-3], plan.ints[-2]
        assert plan.span == min(max_len, window)
        assert chunk * num_splits >= plan.span and chunk * (num_splits - 1) < plan.span


def test_decode_window_several_tokens_kv_start_offsets():
    """Four new tokens (the band is window + 3 keys), left padding, explicit per-batch offsets; fp32."""
    b, hq, hkv, sq, max_len, d = 3, 4, 2, 4, 120, 16
    q = rand(b, hq, sq, d, dtype=torch.float32, seed=30, layout="bshd")
    k = rand(b, hkv, max_len, d, dtype=torch.float32, seed=31, layout="bshd")
    v = rand(b, hkv, max_len, d, dtype=torch.float32, seed=32, layout="bshd")
    kv_len = torch.tensor([120, 90, 40], dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor([0, 70, 30], device=DEVICE)
    run_decode(q, k, v, kv_len, kv_start=kv_start, num_splits=4, window=25, what="kv_start")
    pos = torch.tensor([100, 50, 36], device=DEVICE)
    run_decode(q, k, v, kv_len, q_offset=pos, kv_start=kv_start, num_splits=2, window=25, what="offsets")


@pytest.mark.parametrize("variant", ["softcap", "alibi", "all"])
def test_decode_softcap_alibi(variant):
    b, hq, hkv, sq, max_len, d = 2, 4, 2, 2, 160, 32
    q = rand(b, hq, sq, d, dtype=torch.float16, seed=33) * 2
    k = rand(b, hkv, max_len, d, dtype=torch.float16, seed=34)
    v = rand(b, hkv, max_len, d, dtype=torch.float16, seed=35)
    kv_len = torch.tensor([160, 51], dtype=torch.int32, device=DEVICE)
    features = {"softcap": dict(softcap=1.5), "alibi": dict(alibi_slopes=bloom_slopes(hq)),
                "all": dict(softcap=1.5, alibi_slopes=bloom_slopes(hq), window=40)}[variant]
    run_decode(q, k, v, kv_len, num_splits=3, what=variant, **features)


@pytest.fixture
def tma_forced(monkeypatch):
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or later")
    monkeypatch.setattr(fd, "use_tma", lambda *tensors: fa.tma_compatible(*tensors))
    fd._PLANS.clear()
    yield
    fd._PLANS.clear()


def test_decode_tma_path_with_variants(tma_forced):
    """Whole tiles by TMA descriptors from a band start that is no tile multiple, the ragged rest by pointers."""
    b, hq, hkv, sq, max_len, d = 2, 4, 2, 3, 256, 32
    q = rand(b, hq, sq, d, dtype=torch.float16, seed=36)
    k = rand(b, hkv, max_len, d, dtype=torch.float16, seed=37)
    v = rand(b, hkv, max_len, d, dtype=torch.float16, seed=38)
    kv_len = torch.tensor([250, 131], dtype=torch.int32, device=DEVICE)
    run_decode(q, k, v, kv_len, num_splits=2, window=70, softcap=4.0, alibi_slopes=bloom_slopes(hq), what="tma")
    assert all(plan.meta["TMA"] for plan in fd._PLANS.values())


def test_decode_fully_masked_rows_are_zero():
    """Left padding past the whole band, and an empty sequence: rows of zeros, no NaN."""
    b, hq, hkv, sq, max_len, d = 3, 2, 1, 2, 100, 16
    q = rand(b, hq, sq, d, dtype=torch.float16, seed=39)
    k = rand(b, hkv, max_len, d, dtype=torch.float16, seed=40)
    v = rand(b, hkv, max_len, d, dtype=torch.float16, seed=41)
    kv_len = torch.tensor([60, 0, 100], dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor([59, 0, 0], device=DEVICE)  # batch 0: only key 59 valid; token 0 (pos 58) sees none
    out, band = run_decode(q, k, v, kv_len, kv_start=kv_start, num_splits=2, window=8, alibi_slopes=bloom_slopes(2))
    empty = ~band.any(-1)
    assert empty[0, 0] and not empty[0, 1] and empty[1].all()
    assert (out.cpu().permute(0, 2, 1, 3)[empty] == 0).all()


def test_decode_window_band_moves_with_kv_len_in_place():
    """One plan, kv_len changed in place between calls (as a CUDA-graph replay sees it): the band follows."""
    q = rand(1, 4, 1, 16, dtype=torch.float32, seed=42)
    k = rand(1, 2, 250, 16, dtype=torch.float32, seed=43)
    v = rand(1, 2, 250, 16, dtype=torch.float32, seed=44)
    kv_len = torch.tensor([250], dtype=torch.int32, device=DEVICE)
    fd._PLANS.clear()
    for n in (250, 37, 129, 1):
        kv_len.fill_(n)
        run_decode(q, k, v, kv_len, num_splits=2, window=64, what=f"kv_len {n}")
    assert len(fd._PLANS) == 1
    run_decode(q, k, v, kv_len, num_splits=2, window=65)
    run_decode(q, k, v, kv_len, num_splits=2, window=64, softcap=3.0)
    assert len(fd._PLANS) == 3  # window and soft-cap are part of the plan's key


# ------------------------------------------------------------------ the custom ops


@pytest.mark.parametrize("case", ["window", "softcap-bias", "alibi-pad", "all"])
def test_sdpa_fallback_implements_variants(case):
    """The op's non-kernel path (plain PyTorch) against the oracle; top-left causal (query i at position i)."""
    b, hq, hkv, sq, skv, d = 2, 4, 2, 9, 14, 16
    q = rand(b, hq, sq, d, dtype=torch.float32, seed=45).cpu() * 2
    k = rand(b, hkv, skv, d, dtype=torch.float32, seed=46).cpu()
    v = rand(b, hkv, skv, d, dtype=torch.float32, seed=47).cpu()
    mask = torch.rand(b, skv, generator=torch.Generator().manual_seed(48)) > 0.3
    bias = torch.randn(b, 1, sq, skv, generator=torch.Generator().manual_seed(49))
    slopes = bloom_slopes(hq).cpu()
    kw = {"window": dict(causal=True, window=4), "softcap-bias": dict(causal=False, softcap=1.5, bias=bias),
          "alibi-pad": dict(causal=True, slopes=slopes, mask=mask),
          "all": dict(causal=True, window=5, softcap=2.0, slopes=slopes, mask=mask, bias=bias)}[case]
    out = attention_op.sdpa_fallback(q, k, v, kw.get("mask"), kw.get("bias"), kw["causal"], 0.25,
                                     kw.get("window", 0), kw.get("softcap", 0.0), kw.get("slopes"))
    # the oracle takes no additive bias: the same definitions by hand (scores + bias before the masks)
    valid = mask if "mask" in kw else torch.ones(b, skv, dtype=torch.bool)
    g = hq // hkv
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * 0.25
    if kw.get("softcap"):
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    rel = torch.arange(skv)[None, :] - torch.arange(sq)[:, None]
    if "slopes" in kw:
        s = s + slopes.double()[None, :, None, None] * rel
    if "bias" in kw:
        s = s + bias.double()
    keep = valid[:, None, None, :] & ((rel <= 0) if kw["causal"] else torch.ones_like(rel, dtype=torch.bool))
    if kw.get("window"):
        keep = keep & (rel > -kw["window"])
    ref = (torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
           @ v.double().repeat_interleave(g, 1))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_attention_op_variants_kernel_and_fallback_agree(monkeypatch):
    """fxopt::attention with the new arguments: the flash kernel (interpreted) and the fallback agree; old
    7-argument calls still work; kernel_choice keeps flash for the variants."""
    q = rand(1, 4, 12, 16, dtype=torch.float32, seed=50)
    k = rand(1, 2, 12, 16, dtype=torch.float32, seed=51)
    v = rand(1, 2, 12, 16, dtype=torch.float32, seed=52)
    slopes = bloom_slopes(4)
    assert attention_op.kernel_choice(q, k, v, None, None, True, 0.25, 5, 2.0, slopes) == ("flash", "")
    assert attention_op.kernel_choice(q, k, v, None, None, False, 0.25, 5)[0] == "sdpa"
    fallback = torch.ops.fxopt.attention(q, k, v, None, None, True, 0.25, 5, 2.0, slopes)
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1")
    kernel = torch.ops.fxopt.attention(q, k, v, None, None, True, 0.25, window=5, softcap=2.0, alibi_slopes=slopes)
    torch.testing.assert_close(kernel, fallback, rtol=1e-4, atol=1e-5)
    plain = torch.ops.fxopt.attention(q, k, v, None, None, True, 0.25)
    torch.testing.assert_close(plain, fa.attention_reference(q, k, v, causal=True, scale=0.25), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sq", [2, 17], ids=["decode", "prefill-path"])
def test_cached_attention_op_variants(sq, monkeypatch):
    """fxopt::cached_attention with window / soft-cap / ALiBi and left padding: reference path and kernel path
    (Flash-Decoding for sq <= 16, FlashAttention above) against the oracle."""
    b, hq, hkv, max_len, d = 2, 2, 1, 40, 16
    q = rand(b, hq, sq, d, dtype=torch.float32, seed=53)
    k = rand(b, hkv, max_len, d, dtype=torch.float32, seed=54)
    v = rand(b, hkv, max_len, d, dtype=torch.float32, seed=55)
    kv_len = torch.tensor([40, 30], device=DEVICE)
    kv_start = torch.tensor([0, 6], device=DEVICE)
    slopes = bloom_slopes(hq)
    args = (q, k, v, kv_start, kv_len, 0.25, 9, 3.0, slopes)
    pos = positions(b, sq, kv_len - sq)
    valid = valid_keys(b, max_len, kv_len=kv_len, kv_start=kv_start)
    common = dict(pos=pos, valid=valid, causal=True, window=9, softcap=3.0, slopes=slopes.cpu(), scale=0.25)
    check_against_oracle(torch.ops.fxopt.cached_attention(*args).cpu(), q.cpu(), k.cpu(), v.cpu(), **common)
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1")
    check_against_oracle(torch.ops.fxopt.cached_attention(*args).cpu(), q.cpu(), k.cpu(), v.cpu(), **common)
    ref = attention_op.cached_attention_reference(*args)
    check_against_oracle(ref.cpu(), q.cpu(), k.cpu(), v.cpu(), **common)
