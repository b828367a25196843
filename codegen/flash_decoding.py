"""Flash-Decoding: split-KV attention for a few new tokens (q_len <= 16) over a long static KV cache.

At decode time there are too few query rows to fill a GPU with one program per (batch, head), and the
work is pure streaming of the cache. So the cache's key axis is cut into `num_splits` chunks:

  stage 1  grid (num_splits, b * hkv[, row blocks]): one program reads one chunk of one KV head once and
           serves every query head of its GQA group and every new token, stacked as the M rows of a
           tl.dot. It writes the chunk's partial row max, row sum of exp and unnormalised output (fp32).
  stage 2  grid (b * hq * sq): merges the chunks' partials with a log-sum-exp rescale.

Chunk boundaries come from host-known sizes (the cache capacity), the live length `kv_len` is a device
tensor read inside the kernels: nothing synchronises with the host and every buffer has a host-known
shape, so a decode step can be captured once in a CUDA graph and replayed while `kv_len` grows. A chunk
entirely past kv_len writes max -inf and sum 0 and drops out of the merge.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fxopt.codegen.flash_attention import (
    _INTERPRET,
    LOG2E,
    MAX_GRID_Y,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    _block_d,
    _dot_precision,
    _offsets_tensor,
    _use_kernel,
    attention_flops,
    attention_reference,
)

MAX_DECODE_Q = 16
MIN_CHUNK = 256  # keys per split at least: below that the merge and launch cost more than they save
WAVES = 3  # target stage-1 programs per SM
DEFAULT_SM_COUNT = 132  # H100 SXM, assumed when no GPU is present


# --------------------------------------------------------------------------------------------------
# Reference and cost
# --------------------------------------------------------------------------------------------------


def decode_reference(q, k_cache, v_cache, kv_len, *, scale=None, causal=True, q_offset=None, kv_start=None):
    """attention_reference with decode semantics: key j of batch b is valid when
    kv_start[b] <= j < kv_len[b] (kv_start: left padding, default 0); with causal, query i sits at
    q_offset[b] + i, and q_offset defaults to kv_len - sq (the new tokens are the last sq valid
    positions, so query i sees keys j < kv_len - sq + i + 1)."""
    b, _, sq, _ = q.shape
    max_len = k_cache.shape[2]
    lengths = _offsets_tensor(kv_len, b, q.device)
    keys = torch.arange(max_len, device=q.device)[None, :]
    mask = keys < lengths[:, None]
    if kv_start is not None:
        mask = mask & (keys >= _offsets_tensor(kv_start, b, q.device)[:, None])
    offset = lengths - sq if q_offset is None else q_offset
    return attention_reference(q, k_cache, v_cache, causal=causal, scale=scale, key_padding_mask=mask,
                               q_offset=offset)


def decode_hbm_bytes(b, hq, hkv, sq, kv_len, d, elem_size, num_splits=1):
    """HBM bytes of one decode_attention call reading kv_len keys per sequence.

    K and V are read once per KV head (the GQA group shares the read); q read and o written once; the
    fp32 partials (d + 2 floats per query row and split) are written by stage 1 and read by stage 2.
    """
    k_and_v = 2 * b * hkv * kv_len * d * elem_size
    q_and_o = 2 * b * hq * sq * d * elem_size
    partials = 2 * num_splits * b * hq * sq * (d + 2) * 4
    return k_and_v + q_and_o + partials


def decode_flops(b, hq, sq, kv_len, d, causal=True):
    """Matmul FLOPs of one decode step: the visible (query, key) pairs times 4*d (see attention_flops)."""
    return attention_flops(b, hq, sq, kv_len, d, causal)


# --------------------------------------------------------------------------------------------------
# Split choice
# --------------------------------------------------------------------------------------------------


def choose_num_splits(batch_heads, max_len, sm_count, *, min_chunk=MIN_CHUNK, waves=WAVES):
    """Chunks per sequence for stage 1 (grid = batch_heads * splits programs).

    Aim for `waves` programs per SM (default 3 = about as many stage-1 programs as an H100 SM keeps
    resident at d=128, so all chunks stream at once and no short second round trails behind), rounding
    down so the grid never exceeds that; never cut the key axis into chunks shorter than `min_chunk`."""
    batch_heads = max(int(batch_heads), 1)
    by_fill = (waves * int(sm_count)) // batch_heads
    by_length = int(max_len) // min_chunk
    return max(1, min(by_fill, by_length))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SM_COUNT


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["q_offset"])
def _decode_split_kernel(
    Q, K, V, KV_LEN, KV_START, Q_OFF, MID_O, MID_ML,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HKV, GROUP, SQ, MAX_LEN, CHUNK, NUM_SPLITS, q_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, Q_OFF_MODE: tl.constexpr, DOT_PREC: tl.constexpr, HAS_START: tl.constexpr,
):
    # One program = one chunk of CHUNK keys of one (batch, KV head), for BLOCK_M of the group's
    # GROUP * SQ query rows (row r = query head hk * GROUP + r // SQ, token r % SQ). Per program:
    #   reads   K, V: min(CHUNK, valid keys of the chunk) * HEAD_DIM elements each (the bulk)
    #           Q: BLOCK_M * HEAD_DIM elements; kv_len[b] (and q_offset[b], kv_start[b]): one scalar each
    #   writes  partial output BLOCK_M * BLOCK_D fp32 and (max, sum) 2 * BLOCK_M fp32.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_r = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b64 = b.to(tl.int64)

    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * SQ
    tok = rows % SQ
    hq = hk * GROUP + rows // SQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + b64 * stride_qb + hq.to(tl.int64)[:, None] * stride_qh + tok[:, None] * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    n_valid = tl.load(KV_LEN + b).to(tl.int32)
    if Q_OFF_MODE == 0:  # new tokens are the last SQ valid positions
        q_off = n_valid - SQ
    elif Q_OFF_MODE == 1:
        q_off = q_offset
    else:
        q_off = tl.load(Q_OFF + b).to(tl.int32)
    kv_end = tl.minimum(n_valid, MAX_LEN)
    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, kv_end)
    if HAS_START:  # keys below kv_start[b] (left padding) are never read
        lo = tl.maximum(lo, tl.load(KV_START + b).to(tl.int32))
    if CAUSAL:
        hi = tl.minimum(hi, q_off + SQ)  # no row of this program sees a key at or past q_off + SQ
        q_pos = q_off + tok

    k_ptrs = (K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + lo.to(tl.int64) * stride_kn
              + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + lo.to(tl.int64) * stride_vn
              + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        if BLOCK_D != HEAD_DIM:
            kv_mask = col_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = col_ok[:, None]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    # Partials laid out (row, split, ...) with row = (b * HQ + hq) * SQ + tok.
    out_row = ((b64 * HKV * GROUP + hq.to(tl.int64)) * SQ + tok) * NUM_SPLITS + pid_s
    tl.store(MID_O + out_row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(MID_ML + out_row * 2, m_i, mask=row_ok)
    tl.store(MID_ML + out_row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    MID_O, MID_ML, O,
    stride_ob, stride_oh, stride_om, stride_od,
    HQ, SQ, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program = one output row (b, hq, token). Reads NUM_SPLITS * (BLOCK_D + 2) fp32 partials,
    # writes HEAD_DIM elements of O.
    row = tl.program_id(0).to(tl.int64)
    tok = row % SQ
    h = (row // SQ) % HQ
    b = row // (SQ * HQ)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = row * NUM_SPLITS

    m_run = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s_ok = (s0 + offs_s) < NUM_SPLITS
        m = tl.load(MID_ML + (base + s0 + offs_s) * 2, mask=s_ok, other=float("-inf"))
        m_run = tl.maximum(m_run, m)
    m_all = tl.max(m_run, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)

    l_run = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s_idx = base + s0 + offs_s
        s_ok = (s0 + offs_s) < NUM_SPLITS
        m = tl.load(MID_ML + s_idx * 2, mask=s_ok, other=float("-inf"))
        l_s = tl.load(MID_ML + s_idx * 2 + 1, mask=s_ok, other=0.0)
        o_s = tl.load(MID_O + s_idx[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        w = tl.exp2(m - m_all)  # empty chunk: exp2(-inf) = 0
        l_run += w * l_s
        acc += w[:, None] * o_s
    l_all = tl.sum(l_run, 0)
    out = tl.sum(acc, 0) / tl.where(l_all == 0.0, 1.0, l_all)  # no visible key: 0
    o_ptrs = O + b * stride_ob + h * stride_oh + tok * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _decode_tiles(block_d: int, rows: int, elem: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for stage 1: a streaming loop, so fixed heuristics
    (no autotuning: the first call may be inside a CUDA-graph capture). 64-key tiles of 16-bit K/V are
    8 KiB-16 KiB per load, three stages deep, so several programs per SM keep enough bytes in flight."""
    if _INTERPRET:
        return max(16, min(triton.next_power_of_2(rows), 32)), 16, 4, 1
    if elem == 4:  # fp32: 3xTF32 dots need registers and twice the shared memory per key
        block_m = max(16, min(triton.next_power_of_2(rows), 32))
        return block_m, 32, 4, 2 if block_d <= 128 else 1
    block_m = max(16, min(triton.next_power_of_2(rows), 64))
    block_n = 64 if block_d <= 128 else 32
    num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    num_stages = 3 if block_d <= 128 else 2
    return block_m, block_n, num_warps, num_stages


def _check_decode(q, k_cache, v_cache, kv_len, scale, kv_start=None):
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("decode_attention: q, k_cache, v_cache must be 4-d (b, h, s, d)")
    b, hq, sq, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"decode_attention: cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} "
                         f"do not match q {tuple(q.shape)}")
    if hq % k_cache.shape[1]:
        raise ValueError(f"decode_attention: {hq} query heads not a multiple of {k_cache.shape[1]} KV heads")
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_attention: dtypes q {q.dtype}, cache {k_cache.dtype}/{v_cache.dtype}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head dim {d} > {MAX_HEAD_DIM}")
    if sq > MAX_DECODE_Q:
        raise ValueError(f"decode_attention: q_len {sq} > {MAX_DECODE_Q}; use flash_attention")
    if isinstance(kv_len, torch.Tensor) and kv_len.device != q.device:
        raise ValueError(f"decode_attention: kv_len on {kv_len.device}, q on {q.device}")
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor) or kv_start.dtype not in (torch.int32, torch.int64) or (
            kv_start.numel() not in (1, b)
        ):
            raise ValueError("decode_attention: kv_start must be a (b,) int32/int64 tensor")
        if kv_start.device != q.device:
            raise ValueError(f"decode_attention: kv_start on {kv_start.device}, q on {q.device}")
    if b * k_cache.shape[1] > MAX_GRID_Y:
        raise ValueError(f"decode_attention: batch*kv heads {b * k_cache.shape[1]} > {MAX_GRID_Y} (grid limit)")
    if scale is not None and not scale > 0:
        raise ValueError(f"decode_attention: non-positive scale {scale}")


def decode_attention(q, k_cache, v_cache, kv_len, *, scale=None, causal=True, q_offset=None, num_splits=None,
                     kv_start=None):
    """Attention of q (b, hq, sq <= 16, d) over keys [kv_start[b], kv_len[b]) of static caches
    (b, hkv, max_len, d); returns (b, hq, sq, d) contiguous. Semantics of decode_reference.

    kv_len is a (b,) int32/int64 device tensor, read only by the kernels (CUDA-graph safe); so is the
    optional kv_start (left padding: keys below it are masked, and never read). q_offset (int or (b,)
    tensor) overrides the default causal offset kv_len - sq. num_splits overrides choose_num_splits.
    On CPU without TRITON_INTERPRET=1 it computes the reference.
    """
    _check_decode(q, k_cache, v_cache, kv_len, scale, kv_start)
    if not _use_kernel(q):
        return decode_reference(q, k_cache, v_cache, kv_len, scale=scale, causal=causal, q_offset=q_offset,
                                kv_start=kv_start)
    b, hq, sq, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = torch.empty((b, hq, sq, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not isinstance(kv_len, torch.Tensor):
        kv_len = torch.full((b,), int(kv_len), dtype=torch.int32, device=q.device)
    kv_len = kv_len.reshape(-1).expand(b)
    if kv_len.stride(0) != 1:
        kv_len = kv_len.contiguous()
    if q_offset is None:
        q_off_mode, q_off_t, q_off_int = 0, kv_len, 0
    elif isinstance(q_offset, torch.Tensor):
        q_off_t = q_offset.reshape(-1).expand(b)
        q_off_t = q_off_t if q_off_t.stride(0) == 1 else q_off_t.contiguous()
        q_off_mode, q_off_int = 2, 0
    else:
        q_off_mode, q_off_t, q_off_int = 1, kv_len, int(q_offset)
    if kv_start is not None:
        kv_start = kv_start.reshape(-1).expand(b)
        kv_start = kv_start if kv_start.stride(0) == 1 else kv_start.contiguous()

    block_d = _block_d(d)
    rows = group * sq
    block_m, block_n, num_warps, num_stages = _decode_tiles(block_d, rows, q.element_size())
    row_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = choose_num_splits(b * hkv * row_blocks, max_len, _device_sm_count(q.device))
    num_splits = max(1, min(int(num_splits), triton.cdiv(max(max_len, 1), block_n)))
    chunk = triton.cdiv(triton.cdiv(max(max_len, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(max_len, 1), chunk)

    mid_o = torch.empty((b * hq * sq, num_splits, block_d), dtype=torch.float32, device=q.device)
    mid_ml = torch.empty((b * hq * sq, num_splits, 2), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_splits, b * hkv, row_blocks)](
        q, k_cache, v_cache, kv_len, kv_start if kv_start is not None else kv_len, q_off_t, mid_o, mid_ml,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        hkv, group, sq, max_len, chunk, num_splits, q_off_int, scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=bool(causal), Q_OFF_MODE=q_off_mode, DOT_PREC=_dot_precision(q.dtype),
        HAS_START=kv_start is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    block_s = min(triton.next_power_of_2(num_splits), max(1, 4096 // block_d))
    _decode_merge_kernel[(b * hq * sq,)](
        mid_o, mid_ml, out, *out.stride(), hq, sq, num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4 if block_d <= 128 else 8,
    )
    return out
