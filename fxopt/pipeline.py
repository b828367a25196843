"""The fxopt compiler, top to bottom: the one place that lists the passes, in order.

model + example inputs
  -> capture    torch.export(strict=False), dynamic dims named by role -> ATen GraphModule
  -> passes     each `run(gm, ctx) -> PassResult`, in the order of PASSES below
  -> runtime    the optimized GraphModule, called like the model

With kv_cache=True the generator (fxopt/generate.py) runs capture -> attention -> matmul, then
passes/kv_cache.py splits the graph into a prefill and a decode program over static caches, and
the decode program goes through cost -> matmul.run_decode (batch 1: GEMVs with the norms, SwiGLU and residual
adds folded in) -> rope -> fusion per batch bucket before it is captured in a CUDA graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxopt.capture import Captured, capture
from fxopt.hardware import Hardware, get_hardware
from fxopt.passes import attention, cost, fusion, matmul, rope
from fxopt.passes.infra import PassContext, PassResult

Pass = Callable[[fx.GraphModule, PassContext], PassResult]

# name, pass, the option that turns it on (None: always on)
PASSES: list[tuple[str, Pass, str | None]] = [
    ("cost", cost.run, None),  # FLOPs and bytes per node, symbolic in b, s -> meta["fxopt.cost"]
    ("attention", attention.run, "attention"),  # attention subgraphs -> one fxopt::attention call each
    ("matmul", matmul.run, "matmul"),  # sibling linears -> one over concatenated weights; unaligned N padded
    ("rope", rope.run, "rope"),  # x*cos + rotate_half(x)*sin -> one fxopt::rope kernel (slice/neg/cat do not fuse)
    ("fusion", fusion.run, "fuse"),  # memory-bound regions -> one generated Triton kernel each
    ("recost", cost.run, None),  # costs of what the rewrites made (fused calls keep theirs)
]


@dataclass
class Program:
    """A captured graph after the passes, with what they reported."""

    captured: Captured
    gm: fx.GraphModule
    ctx: PassContext
    results: dict[str, PassResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each pass


def make_context(
    captured: Captured,
    hw: Hardware | str | None,
    sizes: dict[str, int] | None,
    options: dict[str, Any] | None = None,
) -> PassContext:
    """Context whose formulas evaluate at `sizes` (role -> size; the example's sizes by default)."""
    from fxopt.capture import role_symbol

    values = dict(captured.sizes)
    values.update(sizes or {})
    return PassContext(
        symbols=captured.symbols,
        sizes={role_symbol(role): size for role, size in values.items()},
        hardware=get_hardware(hw),
        hints=captured.hints,
        options=dict(options or {}),
    )


def run_passes(captured: Captured, ctx: PassContext) -> Program:
    program = Program(captured, captured.gm, ctx)
    for name, run, option in PASSES:
        if option is None or ctx.options.get(option):
            start = time.perf_counter()
            program.results[name] = run(program.gm, ctx)
            program.seconds[name] = time.perf_counter() - start
    return program


def compile_model(
    model: torch.nn.Module,
    example_kwargs: dict[str, Any],
    *,
    hw=None,
    sizes: dict[str, int] | None = None,
    dynamic_dims=None,
    **options,
) -> Program:
    """Capture `model` and run the enabled passes over it."""
    captured = capture(model, example_kwargs, dynamic_dims)
    return run_passes(captured, make_context(captured, hw, sizes, options))
