"""Full-size attention kernel tests on CUDA: flash_attention and decode_attention vs the float64
reference, every tile of the tuning list, autotuned launch, and CUDA-graph capture and replay.

Skipped without a GPU (tests/gpu/conftest.py). Tolerance: max error vs float64 <= 2x (fp32) or 3x
(fp16/bf16) the error of unfused eager attention in the input dtype, plus a small floor.
"""

import functools

import attention_checks as checks
import pytest
import torch

from fxopt.codegen import flash_attention as fa
from fxopt.codegen import flash_decoding as fd
from fxopt.codegen.flash_attention import attention_reference, flash_attention
from fxopt.codegen.flash_decoding import decode_attention, decode_reference

DEVICE = "cuda"
allowed_mask = functools.partial(checks.allowed_mask, device=DEVICE)
eager_attention = checks.eager_attention
assert_close_to_reference = checks.assert_close_to_reference
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or fa._INTERPRET,
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=1 at import builds interpreted ones)",
)
DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float32, id="fp32"),
]


# ------------------------------------------------------------------ helpers








def randn(*shape, dtype, gen, layout="bhsd"):
    """Random (b, h, s, d); 'bshd' = transpose of a (b, s, h, d) tensor, 'dlast' = d not unit-stride."""
    b, h, s, d = shape
    if layout == "bshd":
        return torch.randn(b, s, h, d, generator=gen, device=DEVICE).to(dtype).transpose(1, 2)
    if layout == "dlast":
        return torch.randn(b, h, d, s, generator=gen, device=DEVICE).to(dtype).transpose(2, 3)
    return torch.randn(b, h, s, d, generator=gen, device=DEVICE).to(dtype)


def check_flash(q, k, v, *, causal, key_padding_mask=None, q_offset=0, kv_len=None, tile=None, tma=None,
                what=""):
    b, _, sq, _ = q.shape
    skv = k.shape[2]
    allowed = allowed_mask(b, sq, skv, causal=causal, key_padding_mask=key_padding_mask, q_offset=q_offset,
                           kv_len=kv_len)
    key_mask = allowed_mask(b, 1, skv, causal=False, key_padding_mask=key_padding_mask, kv_len=kv_len)[:, 0]
    kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, q_offset=q_offset, kv_len=kv_len)
    if tile is None and tma is None:
        out = flash_attention(q, k, v, **kwargs)
    else:
        out = fa.launch(q, k, v, scale=None, tile=tile, tma=tma, **kwargs)
    ref64 = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=key_mask,
                                q_offset=q_offset)
    # the output is dense in q's memory order: (b, s, h, d) when q is a head-transposed view
    dense = out.transpose(1, 2) if q.stride(1) < q.stride(2) else out
    assert dense.is_contiguous()
    assert_close_to_reference(out, ref64, eager_attention(q, k, v, allowed), q.dtype, what)
    return out


def check_decode(q, k, v, kv_len, *, causal=True, q_offset=None, num_splits=None, what=""):
    b, _, sq, _ = q.shape
    out = decode_attention(q, k, v, kv_len, causal=causal, q_offset=q_offset, num_splits=num_splits)
    ref64 = decode_reference(q.double(), k.double(), v.double(), kv_len, causal=causal, q_offset=q_offset)
    offs = kv_len.long() - sq if q_offset is None else q_offset
    allowed = allowed_mask(b, sq, k.shape[2], causal=causal, q_offset=offs, kv_len=kv_len)
    assert_close_to_reference(out, ref64, eager_attention(q, k, v, allowed), q.dtype, what)
    return out


# ------------------------------------------------------------------ flash_attention grid

# (b, hq, hkv, sq, skv, d, layout, causal, padding mask, q_offset, kv_len)
FLASH_CASES = [
    pytest.param(2, 8, 8, 128, 128, 64, "bhsd", True, False, 0, None, id="q128-mha-d64-causal"),
    pytest.param(2, 32, 8, 1000, 1000, 128, "bshd", True, False, 0, None, id="q1000-gqa4-d128-causal"),
    pytest.param(1, 8, 1, 1000, 1537, 128, "bhsd", False, True, 0, None, id="q1000-gqa8-d128-pad"),
    pytest.param(2, 16, 4, 7, 1029, 96, "bshd", True, False, "tensor", "kvlen", id="q7-gqa4-d96-offsets"),
    pytest.param(3, 8, 8, 1, 4100, 256, "bhsd", True, False, 4099, None, id="q1-d256-offset"),
    pytest.param(2, 4, 1, 128, 333, 80, "dlast", False, True, 0, "kvlen", id="q128-gqa4-d80-dlast"),
    pytest.param(1, 8, 2, 1000, 1000, 32, "bhsd", True, False, 0, None, id="q1000-gqa4-d32-causal"),
    pytest.param(2, 4, 4, 128, 700, 256, "bshd", True, True, 572, "kvlen", id="q128-d256-bottom-right"),
    pytest.param(2, 12, 4, 1000, 1000, 64, "bhsd", False, False, 0, None, id="q1000-gqa3-d64"),
    pytest.param(1, 8, 8, 7, 129, 80, "bhsd", True, False, 122, None, id="q7-d80-offset"),
    pytest.param(2, 8, 1, 128, 513, 96, "bshd", False, False, 0, "kvlen", id="q128-gqa8-d96-kvlen"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, hq, hkv, sq, skv, d, layout, causal, pad, q_offset, kv_len", FLASH_CASES)
def test_flash_attention(b, hq, hkv, sq, skv, d, layout, causal, pad, q_offset, kv_len, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(sq * 7 + skv + d)
    q = randn(b, hq, sq, d, dtype=dtype, gen=gen, layout=layout)
    k = randn(b, hkv, skv, d, dtype=dtype, gen=gen, layout=layout)
    v = randn(b, hkv, skv, d, dtype=dtype, gen=gen, layout=layout)
    mask = None
    if pad:
        mask = torch.rand(b, skv, generator=gen, device=DEVICE) > 0.25
        mask[:, 0] = True
    if q_offset == "tensor":
        q_offset = torch.randint(0, skv, (b,), generator=gen, device=DEVICE)
    if kv_len == "kvlen":
        kv_len = torch.randint(1, skv + 1, (b,), generator=gen, device=DEVICE, dtype=torch.int32)
        kv_len[0] = skv - 3
    check_flash(q, k, v, causal=causal, key_padding_mask=mask, q_offset=q_offset, kv_len=kv_len,
                what=str(dtype))


@pytest.mark.parametrize("b, hq, hkv, sq, skv, d, layout, causal, pad, q_offset, kv_len", FLASH_CASES[:4])
def test_flash_attention_pointer_loads(b, hq, hkv, sq, skv, d, layout, causal, pad, q_offset, kv_len):
    """On Hopper the default launch streams K/V through TMA; the pointer-load path (older GPUs, FXOPT_TMA=0,
    layouts no descriptor can describe) is checked here too."""
    gen = torch.Generator(device=DEVICE).manual_seed(sq + skv + d)
    q, k, v = (randn(b, h, s, d, dtype=torch.bfloat16, gen=gen, layout=layout)
               for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))
    kv_len = torch.full((b,), skv - 5, dtype=torch.int32, device=DEVICE) if kv_len else None
    offs = skv - sq if q_offset == "tensor" else q_offset
    check_flash(q, k, v, causal=causal, q_offset=offs, kv_len=kv_len, tma=False, what="pointer loads")


def test_tma_is_the_default_on_hopper():
    """Guards against the TMA path silently never running on the GPU the figures come from."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    k = randn(1, 2, 64, 128, dtype=torch.bfloat16, gen=gen)
    assert fa.use_tma(k, k) == (torch.cuda.get_device_capability()[0] >= 9 and fa.TMA_ENABLED)
    assert not fa.use_tma(k.float(), k.float())  # fp32: pointer loads
    assert not fa.use_tma(k.transpose(2, 3), k.transpose(2, 3))  # d not unit-stride


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_fully_masked_rows(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    b, hq, hkv, sq, skv, d = 3, 8, 2, 128, 300, 128
    q, k, v = (randn(b, h, s, d, dtype=dtype, gen=gen) for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))
    mask = torch.rand(b, skv, generator=gen, device=DEVICE) > 0.5
    mask[0] = False
    mask[1:, 0] = True
    kv_len = torch.tensor([300, 250, 0], dtype=torch.int32, device=DEVICE)
    out = check_flash(q, k, v, causal=True, key_padding_mask=mask, kv_len=kv_len)
    assert (out[0] == 0).all() and (out[2] == 0).all()
    out = check_flash(q, k, v, causal=True, q_offset=-5)
    assert (out[:, :, :5] == 0).all()


def _tiles_for(d):
    """Every candidate tile of head dim d, for pointer loads and (Hopper and later) for TMA loads."""
    tiles = [(t, False) for t in fa._TILES[fa._block_d(d)]]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        tiles += [(t, True) for t in fa._TILES_TMA[fa._block_d(d)]]
    return [pytest.param(d, t, tma, id=f"d{d}-m{t[0]}n{t[1]}w{t[2]}s{t[3]}{'-tma' if tma else ''}")
            for t, tma in tiles]


@pytest.mark.parametrize("d, tile, tma", _tiles_for(64) + _tiles_for(128) + _tiles_for(256))
def test_every_tuning_tile(d, tile, tma):
    """Each candidate config computes the right thing (the autotuner may pick any of them)."""
    from triton.runtime.errors import OutOfResources

    gen = torch.Generator(device=DEVICE).manual_seed(d)
    b, hq, hkv, sq, skv = 2, 8, 2, 300, 517
    q = randn(b, hq, sq, d, dtype=torch.bfloat16, gen=gen, layout="bshd")
    k = randn(b, hkv, skv, d, dtype=torch.bfloat16, gen=gen)
    v = randn(b, hkv, skv, d, dtype=torch.bfloat16, gen=gen)
    offs = torch.tensor([217, 0], device=DEVICE)
    kv_len = torch.tensor([517, 301], dtype=torch.int32, device=DEVICE)
    try:
        check_flash(q, k, v, causal=True, q_offset=offs, kv_len=kv_len, tile=tile, tma=tma, what=str(tile))
        if d == 128:  # the unmasked fast path alone (no diagonal, no tail)
            check_flash(q, k[:, :, :512], v[:, :, :512], causal=False, tile=tile, tma=tma, what=str(tile))
    except OutOfResources as err:
        pytest.skip(f"tile does not fit this GPU ({err}); the autotuner skips it too")


def test_autotuned_prefill(monkeypatch):
    monkeypatch.setenv("FXOPT_ATTN_AUTOTUNE", "1")
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    b, h, n, d = 2, 16, 2048, 128
    q, k, v = (randn(b, h, n, d, dtype=torch.bfloat16, gen=gen) for _ in range(3))
    check_flash(q, k, v, causal=True)
    check_flash(q, k, v, causal=False)


def test_flash_attention_cuda_graph():
    """Prefill into a static cache: kv_len and q_offset are device tensors changed between replays."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    b, hq, hkv, sq, cap, d = 2, 8, 2, 64, 1024, 128
    q = randn(b, hq, sq, d, dtype=torch.bfloat16, gen=gen)
    k = randn(b, hkv, cap, d, dtype=torch.bfloat16, gen=gen)
    v = randn(b, hkv, cap, d, dtype=torch.bfloat16, gen=gen)
    pos = torch.tensor([0, 0], device=DEVICE)
    kv_len = torch.tensor([64, 64], dtype=torch.int32, device=DEVICE)
    run = lambda: flash_attention(q, k, v, causal=True, q_offset=pos, kv_len=kv_len)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile / tune outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for p0, p1 in [(0, 0), (100, 900), (960, 3)]:
        pos.copy_(torch.tensor([p0, p1]))
        kv_len.copy_(pos + sq)
        q.copy_(torch.randn(q.shape, generator=gen, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        key_mask = allowed_mask(b, 1, cap, causal=False, kv_len=kv_len)[:, 0]
        ref64 = attention_reference(q.double(), k.double(), v.double(), causal=True,
                                    key_padding_mask=key_mask, q_offset=pos)
        allowed = allowed_mask(b, sq, cap, causal=True, q_offset=pos, kv_len=kv_len)
        assert_close_to_reference(out, ref64, eager_attention(q, k, v, allowed), q.dtype, f"pos {p0},{p1}")


# ------------------------------------------------------------------ decode

# (b, hq, hkv, sq, max_len, d, layout, kv_len per batch)
DECODE_CASES = [
    pytest.param(2, 32, 8, 1, 16384, 128, "bhsd", [16384, 9001], id="kv16k-gqa4-q1"),
    pytest.param(4, 32, 8, 7, 16384, 128, "bshd", [1, 300, 4097, 16384], id="kv16k-gqa4-q7-varied"),
    pytest.param(1, 32, 32, 1, 32768, 128, "bhsd", [32768], id="kv32k-mha"),
    pytest.param(2, 16, 2, 16, 5000, 64, "bshd", [5000, 2049], id="gqa8-q16-d64"),
    pytest.param(3, 8, 8, 3, 4000, 80, "bhsd", [17, 3999, 2500], id="mha-q3-d80"),
    pytest.param(2, 8, 1, 1, 6000, 256, "bhsd", [6000, 777], id="gqa8-d256"),
    pytest.param(2, 12, 4, 4, 3000, 96, "bshd", [2999, 64], id="gqa3-d96"),
    pytest.param(2, 8, 4, 1, 2048, 32, "bhsd", [0, 2048], id="d32-empty-seq"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, hq, hkv, sq, max_len, d, layout, lens", DECODE_CASES)
def test_decode_attention(b, hq, hkv, sq, max_len, d, layout, lens, dtype):
    if dtype == torch.float32 and max_len > 16384:
        pytest.skip("fp32 at 32k adds nothing but memory")
    gen = torch.Generator(device=DEVICE).manual_seed(max_len + d)
    q = randn(b, hq, sq, d, dtype=dtype, gen=gen, layout=layout)
    k = randn(b, hkv, max_len, d, dtype=dtype, gen=gen, layout=layout)
    v = randn(b, hkv, max_len, d, dtype=dtype, gen=gen, layout=layout)
    kv_len = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = check_decode(q, k, v, kv_len, what=str(dtype))
    for i, n in enumerate(lens):
        if n == 0:
            assert (out[i] == 0).all()
    if sq > 1:
        check_decode(q, k, v, kv_len, causal=False, what=f"{dtype} non-causal")


def test_decode_explicit_offsets_and_splits():
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    b, hq, hkv, sq, max_len, d = 2, 32, 8, 4, 8192, 128
    q = randn(b, hq, sq, d, dtype=torch.bfloat16, gen=gen)
    k = randn(b, hkv, max_len, d, dtype=torch.bfloat16, gen=gen)
    v = randn(b, hkv, max_len, d, dtype=torch.bfloat16, gen=gen)
    pos = torch.tensor([5000, 17], device=DEVICE)
    kv_len = (pos + sq).to(torch.int64)
    base = check_decode(q, k, v, kv_len, q_offset=pos)
    for splits in (1, 3, 128):
        torch.testing.assert_close(decode_attention(q, k, v, kv_len, num_splits=splits), base,
                                   rtol=2e-2, atol=2e-2)


def test_decode_cuda_graph_replay():
    """Capture one decode step; replays with different kv_len (and q) give the reference result."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    b, hq, hkv, sq, max_len, d = 2, 32, 8, 1, 8192, 128
    q = randn(b, hq, sq, d, dtype=torch.bfloat16, gen=gen)
    k = randn(b, hkv, max_len, d, dtype=torch.bfloat16, gen=gen)
    v = randn(b, hkv, max_len, d, dtype=torch.bfloat16, gen=gen)
    kv_len = torch.tensor([100, 200], dtype=torch.int32, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_attention(q, k, v, kv_len)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, kv_len)
    for lens in ([100, 200], [1, 8192], [8192, 0], [4097, 2500], [100, 200]):
        kv_len.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        ref64 = decode_reference(q.double(), k.double(), v.double(), kv_len)
        allowed = allowed_mask(b, sq, max_len, causal=True, q_offset=kv_len.long() - sq, kv_len=kv_len)
        assert_close_to_reference(out, ref64, eager_attention(q, k, v, allowed), q.dtype, f"lens {lens}")


def test_kernels_are_compiled():
    assert not fa._INTERPRET and fa._use_kernel(torch.empty(1, device=DEVICE))


# ------------------------------------------------------------------ sliding window, soft-cap, ALiBi


def variant_oracle(q, k, v, *, pos, valid, causal=True, window=0, softcap=0.0, slopes=None, dtype=torch.float64):
    """Attention from the definitions: explicit band mask (valid, j <= p, j > p - window) and explicit bias
    (softcap * tanh(s / softcap) + slope[h] * (j - p)); pos (b, sq) absolute positions, valid (b, skv)."""
    b, hq, sq, d = q.shape
    group = hq // k.shape[1]
    kf, vf = k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    scores = (q.to(dtype) @ kf.transpose(-1, -2)) * d**-0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    rel = torch.arange(k.shape[2], device=DEVICE)[None, None, :] - pos[:, :, None]
    if slopes is not None:  # the bias in fp32 at least: bf16 cannot hold distances in the thousands
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        scores = (scores.to(wide) + slopes.to(wide)[None, :, None, None] * rel[:, None].to(wide)).to(dtype)
    band = valid[:, None, :] & ((rel <= 0) if causal else torch.ones_like(rel, dtype=torch.bool))
    if window:
        band = band & (rel > -window)
    scores = scores.masked_fill(~band[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ vf


def check_variant(out, q, k, v, what="", **kw):
    ref64 = variant_oracle(q, k, v, **kw)
    eager = variant_oracle(q, k, v, dtype=q.dtype, **kw)
    assert_close_to_reference(out, ref64, eager, q.dtype, what)


def alibi_slopes(h):
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], dtype=torch.float32, device=DEVICE)


# (b, hq, hkv, sq, skv, d, layout, causal, q_offset, kv_len, padding, features)
VARIANT_CASES = [
    pytest.param(2, 16, 4, 2048, 2048, 128, "bshd", True, 0, False, False, dict(window=512), id="window512-n2048"),
    pytest.param(2, 8, 2, 300, 2100, 64, "bhsd", True, "tensor", True, False, dict(window=1000),
                 id="window1000-offsets-kvlen-d64"),
    pytest.param(1, 8, 8, 1024, 1024, 128, "bhsd", False, 0, False, False, dict(softcap=2.0), id="softcap-full"),
    pytest.param(1, 16, 16, 1024, 1024, 128, "bshd", True, 0, False, False, dict(alibi=True), id="alibi-causal"),
    pytest.param(2, 16, 4, 1500, 1500, 128, "bhsd", True, 0, True, True,
                 dict(window=300, softcap=5.0, alibi=True), id="all-pad-kvlen"),
]


@pytest.mark.parametrize("tma", [None, False], ids=["default", "pointer"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("b, hq, hkv, sq, skv, d, layout, causal, q_offset, kv_len, pad, features", VARIANT_CASES)
def test_flash_attention_variants(b, hq, hkv, sq, skv, d, layout, causal, q_offset, kv_len, pad, features, dtype,
                                  tma):
    """Window / soft-cap / ALiBi at realistic sizes, TMA fast path (the default on Hopper) and pointer loads."""
    gen = torch.Generator(device=DEVICE).manual_seed(sq + skv + d)
    q = randn(b, hq, sq, d, dtype=dtype, gen=gen, layout=layout) * (3 if "softcap" in features else 1)
    k = randn(b, hkv, skv, d, dtype=dtype, gen=gen, layout=layout)
    v = randn(b, hkv, skv, d, dtype=dtype, gen=gen, layout=layout)
    mask = (torch.rand(b, skv, generator=gen, device=DEVICE) > 0.2) if pad else None
    offs = torch.randint(0, skv - sq, (b,), generator=gen, device=DEVICE) if q_offset == "tensor" else q_offset
    lens = torch.tensor([skv, skv * 2 // 3][:b], dtype=torch.int32, device=DEVICE) if kv_len else None
    kw = dict(window=features.get("window", 0), softcap=features.get("softcap", 0.0),
              alibi_slopes=alibi_slopes(hq) if features.get("alibi") else None)
    if tma is None:
        out = flash_attention(q, k, v, causal=causal, key_padding_mask=mask, q_offset=offs, kv_len=lens, **kw)
    else:
        out = fa.launch(q, k, v, causal=causal, scale=None, key_padding_mask=mask, q_offset=offs, kv_len=lens,
                         tma=tma, **kw)
    offs_t = offs if isinstance(offs, torch.Tensor) else torch.full((b,), offs, device=DEVICE)
    pos = offs_t.long()[:, None] + torch.arange(sq, device=DEVICE)[None, :]
    valid = allowed_mask(b, 1, skv, causal=False, key_padding_mask=mask, kv_len=lens)[:, 0]
    check_variant(out, q, k, v, pos=pos, valid=valid, causal=causal, window=kw["window"], softcap=kw["softcap"],
                  slopes=kw["alibi_slopes"], what=f"{dtype} tma={tma}")


def _variant_tiles():
    tiles = [(t, False) for t in fa._TILES[128]]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        tiles += [(t, True) for t in fa._TILES_TMA[128]]
    return [pytest.param(t, tma, id=f"m{t[0]}n{t[1]}w{t[2]}s{t[3]}{'-tma' if tma else ''}") for t, tma in tiles]


@pytest.mark.parametrize("tile, tma", _variant_tiles())
def test_every_tuning_tile_with_variants(tile, tma):
    """Each candidate config of d128 computes window + soft-cap + ALiBi right (the autotuner may pick any)."""
    from triton.runtime.errors import OutOfResources

    gen = torch.Generator(device=DEVICE).manual_seed(7)
    b, hq, hkv, sq, skv, d = 2, 8, 2, 300, 517, 128
    q = randn(b, hq, sq, d, dtype=torch.bfloat16, gen=gen, layout="bshd")
    k = randn(b, hkv, skv, d, dtype=torch.bfloat16, gen=gen)
    v = randn(b, hkv, skv, d, dtype=torch.bfloat16, gen=gen)
    offs = torch.tensor([217, 0], device=DEVICE)
    slopes = alibi_slopes(hq)
    try:
        out = fa.launch(q, k, v, causal=True, scale=None, key_padding_mask=None, q_offset=offs, kv_len=None,
                         window=150, softcap=4.0, alibi_slopes=slopes, tile=tile, tma=tma)
    except OutOfResources as err:
        pytest.skip(f"tile does not fit this GPU ({err}); the autotuner skips it too")
    pos = offs[:, None] + torch.arange(sq, device=DEVICE)[None, :]
    valid = torch.ones(b, skv, dtype=torch.bool, device=DEVICE)
    check_variant(out, q, k, v, pos=pos, valid=valid, window=150, softcap=4.0, slopes=slopes, what=str(tile))


@pytest.fixture(params=[True, False], ids=["tma", "pointer"])
def decode_tma(request, monkeypatch):
    """Decode plans made with TMA as the device decides (on, on Hopper) or forced off."""
    if not request.param:
        monkeypatch.setattr(fd, "use_tma", lambda *tensors: False)
    fd._PLANS.clear()
    yield request.param
    fd._PLANS.clear()


# (b, hq, hkv, sq, max_len, d, kv_len per batch, kv_start, features)
DECODE_VARIANT_CASES = [
    pytest.param(2, 32, 8, 1, 16384, 128, [16384, 5000], None, dict(window=4096), id="kv16k-window4096"),
    pytest.param(2, 32, 8, 7, 8192, 128, [8192, 3001], [0, 1000], dict(window=1000, softcap=30.0, alibi=True),
                 id="q7-window1000-kvstart-all"),
    pytest.param(1, 16, 16, 1, 8192, 128, [7000], None, dict(softcap=2.0), id="softcap"),
    pytest.param(2, 16, 2, 16, 5000, 64, [5000, 2049], None, dict(alibi=True), id="gqa8-q16-alibi-d64"),
]


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("b, hq, hkv, sq, max_len, d, lens, starts, features", DECODE_VARIANT_CASES)
def test_decode_attention_variants(b, hq, hkv, sq, max_len, d, lens, starts, features, dtype, decode_tma):
    gen = torch.Generator(device=DEVICE).manual_seed(max_len + d + sq)
    q = randn(b, hq, sq, d, dtype=dtype, gen=gen) * (3 if 0 < features.get("softcap", 0) < 10 else 1)
    k = randn(b, hkv, max_len, d, dtype=dtype, gen=gen, layout="bshd")
    v = randn(b, hkv, max_len, d, dtype=dtype, gen=gen, layout="bshd")
    kv_len = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor(starts, device=DEVICE) if starts else None
    kw = dict(window=features.get("window", 0), softcap=features.get("softcap", 0.0),
              alibi_slopes=alibi_slopes(hq) if features.get("alibi") else None)
    out = decode_attention(q, k, v, kv_len, kv_start=kv_start, **kw)
    pos = kv_len.long()[:, None] - sq + torch.arange(sq, device=DEVICE)[None, :]
    cols = torch.arange(max_len, device=DEVICE)[None, :]
    valid = cols < kv_len[:, None]
    if kv_start is not None:
        valid = valid & (cols >= kv_start[:, None])
    check_variant(out, q, k, v, pos=pos, valid=valid, window=kw["window"], softcap=kw["softcap"],
                  slopes=kw["alibi_slopes"], what=f"{dtype} tma={decode_tma}")
    (plan,) = fd._PLANS.values()
    if kw["window"]:  # the chunks split the band only
        assert plan.span == min(max_len, kw["window"] + sq - 1)
        assert plan.ints[-3] * (plan.ints[-2] - 1) < plan.span
    if not decode_tma:
        assert not plan.meta["TMA"]


def test_decode_window_cuda_graph_replay():
    """A windowed decode step captured once; replays with other kv_len (band start read on the device)."""
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    b, hq, hkv, sq, max_len, d, window = 2, 32, 8, 1, 8192, 128, 1024
    q = randn(b, hq, sq, d, dtype=torch.bfloat16, gen=gen)
    k = randn(b, hkv, max_len, d, dtype=torch.bfloat16, gen=gen)
    v = randn(b, hkv, max_len, d, dtype=torch.bfloat16, gen=gen)
    slopes = alibi_slopes(hq)
    kv_len = torch.tensor([100, 200], dtype=torch.int32, device=DEVICE)
    step = lambda: decode_attention(q, k, v, kv_len, window=window, softcap=20.0, alibi_slopes=slopes)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lens in ([100, 200], [1, 8192], [8192, 0], [4097, 1025], [1024, 1023]):
        kv_len.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        pos = kv_len.long()[:, None] - sq + torch.arange(sq, device=DEVICE)[None, :]
        valid = torch.arange(max_len, device=DEVICE)[None, :] < kv_len[:, None]
        check_variant(out, q, k, v, pos=pos, valid=valid, window=window, softcap=20.0, slopes=slopes,
                      what=f"lens {lens}")
