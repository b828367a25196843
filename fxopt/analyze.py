"""`fxopt.analyze`: where a model's time goes, node by node, on a chosen GPU.

Captures the model once at small sizes (dims stay symbolic), runs the cost pass,
and evaluates every formula at the sizes asked for. Weights are never needed:
string presets are built on the meta device, so a 70B config costs no memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx

from fxopt import zoo
from fxopt.capture import CAPTURE_SIZES, capture
from fxopt.hardware import dtype_key
from fxopt.nodes import fetch_attr
from fxopt.passes import tensor_parallel as tp
from fxopt.passes.cost import COST_KEY, LAYER_PATTERN, Cost, layer_of, total
from fxopt.pipeline import ANALYSIS, Program, make_context, run_passes
from fxopt.progress import progress, stage


@dataclass
class Analysis:
    program: Program
    report: dict[str, Any]

    @property
    def total(self) -> Cost:
        return total([n.meta[COST_KEY] for n in self.program.gm.graph.nodes if COST_KEY in n.meta])


def analyze(
    model: torch.nn.Module | str,
    *,
    batch: int = 1,
    seq: int = 128,
    hw="h100",
    dtype: torch.dtype = torch.float16,
    example_kwargs: dict | None = None,
    name: str | None = None,
    fuse: bool = True,
    attention: bool = False,
    tensor_parallel: int = 1,
) -> Analysis:
    """Annotate every node of `model` with FLOPs, bytes, intensity and roofline bound at (batch, seq).

    With `fuse`, RoPE becomes fxopt's kernel call (as in `optimize`) and the regions the fusion pass would
    form are outlined (nodes keep their own rows; each region reports its bytes before and after fusion),
    without compiling anything. With
    `attention`, attention subgraphs are rewritten to fxopt's kernels first, and the report lists
    each one's bytes before and after. With `tensor_parallel` = N > 1 the graph is first sharded as
    `optimize(..., tensor_parallel=N)` shards it (rank 0's program, no weights read): every cost is one GPU's, and
    the all-reduces and all-gathers are priced on the hardware's interconnect (passes/tensor_parallel.py; a
    model the sharding rules do not cover raises ShardingError naming the node).
    """
    name = name or (model if isinstance(model, str) else type(model).__name__)
    if isinstance(model, str):
        model = zoo.load_model(model, device="meta", dtype=dtype)
    if example_kwargs is None:
        example_kwargs = zoo.example_inputs(model, CAPTURE_SIZES["batch"], min(CAPTURE_SIZES["seq"], seq))
    sizes = {"batch": batch, "seq": seq, "src_seq": seq}
    with stage(f"capturing {name} (b={batch}, s={seq})"):
        # no per-node source lines: only error messages of later passes (kv_cache) read them, and recording
        # them is about a quarter of the capture time (as in optimize)
        captured = capture(model, example_kwargs, source_lines=False)
    plan = None
    if tensor_parallel > 1:
        with stage(f"sharding for {tensor_parallel} GPUs (rank 0's program)"):
            plan = _shard_for_analysis(captured.gm, tensor_parallel)
    options = {"attention": attention, "rope": fuse, "fuse": fuse}
    passes = ", ".join(step.name for step in ANALYSIS if step.option is None or options[step.option])
    with stage(f"running passes ({passes})"):
        program = run_passes(captured, make_context(captured, hw, sizes, options), ANALYSIS, program="analysis")
    report = build_report(program, name=name, dtype=dtype, params=_param_count(model))
    if plan is not None:
        report["tensor_parallel"] = _tp_summary(program, report, plan)
    return Analysis(program, report)


def _shard_for_analysis(gm: fx.GraphModule, world_size: int) -> tp.ShardPlan:
    """gm rewritten into rank 0's shard, its attributes sliced on the meta device (only shapes matter to the
    costs); returns the plan."""
    plan = tp.plan_shards(gm, world_size, rank=0)
    tp.apply_plan(gm, plan, "fxopt-analysis", lambda name: fetch_attr(gm, name).to("meta"))
    return plan


def _tp_summary(program: Program, report: dict[str, Any], plan: tp.ShardPlan) -> dict[str, Any]:
    """What one GPU sends over the interconnect per forward, per layer, and the time in collectives."""
    collectives = [r for r in report["nodes"] if r["kind"] == "collective"]
    blocks = [layer for layer in report["layers"] if LAYER_PATTERN.match(layer["layer"] + ".")]  # repeated blocks
    return {
        "world_size": plan.world_size,
        "interconnect": program.ctx.hardware.interconnect,
        "collectives": len(collectives),
        "link_bytes": report["total"]["link_bytes"],
        "link_bytes_per_layer": max((layer["link_bytes"] for layer in blocks), default=0),
        "collective_time_s": sum(r["time_s"] for r in collectives),
        "local_weight_bytes": plan.bytes(local=True),
        "weight_bytes": plan.bytes(local=False),
        "replicated": plan.replicated(),
    }


def _produced(program: Program, *passes: str, field: str) -> list:
    """A PassResult field from the first of `passes` that ran (analysis outlines regions, forward fuses)."""
    for name in passes:
        if name in program.results:
            return getattr(program.results[name], field)
    return []


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fmt(expr: sympy.Expr) -> str:
    return str(sympy.factor_terms(expr))


def node_row(program: Program, node: fx.Node) -> dict[str, Any]:
    ctx, cost = program.ctx, node.meta[COST_KEY]
    flops, nbytes = ctx.evaluate(cost.flops), ctx.evaluate(cost.bytes)
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    shapes = [[int(ctx.evaluate(d)) for d in ctx.shape(v)] for v in vals if isinstance(v, torch.Tensor)]
    return {
        "name": node.name,
        "op": str(node.target) if node.op == "call_function" else f"{node.op}:{node.target}",
        "kind": cost.kind,
        "layer": layer_of(node),
        "inputs": [n.name for n in node.all_input_nodes if n.op == "call_function"],
        "shapes": shapes,
        "dtype": dtype_key(cost.dtype) if cost.dtype else None,
        "flops": flops,
        "bytes_read": ctx.evaluate(cost.bytes_read),
        "bytes_written": ctx.evaluate(cost.bytes_written),
        "flops_expr": str(cost.flops),
        "bytes_expr": str(cost.bytes),
        "intensity": flops / nbytes if nbytes else None,
        "bound": cost.bound(ctx),
        "time_s": cost.time(ctx) if cost.kind != "unknown" else 0.0,
        "region": node.meta.get("fxopt.region").id if node.meta.get("fxopt.region") else None,
        "note": cost.note,
    }


def _summary(program: Program, costs: list[Cost], rows: list[dict]) -> dict[str, Any]:
    summed = total(costs)
    return {
        "flops": program.ctx.evaluate(summed.flops),
        "bytes": program.ctx.evaluate(summed.bytes),
        "link_bytes": program.ctx.evaluate(summed.link_bytes),
        "time_s": sum(r["time_s"] for r in rows),
        "flops_expr": _fmt(summed.flops),
        "bytes_expr": _fmt(summed.bytes),
    }


def build_report(program: Program, *, name: str, dtype: torch.dtype, params: int) -> dict[str, Any]:
    """The JSON-serialisable report that fxopt.report renders (table, JSON, DOT, HTML)."""
    hw, ctx = program.ctx.hardware, program.ctx
    nodes = [
        n for n in program.gm.graph.nodes if n.op in ("call_function", "call_module") and COST_KEY in n.meta
    ]
    rows, by_layer = [], defaultdict(list)
    for node in progress(nodes, total=len(nodes), desc="costing nodes"):
        row = node_row(program, node)
        if row["kind"] == "layout" and not row["flops"]:
            row["bound"] = "free"
        rows.append(row)
        by_layer[row["layer"]].append((node.meta[COST_KEY], row))
    layers = [
        {"layer": layer, **_summary(program, [c for c, _ in items], [r for _, r in items])}
        for layer, items in by_layer.items()
    ]
    whole = _summary(program, [n.meta[COST_KEY] for n in nodes], rows)
    whole["params"] = params
    sizes = {str(sym): value for sym, value in ctx.sizes.items()}
    return {
        "model": name,
        "hardware": {
            "name": hw.name,
            "bandwidth": hw.bandwidth,
            "peak_flops": hw.peak(dtype),
            "peak_flops_vector": hw.peak(dtype, matmul=False),
            "dtype": dtype_key(dtype),
            "source": hw.source,
        },
        "sizes": sizes,
        "nodes": rows,
        "layers": layers,
        "total": whole,
        "regions": _produced(program, "regions", "fusion", field="regions"),
        "attention": _produced(program, "attention", field="attention_rewrites"),
        "notes": [note for result in program.results.values() for note in result.notes],
    }
