"""The multi-head attention core shared by every model family.

Each family owns its projections, its positional scheme and the way it spells its mask; the
part in the middle -- ``softmax(q @ k^T * scale + mask) @ v`` -- lives here, in one of two
spellings chosen by the config field ``attn_impl``:

* ``"explicit"``: matmul, scale, mask, softmax, dropout, matmul, written out op by op. This is
  what a graph-rewriting attention pass has to recognise, and the two ways of scaling seen in
  the wild are both kept: GPT-2 divides by ``sqrt(d)`` (``scale_op="div"``), Llama multiplies
  by ``d ** -0.5`` and runs the softmax in fp32 (``scale_op="mul"``, ``upcast_softmax=True``).
* ``"sdpa"``: one call to ``F.scaled_dot_product_attention``; causal self-attention passes
  ``is_causal=True`` and no mask tensor, padding passes an additive ``attn_mask``.

The two spellings compute the same function; the tests use each as the reference for the
other.

Masks come in two forms so that families can keep their own idiom:

* ``masked``: a boolean tensor, True where a key must be hidden (filled with ``-inf``);
* ``bias``: an additive float tensor (0 where visible, a very negative number where hidden).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("explicit", "sdpa")


def check_attn_impl(attn_impl: str) -> None:
    """Raise a clear error for an unknown ``attn_impl`` (called by every config)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")


def causal_tril(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n, n) bool lower-triangular matrix: entry [i, j] is True when query i may see key j."""
    return torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(b, s, h * d) -> (b, h, s, d)."""
    b, s, _ = x.shape
    return x.view(b, s, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, h, s, d) -> (b, s, h * d)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: repeat each K/V head ``n_rep`` times along the head dim.

    (b, h_kv, s, d) -> (b, h_kv * n_rep, s, d), equal to ``x.repeat_interleave(n_rep, dim=1)``
    but spelled as expand + reshape like HF Llama, so the repeat is a view until the reshape.
    """
    if n_rep == 1:
        return x
    b, h_kv, s, d = x.shape
    x = x[:, :, None, :, :].expand(b, h_kv, n_rep, s, d)  # (b, h_kv, n_rep, s, d)
    return x.reshape(b, h_kv * n_rep, s, d)


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive key-padding mask: (b, s_k) of 0/1 -> (b, 1, 1, s_k) of 0 / finfo(dtype).min.

    The most negative finite number rather than -inf, as in HF BERT, so a row whose keys are
    all padding yields a uniform softmax instead of NaN.
    """
    keep = attention_mask[:, None, None, :].to(dtype)  # (b, 1, 1, s_k)
    return (1.0 - keep) * torch.finfo(dtype).min


class AttentionCore(nn.Module):
    """``softmax(q k^T * scale + mask) v`` over (b, h, s, d) tensors, in either spelling.

    Args:
        attn_impl: ``"explicit"`` or ``"sdpa"``.
        head_dim: d, fixes the scale ``1 / sqrt(d)``.
        dropout: attention-probability dropout (identity in eval mode).
        scale_op: explicit spelling only: ``"div"`` (``/ math.sqrt(d)``, GPT-2) or ``"mul"``
            (``* self.scale``, Llama).
        upcast_softmax: explicit spelling only: run the softmax in fp32 and cast back (Llama;
            HF writes ``scores.float()``, here float64 stays float64 so a float64 model remains a
            full-precision reference).
    """

    def __init__(
        self,
        attn_impl: str,
        head_dim: int,
        *,
        dropout: float = 0.0,
        scale_op: str = "div",
        upcast_softmax: bool = False,
    ):
        super().__init__()
        check_attn_impl(attn_impl)
        if scale_op not in ("div", "mul"):
            raise ValueError(f"scale_op must be 'div' or 'mul', got {scale_op!r}")
        self.attn_impl = attn_impl
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.scale_op = scale_op
        self.upcast_softmax = upcast_softmax
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        masked: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q (b, h, s_q, d), k and v (b, h, s_k, d) -> (b, h, s_q, d).

        ``is_causal`` is for the sdpa spelling; the explicit spelling takes the family's own
        causal mask as ``masked``. ``bias`` (additive) works in both.
        """
        if self.attn_impl == "sdpa":
            return self._sdpa(q, k, v, is_causal=is_causal, masked=masked, bias=bias)
        if is_causal:
            raise ValueError("the explicit spelling takes its causal mask as `masked`, not is_causal")
        return self._explicit(q, k, v, masked=masked, bias=bias)

    def _explicit(self, q, k, v, *, masked, bias):
        """The textbook spelling, one ATen op per step."""
        if self.scale_op == "div":
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (b, h, s_q, s_k)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (b, h, s_q, s_k)
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        if bias is not None:
            scores = scores + bias
        if self.upcast_softmax:
            upcast = torch.promote_types(scores.dtype, torch.float32)  # fp32 (fp64 stays fp64)
            probs = F.softmax(scores.to(upcast), dim=-1).to(q.dtype)
        else:
            probs = F.softmax(scores, dim=-1)
        probs = self.dropout(probs)
        return probs @ v  # (b, h, s_q, d)

    def _sdpa(self, q, k, v, *, is_causal, masked, bias):
        """One fused call; a boolean ``masked`` is turned into sdpa's keep-mask convention."""
        if masked is not None and bias is not None:
            raise ValueError("pass either `masked` or `bias` to the sdpa spelling, not both")
        attn_mask = ~masked if masked is not None else bias
        dropout_p = self.dropout.p if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale
        )
