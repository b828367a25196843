"""codegen/gemv.py: the one-row GEMV kernel against a float64 reference, run by the Triton interpreter on
CPU (odd N, K not a multiple of the chunk, bias or none, fp32/fp16/bf16), and the op's CPU fallback."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fxopt.codegen import gemv  # noqa: E402

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test (tests/gpu covers the GPU)")

# the error against float64 may be at most 3x eager's in fp16/bf16 (2x fp32) plus a small floor (DESIGN.md)
FACTOR = {torch.float32: 2.0, torch.float16: 3.0, torch.bfloat16: 3.0}


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, bias", [(37, 64, False), (8, 70, True), (130, 96, True), (5, 33, False)])
def test_gemv_matches_float64(dtype, n, k, bias):
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, 1, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = gemv.gemv(x, w, b)
    assert out.shape == (1, 1, n) and out.dtype == dtype
    reference = F.linear(x.double(), w.double(), None if b is None else b.double())
    eager = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    error = (out.double() - reference).abs().max().item()
    eager_error = (eager.double() - reference).abs().max().item()
    assert error <= FACTOR[dtype] * eager_error + 1e-5, (error, eager_error)


@interpreted
def test_gemv_reads_strided_rows_of_a_wider_weight():
    w_full = torch.randn(16, 80)
    w = w_full[:, :64]  # rows 80 apart: stride_wn is honoured
    x = torch.randn(64)
    torch.testing.assert_close(gemv.gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_supports_names_what_the_kernel_does_not_cover():
    w = torch.randn(8, 16)
    assert gemv.supports(torch.randn(1, 16), w, None) is None
    assert gemv.supports(torch.randn(2, 16), w, None) == "more than one row"
    assert gemv.supports(torch.randn(1, 16), w.t().contiguous().t(), None) is not None  # column-major
    assert gemv.supports(torch.randn(1, 16, dtype=torch.float16), w, None) == "dtypes"


def test_op_on_cpu_is_linear():
    x, w, b = torch.randn(1, 1, 24), torch.randn(10, 24), torch.randn(10)
    assert torch.equal(torch.ops.fxopt.gemv(x, w, b), F.linear(x, w, b))
