"""Number formatting and report arithmetic the renderers share: SI prefixes, times, intensities, and the
layer and total rows computed from a report dict."""

from __future__ import annotations

import math
from typing import Any

# --------------------------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------------------------

SI_PREFIXES = ["", "k", "M", "G", "T", "P", "E"]
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
    return _prefixed(x, SI_PREFIXES)


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
    number, _, prefix = _prefixed(x, SI_PREFIXES).partition(" ")
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


def as_float(x: Any) -> float:
    """A report number as float (None / missing -> 0)."""
    try:
        return float(x) if x is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def node_bytes(n: dict) -> float:
    if "bytes" in n and n.get("bytes") is not None:
        return as_float(n["bytes"])
    return as_float(n.get("bytes_read")) + as_float(n.get("bytes_written"))


def intensity(flops: float, nbytes: float) -> float | None:
    if nbytes > 0:
        return flops / nbytes
    return math.inf if flops > 0 else None


def layer_summaries(report: dict) -> list[dict]:
    """Per-layer rows from the report, or grouped from the nodes when the report has none."""
    layers = report.get("layers")
    if layers:
        return list(layers)
    groups: dict[str, dict] = {}
    for n in report.get("nodes", []):
        g = groups.setdefault(n.get("layer") or "", {"layer": n.get("layer") or "", "flops": 0.0,
                                                    "bytes": 0.0, "time_s": 0.0})
        g["flops"] += as_float(n.get("flops"))
        g["bytes"] += node_bytes(n)
        g["time_s"] += as_float(n.get("time_s"))
    return list(groups.values())


def report_total(report: dict) -> dict:
    """The report's total, with any missing number summed from the nodes."""
    total = dict(report.get("total") or {})
    nodes = report.get("nodes", [])
    if total.get("flops") is None:
        total["flops"] = sum(as_float(n.get("flops")) for n in nodes)
    if total.get("bytes") is None:
        total["bytes"] = sum(node_bytes(n) for n in nodes)
    if total.get("time_s") is None:
        total["time_s"] = sum(as_float(n.get("time_s")) for n in nodes)
    return total


def sizes_text(report: dict) -> str:
    sizes = report.get("sizes") or {}
    return ", ".join(f"{k}={v}" for k, v in sizes.items())
