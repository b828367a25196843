"""The pass interface: `run(gm, ctx) -> PassResult`, in the spirit of torch.fx.passes.infra.

A pass rewrites or annotates `gm` in place (gm is always fxopt's own copy, never
the user's model), keeps every node's meta["val"] correct, lints and recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from fxopt.hardware import Hardware, get_hardware


@dataclass
class PassResult:
    """What one pass did: whether it changed the graph, notes for the user, counts, and what it produced
    (each field is filled by the pass named in its comment; the options bag and gm.meta carry none of it)."""

    changed: bool
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    regions: list[dict] = field(default_factory=list)  # fusion / regions: one summary per (planned) region
    attention_sites: list[dict] = field(default_factory=list)  # attention: every attention-like site, as found
    attention_rewrites: list[dict] = field(default_factory=list)  # attention: bytes before/after each rewrite
    kv_programs: Any = None  # kv_cache: its KVPrograms (prefill and decode programs, cache specs)


@dataclass
class PassContext:
    """What passes share: symbol naming, sizes to evaluate at, the target GPU and options."""

    symbols: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)  # export symbol -> role symbol
    sizes: dict[sympy.Symbol, int] = field(default_factory=dict)  # role symbol -> size to evaluate at
    hardware: Hardware = field(default_factory=lambda: get_hardware("h100"))
    options: dict[str, Any] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)  # human-readable notes for the user
    hints: dict[sympy.Symbol, int] = field(default_factory=dict)  # export symbol -> example value

    def __post_init__(self):
        self.sizes = {sym: sympy.Integer(v) for sym, v in self.sizes.items()}

    def named(self, value) -> sympy.Expr:
        """A size (int or SymInt) as a sympy expression in role symbols (b, s, ...)."""
        if isinstance(value, torch.SymInt):
            return sympy.sympify(value.node.expr).xreplace(self.symbols)
        return sympy.Integer(int(value))

    def shape(self, val: torch.Tensor) -> tuple[sympy.Expr, ...]:
        return tuple(self.named(d) for d in val.shape)

    def evaluate(self, expr) -> float:
        """Value of a formula at `sizes`; remaining export symbols evaluate at their hint."""
        expr = sympy.sympify(expr)
        if expr.is_Number:
            return float(expr)
        value = expr.xreplace(self.sizes)
        if not value.is_Number:
            value = value.xreplace({s: sympy.Integer(self.hints.get(s, 1)) for s in value.free_symbols})
        return float(value)


def finish(gm: fx.GraphModule) -> None:
    """What every rewriting pass ends with."""
    gm.graph.lint()
    gm.recompile()


def add_constant(gm: fx.GraphModule, name: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    """A new buffer `_fxopt_{name}_{i}` of gm, on `like`'s device, read by a get_attr node placed before `like`;
    its meta["val"] is a fake copy when `like` carries fake values (the graph's own fake mode)."""
    from torch._guards import detect_fake_mode

    like_val = like.meta.get("val")
    index = 0
    while hasattr(gm, f"_fxopt_{name}_{index}"):
        index += 1
    target = f"_fxopt_{name}_{index}"
    gm.register_buffer(target, value.to(like_val.device if isinstance(like_val, torch.Tensor) else value.device))
    with gm.graph.inserting_before(like):
        node = gm.graph.get_attr(target)
    buffer = getattr(gm, target)
    fake_mode = detect_fake_mode([like_val]) if isinstance(like_val, torch.Tensor) else None
    node.meta["val"] = fake_mode.from_tensor(buffer, static_shapes=True) if fake_mode else buffer  # its sizes are facts
    return node
