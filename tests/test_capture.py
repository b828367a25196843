"""Capture: symbolic dims named by role, every preset and HF model, and export failures explained."""

import pytest
import sympy
import torch
from torch import nn

from fxopt import models, zoo
from fxopt.capture import CaptureError, capture, role_symbol

B, S = role_symbol("batch"), role_symbol("seq")


def _symbols_in_graph(captured) -> set:
    found = set()
    for node in captured.gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for expr in captured.shape(val):
                found |= sympy.sympify(expr).free_symbols
    return found


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny", "transformer-tiny"])
def test_presets_capture_with_batch_and_seq_symbolic(name):
    model = models.build(name)
    captured = capture(model, model.example_inputs(2, 12))
    symbols = _symbols_in_graph(captured)
    assert B in symbols and S in symbols
    logits = [n for n in captured.gm.graph.nodes if n.op == "output"][0].args[0]
    out = logits[0] if isinstance(logits, (list, tuple)) else logits
    assert captured.shape(out.meta["val"])[:2] == (B, S)
    # the captured graph runs at other sizes than it was captured at, and matches eager
    other = model.example_inputs(3, 7)
    torch.testing.assert_close(captured.gm(**other), model(**other))


HF = ["hf:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=512",
      "hf:llama,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
      "num_key_value_heads=2,vocab_size=512",
      "hf:bert,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,vocab_size=512"]


@pytest.mark.parametrize("spec", HF)
def test_hf_models_capture_with_named_dims(spec):
    pytest.importorskip("transformers")
    model = zoo.load_model(spec)
    captured = capture(model, zoo.example_inputs(model, 2, 12))
    symbols = _symbols_in_graph(captured)
    assert {B, S} <= symbols


class DataDependentBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on tensor values: export cannot trace it
            return x * 2
        return x - 1


def test_export_failure_names_the_construct_and_the_fix():
    with pytest.raises(CaptureError) as info:
        capture(DataDependentBranch(), {"x": torch.randn(2, 8)})
    message = str(info.value)
    assert "test_capture.py" in message and "x.sum() > 0" in message
    assert "torch.cond" in message or "tensor ops" in message


def test_meta_device_capture_needs_no_weights():
    model = models.build("llama-70b-like", device="meta", n_layers=1)
    captured = capture(model, model.example_inputs(2, 16, device="meta"))
    assert any(n.op == "call_function" for n in captured.gm.graph.nodes)


def test_source_lines_off_leaves_the_same_graph_without_stack_traces():
    model = models.build("gpt2-tiny")
    kwargs = zoo.example_inputs(model, 2, 8)
    with_lines = capture(model, kwargs).gm.graph
    without = capture(model, kwargs, source_lines=False).gm.graph

    def ops(graph):
        return [(n.op, str(n.target)) for n in graph.nodes]

    assert ops(without) == ops(with_lines)
    traced = [n for n in with_lines.nodes if n.op == "call_function"]
    assert sum("gpt.py" in (n.meta.get("stack_trace") or "") for n in traced) > len(traced) // 2
    assert not any("gpt.py" in (n.meta.get("stack_trace") or "") for n in without.nodes)
    again = capture(model, kwargs).gm.graph  # the switch is restored: traces are recorded again
    assert any("gpt.py" in (n.meta.get("stack_trace") or "") for n in again.nodes)


class _LiteralBatch(torch.nn.Module):
    """Builds a mask with the example's literal batch size (annotated-transformer style)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x) * torch.ones(2, x.shape[1], 8)


def test_a_dim_the_model_pins_is_named_at_capture_and_at_call():
    import warnings

    import fxopt

    model = _LiteralBatch().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fxopt.optimize(model, {"x": torch.randn(2, 5, 8)})
    assert any("`x` dim 0 (batch) at 2 was captured static" in str(w.message) for w in caught)
    x = torch.randn(2, 7, 8)  # the sequence dim stayed dynamic
    torch.testing.assert_close(fast(x=x), model(x))
    with pytest.raises(ValueError, match="`x` dim 0 is 3"):
        fast(x=torch.randn(3, 5, 8))


def _decoder_params(*, vocab, d, layers, heads, kv_heads, head_dim, ff, qkv_bias=False, qk_norm=False,
                    tied=True) -> int:
    """Parameters of a Llama-family decoder from its published sizes: embedding, per layer q/k/v/o, gated MLP
    (3 matrices), 2 RMSNorms (+ q/k bias, + per-head q/k norms), final norm, lm_head unless tied."""
    q, kv = heads * head_dim, kv_heads * head_dim
    layer = d * q + 2 * d * kv + q * d + 3 * d * ff + 2 * d
    layer += (q + 2 * kv) if qkv_bias else 0
    layer += 2 * head_dim if qk_norm else 0
    return vocab * d + layers * layer + d + (0 if tied else vocab * d)


# The published sizes of the checkpoints HF_CONFIGS names (their config.json), through the architecture's formula
PUBLISHED_PARAMS = {
    "llama-3.2-1b": _decoder_params(vocab=128256, d=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ff=8192),
    "mistral-7b": _decoder_params(vocab=32768, d=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ff=14336,
                                  tied=False),
    "qwen2.5-0.5b": _decoder_params(vocab=151936, d=896, layers=24, heads=14, kv_heads=2, head_dim=64, ff=4864,
                                    qkv_bias=True),
    "qwen3-0.6b": _decoder_params(vocab=151936, d=1024, layers=28, heads=16, kv_heads=8, head_dim=128, ff=3072,
                                  qk_norm=True),
    # GPT-2: token + 1024 position rows, per layer 12 d^2 + 13 d (4 matrices, their biases, 2 LayerNorms), final LN
    "gpt2-medium": 50257 * 1024 + 1024 * 1024 + 24 * (12 * 1024**2 + 13 * 1024) + 2 * 1024,
    # GPT-NeoX: the same 12 d^2 + 13 d per layer (fused qkv, dense, 4d MLP, 2 LayerNorms), untied head
    "pythia-410m": 2 * 50304 * 1024 + 24 * (12 * 1024**2 + 13 * 1024) + 2 * 1024,
    # StableLM 2: q/k/v/o with q/k/v biases, a gated MLP of 5632, 2 LayerNorms per layer, untied head
    "stablelm-2-1.6b": 2 * 100352 * 2048 + 24 * (4 * 2048**2 + 3 * 2048 + 3 * 2048 * 5632 + 4 * 2048) + 2 * 2048,
    # Phi-2: q/k/v/dense and fc1/fc2 with biases, one LayerNorm per layer, untied head with a bias
    "phi-2": 2 * 51200 * 2560 + 51200 + 32 * (4 * 2560**2 + 4 * 2560 + 2 * 2560 * 10240 + 10240 + 2560 + 2 * 2560)
    + 2 * 2560,
}


@pytest.mark.parametrize("name", sorted(zoo.HF_CONFIGS))
def test_named_hf_configs_have_the_published_sizes(name):
    pytest.importorskip("transformers")
    model = zoo.load_model(f"hf:{name}", device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_named_hf_config_fields_can_be_overridden():
    pytest.importorskip("transformers")
    model = zoo.load_model("hf:llama-3.2-1b,num_hidden_layers=1,vocab_size=256", device="meta")
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == 256
    assert model.config.hidden_size == 2048  # the named architecture's other fields stay
