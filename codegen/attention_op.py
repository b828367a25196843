"""fxopt's attention ops: what the attention and KV-cache passes put into graphs.

Each op is a torch.library custom op, so it has a schema, a fake (meta) implementation for
symbolic shapes, and one eager implementation that picks a kernel by shape:

    fxopt::attention(q, k, v, key_padding_mask?, attn_bias?, causal, scale, window=0, softcap=0.0,
                     alibi_slopes?=None)
        prefill / general attention; FlashAttention kernel when it supports the case, else SDPA (or, with a
        window, soft-cap or ALiBi, the same masks and bias computed by plain PyTorch in fp32).
    fxopt::cached_attention(q, k_cache, v_cache, kv_start, kv_len, scale, window=0, softcap=0.0,
                            alibi_slopes?=None)
        causal attention of the newest sq tokens over a static cache: Flash-Decoding for sq <= 16.
    fxopt::cache_write(cache, new, pos)
        writes new K/V rows into a static cache at positions [pos, pos + n), in place (pos: a 0-dim
        start, or the (n,) slot indices).

Shapes: q (b, hq, sq, d); k, v (b, hkv, skv, d) with hq % hkv == 0 (GQA is never materialised);
caches (b, hkv, max_len, d). kv_start / kv_len are (b,) device int tensors: row b's valid keys are
[kv_start[b], kv_len[b]) (left padding puts kv_start > 0), and its newest query sits at kv_len[b] - 1.

Score variants (defaults: off), the same in every op and kernel, positions absolute (fxopt::attention's
query i sits at position i, cached_attention's at kv_len - sq + i):
    window        sliding window, causal only: query p sees keys p - window < j <= p (HF Mistral); 0 = none
    softcap       logit soft-cap: score = softcap * tanh(scale * q.k / softcap) (Gemma-2); 0.0 = none
    alibi_slopes  (hq,) fp32: score += slopes[h] * (j - p) (ALiBi), after scale and soft-cap
Both added before the masks (and before attn_bias is added); a row with no visible key is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxopt.codegen import flash_attention as prefill
from fxopt.codegen import flash_decoding as decode
from fxopt.codegen import library
from fxopt.codegen import rope as _rope  # noqa: F401 - fxopt::rope and rope_cache_write exist wherever these do
from fxopt.codegen.loader import ops_use_kernels

DECODE_MAX_QUERIES = 16


def _kernel_available(t: torch.Tensor) -> bool:
    """loader.ops_use_kernels, and the prefill kernel's own interpreter check."""
    return t.is_cuda or (ops_use_kernels(t) and prefill._use_kernel(t))


def _variant_fallback(q, k, v, key_padding_mask, attn_bias, causal, scale, window, softcap, alibi_slopes):
    """Attention with window / soft-cap / ALiBi in plain PyTorch (fp32, float64 for float64): the scores, their
    soft-cap, the ALiBi bias and attn_bias, then one boolean mask; SDPA cannot soft-cap, and a bf16 float mask
    would round large ALiBi distances. K/V already repeated to the query heads."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    sq, skv = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale  # (b, hq, sq, skv)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(sq, device=q.device)[:, None]  # top-left aligned, as below
    keys = torch.arange(skv, device=q.device)[None, :]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(compute)[None, :, None, None] * (keys - pos).to(compute)
    if attn_bias is not None:
        scores = scores + attn_bias.to(compute)
    keep = torch.ones(sq, skv, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & (keys <= pos)
    if window:
        keep = keep & (keys > pos - window)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees no key is 0, never NaN
    return (probs @ v.to(compute)).to(q.dtype)


def sdpa_fallback(q, k, v, key_padding_mask, attn_bias, causal: bool, scale: float, window: int = 0,
                  softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch SDPA with GQA repeated explicitly: the path for cases the kernels do not cover.

    Causal is top-left aligned (query i sees keys j <= i), as SDPA's is_causal and the flash kernel
    with q_offset=0; padding and causal masks are folded into one boolean mask when both are given.
    A window, soft-cap or ALiBi slopes (module docstring) go through the same masks computed in plain
    PyTorch instead (_variant_fallback).
    """
    reason = prefill.feature_reason(q.shape[1], q.device, causal, window, softcap, alibi_slopes)
    if reason is not None:
        raise ValueError(f"fxopt attention: {reason}")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if window or softcap or alibi_slopes is not None:
        return _variant_fallback(q, k, v, key_padding_mask, attn_bias, causal, scale, window, softcap, alibi_slopes)
    sq, skv = q.shape[-2], k.shape[-2]
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]  # (b, 1, 1, skv)
    if causal and (keep is not None or attn_bias is not None):
        visible = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril()
        keep = visible if keep is None else keep & visible
        causal = False
    mask = attn_bias
    if keep is not None:
        mask = keep if mask is None else mask.masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    if keep is not None:  # a row that sees no key is 0, never NaN
        out = torch.nan_to_num(out, nan=0.0)
    return out


def kernel_choice(q, k, v, key_padding_mask=None, attn_bias=None, causal=False, scale=None, window=0, softcap=0.0,
                  alibi_slopes=None) -> tuple[str, str]:
    """(kernel, reason): 'flash' when the FlashAttention kernel covers the case (window, soft-cap and ALiBi
    included), else 'sdpa' and why."""
    if attn_bias is not None:
        return "sdpa", "general additive mask"
    reason = prefill.supports(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                              window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    return ("flash", "") if reason is None else ("sdpa", reason)


_ATTENTION_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? attn_bias, bool causal, "
                     "float scale, int window=0, float softcap=0.0, Tensor? alibi_slopes=None) -> Tensor")


@library.define("attention", _ATTENTION_SCHEMA)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
              attn_bias: torch.Tensor | None, causal: bool, scale: float, window: int = 0, softcap: float = 0.0,
              alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    kernel, _ = kernel_choice(q, k, v, key_padding_mask, attn_bias, causal, scale, window, softcap, alibi_slopes)
    if kernel == "flash" and _kernel_available(q):  # kernel_choice ran prefill.supports
        return prefill.launch(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, q_offset=0,
                              kv_len=None, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    return sdpa_fallback(q, k, v, key_padding_mask, attn_bias, causal, scale, window, softcap, alibi_slopes)


@library.register_fake(attention)
def _(q, k, v, key_padding_mask, attn_bias, causal, scale, window=0, softcap=0.0, alibi_slopes=None):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def cached_attention_reference(q, k_cache, v_cache, kv_start, kv_len, scale, window=0, softcap=0.0,
                               alibi_slopes=None):
    """Plain PyTorch: each query (at position p = kv_len - sq + i) sees the cache keys j in [kv_start, p],
    and with a window only j > p - window; soft-cap and ALiBi as in the module docstring."""
    b, _, sq, _ = q.shape
    max_len = k_cache.shape[2]
    keys = torch.arange(max_len, device=q.device)  # (L,)
    query_pos = kv_len[:, None] - sq + torch.arange(sq, device=q.device)[None, :]  # (b, sq)
    visible = (keys[None, None, :] >= kv_start[:, None, None]) & (keys[None, None, :] <= query_pos[:, :, None])
    if window:
        visible = visible & (keys[None, None, :] > query_pos[:, :, None] - window)
    groups = q.shape[1] // k_cache.shape[1]
    k = k_cache.repeat_interleave(groups, dim=1).float()
    v = v_cache.repeat_interleave(groups, dim=1).float()
    scores = (q.float() @ k.transpose(-2, -1)) * scale  # (b, hq, sq, L)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        distance = (keys[None, None, :] - query_pos[:, :, None]).float()  # (b, sq, L)
        scores = scores + alibi_slopes.float()[None, :, None, None] * distance[:, None]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return (probs @ v).to(q.dtype)


_CACHED_ATTENTION_SCHEMA = ("(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_start, Tensor kv_len, float scale, "
                            "int window=0, float softcap=0.0, Tensor? alibi_slopes=None) -> Tensor")


@library.define("cached_attention", _CACHED_ATTENTION_SCHEMA)
def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                     kv_len: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    features = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    if not _kernel_available(q):
        reason = prefill.feature_reason(q.shape[1], q.device, True, **features)
        if reason is not None:
            raise ValueError(f"fxopt cached_attention: {reason}")
        return cached_attention_reference(q, k_cache, v_cache, kv_start, kv_len, scale, **features)
    if q.shape[2] <= DECODE_MAX_QUERIES:
        return decode.decode_attention(q, k_cache, v_cache, kv_len, scale=scale, causal=True, kv_start=kv_start,
                                       **features)
    max_len = k_cache.shape[2]
    keys = torch.arange(max_len, device=q.device)
    valid = (keys[None, :] >= kv_start[:, None]) & (keys[None, :] < kv_len[:, None])  # (b, L)
    return prefill.flash_attention(q, k_cache, v_cache, causal=True, scale=scale, key_padding_mask=valid,
                                   q_offset=kv_len - q.shape[2], **features)


@library.register_fake(cached_attention)
def _(q, k_cache, v_cache, kv_start, kv_len, scale, window=0, softcap=0.0, alibi_slopes=None):
    return q.new_empty(q.shape[:-1] + v_cache.shape[-1:])


@torch.library.custom_op("fxopt::cache_write", mutates_args=("cache",))
def cache_write(cache: torch.Tensor, new: torch.Tensor, pos: torch.Tensor) -> None:
    """cache[:, :, pos:pos + n] = new, with pos a 0-dim device tensor (no host sync: graph-capturable).

    pos may also be the (n,) slot indices themselves (pos + arange(n), computed once per step and shared
    by every layer's writes): then the write is a single kernel (rope.slot_copy; index_copy_ on CPU).
    """
    n = new.shape[2]
    index = pos if pos.dim() == 1 else pos + torch.arange(n, device=cache.device)  # (n,)
    if ops_use_kernels(cache):
        _rope.slot_copy(cache, new, index)  # one Triton kernel (in the decode step's PDL chain on Hopper)
    else:
        cache.index_copy_(2, index, new.to(cache.dtype))


@cache_write.register_fake
def _(cache, new, pos):
    return None
