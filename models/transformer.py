"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

Sinusoidal positions, embeddings scaled by sqrt(d_model), post-LayerNorm sublayers, ReLU
feed-forward, one embedding matrix shared by source, target and the output projection. The
decoder's self-attention is causal; its cross-attention reads the encoder output under the
source padding mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .attention import (
    AttentionCore,
    causal_tril,
    check_attn_impl,
    merge_heads,
    padding_bias,
    split_heads,
)
from .inputs import padding_mask, random_token_ids


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the encoder-decoder Transformer (defaults: the paper's base model)."""

    vocab_size: int = 37000
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    max_positions: int = 1024
    dropout: float = 0.1
    attn_impl: str = "sdpa"

    def __post_init__(self):
        check_attn_impl(self.attn_impl)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def sinusoidal_table(
    n_positions: int, d_model: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(n_positions, d_model) float64: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = torch.arange(n_positions, dtype=torch.float64, device=device)[:, None]  # (n, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64, device=device) / d_model)
    angles = pos * inv_freq  # (n, d / 2)
    table = torch.empty(n_positions, d_model, dtype=torch.float64, device=device)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()
    return table


class MultiHeadAttention(nn.Module):
    """Queries from ``x``, keys and values from ``memory`` (``x`` itself for self-attention)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.core = AttentionCore(config.attn_impl, config.head_dim, dropout=config.dropout, scale_op="div")

    def forward(self, x: torch.Tensor, memory: torch.Tensor, **mask) -> torch.Tensor:
        """x (b, s_q, d), memory (b, s_k, d) -> (b, s_q, d); ``mask`` goes to AttentionCore."""
        q = split_heads(self.q_proj(x), self.n_heads)  # (b, h, s_q, hd)
        k = split_heads(self.k_proj(memory), self.n_heads)  # (b, h, s_k, hd)
        v = split_heads(self.v_proj(memory), self.n_heads)  # (b, h, s_k, hd)
        return self.out_proj(merge_heads(self.core(q, k, v, **mask)))


class FeedForward(nn.Module):
    """d -> d_ff -> ReLU -> d."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.linear1 = nn.Linear(config.d_model, config.d_ff)
        self.linear2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(torch.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm: x = LN(x + self_attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, src_bias: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, x, bias=src_bias)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm: causal self-attention, cross-attention over the encoder output, ffn."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.cross_attn = MultiHeadAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.norm3 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, memory, src_bias, causal_mask: torch.Tensor | None) -> torch.Tensor:
        """causal_mask: (s, s) bool, True where hidden (explicit spelling) or None (sdpa)."""
        if causal_mask is None:
            attn = self.self_attn(x, x, is_causal=True)
        else:
            attn = self.self_attn(x, x, masked=causal_mask)
        x = self.norm1(x + self.dropout(attn))
        x = self.norm2(x + self.dropout(self.cross_attn(x, memory, bias=src_bias)))
        return self.norm3(x + self.dropout(self.ffn(x)))


class Transformer(nn.Module):
    """forward(src_ids (b, s_src), tgt_ids (b, s), src_mask (b, s_src) 0/1) -> logits (b, s, vocab)."""

    is_causal_lm = False

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed_scale = math.sqrt(config.d_model)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        table = sinusoidal_table(config.max_positions, config.d_model)
        self.register_buffer("pos_table", table.float(), persistent=False)  # (max_positions, d)
        self.register_buffer("causal", causal_tril(config.max_positions), persistent=False)  # (n, n)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output projection (re-done by ``build`` after ``to_empty``)."""
        self.lm_head.weight = self.embed.weight

    def reset_buffers(self) -> None:
        """Recompute positions and mask (after ``to_empty``), keeping each buffer's device and dtype."""
        device = self.pos_table.device
        table = sinusoidal_table(self.config.max_positions, self.config.d_model, device=device)
        self.pos_table = table.to(self.pos_table.dtype)
        self.causal = causal_tril(self.config.max_positions, device=device)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, s) -> (b, s, d): scaled token embedding plus sinusoidal position."""
        s = ids.shape[1]
        return self.dropout(self.embed(ids) * self.embed_scale + self.pos_table[:s])

    def encode(self, src_ids: torch.Tensor, src_bias: torch.Tensor) -> torch.Tensor:
        """(b, s_src) -> encoder output (b, s_src, d)."""
        x = self.embed_tokens(src_ids)
        for layer in self.encoder_layers:
            x = layer(x, src_bias)
        return x

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_bias: torch.Tensor) -> torch.Tensor:
        """(b, s) target ids and the encoder output -> decoder output (b, s, d)."""
        s = tgt_ids.shape[1]
        causal_mask = None if self.config.attn_impl == "sdpa" else self.causal[:s, :s] == 0  # (s, s)
        x = self.embed_tokens(tgt_ids)
        for layer in self.decoder_layers:
            x = layer(x, memory, src_bias, causal_mask)
        return x

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        src_bias = padding_bias(src_mask, self.embed.weight.dtype)  # (b, 1, 1, s_src)
        memory = self.encode(src_ids, src_bias)  # (b, s_src, d)
        return self.lm_head(self.decode(tgt_ids, memory, src_bias))  # (b, s, vocab)

    def example_inputs(
        self, batch: int, seq: int, *, device: torch.device | str | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random source and target ids, both of length ``seq``, and a right-padded source mask."""
        device = device if device is not None else self.embed.weight.device
        vocab = self.config.vocab_size
        return {
            "src_ids": random_token_ids(batch, seq, vocab, seed=seed, device=device),
            "tgt_ids": random_token_ids(batch, seq, vocab, seed=seed + 1, device=device),
            "src_mask": padding_mask(batch, seq, device=device),
        }

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """Each input's dynamic dims named by role."""
        return {
            "src_ids": {0: "batch", 1: "src_seq"},
            "tgt_ids": {0: "batch", 1: "seq"},
            "src_mask": {0: "batch", 1: "src_seq"},
        }


PRESETS = {
    "transformer-base": TransformerConfig(),
    "transformer-tiny": TransformerConfig(
        vocab_size=512,
        d_model=64,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=128,
        max_positions=128,
    ),
}
