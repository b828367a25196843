"""User errors: mistakes in what was asked for, as opposed to bugs in fxopt.

Raise `UserError(problem, hint)` where the mistake is found (an unknown model, a size past the model's
position table, a GPU-only command on a machine without one, an output file that cannot be written).
The CLI (`fxopt.cli.main`) prints it as

    fxopt: error: <problem>
      <hint>

and exits 2; `--debug` or FXOPT_DEBUG=1 shows the traceback instead. Anything else (a genuine bug)
keeps its traceback. `user_error(exc)` maps the few library exceptions that also mean "bad input"
(fxopt's KV-cache refusal, a bad generation request, a capture failure of the user's own model) to one.

UserError is a ValueError, so library callers that caught the ValueErrors these replaced still do. The
library's own refusals are defined here too (and re-exported where they are raised), so that this module,
which every layer imports, imports none of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fxopt import config


class UserError(ValueError):
    """A mistake in the request; `hint` says how to fix it (one line, may be empty)."""

    exit_code = 2

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem if not hint else f"{problem}\n  {hint}")
        self.problem = problem
        self.hint = hint

    def lines(self) -> list[str]:
        return [f"fxopt: error: {self.problem}"] + ([f"  {self.hint}"] if self.hint else [])


class CaptureError(RuntimeError):
    """torch.export could not trace the model; the message names the construct and a fix."""


class KVCacheError(ValueError):
    """The model cannot take a KV cache; the message names the node that shows why."""


class GenerationError(ValueError):
    """Bad generation request (shape, dtype, device, capacity): raised before any state changes."""


def debug_enabled() -> bool:
    """FXOPT_DEBUG=1 (or true/yes/on): show tracebacks instead of one-line errors."""
    try:
        return bool(config.get("debug"))
    except ValueError:  # a malformed FXOPT_DEBUG must not hide the error being reported
        return False


def require_positive(name: str, value: int | None, hint: str = "") -> None:
    """UserError unless value is None or > 0 (`name` as the user typed it, e.g. '--batch')."""
    if value is not None and value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value}", hint or f"e.g. {name} 1")


def require_cuda(what: str, hint: str = "") -> None:
    """UserError when there is no usable CUDA device (CPU-only torch build, or no GPU/driver)."""
    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        why = f"this torch build has no CUDA support (torch {torch.__version__})"
    else:
        why = "no CUDA GPU is visible on this machine"
    raise UserError(f"{what} needs a CUDA GPU, and {why}", hint)


def check_output(path: str, flag: str) -> None:
    """UserError unless `path` can be written: its directory exists and is writable, it is not a directory."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UserError(f"cannot write {flag} {path}: it is a directory", "give a file name")
    if not parent.is_dir():
        raise UserError(f"cannot write {flag} {path}: directory {str(parent)!r} does not exist",
                        "create it first, or choose a path in an existing directory")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UserError(f"cannot write {flag} {path}: permission denied", "choose a path you can write")


def user_error(exc: BaseException, *, model: str | None = None, preset: bool = False) -> UserError | None:
    """`exc` as a UserError when it is a known user-input error type, else None (a bug: keep the traceback).
    `model`: the spec the user gave; `preset`: whether it names one of fxopt's models (whose capture
    failures are fxopt's bugs, not the user's)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, KVCacheError):
        name = f"model {model!r}" if model else "the model"
        detail = str(exc).splitlines()[0].removeprefix("kv_cache: ").removeprefix("cannot insert a KV cache: ")
        return UserError(f"{name} cannot take a KV cache: {detail}",
                         "generate needs a causal decoder (e.g. gpt2-tiny, llama-tiny, hf:llama)")
    if isinstance(exc, GenerationError):
        return UserError(f"bad generation request: {str(exc).splitlines()[0]}",
                         "check --batch, --prompt-len, --new-tokens and --max-seq-len")
    if isinstance(exc, CaptureError) and model is not None and not preset:
        lines = str(exc).splitlines()
        return UserError(lines[0] + (" " + " ".join(lines[1:2]) if len(lines) > 1 else ""),
                         " ".join(lines[2:]) or "run it with --debug for the full trace")
    return None
