"""The command line's shared vocabulary: dtype names, help texts and argument types every subcommand uses,
the parser class whose errors are one line and a hint, and `guarded`, where errors become exit codes.

It sits below fxopt/cli.py and the subcommand modules (bench, generate, ...), which import it at the top:
none of them needs the CLI module itself to describe its arguments or run as `python -m`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable

import torch

from fxopt import models, progress, zoo
from fxopt.errors import UserError, debug_enabled, require_cuda, user_error
from fxopt.hardware import ALIASES, PRESETS, get_hardware

DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
MODEL_HELP = ("a models/ preset (gpt2-small, llama-1b-like, ...), package.module:factory, "
              "or hf:MODEL_TYPE[,key=value]")
HW_HELP = "a datasheet preset (a10, a100-40gb, a100-80gb, h100, h200) or 'calibrate' (measure this GPU)"


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def resolve_hw(name: str):
    """--hw NAME as a Hardware: UserError for an unknown name or 'calibrate' without a GPU."""
    key = name.lower().replace("_", "-")
    if key == "calibrate":
        require_cuda("--hw calibrate", "use a datasheet preset instead, e.g. --hw h100")
        with progress.stage("calibrating: copy bandwidth and bf16 matmul rate of this GPU"):
            return get_hardware(name)
    if ALIASES.get(key, key) not in PRESETS:
        close = difflib.get_close_matches(key, [*PRESETS, *ALIASES], n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown hardware {name!r}", f"{guess}choose one of {', '.join(sorted(PRESETS))} "
                                                      "or 'calibrate'")
    return get_hardware(name)


def default_seq(model, wanted: int) -> int:
    """`wanted`, or the model's position limit if that is smaller."""
    limit = zoo.position_limit(model)
    return min(wanted, limit) if limit else wanted


# ---------------------------------------------------------------------------------------------------
# argparse: one-line errors, defaults in --help; the one place errors become exit codes
# ---------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option with a real default (not None/False, not already said)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or "default " in text:
            return text
        if action.default in (None, False, argparse.SUPPRESS) or isinstance(action.default, bool):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)".strip()
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors (one line and a hint, exit 2, no usage dump)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, with an unrecognized argument blamed on the subcommand it was given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            raise UserError(f"{command + ': ' if command else ''}unrecognized arguments: {' '.join(extras)}",
                            f"see '{prog} --help'")
        return parsed

    def error(self, message: str):
        command = self.prog.removeprefix("fxopt").strip()
        raise UserError(f"{command + ': ' if command else ''}{message}", f"see '{self.prog} --help'")


def add_common_flags(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """--debug and --quiet, accepted before or after the subcommand."""
    default = False if top else argparse.SUPPRESS
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the Python traceback of an error (also FXOPT_DEBUG=1)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress lines or notes on stderr")


def report_error(err: UserError) -> int:
    """Print `fxopt: error: ...` (and the hint) on stderr; returns the exit code, 2."""
    sys.stderr.flush()
    print("\n".join(err.lines()), file=sys.stderr)
    return err.exit_code


def guarded(func: Callable[[], int], *, debug: bool = False,
            model: str | Callable[[], str | None] | None = None) -> int:
    """Run func(); a user error (UserError, or a known library error from bad input) -> message and 2.

    With `debug` (or FXOPT_DEBUG=1) the exception propagates with its traceback. Anything else is a bug
    and propagates too."""
    debug = debug or debug_enabled()
    try:
        return func() or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("fxopt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only known user errors are turned into messages
        spec = model() if callable(model) else model
        err = None if debug else user_error(exc, model=spec, preset=spec in models.PRESETS)
        if err is None:
            raise
        return report_error(err)
