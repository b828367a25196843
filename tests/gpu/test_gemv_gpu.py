"""fxopt::gemv on CUDA at llama-1b-like decode sizes against float64 (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxopt.numerics import within_tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, k, bias", [(3072, 2048, False), (2048, 5632, True), (32000, 2048, False),
                                        (50304, 1024, True), (1000, 1000, False)])
def test_gemv_at_decode_sizes(dtype, n, k, bias):
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, 1, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None
    out = torch.ops.fxopt.gemv(x, w, b)
    eager = F.linear(x, w, b)
    reference = F.linear(x.double(), w.double(), None if b is None else b.double())
    ok, error, allowed = within_tolerance(out, eager, reference)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
