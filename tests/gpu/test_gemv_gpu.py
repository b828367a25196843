"""fxopt::gemv on CUDA at llama-1b-like decode sizes against float64 (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxopt.codegen import gemv  # registers fxopt::gemv
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_out, k, norm, glu, residual", [(3072, 2048, True, False, False),
                                                          (2048, 2048, False, False, True),
                                                          (5632, 2048, True, True, False),
                                                          (2048, 5632, False, False, True),
                                                          (32000, 2048, True, False, False)])
def test_folded_norm_swiglu_residual_at_llama_sizes(dtype, n_out, k, norm, glu, residual):
    gen = torch.Generator(device="cuda").manual_seed(n_out + k)
    x = torch.randn(1, 1, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(2 * n_out if glu else n_out, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    res = torch.randn(1, 1, n_out, device="cuda", generator=gen).to(dtype) if residual else None
    g = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).to(dtype) if norm else None
    out = torch.ops.fxopt.gemv(x, w, None, res, g, 1e-5, glu)
    ep = gemv.Folded(residual=res, norm_weight=g, eps=1e-5, glu=glu)
    eager = gemv.gemv_reference(x, w, None, ep)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    reference = gemv.gemv_reference(x.double(), w.double(), None,
                                    gemv.Folded(residual=as64(res), norm_weight=as64(g), eps=1e-5, glu=glu))
    ok, error, allowed = within_tolerance(out, eager, reference)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_heads, kv_heads, d, k, rope, bias", [(32, 8, 64, 2048, True, False),  # llama-1b-like
                                                                (32, 8, 128, 4096, True, False),  # 8B-like
                                                                (16, 16, 64, 1024, False, True)])  # gpt2-medium
def test_gemv_qkv_at_model_sizes(dtype, q_heads, kv_heads, d, k, rope, bias):
    """fxopt::gemv_qkv (RMSNorm, q/k/v GEMV, head split, RoPE, cache writes at a slot) against the eager chain
    in float64: q and the written cache rows within tolerance, every other cache row untouched."""
    from fxopt.models.llama import rope_tables

    gen = torch.Generator(device="cuda").manual_seed(q_heads + d + k)
    n, slot, max_len = (q_heads + 2 * kv_heads) * d, 777, 1024
    x = torch.randn(1, 1, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None
    g = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).to(dtype)
    cos, sin = ((t[slot].reshape(1, 1, 1, d).to(device="cuda", dtype=dtype) for t in rope_tables(slot + 1, d, 1e4))
                if rope else (None, None))
    caches = [torch.randn(1, kv_heads, max_len, d, device="cuda", generator=gen).to(dtype) for _ in range(2)]
    pos = torch.tensor([slot], device="cuda")
    got = [c.clone() for c in caches]
    q = torch.ops.fxopt.gemv_qkv(x, w, b, g, 1e-5, cos, sin, *got, pos)
    eager = [c.clone() for c in caches]
    q_eager = gemv.gemv_qkv_reference(x, w, b, gemv.Folded(norm_weight=g, eps=1e-5), cos, sin, *eager, pos)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    exact = [c.double() for c in caches]
    q_exact = gemv.gemv_qkv_reference(x.double(), w.double(), as64(b), gemv.Folded(norm_weight=g.double(), eps=1e-5),
                                      as64(cos), as64(sin), *exact, pos)
    for ours, theirs, ref in [(q, q_eager, q_exact)] + [(a[:, :, slot], e[:, :, slot], r[:, :, slot])
                                                       for a, e, r in zip(got, eager, exact)]:
        ok, error, allowed = within_tolerance(ours, theirs, ref)
        assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
    keep = torch.arange(max_len, device="cuda") != slot
    assert all(torch.equal(a[:, :, keep], c[:, :, keep]) for a, c in zip(got, caches))
