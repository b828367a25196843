"""codegen/swiglu_gemm.py: the Triton GEMM with the SwiGLU product in its epilogue, run in Triton's interpreter
on CPU (fp16 and fp32: the interpreter computes bf16 dots wrongly), against silu(gate) * up in float64."""

from __future__ import annotations

import pytest
import torch

from fxopt.codegen import swiglu_gemm
from fxopt.numerics import within_tolerance

pytestmark = pytest.mark.skipif(not swiglu_gemm.interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a GPU")


def swiglu_float64(x, weight):
    y = x.double() @ weight.double().t()
    gate, up = y.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead, k, f", [((15,), 32, 24), ((2, 9), 40, 16), ((1,), 16, 8)])
def test_kernel_matches_float64(dtype, lead, k, f):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(k + f)
    x = (torch.randn(*lead, k, generator=g) / k**0.25).to(device, dtype)
    weight = (torch.randn(2 * f, k, generator=g) / k**0.25).to(device, dtype)
    out = swiglu_gemm.linear_swiglu_kernel(x, weight)
    assert out.shape == (*lead, f) and out.dtype == dtype
    ok, error, allowed = within_tolerance(out, swiglu_gemm.linear_swiglu_reference(x, weight),
                                          swiglu_float64(x, weight))
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


def test_strided_input_and_weight():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 12, generator=g).t()  # (12, 32), transposed strides
    weight = torch.randn(32, 48, generator=g).t()  # (48, 32): [W_gate; W_up] transposed in memory
    out = swiglu_gemm.linear_swiglu_kernel(x, weight)
    torch.testing.assert_close(out.double(), swiglu_float64(x, weight), rtol=1e-4, atol=1e-4)


def test_broadcast_rows_of_x():
    """x with a stride-0 row dim (one row expanded over eight): the kernel reads it through its strides."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 32, generator=g).expand(8, 32)
    weight = torch.randn(48, 32, generator=g)
    out = swiglu_gemm.linear_swiglu_kernel(x, weight)
    torch.testing.assert_close(out.double(), swiglu_float64(x, weight), rtol=1e-4, atol=1e-4)


def test_supports_names_what_it_refuses():
    x, weight = torch.randn(3, 8), torch.randn(16, 8)
    assert swiglu_gemm.supports(x, weight) is None
    assert "[W_gate; W_up]" in swiglu_gemm.supports(x, torch.randn(15, 8))
    assert "[W_gate; W_up]" in swiglu_gemm.supports(x, torch.randn(16, 4))
    assert "dtypes" in swiglu_gemm.supports(x.half(), weight)


def test_the_op_on_cpu_is_the_reference():
    x, weight = torch.randn(2, 3, 8), torch.randn(16, 8)
    torch.testing.assert_close(torch.ops.fxopt.linear_swiglu(x, weight),
                               swiglu_gemm.linear_swiglu_reference(x, weight))
