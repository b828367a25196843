"""Llama-style decoder-only language model.

Rotary position embeddings (RoPE, HF's rotate_half convention) from precomputed cos/sin
tables, RMSNorm in fp32, grouped-query attention through ``repeat_kv``, a SwiGLU MLP, no
biases anywhere and an untied lm_head -- the layout of HF's LlamaForCausalLM, without a KV
cache (fxopt inserts one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionCore, check_attn_impl, merge_heads, repeat_kv, split_heads
from .inputs import random_token_ids


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-style model (defaults: the 7B shape)."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    d_ff: int = 11008
    max_positions: int = 8192
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    attn_impl: str = "sdpa"

    def __post_init__(self):
        check_attn_impl(self.attn_impl)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rope_tables(
    n_positions: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (n_positions, head_dim), computed in float64.

    Row p holds angles ``p * theta ** (-2i / head_dim)`` for i < head_dim / 2, repeated twice
    (``cat(freqs, freqs)``) to pair with ``rotate_half``.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    pos = torch.arange(n_positions, dtype=torch.float64, device=device)
    freqs = torch.outer(pos, inv_freq)  # (n, hd / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (b, h, s, hd) by position; cos and sin are (s, hd), broadcast over b and h."""
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back to x's dtype.

    Like HF's ``x.float()`` ... ``.to(dtype)``, except that a float64 input stays float64 (a
    float64 model is a numerics reference and must not round through fp32).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 (fp64 stays fp64)
        variance = x.pow(2).mean(-1, keepdim=True)  # (..., 1)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


class LlamaAttention(nn.Module):
    """Separate q/k/v/o projections, RoPE on q and k, GQA via ``repeat_kv``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hd = config.head_dim
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.q_proj = nn.Linear(config.d_model, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hd, config.d_model, bias=False)
        self.core = AttentionCore(config.attn_impl, hd, scale_op="mul", upcast_softmax=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (b, s, d), cos/sin (s, hd), causal_mask (s, s) bool or None (sdpa) -> (b, s, d)."""
        q = split_heads(self.q_proj(x), self.n_heads)  # (b, h, s, hd)
        k = split_heads(self.k_proj(x), self.n_kv_heads)  # (b, h_kv, s, hd)
        v = split_heads(self.v_proj(x), self.n_kv_heads)  # (b, h_kv, s, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (b, h, s, hd)
        if causal_mask is None:
            y = self.core(q, k, v, is_causal=True)
        else:
            y = self.core(q, k, v, masked=causal_mask)
        return self.o_proj(merge_heads(y))  # (b, s, d)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.rms_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, causal_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, causal_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-style causal LM: forward(input_ids (b, s) int64) -> logits (b, s, vocab)."""

    is_causal_lm = True

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.max_positions, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos.float(), persistent=False)  # (max_positions, hd)
        self.register_buffer("rope_sin", sin.float(), persistent=False)  # (max_positions, hd)

    def reset_buffers(self) -> None:
        """Recompute the RoPE tables (after ``to_empty``), keeping the buffers' device and dtype."""
        cfg = self.config
        cos, sin = rope_tables(cfg.max_positions, cfg.head_dim, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos = cos.to(self.rope_cos.dtype)
        self.rope_sin = sin.to(self.rope_sin.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.embed_tokens(input_ids)  # (b, s, d)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]  # (s, hd)
        causal_mask = None
        if self.config.attn_impl == "explicit":
            idx = torch.arange(s, device=input_ids.device)
            causal_mask = idx[None, :] > idx[:, None]  # (s, s), True above the diagonal: hidden
        for layer in self.layers:
            x = layer(x, cos, sin, causal_mask)
        return self.lm_head(self.norm(x))  # (b, s, vocab)

    def example_inputs(
        self, batch: int, seq: int, *, device: torch.device | str | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random ``input_ids`` (batch, seq) on the model's device unless told otherwise."""
        device = device if device is not None else self.embed_tokens.weight.device
        return {"input_ids": random_token_ids(batch, seq, self.config.vocab_size, seed=seed, device=device)}

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """Each input's dynamic dims named by role."""
        return {"input_ids": {0: "batch", 1: "seq"}}


PRESETS = {
    "llama-1b-like": LlamaConfig(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=5632),
    "llama-7b-like": LlamaConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008),
    "llama-70b-like": LlamaConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672),
    "llama-tiny": LlamaConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176, max_positions=256
    ),
}
