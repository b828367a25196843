"""Rotary position embedding (RoPE) as one kernel: what passes/rope.py puts into graphs.

    fxopt::rope(x, cos, sin) -> out
        out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[..., h:], x[..., :h]), h = d / 2.
        Partial rotary (GPT-NeoX, Phi, StableLM): tables of r < d columns (r even) rotate x's first r
        columns and pass the other d - r through: cat(rope(x[..., :r], cos, sin), x[..., r:]), HF's form.
        adjacent=True: GPT-J's rotate_every_two instead, which pairs columns (2i, 2i + 1) rather than
        (i, i + r/2): rotate_every_two(x) = stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2).
    fxopt::rope_cache_write(cache, x, cos, sin, pos)
        cache[:, :, pos:pos + n] = rope(x, cos, sin), in place (fxopt::cache_write's semantics).

As traced, one RoPE is three or four kernels (neg, cat, a fused multiply-add) and extra passes over q
and k; here it is one pass: each program reads x's two halves and the matching cos/sin elements,
computes in fp32 and writes both halves of the output (and, with partial rotary, copies the rest).

x: any rank >= 2, any strides (q/k are usually head-transposed views (b, s, h, d) -> (b, h, s, d) of a
projection's output). cos, sin: anything that broadcasts to x without changing its shape, e.g. (s, d),
(b, 1, s, d), or the decode program's per-row tables (b, 1, n, d); broadcast dims are read through
stride 0, never materialised.

Output dtype: PyTorch's result type of the traced expression, promote(result_type(x, cos),
result_type(x, sin)) -- bf16 x with fp32 tables gives fp32, as in eager. Output layout: torch.empty_like(x)
(x's dim order, dense), which for the usual transposed view is eager's own layout for `x * cos + ...`,
and keeps attention's output in (b, s, h, d) order so the head merge after it stays a view. The fake
implementation allocates the same way, so meta["val"] strides equal the real ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.codegen import library
from fxopt.codegen.loader import ops_use_kernels
from fxopt.codegen.pdl import launch_options, use_pdl
from fxopt.codegen.tuning import TunedKernel
from fxopt.hardware import get_hardware, sm_count

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 1024
LEAD_DIMS = 4  # leading dims the kernel unravels a row index over (after collapsing)
TARGET_ELEMENTS = 4096  # output elements per program (both halves): enough bytes in flight per SM


# --------------------------------------------------------------------------------------------------
# Reference, dtype and layout (shared by the op, its fake implementation and the tests)
# --------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (HF's convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J's pairing of adjacent columns."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rotary_dim(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    """The columns of x that rotate: the tables' last dim when it is narrower than x's (partial rotary), else all
    of them (a table whose last dim is 1 or d broadcasts over the whole row)."""
    widths = {t.shape[-1] if t.dim() else 1 for t in (cos, sin)}
    r = max(widths)
    return r if len(widths) == 1 and 1 < r < x.shape[-1] else x.shape[-1]


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool = False) -> torch.Tensor:
    """The traced expression itself, in eager PyTorch (eager's dtype, eager's layout); with partial rotary
    HF's cat of the rotated columns and the rest."""
    r = rotary_dim(x, cos, sin)
    if r < x.shape[-1]:
        return torch.cat((rope_reference(x[..., :r], cos, sin, adjacent), x[..., r:]), dim=-1)
    return x * cos + (rotate_every_two(x) if adjacent else rotate_half(x)) * sin


def result_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    """dtype of `x * cos + rotate_half(x) * sin` in eager: each product by PyTorch's result_type (a
    0-dim table does not promote x), their sum by plain promotion (both have x's rank)."""
    return torch.promote_types(torch.result_type(x, cos), torch.result_type(x, sin))


def new_output(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The op's output buffer: x's shape and dim order, dense. Real and fake implementations both
    allocate here, so their strides agree."""
    return torch.empty_like(x, dtype=dtype)


def check_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """ValueError unless x has rank >= 2, the rotated columns are even in number and cos/sin broadcast to x's
    shape (to its first r columns with partial rotary)."""
    if x.dim() < 2:
        raise ValueError(f"rope: x must have rank >= 2, got shape {tuple(x.shape)}")
    r = rotary_dim(x, cos, sin)
    if r % 2:
        raise ValueError(f"rope: the rotated dim must be even, got {r}")
    rotated = (*x.shape[:-1], r)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() > x.dim() or not all(
            _broadcasts(t, n) for t, n in zip(reversed(table.shape), reversed(rotated))
        ):
            raise ValueError(f"rope: {name} of shape {tuple(table.shape)} does not broadcast to x's "
                             f"{tuple(rotated)} without changing it")


def _broadcasts(size, target) -> bool:
    """size is 1 or equal to target, decided without guards on symbolic sizes (the fake impl runs on them)."""
    return statically_known_true(size == 1) or statically_known_true(size == target)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(
    X, COS, SIN, OUT, SLOTS,
    n_rows, size1, size2, size3,
    sx0, sx1, sx2, sx3, sxd,
    sc0, sc1, sc2, sc3, scd,
    ss0, ss1, ss2, ss3, ssd,
    so0, so1, so2, so3, sod,
    rows_bucket,  # autotune key only
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_SLOTS: tl.constexpr, INDEX_64: tl.constexpr, PDL: tl.constexpr,
    PASS: tl.constexpr = 0, BLOCK_P: tl.constexpr = 1, ADJACENT: tl.constexpr = False,
):
    # One program = BLOCK_R rows of 2 * HALF rotated elements, then PASS copied ones (partial rotary). Per row
    # it reads 2 * HALF elements of x, cos and sin (cos/sin rows shared by the heads are stride-0 re-reads,
    # served from cache) and writes 2 * HALF elements of OUT: out1 = x1 * c1 - x2 * s1,
    # out2 = x2 * c2 + x1 * s2, in fp32; the PASS columns are x's, cast to OUT's dtype.
    # A row index unravels over four leading dims (size0 implied); with HAS_SLOTS the innermost one is
    # the token axis and OUT's position along it is SLOTS[i3] (a KV-cache write at device-side slots).
    if PDL:  # launched early (programmatic dependent launch): let the next kernel launch, wait for x
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    i3 = rows % size3
    rest = rows // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    x_row = i0 * sx0 + i1 * sx1 + i2 * sx2 + i3 * sx3
    c_row = i0 * sc0 + i1 * sc1 + i2 * sc2 + i3 * sc3
    s_row = i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3
    if HAS_SLOTS:
        slot = tl.load(SLOTS + i3, mask=row_ok, other=0).to(tl.int64)
        o_row = i0.to(tl.int64) * so0 + i1.to(tl.int64) * so1 + i2.to(tl.int64) * so2 + slot * so3
    else:
        o_row = i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3

    cols = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (cols < HALF)[None, :]
    lo, hi = cols[None, :], (cols + HALF)[None, :]  # the pairs rotate_half mixes
    if ADJACENT:  # rotate_every_two's: (2i, 2i + 1)
        lo, hi = 2 * cols[None, :], (2 * cols + 1)[None, :]
    x1 = tl.load(X + x_row[:, None] + lo * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_row[:, None] + hi * sxd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + c_row[:, None] + lo * scd, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_row[:, None] + hi * scd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + s_row[:, None] + lo * ssd, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + s_row[:, None] + hi * ssd, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * c1 - x2 * s1
    out2 = x2 * c2 + x1 * s2
    out_ty = OUT.dtype.element_ty
    tl.store(OUT + o_row[:, None] + lo * sod, out1.to(out_ty), mask=mask)
    tl.store(OUT + o_row[:, None] + hi * sod, out2.to(out_ty), mask=mask)
    if PASS > 0:  # columns 2 * HALF .. 2 * HALF + PASS: x as it is, in the output's dtype
        rest = (2 * HALF + tl.arange(0, BLOCK_P))[None, :]
        rest_mask = row_ok[:, None] & (rest < 2 * HALF + PASS)
        kept = tl.load(X + x_row[:, None] + rest * sxd, mask=rest_mask, other=0.0)
        tl.store(OUT + o_row[:, None] + rest * sod, kept.to(out_ty), mask=rest_mask)


def _block_h(half: int) -> int:
    return triton.next_power_of_2(max(int(half), 1))


def _rows_bucket(n_rows: int) -> int:
    return min(triton.next_power_of_2(max(int(n_rows), 1)), 1 << 20)


def default_config(half: int, n_rows: int, sms: int | None = None) -> tuple[int, int]:
    """(BLOCK_R, num_warps): about TARGET_ELEMENTS outputs per program, fewer rows when that would leave
    a small launch (a decode step's q or k) on fewer programs than the GPU has SMs (`sms`; the default preset's
    without one); 8 to 16 outputs per thread (at most 8 warps)."""
    min_programs = sms or get_hardware(None).sm_count
    block_h = _block_h(half)
    block_r = max(1, TARGET_ELEMENTS // (2 * block_h))
    block_r = min(block_r, max(1, triton.next_power_of_2(triton.cdiv(n_rows, min_programs))))
    block_r = min(block_r, 64)
    num_warps = min(8, max(1, 2 * block_r * block_h // 256))
    return block_r, num_warps


def _make_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r in (1, 2, 4, 8, 16, 32, 64) for w in (1, 2, 4, 8)]


def _prune_configs(configs, named_args, **kwargs):
    """The heuristic's config first, then (for FXOPT_ROPE_AUTOTUNE=1 / FXOPT_AUTOTUNE=1 to time) every config
    whose tile gives each thread 2 to 64 outputs and does not exceed the rows."""
    args = {**named_args, **kwargs}
    half, rows = args["HALF"], args["rows_bucket"]
    chosen = default_config(half, rows, sm_count(args["X"].device))
    block_h = _block_h(half)

    def fits(c):
        per_thread = 2 * c.kwargs["BLOCK_R"] * block_h / (32 * c.num_warps)
        return 2 <= per_thread <= 64 and c.kwargs["BLOCK_R"] <= rows

    def tile(c):
        return c.kwargs["BLOCK_R"], c.num_warps
    return [c for c in configs if tile(c) == chosen] + [c for c in configs if fits(c) and tile(c) != chosen]


_rope_kernel_tuned = TunedKernel(_rope_kernel, _make_configs(), key=["HALF", "PASS", "ADJACENT", "rows_bucket"],
                                 prune=_prune_configs, family="rope", tune="rope_autotune")


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def collapse_rows(shape, strides: list[list[int]]) -> list[tuple[int, list[int]]]:
    """The leading dims of `shape` (all but the last) as (size, per-tensor strides), outermost first:
    size-1 dims dropped, neighbours merged where every tensor steps through them as one dim."""
    merged: list[tuple[int, list[int]]] = []
    for i, n in enumerate(shape[:-1]):
        if n == 1:
            continue
        st = [s[i] for s in strides]
        if merged and all(p == s * n for p, s in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    return merged


def _needs_int64(tensors: list[torch.Tensor], slots_len: int = 0) -> bool:
    """Any element offset (or row count) reaching 2^31 - 1 forces int64 index math."""
    reach = max(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) for t in tensors)
    return max(reach, tensors[0].numel(), slots_len) >= 2**31 - 1


def kernel_unsupported(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run these inputs (the op then computes the reference), or None."""
    try:
        check_inputs(x, cos, sin)
    except ValueError as exc:
        return str(exc)
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} is {t.dtype}"
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}"
    if out_dtype not in KERNEL_DTYPES:
        return f"output dtype {out_dtype}"
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {x.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def _launch(x, cos, sin, out, lead, slots=None, config=None, adjacent=False) -> None:
    """Launch over `lead` = up to LEAD_DIMS (size, [x, cos, sin, out strides]) leading dims; tables already
    broadcast to x's rotated columns. `config` = (BLOCK_R, num_warps) bypasses the autotuner (tests)."""
    pad = [(1, [0, 0, 0, 0])] * (LEAD_DIMS - len(lead))
    dims = pad + list(lead)
    sizes = [n for n, _ in dims]
    n_rows = 1
    for n in sizes:
        n_rows *= n
    if n_rows == 0 or x.shape[-1] == 0:
        return
    # per tensor: its strides along the four leading dims, then along the last (head) dim
    per_tensor = [[st[t] for _, st in dims] + [[x, cos, sin, out][t].stride(-1)] for t in range(4)]
    half, passed = cos.shape[-1] // 2, x.shape[-1] - cos.shape[-1]
    slots_len = slots.numel() if slots is not None else 0
    index_64 = _needs_int64([x, cos, sin, out], slots_len) or n_rows >= 2**31 - 1
    args = (x, cos, sin, out, slots if slots is not None else x, n_rows, *sizes[1:],
            *per_tensor[0], *per_tensor[1], *per_tensor[2], *per_tensor[3], _rows_bucket(n_rows))
    pdl = use_pdl(x.device)
    meta = dict(HALF=half, BLOCK_H=_block_h(half), HAS_SLOTS=slots is not None, INDEX_64=index_64, PDL=pdl,
                PASS=passed, BLOCK_P=_block_h(passed), ADJACENT=adjacent, **launch_options(pdl))
    if config is None:
        _rope_kernel_tuned[lambda m: (triton.cdiv(n_rows, m["BLOCK_R"]),)](*args, **meta)
    else:
        block_r, num_warps = config
        _rope_kernel[(triton.cdiv(n_rows, block_r),)](*args, **meta, BLOCK_R=block_r, num_warps=num_warps)


def _tables_over_rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """cos and sin broadcast (stride 0, never materialised) to x's rotated columns (..., r)."""
    rotated = (*x.shape[:-1], rotary_dim(x, cos, sin))
    return cos.expand(rotated), sin.expand(rotated)


def _reference_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    adjacent: bool = False) -> None:
    """rope_reference(x, cos, sin) written into out (the kernel's layout), without a temporary for the rows."""
    r = rotary_dim(x, cos, sin)
    rotate = rotate_every_two if adjacent else rotate_half
    torch.add(x[..., :r] * cos, rotate(x[..., :r]) * sin, out=out[..., :r])
    out[..., r:].copy_(x[..., r:])


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool = False, *,
         config: tuple[int, int] | None = None) -> torch.Tensor:
    """The kernel's launcher: out = x * cos + rotate_half(x) * sin in result_dtype (partial rotary: over the
    tables' columns, the rest copied), laid out by new_output. Inputs the kernel does not cover (fp64, mixed
    devices, more than LEAD_DIMS leading dims that do not collapse) get the reference, written into the same
    layout."""
    dtype = result_dtype(x, cos, sin)
    out = new_output(x, dtype)
    reason = kernel_unsupported(x, cos, sin, dtype)
    cos_b, sin_b = _tables_over_rotated(x, cos, sin)
    lead = collapse_rows(x.shape, [x.stride(), cos_b.stride(), sin_b.stride(), out.stride()])
    if reason is not None or len(lead) > LEAD_DIMS:
        _reference_into(out, x, cos, sin, adjacent)
        return out
    _launch(x, cos_b, sin_b, out, lead, config=config, adjacent=adjacent)
    return out


def cache_slots(pos: torch.Tensor, n: int) -> torch.Tensor:
    """fxopt::cache_write's slot indices: pos itself when it is the (n,) slots, else pos + arange(n)."""
    return pos if pos.dim() == 1 else pos + torch.arange(n, device=pos.device)


def cache_write_unsupported(cache: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            pos: torch.Tensor) -> str | None:
    """Why rope_cache_write cannot run as one kernel (the op then writes the reference), or None."""
    if x.dim() != 4 or cache.dim() != 4:
        return f"x {tuple(x.shape)} and cache {tuple(cache.shape)} must be (b, h, n, d) and (b, h, L, d)"
    if cache.shape[:2] != x.shape[:2] or cache.shape[3] != x.shape[3]:
        return f"x {tuple(x.shape)} does not fit cache {tuple(cache.shape)}"
    if pos.dim() > 1 or (pos.dim() == 1 and pos.numel() != x.shape[2]) or pos.device != x.device:
        return f"pos of shape {tuple(pos.shape)} on {pos.device}"
    if cache.device != x.device:
        return f"cache on {cache.device}, x on {x.device}"
    return kernel_unsupported(x, cos, sin, cache.dtype)


def rope_cache_write(cache: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     pos: torch.Tensor, adjacent: bool = False, *, config: tuple[int, int] | None = None) -> None:
    """cache[:, :, slots] = rope(x, cos, sin) cast to cache's dtype, slots = cache_slots(pos, n), in one
    kernel: the rotated rows go straight into the cache, never through a temporary."""
    if cache_write_unsupported(cache, x, cos, sin, pos) is not None:
        cache.index_copy_(2, cache_slots(pos, x.shape[2]), rope_reference(x, cos, sin, adjacent).to(cache.dtype))
        return
    b, h, n, _ = x.shape
    slots = cache_slots(pos, n)
    cos_b, sin_b = _tables_over_rotated(x, cos, sin)
    lead = [(b, [x.stride(0), cos_b.stride(0), sin_b.stride(0), cache.stride(0)]),
            (h, [x.stride(1), cos_b.stride(1), sin_b.stride(1), cache.stride(1)]),
            (n, [x.stride(2), cos_b.stride(2), sin_b.stride(2), cache.stride(2)])]
    _launch(x, cos_b, sin_b, cache, lead, slots=slots, config=config, adjacent=adjacent)


# --------------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------------


@library.define("rope")
def rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool = False) -> torch.Tensor:
    check_inputs(x, cos, sin)
    if ops_use_kernels(x):
        return rope(x, cos, sin, adjacent)
    out = new_output(x, result_dtype(x, cos, sin))
    _reference_into(out, x, cos, sin, adjacent)  # the kernel's layout
    return out


@library.register_fake(rope_op)
def _(x, cos, sin, adjacent=False):
    check_inputs(x, cos, sin)
    return new_output(x, result_dtype(x, cos, sin))


@torch.library.custom_op("fxopt::rope_cache_write", mutates_args=("cache",))
def rope_cache_write_op(cache: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        pos: torch.Tensor, adjacent: bool = False) -> None:
    """fxopt::cache_write(cache, fxopt::rope(x, cos, sin), pos) as one kernel (pos: a 0-dim start or the
    (n,) slot indices, device-side: graph-capturable)."""
    check_inputs(x, cos, sin)
    if ops_use_kernels(x):
        rope_cache_write(cache, x, cos, sin, pos, adjacent)
        return
    cache.index_copy_(2, cache_slots(pos, x.shape[2]), rope_reference(x, cos, sin, adjacent).to(cache.dtype))


@rope_cache_write_op.register_fake
def _(cache, x, cos, sin, pos, adjacent=False):
    check_inputs(x, cos, sin)
    return None


# --------------------------------------------------------------------------------------------------
# The V cache write: cache[:, :, slots] = x, no rotation. PyTorch's index_copy_ does it too, but as the one
# kernel of a decode layer outside the chain of programmatically dependent launches (see _launch).
# --------------------------------------------------------------------------------------------------


@triton.jit
def _slot_copy_kernel(
    X, OUT, SLOTS, n_rows, size1, size2,
    sx0, sx1, sx2, sxd, so0, so1, so2, sod,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):
    # One program = BLOCK_R rows (b, h, i) of D elements: reads X[b, h, i, :], writes OUT[b, h, SLOTS[i], :].
    if PDL:  # launched early (programmatic dependent launch): let the next kernel launch, wait for x
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_ok = rows < n_rows
    i2 = rows % size2
    rest = rows // size2
    i1 = rest % size1
    i0 = rest // size1
    slot = tl.load(SLOTS + i2, mask=row_ok, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = row_ok[:, None] & (cols < D)[None, :]
    x = tl.load(X + (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None] + cols[None, :] * sxd, mask=mask)
    out = OUT + (i0 * so0 + i1 * so1 + slot * so2)[:, None] + cols[None, :] * sod
    tl.store(out, x.to(OUT.dtype.element_ty), mask=mask)


def slot_copy_unsupported(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> str | None:
    if x.dim() != 4 or cache.dim() != 4 or cache.shape[:2] != x.shape[:2] or cache.shape[3] != x.shape[3]:
        return f"x {tuple(x.shape)} does not fit cache {tuple(cache.shape)}"
    if slots.dim() != 1 or slots.numel() != x.shape[2] or len({cache.device, x.device, slots.device}) != 1:
        return "slots are not the (n,) indices on the cache's device"
    if cache.dtype not in KERNEL_DTYPES or x.dtype not in KERNEL_DTYPES or x.shape[3] > MAX_HEAD_DIM:
        return "dtypes or head dim"
    return None


def slot_copy(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> None:
    """cache[:, :, slots] = x (b, h, n, d), cast to the cache's dtype, in one kernel (x may be strided)."""
    if slot_copy_unsupported(cache, x, slots) is not None:
        cache.index_copy_(2, slots, x.to(cache.dtype))
        return
    b, h, n, d = x.shape
    n_rows = b * h * n
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_r = max(1, 4096 // block_d)
    pdl = use_pdl(x.device)
    _slot_copy_kernel[(triton.cdiv(n_rows, block_r),)](
        x, cache, slots, n_rows, h, n, *x.stride(), *cache.stride(),
        D=d, BLOCK_D=block_d, BLOCK_R=block_r, PDL=pdl, num_warps=4, **launch_options(pdl))
