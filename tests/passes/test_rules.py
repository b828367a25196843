"""The one rule engine (passes/rules.py) as the attention and kv_cache passes use it.

Independent references: toy graphs whose matches are written out by hand (which node each rule sees, in which
order, and why one is left), a model with one site of each kind the attention pass knows (an sdpa call, an
explicit softmax chain, one it must refuse: a scale known only at run time), and the decoder presets' layer count.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxopt import models
from fxopt.capture import capture
from fxopt.passes import attention, cost, kv_cache
from fxopt.passes.rules import Rule, apply_rules
from fxopt.pipeline import make_context

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------- the engine
class Chain(nn.Module):
    def forward(self, x):
        return torch.sin(torch.relu(torch.sin(torch.relu(x))))


def _toy_rules(seen: list[str]) -> tuple[Rule, ...]:
    """relu -> abs, except the second relu (left: "second"); sin -> cos. `seen` logs each check and rewrite."""

    def of(target):
        return lambda gm: [n for n in gm.graph.nodes if n.target is target]

    def check(rw, node):
        seen.append(f"check {node.name}")
        return "second" if node.name == "relu_1" else None

    def swap(new):
        def rewrite(rw, node):
            seen.append(f"rewrite {node.name}")
            node.target = new
            rw.count("swapped")
        return rewrite

    return (Rule("relu", of(torch.relu), check, swap(torch.abs), refused="left"),
            Rule("sin", of(torch.sin), check, swap(torch.cos)))


def test_rules_run_one_after_the_other_by_default():
    gm = fx.symbolic_trace(Chain())  # no fake values: fake=False rules run anyway
    seen: list[str] = []
    rw, notes = apply_rules(gm, None, _toy_rules(seen), lambda n: n.name, "toy", fake=False)
    assert seen == ["check relu", "rewrite relu", "check relu_1", "check sin", "rewrite sin", "check sin_1",
                    "rewrite sin_1"]
    assert list(rw.counts.items()) == [("relu", 1), ("left", 1), ("swapped", 3), ("sin", 2)]
    assert notes == ["relu: left relu_1: second"]
    assert [(rule, node.name, reason) for rule, node, reason in rw.log] == [
        ("relu", "relu", None), ("relu", "relu_1", "second"), ("sin", "sin", None), ("sin", "sin_1", None)]


def test_order_decides_every_match_first_then_handles_them_in_that_order():
    gm = fx.symbolic_trace(Chain())
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    seen: list[str] = []
    rw, notes = apply_rules(gm, None, _toy_rules(seen), None, "toy", order=position.__getitem__,
                            note=lambda rule, node, why: f"{node.name} kept ({rule.name}: {why})", keys=("extra",),
                            fake=False)
    assert seen == ["check relu", "check relu_1", "check sin", "check sin_1",
                    "rewrite relu", "rewrite sin", "rewrite sin_1"]  # graph order across both rules
    assert list(rw.counts.items()) == [("relu", 1), ("sin", 2), ("left", 1), ("swapped", 3), ("extra", 0)]
    assert notes == ["relu_1 kept (relu: second)"]
    assert [node.name for _, node, _ in rw.log] == ["relu", "sin", "relu_1", "sin_1"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.abs, torch.cos, torch.relu,
                                                                               torch.cos]


def test_rules_that_need_fake_values_leave_a_graph_without_them():
    gm = fx.symbolic_trace(Chain())
    rw, notes = apply_rules(gm, None, _toy_rules([]), lambda n: n.name, "toy")
    assert rw is None and "no fake meta['val']" in notes[0]


# --------------------------------------------------------------------------------------------- attention
class ThreeForms(nn.Module):
    """Three attention layers in a row: sdpa, explicit softmax(q kᵀ / sqrt(d)) v, and one scaled by a learned
    temperature (known only at run time: left)."""

    def __init__(self, dm=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dm // heads
        self.qkv = nn.ModuleList(nn.Linear(dm, 3 * dm) for _ in range(3))
        self.temperature = nn.Parameter(torch.tensor(0.3))

    def split(self, i, x):
        b, s, _ = x.shape
        return self.qkv[i](x).view(b, s, 3, self.h, self.d).permute(2, 0, 3, 1, 4)

    def merge(self, y):
        b, _, s, _ = y.shape
        return y.transpose(1, 2).reshape(b, s, -1)

    def forward(self, x):
        q, k, v = self.split(0, x)
        x = x + self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        q, k, v = self.split(1, x)
        x = x + self.merge(torch.softmax(q @ k.transpose(-1, -2) * self.d**-0.5, dim=-1) @ v)
        q, k, v = self.split(2, x)
        return x + self.merge(torch.softmax(q @ k.transpose(-1, -2) * self.temperature, dim=-1) @ v)


def test_attention_counts_and_reasons_come_from_its_rule_table():
    model = ThreeForms().eval()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    captured = capture(model, {"x": x}, {"x": {1: "seq"}})
    ctx = make_context(captured, "h100", None)
    cost.run(captured.gm, ctx)
    result = attention.run(captured.gm, ctx)
    assert [rule.name for rule in attention.RULES] == [p.name for p in attention.PATTERNS] == ["sdpa", "explicit"]
    assert list(result.counts.items()) == [("sdpa", 1), ("explicit", 1), ("unmatched", 1), ("fallback", 0)]
    (note,) = result.notes
    assert "attention-like softmax not rewritten: scale is a runtime tensor" in note
    sites = result.attention_sites
    assert [(s["kind"], s["matched"], s["pattern"]) for s in sites] == [
        ("sdpa", True, "sdpa"), ("softmax", True, "explicit"), ("softmax", False, None)]  # graph order
    assert "scale is a runtime tensor" in sites[2]["reason"] and sites[2]["info"] is None
    assert [e["node"] for e in result.attention_rewrites] == [s["new_node"] for s in sites[:2]]
    found = attention.find_sites(captured.gm)  # after the rewrite only the refused site is left to find
    assert [(s.kind, s.plan, s.reason) for s in found] == [("softmax", None, sites[2]["reason"])]
    with torch.no_grad():
        out = captured.gm(x=x)
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, model(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- kv_cache
def test_token_axis_rules_are_one_table_with_pointwise_tags_first():
    node = lambda target: fx.Node(fx.Graph(), "n", "call_function", target, (), {})  # noqa: E731
    rule = lambda target: kv_cache._rule_for(node(target))  # noqa: E731
    assert rule(kv_cache.ATTENTION) is kv_cache._rule_attention and rule(operator.getitem) is kv_cache._rule_getitem
    assert rule(aten.add.Tensor) is kv_cache._rule_pointwise  # tagged pointwise, in no row
    assert rule(aten.clone.default) is kv_cache._rule_pointwise and rule(aten.view.default) is kv_cache._rule_view
    assert rule(aten.softmax.int) is kv_cache._rule_along and rule(aten.linear.default) is kv_cache._rule_linear
    assert rule(aten.nonzero.default) is None


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_the_causal_proof_counts_every_attention_node(impl):
    model = models.build("gpt2-tiny", attn_impl=impl)
    captured = capture(model, model.example_inputs(2, 16))
    if impl == "explicit":  # the attention pass makes fxopt attention nodes, each with its causal mask
        attention.run(captured.gm, make_context(captured, "h100", None))
    ids = next(n for n in captured.gm.graph.nodes if n.op == "placeholder")
    counts = kv_cache.prove_causal(captured.gm, ids)
    layers = model.config.n_layers
    assert counts["attention"] == layers
    assert counts["sdpa_normalised"] == (layers if impl == "sdpa" else 0)
    assert not any(n.target == aten.scaled_dot_product_attention.default for n in captured.gm.graph.nodes)
