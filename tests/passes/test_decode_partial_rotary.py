"""Partial rotary (GPT-NeoX, StableLM, Phi, GPT-J's adjacent pairs before the head transpose) and GPT-NeoX's
per-head [q_h; k_h; v_h] projection rows folded into the decode step's q/k/v GEMV (CPU, fp32). Phi's q/k/v
share a GEMV with fc1 (parallel attention and MLP over one LayerNorm): the decode rules split it into row views
of the same weight.

HF models built from tiny configs with random weights. Greedy tokens and each step's logits are compared with
an eager loop over the whole sequence (the cache-less HF model), never with another fxopt program.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_decode_folds import assert_greedy_and_step_logits, count, fused_generator, prompt, recompute, spread

aten = torch.ops.aten
QKV = torch.ops.fxopt.gemv_qkv.default
LAYERS, NEW = 2, 10
ARCHS = {  # spec, whether W's rows are grouped per head as [q_h; k_h; v_h]
    "gpt_neox": (f"hf:gpt_neox,num_hidden_layers={LAYERS},hidden_size=64,num_attention_heads=4,"
                 "intermediate_size=128,vocab_size=256,rotary_pct=0.25", True),
    "stablelm": (f"hf:stablelm,num_hidden_layers={LAYERS},hidden_size=64,num_attention_heads=4,"
                 "num_key_value_heads=2,intermediate_size=128,vocab_size=256,partial_rotary_factor=0.25", False),
    "phi": (f"hf:phi,num_hidden_layers={LAYERS},hidden_size=64,num_attention_heads=4,intermediate_size=128,"
            "vocab_size=256,partial_rotary_factor=0.25", False),
    # GPT-J: rotate_every_two's adjacent pairs, applied before the head transpose
    "gptj": (f"hf:gptj,n_layer={LAYERS},n_embd=64,n_head=4,rotary_dim=4,vocab_size=256,n_positions=128", False),
}
LEFT_BY_THE_FOLD = (torch.ops.fxopt.rope.default, torch.ops.fxopt.rope_cache_write.default,
                    torch.ops.fxopt.cache_write.default, aten.cat.default, aten.chunk.default)

pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch: str):
    pytest.importorskip("transformers")
    from fxopt.zoo import load_model

    model = spread(load_model(ARCHS[arch][0])).eval()
    return model, lambda ids: model(ids, use_cache=False).logits, model.config.vocab_size



@pytest.mark.parametrize("arch", list(ARCHS))
def test_partial_rotary_folds_into_gemv_qkv(arch):
    """Each layer's q/k/v projection is one gemv_qkv whose RoPE tables cover a quarter of the head; no RoPE
    kernel, cache write, cat or chunk is left in the batch-1 step."""
    model, _, vocab = build(arch)
    gen = fused_generator(model, vocab)
    program = gen.decode_program(1)
    qkv = [n for n in program.graph.nodes if n.target == QKV]
    assert len(qkv) == LAYERS
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for node in qkv:
        cos = node.args[5].meta["val"]
        assert cos.shape[-1] == head_dim // 4  # partial: the tables' columns, not the head's
        assert node.kwargs.get("interleaved", False) == ARCHS[arch][1]
        assert node.kwargs.get("adjacent", False) == (arch == "gptj")
    assert {t: count(program, t) for t in LEFT_BY_THE_FOLD} == dict.fromkeys(LEFT_BY_THE_FOLD, 0)
    if arch != "stablelm":  # parallel residual: mlp + attn + x are fc2's two residual epilogues
        adds = [n for n in program.graph.nodes if n.target == aten.add.Tensor and any(
            isinstance(a, torch.fx.Node) and a.target == torch.ops.fxopt.gemv.default for a in n.args)]
        assert adds == []
        fc2 = [n for n in program.graph.nodes if n.target == torch.ops.fxopt.gemv.default and len(n.args) > 10
               and n.args[10] is not None]
        assert len(fc2) == LAYERS


def test_phi_merged_projection_is_split_into_views_of_one_weight():
    """Phi: gemv_qkv and fc1's GEMV read row views of the one weight fuse_siblings concatenated (no copy); the
    shared LayerNorm is both GEMVs' prologue and fc1's GELU its epilogue: four GEMV-family kernels a layer and
    no LayerNorm or GELU node."""
    model, _, vocab = build("phi")
    program = fused_generator(model, vocab).decode_program(1)
    gemv, views = torch.ops.fxopt.gemv.default, aten.slice.Tensor
    for qkv in [n for n in program.graph.nodes if n.target == QKV]:
        weight = qkv.args[1]
        assert weight.target is views and weight.args[1:3] == (0, 0)
        siblings = [u for u in weight.args[0].users if u is not weight]
        assert len(siblings) == 1 and siblings[0].args[2] == weight.args[3]  # fc1: the rows after q/k/v
        fc1 = [u for u in siblings[0].users if u.target == gemv]
        assert len(fc1) == 1 and fc1[0].args[9] != "none" and fc1[0].args[8]  # GELU epilogue, LayerNorm prologue
        assert qkv.kwargs.get("layer_norm") and qkv.args[3] is fc1[0].args[4]  # the same norm weight
    assert count(program, gemv) == 3 * LAYERS + 1  # fc1, dense, fc2 per layer, and the lm_head
    assert count(program, aten.native_layer_norm.default) == count(program, aten.layer_norm.default) == 0
    assert count(program, aten.gelu.default) == count(program, aten.tanh.default) == 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_partial_rotary_fold_keeps_greedy_tokens_and_logits(arch):
    model, logits_fn, vocab = build(arch)
    gen = fused_generator(model, vocab)
    ids = prompt(vocab)
    expected = assert_greedy_and_step_logits(gen, logits_fn, ids, NEW)
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 2  # not one repeated token: the test can tell
    assert count(gen.decode_program(1), QKV) == LAYERS  # the folded program is what ran


@pytest.mark.parametrize("arch", list(ARCHS))
def test_partial_rotary_fold_through_interpreted_kernels(arch, monkeypatch):
    """The same through the Triton kernels (FXOPT_INTERPRET_OPS=1): pairs past the rotated columns pass."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter test (tests/gpu runs the kernels on the GPU)")
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1")
    model, logits_fn, vocab = build(arch)
    gen = fused_generator(model, vocab)
    ids = prompt(vocab)
    assert torch.equal(gen.generate(ids, 6), recompute(logits_fn, ids, 6))
