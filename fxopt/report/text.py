"""The report as text and JSON: the node/layer/TOTAL table `fxopt annotate` prints and the rewrites
summary under it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fxopt.opnames import BOOKKEEPING
from fxopt.report.numbers import (
    as_float,
    fmt_ai,
    fmt_bytes,
    fmt_flops,
    fmt_shape,
    fmt_time,
    intensity,
    layer_summaries,
    node_bytes,
    report_total,
    short_op,
    sizes_text,
)

# --------------------------------------------------------------------------------------------------------
# Plain-text table
# --------------------------------------------------------------------------------------------------------

_COLUMNS = ["name", "op", "kind", "shape", "FLOPs", "bytes", "AI", "bound", "time", "%time", "region"]
_RIGHT = {"FLOPs", "bytes", "AI", "time", "%time"}
_MAX_WIDTH = {"name": 40, "op": 36, "shape": 28, "region": 16}


def _clip(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def percent(part: float, whole: float) -> str:
    if whole <= 0:
        return "-"
    return f"{100.0 * part / whole:.1f}%"


def is_bookkeeping(node: dict) -> bool:
    """A report node that is graph bookkeeping (fxopt.opnames.BOOKKEEPING) with no cost of its own."""
    return short_op(str(node.get("op", ""))) in BOOKKEEPING and not (as_float(node.get("flops")) or node_bytes(node))


def format_table(report: dict, *, max_rows: int | None = None, all_nodes: bool = False) -> str:
    """An aligned plain-text table of the report.

    Node rows (graph order; bookkeeping nodes left out unless `all_nodes`, then at most `max_rows` of them,
    then a "… N more nodes" line), then one row per
    layer, then TOTAL, then a line with the symbolic total formulas. Numbers carry human units:
    FLOPs k/M/G/T, bytes B/KB/MB/GB, time ns/µs/ms/s; AI is FLOP per byte.
    """
    nodes = report.get("nodes", [])
    total = report_total(report)
    total_time = as_float(total.get("time_s"))
    listed = nodes if all_nodes else [n for n in nodes if not is_bookkeeping(n)]
    shown = listed if max_rows is None else listed[: max(0, max_rows)]

    node_rows = []
    for n in shown:
        flops, nbytes = as_float(n.get("flops")), node_bytes(n)
        ai = n.get("intensity")
        if ai is None:
            ai = intensity(flops, nbytes)
        cost = [fmt_flops(flops), fmt_bytes(nbytes), fmt_ai(ai), str(n.get("bound", "")),
                fmt_time(as_float(n.get("time_s"))), percent(as_float(n.get("time_s")), total_time)]
        if n.get("bound") == "unknown" and not (flops or nbytes):
            cost = ["?", "?", "?", "unknown", "?", "?"]  # not free: its cost is not known
        node_rows.append([str(n.get("name", "")), short_op(str(n.get("op", ""))), str(n.get("kind", "")),
                          fmt_shape(n.get("shapes")), *cost, str(n.get("region") or "-")])

    layer_rows = []
    for layer in layer_summaries(report):
        flops, nbytes, t = as_float(layer.get("flops")), as_float(layer.get("bytes")), as_float(layer.get("time_s"))
        layer_rows.append([
            str(layer.get("layer") or "(top level)"), "", "layer", "", fmt_flops(flops), fmt_bytes(nbytes),
            fmt_ai(intensity(flops, nbytes)), "", fmt_time(t), percent(t, total_time), "",
        ])
    tf, tb = as_float(total.get("flops")), as_float(total.get("bytes"))
    total_row = ["TOTAL", "", f"{len(nodes)} nodes", "", fmt_flops(tf), fmt_bytes(tb),
                 fmt_ai(intensity(tf, tb)), "", fmt_time(total_time), percent(total_time, total_time), ""]

    all_rows = node_rows + layer_rows + [total_row]
    widths = []
    for i, col in enumerate(_COLUMNS):
        cap = _MAX_WIDTH.get(col)
        w = max([len(col)] + [min(len(r[i]), cap or 10**9) for r in all_rows])
        widths.append(w)

    template = "  ".join(f"{{:{'>' if col in _RIGHT else '<'}{w}}}" for col, w in zip(_COLUMNS, widths))
    capped = [(i, _MAX_WIDTH[col]) for i, col in enumerate(_COLUMNS) if col in _MAX_WIDTH]

    def line(cells: list[str]) -> str:
        for i, cap in capped:
            if len(cells[i]) > cap:
                cells = cells[:i] + [_clip(cells[i], cap)] + cells[i + 1:]
        return template.format(*cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    hw = report.get("hardware") or {}
    head = (f"{report.get('model', 'model')} on {hw.get('name', '?')} ({hw.get('dtype', '?')})"
            + (f" at {sizes_text(report)}" if report.get("sizes") else ""))
    out = [head, line(_COLUMNS), rule]
    out.extend(line(r) for r in node_rows)
    hidden = len(listed) - len(shown)
    if hidden > 0:
        out.append(f"… {hidden} more nodes")
    if len(nodes) > len(listed):
        out.append(f"({len(nodes) - len(listed)} bookkeeping nodes not listed: size reads, getitem, guards; "
                   "--all-nodes lists them)")
    out.append(rule)
    out.extend(line(r) for r in layer_rows)
    out.append(rule)
    out.append(line(total_row))
    fe, be = total.get("flops_expr"), total.get("bytes_expr")
    if fe or be:
        at = f"   (numbers above at {sizes_text(report)})" if report.get("sizes") else ""
        out.append(f"symbolic total: FLOPs = {fe or '?'};  bytes = {be or '?'}{at}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None  # strict JSON: no Infinity / NaN
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if isinstance(x, Path):
        return str(x)
    try:  # numpy / sympy numbers
        return _jsonable(float(x)) if not isinstance(x, (set, frozenset)) else sorted(map(str, x))
    except (TypeError, ValueError):
        return str(x)


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report as strict JSON (non-finite floats become null, other objects their str)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(report), f, indent=1, ensure_ascii=False, allow_nan=False)
        f.write("\n")




def format_rewrites(report: dict) -> str:
    """Text lines for fusion regions and attention rewrites: bytes before and after each."""
    lines = []
    regions = report.get("regions") or []
    if regions:
        before = sum(r["bytes_before"] for r in regions)
        after = sum(r["bytes_after"] for r in regions)
        lines.append(f"fusion: {len(regions)} regions, {fmt_bytes(before)} -> {fmt_bytes(after)} moved")
        for r in regions:
            speedup = r.get("predicted_speedup")
            lines.append(f"  {r['id']}: {', '.join(r['nodes'])}: {fmt_bytes(r['bytes_before'])} -> "
                         f"{fmt_bytes(r['bytes_after'])}" + (f", predicted {speedup:.2f}x" if speedup else ""))
    parallel = report.get("tensor_parallel")
    if parallel:
        link = parallel["interconnect"]
        lines.append(f"tensor parallel over {parallel['world_size']} GPUs (costs are one GPU's): "
                     f"{fmt_bytes(parallel['local_weight_bytes'])} of {fmt_bytes(parallel['weight_bytes'])} weights "
                     f"each; {parallel['collectives']} collectives send {fmt_bytes(parallel['link_bytes'])} "
                     f"({fmt_bytes(parallel['link_bytes_per_layer'])} per layer), "
                     f"{fmt_time(parallel['collective_time_s'])} at "
                     + (f"{link / 1e9:.0f} GB/s" if link else "an unknown interconnect bandwidth"))
    for a in report.get("attention") or []:
        reason = f" ({a['reason']})" if a.get("reason") else ""
        lines.append(f"attention {a.get('module') or a['node']}: {a['pattern']} -> {a['kernel']}{reason}, "
                     f"mask={a['mask']}, {fmt_bytes(a['bytes_before'])} -> {fmt_bytes(a['bytes_after'])}")
    return "\n".join(lines)
