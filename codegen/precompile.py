"""Compile every Triton kernel of a program at once, on a thread pool, instead of one at a time.

A freshly optimized model compiles its distinct kernels (fused regions, attention, RoPE) on its first
call, one after the other, each when it is first launched. `compile_in_parallel` runs a dry call of the
program in which a Triton launch that would compile submits the compile to a thread pool (Triton's
AsyncCompileMode) and launches nothing; leaving the block waits for every compile. The real first call
then finds every kernel compiled. Triton's compiler spends most of its time outside the GIL (MLIR/LLVM
passes, ptxas), so the compiles overlap. After the compiles, each kernel is also loaded on the same pool:
that builds its C launcher (a gcc run per distinct kernel signature, ~0.15 s each with a cold cache) and
loads its module on the GPU, which the first real call would otherwise do one kernel at a time.

The dry call's outputs are garbage (no Triton kernel ran); only shapes flow. It is only for programs
whose control flow does not depend on tensor values, as captured graphs are. Autotuned kernels must not
be dry-run: their timing runs would time launches that do nothing, so the caller skips it then.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from fxopt import config
from fxopt.codegen import tuning


def _async_compile_mode():
    try:  # Triton >= 3.4; a private module, so its absence only means serial compiles
        from triton.runtime._async_compile import AsyncCompileMode
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None, None
    return AsyncCompileMode, JITFunction


def available() -> bool:
    """This Triton can compile asynchronously, and FXOPT_PRECOMPILE is not 0."""

    return config.get("precompile") and _async_compile_mode()[0] is not None


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
        mode = mode_cls(pool)
        try:
            with mode, tuning.dry_run():
                yield True
        finally:
            jit_cls.run = launch
        compiled = [future.kernel for future in mode.future_kernels.values() if future.kernel is not None]
        _load_all(pool, compiled, _current_cuda_device())


def _load_all(pool, kernels, device) -> None:
    """Load kernels on the pool: first one per launcher signature (each builds that launcher; kernels with
    the same argument types share one), then the rest, which find their launcher in Triton's cache."""
    by_launcher = {}
    for kernel in kernels:
        by_launcher.setdefault(_launcher_key(kernel), []).append(kernel)
    load = _load_on(device)
    list(pool.map(load, [group[0] for group in by_launcher.values()]))
    list(pool.map(load, [kernel for group in by_launcher.values() for kernel in group[1:]]))


def _launcher_key(kernel):
    """What Triton's launcher source is generated from: argument types and constant values."""
    src = getattr(kernel, "src", None)
    if src is None or not hasattr(src, "signature"):
        return id(kernel)
    constants = getattr(src, "constants", {})
    return repr(sorted(src.signature.items(), key=str)), repr(sorted(constants.items(), key=str))


def _current_cuda_device():

    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _load_on(device):
    """Build a compiled kernel's launcher and load it on `device` (what Triton does at its first launch)."""

    def load(kernel):
        init_handles = getattr(kernel, "_init_handles", None)  # Triton's (private) lazy loader
        if init_handles is None or device is None:
            return
        with torch.cuda.device(device):
            init_handles()

    return load


# Each kernel family's own switch; FXOPT_AUTOTUNE turns on every family whose own variable is unset.
AUTOTUNE_FAMILIES = ("attn_autotune", "rope_autotune", "fused_autotune", "gemv_autotune",
                     "swiglu_autotune")  # fxopt.config knobs
AUTOTUNE_VARIABLES = ("FXOPT_AUTOTUNE", "FXOPT_ATTN_AUTOTUNE", "FXOPT_ROPE_AUTOTUNE", "FXOPT_FUSED_AUTOTUNE",
                      "FXOPT_SWIGLU_AUTOTUNE",
                      "FXOPT_GEMV_AUTOTUNE")  # their environment variables


def autotuning() -> bool:
    """Whether any kernel family times its configs on first use (then no dry run: see the module doc), by
    the families' own switch (each falls back to FXOPT_AUTOTUNE; fxopt/config.py)."""

    return any(config.get(family) for family in AUTOTUNE_FAMILIES)
