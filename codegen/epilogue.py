"""GEMM epilogues: an activation folded into the matmul that produces its input, done by cuBLASLt.

fxopt::linear_gelu_tanh(x, weight, bias) = gelu_tanh(x @ weightᵀ + bias), the MLP up-projection of GPT-2-style
models. On CUDA it is one cuBLASLt GEMM whose epilogue adds the bias and applies the GELU (tanh
approximation) before the tile is stored (`torch._addmm_activation(..., use_gelu=True)`), so the (tokens, 4d)
activation is written once instead of written, read and written again by a separate GELU kernel. Where
cuBLASLt declines the call, PyTorch runs addmm and then the tanh GELU itself: the same function. On the CPU
(whose `_addmm_activation` uses the exact erf GELU) it is the reference below.

The fold is opt-in (`optimize(..., epilogues=True)`): its speed and its CUDA numerics have not been measured on
a GPU yet (tests/gpu/test_epilogue_gpu.py and benchmarks/epilogue.py are there to do it).

Reference, test and benchmark: `linear_gelu_tanh_reference`, tests/codegen/test_epilogue.py (CPU) and
tests/gpu/test_epilogue_gpu.py (CUDA, against float64), `python benchmarks/epilogue.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxopt.codegen import library


def linear_gelu_tanh_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weightᵀ + bias, approximate="tanh") in plain PyTorch."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when the fold applies, else why not."""
    if bias is None:
        return "no bias (the cuBLASLt GELU epilogue is the bias + GELU one)"
    if bias.dim() != 1 or weight.dim() != 2 or bias.shape[0] != weight.shape[0]:
        return "bias is not one value per output column"
    if not (x.dtype == weight.dtype == bias.dtype):
        return f"mixed dtypes ({x.dtype}, {weight.dtype}, {bias.dtype})"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype}"
    return None


@library.define("linear_gelu_tanh")
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weightᵀ + bias): (..., K) x (N, K) + (N,) -> (..., N)."""
    if not x.is_cuda:
        return linear_gelu_tanh_reference(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)  # (M, N), epilogue: + bias, GELU
    return out.view(*x.shape[:-1], weight.shape[0])


@library.register_fake(linear_gelu_tanh)
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
