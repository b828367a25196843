"""Renderers for the annotated-graph report: plain-text table, JSON, Graphviz DOT/SVG, one-page HTML.

Everything here consumes the report dict built by the analysis (see `fxopt annotate`): a JSON-serialisable
mapping with "model", "hardware", "sizes", "nodes" (graph order), "layers", "total", "regions" and
"attention". This module never imports torch: it only formats numbers that were already computed.

    format_table(report, max_rows=None, all_nodes=False) -> str   text table: node rows + layer rows + TOTAL
    write_json(report, path)
    to_dot(report) -> str / write_dot / write_svg   nodes coloured by roofline bound, regions as clusters
    to_html(report) -> str / write_html             self-contained page: roofline, sortable tables, graph
    roofline_axes(report) -> RooflineAxes           the log-log map (AI, FLOP/s) -> SVG pixels of the plot
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxopt.opnames import BOOKKEEPING

__all__ = [
    "GraphvizNotFoundError",
    "RooflineAxes",
    "format_table",
    "roofline_axes",
    "to_dot",
    "to_html",
    "write_dot",
    "write_html",
    "write_json",
    "write_svg",
]

# Graphs larger than this are not laid out for the HTML page (dot's layout time grows quickly);
# the page says so and points at `write_dot` / `dot -Tsvg` instead.
HTML_GRAPH_MAX_NODES = 1500
DOT_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------------------------

_SI = ["", "k", "M", "G", "T", "P", "E"]
_BYTES = ["B", "KB", "MB", "GB", "TB", "PB"]
_TIME = [(1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")]


def _num(x: float) -> str:
    """Three significant figures, no exponent, for 0.001 <= |x| < 1000."""
    ax = abs(x)
    if ax >= 99.95:
        return f"{x:.0f}"
    if ax >= 9.995:
        return f"{x:.1f}"
    if ax >= 0.9995:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _prefixed(x: float | None, units: list[str], base: float = 1000.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0" if units[0] == "" else f"0 {units[0]}"
    if math.isinf(x):
        return "inf"
    ax = abs(x)
    i = min(len(units) - 1, max(0, int(math.log(ax, base)))) if ax >= base else 0
    if i < len(units) - 1 and ax / base**i >= 999.95:  # rounds up into the next prefix
        i += 1
    text = _num(x / base**i)
    return f"{text} {units[i]}".rstrip() if units[i] else text


def fmt_flops(x: float | None) -> str:
    """2.1e9 -> '2.10 G' (FLOP count; the column header carries the unit)."""
    return _prefixed(x, _SI)


def fmt_bytes(x: float | None) -> str:
    """4.2e6 -> '4.20 MB' (decimal units, matching datasheet bandwidths)."""
    return _prefixed(x, _BYTES)


def fmt_time(x: float | None) -> str:
    """2.1e-6 -> '2.10 µs'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0 s"
    for scale, unit in _TIME:
        if abs(x) >= scale * 0.99995 or unit == "ns":
            value = x / scale
            if round(abs(value), 1) >= 999.95 and unit != "s":
                continue
            return f"{_num(value)} {unit}"
    return f"{x:.3g} s"  # pragma: no cover


def fmt_ai(x: float | None) -> str:
    """Arithmetic intensity in FLOP/byte: '330', '0.250', '1,365'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    if abs(x) >= 999.5:
        return f"{x:,.0f}"
    return _num(x)


def fmt_rate(x: float, unit: str) -> str:
    """9.894e14, 'FLOP/s' -> '989 TFLOP/s'."""
    number, _, prefix = _prefixed(x, _SI).partition(" ")
    return f"{number} {prefix}{unit}"


def fmt_shape(shapes: Any) -> str:
    if not shapes:
        return "-"
    if isinstance(shapes, (list, tuple)) and shapes and not isinstance(shapes[0], (list, tuple)):
        shapes = [shapes]  # a single shape given flat
    parts = []
    for shape in shapes:
        if shape is None:
            parts.append("?")
        elif isinstance(shape, (list, tuple)):
            parts.append("×".join(str(d) for d in shape) if shape else "scalar")
        else:
            parts.append(str(shape))
    return ", ".join(parts)


def short_op(op: str) -> str:
    """'aten.linear.default' -> 'linear'; other names unchanged."""
    op = op or ""
    if op.startswith("<built-in function "):  # operator.getitem and friends
        op = op[len("<built-in function "):-1]
    if op.startswith("aten."):
        op = op[5:]
    if op.endswith(".default"):
        op = op[: -len(".default")]
    return op


def _f(x: Any) -> float:
    """A report number as float (None / missing -> 0)."""
    try:
        return float(x) if x is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _node_bytes(n: dict) -> float:
    if "bytes" in n and n.get("bytes") is not None:
        return _f(n["bytes"])
    return _f(n.get("bytes_read")) + _f(n.get("bytes_written"))


def _intensity(flops: float, nbytes: float) -> float | None:
    if nbytes > 0:
        return flops / nbytes
    return math.inf if flops > 0 else None


def _layers(report: dict) -> list[dict]:
    """Per-layer rows from the report, or grouped from the nodes when the report has none."""
    layers = report.get("layers")
    if layers:
        return list(layers)
    groups: dict[str, dict] = {}
    for n in report.get("nodes", []):
        g = groups.setdefault(n.get("layer") or "", {"layer": n.get("layer") or "", "flops": 0.0,
                                                    "bytes": 0.0, "time_s": 0.0})
        g["flops"] += _f(n.get("flops"))
        g["bytes"] += _node_bytes(n)
        g["time_s"] += _f(n.get("time_s"))
    return list(groups.values())


def _total(report: dict) -> dict:
    """The report's total, with any missing number summed from the nodes."""
    total = dict(report.get("total") or {})
    nodes = report.get("nodes", [])
    if total.get("flops") is None:
        total["flops"] = sum(_f(n.get("flops")) for n in nodes)
    if total.get("bytes") is None:
        total["bytes"] = sum(_node_bytes(n) for n in nodes)
    if total.get("time_s") is None:
        total["time_s"] = sum(_f(n.get("time_s")) for n in nodes)
    return total


def _sizes_text(report: dict) -> str:
    sizes = report.get("sizes") or {}
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


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


def _pct(part: float, whole: float) -> str:
    if whole <= 0:
        return "-"
    return f"{100.0 * part / whole:.1f}%"


def is_bookkeeping(node: dict) -> bool:
    """A report node that is graph bookkeeping (fxopt.opnames.BOOKKEEPING) with no cost of its own."""
    return short_op(str(node.get("op", ""))) in BOOKKEEPING and not (_f(node.get("flops")) or _node_bytes(node))


def format_table(report: dict, *, max_rows: int | None = None, all_nodes: bool = False) -> str:
    """An aligned plain-text table of the report.

    Node rows (graph order; bookkeeping nodes left out unless `all_nodes`, then at most `max_rows` of them,
    then a "… N more nodes" line), then one row per
    layer, then TOTAL, then a line with the symbolic total formulas. Numbers carry human units:
    FLOPs k/M/G/T, bytes B/KB/MB/GB, time ns/µs/ms/s; AI is FLOP per byte.
    """
    nodes = report.get("nodes", [])
    total = _total(report)
    total_time = _f(total.get("time_s"))
    listed = nodes if all_nodes else [n for n in nodes if not is_bookkeeping(n)]
    shown = listed if max_rows is None else listed[: max(0, max_rows)]

    node_rows = []
    for n in shown:
        flops, nbytes = _f(n.get("flops")), _node_bytes(n)
        ai = n.get("intensity")
        if ai is None:
            ai = _intensity(flops, nbytes)
        cost = [fmt_flops(flops), fmt_bytes(nbytes), fmt_ai(ai), str(n.get("bound", "")),
                fmt_time(_f(n.get("time_s"))), _pct(_f(n.get("time_s")), total_time)]
        if n.get("bound") == "unknown" and not (flops or nbytes):
            cost = ["?", "?", "?", "unknown", "?", "?"]  # not free: its cost is not known
        node_rows.append([str(n.get("name", "")), short_op(str(n.get("op", ""))), str(n.get("kind", "")),
                          fmt_shape(n.get("shapes")), *cost, str(n.get("region") or "-")])

    layer_rows = []
    for layer in _layers(report):
        flops, nbytes, t = _f(layer.get("flops")), _f(layer.get("bytes")), _f(layer.get("time_s"))
        layer_rows.append([
            str(layer.get("layer") or "(top level)"), "", "layer", "", fmt_flops(flops), fmt_bytes(nbytes),
            fmt_ai(_intensity(flops, nbytes)), "", fmt_time(t), _pct(t, total_time), "",
        ])
    tf, tb = _f(total.get("flops")), _f(total.get("bytes"))
    total_row = ["TOTAL", "", f"{len(nodes)} nodes", "", fmt_flops(tf), fmt_bytes(tb),
                 fmt_ai(_intensity(tf, tb)), "", fmt_time(total_time), _pct(total_time, total_time), ""]

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
            + (f" at {_sizes_text(report)}" if report.get("sizes") else ""))
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
        at = f"   (numbers above at {_sizes_text(report)})" if report.get("sizes") else ""
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
    flops, nbytes = _f(n.get("flops")), _node_bytes(n)
    bound = str(n.get("bound") or "unknown")
    kind = str(n.get("kind") or "")
    name, op = str(n.get("name", "")), short_op(str(n.get("op", "")))
    lines = [name] if name.startswith(op.split(".")[0]) else [name, op]
    if flops or nbytes:
        lines.append(f"{fmt_rate(flops, 'FLOP')} · {fmt_bytes(nbytes)}")
        lines.append(f"{bound} · {fmt_time(_f(n.get('time_s')))}")
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
    title = f"{report.get('model', '')} on {hw.get('name', '')} at {_sizes_text(report)}"

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
            label += f"\n{fmt_bytes(_f(before))} → {fmt_bytes(_f(after))}"
        if r.get("predicted_speedup"):
            label += f" ({_f(r['predicted_speedup']):.2g}× predicted)"
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


def _render_svg(dot_source: str, timeout: float | None = DOT_TIMEOUT_S) -> str:
    proc = subprocess.run([_dot_binary(), "-Tsvg"], input=dot_source.encode("utf-8"),
                          capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")[:500]
        raise RuntimeError(f"dot failed (exit {proc.returncode}): {err}")
    return proc.stdout.decode("utf-8")


def write_svg(report: dict, path: str | os.PathLike, *, timeout: float | None = DOT_TIMEOUT_S) -> None:
    """Render the graph to SVG with Graphviz's `dot`; GraphvizNotFoundError if it is not installed."""
    Path(path).write_text(_render_svg(to_dot(report), timeout), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------
# Roofline plot (inline SVG)
# --------------------------------------------------------------------------------------------------------

KIND_COLOR = {
    "matmul": "#1f77b4", "attention": "#9467bd", "pointwise": "#2ca02c", "reduction": "#ff7f0e",
    "layout": "#7f7f7f", "other": "#8c564b", "unknown": "#e377c2",
}


@dataclass(frozen=True)
class RooflineAxes:
    """Log-log mapping of (arithmetic intensity FLOP/byte, FLOP/s) to SVG pixels of the roofline plot."""

    x_min: float
    x_max: float
    y_min: float
    y_max: float
    width: int = 1000
    height: int = 560
    left: int = 90
    right: int = 200  # room for the legend
    top: int = 44
    bottom: int = 62

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom

    def x(self, ai: float) -> float:
        lo, hi = math.log10(self.x_min), math.log10(self.x_max)
        return self.left + (math.log10(ai) - lo) / (hi - lo) * self.plot_width

    def y(self, flops: float) -> float:
        lo, hi = math.log10(self.y_min), math.log10(self.y_max)
        return self.top + (1.0 - (math.log10(flops) - lo) / (hi - lo)) * self.plot_height

    def __call__(self, ai: float, flops: float) -> tuple[float, float]:
        return self.x(ai), self.y(flops)


def _peaks(report: dict) -> tuple[float, float, float]:
    hw = report.get("hardware") or {}
    bw = _f(hw.get("bandwidth")) or 1.0
    peak = _f(hw.get("peak_flops")) or 1.0
    vec = _f(hw.get("peak_flops_vector"))
    return bw, peak, vec


def _plot_points(report: dict) -> list[tuple[dict, float, float]]:
    """(node, AI, attained FLOP/s) for every node that can sit on log-log axes (FLOPs > 0 and bytes > 0)."""
    bw, peak, _ = _peaks(report)
    points = []
    for n in report.get("nodes", []):
        flops, nbytes = _f(n.get("flops")), _node_bytes(n)
        if flops <= 0 or nbytes <= 0:
            continue
        ai = flops / nbytes
        t = _f(n.get("time_s"))
        rate = flops / t if t > 0 else min(peak, ai * bw)
        points.append((n, ai, rate))
    return points


def roofline_axes(report: dict) -> RooflineAxes:
    """The axes of the HTML roofline plot: whole decades of AI around the nodes and the ridge point;
    FLOP/s from a decade below the lowest point (or the memory roof at the left edge) to 2.5× peak."""
    bw, peak, vec = _peaks(report)
    ridge = peak / bw
    ais = [ai for _, ai, _ in _plot_points(report)]
    rates = [r for _, _, r in _plot_points(report)]
    lo = min(ais + [ridge / 100.0, (vec / bw) if vec else ridge])
    hi = max(ais + [ridge * 10.0])
    x_min = 10.0 ** math.floor(math.log10(lo) - 1e-9)
    x_max = 10.0 ** math.ceil(math.log10(hi) + 1e-9)
    y_lo = min(rates + [x_min * bw])
    y_min = 10.0 ** math.floor(math.log10(y_lo) - 1e-9)
    y_max = max(rates + [peak]) * 2.5
    return RooflineAxes(x_min, x_max, y_min, y_max)


def _log_ticks(lo: float, hi: float):
    """(value, is_decade) for 1..9 x 10^d within [lo, hi] (a little slack at both ends)."""
    for d in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in range(1, 10):
            v = m * 10.0**d
            if lo * 0.999 <= v <= hi * 1.001:
                yield v, m == 1


def _ai_tick(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _rate_tick(v: float) -> str:
    """Decade tick labels: 1e12 -> '1T', 1e13 -> '10T', 1e14 -> '100T'."""
    i = max(0, min(len(_SI) - 1, int(math.floor(math.log10(v) / 3 + 1e-9))))
    return f"{v / 1000.0**i:g}{_SI[i]}"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _p(v: float) -> str:
    return f"{v:.2f}"


_FONT = "system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"


def roofline_svg(report: dict) -> str:
    """The roofline plot as an inline `<svg id="roofline">`.

    Solid line: min(peak, AI × bandwidth) with the ridge point (peak / bandwidth) marked; dashed: the
    vector-unit ceiling. One `<circle>` per node with FLOPs > 0 and bytes > 0, at its attained rate
    (FLOPs / predicted time), coloured by kind, area proportional to predicted time, with a tooltip.
    """
    ax = roofline_axes(report)
    bw, peak, vec = _peaks(report)
    hw = report.get("hardware") or {}
    ridge = peak / bw
    x0, x1 = ax.left, ax.left + ax.plot_width
    y0, y1 = ax.top, ax.top + ax.plot_height
    o: list[str] = []
    o.append(f'<svg id="roofline" xmlns="http://www.w3.org/2000/svg" width="{ax.width}" height="{ax.height}" '
             f'viewBox="0 0 {ax.width} {ax.height}" role="img" aria-label="roofline plot" '
             f'font-family="{_FONT}" font-size="13">')
    o.append('<defs><clipPath id="plotclip">'
             f'<rect x="{x0}" y="{y0}" width="{_p(ax.plot_width)}" height="{_p(ax.plot_height)}"/>'
             '</clipPath></defs>')
    o.append(f'<rect x="0" y="0" width="{ax.width}" height="{ax.height}" fill="#ffffff"/>')
    o.append(f'<text x="{x0}" y="{ax.top - 16}" font-size="16" font-weight="600" fill="#222">'
             f'Roofline — {_e(hw.get("name", ""))}, {_e(hw.get("dtype", ""))}</text>')

    # grid and ticks: decades labelled, 2..9 as minor ticks
    g = ['<g class="grid" stroke="#e6e6e6" stroke-width="1">']
    t = ['<g class="ticks" fill="#333" font-size="12">']
    for v, major in _log_ticks(ax.x_min, ax.x_max):
        px = _p(ax.x(v))
        if major:
            g.append(f'<line x1="{px}" y1="{y0}" x2="{px}" y2="{y1}"/>')
            t.append(f'<line x1="{px}" y1="{y1}" x2="{px}" y2="{y1 + 6}" stroke="#333"/>')
            t.append(f'<text x="{px}" y="{y1 + 21}" text-anchor="middle">{_ai_tick(v)}</text>')
        else:
            t.append(f'<line x1="{px}" y1="{y1}" x2="{px}" y2="{y1 + 3}" stroke="#666"/>')
    for v, major in _log_ticks(ax.y_min, ax.y_max):
        py = _p(ax.y(v))
        if major:
            g.append(f'<line x1="{x0}" y1="{py}" x2="{x1}" y2="{py}"/>')
            t.append(f'<line x1="{x0 - 6}" y1="{py}" x2="{x0}" y2="{py}" stroke="#333"/>')
            t.append(f'<text x="{x0 - 9}" y="{py}" text-anchor="end" dominant-baseline="middle">'
                     f'{_rate_tick(v)}</text>')
        else:
            t.append(f'<line x1="{x0 - 3}" y1="{py}" x2="{x0}" y2="{py}" stroke="#666"/>')
    g.append("</g>")
    t.append("</g>")
    o.extend(g)
    o.extend(t)
    o.append(f'<rect x="{x0}" y="{y0}" width="{_p(ax.plot_width)}" height="{_p(ax.plot_height)}" '
             'fill="none" stroke="#333"/>')
    o.append(f'<text x="{_p((x0 + x1) / 2)}" y="{ax.height - 14}" text-anchor="middle" fill="#222">'
             'arithmetic intensity (FLOP / byte)</text>')
    o.append(f'<text transform="translate(22,{_p((y0 + y1) / 2)}) rotate(-90)" text-anchor="middle" '
             'fill="#222">attainable FLOP/s</text>')

    # ceilings
    o.append('<g clip-path="url(#plotclip)">')
    roof = [(ax.x_min, ax.x_min * bw), (ridge, peak), (ax.x_max, peak)]
    o.append('<polyline id="roof" fill="none" stroke="#222" stroke-width="2.2" points="'
             + " ".join(f"{_p(ax.x(a))},{_p(ax.y(f))}" for a, f in roof)
             + f'" data-points="{" ".join(f"{a!r},{f!r}" for a, f in roof)}"/>')
    if vec and vec < peak:
        vridge = vec / bw
        o.append(f'<polyline id="roof-vector" fill="none" stroke="#222" stroke-width="1.6" '
                 f'stroke-dasharray="7 5" points="{_p(ax.x(vridge))},{_p(ax.y(vec))} '
                 f'{_p(ax.x(ax.x_max))},{_p(ax.y(vec))}"/>')
    o.append("</g>")
    # ceiling labels
    # ceiling labels sit above the largest circles (r <= 14) that lie on the line
    o.append(f'<text x="{x1 - 8}" y="{_p(ax.y(peak) - 18)}" text-anchor="end" fill="#222" font-size="12">'
             f'{_e(hw.get("dtype", ""))} matmul peak {fmt_rate(peak, "FLOP/s")}</text>')
    if vec and vec < peak:
        o.append(f'<text x="{x1 - 8}" y="{_p(ax.y(vec) - 18)}" text-anchor="end" fill="#444" '
                 f'font-size="12">vector peak {fmt_rate(vec, "FLOP/s")}</text>')
    # memory-roof label, rotated along the slope, below the line, where it is farthest from any point
    pix = [ax(ai, rate) for _, ai, rate in _plot_points(report)] + [ax(ridge, peak)]
    if vec and vec < peak:
        pix.append(ax(vec / bw, vec))  # where the dashed vector ceiling starts
    span = math.log10(min(ridge / 3, ax.x_max) / ax.x_min)
    if span > 0.8:
        dx = ax.x(ax.x_min * 10) - ax.x(ax.x_min)
        dy = ax.y(ax.x_min * 10 * bw) - ax.y(ax.x_min * bw)
        angle = math.degrees(math.atan2(dy, dx))
        text_len = 7.0 * len(f"memory {fmt_rate(bw, 'B/s')}")

        def clearance(lx: float) -> float:  # distance from start, middle and end of the label to points
            x0_, y0_ = ax(lx, lx * bw)
            along = [(x0_ + f * text_len * math.cos(math.radians(angle)),
                      y0_ + f * text_len * math.sin(math.radians(angle))) for f in (0.0, 0.5, 1.0)]
            return min([math.hypot(cx - px_, cy - py_) for cx, cy in along for px_, py_ in pix] + [1e9])

        candidates = [ax.x_min * 10 ** (0.15 + k * 0.1) for k in range(int((span - 0.8) / 0.1) + 1)]
        lx = max(candidates, key=clearance)
        px, py = ax(lx, lx * bw)
        ox, oy = 6 * math.sin(math.radians(-angle)), 6 * math.cos(math.radians(-angle)) + 12
        o.append(f'<text transform="translate({_p(px + ox)},{_p(py + oy)}) rotate({angle:.2f})" fill="#222" '
                 f'font-size="12">memory {fmt_rate(bw, "B/s")}</text>')
    # points: biggest first so small ones stay visible on top
    points = _plot_points(report)
    total_time = sum(_f(n.get("time_s")) for n, _, _ in points) or 1.0
    index = {id(n): i for i, n in enumerate(report.get("nodes", []))}
    kinds_count: dict[str, int] = {}
    o.append('<g class="points" clip-path="url(#plotclip)" stroke="#ffffff" stroke-width="0.8">')
    for n, ai, rate in sorted(points, key=lambda p: -_f(p[0].get("time_s"))):
        kind = str(n.get("kind") or "unknown")
        kinds_count[kind] = kinds_count.get(kind, 0) + 1
        share = _f(n.get("time_s")) / total_time
        r = min(14.0, 3.5 + 40.0 * math.sqrt(share))
        px, py = ax(ai, rate)
        tip = (f"{n.get('name', '')}\n{n.get('op', '')}  [{kind}]\nAI {fmt_ai(ai)} FLOP/B · "
               f"{fmt_rate(_f(n.get('flops')), 'FLOP')} · {fmt_bytes(_node_bytes(n))}\n"
               f"time {fmt_time(_f(n.get('time_s')))} ({n.get('bound', '?')}-bound)")
        o.append(f'<a href="#node-{index.get(id(n), 0)}"><circle class="pt" cx="{_p(px)}" cy="{_p(py)}" '
                 f'r="{r:.1f}" fill="{KIND_COLOR.get(kind, "#444")}" fill-opacity="0.78" '
                 f'data-name="{_e(n.get("name", ""))}"><title>{_e(tip)}</title></circle></a>')
    o.append("</g>")

    # ridge point, drawn over the points
    rx, ry = ax(ridge, peak)
    o.append(f'<line x1="{_p(rx)}" y1="{_p(ry)}" x2="{_p(rx)}" y2="{y1}" stroke="#b03030" '
             'stroke-width="1" stroke-dasharray="2 3"/>')
    diamond = f"{_p(rx)},{_p(ry - 6)} {_p(rx + 6)},{_p(ry)} {_p(rx)},{_p(ry + 6)} {_p(rx - 6)},{_p(ry)}"
    o.append(f'<polygon id="ridge" data-cx="{_p(rx)}" data-cy="{_p(ry)}" fill="#b03030" points="{diamond}">'
             f'<title>ridge point: {fmt_ai(ridge)} FLOP/byte = peak / bandwidth</title></polygon>')
    o.append(f'<text x="{_p(rx + 6)}" y="{_p(ry + 36)}" fill="#b03030" font-size="12">ridge '
             f'{fmt_ai(ridge)} FLOP/B</text>')

    # legend
    lx0 = x1 + 22
    ly = y0 + 8
    o.append(f'<g class="legend" font-size="12" fill="#222"><text x="{lx0}" y="{ly}" font-weight="600">'
             'node kind</text>')
    for kind, color in KIND_COLOR.items():
        if kind not in kinds_count:
            continue
        ly += 22
        o.append(f'<circle cx="{lx0 + 6}" cy="{ly - 4}" r="6" fill="{color}" fill-opacity="0.78" '
                 f'class="legend-swatch"/>'
                 f'<text x="{lx0 + 18}" y="{ly}">{_e(kind)} ({kinds_count[kind]})</text>')
    ly += 34
    o.append(f'<line x1="{lx0}" y1="{ly - 4}" x2="{lx0 + 24}" y2="{ly - 4}" stroke="#222" '
             'stroke-width="2.2"/>'
             f'<text x="{lx0 + 30}" y="{ly}">roofline</text>')
    if vec and vec < peak:
        ly += 22
        o.append(f'<line x1="{lx0}" y1="{ly - 4}" x2="{lx0 + 24}" y2="{ly - 4}" stroke="#222" '
                 f'stroke-width="1.6" stroke-dasharray="7 5"/>'
                 f'<text x="{lx0 + 30}" y="{ly}">vector ceiling</text>')
    ly += 22
    o.append(f'<polygon fill="#b03030" points="{lx0 + 12},{ly - 10} {lx0 + 18},{ly - 4} {lx0 + 12},{ly + 2} '
             f'{lx0 + 6},{ly - 4}"/><text x="{lx0 + 30}" y="{ly}">ridge point</text>')
    ly += 30
    o.append(f'<text x="{lx0}" y="{ly}" fill="#555">circle area ∝ predicted time</text>')
    skipped = [n for n in report.get("nodes", []) if (_f(n.get("flops")) <= 0) != (_node_bytes(n) <= 0)]
    if skipped:
        sb = sum(_node_bytes(n) for n in skipped)
        ly += 18
        o.append(f'<text x="{lx0}" y="{ly}" fill="#555">{len(skipped)} zero-FLOP '
                 f'node{"s" if len(skipped) != 1 else ""}</text>')
        ly += 16
        o.append(f'<text x="{lx0}" y="{ly}" fill="#555">({fmt_bytes(sb)}) not plotted</text>')
    o.append("</g>")
    o.append("</svg>")
    return "\n".join(o)


# --------------------------------------------------------------------------------------------------------
# HTML page
# --------------------------------------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px 32px;
       color: #222; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #555; margin-bottom: 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0 4px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .v { font-size: 19px; font-weight: 600; } .card .k { font-size: 12px; color: #666; }
.panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; display: inline-block; }
table { border-collapse: collapse; background: #fff; font-size: 12.5px; }
th, td { border-bottom: 1px solid #e5e5e5; padding: 3px 9px; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \\25B2"; font-size: 10px; }
th.sorted-desc::after { content: " \\25BC"; font-size: 10px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tfoot td { font-weight: 600; border-top: 2px solid #999; }
tr:target td { background: #fff3bf; }
.scroll { max-height: 620px; overflow: auto; border: 1px solid #ddd; display: inline-block; max-width: 100%; }
.graph { overflow: auto; max-height: 900px; max-width: 100%; border: 1px solid #ddd; background: #fff; }
.b-compute { color: #b35806; } .b-memory { color: #1f6f9f; }
.b-free { color: #888; } .b-unknown { color: #c00; }
code { font-size: 12px; }
.note { color: #666; }
"""

# Marks the page if any script error happens (read back by the browser test through --dump-dom).
_ERROR_HOOK = """
window.onerror = function (msg, src, line) {
  document.documentElement.setAttribute("data-fxopt-error", String(msg) + " @" + line);
  document.title = "JS ERROR: " + msg;
};
window.addEventListener("unhandledrejection", function (e) {
  document.documentElement.setAttribute("data-fxopt-error", "unhandledrejection: " + e.reason);
});
"""

# Sortable tables: click a header to sort by that column (numbers by data-v, else text); click again to
# reverse. A URL hash "#sort=<table-id>:<column>[:asc]" sorts on load.
_SORT_JS = """
(function () {
  function key(cell) {
    var v = cell.getAttribute("data-v");
    if (v !== null && v !== "") { var f = parseFloat(v); if (!isNaN(f)) return f; }
    return cell.textContent.trim().toLowerCase();
  }
  function sortBy(table, col, desc) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]), c;
      if (typeof x === "number" && typeof y === "number") c = x - y;
      else c = String(x).localeCompare(String(y));
      return desc ? -c : c;
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (r) { frag.appendChild(r); });
    body.appendChild(frag);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (i === col) th.classList.add(desc ? "sorted-desc" : "sorted-asc");
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.title = "click to sort";
      th.addEventListener("click", function () {
        var desc;  // first click: numbers largest first, text A-Z; then toggle
        if (th.classList.contains("sorted-asc")) desc = true;
        else if (th.classList.contains("sorted-desc")) desc = false;
        else desc = th.getAttribute("data-num") === "1";
        sortBy(table, i, desc);
      });
    });
  });
  var m = /sort=([\\w-]+):(\\d+)(:asc)?/.exec(window.location.hash);
  if (m) { var t = document.getElementById(m[1]); if (t) sortBy(t, parseInt(m[2], 10), !m[3]); }
  document.documentElement.setAttribute("data-fxopt-ready", "1");
})();
"""


def _td(text: str, value: float | None = None, cls: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    if value is not None and math.isfinite(value):
        attrs += f' data-v="{value:.6g}"'
    return f"<td{attrs}>{_e(text)}</td>"


def _th(text: str, numeric: bool = False) -> str:
    return f'<th data-num="{1 if numeric else 0}">{_e(text)}</th>'


def _graph_section(report: dict) -> str:
    n = len(report.get("nodes", []))
    if shutil.which("dot") is None:
        return ('<p class="note">Graph not drawn: Graphviz\'s <code>dot</code> is not installed '
                "(apt-get install graphviz). The DOT source can still be written with "
                "<code>fxopt annotate --format dot</code>.</p>")
    if n > HTML_GRAPH_MAX_NODES:
        return (f'<p class="note">Graph not drawn inline: {n} nodes is more than {HTML_GRAPH_MAX_NODES}, '
                "too many for an in-page layout. Write the DOT file and render it with "
                "<code>dot -Tsvg</code>.</p>")
    try:
        svg = _render_svg(to_dot(report))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        return f'<p class="note">Graph not drawn: {_e(err)}</p>'
    start = svg.find("<svg")
    svg = svg[start:] if start >= 0 else svg
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    return f'<div class="graph" id="graph">{svg}</div>'


def to_html(report: dict) -> str:
    """One self-contained HTML page (no external scripts, fonts or requests) for the report."""
    hw = report.get("hardware") or {}
    nodes = report.get("nodes", [])
    total = _total(report)
    bw, peak, vec = _peaks(report)
    tf, tb, tt = _f(total.get("flops")), _f(total.get("bytes")), _f(total.get("time_s"))
    mem_time = sum(_f(n.get("time_s")) for n in nodes if n.get("bound") == "memory")
    model = _e(report.get("model", "model"))

    cards = [
        ("predicted time", fmt_time(tt)), ("FLOPs", fmt_flops(tf)), ("bytes moved", fmt_bytes(tb)),
        ("arithmetic intensity", f"{fmt_ai(_intensity(tf, tb))} FLOP/B"),
        ("time memory-bound", _pct(mem_time, tt)), ("nodes", str(len(nodes))),
    ]
    if total.get("params"):
        cards.append(("parameters", fmt_flops(_f(total["params"]))))
    hw_text = (f"{hw.get('name', '?')} · {hw.get('dtype', '?')} · {fmt_rate(bw, 'B/s')} · "
               f"{fmt_rate(peak, 'FLOP/s')} matmul" + (f" · {fmt_rate(vec, 'FLOP/s')} vector" if vec else ""))

    o: list[str] = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                    f"<script>{_ERROR_HOOK}</script>",
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    f"<title>fxopt annotate — {model}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    o.append(f"<h1>{model}</h1>")
    o.append(f'<div class="meta">{_e(hw_text)} · evaluated at {_e(_sizes_text(report) or "-")}</div>')
    o.append('<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>' for k, v in cards)
        + "</div>")
    if total.get("flops_expr") or total.get("bytes_expr"):
        o.append(f'<div class="meta">symbolic: FLOPs = <code>{_e(total.get("flops_expr", "?"))}</code>; '
                 f'bytes = <code>{_e(total.get("bytes_expr", "?"))}</code></div>')

    o.append("<h2>Roofline</h2>")
    o.append(f'<div class="panel">{roofline_svg(report)}</div>')

    # per-layer table
    o.append("<h2>Per layer</h2>")
    o.append('<table id="layers" class="sortable"><thead><tr>'
             + "".join(_th(c, c != "layer") for c in ("layer", "FLOPs", "bytes", "AI", "time", "%time"))
             + "</tr></thead><tbody>")
    for layer in _layers(report):
        f, b, t = _f(layer.get("flops")), _f(layer.get("bytes")), _f(layer.get("time_s"))
        ai = _intensity(f, b)
        o.append("<tr>" + _td(layer.get("layer") or "(top level)") + _td(fmt_flops(f), f, "n")
                 + _td(fmt_bytes(b), b, "n") + _td(fmt_ai(ai), ai, "n") + _td(fmt_time(t), t, "n")
                 + _td(_pct(t, tt), t, "n") + "</tr>")
    o.append("</tbody><tfoot><tr>" + _td("TOTAL") + _td(fmt_flops(tf), tf, "n") + _td(fmt_bytes(tb), tb, "n")
             + _td(fmt_ai(_intensity(tf, tb)), None, "n") + _td(fmt_time(tt), tt, "n")
             + _td(_pct(tt, tt), None, "n")
             + "</tr></tfoot></table>")

    # node table
    o.append(f'<h2>Nodes <span class="note">({len(nodes)}, graph order; click a header to sort)</span></h2>')
    cols = [("#", True), ("name", False), ("op", False), ("kind", False), ("layer", False), ("shape", False),
            ("FLOPs", True), ("bytes", True), ("AI", True), ("bound", False), ("time", True), ("%time", True),
            ("region", False), ("note", False)]
    o.append('<div class="scroll"><table id="nodes" class="sortable"><thead><tr>'
             + "".join(_th(c, num) for c, num in cols) + "</tr></thead><tbody>")
    rows = []
    for i, n in enumerate(nodes):
        f, b, t = _f(n.get("flops")), _node_bytes(n), _f(n.get("time_s"))
        ai = n.get("intensity")
        if ai is None:
            ai = _intensity(f, b)
        bound = str(n.get("bound") or "")
        unknown = bound == "unknown" and not (f or b)
        tip = f' title="{_e(n.get("flops_expr", ""))} FLOPs; {_e(n.get("bytes_expr", ""))} bytes"' \
            if n.get("flops_expr") or n.get("bytes_expr") else ""
        rows.append(
            f'<tr id="node-{i}"{tip}>' + _td(str(i), i, "n") + _td(n.get("name", ""))
            + _td(short_op(n.get("op", "")))
            + _td(n.get("kind", "")) + _td(n.get("layer") or "") + _td(fmt_shape(n.get("shapes")))
            + _td("?" if unknown else fmt_flops(f), f, "n") + _td("?" if unknown else fmt_bytes(b), b, "n")
            + _td("?" if unknown else fmt_ai(ai), _f(ai) if ai is not None else None, "n")
            + _td(bound, None, f"b-{_e(bound)}") + _td("?" if unknown else fmt_time(t), t, "n")
            + _td("?" if unknown else _pct(t, tt), t, "n")
            + _td(n.get("region") or "") + _td(n.get("note") or "") + "</tr>")
    o.append("\n".join(rows))
    o.append("</tbody></table></div>")

    # fused regions and attention
    regions = report.get("regions") or []
    o.append("<h2>Fused regions</h2>")
    if regions:
        o.append('<table id="regions" class="sortable"><thead><tr>'
                 + "".join(_th(c, c in ("bytes before", "bytes after", "saved", "predicted speedup"))
                           for c in ("region", "nodes", "bytes before", "bytes after", "saved",
                                     "predicted speedup", "kernel"))
                 + "</tr></thead><tbody>")
        for r in regions:
            bb, ba = _f(r.get("bytes_before")), _f(r.get("bytes_after"))
            sp = r.get("predicted_speedup")
            o.append("<tr>" + _td(r.get("id", "")) + _td(", ".join(map(str, r.get("nodes", []))))
                     + _td(fmt_bytes(bb), bb, "n") + _td(fmt_bytes(ba), ba, "n")
                     + _td(fmt_bytes(bb - ba), bb - ba, "n")
                     + _td(f"{_f(sp):.2f}×" if sp else "-", _f(sp) if sp else None, "n")
                     + _td(r.get("kernel") or "-") + "</tr>")
        o.append("</tbody></table>")
    else:
        o.append('<p class="note">No fused regions (fusion not run, or nothing to fuse).</p>')
    attention = report.get("attention") or []
    if attention:
        o.append("<h2>Attention</h2>")
        o.append('<table id="attention" class="sortable"><thead><tr>'
                 + "".join(_th(c, c.startswith("bytes"))
                           for c in ("node", "bytes before", "bytes after", "kernel"))
                 + "</tr></thead><tbody>")
        for a in attention:
            bb, ba = _f(a.get("bytes_before")), _f(a.get("bytes_after"))
            o.append("<tr>" + _td(a.get("node", "")) + _td(fmt_bytes(bb), bb, "n")
                     + _td(fmt_bytes(ba), ba, "n")
                     + _td(a.get("kernel") or "-") + "</tr>")
        o.append("</tbody></table>")

    o.append("<h2>Graph</h2>")
    o.append('<p class="note">Fill: <span class="b-compute">compute-bound</span>, '
             '<span class="b-memory">memory-bound</span>, grey free/layout, white dashed unknown cost; '
             "red dashed outlines are fused regions.</p>")
    o.append(_graph_section(report))
    o.append(f"<script>{_SORT_JS}</script>")
    o.append("</body></html>")
    return "\n".join(o) + "\n"


def write_html(report: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(to_html(report), encoding="utf-8")


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
    for a in report.get("attention") or []:
        reason = f" ({a['reason']})" if a.get("reason") else ""
        lines.append(f"attention {a.get('module') or a['node']}: {a['pattern']} -> {a['kernel']}{reason}, "
                     f"mask={a['mask']}, {fmt_bytes(a['bytes_before'])} -> {fmt_bytes(a['bytes_after'])}")
    return "\n".join(lines)
