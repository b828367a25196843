"""The report as one self-contained HTML page: the roofline plot (inline SVG), sortable node and layer
tables, and the graph when it is small enough to lay out."""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxopt.report.graph import render_svg, to_dot
from fxopt.report.numbers import (
    SI_PREFIXES,
    as_float,
    fmt_ai,
    fmt_bytes,
    fmt_flops,
    fmt_rate,
    fmt_shape,
    fmt_time,
    intensity,
    layer_summaries,
    node_bytes,
    report_total,
    short_op,
    sizes_text,
)
from fxopt.report.text import percent

# Graphs larger than this are not laid out for the HTML page (dot's layout time grows quickly);
# the page says so and points at `write_dot` / `dot -Tsvg` instead.
HTML_GRAPH_MAX_NODES = 1500


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
    bw = as_float(hw.get("bandwidth")) or 1.0
    peak = as_float(hw.get("peak_flops")) or 1.0
    vec = as_float(hw.get("peak_flops_vector"))
    return bw, peak, vec


def _plot_points(report: dict) -> list[tuple[dict, float, float]]:
    """(node, AI, attained FLOP/s) for every node that can sit on log-log axes (FLOPs > 0 and bytes > 0)."""
    bw, peak, _ = _peaks(report)
    points = []
    for n in report.get("nodes", []):
        flops, nbytes = as_float(n.get("flops")), node_bytes(n)
        if flops <= 0 or nbytes <= 0:
            continue
        ai = flops / nbytes
        t = as_float(n.get("time_s"))
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
    i = max(0, min(len(SI_PREFIXES) - 1, int(math.floor(math.log10(v) / 3 + 1e-9))))
    return f"{v / 1000.0**i:g}{SI_PREFIXES[i]}"


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
    total_time = sum(as_float(n.get("time_s")) for n, _, _ in points) or 1.0
    index = {id(n): i for i, n in enumerate(report.get("nodes", []))}
    kinds_count: dict[str, int] = {}
    o.append('<g class="points" clip-path="url(#plotclip)" stroke="#ffffff" stroke-width="0.8">')
    for n, ai, rate in sorted(points, key=lambda p: -as_float(p[0].get("time_s"))):
        kind = str(n.get("kind") or "unknown")
        kinds_count[kind] = kinds_count.get(kind, 0) + 1
        share = as_float(n.get("time_s")) / total_time
        r = min(14.0, 3.5 + 40.0 * math.sqrt(share))
        px, py = ax(ai, rate)
        tip = (f"{n.get('name', '')}\n{n.get('op', '')}  [{kind}]\nAI {fmt_ai(ai)} FLOP/B · "
               f"{fmt_rate(as_float(n.get('flops')), 'FLOP')} · {fmt_bytes(node_bytes(n))}\n"
               f"time {fmt_time(as_float(n.get('time_s')))} ({n.get('bound', '?')}-bound)")
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
    skipped = [n for n in report.get("nodes", []) if (as_float(n.get("flops")) <= 0) != (node_bytes(n) <= 0)]
    if skipped:
        sb = sum(node_bytes(n) for n in skipped)
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
        svg = render_svg(to_dot(report))
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
    total = report_total(report)
    bw, peak, vec = _peaks(report)
    tf, tb, tt = as_float(total.get("flops")), as_float(total.get("bytes")), as_float(total.get("time_s"))
    mem_time = sum(as_float(n.get("time_s")) for n in nodes if n.get("bound") == "memory")
    model = _e(report.get("model", "model"))

    cards = [
        ("predicted time", fmt_time(tt)), ("FLOPs", fmt_flops(tf)), ("bytes moved", fmt_bytes(tb)),
        ("arithmetic intensity", f"{fmt_ai(intensity(tf, tb))} FLOP/B"),
        ("time memory-bound", percent(mem_time, tt)), ("nodes", str(len(nodes))),
    ]
    if total.get("params"):
        cards.append(("parameters", fmt_flops(as_float(total["params"]))))
    hw_text = (f"{hw.get('name', '?')} · {hw.get('dtype', '?')} · {fmt_rate(bw, 'B/s')} · "
               f"{fmt_rate(peak, 'FLOP/s')} matmul" + (f" · {fmt_rate(vec, 'FLOP/s')} vector" if vec else ""))

    o: list[str] = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                    f"<script>{_ERROR_HOOK}</script>",
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    f"<title>fxopt annotate — {model}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    o.append(f"<h1>{model}</h1>")
    o.append(f'<div class="meta">{_e(hw_text)} · evaluated at {_e(sizes_text(report) or "-")}</div>')
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
    for layer in layer_summaries(report):
        f, b, t = as_float(layer.get("flops")), as_float(layer.get("bytes")), as_float(layer.get("time_s"))
        ai = intensity(f, b)
        o.append("<tr>" + _td(layer.get("layer") or "(top level)") + _td(fmt_flops(f), f, "n")
                 + _td(fmt_bytes(b), b, "n") + _td(fmt_ai(ai), ai, "n") + _td(fmt_time(t), t, "n")
                 + _td(percent(t, tt), t, "n") + "</tr>")
    o.append("</tbody><tfoot><tr>" + _td("TOTAL") + _td(fmt_flops(tf), tf, "n") + _td(fmt_bytes(tb), tb, "n")
             + _td(fmt_ai(intensity(tf, tb)), None, "n") + _td(fmt_time(tt), tt, "n")
             + _td(percent(tt, tt), None, "n")
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
        f, b, t = as_float(n.get("flops")), node_bytes(n), as_float(n.get("time_s"))
        ai = n.get("intensity")
        if ai is None:
            ai = intensity(f, b)
        bound = str(n.get("bound") or "")
        unknown = bound == "unknown" and not (f or b)
        tip = f' title="{_e(n.get("flops_expr", ""))} FLOPs; {_e(n.get("bytes_expr", ""))} bytes"' \
            if n.get("flops_expr") or n.get("bytes_expr") else ""
        rows.append(
            f'<tr id="node-{i}"{tip}>' + _td(str(i), i, "n") + _td(n.get("name", ""))
            + _td(short_op(n.get("op", "")))
            + _td(n.get("kind", "")) + _td(n.get("layer") or "") + _td(fmt_shape(n.get("shapes")))
            + _td("?" if unknown else fmt_flops(f), f, "n") + _td("?" if unknown else fmt_bytes(b), b, "n")
            + _td("?" if unknown else fmt_ai(ai), as_float(ai) if ai is not None else None, "n")
            + _td(bound, None, f"b-{_e(bound)}") + _td("?" if unknown else fmt_time(t), t, "n")
            + _td("?" if unknown else percent(t, tt), t, "n")
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
            bb, ba = as_float(r.get("bytes_before")), as_float(r.get("bytes_after"))
            sp = r.get("predicted_speedup")
            o.append("<tr>" + _td(r.get("id", "")) + _td(", ".join(map(str, r.get("nodes", []))))
                     + _td(fmt_bytes(bb), bb, "n") + _td(fmt_bytes(ba), ba, "n")
                     + _td(fmt_bytes(bb - ba), bb - ba, "n")
                     + _td(f"{as_float(sp):.2f}×" if sp else "-", as_float(sp) if sp else None, "n")
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
            bb, ba = as_float(a.get("bytes_before")), as_float(a.get("bytes_after"))
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
