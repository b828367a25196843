"""Fusion pass: how many kernels known chains become, and that fused models match eager.

Under TRITON_INTERPRET=1 (set by tests/conftest.py on CPU) the generated kernels really run.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt import models
from fxopt.optimize import optimize
from fxopt.passes.fusion import FusedRegionModule


def kernel_count(optimized) -> int:
    return sum(isinstance(m, FusedRegionModule) for m in optimized.gm.modules())


def fused_node_names(optimized) -> list[list[str]]:
    return [r["nodes"] for r in optimized.program.results["fusion"].regions]


class Chain(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def residual_rmsnorm(x, r, w):
    h = x + r
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    return normed, h


def diamond(x, w):
    y = torch.relu(x)
    z = y @ w  # a path y -> matmul -> add: y's region may not take in the add
    return z + y * 2


CHAINS = {  # name: (fn, inputs, expected kernel count)
    "E = D + (A+B)*C": (lambda a, b, c, d: d + (a + b) * c, [rand(33, 65, seed=i) for i in range(4)], 1),
    "residual + RMSNorm (two outputs)": (residual_rmsnorm, [rand(6, 40), rand(6, 40, seed=1), rand(40, seed=2)], 1),
    "scale + mask + softmax": (
        lambda s, m: torch.softmax((s * 0.125).masked_fill(m, float("-inf")), dim=-1),
        [rand(2, 3, 9, 9), torch.ones(9, 9, dtype=torch.bool).triu(1)], 1),
    "residual + LayerNorm": (lambda x, r, w, b: F.layer_norm(x + r, (48,), w, b),
                             [rand(5, 48), rand(5, 48, seed=1), rand(48, seed=2), rand(48, seed=3)], 1),
    "SwiGLU": (lambda g, u: F.silu(g) * u, [rand(7, 96), rand(7, 96, seed=1)], 1),
    "lone GELU saves nothing": (lambda x: F.gelu(x, approximate="tanh"), [rand(8, 32)], 0),
    "matmul splits two chains": (lambda x, w: torch.tanh((x * 2 + 1) @ w) * 3 + 1, [rand(8, 16), rand(16, 16)], 2),
    "diamond around a matmul": (diamond, [rand(16, 16), rand(16, 16, seed=1)], 1),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_known_chain_becomes_expected_kernel_count(name):
    fn, inputs, expected = CHAINS[name]
    module = Chain(fn)
    optimized = optimize(module, tuple(inputs), dynamic_dims={})
    assert kernel_count(optimized) == expected, fused_node_names(optimized)
    eager = module(*inputs)
    fast = optimized(*inputs)
    for e, f in zip(eager if isinstance(eager, tuple) else (eager,), fast if isinstance(fast, tuple) else (fast,)):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


def test_diamond_keeps_the_graph_acyclic_and_the_add_outside():
    fn, inputs, _ = CHAINS["diamond around a matmul"]
    optimized = optimize(Chain(fn), tuple(inputs), dynamic_dims={})
    (region,) = fused_node_names(optimized)
    assert "add" not in region and {"relu", "mul"} <= set(region)


def test_intermediate_used_outside_is_still_written():
    fn, inputs, _ = CHAINS["residual + RMSNorm (two outputs)"]
    optimized = optimize(Chain(fn), tuple(inputs), dynamic_dims={})
    (call,) = [n for n in optimized.gm.graph.nodes if n.op == "call_module" and n.target.startswith("fused")]
    assert len(call.meta["val"]) == 2  # normed and h


def test_fusion_removes_bytes_by_the_cost_pass_count():
    fn, inputs, _ = CHAINS["E = D + (A+B)*C"]
    optimized = optimize(Chain(fn), tuple(inputs), dynamic_dims={})
    (region,) = optimized.program.results["fusion"].regions
    elements = 33 * 65 * 4  # bytes of one fp32 array
    assert region["bytes_before"] == 9 * elements  # (A+B): 3 arrays, ·C: 3, D+: 3
    assert region["bytes_after"] == 5 * elements  # A, B, C, D in; E out


def test_generated_source_is_dumped_with_a_header_naming_the_nodes(tmp_path):
    fn, inputs, _ = CHAINS["E = D + (A+B)*C"]
    optimized = optimize(Chain(fn), tuple(inputs), dynamic_dims={}, dump_dir=tmp_path)
    (source,) = list(tmp_path.glob("*.py"))
    text = source.read_text()
    for node in fused_node_names(optimized)[0]:
        assert node in text
    assert "predicted bytes" in text


def test_user_model_is_not_mutated():
    model = models.build("gpt2-tiny", attn_impl="explicit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    code_before = type(model).forward
    optimize(model, model.example_inputs(2, 8))
    assert type(model).forward is code_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def _presets():
    return sorted(models.PRESETS)


def _small(name):
    """Every preset at its own width, with one layer (two for the encoder-decoder's halves)."""
    config = models.PRESETS[name]
    fields = [f for f in ("n_layers", "n_encoder_layers", "n_decoder_layers") if hasattr(config, f)]
    return {f: 1 for f in fields}


@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("name", [n for n in _presets() if "tiny" in n or n in ("gpt2-small", "bert-base")])
def test_optimize_matches_eager_on_presets(name, attn_impl):
    model = models.build(name, attn_impl=attn_impl, **_small(name))
    optimized = optimize(model, model.example_inputs(2, 12), verify=True)
    assert kernel_count(optimized) > 0


HF_SPECS = ["hf:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=512",
            "hf:llama,num_hidden_layers=2,hidden_size=64,intermediate_size=176,num_attention_heads=4,"
            "num_key_value_heads=2,vocab_size=512"]


@pytest.mark.parametrize("spec", HF_SPECS)
def test_optimize_matches_eager_on_hf_models(spec):
    pytest.importorskip("transformers")
    from fxopt import zoo

    model = zoo.load_model(spec)
    inputs = zoo.example_inputs(model, 2, 12)
    optimized = optimize(model, inputs, verify=True)
    assert kernel_count(optimized) > 0
    expected = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(optimized(**inputs, use_cache=False).logits, expected, rtol=1e-4, atol=1e-4)
