"""The runtime every generated fused-kernel module imports (`fxopt.codegen.fused`).

A generated module holds only what depends on its region: the @triton.jit kernels, the launcher and a few
constants (ELEMENT_BYTES, ROW_BYTES_PER_COLUMN, WHOLE_ROW_MAX_N). Everything they share lives here as
ordinary code:

* config choice: `autotune` (codegen/tuning.py's TunedKernel: one config per key value, timed when tuning),
  the config lists per mode (`pointwise_configs`, `tile_configs`, `row_configs`, `loop_configs`) and the
  pruners that order them (`pointwise_pruner`, `prune_tile_configs`, `row_pruner`);
* launch plans: `plan` caches `pointwise_plan` / `row_plan` per input layout; they broadcast the inputs,
  `collapse` their dims and decide `needs_int64`;
* `round_bf16_for`, the @triton.jit rounding applied before every fp32 -> bf16 cast.

This module is imported once per process and reads no knob when imported: whatever depends on the mode
(interpreter or GPU) or on a setting is an argument, passed by the generated module with the values it read
when it was imported (its INTERPRET and AUTOTUNE). The loader keys generated modules by those values, so a
test that switches TRITON_INTERPRET inside one process gets modules built for each mode from one runtime.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fxopt.codegen.tuning import tuned

__all__ = [
    "PLANS", "TILE_BYTES", "autotune", "collapse", "loop_configs", "needs_int64", "plan",
    "pointwise_configs", "pointwise_plan", "pointwise_pruner", "prune_tile_configs", "round_bf16_for",
    "row_configs", "row_plan", "row_pruner", "tile_configs",
]


# ----------------------------------------------------------------------------- choosing a config


def autotune(configs, key, prune=None, *, interpret: bool, tune: bool):
    """A decorator for a @triton.jit kernel that picks its launch config (codegen/tuning.py's TunedKernel).

    In the interpreter nothing is worth timing: the first config, unpruned. On a GPU without `tune` (the
    default, FXOPT_FUSED_AUTOTUNE unset) the first config `prune` keeps runs, chosen once per key, so the first
    call of an optimized model costs compiles, not a tuning sweep; with `tune` every config `prune` keeps is
    timed once per key and device."""
    if interpret:
        return tuned(configs[:1], key, family="fused")
    return tuned(configs, key, prune, family="fused", tune=tune)


# ----------------------------------------------------------------------------- layouts


def collapse(shape, strides, max_dims):
    """Drop size-1 dims and merge neighbours every tensor walks contiguously.

    `strides` holds one stride tuple per tensor, all over `shape` (outermost dim first). A dim merges into
    the kept dim outside it when, for every tensor, the outer stride is this dim's stride times its size:
    the kernel then walks both with one index. Fewer dims means less index arithmetic per element, and
    two dims select the 2-D tiled kernel.

    Returns (ndim, sizes, per-tensor strides), innermost dim first, padded to `max_dims` with size 1 and
    stride 0 (a 0-dim or all-ones shape gives one dim of size 1).
    """
    dims = []
    for i, size in enumerate(shape):
        if size == 1:
            continue
        st = [s[i] for s in strides]
        if dims and all(p == q * size for p, q in zip(dims[-1][1], st)):
            dims[-1] = (dims[-1][0] * size, st)
        else:
            dims.append((size, st))
    dims = dims[::-1] or [(1, [0] * len(strides))]
    pad = max_dims - len(dims)
    sizes = [d[0] for d in dims] + [1] * pad
    per_tensor = [[d[1][i] for d in dims] + [0] * pad for i in range(len(strides))]
    return len(dims), sizes, per_tensor


def needs_int64(numel, tensors):
    """int64 offsets when an element index or any input offset can pass 2**31.

    The reach is the larger of `numel` and every tensor's farthest element offset; a margin of 2**24 covers
    the masked lanes of the last block, whose offsets run past the end before the mask drops them."""
    reach = max([numel] + [sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) for t in tensors])
    return reach + (1 << 24) >= 2**31


# ----------------------------------------------------------------------------- bf16 rounding


def round_bf16_interpreter(x):
    """fp32 rounded to the nearest bf16 value, ties to even, NaN kept (the body of an @triton.jit function).

    The interpreter truncates fp32 -> bf16 where GPUs round to nearest even: rounding first makes the cast
    exact, so CPU tests see GPU numerics."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


def round_bf16_gpu(x):
    """x unchanged (the body of an @triton.jit function): a GPU's fp32 -> bf16 cast rounds to nearest even."""
    return x


def round_bf16_for(interpret: bool):
    """The @triton.jit rounding a generated kernel applies before a bf16 cast, as `_round_bf16`.

    `interpret` picks the body (rounding in the interpreter, nothing on a GPU). The wrapper is made now,
    not when this module was imported: triton.jit makes an interpreter function or a GPU one by the mode
    Triton is in when it decorates, and that must match the kernel that calls it (the generated module
    calls this when it is imported, in its own mode)."""
    return triton.jit(round_bf16_interpreter if interpret else round_bf16_gpu)


# ----------------------------------------------------------------------------- launch plans

# Launch plans by (plan function, max dims, every input's shape and strides); shared by every generated
# module (a plan depends on nothing else).
PLANS: dict = {}


def plan(make, tensors, max_dims):
    """`make(tensors, max_dims)`, cached per input layout (shapes and strides): a repeated launch costs one
    dict lookup instead of broadcasting and collapsing again."""
    key = (make, max_dims) + tuple((t.shape, t.stride()) for t in tensors)
    found = PLANS.get(key)
    if found is None:
        if len(PLANS) > 4096:
            PLANS.clear()
        found = PLANS[key] = make(tensors, max_dims)
    return found


def pointwise_plan(tensors, max_dims):
    """Launch parameters of a pointwise kernel over the broadcast of `tensors`.

    Returns (shape, numel, numel's power-of-2 bucket, whether every input is contiguous over the whole
    shape or a single element, which inputs are a single element, then `collapse`'s ndim, sizes and
    per-input strides over at most `max_dims` dims, and `needs_int64`)."""
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    numel = math.prod(shape)
    scalar = [t.numel() == 1 for t in tensors]
    contiguous = all(s or (t.shape == shape and t.is_contiguous()) for t, s in zip(tensors, scalar))
    expanded = [t.expand(shape) for t in tensors]
    ndim, sizes, strides = collapse(shape, [e.stride() for e in expanded], max_dims)
    bucket = triton.next_power_of_2(max(numel, 1))
    return shape, numel, bucket, contiguous, scalar, ndim, sizes, strides, needs_int64(numel, expanded)


def row_plan(tensors, max_lead):
    """Launch parameters of a row-reduction kernel over the broadcast of `tensors` (rows = the leading dims,
    reduced along the last).

    Returns (shape, n_rows, n_cols, `collapse`'s lead ndim, sizes and per-input strides of the leading dims
    over at most `max_lead` dims, each input's stride along the last dim, and `needs_int64`)."""
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    n_cols, lead = shape[-1], shape[:-1]
    n_rows = math.prod(lead)
    expanded = [t.expand(shape) for t in tensors]
    lead_dims, lead_sizes, lead_strides = collapse(lead, [e.stride()[:-1] for e in expanded], max_lead)
    col_strides = [e.stride(-1) for e in expanded]
    index_64 = needs_int64(n_rows * n_cols, expanded)
    return shape, n_rows, n_cols, lead_dims, lead_sizes, lead_strides, col_strides, index_64


# ----------------------------------------------------------------------------- pointwise configs


def pointwise_configs(interpret: bool) -> list:
    """The 1-D pointwise kernels' configs (BLOCK elements a program): one small one for the interpreter."""
    if interpret:
        return [triton.Config({"BLOCK": 256}, num_warps=4)]
    # the first pointwise_pruner puts first is the default when not autotuning. Measured (H200,
    # 2026-11-21): SwiGLU 8192 x 4096 bf16 runs 2048 x 4 warps 1 % faster than 2048 x 8; chain E in fp32
    # runs 2048 x 8 1 % faster than 2048 x 4: 32 bytes per thread either way.
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in (2048, 1024, 4096) for w in (8, 4)]


def tile_configs(interpret: bool) -> list:
    """The 2-D tiled pointwise kernel's configs (ROWS_T x BLOCK_C tiles): one small one for the interpreter."""
    if interpret:
        return [triton.Config({"ROWS_T": 4, "BLOCK_C": 16}, num_warps=4)]
    # (measured on an H200, 8192 x 4096 bf16 with a broadcast row: 2048-element tiles on 4 warps first)
    return [
        triton.Config({"ROWS_T": max(1, tile // c), "BLOCK_C": c}, num_warps=w)
        for c in (16, 32, 64, 128, 256, 512, 1024, 2048) for tile, w in ((2048, 4), (4096, 8))
    ]


def pointwise_pruner(element_bytes: int):
    """The early-config-prune function of a pointwise kernel whose widest input or output has `element_bytes`
    bytes an element: it keeps every config and puts first the one whose threads each load closest to 32
    bytes (|log2(bytes per thread / 32)| smallest; ties keep the list's order). The first is the default
    without autotuning."""

    def prune_pointwise_configs(configs, named_args, **kwargs):
        def bytes_per_thread(c):
            return c.kwargs["BLOCK"] * element_bytes / (32 * c.num_warps)

        return sorted(configs, key=lambda c: abs(math.log2(bytes_per_thread(c) / 32)))

    return prune_pointwise_configs


def prune_tile_configs(configs, named_args, **kwargs):
    """2-D tiles of ROWS_T x BLOCK_C: BLOCK_C = the inner dim's power-of-2 bucket (size0_bucket) clamped to
    16..2048; the rows fill 2048-element tiles on 4 warps or 4096 on 8 (8 or 16 elements per thread). Keeps
    the configs of that BLOCK_C in their order (the first config when none has it; all without the bucket)."""
    c_bucket = named_args.get("size0_bucket", kwargs.get("size0_bucket"))
    if c_bucket is None:
        return configs
    block_c = max(16, min(c_bucket, 2048))
    keep = [c for c in configs if c.kwargs["BLOCK_C"] == block_c]
    return keep or configs[:1]


# ----------------------------------------------------------------------------- row configs

# Default tile: ~32 KB moved per program. Measured (H200, 8192 x 4096 bf16, 2026-11-21): LayerNorm (4 bytes
# a column) 3 % faster on 2 rows than 1; RMSNorm + residual (8 bytes a column) 2 % faster on 1 row than 2.
TILE_BYTES = 32 * 1024


def row_configs(interpret: bool) -> list:
    """The whole-row kernels' configs (ROWS rows a program, BLOCK_N set by the launcher)."""
    if interpret:
        return [triton.Config({"ROWS": 2}, num_warps=4)]
    # the first kept by row_pruner is the default when not autotuning
    return [triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8, 16, 32, 64) for w in (8, 4, 16, 2, 1)]


def loop_configs(interpret: bool) -> list:
    """The long-row (loop over column blocks) kernels' configs; unpruned, so the first is the default."""
    if interpret:
        return [triton.Config({"ROWS": 1, "BLOCK_N": 128}, num_warps=4)]
    return [
        triton.Config({"ROWS": 1, "BLOCK_N": b}, num_warps=w)
        for b, w in ((2048, 8), (1024, 4), (2048, 4), (4096, 8), (4096, 16))
    ]


def row_pruner(row_bytes_per_column: int, tile_bytes: int = TILE_BYTES):
    """The early-config-prune function of a whole-row kernel whose rows move `row_bytes_per_column` bytes per
    column (inputs that vary by row, full outputs).

    It keeps whole-row tiles of ROWS x BLOCK_N (BLOCK_N = n_bucket) of 2-8K elements (or one long row, or
    64 short rows), 8-32 elements per thread (at least 16 for tiles of 4096 and up), ordered by how close
    ROWS is to the rows that move about `tile_bytes` a program (ties keep the list's order). The first kept is
    the default without autotuning; when none fits, one row on 8 warps."""

    def prune_row_configs(configs, named_args, **kwargs):
        block_n = named_args.get("n_bucket", kwargs.get("n_bucket"))
        if block_n is None:
            return configs
        keep = []
        for c in configs:
            rows = c.kwargs["ROWS"]
            tile = rows * block_n
            per_thread = tile // (32 * c.num_warps)
            fits = tile in (2048, 4096, 8192) or (rows == 1 and block_n > 8192) or (rows == 64 and tile < 2048)
            # big tiles on 16 warps measured slower (H200, 4096-wide rows): at least 16 elements per thread there
            if fits and (16 if tile >= 4096 else 8) <= per_thread <= 32:
                keep.append(c)
        if not keep:
            return [triton.Config({"ROWS": 1}, num_warps=8)]
        target_rows = max(1, tile_bytes // (block_n * row_bytes_per_column))
        return sorted(keep, key=lambda c: abs(math.log2(c.kwargs["ROWS"] / target_rows)))  # stable: order kept

    return prune_row_configs
