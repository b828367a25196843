"""How fxopt's Triton kernels are timed when they autotune: one definition for every kernel family.

Short timing runs (configs differ by a few percent; compile time dominates first calls), through the
`do_bench` hook where this Triton has it (its `warmup`/`rep` arguments are deprecated), and timings cached on
disk where it can, so a second process or a second optimize call does not tune again.
"""

from __future__ import annotations

import inspect

import triton
from triton.testing import do_bench

WARMUP_MS, REP_MS = 5, 25


def autotune_options() -> dict:
    """Keyword arguments for triton.autotune that this Triton accepts."""

    params = inspect.signature(triton.autotune).parameters
    options: dict = {}
    if "do_bench" in params:
        options["do_bench"] = lambda fn, quantiles: do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=quantiles)
    elif "warmup" in params:
        options.update(warmup=WARMUP_MS, rep=REP_MS)
    if "cache_results" in params:
        options["cache_results"] = True
    return options
