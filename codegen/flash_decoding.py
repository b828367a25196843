"""Flash-Decoding: split-KV attention for a few new tokens (q_len <= 16) over a long static KV cache.

At decode time there are too few query rows to fill a GPU with one program per (batch, head), and the
work is pure streaming of the cache. So the cache's key axis is cut into `num_splits` chunks:

  stage 1  grid (num_splits, b * hkv[, row blocks]): one program reads one chunk of one KV head once and
           serves every query head of its GQA group and every new token, stacked as the M rows of a
           tl.dot. It writes the chunk's partial row max, row sum of exp and unnormalised output (fp32).
  stage 2  merges the chunks' partials with a log-sum-exp rescale. For a decode step's few query rows per
           program (MERGE_IN_SPLIT_MAX_ROWS) inside stage 1: the last program of a (batch, KV head, row block)
           to finish, found by an atomic count, merges its rows, so a call is one kernel. For more rows (many
           new tokens of a wide GQA group) a second kernel, grid (b * hq * sq, head dim / 32): 32 head dims of
           one row per program.

On Hopper (fp16/bf16) stage 1 streams a chunk's whole 128-key tiles through TMA descriptors and loads only
the ragged last tile by masked pointer loads (see _decode_tiles for when).

Launch order (sm_90+, programmatic dependent launch, codegen/pdl.py): stage 1 may start while the kernel before it
ends; each program lets stage 2 launch (and, with FXOPT_DECODE_PREFETCH, asks L2 for the first keys of its chunk: a
hint, safe before the wait), then waits for the previous kernel. Stage 2 launches at once and waits for stage 1;
only after that wait does it let the next kernel launch. Letting it launch earlier (stage 2 used to) starts a
cascade: the next kernel's programs, and theirs, are placed on the SMs while stage 1 still streams and hold the
shared memory its second program per SM needs. Back to back from a CUDA graph on an H200 that cost 26.6 against
20.1 us at 16k keys (B1 32/8 heads) and 656 against 468 us at 128k (32/32 heads), 2026-11-21 (README).

Chunk boundaries come from host-known sizes (the cache capacity), the live length `kv_len` is a device
tensor read inside the kernels: nothing synchronises with the host and every buffer has a host-known
shape, so a decode step can be captured once in a CUDA graph and replayed while `kv_len` grows. A chunk
entirely past kv_len writes max -inf and sum 0 and drops out of the merge.

With a sliding window (causal: query p sees keys p - window < j <= p) only the band
[max(kv_start, q_off - window + 1), q_off + sq) can be visible: the chunks split a span of
min(max_len, window + sq - 1) keys (host-known) starting at the band's first key (read on the device), so the
work is proportional to the window, not to the cache length, and the launch stays graph-safe. Soft-cap and
ALiBi (see flash_attention) transform the scores in stage 1; stage 2 is unchanged.

Non-graph callers pay the host side: decode_attention checks its inputs and derives the launch
parameters once per signature (_Plan, cached), so a repeated call costs a lookup, two allocations and
one or two launches.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fxopt import config
from fxopt.codegen.attention_common import (
    _INTERPRET,
    _LOG2E_C,
    LOG2E,
    MAX_GRID_Y,
    MAX_HEAD_DIM,
    MAX_WINDOW,
    SUPPORTED_DTYPES,
    _block_d,
    _dot_precision,
    _offsets_tensor,
    _use_kernel,
    attention_flops,
    attention_reference,
    feature_args,
    feature_reason,
    kv_descriptors,
    online_softmax_step,
    score_logits,
    use_tma,
)
from fxopt.codegen.pdl import launch_options, use_pdl
from fxopt.hardware import sm_count

MAX_DECODE_Q = 16
# Keys per split at least. Short caches want many short chunks: H200, CUDA graph, B1 32/8 heads d64, 768-key cache
# (513 valid): 3 splits 5.7 us, 6 splits 4.4 us, 12 splits 3.8 us (2026-11-21, merge kernel launched early).
MIN_CHUNK = 64
# Keys of K and V each split program asks L2 for before it waits for the previous kernel (FXOPT_DECODE_PREFETCH; off
# by default). H200, 2026-11-21: standalone (benchmarks/decode_variants.py) 64 keys moved a 16k-key call by -0.2 to
# +0.2 us, within run-to-run noise, and 128 or 256 keys were slower; in the llama-1b-like 1 x 512 decode step 64
# keys gave 1647 tok/s against 1747 and 1738 without.
PREFETCH_KEYS = config.get("decode_prefetch")
WAVES = 2  # target stage-1 programs per SM (H200 sweep, B1 32/8 heads 16k bf16, CUDA graph: 1-2 long programs
# per SM beat 3 and more shorter ones by 5-20%; 2 keeps 8 warps per SM streaming)
MERGE_SLICE = 32  # head dims per stage-2 program
# Query rows (GQA group x new tokens) per stage-1 program up to which the last program of a row block merges
# the splits itself (one kernel per call instead of two); more rows merge in the separate stage-2 kernel,
# whose programs take a row each (the last program would merge them one after another).
MERGE_IN_SPLIT_MAX_ROWS = 16


# --------------------------------------------------------------------------------------------------
# Reference and cost
# --------------------------------------------------------------------------------------------------


def decode_reference(q, k_cache, v_cache, kv_len, *, scale=None, causal=True, q_offset=None, kv_start=None,
                     window=0, softcap=0.0, alibi_slopes=None):
    """attention_reference with decode semantics: key j of batch b is valid when
    kv_start[b] <= j < kv_len[b] (kv_start: left padding, default 0); query i sits at
    q_offset[b] + i, and q_offset defaults to kv_len - sq (the new tokens are the last sq valid
    positions, so with causal query i sees keys j < kv_len - sq + i + 1). window, softcap and
    alibi_slopes as in attention_reference (positions absolute: padding included)."""
    b, _, sq, _ = q.shape
    max_len = k_cache.shape[2]
    lengths = _offsets_tensor(kv_len, b, q.device)
    keys = torch.arange(max_len, device=q.device)[None, :]
    mask = keys < lengths[:, None]
    if kv_start is not None:
        mask = mask & (keys >= _offsets_tensor(kv_start, b, q.device)[:, None])
    offset = lengths - sq if q_offset is None else q_offset
    return attention_reference(q, k_cache, v_cache, causal=causal, scale=scale, key_padding_mask=mask,
                               q_offset=offset, window=window, softcap=softcap, alibi_slopes=alibi_slopes)


def decode_hbm_bytes(b, hq, hkv, sq, kv_len, d, elem_size, num_splits=1):
    """HBM bytes of one decode_attention call reading kv_len keys per sequence.

    K and V are read once per KV head (the GQA group shares the read); q read and o written once; the
    fp32 partials (d + 2 floats per query row and split) are written by stage 1 and read by stage 2.
    """
    k_and_v = 2 * b * hkv * kv_len * d * elem_size
    q_and_o = 2 * b * hq * sq * d * elem_size
    partials = 2 * num_splits * b * hq * sq * (d + 2) * 4
    return k_and_v + q_and_o + partials


def decode_flops(b, hq, sq, kv_len, d, causal=True, window=0):
    """Matmul FLOPs of one decode step: the visible (query, key) pairs times 4*d (see attention_flops)."""
    return attention_flops(b, hq, sq, kv_len, d, causal, window)


# --------------------------------------------------------------------------------------------------
# Split choice
# --------------------------------------------------------------------------------------------------


def choose_num_splits(batch_heads, max_len, sm_count, *, min_chunk=MIN_CHUNK, waves=WAVES):
    """Chunks per sequence for stage 1 (grid = batch_heads * splits programs).

    Aim for `waves` programs per SM (default 2: every chunk streams at once, each program long enough
    that its pipeline start and the merge of its partials are small next to its stream; more, shorter
    chunks measured slower), rounding down so the grid never exceeds that; never cut the key axis into
    chunks shorter than `min_chunk`."""
    batch_heads = max(int(batch_heads), 1)
    by_fill = (waves * int(sm_count)) // batch_heads
    by_length = int(max_len) // min_chunk
    return max(1, min(by_fill, by_length))


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _merge_row(MID, ML, base, offs_d, NUM_SPLITS, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
               SLICE: tl.constexpr, CACHE: tl.constexpr):
    # Head dims offs_d (SLICE of them) of one output row from its NUM_SPLITS partials (unnormalised outputs at
    # MID, rows of BLOCK_D; (max, sum) pairs at ML), log-sum-exp rescaled. One round of loads when BLOCK_S
    # covers every split (the default split counts); otherwise a max pass, then a rescaled-sum pass, over
    # blocks of BLOCK_S splits. CACHE ".cg" reads the partials from L2 (written by other programs of the same
    # launch, so never from this SM's L1).
    offs_s = tl.arange(0, BLOCK_S)
    if NUM_SPLITS <= BLOCK_S:
        s_ok = offs_s < NUM_SPLITS
        m = tl.load(ML + (base + offs_s) * 2, mask=s_ok, other=float("-inf"), cache_modifier=CACHE)
        l_s = tl.load(ML + (base + offs_s) * 2 + 1, mask=s_ok, other=0.0, cache_modifier=CACHE)
        o_s = tl.load(MID + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0,
                      cache_modifier=CACHE)
        m_all = tl.max(m, 0)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        w = tl.exp2(m - m_all)  # empty chunk: exp2(-inf) = 0
        l_all = tl.sum(w * l_s, 0)
        acc = tl.sum(w[:, None] * o_s, 0)
    else:
        m_run = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            s_ok = (s0 + offs_s) < NUM_SPLITS
            m = tl.load(ML + (base + s0 + offs_s) * 2, mask=s_ok, other=float("-inf"), cache_modifier=CACHE)
            m_run = tl.maximum(m_run, m)
        m_all = tl.max(m_run, 0)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        l_run = tl.zeros([BLOCK_S], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_S, SLICE], dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            s_idx = base + s0 + offs_s
            s_ok = (s0 + offs_s) < NUM_SPLITS
            m = tl.load(ML + s_idx * 2, mask=s_ok, other=float("-inf"), cache_modifier=CACHE)
            l_s = tl.load(ML + s_idx * 2 + 1, mask=s_ok, other=0.0, cache_modifier=CACHE)
            o_s = tl.load(MID + s_idx[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0,
                          cache_modifier=CACHE)
            w = tl.exp2(m - m_all)
            l_run += w * l_s
            acc2 += w[:, None] * o_s
        l_all = tl.sum(l_run, 0)
        acc = tl.sum(acc2, 0)
    return acc / tl.where(l_all == 0.0, 1.0, l_all)  # no visible key: 0


@triton.jit
def _decode_merge_kernel(
    MID, O,
    stride_ob, stride_oh, stride_om, stride_od,
    HQ, SQ, NUM_SPLITS, ML_BASE,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SLICE: tl.constexpr,
    WAIT_PRIMARY: tl.constexpr,
):
    # Stage 2: one program = SLICE head dims of one output row (b, hq, token). Reads
    # NUM_SPLITS * (SLICE + 2) fp32, writes SLICE elements of O. Slicing the head dim puts 4x more programs
    # (at d128) on the short, latency-bound read of the partials.
    if WAIT_PRIMARY:  # launched early (programmatic dependent launch): wait until the partials are written,
        tl.extra.cuda.gdc_wait()  # then let the next kernel launch while this one merges. Not before the wait:
        tl.extra.cuda.gdc_launch_dependents()  # see "Launch order" in the module docstring
    row = tl.program_id(0).to(tl.int64)
    tok = row % SQ
    h = (row // SQ) % HQ
    b = row // (SQ * HQ)
    offs_d = tl.program_id(1) * SLICE + tl.arange(0, SLICE)
    out = _merge_row(MID, MID + ML_BASE, row * NUM_SPLITS, offs_d, NUM_SPLITS, BLOCK_S, BLOCK_D, SLICE, "")
    o_ptrs = O + b * stride_ob + h * stride_oh + tok * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _prefetch_l2(ptrs):
    # prefetch.global.L2 for every address of ptrs (one per 128-byte line); the result is a dummy
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs.to(tl.int64)],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_chunk_start(K, V, KV_LEN, b, b64, hk, lo, MAX_LEN, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, HEAD_DIM: tl.constexpr, PREFETCH_N: tl.constexpr,
                          LINES: tl.constexpr):
    # Before waiting for the kernel that writes the newest keys: ask L2 for the chunk's first PREFETCH_N keys of
    # K and V. Only a hint, so it is safe before the wait: L2 is where stores become visible, and a store by
    # the kernel waited for lands on the prefetched line. kv_len read here may be a step stale; it only stops
    # prefetching far past the live keys (+ MAX_DECODE_Q covers the new tokens).
    live = tl.load(KV_LEN + b).to(tl.int32) + 16
    keys = lo + tl.arange(0, PREFETCH_N)
    keys = tl.where(keys < tl.minimum(live, MAX_LEN), keys, lo)  # past the live keys: the first line again
    elem_bytes: tl.constexpr = K.dtype.element_ty.primitive_bitwidth // 8
    seg = tl.minimum(tl.arange(0, LINES) * 128, HEAD_DIM * elem_bytes - 1)  # a row's 128-byte lines, in bytes
    k_row0 = (K + b64 * stride_kb + hk.to(tl.int64) * stride_kh).to(tl.pointer_type(tl.int8))
    v_row0 = (V + b64 * stride_vb + hk.to(tl.int64) * stride_vh).to(tl.pointer_type(tl.int8))
    _prefetch_l2(k_row0 + keys.to(tl.int64)[:, None] * (stride_kn * elem_bytes) + seg[None, :])
    _prefetch_l2(v_row0 + keys.to(tl.int64)[:, None] * (stride_vn * elem_bytes) + seg[None, :])


@triton.jit(do_not_specialize=["q_offset", "window"])
def _decode_split_kernel(
    Q, K, V, KV_LEN, KV_START, Q_OFF, MID, K_DESC, V_DESC, SLOPES, O, COUNTS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    HKV, GROUP, SQ, MAX_LEN, CHUNK, NUM_SPLITS, ML_BASE, q_offset, qk_scale,
    window, cap_in, cap_out,  # sliding window (keys), soft-cap constants (attention_common.score_logits)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, Q_OFF_MODE: tl.constexpr, DOT_PREC: tl.constexpr, HAS_START: tl.constexpr,
    PDL: tl.constexpr, PREFETCH_N: tl.constexpr, LINES: tl.constexpr, TMA: tl.constexpr,
    MERGE: tl.constexpr, BLOCK_S: tl.constexpr,
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
):
    # One program = one chunk of CHUNK keys of one (batch, KV head), for BLOCK_M of the group's
    # GROUP * SQ query rows (row r = query head hk * GROUP + r // SQ, token r % SQ). Chunks split the
    # key axis from 0, or with WINDOW the band from its first key (NUM_SPLITS * CHUNK >= window + SQ - 1).
    # Per program:
    #   reads   K, V: min(CHUNK, valid keys of the chunk) * HEAD_DIM elements each (the bulk)
    #           Q: BLOCK_M * HEAD_DIM elements; kv_len[b] (and q_offset[b], kv_start[b]): one scalar each;
    #           with ALIBI BLOCK_M slopes (one per row's query head)
    #   writes  partial output BLOCK_M * BLOCK_D fp32 and (max, sum) 2 * BLOCK_M fp32 into MID.
    # With MERGE the last program to finish among the NUM_SPLITS of its (batch, KV head, row block) merges
    # them (it counts in COUNTS) and writes the rows to O: reads NUM_SPLITS * (BLOCK_D + 2) fp32 per valid row.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_r = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b64 = b.to(tl.int64)
    if PDL:  # launched early: let the merge kernel launch too (it waits for this grid), start the chunk's first
        tl.extra.cuda.gdc_launch_dependents()  # keys on their way to L2, then wait for the kernels before this one
        if PREFETCH_N > 0:
            _prefetch_chunk_start(K, V, KV_LEN, b, b64, hk, pid_s * CHUNK, MAX_LEN, stride_kb, stride_kh,
                                  stride_kn, stride_vb, stride_vh, stride_vn, HEAD_DIM, PREFETCH_N, LINES)
        tl.extra.cuda.gdc_wait()

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
    if WINDOW:  # the first row (position q_off) sees keys from q_off - window + 1 on: chunks start there
        lo = tl.maximum(q_off - window + 1, 0) + pid_s * CHUNK
    else:
        lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, kv_end)
    if HAS_START:  # keys below kv_start[b] (left padding) are never read
        lo = tl.maximum(lo, tl.load(KV_START + b).to(tl.int32))
    if CAUSAL:
        hi = tl.minimum(hi, q_off + SQ)  # no row of this program sees a key at or past q_off + SQ
    q_pos = q_off + tok
    if ALIBI:
        slope = (tl.load(SLOPES + hq, mask=row_ok, other=0.0) * _LOG2E_C)[:, None]  # (BLOCK_M, 1)
    else:
        slope = 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TMA:  # whole tiles by the tensor-memory accelerator; the ragged last tile (keys up to hi) below
        full_hi = lo + (tl.maximum(hi - lo, 0) // BLOCK_N) * BLOCK_N
        for start_n in range(lo, full_hi, BLOCK_N):
            k = K_DESC.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)  # (BLOCK_N, BLOCK_D)
            v = V_DESC.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
            cols = start_n + offs_n
            if SOFTCAP or ALIBI:
                qk = score_logits(qk, cols, q_pos, qk_scale, cap_in, cap_out, slope, SOFTCAP, ALIBI)
                step_scale = 1.0  # already base-2 logits
            else:
                step_scale = qk_scale
            if CAUSAL:  # bites only for several new tokens, on the chunk holding the newest keys
                qk = tl.where(cols[None, :] <= q_pos[:, None], qk, float("-inf"))
            if WINDOW:  # bites only on the band's first tiles
                qk = tl.where(cols[None, :] > (q_pos - window)[:, None], qk, float("-inf"))
            acc, l_i, m_i = online_softmax_step(qk, v, acc, l_i, m_i, step_scale, True, DOT_PREC)
        lo = full_hi

    k_ptrs = (K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + lo.to(tl.int64) * stride_kn
              + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + lo.to(tl.int64) * stride_vn
              + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
    for start_n in range(lo, hi, BLOCK_N):  # every tile by pointer loads, or (TMA) at most the last one
        cols = start_n + offs_n
        col_ok = cols < hi
        if BLOCK_D != HEAD_DIM:
            kv_mask = col_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = col_ok[:, None]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if SOFTCAP or ALIBI:
            qk = score_logits(qk, cols, q_pos, qk_scale, cap_in, cap_out, slope, SOFTCAP, ALIBI)
            step_scale = 1.0  # already base-2 logits
        else:
            step_scale = qk_scale
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (cols[None, :] > (q_pos - window)[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(qk, v, acc, l_i, m_i, step_scale, True, DOT_PREC)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    # Partials laid out (row, split, ...) with row = (b * HQ + hq) * SQ + tok: MID holds the
    # unnormalised outputs, MID + ML_BASE the (max, sum) pairs.
    out_row = ((b64 * HKV * GROUP + hq.to(tl.int64)) * SQ + tok) * NUM_SPLITS + pid_s
    tl.store(MID + out_row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(MID + ML_BASE + out_row * 2, m_i, mask=row_ok)
    tl.store(MID + ML_BASE + out_row * 2 + 1, l_i, mask=row_ok)
    if MERGE:
        _merge_if_last(MID, ML_BASE, O, COUNTS, pid_bh * tl.num_programs(2) + pid_r, b64, hk, pid_r, offs_d, d_ok,
                       stride_ob, stride_oh, stride_om, stride_od, HKV, GROUP, SQ, NUM_SPLITS, BLOCK_M, BLOCK_S,
                       BLOCK_D)


@triton.jit
def _merge_if_last(MID, ML_BASE, O, COUNTS, group, b64, hk, pid_r, offs_d, d_ok, stride_ob, stride_oh, stride_om,
                   stride_od, HKV, GROUP, SQ, NUM_SPLITS, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    # Stage 2 inside stage 1: every program counts itself done in COUNTS[group] once its partials are stored
    # (the barrier orders all its threads' stores before the count; the count releases them to the GPU). The
    # one that counts last acquires the others' partials, merges its row block's valid rows and resets the
    # count for the next launch (a CUDA graph replays the same counters).
    tl.debug_barrier()
    done = tl.atomic_add(COUNTS + group, 1, sem="acq_rel", scope="gpu")
    if done == NUM_SPLITS - 1:
        first = pid_r * BLOCK_M
        for r in range(first, tl.minimum(first + BLOCK_M, GROUP * SQ)):
            tok = r % SQ
            hq = hk * GROUP + r // SQ
            row = (b64 * HKV * GROUP + hq) * SQ + tok
            out = _merge_row(MID, MID + ML_BASE, row * NUM_SPLITS, offs_d, NUM_SPLITS, BLOCK_S, BLOCK_D, BLOCK_D,
                             ".cg")
            o_ptrs = O + b64 * stride_ob + hq * stride_oh + tok * stride_om + offs_d * stride_od
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=d_ok)
        tl.atomic_xchg(COUNTS + group, 0, sem="relaxed", scope="gpu")


def _decode_block_m(rows: int, elem: int) -> int:
    """Query rows (GQA group x new tokens) per stage-1 program: all of them up to 64 (32 for fp32 and in the
    interpreter), at least 16 for the tensor-core dot."""
    cap = 32 if _INTERPRET or elem == 4 else 64
    return max(16, min(triton.next_power_of_2(rows), cap))


def _decode_tiles(block_d: int, rows: int, elem: int, chunk: int, tma: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for stage 1: a streaming loop, so fixed heuristics
    (no autotuning: the first call may be inside a CUDA-graph capture). `chunk`: keys per split before
    rounding to whole tiles.

    16-bit, d <= 128, pointer loads: 64-key tiles of K and V (16 KiB each), three stages deep; measured on an
    H200 (B1 32/8 heads 16k keys, graph replay) within 1% of the best of 10 tile/stage/warp combinations.
    With TMA loads (Hopper), where a chunk holds more than 64 keys: 128-key tiles two stages deep. Shorter
    chunks keep 64-key pointer tiles (a 128-key tile would halve the split count, and 64-key TMA tiles measured
    slower). H100 SXM, B1 32/8 heads d128, graph replay, 2026-11-21 (benchmarks/decode_variants.py): 4k keys
    6.83 against 7.00 us for 64-key pointer tiles, 16k keys 27.26 against 27.15 (a tie); 1k keys (64-key
    chunks) 4.06 us by pointer loads against 4.56 by 64-key TMA tiles."""
    block_m = _decode_block_m(rows, elem)
    if _INTERPRET:
        return block_m, 16, 4, 1
    if elem == 4:  # fp32: 3xTF32 dots need registers and twice the shared memory per key
        return block_m, 32, 4, 2 if block_d <= 128 else 1
    num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    if block_d > 128:
        return block_m, 32, num_warps, 2
    if tma and chunk > 64:
        return block_m, 128, 4 if block_m <= 32 else 8, 2
    return block_m, 64, num_warps, 3


def _check_decode(q, k_cache, v_cache, kv_len, scale, kv_start=None, causal=True, window=0, softcap=0.0,
                  alibi_slopes=None):
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
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"decode_attention: caches on {k_cache.device}/{v_cache.device}, q on {q.device}")
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
    reason = feature_reason(hq, q.device, causal, window, softcap, alibi_slopes)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")


def _per_batch(t: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """A (1,) or (b,) device tensor as a contiguous (b,) one (a view when it already is)."""
    if t is None:
        return None
    if t.dim() == 1 and t.shape[0] == b and t.stride(0) == 1:
        return t
    t = t.reshape(-1).expand(b)
    return t if t.stride(0) == 1 else t.contiguous()


class _Plan:
    """Everything decode_attention derives from shapes, strides, dtypes and options: computed (and the
    inputs checked) once per signature, so a repeated call only allocates and launches."""

    __slots__ = ("out_shape", "dtype", "empty", "grid", "ints", "meta", "mid_numel", "merge_grid", "merge_ints",
                 "merge_meta", "qk_scale", "tma_tile", "descriptors", "span", "features", "counts")


_PLANS: dict = {}
# The split kernels' merge counts, per (device, count): never dropped with the plans, since a captured CUDA graph
# keeps using the buffer it was captured with. Plans of one size share one buffer: launches on a stream run one
# after the other and each leaves its counts at zero.
_COUNTS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _merge_counts(device: torch.device, n: int) -> torch.Tensor:
    key = (device, n)
    if key not in _COUNTS:
        _COUNTS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _COUNTS[key]

# The split and merge kernels are launched with programmatic dependent launch on Hopper and later (sm_90+,
# codegen/pdl.py): the merge kernel's launch overlaps the split kernel's tail instead of following it.


def decode_span(max_len: int, sq: int, window: int = 0) -> int:
    """Keys the chunks of one (batch, KV head) split: the whole cache, or with a window the widest band the
    sq new tokens can see (window + sq - 1 keys, at most the cache)."""
    window = min(int(window), MAX_WINDOW)
    return min(max_len, window + sq - 1) if window else max_len


def _make_plan(q, k_cache, v_cache, scale, causal, q_off_mode, num_splits, has_start, window=0, softcap=0.0,
               alibi_slopes=None) -> _Plan:
    b, hq, sq, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    plan = _Plan()
    plan.out_shape, plan.dtype = (b, hq, sq, d), q.dtype
    plan.empty = b * hq * sq * d == 0
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    plan.qk_scale = scale * LOG2E
    _, window, cap_in, cap_out, flags = feature_args(scale, window, softcap, None, q)
    flags["ALIBI"] = alibi_slopes is not None
    plan.features = (window, cap_in, cap_out)
    span = plan.span = max(decode_span(max_len, sq, window), 1)  # keys the chunks cover
    block_d = _block_d(d)
    rows = group * sq
    tma_ok = use_tma(k_cache, v_cache)
    row_blocks = triton.cdiv(rows, _decode_block_m(rows, q.element_size()))
    if num_splits is None:
        num_splits = choose_num_splits(b * hkv * row_blocks, span, sm_count(q.device))
    chunk = triton.cdiv(span, max(1, int(num_splits)))
    block_m, block_n, num_warps, num_stages = _decode_tiles(block_d, rows, q.element_size(), chunk, tma_ok)
    tma = tma_ok and (block_n == 128 or _INTERPRET)  # 128-key TMA tiles (_decode_tiles); tests force it on
    num_splits = max(1, min(int(num_splits), triton.cdiv(span, block_n)))
    chunk = triton.cdiv(triton.cdiv(span, num_splits), block_n) * block_n
    num_splits = triton.cdiv(span, chunk)
    n_rows = b * hq * sq
    out_strides = (hq * sq * d, sq * d, d, 1)  # out is contiguous
    ml_base = n_rows * num_splits * block_d  # MID: partial outputs, then the (max, sum) pairs
    plan.mid_numel = ml_base + n_rows * num_splits * 2
    plan.grid = (num_splits, b * hkv, row_blocks)
    plan.ints = (*q.stride(), *k_cache.stride(), *v_cache.stride(), *out_strides, hkv, group, sq, max_len, chunk,
                 num_splits, ml_base)
    pdl = use_pdl(q.device)
    merge_in_split = min(rows, block_m) <= MERGE_IN_SPLIT_MAX_ROWS
    # one count per (batch, KV head, row block), zero between launches (the merging program resets its own)
    plan.counts = _merge_counts(q.device, b * hkv * row_blocks) if merge_in_split else None
    plan.meta = dict(
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
        Q_OFF_MODE=q_off_mode, DOT_PREC=_dot_precision(q.dtype), HAS_START=has_start,
        # the L2 hint targets chunk starts from key 0: a window's band starts elsewhere, so no hint there
        PDL=pdl, PREFETCH_N=PREFETCH_KEYS if pdl and not window and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
        else 0,
        LINES=triton.next_power_of_2(triton.cdiv(d * q.element_size(), 128)), TMA=tma,
        MERGE=merge_in_split, BLOCK_S=min(triton.next_power_of_2(num_splits), max(1, 4096 // block_d)),
        num_warps=num_warps, num_stages=num_stages, **flags,
    )
    plan.tma_tile = (block_n, block_d) if tma else None
    plan.descriptors = None
    plan.meta.update(launch_options(pdl))
    # Stage 2 is latency-bound: one program per 32 head dims of a row, on one warp. H100 SXM, B1 32/8 heads d128,
    # graph replay, 2026-11-21 (benchmarks/decode_variants.py): 4k keys 6.83 against 7.37 us, 16k keys 27.26
    # against 27.74, for one 2-warp program per row.
    slice_d = min(MERGE_SLICE, block_d)
    block_s = min(triton.next_power_of_2(num_splits), max(1, 4096 // slice_d))
    plan.merge_grid = (n_rows, block_d // slice_d)
    plan.merge_ints = (*out_strides, hq, sq, num_splits, ml_base)
    plan.merge_meta = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=block_s, SLICE=slice_d, WAIT_PRIMARY=pdl,
                           num_warps=1 if block_s * slice_d <= 1024 else 4)
    plan.merge_meta.update(launch_options(pdl))
    return plan


def _descriptors(plan: _Plan, k_cache, v_cache):
    """The plan's TMA descriptors over this call's caches (kept while the caches stay where they are, as a
    static KV cache does), or the caches themselves when the plan streams by pointer loads (never read)."""
    if plan.tma_tile is None:
        return k_cache, v_cache
    where = (k_cache.data_ptr(), v_cache.data_ptr())
    if plan.descriptors is None or plan.descriptors[0] != where:
        plan.descriptors = (where, kv_descriptors(k_cache, v_cache, *plan.tma_tile))
    return plan.descriptors[1]


def decode_attention(q, k_cache, v_cache, kv_len, *, scale=None, causal=True, q_offset=None, num_splits=None,
                     kv_start=None, window=0, softcap=0.0, alibi_slopes=None):
    """Attention of q (b, hq, sq <= 16, d) over keys [kv_start[b], kv_len[b]) of static caches
    (b, hkv, max_len, d); returns (b, hq, sq, d) contiguous. Semantics of decode_reference.

    kv_len is a (b,) int32/int64 device tensor, read only by the kernels (CUDA-graph safe); so is the
    optional kv_start (left padding: keys below it are masked, and never read). q_offset (int or (b,)
    tensor) overrides the default causal offset kv_len - sq. num_splits overrides choose_num_splits.
    window (causal only), softcap and alibi_slopes ((hq,) floats) as in flash_attention; with a window only
    the band of window + sq - 1 keys is split and read. On CPU without TRITON_INTERPRET=1 it computes the
    reference.

    Host cost: the inputs are checked and turned into launch parameters once per signature (shapes,
    strides, dtypes, devices, options; see _Plan); a repeated call is a dictionary lookup, two
    allocations (output and one fp32 workspace) and one launch (two when the merge kernel runs).
    """
    if not _use_kernel(q):
        _check_decode(q, k_cache, v_cache, kv_len, scale, kv_start, causal, window, softcap, alibi_slopes)
        return decode_reference(q, k_cache, v_cache, kv_len, scale=scale, causal=causal, q_offset=q_offset,
                                kv_start=kv_start, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    kv_is_tensor = isinstance(kv_len, torch.Tensor)
    off_is_tensor = isinstance(q_offset, torch.Tensor)
    q_off_mode = 0 if q_offset is None else (2 if off_is_tensor else 1)
    start_is_tensor = isinstance(kv_start, torch.Tensor)
    key = (
        q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), k_cache.dtype, k_cache.device,
        v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.device,
        (kv_len.shape, kv_len.dtype, kv_len.device) if kv_is_tensor else None,
        (kv_start.shape, kv_start.dtype, kv_start.device) if start_is_tensor else (kv_start is None),
        (q_offset.shape, q_offset.device) if off_is_tensor else q_off_mode,
        scale, bool(causal), num_splits,
        (k_cache.data_ptr() | v_cache.data_ptr()) % 16 == 0,  # a TMA descriptor needs 16-byte aligned bases
        window, softcap,
        None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.stride(), alibi_slopes.dtype,
                                           alibi_slopes.device),
    )
    plan = _PLANS.get(key)
    if plan is None:
        _check_decode(q, k_cache, v_cache, kv_len, scale, kv_start, causal, window, softcap, alibi_slopes)
        plan = _make_plan(q, k_cache, v_cache, scale, causal, q_off_mode, num_splits, kv_start is not None,
                          window, softcap, alibi_slopes)
        if len(_PLANS) > 1024:
            _PLANS.clear()
        _PLANS[key] = plan
    out = torch.empty(plan.out_shape, dtype=plan.dtype, device=q.device)
    if plan.empty:
        return out
    b = plan.out_shape[0]
    if not kv_is_tensor:
        kv_len = torch.full((b,), int(kv_len), dtype=torch.int32, device=q.device)
    kv_len = _per_batch(kv_len, b)
    if q_off_mode == 2:
        q_off_t, q_off_int = _per_batch(q_offset, b), 0
    else:
        q_off_t, q_off_int = kv_len, (0 if q_offset is None else int(q_offset))
    kv_start = _per_batch(kv_start, b)
    mid = torch.empty(plan.mid_numel, dtype=torch.float32, device=q.device)
    k_desc, v_desc = _descriptors(plan, k_cache, v_cache)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32)
        slopes = slopes if slopes.stride(0) == 1 else slopes.contiguous()
    else:
        slopes = mid  # never read
    _decode_split_kernel[plan.grid](
        q, k_cache, v_cache, kv_len, kv_len if kv_start is None else kv_start, q_off_t, mid, k_desc, v_desc, slopes,
        out, mid if plan.counts is None else plan.counts, *plan.ints, q_off_int, plan.qk_scale, *plan.features,
        **plan.meta,
    )
    if plan.counts is None:
        _decode_merge_kernel[plan.merge_grid](mid, out, *plan.merge_ints, **plan.merge_meta)
    return out
