"""Matrix-vector product for one-token decode: y = x @ W.T (+ bias), x one row of K, W (N, K) row-major.

At batch 1 a decode step is a chain of GEMVs, each streaming a weight matrix from HBM once. cuBLAS's GEMV
reached 33-80 % of copy bandwidth on llama-1b-like's layer weights (8-46 MB) and 90 % on the lm_head (H200,
2026-11-21, every call on a different weight as in a real step: `python benchmarks/gemv_sizes.py`).
The short matrices pay for cuBLAS's ramp-up; this kernel keeps every SM loading from the first cycle.

Each program owns BLOCK_N rows of W and walks K in BLOCK_K-wide chunks: one (BLOCK_N, BLOCK_K) load of W
per step, multiplied by the matching chunk of x (read from L2 by every program), summed into a register
tile in fp32, reduced over K once at the end. No split-K: N / BLOCK_N programs already fill the GPU at
these sizes, and a split would need a second pass or atomics.

    fxopt::gemv(x, weight, bias?) -> (..., N)   x (..., K) with one row; on CPU, F.linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fxopt.codegen.flash_attention import autotune_enabled

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k)
        else:
            k_ok = k < K
            w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]  # (BLOCK_N, BLOCK_K)
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def default_config(n: int, k: int) -> triton.Config:
    """2 rows of W per program in 1024-column chunks up to K = 4096, 4 rows in 2048-column chunks beyond, on
    4 warps: the tuned pick (or within 1 %) at every llama-1b-like size (H200, 2026-11-21, gemv_sizes.py)."""
    if _INTERPRET:
        return triton.Config({"BLOCK_N": 4, "BLOCK_K": 32}, num_warps=4)
    block_n, block_k = (2, 1024) if k <= 4096 else (4, 2048)
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": min(block_k, triton.next_power_of_2(k))}, num_warps=4)


def tuning_configs(n: int, k: int) -> list[triton.Config]:
    kmax = triton.next_power_of_2(k)
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
            for bn in (2, 4, 8) for bk in (512, 1024, 2048) for w in (4, 8) if bk <= max(kmax, 512)]


_TUNED: dict[tuple, triton.Config] = {}


def _launch(x, w, bias, y, config) -> None:
    n, k = w.shape
    block_n, block_k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, bias if bias is not None else y, y, n, k, w.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        num_warps=config.num_warps)


def _config_for(x, w, bias, y) -> triton.Config:
    n, k = w.shape
    if not autotune_enabled("FXOPT_GEMV_AUTOTUNE") or _INTERPRET:
        return default_config(n, k)
    key = (n, k, w.dtype, bias is not None)
    if key not in _TUNED:
        from triton.testing import do_bench

        timed = [(do_bench(lambda c=c: _launch(x, w, bias, y, c), warmup=5, rep=25), i, c)
                 for i, c in enumerate(tuning_configs(n, k))]
        _TUNED[key] = min(timed)[2]
    return _TUNED[key]


def supports(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when the kernel covers the call, else why not."""
    if x.numel() != x.shape[-1]:
        return "more than one row"
    if w.dim() != 2 or w.stride(1) != 1 or x.shape[-1] != w.shape[1]:
        return "weight is not a row-major (N, K) matrix"
    if w.dtype not in DTYPES or x.dtype != w.dtype or (bias is not None and bias.dtype != w.dtype):
        return "dtypes"
    if bias is not None and (bias.dim() != 1 or bias.stride(0) != 1):
        return "bias is not a contiguous vector"
    return None


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + bias through the kernel (x with one row of K; any leading dims of size 1)."""
    x_row = x.reshape(-1).contiguous()  # (K,)
    y = torch.empty(w.shape[0], device=x.device, dtype=x.dtype)  # (N,)
    _launch(x_row, w, bias, y, _config_for(x_row, w, bias, y))
    return y.reshape(*x.shape[:-1], w.shape[0])


def _kernel_available(x: torch.Tensor) -> bool:
    return x.is_cuda or (_INTERPRET and os.environ.get("FXOPT_INTERPRET_OPS", "0") == "1")


@torch.library.custom_op("fxopt::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _kernel_available(x) and supports(x, weight, bias) is None:
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


@gemv_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[:-1] + weight.shape[:1])
