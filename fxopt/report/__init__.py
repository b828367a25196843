"""Renderers for the annotated-graph report: plain-text table, JSON, Graphviz DOT/SVG, one-page HTML.

Everything here consumes the report dict built by the analysis (see `fxopt annotate`): a JSON-serialisable
mapping with "model", "hardware", "sizes", "nodes" (graph order), "layers", "total", "regions" and
"attention". This package never imports torch: it only formats numbers that were already computed.

    numbers.py  formatting and the layer/total arithmetic the renderers share
    text.py     the table and the rewrites summary `fxopt annotate` prints; JSON
    graph.py    Graphviz DOT / SVG
    html.py     the one-page HTML report with its roofline plot

    format_table(report, max_rows=None, all_nodes=False) -> str   text table: node rows + layer rows + TOTAL
    write_json(report, path)
    to_dot(report) -> str / write_dot / write_svg   nodes coloured by roofline bound, regions as clusters
    to_html(report) -> str / write_html             self-contained page: roofline, sortable tables, graph
    roofline_axes(report) -> RooflineAxes           the log-log map (AI, FLOP/s) -> SVG pixels of the plot
"""

from fxopt.report.graph import GraphvizNotFoundError, to_dot, write_dot, write_svg
from fxopt.report.html import RooflineAxes, roofline_axes, to_html, write_html
from fxopt.report.numbers import fmt_ai, fmt_bytes, fmt_flops, fmt_rate, fmt_time
from fxopt.report.text import format_rewrites, format_table, write_json

__all__ = [
    "GraphvizNotFoundError",
    "RooflineAxes",
    "fmt_ai",
    "fmt_bytes",
    "fmt_flops",
    "fmt_rate",
    "fmt_time",
    "format_rewrites",
    "format_table",
    "roofline_axes",
    "to_dot",
    "to_html",
    "write_dot",
    "write_html",
    "write_json",
    "write_svg",
]
