"""The fxopt compiler, top to bottom: the one place that lists every program's passes, in order.

model + example inputs
  -> capture    torch.export(strict=False), dynamic dims named by role -> ATen GraphModule
  -> passes     each `run(gm, ctx) -> PassResult`, in the order of one of the programs below
  -> runtime    the optimized GraphModule, called like the model

fxopt.optimize(model)                 FORWARD
fxopt annotate / fxopt.analyze        ANALYSIS (costs after the rewrites that change them; fusion outlined)
fxopt explain                         EXPLAIN (ANALYSIS up to the attention pass)
fxopt.optimize(model, kv_cache=True)  GENERATOR, whose kv_cache pass splits the graph into
                                        a prefill program (PREFILL: runs as kv_cache builds it) and
                                        a decode program, rebuilt per batch bucket by DECODE
                                        (fxopt/generate.py), then captured in a CUDA graph.

Every program runs through `run_passes` with the caller's PassContext (hardware, sizes, options such as
dump_dir), decode buckets included. A pass declares the passes it needs earlier in its program; an error
inside a pass is re-raised as PassError naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxopt.capture import Captured, capture, role_symbol
from fxopt.hardware import Hardware, get_hardware
from fxopt.passes import attention, cost, fusion, kv_cache, matmul, rope
from fxopt.passes.infra import PassContext, PassResult

Pass = Callable[[fx.GraphModule, PassContext], PassResult]


@dataclass(frozen=True)
class Step:
    """One pass of a program: its name, its run function, the option that turns it on (None: always on)
    and the steps that must have run before it in the same program."""

    name: str
    run: Pass
    option: str | None = None
    needs: tuple[str, ...] = ()


FORWARD: tuple[Step, ...] = (
    Step("cost", cost.run),  # FLOPs and bytes per node, symbolic in b, s -> meta["fxopt.cost"]
    Step("attention", attention.run, "attention"),  # attention subgraphs -> one fxopt::attention call each
    Step("matmul", matmul.run, "matmul"),  # sibling linears -> one over concatenated weights; unaligned N padded
    Step("epilogues", matmul.run_epilogues, "epilogues"),  # bias + GELU(tanh) folded into the GEMM (cuBLASLt)
    Step("rope", rope.run, "rope"),  # x*cos + rotate_half(x)*sin -> one fxopt::rope kernel (rotate_half won't fuse)
    Step("fusion", fusion.run, "fuse", needs=("cost",)),  # memory-bound regions -> one generated Triton kernel each
    Step("recost", cost.run),  # costs of what the rewrites made (fused calls keep theirs)
)

ANALYSIS: tuple[Step, ...] = (
    Step("cost", cost.run),  # as FORWARD
    Step("attention", attention.run, "attention"),  # the attention a user would get (changes bytes moved)
    Step("rope", rope.run, "rope"),  # likewise
    Step("regions", fusion.outline, "fuse", needs=("cost",)),  # the regions fusion would make, not fused
)

EXPLAIN: tuple[Step, ...] = ANALYSIS[:2]  # fxopt explain: the attention sites found, and why others were not

GENERATOR: tuple[Step, ...] = (
    Step("attention", attention.run, "attention"),  # as FORWARD: kv_cache caches fxopt attention nodes
    Step("matmul", matmul.run, "matmul"),  # sibling linears fused once, for both programs built from this graph
    Step("kv_cache", kv_cache.run),  # token-axis proof -> prefill and decode programs over static caches
)

PREFILL: tuple[Step, ...] = ()  # the prefill program runs as kv_cache builds it (attention kernels + ATen)

DECODE: tuple[Step, ...] = (
    Step("cost", cost.run),  # the bucket's decode program, shapes concrete
    Step("rope", rope.run, "rope"),  # RoPE, and K's rotate + cache write, as one kernel each (before fusion)
    Step("matmul_decode", matmul.run_decode, "matmul"),  # batch 1: one-row GEMVs with norms, SwiGLU, residual
    # adds and the q/k/v head split, RoPE and cache writes folded in
    Step("fusion", fusion.run, "fuse", needs=("cost",)),  # what is left memory-bound -> generated kernels
)


class PassError(RuntimeError):
    """A pass raised: the message names the pass and the program; the original exception is the cause."""

    def __init__(self, message: str, pass_name: str = ""):
        super().__init__(message)
        self.pass_name = pass_name


@dataclass
class Program:
    """A graph after a program's passes, with what each reported."""

    captured: Captured | None
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

    values = dict(captured.sizes)
    values.update(sizes or {})
    return PassContext(
        symbols=captured.symbols,
        sizes={role_symbol(role): size for role, size in values.items()},
        hardware=get_hardware(hw),
        hints=captured.hints,
        options=dict(options or {}),
    )


def run_passes(captured: Captured | fx.GraphModule, ctx: PassContext, steps: tuple[Step, ...] = FORWARD,
               *, program: str = "forward") -> Program:
    """Run the enabled steps over `captured` (a Captured or a bare GraphModule), in order."""
    gm = captured.gm if isinstance(captured, Captured) else captured
    result = Program(captured if isinstance(captured, Captured) else None, gm, ctx)
    for step in steps:
        if step.option is not None and not ctx.options.get(step.option):
            continue
        missing = [name for name in step.needs if name not in result.results]
        if missing:
            raise PassError(f"{program} program: pass {step.name} needs {', '.join(missing)} to run before it",
                            step.name)
        start = time.perf_counter()
        try:
            result.results[step.name] = step.run(gm, ctx)
        except Exception as exc:
            if _user_facing(exc):
                raise
            raise PassError(f"{program} program: pass {step.name} failed: {type(exc).__name__}: {exc}",
                            step.name) from exc
        result.seconds[step.name] = time.perf_counter() - start
    return result


def _user_facing(exc: Exception) -> bool:
    """Refusals that already name the model's node and line (a KV cache the model cannot take) pass as they are."""
    return isinstance(exc, kv_cache.KVCacheError)


def compile_model(
    model: torch.nn.Module,
    example_kwargs: dict[str, Any],
    *,
    hw=None,
    sizes: dict[str, int] | None = None,
    dynamic_dims=None,
    **options,
) -> Program:
    """Capture `model` and run the enabled FORWARD passes over it."""
    captured = capture(model, example_kwargs, dynamic_dims)
    return run_passes(captured, make_context(captured, hw, sizes, options))
