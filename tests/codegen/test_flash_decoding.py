"""Flash-Decoding (split-KV) kernel vs the float64 reference, on small random inputs.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set
before triton is imported); with a GPU the same tests run compiled on CUDA. bf16 is left to tests/gpu.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import sympy  # noqa: E402
from attention_checks import assert_close_to_reference  # noqa: E402

from fxopt.codegen import flash_decoding as fd  # noqa: E402
from fxopt.codegen.flash_attention import attention_reference  # noqa: E402
from fxopt.codegen.flash_decoding import (  # noqa: E402
    choose_num_splits,
    decode_attention,
    decode_flops,
    decode_hbm_bytes,
    decode_reference,
)

INTERPRET = fd._INTERPRET  # the mode the kernels were built in (TRITON_INTERPRET at import)
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")


def eager_decode(q, k, v, kv_len, *, causal, q_offset=None, scale=None):
    """Unfused decode attention in the input dtype (the error yardstick), masks built independently."""
    b, hq, sq, d = q.shape
    max_len = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    lengths = kv_len.to(q.device).long().reshape(-1, 1)
    cols = torch.arange(max_len, device=q.device)
    allowed = (cols[None, None, :] < lengths[:, :, None]).expand(b, sq, max_len)
    if causal:
        offs = lengths - sq if q_offset is None else torch.as_tensor(q_offset, device=q.device).reshape(-1, 1)
        pos = offs + torch.arange(sq, device=q.device)[None, :]
        allowed = allowed & (cols[None, None, :] <= pos[:, :, None])
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v




def make_inputs(b, hq, hkv, sq, max_len, d, dtype, *, layout="bhsd", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(h, s):
        if layout == "bshd":  # cache stored (b, s, h, d), viewed as (b, h, s, d)
            return torch.randn(b, s, h, d, generator=gen).to(device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, s, d, generator=gen).to(device=DEVICE, dtype=dtype)

    return make(hq, sq), make(hkv, max_len), make(hkv, max_len)


def check(q, k, v, kv_len, *, causal, q_offset=None, num_splits=None, what=""):
    out = decode_attention(q, k, v, kv_len, causal=causal, q_offset=q_offset, num_splits=num_splits)
    ref64 = decode_reference(q.double(), k.double(), v.double(), kv_len, causal=causal, q_offset=q_offset)
    eager = eager_decode(q, k, v, kv_len, causal=causal, q_offset=q_offset)
    assert out.is_contiguous()
    assert_close_to_reference(out, ref64, eager, q.dtype, what)
    return out


# (b, hq, hkv, sq, max_len, d, layout, kv_len per batch, num_splits)
CASES = [
    pytest.param(2, 4, 4, 1, 300, 64, "bhsd", [300, 77], None, id="mha-q1-d64"),
    pytest.param(2, 8, 2, 1, 257, 32, "bshd", [1, 200], 3, id="gqa4-q1-bshd-d32"),
    pytest.param(1, 8, 1, 7, 200, 80, "bhsd", [150], 5, id="gqa8-q7-d80"),
    pytest.param(3, 4, 1, 16, 130, 64, "bshd", [130, 16, 41], 2, id="gqa4-q16"),
    pytest.param(2, 8, 8, 3, 100, 32, "bhsd", [9, 100], 7, id="mha-q3-many-splits"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("b, hq, hkv, sq, max_len, d, layout, lens, num_splits", CASES)
def test_matches_reference(b, hq, hkv, sq, max_len, d, layout, lens, num_splits, dtype, causal):
    q, k, v = make_inputs(b, hq, hkv, sq, max_len, d, dtype, layout=layout, seed=sq * 100 + max_len)
    kv_len = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    check(q, k, v, kv_len, causal=causal, num_splits=num_splits, what=f"{dtype} causal={causal}")


def test_split_count_does_not_change_result():
    q, k, v = make_inputs(2, 4, 2, 2, 240, 64, torch.float32, seed=3)
    kv_len = torch.tensor([240, 131], dtype=torch.int64, device=DEVICE)  # int64 lengths work too
    outs = [decode_attention(q, k, v, kv_len, num_splits=s) for s in (1, 4, 15)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


def test_empty_sequences_and_chunks_are_zero():
    """kv_len 0 (every chunk empty) gives 0; chunks wholly past kv_len drop out of the merge."""
    q, k, v = make_inputs(3, 4, 2, 1, 200, 32, torch.float16, seed=4)
    kv_len = torch.tensor([0, 5, 200], dtype=torch.int32, device=DEVICE)
    out = check(q, k, v, kv_len, causal=True, num_splits=6)
    assert (out[0] == 0).all()
    # more new tokens than valid keys: the first rows see nothing
    q, k, v = make_inputs(2, 2, 2, 4, 64, 32, torch.float32, seed=5)
    kv_len = torch.tensor([2, 64], dtype=torch.int32, device=DEVICE)
    out = check(q, k, v, kv_len, causal=True, num_splits=2)
    assert (out[0, :, :2] == 0).all()


def test_explicit_query_offset():
    """The KV-cache pass attends with length pos + n and offset pos (int or per-batch tensor)."""
    q, k, v = make_inputs(2, 8, 2, 3, 96, 64, torch.float16, layout="bshd", seed=6)
    pos = torch.tensor([40, 7], device=DEVICE)
    kv_len = (pos + 3).to(torch.int32)
    by_tensor = check(q, k, v, kv_len, causal=True, q_offset=pos, num_splits=3)
    by_default = decode_attention(q, k, v, kv_len, causal=True, num_splits=3)
    torch.testing.assert_close(by_tensor, by_default, rtol=0, atol=0)
    check(q, k, v, kv_len, causal=True, q_offset=10, num_splits=2)


def test_broadcast_query():
    """A stride-0 query (one token's q shared by the batch) and caches read through their strides."""
    q, k, v = make_inputs(3, 4, 2, 1, 90, 32, torch.float16, seed=8)
    q = q[:1].expand(3, -1, -1, -1)
    kv_len = torch.tensor([90, 33, 64], dtype=torch.int32, device=DEVICE)
    check(q, k, v, kv_len, causal=True, num_splits=3)


def test_kv_start_masks_left_padding():
    """kv_start[b] (left padding): keys below it are masked -- the same as attending over the slice
    [kv_start, kv_len) alone. A query whose visible keys all lie below kv_start gives 0."""
    q, k, v = make_inputs(3, 8, 2, 2, 200, 32, torch.float32, seed=8)
    kv_len = torch.tensor([200, 90, 12], dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor([0, 70, 11], dtype=torch.int64, device=DEVICE)
    out = decode_attention(q, k, v, kv_len, causal=True, num_splits=4, kv_start=kv_start)
    ref64 = decode_reference(q.double(), k.double(), v.double(), kv_len, causal=True, kv_start=kv_start)
    eager = []
    for i in range(3):
        s0, n = int(kv_start[i]), int(kv_len[i])
        rows = slice(i, i + 1)
        alone = decode_reference(q[rows].double(), k[rows, :, s0:n].double(), v[rows, :, s0:n].double(),
                                 torch.tensor([n - s0]), causal=True)
        torch.testing.assert_close(ref64[rows], alone)
        eager.append(eager_decode(q[rows], k[rows, :, s0:n], v[rows, :, s0:n], torch.tensor([n - s0]), causal=True))
    assert_close_to_reference(out, ref64, torch.cat(eager), torch.float32, "kv_start")
    assert (out[2, :, 0] == 0).all()  # query at position 10 sees keys <= 10, all below kv_start 11
    with pytest.raises(ValueError, match="kv_start"):
        decode_attention(q, k, v, kv_len, kv_start=kv_start.float())


def test_reference_semantics():
    """decode_reference: query i sees keys j < kv_len - sq + i + 1, and nothing past kv_len."""
    q, k, v = (t.double().cpu() for t in make_inputs(1, 2, 1, 3, 20, 16, torch.float32, seed=7))
    ref = decode_reference(q, k, v, torch.tensor([12]), causal=True)
    for i in range(3):
        visible = 12 - 3 + i + 1
        row = attention_reference(q[:, :, i : i + 1], k[:, :, :visible], v[:, :, :visible])
        torch.testing.assert_close(ref[:, :, i : i + 1], row)


def test_kernel_path_is_active():
    assert fd._use_kernel(torch.empty(1, device=DEVICE))


def test_rejects_bad_inputs():
    q, k, v = make_inputs(1, 4, 2, 17, 64, 32, torch.float32)
    kv_len = torch.tensor([64], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="q_len 17"):
        decode_attention(q, k, v, kv_len)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :3, :1], k, v, kv_len)


def test_choose_num_splits():
    # batch 1, 8 KV heads: about 2 programs per SM of 132, never more
    assert fd.WAVES == 2
    assert choose_num_splits(8, 16384, 132) == 33
    assert choose_num_splits(8, 1 << 20, 132) == 33
    assert choose_num_splits(32, 131072, 132) == 8
    assert choose_num_splits(1024, 4096, 132) == 1  # the batch alone fills the GPU
    assert choose_num_splits(8, 100, 132) == 1  # too short to split
    assert fd.MIN_CHUNK == 64
    assert choose_num_splits(8, 1024, 132) == 16  # capped by the 64-key minimum chunk
    assert choose_num_splits(8, 768, 132) == 12  # a short decode cache: many short chunks
    assert choose_num_splits(8, 16384, 132, waves=3) == 49
    for bh, n in [(1, 1), (3, 1000), (64, 70000), (5, 10**6)]:
        s = choose_num_splits(bh, n, 108)
        assert s >= 1 and (s == 1 or (n // s >= fd.MIN_CHUNK and bh * s <= 2 * 108))


def test_plan_is_cached_and_reused():
    """The second call with the same signature skips the checks and reuses the launch parameters; a
    different kv_len value (a device tensor) or q values reuse it too, and give the right result."""
    q, k, v = make_inputs(1, 4, 2, 1, 120, 32, torch.float32, seed=11)
    kv_len = torch.tensor([120], dtype=torch.int32, device=DEVICE)
    fd._PLANS.clear()
    check(q, k, v, kv_len, causal=True, num_splits=3)
    assert len(fd._PLANS) == 1
    kv_len.fill_(57)
    check(q, k, v, kv_len, causal=True, num_splits=3)
    assert len(fd._PLANS) == 1
    check(q, k, v, kv_len, causal=False, num_splits=3)
    assert len(fd._PLANS) == 2


def test_merge_block_loop():
    """More splits than one merge block holds (BLOCK_S caps at 4096 / SLICE): the two-pass merge."""
    q, k, v = make_inputs(1, 2, 2, 1, 130 * 128, 32, torch.float32, seed=12)
    kv_len = torch.tensor([130 * 128 - 50], dtype=torch.int32, device=DEVICE)
    fd._PLANS.clear()
    check(q, k, v, kv_len, causal=True, num_splits=130)  # 128-key chunks: whole tiles for every tile size
    (plan,) = fd._PLANS.values()
    assert plan.ints[-2] > plan.merge_meta["BLOCK_S"]  # splits > one merge block


@pytest.fixture
def tma_forced(monkeypatch):
    """Plans made while it is active stream whole tiles through TMA descriptors wherever the caches allow."""
    from fxopt.codegen import flash_attention as fa

    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or later")
    monkeypatch.setattr(fd, "use_tma", lambda *tensors: fa.tma_compatible(*tensors))
    fd._PLANS.clear()
    yield
    fd._PLANS.clear()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b, hq, hkv, sq, max_len, d, layout, lens, num_splits", CASES)
def test_tma_loads_match_reference(b, hq, hkv, sq, max_len, d, layout, lens, num_splits, causal, tma_forced):
    """Whole key tiles through TMA descriptors (GQA heads by coordinate, d80 zero-filled to 128), the ragged
    last tile of each chunk by masked pointer loads: same results as the reference."""
    q, k, v = make_inputs(b, hq, hkv, sq, max_len, d, torch.float16, layout=layout, seed=sq * 100 + max_len)
    kv_len = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    check(q, k, v, kv_len, causal=causal, num_splits=num_splits, what=f"tma causal={causal}")
    for plan in fd._PLANS.values():  # interpreter: always; compiled: whole 128-key tiles only (_decode_tiles)
        assert plan.meta["TMA"] == (INTERPRET or plan.meta["BLOCK_N"] == 128)


def test_several_row_blocks_and_splits_past_kv_len():
    """Several row blocks per KV head (8 query heads x 16 tokens) and splits entirely past kv_len, with kv_len
    changed in place between calls (as a CUDA-graph replay sees it): each call matches the reference."""
    q, k, v = make_inputs(2, 8, 1, 16, 300, 64, torch.float32, seed=13)
    kv_len = torch.tensor([300, 40], dtype=torch.int32, device=DEVICE)
    for lens in ([300, 40], [123, 299]):
        kv_len.copy_(torch.tensor(lens))
        check(q, k, v, kv_len, causal=True, num_splits=6, what=f"lens={lens}")


def test_cost_formulas():
    assert decode_flops(1, 32, 1, 16384, 128, causal=False) == 4 * 32 * 16384 * 128
    kv_bytes = 2 * 8 * 16384 * 128 * 2
    assert decode_hbm_bytes(1, 32, 8, 1, 16384, 128, 2) == kv_bytes + 2 * 32 * 128 * 2 + 2 * 32 * 130 * 4
    b, n = sympy.symbols("b n", positive=True, integer=True)
    expr = decode_hbm_bytes(b, 32, 8, 1, n, 128, 2, num_splits=4)
    assert sympy.Poly(sympy.expand(expr), n).coeff_monomial(n) == 2 * b * 8 * 128 * 2


def test_window_plan_splits_only_the_band():
    """With a sliding window the chunks split min(max_len, window + sq - 1) keys (host-known), not the cache:
    at a 16k cache and a 4k window the default plan's programs cover a quarter of the keys."""
    assert fd.decode_span(16384, 1, 4096) == 4096
    assert fd.decode_span(16384, 16, 4096) == 4096 + 15
    assert fd.decode_span(1000, 1, 4096) == 1000
    assert fd.decode_span(1000, 1, 0) == 1000
    assert fd.decode_span(1000, 1, 1 << 40) == 1000
    q, k, v = make_inputs(1, 4, 2, 1, 1024, 32, torch.float16, seed=22)
    kv_len = torch.tensor([1000], dtype=torch.int32, device=DEVICE)
    fd._PLANS.clear()
    decode_attention(q, k, v, kv_len)
    decode_attention(q, k, v, kv_len, window=256)
    full, windowed = fd._PLANS.values()
    for plan in (full, windowed):
        assert plan.ints[-3] * plan.ints[-2] >= plan.span  # chunk * splits covers the span
    assert full.span == 1024 and windowed.span == 256
    assert windowed.ints[-3] * (windowed.ints[-2] - 1) < 256  # no chunk wholly past the band
    assert fd.decode_flops(1, 32, 1, 16384, 128, window=4096) == 4 * 32 * 4096 * 128


def test_misaligned_cache_gets_its_own_pointer_load_plan(tma_forced):
    """Same shapes and strides, but a cache whose base is not 16-byte aligned cannot back a TMA descriptor: it
    gets its own plan (pointer loads) instead of reusing the TMA one, and both calls are right."""
    b, hq, hkv, sq, max_len, d = 1, 4, 2, 1, 512, 32  # 2 splits of 256 keys: TMA tiles compiled or interpreted
    q, k, v = make_inputs(b, hq, hkv, sq, max_len, d, torch.float16, seed=21)
    kv_len = torch.tensor([500], dtype=torch.int32, device=DEVICE)
    check(q, k, v, kv_len, causal=True, num_splits=2, what="aligned")
    shifted = [torch.empty(t.numel() + 4, dtype=t.dtype, device=DEVICE)[4:].view(t.shape) for t in (k, v)]
    for dst, src in zip(shifted, (k, v)):
        dst.copy_(src)
    assert shifted[0].stride() == k.stride() and shifted[0].data_ptr() % 16 == 8
    check(q, *shifted, kv_len, causal=True, num_splits=2, what="8-byte aligned base")
    assert sorted(plan.meta["TMA"] for plan in fd._PLANS.values()) == [False, True]


# ----------------------------------------------------------------------------- where the splits are merged


@pytest.mark.parametrize("in_split", [True, False], ids=["last-program-merges", "merge-kernel"])
@pytest.mark.parametrize("b, hq, hkv, sq, max_len, d, kv_len, splits, layout", [
    (2, 4, 4, 1, 300, 64, [300, 77], 5, "bhsd"),  # MHA decode: one row per program
    (1, 8, 2, 3, 200, 32, [150], 4, "bshd"),  # GQA 4 x 3 tokens: 12 rows in one block; (b, s, h, d) caches
    (2, 8, 1, 16, 130, 32, [130, 16], 3, "bhsd"),  # 128 rows: several row blocks, each merged by its last program
    (1, 2, 2, 1, 64, 32, [64], 1, "bshd"),  # one split: the only program merges
])
def test_merge_in_the_split_kernel_or_the_merge_kernel(monkeypatch, in_split, b, hq, hkv, sq, max_len, d, kv_len,
                                                       splits, layout):
    """Both ways of merging give the reference's rows, on a second call too (the counts are reset)."""
    monkeypatch.setattr(fd, "MERGE_IN_SPLIT_MAX_ROWS", 1 << 10 if in_split else 0)
    monkeypatch.setattr(fd, "_PLANS", {})
    q, k, v = make_inputs(b, hq, hkv, sq, max_len, d, torch.float32, layout=layout, seed=3)
    lengths = torch.tensor(kv_len, dtype=torch.int32, device=DEVICE)
    check(q, k, v, lengths, causal=True, num_splits=splits, what="first call")
    plan = next(iter(fd._PLANS.values()))
    assert (plan.counts is not None) == in_split
    if in_split:
        assert int(plan.counts.abs().sum()) == 0  # every count back at zero for the next launch
    q2, _, _ = make_inputs(b, hq, hkv, sq, max_len, d, torch.float32, layout=layout, seed=4)
    check(q2, k, v, lengths - 1, causal=True, num_splits=splits, what="second call, same plan")


def test_merge_counts_outlive_the_plan_cache(monkeypatch):
    """A CUDA graph keeps the counts buffer it captured: clearing the plans must not free it, and a new plan of
    the same size reuses it (each launch leaves it at zero)."""
    monkeypatch.setattr(fd, "_PLANS", {})
    q, k, v = make_inputs(1, 4, 4, 1, 64, 32, torch.float32)
    lengths = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    decode_attention(q, k, v, lengths, causal=True)
    counts = next(iter(fd._PLANS.values())).counts
    fd._PLANS.clear()
    check(q, k, v, lengths, causal=True, what="after the plans were dropped")
    assert next(iter(fd._PLANS.values())).counts is counts
    assert any(c is counts for c in fd._COUNTS.values())


def test_merge_in_split_is_chosen_for_few_rows_per_program(monkeypatch):
    """A decode step's few rows (MHA, GQA x 1 token) merge in the split kernel; 16 tokens of an 8-group do not."""
    monkeypatch.setattr(fd, "_PLANS", {})
    lengths = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    for hq, hkv, sq, in_split in ((4, 4, 1, True), (8, 2, 1, True), (8, 1, 16, False)):
        fd._PLANS.clear()
        q, k, v = make_inputs(1, hq, hkv, sq, 64, 32, torch.float32)
        decode_attention(q, k, v, lengths, causal=True)
        assert (next(iter(fd._PLANS.values())).counts is not None) == in_split, (hq, hkv, sq)
