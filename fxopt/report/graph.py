"""The report as a Graphviz graph: nodes coloured by roofline bound, fusion regions as clusters; SVG
through the `dot` program."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from fxopt.report.numbers import as_float, fmt_bytes, fmt_rate, fmt_shape, fmt_time, node_bytes, short_op, sizes_text

DOT_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------------------
# Graphviz
# --------------------------------------------------------------------------------------------------------

BOUND_FILL = {"compute": "#f4a261", "memory": "#8ecae6", "free": "#e0e0e0", "unknown": "#ffffff"}
REGION_COLOR = "#c0392b"


class GraphvizNotFoundError(RuntimeError):
    """The `dot` binary is not installed."""


def _dq(text: Any) -> str:
    """A DOT double-quoted ID: escape backslashes, quotes and newlines (so any name stays valid DOT)."""
    s = str(text).replace("\\", "\\\\").replace('"', '\\"')
    s = s.replace("\r", "").replace("\n", "\\n")
    return f'"{s}"'


def _dot_node_attrs(n: dict, attention: dict[str, dict]) -> str:
    flops, nbytes = as_float(n.get("flops")), node_bytes(n)
    bound = str(n.get("bound") or "unknown")
    kind = str(n.get("kind") or "")
    name, op = str(n.get("name", "")), short_op(str(n.get("op", "")))
    lines = [name] if name.startswith(op.split(".")[0]) else [name, op]
    if flops or nbytes:
        lines.append(f"{fmt_rate(flops, 'FLOP')} · {fmt_bytes(nbytes)}")
        lines.append(f"{bound} · {fmt_time(as_float(n.get('time_s')))}")
    if n.get("name") in attention and attention[n["name"]].get("kernel"):
        lines.append(f"kernel: {attention[n['name']]['kernel']}")
    if n.get("note"):
        lines.append(str(n["note"]))
    label = "\\n".join(_dq(x)[1:-1] for x in lines)
    if bound == "unknown" or kind == "unknown":
        fill, style = BOUND_FILL["unknown"], "dashed,rounded"
    elif bound == "free" or kind == "layout":
        fill, style = BOUND_FILL["free"], "filled,rounded"
    else:
        fill, style = BOUND_FILL.get(bound, BOUND_FILL["unknown"]), "filled,rounded"
    tooltip = f"{n.get('name', '')}: {n.get('op', '')} {fmt_shape(n.get('shapes'))}"
    return (f'[label="{label}", fillcolor="{fill}", style="{style}", '
            f"tooltip={_dq(tooltip)}]")


def to_dot(report: dict) -> str:
    """Graphviz DOT source of the annotated graph.

    One box per report node, labelled with its name, op, FLOPs · bytes and bound · time, filled by roofline
    bound (compute orange, memory blue, free/layout grey, unknown white and dashed); edges from each
    node's "inputs" (inputs that are not report nodes are left out); each fused region is a
    `subgraph cluster_<id>` outline labelled with its bytes before → after. Every ID is quoted and
    escaped, so the source is valid DOT for any node names and any graph size.
    """
    nodes = report.get("nodes", [])
    names = {n.get("name") for n in nodes}
    attention = {a.get("node"): a for a in report.get("attention") or []}
    hw = report.get("hardware") or {}
    title = f"{report.get('model', '')} on {hw.get('name', '')} at {sizes_text(report)}"

    region_of: dict[str, str] = {}
    regions = list(report.get("regions") or [])
    for r in regions:
        for name in r.get("nodes", []):
            region_of.setdefault(name, r["id"])
    for n in nodes:
        if n.get("region") and n.get("name") not in region_of:
            region_of[n["name"]] = n["region"]
    known_regions = {r["id"] for r in regions}
    for rid in sorted(set(region_of.values()) - known_regions):
        regions.append({"id": rid, "nodes": []})

    big = len(nodes) > 2000
    out = ["digraph fxopt {"]
    graph_attrs = f'label={_dq(title)}, labelloc=t, fontname="Helvetica", fontsize=14, rankdir=TB'
    if big:  # keep layout time bounded on huge graphs
        graph_attrs += ", nslimit=2, mclimit=0.2, remincross=false"
    out.append(f"  graph [{graph_attrs}];")
    out.append('  node [shape=box, fontname="Helvetica", fontsize=10, margin="0.12,0.04", penwidth=0.8];')
    out.append('  edge [color="#7f7f7f", arrowsize=0.6];')

    members: dict[str, list[dict]] = {r["id"]: [] for r in regions}
    loose: list[dict] = []
    for n in nodes:
        rid = region_of.get(n.get("name"))
        (members[rid] if rid in members else loose).append(n)

    for r in regions:
        before, after = r.get("bytes_before"), r.get("bytes_after")
        label = str(r["id"])
        if before is not None and after is not None:
            label += f"\n{fmt_bytes(as_float(before))} → {fmt_bytes(as_float(after))}"
        if r.get("predicted_speedup"):
            label += f" ({as_float(r['predicted_speedup']):.2g}× predicted)"
        out.append(f"  subgraph {_dq('cluster_' + str(r['id']))} {{")
        out.append(f'    label={_dq(label)}; style="dashed,rounded"; color="{REGION_COLOR}"; '
                   f'fontcolor="{REGION_COLOR}"; penwidth=1.5;')
        for n in members[r["id"]]:
            out.append(f"    {_dq(n.get('name', ''))} {_dot_node_attrs(n, attention)};")
        out.append("  }")
    for n in loose:
        out.append(f"  {_dq(n.get('name', ''))} {_dot_node_attrs(n, attention)};")
    for n in nodes:
        target = _dq(n.get("name", ""))
        seen = set()
        for src in n.get("inputs") or []:
            if src in names and src not in seen:
                seen.add(src)
                out.append(f"  {_dq(src)} -> {target};")
    out.append("}")
    return "\n".join(out) + "\n"


def write_dot(report: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(to_dot(report), encoding="utf-8")


def _dot_binary() -> str:
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizNotFoundError(
            "rendering SVG needs Graphviz's `dot` program, which is not installed; install it "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz) or write the "
            "DOT source instead (--format dot)")
    return dot


def render_svg(dot_source: str, timeout: float | None = DOT_TIMEOUT_S) -> str:
    proc = subprocess.run([_dot_binary(), "-Tsvg"], input=dot_source.encode("utf-8"),
                          capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")[:500]
        raise RuntimeError(f"dot failed (exit {proc.returncode}): {err}")
    return proc.stdout.decode("utf-8")


def write_svg(report: dict, path: str | os.PathLike, *, timeout: float | None = DOT_TIMEOUT_S) -> None:
    """Render the graph to SVG with Graphviz's `dot`; GraphvizNotFoundError if it is not installed."""
    Path(path).write_text(render_svg(to_dot(report), timeout), encoding="utf-8")
