"""Every fxopt knob in one place: its environment variable, default, type and when it is read.

`config.get(name)` parses the environment now (one parser per type, a bad value is an error naming the
variable); `config.override(name=value, ...)` sets values for a block and wins over the environment (tests).
Knobs read "at import" are read once, when the module that uses them is imported (kernel variants compiled
in, the generated modules' autotuning): changing them later has no effect on a module already imported.
README.md lists the knobs; tests/test_config.py checks that it lists all of them.

This module imports nothing of fxopt: every layer may read it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Knob:
    name: str
    env: str  # the environment variable
    default: Any  # when the variable is unset (None with `fallback`: the fallback knob's value)
    kind: str  # flag | int | path | auto (a flag whose unset value None means "decide from the context")
    when: str  # "call": read at each use; "import": read once, when the module using it is imported
    doc: str
    fallback: str | None = None  # the knob whose value applies while this one's variable is unset


KNOBS: dict[str, Knob] = {knob.name: knob for knob in (
    Knob("interpret", "TRITON_INTERPRET", False, "flag", "import",
         "Triton kernels run in Triton's CPU interpreter (Triton's own variable)"),
    Knob("interpret_ops", "FXOPT_INTERPRET_OPS", False, "flag", "call",
         "on CPU under TRITON_INTERPRET=1, optimized models run their generated kernels (else the references)"),
    Knob("autotune", "FXOPT_AUTOTUNE", False, "flag", "call",
         "every kernel family times its configs on first use (else the first config that fits runs)"),
    Knob("attn_autotune", "FXOPT_ATTN_AUTOTUNE", None, "flag", "call", "the attention kernels' own autotune switch",
         fallback="autotune"),
    Knob("rope_autotune", "FXOPT_ROPE_AUTOTUNE", None, "flag", "call", "the RoPE kernels' own autotune switch",
         fallback="autotune"),
    Knob("fused_autotune", "FXOPT_FUSED_AUTOTUNE", None, "flag", "import",
         "the generated fused kernels' own autotune switch (read when a generated module is imported)",
         fallback="autotune"),
    Knob("gemv_autotune", "FXOPT_GEMV_AUTOTUNE", None, "flag", "call", "the decode GEMVs' own autotune switch",
         fallback="autotune"),
    Knob("swiglu_autotune", "FXOPT_SWIGLU_AUTOTUNE", None, "flag", "call",
         "the SwiGLU GEMM's own autotune switch", fallback="autotune"),
    Knob("swiglu_gemm", "FXOPT_SWIGLU_GEMM", False, "flag", "call",
         "the forward folds a SwiGLU MLP's silu(gate) * up into its up-projection GEMM (a Triton GEMM)"),
    Knob("tma", "FXOPT_TMA", True, "flag", "import", "Hopper TMA loads in the attention kernels"),
    Knob("pdl", "FXOPT_PDL", True, "flag", "import", "programmatic dependent launch on Hopper (decode kernels)"),
    Knob("decode_prefetch", "FXOPT_DECODE_PREFETCH", 0, "int", "import",
         "keys of its chunk the Flash-Decoding split kernel asks L2 for before its wait (0: none)"),
    Knob("precompile", "FXOPT_PRECOMPILE", True, "flag", "call",
         "optimize compiles a program's Triton kernels at once on a thread pool"),
    Knob("dump_dir", "FXOPT_DUMP_DIR", None, "path", "call",
         "where generated kernel sources are written (default ~/.cache/fxopt)"),
    Knob("progress", "FXOPT_PROGRESS", None, "auto", "call",
         "progress lines on stderr: 1 always, 0 never, unset: the CLI's --quiet decides"),
    Knob("debug", "FXOPT_DEBUG", False, "flag", "call", "the CLI shows tracebacks instead of one-line errors"),
)}

_overrides: dict[str, Any] = {}


def get(name: str) -> Any:
    """The knob's value now: an override, else its environment variable, else its fallback or default."""
    knob = KNOBS[name]
    if name in _overrides:
        return _overrides[name]
    raw = os.environ.get(knob.env)
    if raw is None:
        return get(knob.fallback) if knob.fallback else knob.default
    return _parse(knob, raw)


def is_set(name: str) -> bool:
    """Whether the knob was given (an override or its environment variable), not left at its default."""
    return name in _overrides or KNOBS[name].env in os.environ


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set knobs for the block (import-time knobs only affect modules imported inside it)."""
    unknown = sorted(set(values) - set(KNOBS))
    if unknown:
        raise KeyError(f"unknown fxopt knob(s) {', '.join(unknown)}; known: {', '.join(KNOBS)}")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def _parse(knob: Knob, raw: str) -> Any:
    text = raw.strip().lower()
    if knob.kind == "auto" and text == "":
        return None
    if knob.kind in ("flag", "auto"):
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise ValueError(f"{knob.env}={raw!r}: expected one of {', '.join(TRUE + FALSE[:-1])}")
    if knob.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{knob.env}={raw!r}: expected an integer") from None
    if knob.kind == "path":
        return Path(raw).expanduser() if raw else None
    raise AssertionError(knob.kind)
