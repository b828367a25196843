"""fxopt::linear_swiglu on CUDA (the Triton GEMM with silu(gate) * up in its epilogue) at Llama and Mistral MLP
sizes against float64, and a Llama model folded by the matmul pass (FXOPT_SWIGLU_GEMM=1) against eager.
Skipped without a GPU (tests/gpu/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import config, models
from fxopt.codegen import swiglu_gemm
from fxopt.numerics import float64_copy, within_tolerance


def swiglu_float64(x, weight):
    gate, up = (x.double() @ weight.double().t()).chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, k, f", [(8192, 2048, 8192), (128, 4096, 14336), (77, 200, 72)])
def test_kernel_matches_float64(dtype, rows, k, f):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(2 * f, k, device="cuda", generator=g) / k**0.5).to(dtype)
    got = swiglu_gemm.linear_swiglu_kernel(x, weight)
    ok, error, allowed = within_tolerance(got, swiglu_gemm.linear_swiglu_reference(x, weight),
                                          swiglu_float64(x, weight))
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


def test_llama_mlp_is_folded_and_matches_eager():
    torch.manual_seed(0)
    model = models.build("llama-tiny", device="cuda", dtype=torch.bfloat16).eval()
    inputs = model.example_inputs(2, 64, device="cuda")
    with config.override(swiglu_gemm=True):
        fast = fxopt.optimize(model, inputs)
    assert fast.program.results["epilogues"].counts["swiglu_epilogue"] == model.config.n_layers
    with torch.no_grad():
        out, eager = fast(**inputs), model(**inputs)
        reference = float64_copy(model)(**inputs)
    ok, error, allowed = within_tolerance(out, eager, reference)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
