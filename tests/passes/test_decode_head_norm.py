"""Per-head q/k RMSNorm (Qwen3's q_norm and k_norm) folded into the decode step's q/k/v GEMV (CPU, fp32).

HF Qwen3 built from a tiny config with random weights. Greedy tokens and each step's logits are compared with
an eager loop over the whole sequence (the cache-less HF model), never with another fxopt program.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_decode_folds import assert_greedy_and_step_logits, count, fused_generator, prompt, recompute, spread

from fxopt.nodes import fetch_attr

aten = torch.ops.aten
QKV = torch.ops.fxopt.gemv_qkv.default
LAYERS, NEW = 2, 10
HF_QWEN3 = (f"hf:qwen3,num_hidden_layers={LAYERS},hidden_size=64,num_attention_heads=4,num_key_value_heads=2,"
            "head_dim=16,intermediate_size=128,vocab_size=256")
LEFT_BY_THE_FOLD = (torch.ops.fxopt.rope.default, torch.ops.fxopt.rope_cache_write.default,
                    torch.ops.fxopt.cache_write.default, aten.rsqrt.default, aten.pow.Tensor_Scalar)

pytestmark = pytest.mark.usefixtures("one_thread")


def qwen3():
    pytest.importorskip("transformers")
    from fxopt.zoo import load_model

    model = spread(load_model(HF_QWEN3)).eval()
    return model, lambda ids: model(ids, use_cache=False).logits, model.config.vocab_size



def test_qwen3_head_norms_fold_into_gemv_qkv():
    """Each layer's q/k/v projection is one gemv_qkv carrying q_norm's and k_norm's weights; no RoPE kernel,
    cache write or RMSNorm node is left (the layer norms are GEMV prologues, the head norms gemv_qkv's)."""
    model, _, vocab = qwen3()
    gen = fused_generator(model, vocab)
    program = gen.decode_program(1)
    qkv = [n for n in program.graph.nodes if n.target == QKV]
    assert len(qkv) == LAYERS
    layers = model.model.layers
    for node, layer in zip(qkv, layers):
        for key, norm in (("q_norm_weight", layer.self_attn.q_norm), ("k_norm_weight", layer.self_attn.k_norm)):
            weight = node.kwargs[key]
            assert torch.equal(fetch_attr(program, weight.target), norm.weight)
        assert node.kwargs["qk_eps"] == layers[0].self_attn.q_norm.variance_epsilon
    assert {t: count(program, t) for t in LEFT_BY_THE_FOLD} == dict.fromkeys(LEFT_BY_THE_FOLD, 0)


def test_qwen3_fold_keeps_greedy_tokens_and_logits():
    model, logits_fn, vocab = qwen3()
    gen = fused_generator(model, vocab)
    ids = prompt(vocab)
    assert_greedy_and_step_logits(gen, logits_fn, ids, NEW)
    assert count(gen.decode_program(1), QKV) == LAYERS  # the folded program is what ran


def test_qwen3_fold_through_interpreted_kernels(monkeypatch):
    """The same through the Triton kernels (FXOPT_INTERPRET_OPS=1): one program per head normalises it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter test (tests/gpu runs the kernels on the GPU)")
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1")
    model, logits_fn, vocab = qwen3()
    gen = fused_generator(model, vocab)
    ids = prompt(vocab)
    assert torch.equal(gen.generate(ids, 6), recompute(logits_fn, ids, 6))
