"""What both attention kernels share (codegen/flash_attention.py prefill, codegen/flash_decoding.py split-KV
decode): limits and constants, the feature checks and kernel arguments for sliding window / soft-cap / ALiBi,
the plain-PyTorch reference (the oracle and the CPU path), the cost formulas, the TMA descriptors, and the
@triton.jit pieces of the inner loop (scores with their features, one online-softmax step).
"""

from __future__ import annotations

import math

import sympy
import torch
import triton
import triton.language as tl

from fxopt import config
from fxopt.codegen.pdl import hopper_or_later

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: pointer loads only
    TensorDescriptor = None

_INTERPRET = config.get("interpret")
TMA_ENABLED = config.get("tma")
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535
# Windows at least this wide cover every position a kernel meets (positions < 2^30); launches clamp to it so
# that `p - window` cannot overflow int32.
MAX_WINDOW = 1 << 30
_LOG2E_C = tl.constexpr(LOG2E)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def _offsets_tensor(q_offset, b: int, device) -> torch.Tensor:
    """q_offset (int or (b,) tensor) as a (b,) int64 tensor on `device`."""
    if isinstance(q_offset, torch.Tensor):
        return q_offset.to(device=device, dtype=torch.int64).reshape(-1).expand(b)
    return torch.full((b,), int(q_offset), dtype=torch.int64, device=device)


def feature_reason(hq: int, device, causal: bool, window=0, softcap=0.0, alibi_slopes=None) -> str | None:
    """None when (window, softcap, alibi_slopes) are well-formed for hq query heads on `device`, else why not.
    Shared by both kernels and the custom ops."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        return f"window must be an int >= 0 (got {window!r})"
    if window and not causal:
        return "a sliding window needs causal=True"
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (0.0 <= softcap < math.inf):
        return f"softcap must be a finite float >= 0 (got {softcap!r})"
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
            return "alibi_slopes must be a floating-point tensor"
        if alibi_slopes.dim() != 1 or alibi_slopes.shape[0] != hq:
            return f"alibi_slopes shape {tuple(alibi_slopes.shape)} is not ({hq},) (one slope per query head)"
        if alibi_slopes.device != torch.device(device):
            return f"alibi_slopes on {alibi_slopes.device}, inputs on {device}"
    return None


def attention_reference(q, k, v, *, causal=False, scale=None, key_padding_mask=None, q_offset=0, window=0,
                        softcap=0.0, alibi_slopes=None):
    """Plain-PyTorch attention, the oracle for the kernels and the CPU path of the optimized model.

    q (b, hq, sq, d); k, v (b, hkv, skv, d) with hq % hkv == 0 (query head h uses KV head
    h // (hq // hkv)). key_padding_mask: bool (b, skv), True = attend. Query i sits at absolute position
    p = q_offset + i (q_offset an int or a (b,) tensor). With `causal` it sees keys j <= p; with `window`
    w > 0 (causal only) also only j > p - w (HF Mistral's sliding window: w keys including itself).
    Scores: s = scale * q.k; with `softcap` c > 0, s = c * tanh(s / c) (Gemma-2); with `alibi_slopes`
    ((hq,) floats) s += slopes[h] * (j - p) (ALiBi); then the masks. Computes in fp32 (float64 for float64
    inputs) and returns q's dtype. A row with no visible key is 0.
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of key/value heads {hkv}")
    reason = feature_reason(hq, q.device, causal, window, softcap, alibi_slopes)
    if reason is not None:
        raise ValueError(f"attention_reference: {reason}")
    group = hq // hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.to(compute).reshape(b, hkv, group, sq, d)
    kf = k.to(compute).unsqueeze(2)  # (b, hkv, 1, skv, d): broadcast over the group, no copy
    vf = v.to(compute).unsqueeze(2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (b, hkv, group, sq, skv)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    keys = torch.arange(skv, device=q.device)
    pos = _offsets_tensor(q_offset, b, q.device)[:, None] + torch.arange(sq, device=q.device)  # (b, sq)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute).reshape(hkv, group)[None, :, :, None, None]
        scores = scores + slopes * (keys[None, None, :] - pos[:, :, None]).to(compute)[:, None, None]
    allowed = torch.ones((b, sq, skv), dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, :]
    if causal:
        allowed = allowed & (keys[None, None, :] <= pos[:, :, None])
    if window:
        allowed = allowed & (keys[None, None, :] > pos[:, :, None] - window)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vf) / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out.reshape(b, hq, sq, v.shape[-1]).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Cost formulas (plain arithmetic: the cost pass feeds them sympy symbols)
# --------------------------------------------------------------------------------------------------


def _is_num(x) -> bool:
    return isinstance(x, (int, float))


def _min(x, y):
    """min for numbers, sympy.Min once either side is symbolic (the cost pass passes sympy sizes)."""
    if _is_num(x) and _is_num(y):
        return min(x, y)

    return sympy.Min(x, y)


def _relu(x):
    if _is_num(x):
        return max(x, 0)

    return sympy.Max(x, 0)


def attention_hbm_bytes(b, hq, hkv, sq, skv, d, elem_size, causal, window=0):
    """Ideal HBM traffic of the forward kernel: Q, K, V read once and O written once.

    This is the algorithmic minimum the roofline uses. The kernel itself re-reads K and V once per
    query block of BLOCK_M rows (and per query head of a GQA group; L2 absorbs much of that), i.e.
    about ceil(sq / BLOCK_M) * hq/hkv times the K/V term, halved when causal with sq == skv; the
    optional key padding mask (b * skv bytes) and length/offset vectors are negligible and not counted.
    `causal` does not change the ideal count (every key is visible to some query). A sliding window
    (causal, queries the last sq positions) leaves min(skv, sq + window - 1) keys visible to some query.
    """
    q_and_o = 2 * b * hq * sq * d * elem_size
    keys = _min(skv, sq + window - 1) if window else skv
    k_and_v = 2 * b * hkv * keys * d * elem_size
    return q_and_o + k_and_v


def attention_flops(b, hq, sq, skv, d, causal, window=0):
    """Matmul FLOPs of attention: 2*d per (query, key) pair for QK^T plus 2*d for PV.

    Non-causal: 4*b*hq*sq*skv*d. Causal counts only visible pairs, with the queries being the last sq
    positions of the skv keys (query offset skv - sq: prefill when sq == skv, a KV-cache step when
    sq < skv): sq*skv - sq**2/2 pairs, which is exactly half of sq*skv when sq == skv.
    A sliding window (causal) caps each row at min(p + 1, window) keys. In the same continuous count the
    pairs lost are (max(0, skv - w)**2 - max(0, skv - sq - w)**2) / 2: exactly sq*w pairs left when every
    row is capped (w <= skv - sq), the causal count when none is (w >= skv). Window 0 is no window.
    """
    if causal:
        flops = 2 * b * hq * d * sq * (2 * skv - sq)
        if window:
            lost = _relu(skv - window) ** 2 - _relu(skv - sq - window) ** 2  # twice the pairs outside the bands
            flops = flops - 2 * b * hq * d * lost
        return flops
    return 4 * b * hq * sq * skv * d


# --------------------------------------------------------------------------------------------------
# Support check
# --------------------------------------------------------------------------------------------------


def _use_kernel(t: torch.Tensor) -> bool:
    """Run the Triton kernel (compiled on CUDA, or interpreted under TRITON_INTERPRET=1)."""
    return _INTERPRET or t.is_cuda


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Each (b, h, s, d) tensor can back a TMA descriptor: 16-bit elements, no empty dim, unit stride along d,
    a 16-byte aligned base and 16-byte multiples for the other strides."""
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16) or t.numel() == 0 or t.stride(3) != 1:
            return False
        if t.data_ptr() % 16 or any(stride * t.element_size() % 16 for stride in t.stride()[:3]):
            return False
    return TensorDescriptor is not None


def use_tma(*tensors: torch.Tensor) -> bool:
    """Stream K/V tiles through the tensor-memory accelerator: a compiled launch on Hopper or later, FXOPT_TMA
    not 0, and tensors a descriptor can describe. (Tests force it on in the interpreter.)"""
    if not TMA_ENABLED or _INTERPRET:
        return False
    return hopper_or_later(tensors[0].device) and tma_compatible(*tensors)


def kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int):
    """TMA descriptors over the whole (b, hkv, skv, d) K and V, one (block_n, block_d) key tile per load; the
    head dim past d (block_d > d) reads as zeros."""
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, block_d]) for t in (k, v))


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def online_softmax_step(qk, v, acc, l_i, m_i, qk_scale, MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    """Fold one tile of scores qk (BLOCK_M, BLOCK_N) into the running row max m, row sum l and
    unnormalised output acc, in base 2. With MAY_BE_EMPTY, a row that has seen no visible key yet
    (max still -inf) exponentiates against 0 instead, so no -inf - -inf = NaN appears."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def tanh_f32(x):
    """tanh(x) without libdevice (Triton 3.6 and 3.9, compiled and interpreted alike).

    |x| >= 0.125: 1 - 2 / (exp(2x) + 1) through exp2 (overflow to inf gives 1, underflow to 0 gives -1, never
    NaN). Below, that form cancels (an absolute error of ~1e-7 on a value near 0, which the soft-cap multiplies
    by the cap), so the odd Taylor series to x^9 is used: its truncation error there is below 2e-10 relative."""
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    exact = 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2E_C)) + 1.0)
    return tl.where(x2 < 0.015625, series, exact)


@triton.jit
def score_logits(qk, cols, q_pos, qk_scale, cap_in, cap_out, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Base-2 logits of raw dot products qk (BLOCK_M, BLOCK_N) for keys `cols` and query positions `q_pos`:
    (softcap * tanh(scale * qk / softcap) + slope * (j - p)) * log2(e), with cap_in = scale / softcap,
    cap_out = softcap * log2(e), qk_scale = scale * log2(e) and slope already times log2(e) (a scalar, or
    (BLOCK_M, 1) for one slope per row). Call only with SOFTCAP or ALIBI; the plain path folds qk_scale into
    the softmax step instead."""
    if SOFTCAP:
        s = cap_out * tanh_f32(qk * cap_in)
    else:
        s = qk * qk_scale
    if ALIBI:
        s += slope * (cols[None, :] - q_pos[:, None]).to(tl.float32)
    return s


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# fp32 inputs: three TF32 tensor-core products per dot (about fp32 accuracy; plain TF32 would not pass
# the numerics rule, and exact "ieee" FMA dots spill heavily). fp16/bf16 dots ignore the setting.
FP32_DOT_PRECISION = "tf32x3"


def _dot_precision(dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def feature_args(scale: float, window, softcap, alibi_slopes, like: torch.Tensor):
    """Runtime arguments and constexpr flags of the score variants, shared by both kernels:
    (slopes tensor (fp32, contiguous; `like` when absent: never read), window clamped to MAX_WINDOW,
    cap_in = scale / softcap, cap_out = softcap * log2(e), dict(WINDOW=, SOFTCAP=, ALIBI=))."""
    window = min(int(window), MAX_WINDOW)
    softcap = float(softcap)
    cap_in, cap_out = (scale / softcap, softcap * LOG2E) if softcap else (0.0, 0.0)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32)
        slopes = slopes if slopes.stride(0) == 1 else slopes.contiguous()
    else:
        slopes = like
    flags = dict(WINDOW=window > 0, SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None)
    return slopes, window, cap_in, cap_out, flags
