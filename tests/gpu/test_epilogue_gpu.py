"""fxopt::linear_gelu_tanh on CUDA (the cuBLASLt bias + GELU epilogue) against the tanh-GELU formula in float64,
and gpt2-medium's MLP shapes folded by the matmul pass. Skipped without a GPU (tests/gpu/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch

import fxopt
from fxopt import models


def gelu_tanh_float64(x, weight, bias):
    y = x.double() @ weight.double().t() + bias.double()
    return 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-4)])
@pytest.mark.parametrize("rows, k, n", [(8192, 1024, 4096), (7, 64, 200)])
def test_epilogue_matches_the_formula(dtype, tol, rows, k, n):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    got = torch.ops.fxopt.linear_gelu_tanh(x.view(1, rows, k), weight, bias)
    want = gelu_tanh_float64(x, weight, bias).view(1, rows, n)
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


def test_non_contiguous_and_broadcast_inputs():
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(64, 96, device="cuda", generator=g).t().to(torch.bfloat16)  # (96, 64), transposed
    weight = torch.randn(64, 128, device="cuda", generator=g).t().to(torch.bfloat16)  # (128, 64), transposed
    bias = torch.randn(1, device="cuda", generator=g).to(torch.bfloat16).expand(128)  # stride 0
    got = torch.ops.fxopt.linear_gelu_tanh(x, weight, bias)
    want = gelu_tanh_float64(x, weight, bias)
    assert (got.double() - want).abs().max().item() <= 2e-2 * max(1.0, want.abs().max().item())


def test_gpt2_mlp_is_folded_and_matches_eager():
    torch.manual_seed(0)
    model = models.build("gpt2-tiny", device="cuda", dtype=torch.float32).eval()
    inputs = model.example_inputs(2, 64, device="cuda")
    fast = fxopt.optimize(model, inputs, epilogues=True)
    assert fast.program.results["epilogues"].counts["gelu_tanh_epilogue"] == model.config.n_layers
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs), model(**inputs), rtol=1e-4, atol=1e-4)
