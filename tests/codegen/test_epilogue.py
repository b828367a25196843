"""fxopt::linear_gelu_tanh on the CPU against the tanh-GELU formula in float64, and when the fold applies."""

from __future__ import annotations

import math

import pytest
import torch

from fxopt.codegen import epilogue


def gelu_tanh_float64(x, weight, bias):
    y = x.double() @ weight.double().t() + bias.double()
    return 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))


@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)])
def test_matches_the_formula(shape):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(*shape, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    out = torch.ops.fxopt.linear_gelu_tanh(x, weight, bias)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out.double(), gelu_tanh_float64(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_the_fold_needs_a_bias_and_one_dtype():
    x, weight, bias = torch.randn(3, 8), torch.randn(16, 8), torch.randn(16)
    assert epilogue.supports(x, weight, bias) is None
    assert "no bias" in epilogue.supports(x, weight, None)
    assert "mixed dtypes" in epilogue.supports(x.half(), weight, bias)
    assert "one value per output column" in epilogue.supports(x, weight, torch.randn(4, 16))


def test_non_contiguous_and_broadcast_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=g).t()  # (6, 24), transposed strides
    weight = torch.randn(24, 40, generator=g).t()  # (40, 24), transposed
    bias = torch.randn(1, generator=g).expand(40)  # stride 0
    out = torch.ops.fxopt.linear_gelu_tanh(x, weight, bias)
    torch.testing.assert_close(out.double(), gelu_tanh_float64(x, weight, bias), rtol=1e-5, atol=1e-5)
