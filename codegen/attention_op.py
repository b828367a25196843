"""fxopt's attention ops: what the attention and KV-cache passes put into graphs.

Each op is a torch.library custom op, so it has a schema, a fake (meta) implementation for
symbolic shapes, and one eager implementation that picks a kernel by shape:

    fxopt::attention(q, k, v, key_padding_mask?, attn_bias?, causal, scale)
        prefill / general attention; FlashAttention kernel when it supports the case, else SDPA.
    fxopt::cached_attention(q, k_cache, v_cache, kv_start, kv_len, scale)
        causal attention of the newest sq tokens over a static cache: Flash-Decoding for sq <= 16.
    fxopt::cache_write(cache, new, pos)
        writes new K/V rows into a static cache at positions [pos, pos + n), in place (pos: a 0-dim
        start, or the (n,) slot indices).

Shapes: q (b, hq, sq, d); k, v (b, hkv, skv, d) with hq % hkv == 0 (GQA is never materialised);
caches (b, hkv, max_len, d). kv_start / kv_len are (b,) device int tensors: row b's valid keys are
[kv_start[b], kv_len[b]) (left padding puts kv_start > 0), and its newest query sits at kv_len[b] - 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxopt.codegen import flash_attention as prefill
from fxopt.codegen import flash_decoding as decode
from fxopt.codegen import rope as _rope  # noqa: F401 - fxopt::rope and rope_cache_write exist wherever these do
from fxopt.codegen.loader import ops_use_kernels

DECODE_MAX_QUERIES = 16


def _kernel_available(t: torch.Tensor) -> bool:
    """loader.ops_use_kernels, and the prefill kernel's own interpreter check."""
    return t.is_cuda or (ops_use_kernels(t) and prefill._use_kernel(t))


def sdpa_fallback(q, k, v, key_padding_mask, attn_bias, causal: bool, scale: float) -> torch.Tensor:
    """PyTorch SDPA with GQA repeated explicitly: the path for cases the kernels do not cover.

    Causal is top-left aligned (query i sees keys j <= i), as SDPA's is_causal and the flash kernel
    with q_offset=0; padding and causal masks are folded into one boolean mask when both are given.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
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


def kernel_choice(q, k, v, key_padding_mask=None, attn_bias=None, causal=False, scale=None) -> tuple[str, str]:
    """(kernel, reason): 'flash' when the FlashAttention kernel covers the case, else 'sdpa' and why."""
    if attn_bias is not None:
        return "sdpa", "general additive mask"
    reason = prefill.supports(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    return ("flash", "") if reason is None else ("sdpa", reason)


@torch.library.custom_op("fxopt::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
              attn_bias: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    kernel, _ = kernel_choice(q, k, v, key_padding_mask, attn_bias, causal, scale)
    if kernel == "flash" and _kernel_available(q):
        return prefill.flash_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    return sdpa_fallback(q, k, v, key_padding_mask, attn_bias, causal, scale)


@attention.register_fake
def _(q, k, v, key_padding_mask, attn_bias, causal, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def cached_attention_reference(q, k_cache, v_cache, kv_start, kv_len, scale):
    """Plain PyTorch: each query sees the cache keys in [kv_start, its own position]."""
    b, _, sq, _ = q.shape
    max_len = k_cache.shape[2]
    keys = torch.arange(max_len, device=q.device)  # (L,)
    query_pos = kv_len[:, None] - sq + torch.arange(sq, device=q.device)[None, :]  # (b, sq)
    visible = (keys[None, None, :] >= kv_start[:, None, None]) & (keys[None, None, :] <= query_pos[:, :, None])
    groups = q.shape[1] // k_cache.shape[1]
    k = k_cache.repeat_interleave(groups, dim=1).float()
    v = v_cache.repeat_interleave(groups, dim=1).float()
    scores = (q.float() @ k.transpose(-2, -1)) * scale  # (b, hq, sq, L)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return (probs @ v).to(q.dtype)


@torch.library.custom_op("fxopt::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                     kv_len: torch.Tensor, scale: float) -> torch.Tensor:
    if not _kernel_available(q):
        return cached_attention_reference(q, k_cache, v_cache, kv_start, kv_len, scale)
    if q.shape[2] <= DECODE_MAX_QUERIES:
        return decode.decode_attention(q, k_cache, v_cache, kv_len, scale=scale, causal=True, kv_start=kv_start)
    max_len = k_cache.shape[2]
    keys = torch.arange(max_len, device=q.device)
    valid = (keys[None, :] >= kv_start[:, None]) & (keys[None, :] < kv_len[:, None])  # (b, L)
    return prefill.flash_attention(q, k_cache, v_cache, causal=True, scale=scale, key_padding_mask=valid,
                                   q_offset=kv_len - q.shape[2])


@cached_attention.register_fake
def _(q, k_cache, v_cache, kv_start, kv_len, scale):
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
