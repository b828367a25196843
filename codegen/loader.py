"""Load generated kernel sources as Python modules.

Triton's @jit reads a kernel's source through `inspect`, so a generated kernel must live
in a real file: `load_kernel_module` writes the source to
`<dump_dir>/<name>_<sha1[:12]>.py` (dump_dir: the argument, else $FXOPT_DUMP_DIR, else
~/.cache/fxopt) and imports it by path.

A generated source is a header of comment lines (the region it came from: node names,
predicted bytes) followed by the code. Modules are cached in-process by the hash of the
code alone, so regions of one structure (one per layer) share a module, and with it one
set of @jit functions, one Triton compile and one autotune cache: the first region's file
is imported, every later one only writes its own file (its header, the same code).

Triton decides at import time whether @jit functions run on the GPU or in the CPU
interpreter (TRITON_INTERPRET=1), so the cache key includes that mode: the same code
imported in both modes gives two modules.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from fxopt import config

_MODULES: dict[tuple[str, bool], ModuleType] = {}
STATS = {"hits": 0, "loads": 0}


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return config.get("interpret")


def ops_use_kernels(t) -> bool:
    """Whether fxopt's custom ops run their Triton kernels on `t`: always on CUDA; on CPU only with
    FXOPT_INTERPRET_OPS=1 under TRITON_INTERPRET=1 (otherwise the optimized model on CPU is a reference run
    of plain PyTorch; kernel tests call the kernels directly)."""
    return t.is_cuda or (interpreting() and config.get("interpret_ops"))


def default_dump_dir() -> Path:
    return config.get("dump_dir") or Path.home() / ".cache" / "fxopt"


def _safe(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return name if name and not name[0].isdigit() else f"k_{name}"


def _name_from_source(source: str) -> str:
    m = re.search(r"^# fxopt fused kernel: (\S+)", source, re.M)
    return m.group(1) if m else "kernel"


def code_of(source: str) -> str:
    """`source` without its header (the leading comment lines): what identifies the module."""
    lines = source.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "".join(lines[start:])


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def source_path(source: str, dump_dir: Path | str | None = None, *, name: str | None = None) -> Path:
    """Where `load_kernel_module` writes `source` (named by the whole source: each header its own file)."""
    directory = Path(dump_dir) if dump_dir is not None else default_dump_dir()
    return directory / f"{_safe(name or _name_from_source(source))}_{_digest(source)[:12]}.py"


def _write(path: Path, source: str) -> None:
    if path.exists() and path.read_text() == source:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # write-then-rename: a concurrent reader never sees a half-written file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, path)


def _import(path: Path, modname: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    return module


# Knobs a generated module reads when it is imported (whether it autotunes): a module imported under other
# values is not the same module.
IMPORT_TIME_KNOBS = ("fused_autotune", "interpret")


def _import_time_settings() -> tuple:
    return tuple(config.get(name) for name in IMPORT_TIME_KNOBS)


def load_kernel_module(source: str, dump_dir: Path | str | None = None, *, name: str | None = None) -> ModuleType:
    """Write `source` to the dump dir and import it, or reuse the module already imported for the
    same code (header aside) in this interpreter mode; the file is written either way."""
    key = (_digest(code_of(source)), interpreting(), _import_time_settings())
    path = source_path(source, dump_dir, name=name)
    _write(path, source)
    module = _MODULES.get(key)
    if module is not None:
        STATS["hits"] += 1
        return module
    suffix = ("_interp" if key[1] else "") + "".join(f"_{v}" for v in key[2] if v is not None)
    module = _import(path, f"fxopt_gen_{path.stem}" + re.sub(r"\W", "_", suffix))
    _MODULES[key] = module
    STATS["loads"] += 1
    return module
