"""The SwiGLU MLP's up-projection with its product in the GEMM's epilogue: silu(x @ W_gateᵀ) * (x @ W_upᵀ).

After passes/matmul.py's `fuse_siblings`, a Llama-family MLP computes one GEMM over the concatenated weight
[W_gate; W_up] (2F, K), writes its (M, 2F) output, and a fused kernel reads it back to write silu(gate) * up,
(M, F). This kernel computes both halves' tiles in one program (two accumulators over the same x tile) and
writes only the product: per token 2F fewer elements written and 2F fewer read than GEMM + fused kernel.

cuBLASLt has no SiLU or gated epilogue, so this is a Triton GEMM (the grouped-order tiling of Triton's matmul
tutorial, fp32 accumulation). It pays only where it is at least as fast as cuBLAS's GEMM plus the fused kernel:
`benchmarks/swiglu_gemm.py` times both on the GPU, and the matmul pass folds the product only with
FXOPT_SWIGLU_GEMM=1 (fxopt/config.py) until a measurement says it should be the default.

fxopt::linear_swiglu(x, weight) takes the concatenated weight: (..., K) x (2F, K) -> (..., F).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fxopt.codegen import library
from fxopt.codegen.loader import interpreting, ops_use_kernels
from fxopt.codegen.tuning import TunedKernel

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_swiglu_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of y = x @ weightᵀ, gate = y[..., :F], up = y[..., F:], in plain PyTorch."""
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    return F.silu(gate) * up


def supports(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when the kernel computes this product, else why not."""
    if weight.dim() != 2 or weight.shape[0] % 2 or x.shape[-1] != weight.shape[1]:
        return f"weight {tuple(weight.shape)} is not [W_gate; W_up] over x's last dim {x.shape[-1]}"
    if x.dtype != weight.dtype or x.dtype not in DTYPES:
        return f"dtypes x {x.dtype}, weight {weight.dtype}"
    if x.device != weight.device:
        return "x and weight on different devices"
    return None


@triton.jit
def _swiglu_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, F, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, m_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # programs walk output tiles in groups of GROUP_M row blocks, so neighbours share x and W tiles in L2
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(F, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # out-of-range rows and columns read valid memory; their results are never stored
    cols = offs_n % F
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    g_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N): W_gateᵀ
    u_ptrs = g_ptrs + F * stride_wn  # W_up's rows follow W_gate's
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            g = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            u = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    out = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, in fp32, rounded once
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < F)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=mask)


BLOCK_K = 16 if interpreting() else 64


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2}, num_warps=4)]
    # two (BLOCK_M, BLOCK_N) fp32 accumulators a program: 128 x 128 on 8 warps holds 128 registers a thread
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, w, s in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4),
                               (128, 256, 8, 3), (64, 64, 4, 4))]


def _prune(configs, named_args, **kwargs):
    """Row tiles no taller than the rows need (few rows: decode-sized), the list's order kept."""
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, named_args["m_bucket"])]
    return keep or configs[:1]


_swiglu_gemm = TunedKernel(_swiglu_gemm_kernel, _configs(), key=["m_bucket", "F", "K", "EVEN_K", "DOT_PREC"],
                           prune=_prune, family="swiglu_gemm", tune="swiglu_autotune")


def linear_swiglu_kernel(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The Triton kernel on checked inputs: (..., K) x (2F, K) -> (..., F)."""
    k = x.shape[-1]
    f = weight.shape[0] // 2
    rows = x.reshape(-1, k)  # (M, K): a view when x's leading dims are contiguous
    m = rows.shape[0]
    out = torch.empty((m, f), dtype=x.dtype, device=x.device)
    if m == 0 or f == 0:
        return out.view(*x.shape[:-1], f)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(f, meta["BLOCK_N"]),)

    _swiglu_gemm[grid](rows, weight, out, m, f, k, *rows.stride(), *weight.stride(), *out.stride(),
                       min(triton.next_power_of_2(m), 1 << 14),
                       BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0, DOT_PREC=_dot_precision(x.dtype))
    return out.view(*x.shape[:-1], f)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact products, as eager


@library.define("linear_swiglu")
def linear_swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ W_gateᵀ) * (x @ W_upᵀ) with weight = [W_gate; W_up]: (..., K) x (2F, K) -> (..., F)."""
    if ops_use_kernels(x) and supports(x, weight) is None:
        return linear_swiglu_kernel(x, weight)
    return linear_swiglu_reference(x, weight)


@library.register_fake(linear_swiglu)
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))
