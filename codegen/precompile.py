"""Compile every Triton kernel of a program at once, on a thread pool, instead of one at a time.

A freshly optimized model compiles its distinct kernels (fused regions, attention, RoPE) on its first
call, one after the other, each when it is first launched. `compile_in_parallel` runs a dry call of the
program in which a Triton launch that would compile submits the compile to a thread pool (Triton's
AsyncCompileMode) and launches nothing; leaving the block waits for every compile. The real first call
then finds every kernel compiled. Triton's compiler spends most of its time outside the GIL (MLIR/LLVM
passes, ptxas), so the compiles overlap.

The dry call's outputs are garbage (no Triton kernel ran); only shapes flow. It is only for programs
whose control flow does not depend on tensor values, as captured graphs are. Autotuned kernels must not
be dry-run: their timing runs would time launches that do nothing, so the caller skips it then.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor


def _async_compile_mode():
    try:  # Triton >= 3.4; a private module, so its absence only means serial compiles
        from triton.runtime._async_compile import AsyncCompileMode
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None, None
    return AsyncCompileMode, JITFunction


def available() -> bool:
    """This Triton can compile asynchronously, and FXOPT_PRECOMPILE is not 0."""
    return os.environ.get("FXOPT_PRECOMPILE", "1") != "0" and _async_compile_mode()[0] is not None


@contextlib.contextmanager
def compile_in_parallel(max_workers: int | None = None):
    """Inside the block, Triton launches only compile (in parallel, at most max_workers at a time);
    on exit every compile has finished and its kernel is in Triton's caches. Not thread-safe: another
    thread launching Triton kernels meanwhile would be dry-run too."""
    mode_cls, jit_cls = _async_compile_mode()
    if mode_cls is None:
        yield False
        return
    workers = max_workers or min(16, os.cpu_count() or 1)
    launch = jit_cls.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fxopt-compile") as pool:
        jit_cls.run = compile_only
        try:
            with mode_cls(pool):
                yield True
        finally:
            jit_cls.run = launch


# Each kernel family's own switch; FXOPT_AUTOTUNE turns on every family whose own variable is unset.
AUTOTUNE_FAMILIES = ("FXOPT_ATTN_AUTOTUNE", "FXOPT_ROPE_AUTOTUNE", "FXOPT_FUSED_AUTOTUNE")
AUTOTUNE_VARIABLES = ("FXOPT_AUTOTUNE", *AUTOTUNE_FAMILIES)


def autotuning() -> bool:
    """Whether any kernel family times its configs on first use (then no dry run: see the module doc), by
    the families' own rule (flash_attention.autotune_enabled)."""
    from fxopt.codegen.flash_attention import autotune_enabled

    return any(autotune_enabled(family) for family in AUTOTUNE_FAMILIES)
