"""BERT-style bidirectional encoder.

Word + learned position + token-type embeddings and a LayerNorm, then post-LayerNorm layers
(self-attention with an additive padding mask, exact-GELU feed-forward). Returns the last
hidden states; no pooler, no task head. Bidirectional, so not a model fxopt may add a KV cache
to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionCore, check_attn_impl, merge_heads, padding_bias, split_heads
from .inputs import padding_mask, random_token_ids


@dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT-style encoder (defaults: BERT-base)."""

    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    layer_norm_eps: float = 1e-12
    attn_impl: str = "sdpa"

    def __post_init__(self):
        check_attn_impl(self.attn_impl)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class BertEmbeddings(nn.Module):
    """word(ids) + position(arange(s)) + token_type(zeros), then LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embeddings = nn.Embedding(config.max_positions, config.d_model)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.d_model)
        self.LayerNorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device)  # (s,)
        token_type = torch.zeros_like(input_ids)  # (b, s): one segment
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        x = x + self.token_type_embeddings(token_type)  # (b, s, d)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """q/k/v projections, bidirectional attention under a padding mask, output projection."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key = nn.Linear(config.d_model, config.d_model)
        self.value = nn.Linear(config.d_model, config.d_model)
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.core = AttentionCore(config.attn_impl, config.head_dim, scale_op="div")

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (b, s, d), bias (b, 1, 1, s) additive -> (b, s, d)."""
        q = split_heads(self.query(x), self.n_heads)  # (b, h, s, hd)
        k = split_heads(self.key(x), self.n_heads)
        v = split_heads(self.value(x), self.n_heads)
        return self.dense(merge_heads(self.core(q, k, v, bias=bias)))


class BertLayer(nn.Module):
    """Post-LayerNorm: x = LN(x + attn(x)); x = LN(x + ffn(x)), with an exact-GELU ffn."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.d_model, config.d_ff)
        self.act = nn.GELU()
        self.output = nn.Linear(config.d_ff, config.d_model)
        self.output_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, bias))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class Bert(nn.Module):
    """BERT-style encoder: forward(input_ids (b, s), attention_mask (b, s) 0/1) -> (b, s, d)."""

    is_causal_lm = False

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.n_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (b, s, d)
        bias = padding_bias(attention_mask, x.dtype)  # (b, 1, 1, s)
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def example_inputs(
        self, batch: int, seq: int, *, device: torch.device | str | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random ``input_ids`` and a right-padded ``attention_mask`` (row 0 unpadded)."""
        device = device if device is not None else self.embeddings.word_embeddings.weight.device
        return {
            "input_ids": random_token_ids(batch, seq, self.config.vocab_size, seed=seed, device=device),
            "attention_mask": padding_mask(batch, seq, device=device),
        }

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """Each input's dynamic dims named by role."""
        return {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


PRESETS = {
    "bert-base": BertConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    "bert-tiny": BertConfig(vocab_size=512, max_positions=128, d_model=64, n_layers=2, n_heads=4, d_ff=128),
}
