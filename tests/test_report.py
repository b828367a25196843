"""Tests of fxopt.report on a small hand-built report (no dependence on the analysis passes)."""

from __future__ import annotations

import html.parser
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fxopt import report as rp

# H100 SXM, bf16
BW, PEAK, VEC = 3.35e12, 9.894e14, 1.338e14


# --------------------------------------------------------------------------------------------------------
# A small, realistic fake report: embedding, two decoder layers of a d=1024 model at b=1, s=1024, bf16,
# final norm and lm_head; one fused region (residual add + layer norm), one attention rewrite.
# --------------------------------------------------------------------------------------------------------

def _node(name, op, kind, layer, inputs, shape, flops, bytes_read, bytes_written, *, matmul=False,
          region=None, note="", flops_expr="", bytes_expr=""):
    nbytes = bytes_read + bytes_written
    if kind == "unknown":
        bound, t = "unknown", 0.0
    elif flops == 0 and nbytes == 0:
        bound, t = "free", 0.0
    else:
        peak = PEAK if matmul else VEC
        tc, tm = flops / peak, nbytes / BW
        bound, t = ("compute" if tc > tm else "memory"), max(tc, tm)
    return {
        "name": name, "op": op, "kind": kind, "layer": layer, "inputs": inputs, "shapes": [shape],
        "dtype": "bfloat16", "flops": float(flops), "bytes_read": float(bytes_read),
        "bytes_written": float(bytes_written), "flops_expr": flops_expr or str(flops),
        "bytes_expr": bytes_expr or str(nbytes),
        "intensity": (flops / nbytes) if nbytes else None, "bound": bound, "time_s": t,
        "region": region, "note": note,
    }


def make_report(n_layers: int = 2, d: int = 1024, s: int = 1024, vocab: int = 50257) -> dict:
    e = 2  # bf16
    act = s * d * e
    nodes = [
        _node("input_ids", "placeholder", "layout", "", [], [1, s], 0, 0, 0),
        _node("embedding", "aten.embedding.default", "other", "embed", ["input_ids"], [1, s, d],
              0, act + s * 8, act, bytes_expr="2*b*s*1024 + 8*b*s + 2*b*s*1024"),
    ]
    prev = "embedding"
    for i in range(n_layers):
        L = f"layers.{i}"
        fused = i == 0  # one fused region: layer 0's residual add + second layer norm
        region = "fused_0" if fused else None
        nodes += [
            _node(f"layer_norm_{2 * i}", "aten.layer_norm.default", "reduction", f"{L}.ln_1", [prev],
                  [1, s, d], 5 * s * d, act, act),
            _node(f"linear_{4 * i}", "aten.linear.default", "matmul", f"{L}.attn", [f"layer_norm_{2 * i}"],
                  [1, s, 3 * d], 2 * s * d * 3 * d, act + 3 * d * d * e, 3 * act, matmul=True,
                  flops_expr="6291456*b*s"),
            _node(f"view_{i}", "aten.view.default", "layout", f"{L}.attn", [f"linear_{4 * i}"],
                  [1, s, 48, 64], 0, 0, 0),
            _node(f"fxopt_attention_{i}", "fxopt.attention", "attention", f"{L}.attn", [f"view_{i}"],
                  [1, 16, s, 64], 2 * s * s * d, 3 * act, act, matmul=True),
            _node(f"linear_{4 * i + 1}", "aten.linear.default", "matmul", f"{L}.attn",
                  [f"fxopt_attention_{i}"], [1, s, d], 2 * s * d * d, act + d * d * e, act, matmul=True),
            _node(f"add_{2 * i}", "aten.add.Tensor", "pointwise", L, [prev, f"linear_{4 * i + 1}"],
                  [1, s, d], s * d, 2 * act, act, region=region),
            _node(f"layer_norm_{2 * i + 1}", "aten.layer_norm.default", "reduction", f"{L}.ln_2",
                  [f"add_{2 * i}"], [1, s, d], 5 * s * d, act, act, region=region),
            _node(f"linear_{4 * i + 2}", "aten.linear.default", "matmul", f"{L}.mlp",
                  [f"layer_norm_{2 * i + 1}"], [1, s, 4 * d], 8 * s * d * d, act + 4 * d * d * e, 4 * act,
                  matmul=True),
            _node(f"gelu_{i}", "aten.gelu.default", "pointwise", f"{L}.mlp", [f"linear_{4 * i + 2}"],
                  [1, s, 4 * d], 8 * 4 * s * d, 4 * act, 4 * act),
            _node(f"linear_{4 * i + 3}", "aten.linear.default", "matmul", f"{L}.mlp", [f"gelu_{i}"],
                  [1, s, d], 8 * s * d * d, 4 * act + 4 * d * d * e, act, matmul=True),
            _node(f"add_{2 * i + 1}", "aten.add.Tensor", "pointwise", L,
                  [f"add_{2 * i}", f"linear_{4 * i + 3}"], [1, s, d], s * d, 2 * act, act),
        ]
        prev = f"add_{2 * i + 1}"
    nodes += [
        _node("layer_norm_f", "aten.layer_norm.default", "reduction", "ln_f", [prev], [1, s, d],
              5 * s * d, act, act),
        _node("lm_head", "aten.linear.default", "matmul", "lm_head", ["layer_norm_f"], [1, s, vocab],
              2 * s * d * vocab, act + vocab * d * e, s * vocab * e, matmul=True),
        _node("custom_op", "mylib.mystery.default", "unknown", "lm_head", ["lm_head"], [1, s, vocab],
              0, 0, 0, note="unknown cost"),
    ]

    def top(layer):  # "layers.0.attn" -> "layers.0"; "ln_f" -> "ln_f"
        parts = layer.split(".")
        return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]

    layers: dict[str, dict] = {}
    for n in nodes:
        g = layers.setdefault(top(n["layer"]), {"layer": top(n["layer"]), "flops": 0.0, "bytes": 0.0,
                                                "time_s": 0.0, "flops_expr": "", "bytes_expr": ""})
        g["flops"] += n["flops"]
        g["bytes"] += n["bytes_read"] + n["bytes_written"]
        g["time_s"] += n["time_s"]
    region_nodes = [n for n in nodes if n["region"] == "fused_0"]
    before = sum(n["bytes_read"] + n["bytes_written"] for n in region_nodes)
    return {
        "model": "tiny-gpt (2 layers)",
        "hardware": {"name": "H100 SXM", "bandwidth": BW, "peak_flops": PEAK, "peak_flops_vector": VEC,
                     "dtype": "bfloat16"},
        "sizes": {"batch": 1, "seq": s},
        "nodes": nodes,
        "layers": list(layers.values()),
        "total": {"flops": sum(n["flops"] for n in nodes),
                  "bytes": sum(n["bytes_read"] + n["bytes_written"] for n in nodes),
                  "time_s": sum(n["time_s"] for n in nodes),
                  "flops_expr": "b*s*(1024*s + 153133056)", "bytes_expr": "b*s*216064 + 130088960",
                  "params": 1.3e8},
        "regions": [{"id": "fused_0", "nodes": [n["name"] for n in region_nodes], "bytes_before": before,
                     "bytes_after": 3 * act, "predicted_speedup": before / (3 * act),
                     "kernel": "/tmp/fxopt/fused_0.py"}],
        "attention": [{"node": "fxopt_attention_0", "bytes_before": 4 * s * s * 16 * e + 4 * act,
                       "bytes_after": 4 * act, "kernel": "flash_prefill"}],
    }


def big_report(n: int = 20_000) -> dict:
    """A chain of n nodes in the shape of a real report (for speed and validity at scale)."""
    base = make_report()
    cycle = [x for x in base["nodes"] if x["layer"].startswith("layers.0")]
    nodes = []
    for i in range(n):
        x = dict(cycle[i % len(cycle)])
        x["name"] = f"n{i}"
        x["inputs"] = [f"n{i - 1}"] if i else []
        x["layer"] = f"layers.{i // len(cycle)}"
        x["region"] = None
        nodes.append(x)
    return dict(base, nodes=nodes, layers=[], regions=[], attention=[],
                total={"flops": 1.0, "bytes": 1.0, "time_s": 1.0})


# --------------------------------------------------------------------------------------------------------
# Text table
# --------------------------------------------------------------------------------------------------------

_PREFIX = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_TIME = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}


def parse_quantity(text: str) -> float:
    """'2.10 G' -> 2.1e9, '4.20 MB' -> 4.2e6, '3.1 µs' -> 3.1e-6, '1,365' -> 1365."""
    m = re.fullmatch(r"([\d.,]+)\s*(\S*)", text.strip())
    assert m, text
    value, unit = float(m.group(1).replace(",", "")), m.group(2)
    if unit in _TIME:
        return value * _TIME[unit]
    unit = unit.removesuffix("B")
    return value * _PREFIX[unit]


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _close(a: float, b: float, rel: float = 0.006) -> bool:  # three significant figures
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


def test_table_lists_every_node_layer_and_total():
    report = make_report()
    text = rp.format_table(report)
    lines = text.splitlines()
    header = _cells(lines[1])
    assert header == ["name", "op", "kind", "shape", "FLOPs", "bytes", "AI", "bound", "time", "%time",
                      "region"]
    for n in report["nodes"]:
        assert any(line.startswith(n["name"] + " ") for line in lines), n["name"]
    for layer in ("layers.0", "layers.1", "embed", "ln_f", "lm_head"):
        assert any(line.startswith(layer + " ") and " layer " in line for line in lines), layer
    assert "fused_0" in text
    assert "symbolic total: FLOPs = b*s*(1024*s + 153133056)" in text

    # TOTAL row equals the sum of the node rows, summed here independently of the report's "total"
    total_line = next(line for line in lines if line.startswith("TOTAL"))
    cells = _cells(total_line)
    assert cells[1] == f"{len(report['nodes'])} nodes"
    flops = sum(n["flops"] for n in report["nodes"])
    nbytes = sum(n["bytes_read"] + n["bytes_written"] for n in report["nodes"])
    t = sum(n["time_s"] for n in report["nodes"])
    assert _close(parse_quantity(cells[2]), flops)
    assert _close(parse_quantity(cells[3]), nbytes)
    assert _close(parse_quantity(cells[4]), flops / nbytes)
    assert _close(parse_quantity(cells[5]), t)
    assert cells[6] == "100.0%"

    # each layer row equals the sum of its nodes
    for layer in ("layers.0", "layers.1"):
        row = _cells(next(line for line in lines if line.startswith(layer + " ") and " layer " in line))
        mine = [n for n in report["nodes"] if n["layer"].startswith(layer)]
        assert _close(parse_quantity(row[2]), sum(n["flops"] for n in mine))
        assert _close(parse_quantity(row[3]), sum(n["bytes_read"] + n["bytes_written"] for n in mine))
        assert _close(parse_quantity(row[5]), sum(n["time_s"] for n in mine))

    # a node row: units and values
    row = _cells(next(line for line in lines if line.startswith("linear_0 ")))
    lin = next(n for n in report["nodes"] if n["name"] == "linear_0")
    assert row[1:4] == ["linear", "matmul", "1×1024×3072"]
    assert _close(parse_quantity(row[4]), lin["flops"]) and row[4].endswith(" G")
    assert _close(parse_quantity(row[5]), lin["bytes_read"] + lin["bytes_written"]) and row[5].endswith(" MB")
    assert row[7] == "compute" and row[8].endswith("µs")


def test_table_max_rows_keeps_layers_and_total():
    report = make_report()
    text = rp.format_table(report, max_rows=5)
    n = len(report["nodes"])
    assert f"… {n - 5} more nodes" in text
    assert "linear_7" not in text
    assert "layers.1" in text and "TOTAL" in text


def test_units():
    assert rp.fmt_flops(2.1e9) == "2.10 G"
    assert rp.fmt_flops(999.96e6) == "1.00 G"
    assert rp.fmt_bytes(4.2e6) == "4.20 MB" and rp.fmt_bytes(512) == "512 B" and rp.fmt_bytes(0) == "0 B"
    assert rp.fmt_time(2.1e-6) == "2.10 µs" and rp.fmt_time(0.5) == "500 ms" and rp.fmt_time(3.0) == "3.00 s"
    assert rp.fmt_time(4e-10) == "0.4 ns" and rp.fmt_time(999.99e-6) == "1.00 ms"
    assert rp.fmt_ai(1365.33) == "1,365" and rp.fmt_ai(0.25) == "0.25" and rp.fmt_ai(None) == "-"
    assert rp.fmt_rate(9.894e14, "FLOP/s") == "989 TFLOP/s"


def test_large_graph_renders_valid_output():
    """A graph of 20k nodes (five times llama-70b-like's report): every node in the table, the DOT parseable
    with every node and edge, the HTML page without an inline layout. How fast is a benchmark's question:
    benchmarks/report_speed.py."""
    report = big_report(20_000)
    text = rp.format_table(report)
    dot = rp.to_dot(report)
    page = rp.to_html(report)
    assert text.count("\n") > 20_000
    assert "Graph not drawn" in page  # too big for an inline layout
    if shutil.which("gc"):  # Graphviz's graph counter: parses the whole file without laying it out
        out = subprocess.run(["gc", "-n", "-e"], input=dot.encode(), capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        counts = [int(x) for x in re.findall(r"\d+", out.stdout.decode())]
        assert counts[:2] == [20_000, 19_999], out.stdout


# --------------------------------------------------------------------------------------------------------
# DOT
# --------------------------------------------------------------------------------------------------------

def _pydot_nodes(graph) -> dict[str, object]:
    out = {}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.get_nodes():
            name = node.get_name()
            if name not in ("node", "graph", "edge"):  # default-attribute statements (unquoted)
                out[name.strip('"')] = node
        stack.extend(g.get_subgraphs())
    return out


def test_dot_parses_with_clusters_nodes_and_colours():
    pydot = pytest.importorskip("pydot")
    report = make_report()
    graphs = pydot.graph_from_dot_data(rp.to_dot(report))
    assert graphs and len(graphs) == 1
    g = graphs[0]
    clusters = [s.get_name().strip('"') for s in g.get_subgraphs()]
    assert clusters == ["cluster_fused_0"]
    cluster_nodes = set(_pydot_nodes(g.get_subgraphs()[0]))
    assert cluster_nodes == {"add_0", "layer_norm_1"}
    assert "→" in g.get_subgraphs()[0].get_attributes()["label"]
    nodes = _pydot_nodes(g)
    assert sorted(nodes) == sorted(n["name"] for n in report["nodes"])
    fill = {name: node.get_attributes().get("fillcolor") for name, node in nodes.items()}
    assert fill["linear_0"] != fill["add_1"]  # compute-bound vs memory-bound
    assert fill["view_0"] != fill["linear_0"] and fill["view_0"] != fill["add_1"]
    assert "dashed" in nodes["custom_op"].get_attributes()["style"]
    n_edges = sum(len([i for i in n["inputs"] if i in nodes]) for n in report["nodes"])
    assert len(g.get_edges()) == n_edges


def test_dot_escapes_awkward_names():
    pydot = pytest.importorskip("pydot")
    report = make_report()
    weird = ['a"quote', "back\\slash", "new\nline", "node", "ünï<b>", "{brace}; x -> y"]
    for n, name in zip(report["nodes"][2:], weird):
        n["name"] = name
    g = pydot.graph_from_dot_data(rp.to_dot(report))[0]
    assert len(_pydot_nodes(g)) == len(report["nodes"])
    if shutil.which("dot"):
        out = subprocess.run(["dot", "-Tsvg"], input=rp.to_dot(report).encode(), capture_output=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr


def test_write_svg(tmp_path, monkeypatch):
    report = make_report()
    if shutil.which("dot"):
        rp.write_svg(report, tmp_path / "g.svg")
        svg = (tmp_path / "g.svg").read_text()
        assert "<svg" in svg and "cluster_fused_0" not in svg or "fused_0" in svg
    rp.write_dot(report, tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text() == rp.to_dot(report)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(rp.GraphvizNotFoundError, match="apt-get install graphviz"):
        rp.write_svg(report, tmp_path / "h.svg")
    assert "Graph not drawn" in rp.to_html(report)


# --------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------

def test_json_round_trip(tmp_path):
    report = make_report()
    rp.write_json(report, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == report
    report["nodes"][0]["intensity"] = math.inf
    rp.write_json(report, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["nodes"][0]["intensity"] is None  # strict JSON


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------

class _Collector(html.parser.HTMLParser):
    """Collects elements as (tag, attrs, path of ancestor ids) for simple queries."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict, tuple[str, ...]]] = []
        self.stack: list[tuple[str, str]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a, tuple(i for _, i in self.stack if i)))
        if tag == "script":
            self._in_script = True
        if tag not in ("meta", "br", "img", "input", "link") and not self.get_starttag_text().endswith("/>"):
            self.stack.append((tag, a.get("id", "")))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), tuple(i for _, i in self.stack if i)))

    def handle_endtag(self, tag):
        self._in_script = False
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                del self.stack[k:]
                break

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    c.close()
    return c


def _expected_pixel(axes: rp.RooflineAxes, ai: float, flops: float) -> tuple[float, float]:
    """The log-log mapping, written out independently of RooflineAxes.__call__."""
    fx = (math.log10(ai) - math.log10(axes.x_min)) / (math.log10(axes.x_max) - math.log10(axes.x_min))
    fy = (math.log10(flops) - math.log10(axes.y_min)) / (math.log10(axes.y_max) - math.log10(axes.y_min))
    x = axes.left + fx * (axes.width - axes.left - axes.right)
    y = axes.top + (1 - fy) * (axes.height - axes.top - axes.bottom)
    return x, y


def test_html_roofline_points_and_ridge():
    report = make_report()
    page = rp.to_html(report)
    doc = _parse(page)
    svgs = [a for tag, a, _ in doc.elements if tag == "svg" and a.get("id") == "roofline"]
    assert len(svgs) == 1
    in_roof = [(tag, a) for tag, a, path in doc.elements if "roofline" in path]
    circles = [a for tag, a in in_roof if tag == "circle" and a.get("class") == "pt"]
    nonzero = [n for n in report["nodes"]
               if n["flops"] > 0 and n["bytes_read"] + n["bytes_written"] > 0]
    assert len(circles) == len(nonzero)
    assert sorted(c["data-name"] for c in circles) == sorted(n["name"] for n in nonzero)
    assert len({c["fill"] for c in circles}) >= 4  # coloured by kind
    titles = re.findall(r'<circle class="pt"[^>]*><title>([^<]*)</title>', page)
    assert len(titles) == len(circles) and all("AI " in t and "time " in t for t in titles)

    axes = rp.roofline_axes(report)
    ridge_ai = PEAK / BW
    assert axes.x_min < ridge_ai < axes.x_max and axes.y_min < PEAK < axes.y_max
    ex, ey = _expected_pixel(axes, ridge_ai, PEAK)
    assert axes(ridge_ai, PEAK) == pytest.approx((ex, ey))
    ridge = next(a for tag, a in in_roof if a.get("id") == "ridge")
    assert float(ridge["data-cx"]) == pytest.approx(ex, abs=0.01)
    assert float(ridge["data-cy"]) == pytest.approx(ey, abs=0.01)

    # the roof: every vertex lies on min(peak, AI*bandwidth); the ridge is the vertex where the memory
    # slope meets the compute ceiling, i.e. it is on both ceilings
    roof = next(a for tag, a in in_roof if a.get("id") == "roof")
    vertices = [tuple(map(float, p.split(","))) for p in roof["data-points"].split()]
    pixels = [tuple(map(float, p.split(","))) for p in roof["points"].split()]
    for (ai, f), (px, py) in zip(vertices, pixels):
        assert f == pytest.approx(min(PEAK, ai * BW), rel=1e-9)
        assert (px, py) == pytest.approx(_expected_pixel(axes, ai, f), abs=0.01)
    assert vertices[1] == pytest.approx((ridge_ai, PEAK))
    assert vertices[1][1] == pytest.approx(vertices[1][0] * BW)  # on the memory slope too
    assert (float(ridge["data-cx"]), float(ridge["data-cy"])) == pytest.approx(pixels[1], abs=0.01)
    # the memory slope has unit slope in decades: both axes span the same pixels per decade ratio
    (x0, y0), (x1, y1) = pixels[0], pixels[1]
    decades_x = math.log10(vertices[1][0] / vertices[0][0])
    assert (y0 - y1) / (x1 - x0) == pytest.approx(
        (axes.plot_height / math.log10(axes.y_max / axes.y_min))
        / (axes.plot_width / math.log10(axes.x_max / axes.x_min)), rel=1e-3)
    assert decades_x > 0
    # vector ceiling drawn dashed at the vector peak
    vec = next(a for tag, a in in_roof if a.get("id") == "roof-vector")
    assert "stroke-dasharray" in vec
    vec_y = float(vec["points"].split()[0].split(",")[1])
    assert vec_y == pytest.approx(_expected_pixel(axes, 1, VEC)[1], abs=0.01)
    # points sit on their ceilings (predicted times are roofline times)
    for c in circles:
        n = next(n for n in nonzero if n["name"] == c["data-name"])
        ai = n["flops"] / (n["bytes_read"] + n["bytes_written"])
        px, py = _expected_pixel(axes, ai, n["flops"] / n["time_s"])
        assert (float(c["cx"]), float(c["cy"])) == pytest.approx((px, py), abs=0.01)


def test_html_tables_escaping_and_self_contained():
    report = make_report()
    report["nodes"][3]["name"] = "<script>alert(1)</script>"
    report["model"] = 'gpt "<b>bold</b>"'
    page = rp.to_html(report)
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<b>bold</b>" not in page
    doc = _parse(page)
    assert not [a for tag, a, _ in doc.elements if tag in ("link", "img", "iframe")]
    assert not [a for tag, a, _ in doc.elements if tag == "script" and a.get("src")]
    assert not re.search(r"https?://(?!www\.w3\.org/)", page)  # only XML namespaces, no network
    rows = [a for tag, a, path in doc.elements
            if tag == "tr" and "nodes" in path and a.get("id", "").startswith("node-")]
    assert len(rows) == len(report["nodes"])
    tables = {a.get("id") for tag, a, _ in doc.elements
              if tag == "table" and "sortable" in a.get("class", "")}
    assert {"layers", "nodes", "regions", "attention"} <= tables
    assert "fused_0" in page and "flash_prefill" in page
    if shutil.which("dot"):
        assert any(tag == "div" and a.get("id") == "graph" for tag, a, _ in doc.elements)
        assert "<!DOCTYPE svg" not in page and "<?xml" not in page


# --------------------------------------------------------------------------------------------------------
# Browser: render in headless Chromium, screenshot it, and read back the DOM for script errors
# --------------------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, timeout=60, text=True)


def _dom(tmp_path: Path, url: str) -> tuple[str, str]:
    proc = _chromium(tmp_path, "--virtual-time-budget=2000", "--dump-dom", url)
    return proc.stdout, proc.stderr


def _root_tag(dom: str) -> str:
    """The opening <html ...> tag of a dumped DOM, where the page's scripts leave their markers."""
    return re.search(r"<html[^>]*>", dom).group(0)


def _console_errors(stderr: str) -> list[str]:
    """Console messages Chromium logs to stderr with --enable-logging: 'INFO:CONSOLE(12)] "Uncaught ..."'."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless chromium")
def test_browser_renders_without_errors(tmp_path):
    """Screenshot must be a non-blank image; the page's scripts must run to the end without an error.

    JS errors are detected two ways: the page's window.onerror hook marks <html data-fxopt-error=...>
    (read back with --dump-dom), and Chromium's console log on stderr must hold no "Uncaught" line.
    The sort script sets data-fxopt-ready="1" only when it ran to completion, and a negative control
    (a page with a deliberate error) proves the detection sees errors.
    """
    t0 = time.perf_counter()
    report = make_report()
    page_path = tmp_path / "report.html"
    rp.write_html(report, page_path)
    shot_dir = Path(os.environ.get("FXOPT_SCREENSHOT_DIR", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "report_screenshot.png"
    if shot.exists():
        shot.unlink()
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", page_path.as_uri())
    assert shot.exists() and shot.stat().st_size > 10_000
    image = pytest.importorskip("matplotlib.image").imread(str(shot))
    assert image.shape[0] >= 900 and image.shape[1] >= 1300
    assert image[..., :3].std() > 0.05  # not blank
    assert (image[..., :3].mean(axis=2) < 0.5).mean() > 0.005  # some dark ink (text, axes)

    # the DOM after scripts ran, sorted by FLOPs (column 6) through the URL hash
    dom, stderr = _dom(tmp_path, page_path.as_uri() + "#sort=nodes:6")
    assert 'id="roofline"' in dom
    root = _root_tag(dom)
    assert 'data-fxopt-ready="1"' in root
    assert "data-fxopt-error" not in root
    assert "JS ERROR" not in re.search(r"<title>(.*?)</title>", dom).group(1)
    assert not _console_errors(stderr), _console_errors(stderr)
    first = re.search(r'<tbody>\s*<tr id="node-(\d+)"', dom.split('id="nodes"', 1)[1])
    biggest = max(range(len(report["nodes"])), key=lambda i: report["nodes"][i]["flops"])
    assert first and int(first.group(1)) == biggest  # the sort script works

    # negative control: a page with a script error is caught by the same checks
    bad = tmp_path / "bad.html"
    bad.write_text(rp.to_html(report).replace("</body>", "<script>undefinedFunction();</script></body>"))
    dom, stderr = _dom(tmp_path, bad.as_uri())
    assert "data-fxopt-error" in _root_tag(dom) and "undefinedFunction" in _root_tag(dom)
    assert _console_errors(stderr)
    assert time.perf_counter() - t0 < 30


def test_table_leaves_out_bookkeeping_nodes_unless_asked():
    from fxopt.analyze import analyze

    report = analyze("gpt2-tiny", batch=1, seq=32).report
    names = {n["name"]: str(n["op"]) for n in report["nodes"]}
    bookkeeping = [name for name, op in names.items()
                   if "getitem" in op or "sym_size" in op or "_guards_fn" in op]
    assert bookkeeping  # export's guard call, the seq-length reads and the split's getitems
    rows = lambda text: {line.split()[0] for line in text.splitlines() if line.strip()}  # noqa: E731
    default, everything = rp.format_table(report), rp.format_table(report, all_nodes=True)
    assert not rows(default) & set(bookkeeping)
    assert set(bookkeeping) <= rows(everything)
    assert f"({len(bookkeeping)} bookkeeping nodes not listed" in default
    costly = [name for name, op in names.items() if name not in bookkeeping and op != "placeholder"]
    assert set(costly) <= rows(default)
