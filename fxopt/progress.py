"""Progress on stderr for work that can take more than a couple of seconds.

    with progress.stage(f"capturing {name} (b={b}, s={s})"):   # fxopt: capturing ... done in 3.1 s
        captured = capture(model, kwargs)
    for region in progress.progress(regions, desc="timing regions"):
        ...
    progress.note("no GPU: bench runs a CPU-sized configuration")  # fxopt: note: ...

On a terminal a stage shows a spinner (rich, when installed) and a loop a bar (tqdm, when installed), or
plain lines rewritten in place; elsewhere (a log, a pipe) each stage is one plain line,
``fxopt: capturing gpt2-small (b=1, s=1024)... done in 3.1 s``, and a long loop prints a line every few
seconds. Nothing here is required: without tqdm/rich the plain fallback is used.

Who sees it: the CLI turns progress on (`configure(enabled=True)`; `--quiet` turns it off). Library calls
(`fxopt.analyze(...)` from Python) show it only when stderr is a terminal. FXOPT_PROGRESS=1 forces it on,
FXOPT_PROGRESS=0 off.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from fxopt import config

T = TypeVar("T")

_enabled: bool | None = None  # None: library default (a terminal only)
_open_line = False  # a stage's "...: " is on stderr, waiting for its "done"
_depth = 0  # stages open (a rich spinner only for the outermost)
LOOP_DELAY_S = 2.0  # loops shorter than this print nothing
LOG_EVERY_S = 5.0  # plain (non-terminal) loop lines at most this often


def configure(*, enabled: bool | None) -> None:
    """True: show progress (the CLI); False: never (--quiet); None: the library default."""
    global _enabled
    _enabled = enabled


def _stream():
    return sys.stderr


def _isatty() -> bool:
    return bool(getattr(_stream(), "isatty", lambda: False)())


def enabled() -> bool:
    setting = config.get("progress")
    if _enabled is False:
        return False
    if setting is not None:
        return setting
    return True if _enabled else _isatty()


def _write(text: str) -> None:
    global _open_line
    stream = _stream()
    if _open_line:
        stream.write("\n")
        _open_line = False
    stream.write(text)
    stream.flush()


def note(message: str) -> None:
    """One line on stderr, `fxopt: note: message`, unless progress is turned off (--quiet)."""
    if _enabled is False or config.get("progress") is False:
        return
    _write(f"fxopt: note: {message}\n")


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


@contextlib.contextmanager
def stage(desc: str) -> Iterator[None]:
    """`fxopt: desc...` when the block starts, `done in t s` when it ends (`failed after t s` on error)."""
    global _open_line, _depth
    if not enabled():
        yield
        return
    start = time.perf_counter()
    status = _rich_status(desc) if _isatty() and _depth == 0 else None
    if status is None:
        _write(f"fxopt: {desc}... ")
        _open_line = True
    failed = True
    _depth += 1
    try:
        if status is not None:
            with status:
                yield
        else:
            yield
        failed = False
    finally:
        _depth -= 1
        elapsed = _fmt_s(time.perf_counter() - start)
        word = f"failed after {elapsed}" if failed else f"done in {elapsed}"
        stream = _stream()
        if _open_line:
            stream.write(word + "\n")
            _open_line = False
        else:
            stream.write(f"fxopt: {desc}: {word}\n")
        stream.flush()


def _rich_status(desc: str):
    """A rich spinner on stderr (a terminal with rich installed), else None."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True).status(f"fxopt: {desc}...", spinner="dots")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """Yield from `iterable`, showing `desc: i/total` on stderr once the loop has run for LOOP_DELAY_S."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if not enabled():
        yield from iterable
        return
    if _isatty():
        bar = _tqdm(iterable, total, desc)
        if bar is not None:
            yield from bar
            return
    yield from _plain(iterable, total, desc, in_place=_isatty())


def _tqdm(iterable, total, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    _write("")  # close an open stage line first
    return tqdm(iterable, total=total, desc=f"fxopt: {desc}", file=_stream(), leave=False, delay=LOOP_DELAY_S,
                mininterval=0.2, dynamic_ncols=True)


def _plain(iterable, total, desc, *, in_place: bool):
    global _open_line
    stream = _stream()
    start = time.perf_counter()
    last, shown, i = None, False, 0
    of = f"/{total}" if total is not None else ""

    def line(now: float, done: bool = False) -> str:
        if done:
            return f"fxopt: {desc}: {i}{of} done in {_fmt_s(now - start)}"
        frac = f" ({100.0 * i / total:.0f}%)" if total else ""
        return f"fxopt: {desc}: {i}{of}{frac}, {_fmt_s(now - start)}"

    try:
        for item in iterable:
            yield item
            i += 1
            now = time.perf_counter()
            if now - start < LOOP_DELAY_S:
                continue
            if in_place and (last is None or now - last >= 0.1):
                if _open_line:
                    _write("")
                stream.write("\r" + line(now))
                stream.flush()
                last, shown = now, True
            elif not in_place and (last is None or now - last >= LOG_EVERY_S):
                _write(line(now) + "\n")
                last, shown = now, True
    finally:
        if shown:
            stream.write(("\r\033[K" if in_place else "") + line(time.perf_counter(), done=True) + "\n")
            stream.flush()
