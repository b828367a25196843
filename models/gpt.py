"""GPT-2-style decoder-only language model.

Learned absolute positions, pre-LayerNorm blocks, one fused qkv projection (``c_attn``), a
GELU(tanh) MLP, a final LayerNorm and an lm_head tied to the token embedding -- the layout of
HF's GPT2LMHeadModel and nanoGPT, written without a KV cache (fxopt inserts one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionCore, causal_tril, check_attn_impl, merge_heads, split_heads
from .inputs import random_token_ids


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPT-2-style model (defaults: GPT-2 small)."""

    vocab_size: int = 50257
    max_positions: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_impl: str = "sdpa"
    tie_embeddings: bool = True

    def __post_init__(self):
        check_attn_impl(self.attn_impl)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class CausalSelfAttention(nn.Module):
    """Fused qkv projection, causal attention, output projection.

    The explicit spelling masks with a registered ``tril`` buffer sliced ``[:s, :s]`` (the
    GPT-2 idiom); the sdpa spelling uses ``is_causal=True``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.core = AttentionCore(config.attn_impl, config.head_dim, dropout=config.dropout, scale_op="div")
        self.resid_dropout = nn.Dropout(config.dropout)
        self.register_buffer("causal", causal_tril(config.max_positions), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the mask buffer in place of uninitialised memory (after ``to_empty``)."""
        self.causal = causal_tril(self.causal.shape[0], device=self.causal.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, s, d) -> (b, s, d)."""
        s = x.shape[1]
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)  # 3 x (b, s, d)
        q, k, v = (split_heads(t, self.n_heads) for t in (q, k, v))  # (b, h, s, hd)
        if self.core.attn_impl == "sdpa":
            y = self.core(q, k, v, is_causal=True)
        else:
            mask = self.causal[:s, :s]  # (s, s)
            y = self.core(q, k, v, masked=mask == 0)
        y = merge_heads(y)  # (b, s, d)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """d -> mlp_ratio * d -> GELU(tanh) -> d."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-style causal LM: forward(input_ids (b, s) int64) -> logits (b, s, vocab)."""

    is_causal_lm = True

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_positions, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the lm_head (re-done by ``build`` after ``to_empty``)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device)  # (s,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (b, s, d)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (b, s, vocab)

    def example_inputs(
        self, batch: int, seq: int, *, device: torch.device | str | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random ``input_ids`` (batch, seq) on the model's device unless told otherwise."""
        device = device if device is not None else self.wte.weight.device
        return {"input_ids": random_token_ids(batch, seq, self.config.vocab_size, seed=seed, device=device)}

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """Each input's dynamic dims named by role."""
        return {"input_ids": {0: "batch", 1: "seq"}}


PRESETS = {
    "gpt2-small": GPTConfig(d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(d_model=1280, n_layers=36, n_heads=20),
    "gpt2-tiny": GPTConfig(vocab_size=512, max_positions=128, d_model=64, n_layers=2, n_heads=4),
}
