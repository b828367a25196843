"""The command line's shared vocabulary: dtype names, help texts and argument types every subcommand uses.

It sits below fxopt/cli.py and the subcommand modules (bench, generate, ...), which import it at the top:
none of them needs the CLI module itself to describe its arguments.
"""

from __future__ import annotations

import argparse
import difflib

import torch

from fxopt import progress, zoo
from fxopt.errors import UserError, require_cuda
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
