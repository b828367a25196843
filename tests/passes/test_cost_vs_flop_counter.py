"""Matmul FLOPs from the cost pass equal torch.utils.flop_counter.FlopCounterMode's."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fxopt import models, zoo
from fxopt.analyze import analyze

BATCH, SEQ = 2, 48
# Full width, reduced depth: every layer of a preset has the same matmuls, so two layers check the formulas.
PRESET_OVERRIDES = {name: {"n_layers": 2} for name in models.PRESETS if "layers" not in name}
HF_MODELS = ["hf:gpt2,n_layer=2,n_embd=256,n_head=4", "hf:llama,num_hidden_layers=2,hidden_size=256,"
             "intermediate_size=688,num_attention_heads=8,num_key_value_heads=2",
             "hf:bert,num_hidden_layers=2,hidden_size=256,intermediate_size=512,num_attention_heads=4"]


def _layers_override(name):
    config = models.PRESETS[name]
    fields = [f for f in ("n_layers", "n_encoder_layers", "n_decoder_layers") if hasattr(config, f)]
    return {f: min(2, getattr(config, f)) for f in fields}


def counted_flops(model, kwargs):
    """FlopCounterMode's FLOPs per ATen op, on the meta device (no weights allocated)."""
    with FlopCounterMode(display=False) as counter:
        model(**kwargs)
    return {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}


def cost_pass_flops(model, name):
    analysis = analyze(model, batch=BATCH, seq=SEQ, dtype=torch.float32, name=name)
    by_kind = {"matmul": 0.0, "attention": 0.0}
    for row, node in zip(analysis.report["nodes"], _costed_nodes(analysis)):
        if row["kind"] in by_kind:
            causal = node.target == torch.ops.aten.scaled_dot_product_attention.default and (
                node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
            by_kind[row["kind"]] += row["flops"] * (2 if causal else 1)  # FlopCounterMode never halves
    return by_kind


def _costed_nodes(analysis):
    return [n for n in analysis.program.gm.graph.nodes
            if n.op in ("call_function", "call_module") and "fxopt.cost" in n.meta]


def check_against_counter(model, name, device="meta"):
    kwargs = zoo.example_inputs(model, BATCH, SEQ, device=device)
    counted = counted_flops(model, kwargs)
    ours = cost_pass_flops(model, name)
    linears = counted.get("mm", 0) + counted.get("addmm", 0)
    batched = counted.get("bmm", 0) + counted.get("baddbmm", 0)
    if device == "meta":
        # On meta, SDPA runs its math path: its two products show up as bmm.
        assert ours["matmul"] + ours["attention"] == pytest.approx(linears + batched, rel=1e-9)
    else:
        # On CPU, SDPA's fused kernel has no FLOP formula in FlopCounterMode: compare the matmuls.
        assert ours["matmul"] == pytest.approx(linears + batched, rel=1e-9)
    assert ours["matmul"] >= linears > 0


@pytest.mark.parametrize("name", sorted(models.PRESETS))
@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
def test_preset_matmul_flops_match_flop_counter(name, attn_impl):
    model = models.build(name, device="meta", attn_impl=attn_impl, **_layers_override(name))
    check_against_counter(model, name)


@pytest.mark.parametrize("spec", HF_MODELS)
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_hf_matmul_flops_match_flop_counter(spec, attn_impl):
    pytest.importorskip("transformers")
    model = zoo.load_model(spec, device="cpu")  # HF's mask code calls .item(), which meta cannot
    model.config._attn_implementation = attn_impl
    check_against_counter(model, spec, device="cpu")
