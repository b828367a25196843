"""FlashAttention-2-style forward kernel for inference, its PyTorch reference and its cost formulas.

One Triton program owns BLOCK_M query rows of one (batch, query head). It keeps those rows of Q in
registers and walks the keys in tiles of BLOCK_N, folding every tile into an online softmax: a running
row maximum `m`, a running row sum `l` and an unnormalised fp32 output `acc`. The score matrix never
reaches HBM, so memory grows linearly with the sequence length.

Layout of the key loop for one program (causal, query offset `q_offset`):

    keys [0, full_end)          every key is visible to every row of the block: no masks at all
    keys [full_end, diag_end)   the diagonal tiles (and a ragged tail): causal/length masks applied
    keys [diag_end, ...)        never visited (above the diagonal or past the valid length)

With a sliding window of `window` keys (causal only: query p sees p - window < j <= p) the loop starts at
the first key tile the block's first row can see, so work per block is about window + BLOCK_M keys, not the
whole prefix:

    keys [0, lo)                never visited (before every row's band)
    keys [lo, lead_end)         the band's lower edge: window masks applied
    keys [lead_end, full_end)   inside every row's band: no masks
    keys [full_end, diag_end)   the diagonal, as above

On Hopper (fp16/bf16, use_tma) the unmasked range's K/V tiles arrive by the tensor-memory accelerator (TMA
descriptors), the masked ones by pointer loads; window, soft-cap and ALiBi keep that split.

Score variants, each behind a constexpr flag so the plain kernel compiles exactly as without them:
logit soft-cap (Gemma-2: score = softcap * tanh(scale * q.k / softcap)) and ALiBi (score += slope[h] * (j - p),
absolute key and query positions), both applied before the masks.

Softmax runs in base 2: `scale * log2(e)` is folded into one multiply so each score costs one FMA and
one exp2 (soft-cap and ALiBi compute base-2 logits themselves: log2(e) folded into their constants). GQA
reads the KV head `h // (hq // hkv)` directly; repeated K/V are never materialised.

Everything the kernel needs from the device (per-batch key lengths, per-batch query offsets) is read
inside the kernel, so a launch never synchronises with the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fxopt.codegen.attention_common import (  # noqa: F401  (re-exported: callers read them here)
    _INTERPRET,
    _LOG2E_C,
    LOG2E,
    MAX_GRID_Y,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    TMA_ENABLED,
    TensorDescriptor,
    _block_d,
    _dot_precision,
    _use_kernel,
    attention_flops,
    attention_hbm_bytes,
    attention_reference,
    feature_args,
    feature_reason,
    kv_descriptors,
    online_softmax_step,
    score_logits,
    tma_compatible,
    use_tma,
)
from fxopt.codegen.tuning import TunedKernel
from fxopt.hardware import get_hardware


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def supports(q, k, v, *, causal=False, scale=None, key_padding_mask=None, q_offset=0, kv_len=None, window=0,
             softcap=0.0, alibi_slopes=None):
    """None when flash_attention handles these inputs, else a short reason (the rewrite falls back)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} is not a 4-d tensor (b, h, s, d)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {_dtype_name(q.dtype)}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"mixed dtypes q {_dtype_name(q.dtype)}, k {_dtype_name(k.dtype)}, v {_dtype_name(v.dtype)}"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    b, hq, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        return "batch sizes differ"
    if k.shape[:3] != v.shape[:3]:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    if k.shape[-1] != d or v.shape[-1] != d:
        return f"head dims differ (q {d}, k {k.shape[-1]}, v {v.shape[-1]})"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    if d < 1:
        return "empty head dim"
    if k.shape[1] == 0 or hq % k.shape[1]:
        return f"query heads {hq} not a multiple of key/value heads {k.shape[1]}"
    if b * hq > MAX_GRID_Y:
        return f"batch*heads {b * hq} > {MAX_GRID_Y} (grid limit)"
    if scale is not None and not scale > 0:
        return f"non-positive scale {scale}"
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] not in (1, b) or (
            key_padding_mask.shape[1] != k.shape[2]
        ):
            return f"key_padding_mask shape {tuple(key_padding_mask.shape)} is not (b, skv)"
        if key_padding_mask.dtype != torch.bool:
            return f"key_padding_mask dtype {_dtype_name(key_padding_mask.dtype)} (want bool)"
    for name, t in (("q_offset", q_offset), ("kv_len", kv_len)):
        if isinstance(t, torch.Tensor):
            if t.dtype not in (torch.int32, torch.int64) or t.numel() not in (1, b):
                return f"{name} must be an int or a (b,) int32/int64 tensor"
            if t.device != q.device:
                return f"{name} on {t.device}, inputs on {q.device}"
    if kv_len is not None and not isinstance(kv_len, torch.Tensor):
        return "kv_len must be a (b,) tensor"
    return feature_reason(hq, q.device, causal, window, softcap, alibi_slopes)


@triton.jit
def _attn_key_loop(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, pad_ptrs, k_desc, v_desc, b, hk, lo, hi,
    stride_kn, stride_vn, stride_pn, q_pos, kv_end, qk_scale, offs_n, d_ok,
    window, cap_in, cap_out, slope,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_MASKED: tl.constexpr, BOUNDARY: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    """Fold key tiles [lo, hi) into (acc, l_i, m_i); the tile pointers start at key `lo`.

    BOUNDARY=False is the fast path: every key of every tile is valid and visible, no masks. With TMA its
    tiles arrive through the tensor-memory accelerator (k_desc, v_desc: (b, hkv, skv, d) descriptors whose
    zero fill pads the head dim), not through per-thread pointer loads.
    BOUNDARY=True masks keys past kv_end and, when CAUSAL, keys after each row's position (and, with WINDOW,
    keys at or before position - window); its tiles are always pointer loads, whose masks keep whatever lies
    past kv_end (an unwritten cache tail) out of V. SOFTCAP / ALIBI transform the scores first (score_logits).
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if TMA and not BOUNDARY:
            k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        elif BOUNDARY:
            col_ok = cols < kv_end
            if D_MASKED:
                kv_mask = col_ok[:, None] & d_ok[None, :]
            else:
                kv_mask = col_ok[:, None]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif D_MASKED:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if SOFTCAP or ALIBI:
            qk = score_logits(qk, cols, q_pos, qk_scale, cap_in, cap_out, slope, SOFTCAP, ALIBI)
            step_scale = 1.0  # already base-2 logits
        else:
            step_scale = qk_scale
        if BOUNDARY or HAS_PAD:
            # A row may see no key in this tile (or at all): keep -inf out of the exponent offsets.
            if BOUNDARY:
                visible = col_ok[None, :]
                if CAUSAL:
                    visible = visible & (cols[None, :] <= q_pos[:, None])
                if WINDOW:
                    visible = visible & (cols[None, :] > (q_pos - window)[:, None])
                if HAS_PAD:
                    pad = tl.load(pad_ptrs, mask=col_ok, other=0)
                    visible = visible & (pad != 0)[None, :]
            else:
                pad = tl.load(pad_ptrs)
                visible = (pad != 0)[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            acc, l_i, m_i = online_softmax_step(qk, v, acc, l_i, m_i, step_scale, True, DOT_PREC)
        else:
            acc, l_i, m_i = online_softmax_step(qk, v, acc, l_i, m_i, step_scale, False, DOT_PREC)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_PAD:
            pad_ptrs += BLOCK_N * stride_pn
    return acc, l_i, m_i, k_ptrs, v_ptrs, pad_ptrs


@triton.jit(do_not_specialize=["q_offset", "SQ_BUCKET", "SKV_BUCKET", "window"])
def _flash_attn_fwd(
    Q, K, V, O, PAD, KV_LEN, Q_OFF, K_DESC, V_DESC, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_pb, stride_pn,
    HQ, GROUP, SQ, SKV, q_offset, qk_scale,
    SQ_BUCKET, SKV_BUCKET,  # autotune key only
    window, cap_in, cap_out,  # sliding window (keys), soft-cap constants (see score_logits)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KV_LEN: tl.constexpr, Q_OFF_TENSOR: tl.constexpr,
    DOT_PREC: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
):
    # One program = BLOCK_M query rows of one (batch, query head). Per program, in elements:
    #   reads   Q: BLOCK_M * HEAD_DIM once
    #           K, V: n_keys * HEAD_DIM each, n_keys = keys up to the diagonal / valid length
    #                 (all SKV non-causal, about q_offset + (start_m + 1) * BLOCK_M causal,
    #                 at most window + BLOCK_M + BLOCK_N with WINDOW: the tiles before the band are skipped)
    #           key padding mask: n_keys bytes (if any); kv_len[b], q_offset[b], slope[h]: one scalar each
    #   writes  O: BLOCK_M * HEAD_DIM once.  Nothing else (no scores, no logsumexp) touches HBM.
    # So all programs together read K/V ceil(SQ / BLOCK_M) times per query head (about half if causal,
    # about (window + BLOCK_M) / SKV of it with a window).
    num_m = tl.cdiv(SQ, BLOCK_M)
    if CAUSAL:
        start_m = num_m - 1 - tl.program_id(0)  # longest rows (most keys) are launched first
    else:
        start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    b64 = b.to(tl.int64)
    row0 = start_m * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = (row0 + offs_m) < SQ

    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + row0.to(tl.int64) * stride_qm
    q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if BLOCK_D != HEAD_DIM:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    kv_end = SKV
    if HAS_KV_LEN:
        kv_end = tl.minimum(tl.load(KV_LEN + b).to(tl.int32), SKV)
    if Q_OFF_TENSOR:
        q_off = tl.load(Q_OFF + b).to(tl.int32)
    else:
        q_off = q_offset
    q_pos = q_off + row0 + offs_m  # absolute positions of this block's rows

    last_row = tl.minimum(row0 + BLOCK_M, SQ) - 1
    if CAUSAL:
        full_end = tl.minimum(tl.maximum(q_off + row0 + 1, 0), kv_end)
        diag_end = tl.minimum(tl.maximum(q_off + last_row + 1, 0), kv_end)
    else:
        full_end = kv_end
        diag_end = kv_end
    full_end = (full_end // BLOCK_N) * BLOCK_N
    if ALIBI:
        slope = tl.load(SLOPES + h) * _LOG2E_C
    else:
        slope = 0.0

    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    pad_base = PAD + b64 * stride_pb
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_tile = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Each loop starts from fresh pointers (not the first loop's final ones): carrying pointer tensors
    # from one pipelined loop into the next made Triton 3.6 spill registers.
    if WINDOW:
        # Row p sees keys (p - window, p]. Tiles before the first row's band are skipped: the loop starts at
        # lo. Keys from lead_end on lie in every row's band (past the last row's lower edge), so only
        # [lo, lead_end) needs the window mask; [lead_end, full_end) is the unmasked fast path.
        lo = (tl.maximum(q_off + row0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_end = tl.maximum(full_end, lo)
        lead_end = tl.cdiv(tl.maximum(q_off + last_row - window + 1, 0), BLOCK_N) * BLOCK_N
        lead_end = tl.minimum(tl.maximum(lead_end, lo), full_end)
        start = tl.cast(lo, tl.int64)
        acc, l_i, m_i, k_ptrs, v_ptrs, pad_ptrs = _attn_key_loop(
            acc, l_i, m_i, q, k_base + start * stride_kn + k_tile, v_base + start * stride_vn + v_tile,
            pad_base + start * stride_pn + offs_n * stride_pn, K_DESC, V_DESC, b, hk, lo, lead_end,
            stride_kn, stride_vn, stride_pn, q_pos, kv_end, qk_scale, offs_n, d_ok, window, cap_in, cap_out, slope,
            BLOCK_N, BLOCK_D, BLOCK_D != HEAD_DIM, True, CAUSAL, HAS_PAD, DOT_PREC, TMA, WINDOW, SOFTCAP, ALIBI,
        )
        start = tl.cast(lead_end, tl.int64)
        acc, l_i, m_i, k_ptrs, v_ptrs, pad_ptrs = _attn_key_loop(
            acc, l_i, m_i, q, k_base + start * stride_kn + k_tile, v_base + start * stride_vn + v_tile,
            pad_base + start * stride_pn + offs_n * stride_pn, K_DESC, V_DESC, b, hk, lead_end, full_end,
            stride_kn, stride_vn, stride_pn, q_pos, kv_end, qk_scale, offs_n, d_ok, window, cap_in, cap_out, slope,
            BLOCK_N, BLOCK_D, BLOCK_D != HEAD_DIM, False, CAUSAL, HAS_PAD, DOT_PREC, TMA, WINDOW, SOFTCAP, ALIBI,
        )
    else:
        acc, l_i, m_i, k_ptrs, v_ptrs, pad_ptrs = _attn_key_loop(
            acc, l_i, m_i, q, k_base + k_tile, v_base + v_tile, pad_base + offs_n * stride_pn, K_DESC, V_DESC,
            b, hk, 0, full_end, stride_kn, stride_vn, stride_pn, q_pos, kv_end, qk_scale, offs_n, d_ok,
            window, cap_in, cap_out, slope,
            BLOCK_N, BLOCK_D, BLOCK_D != HEAD_DIM, False, CAUSAL, HAS_PAD, DOT_PREC, TMA, WINDOW, SOFTCAP, ALIBI,
        )
    start = tl.cast(full_end, tl.int64)
    k_ptrs = k_base + start * stride_kn + k_tile
    v_ptrs = v_base + start * stride_vn + v_tile
    pad_ptrs = pad_base + start * stride_pn + offs_n * stride_pn
    acc, l_i, m_i, k_ptrs, v_ptrs, pad_ptrs = _attn_key_loop(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, pad_ptrs, K_DESC, V_DESC, b, hk, full_end, diag_end,
        stride_kn, stride_vn, stride_pn, q_pos, kv_end, qk_scale, offs_n, d_ok, window, cap_in, cap_out, slope,
        BLOCK_N, BLOCK_D, BLOCK_D != HEAD_DIM, True, CAUSAL, HAS_PAD, DOT_PREC, TMA, WINDOW, SOFTCAP, ALIBI,
    )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw no key stays 0
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + row0.to(tl.int64) * stride_om
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if BLOCK_D != HEAD_DIM:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim. Hopper wants 128-row
# tiles over 8 warps (two warp groups of 64 rows); the smaller ones cover short query blocks and older
# GPUs. The first tile of each list that fits is the untuned default (FXOPT_ATTN_AUTOTUNE=0).
_TILES = {
    16: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    32: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4)],
    64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (64, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    256: [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
}
# TMA loads (Hopper, fp16/bf16, see use_tma): the fast path's K/V tiles arrive as bulk tensor copies instead of
# per-thread loads, which leaves the registers for 128-key tiles three stages deep. H100 SXM, B4 H32 N4096 bf16
# (benchmarks/prefill_tiles.py, 2026-11-21): d128, 128x128 tiles on 8 warps, 3 stages: 548 (non-causal) / 470
# (causal) TFLOP/s against 497 / 452 for the best pointer-load tile; d64 gains nothing (best TMA tile 438 / 398,
# best pointer tile 442 / 405), and its 128-key TMA tiles are slow (392 / 347).
_TILES_TMA = {
    16: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    64: [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
}
# fp32 inputs: tensor-core dots in 3xTF32 (about fp32 accuracy) need more registers and shared memory.
_TILES_FP32 = {16: [(64, 32, 4, 2)], 32: [(64, 32, 4, 2)], 64: [(64, 32, 4, 2)], 128: [(64, 32, 4, 2)],
               256: [(32, 32, 4, 1)]}
_DEFAULT_SMEM = get_hardware(None).shared_memory  # without a GPU to ask: the default preset's (an H100's)


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # older/newer driver API: the default preset's budget
        return _DEFAULT_SMEM


def _smem_estimate(block_m, block_n, block_d, stages, elem) -> int:
    """Q tile plus `stages` K and V tiles: a conservative planning estimate, not the compiler's count."""
    return elem * block_d * (block_m + 2 * block_n * stages)


def _fitting_tiles(block_d: int, sq: int, elem: int, smem: int, tma: bool = False) -> list[tuple[int, int, int, int]]:
    candidates = (_TILES_FP32 if elem == 4 else _TILES_TMA if tma else _TILES)[block_d]
    tiles = [t for t in candidates if _smem_estimate(t[0], t[1], block_d, t[3], elem) <= smem]
    if sq <= 64:  # a short query block: 128-row tiles would mostly compute padding
        tiles = [t for t in tiles if t[0] <= 64] or tiles
    if not tiles:  # always leave the smallest tile
        tiles = [min(candidates, key=lambda t: _smem_estimate(t[0], t[1], block_d, t[3], elem))]
    return tiles


def _tile_of(cfg):
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    q = args["Q"]
    smem = _DEFAULT_SMEM
    if q.is_cuda:
        index = q.device.index
        smem = _max_shared_memory(torch.cuda.current_device() if index is None else index)
    tiles = _fitting_tiles(args["BLOCK_D"], args["SQ"], q.element_size(), smem, args["TMA"])
    by_tile = {_tile_of(c): c for c in configs}
    return [by_tile[t] for t in tiles]


def _set_descriptor_blocks(nargs) -> None:
    """Config pre-hook: the K/V descriptors (when the launch uses TMA) carry the config's key-tile shape."""
    for name in ("K_DESC", "V_DESC"):
        if TensorDescriptor is not None and isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]


def _make_configs():
    if _INTERPRET:  # autotuning in the interpreter is slow; small tiles also exercise the loop logic
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1,
                              pre_hook=_set_descriptor_blocks)]
    tiles = sorted({t for table in (_TILES, _TILES_TMA, _TILES_FP32) for ts in table.values() for t in ts})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_descriptor_blocks)
            for m, n, w, s in tiles]


# the fitting tiles, the table's pick first (timed with FXOPT_ATTN_AUTOTUNE=1 / FXOPT_AUTOTUNE=1)
_flash_attn_fwd_tuned = TunedKernel(
    _flash_attn_fwd, _make_configs(),
    key=["HEAD_DIM", "CAUSAL", "TMA", "SQ_BUCKET", "SKV_BUCKET", "WINDOW", "SOFTCAP", "ALIBI"],
    prune=None if _INTERPRET else _prune_configs, family="attention", tune="attn_autotune")


def _seq_bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


def _mask_from_kv_len(kv_len, b, skv, device):
    return torch.arange(skv, device=device)[None, :] < kv_len.to(device).reshape(-1).expand(b)[:, None]


def flash_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, q_offset=0, kv_len=None,
                    window=0, softcap=0.0, alibi_slopes=None):
    """Attention of q (b, hq, sq, d) over k, v (b, hkv, skv, d); returns (b, hq, sq, d) contiguous.

    Same semantics as attention_reference (sliding `window`, logit `softcap`, ALiBi `alibi_slopes` included),
    plus `kv_len`: an optional (b,) int tensor of valid key counts (keys at index >= kv_len[b] are ignored,
    e.g. the unused tail of a static KV cache). Inputs may have any strides. Raises ValueError when
    `supports` gives a reason; on CPU without TRITON_INTERPRET=1 it computes the reference instead.
    """
    reason = supports(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                      q_offset=q_offset, kv_len=kv_len, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    if reason is not None:
        raise ValueError(f"flash_attention: unsupported inputs: {reason}")
    b, skv = q.shape[0], k.shape[2]
    if not _use_kernel(q):
        mask = key_padding_mask
        if kv_len is not None:
            by_len = _mask_from_kv_len(kv_len, b, skv, q.device)
            mask = by_len if mask is None else mask & by_len
        return attention_reference(q, k, v, causal=causal, scale=scale, key_padding_mask=mask,
                                   q_offset=q_offset, window=window, softcap=softcap, alibi_slopes=alibi_slopes)

    return launch(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                  q_offset=q_offset, kv_len=kv_len, window=window, softcap=softcap, alibi_slopes=alibi_slopes)


def output_like(q: torch.Tensor, dv: int | None = None) -> torch.Tensor:
    """An output (b, h, s, dv) laid out like q: when q is a head-transposed view of (b, s, h, d)
    (the usual projection layout), so is the output, and the `transpose(1, 2).reshape(b, s, h*d)`
    that follows attention becomes a free view instead of a copy."""
    b, h, s, d = q.shape
    dv = d if dv is None else dv
    if q.stride(1) < q.stride(2):  # heads vary faster than positions: (b, s, h, d) in memory
        return q.new_empty((b, s, h, dv)).transpose(1, 2)
    return q.new_empty((b, h, s, dv))


def launch(q, k, v, *, causal, scale, key_padding_mask, q_offset, kv_len, window=0, softcap=0.0,
           alibi_slopes=None, tile=None, tma=None):
    """Launch the kernel on inputs `supports` accepted (fxopt::attention checks them once per call).

    `tile` = (BLOCK_M, BLOCK_N, num_warps, num_stages) bypasses the autotuner (tests use it to run every
    candidate tile); `tma` overrides use_tma (tests force it on)."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    out = output_like(q)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    slopes, window, cap_in, cap_out, flags = feature_args(scale, window, softcap, alibi_slopes, q)

    if key_padding_mask is not None:
        pad = key_padding_mask.view(torch.uint8)  # same bytes, no copy
        stride_pb = pad.stride(0) if pad.shape[0] == b else 0
        stride_pn = pad.stride(1)
    else:
        pad, stride_pb, stride_pn = q, 0, 0  # never read
    kv_len_t = kv_len.reshape(-1).expand(b) if kv_len is not None else q
    q_off_tensor = isinstance(q_offset, torch.Tensor)
    q_off_t = q_offset.reshape(-1).expand(b) if q_off_tensor else q
    q_off_int = 0 if q_off_tensor else int(q_offset)
    if kv_len is not None and kv_len_t.stride(0) != 1:
        kv_len_t = kv_len_t.contiguous()
    if q_off_tensor and q_off_t.stride(0) != 1:
        q_off_t = q_off_t.contiguous()

    def grid(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)

    tma = use_tma(k, v) if tma is None else tma
    block_n = 16 if tile is None else tile[1]  # the autotuner's pre-hook sets each config's tile rows
    k_desc, v_desc = kv_descriptors(k, v, block_n, _block_d(d)) if tma else (k, v)  # (k, v): never read
    if tile is None:
        kernel, tile_kwargs = _flash_attn_fwd_tuned, {}
    else:
        block_m, block_n, num_warps, num_stages = tile
        kernel = _flash_attn_fwd
        tile_kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    kernel[grid](
        q, k, v, out, pad, kv_len_t, q_off_t, k_desc, v_desc, slopes,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_pb, stride_pn,
        hq, hq // hkv, sq, skv, q_off_int, scale * LOG2E,
        _seq_bucket(sq), _seq_bucket(skv),
        window, cap_in, cap_out,
        HEAD_DIM=d, BLOCK_D=_block_d(d),
        CAUSAL=bool(causal), HAS_PAD=key_padding_mask is not None, HAS_KV_LEN=kv_len is not None,
        Q_OFF_TENSOR=q_off_tensor, DOT_PREC=_dot_precision(q.dtype), TMA=bool(tma), **flags, **tile_kwargs,
    )
    return out
