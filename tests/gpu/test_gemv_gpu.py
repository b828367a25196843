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
@pytest.mark.parametrize("q_heads, kv_heads, d, k, rope, bias, qk_norm", [
    (32, 8, 64, 2048, True, False, False),  # llama-1b-like
    (32, 8, 128, 4096, True, False, False),  # 8B-like
    (16, 16, 64, 1024, False, True, False),  # gpt2-medium
    (16, 8, 128, 1024, True, False, True),  # Qwen3-0.6B: per-head q/k norms
    (32, 8, 128, 4096, True, False, True)])  # Qwen3-8B-like
def test_gemv_qkv_at_model_sizes(dtype, q_heads, kv_heads, d, k, rope, bias, qk_norm):
    """fxopt::gemv_qkv (RMSNorm, q/k/v GEMV, head split, per-head q/k norm, RoPE, cache writes at a slot) against
    the eager chain in float64: q and the written cache rows within tolerance, every other cache row untouched."""
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
    qn, kn = ((1 + 0.3 * torch.randn(d, device="cuda", generator=gen)).to(dtype) for _ in range(2)) if qk_norm \
        else (None, None)
    got = [c.clone() for c in caches]
    q = torch.ops.fxopt.gemv_qkv(x, w, b, g, 1e-5, cos, sin, *got, pos, q_norm_weight=qn, k_norm_weight=kn,
                                 qk_eps=1e-6)
    eager = [c.clone() for c in caches]
    ep = gemv.Folded(norm_weight=g, eps=1e-5, q_norm_weight=qn, k_norm_weight=kn, qk_eps=1e-6)
    q_eager = gemv.gemv_qkv_reference(x, w, b, ep, cos, sin, *eager, pos)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    exact = [c.double() for c in caches]
    ep64 = gemv.Folded(norm_weight=g.double(), eps=1e-5, q_norm_weight=as64(qn), k_norm_weight=as64(kn), qk_eps=1e-6)
    q_exact = gemv.gemv_qkv_reference(x.double(), w.double(), as64(b), ep64, as64(cos), as64(sin), *exact, pos)
    for ours, theirs, ref in [(q, q_eager, q_exact)] + [(a[:, :, slot], e[:, :, slot], r[:, :, slot])
                                                       for a, e, r in zip(got, eager, exact)]:
        ok, error, allowed = within_tolerance(ours, theirs, ref)
        assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
    keep = torch.arange(max_len, device="cuda") != slot
    assert all(torch.equal(a[:, :, keep], c[:, :, keep]) for a, c in zip(got, caches))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, d, r, k, interleaved, adjacent", [
    (16, 64, 16, 1024, True, False),  # Pythia-410M (GPT-NeoX): [q_h; k_h; v_h] rows, rotary_pct 0.25
    (16, 128, 32, 2048, True, False),  # Pythia-1.4B
    (32, 80, 32, 2560, False, False),  # Phi-2-sized: partial rotary 0.4, d = 80
    (32, 80, 20, 2560, False, False),  # StableLM-3B-sized: 0.25 of 80
    (16, 256, 64, 4096, False, True),  # GPT-J-6B: adjacent pairs over 64 of 256 columns
    ((128, 8), 64, 64, 8192, True, False)])  # Falcon-40B: rows grouped per KV head as [16 q; k; v]
def test_gemv_qkv_partial_rotary_at_model_sizes(dtype, heads, d, r, k, interleaved, adjacent):
    """fxopt::gemv_qkv with LayerNorm and bias, tables of r < d columns and (GPT-NeoX) interleaved rows, against
    the eager chain in float64: q and the written cache rows within tolerance, every other cache row untouched."""
    from fxopt.models.llama import rope_tables

    q_heads, kv_heads = heads if isinstance(heads, tuple) else (heads, heads)
    gen = torch.Generator(device="cuda").manual_seed(q_heads + d + r)
    n, slot, max_len = (q_heads + 2 * kv_heads) * d, 333, 512
    x = (torch.randn(1, 1, k, device="cuda", generator=gen) + 2).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b, g, nb = (torch.randn(n, device="cuda", generator=gen).to(dtype),
                (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).to(dtype),
                (0.1 * torch.randn(k, device="cuda", generator=gen)).to(dtype))
    cos, sin = (t[slot].reshape(1, 1, 1, r).to(device="cuda", dtype=dtype) for t in rope_tables(slot + 1, r, 1e4))
    caches = [torch.randn(1, kv_heads, max_len, d, device="cuda", generator=gen).to(dtype) for _ in range(2)]
    pos = torch.tensor([slot], device="cuda")
    got = [c.clone() for c in caches]
    q = torch.ops.fxopt.gemv_qkv(x, w, b, g, 1e-5, cos, sin, *got, pos, norm_bias=nb, layer_norm=True,
                                 interleaved=interleaved, adjacent=adjacent)
    ep = gemv.Folded(norm_weight=g, eps=1e-5, norm_bias=nb, layer_norm=True, heads_interleaved=interleaved,
                     rope_adjacent=adjacent)
    assert gemv.supports_qkv(x, w, b, ep, cos, sin, *got, pos) is None  # the kernel ran
    eager = [c.clone() for c in caches]
    q_eager = gemv.gemv_qkv_reference(x, w, b, ep, cos, sin, *eager, pos)
    exact = [c.double() for c in caches]
    ep64 = gemv.Folded(norm_weight=g.double(), eps=1e-5, norm_bias=nb.double(), layer_norm=True,
                       heads_interleaved=interleaved, rope_adjacent=adjacent)
    q_exact = gemv.gemv_qkv_reference(x.double(), w.double(), b.double(), ep64, cos.double(), sin.double(), *exact,
                                      pos)
    for ours, theirs, ref in [(q, q_eager, q_exact)] + [(a[:, :, slot], e[:, :, slot], r_[:, :, slot])
                                                       for a, e, r_ in zip(got, eager, exact)]:
        ok, error, allowed = within_tolerance(ours, theirs, ref)
        assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
    keep = torch.arange(max_len, device="cuda") != slot
    assert all(torch.equal(a[:, :, keep], c[:, :, keep]) for a, c in zip(got, caches))


def _as64(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, k, norm, norm_bias, act, residual", [
    (4096, 1024, True, True, "gelu_tanh", False),  # gpt2-medium's c_fc: LayerNorm, bias, GELU
    (1024, 4096, False, False, "none", True),  # its MLP c_proj: bias + residual
    (3072, 768, True, True, "gelu_tanh", False),  # gpt2's c_fc: K = 768 is not a multiple of the 1024-wide chunk
    (1024, 4096, True, True, "gelu", True),  # LayerNorm + erf GELU + residual over K = 4096
    (50304, 1024, True, True, "none", False),  # the lm_head after ln_f
    (4096, 1024, True, False, "gelu_tanh", True)])  # LayerNorm without bias, GELU, then + residual
def test_layer_norm_gelu_residual_at_gpt2_sizes(dtype, n, k, norm, norm_bias, act, residual):
    """fxopt::gemv with GPT-2's folds (LayerNorm prologue, bias, GELU, residual) against float64: rows with a
    mean far from 0, so LayerNorm's mean and variance matter."""
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = (torch.randn(1, 1, k, device="cuda", generator=gen) * 3 + 2).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype)
    g = (1 + 0.2 * torch.randn(k, device="cuda", generator=gen)).to(dtype) if norm else None
    nb = (0.5 * torch.randn(k, device="cuda", generator=gen)).to(dtype) if norm_bias else None
    res = torch.randn(1, 1, n, device="cuda", generator=gen).to(dtype) if residual else None
    ep = gemv.Folded(residual=res, norm_weight=g, eps=1e-5, norm_bias=nb, layer_norm=norm, act=act)
    assert gemv.supports(x, w, b, ep) is None
    out = torch.ops.fxopt.gemv(x, w, b, res, g, 1e-5, False, nb, norm, act)
    eager = gemv.gemv_reference(x, w, b, ep)
    reference = gemv.gemv_reference(x.double(), w.double(), b.double(),
                                    gemv.Folded(residual=_as64(res), norm_weight=_as64(g), eps=1e-5,
                                                norm_bias=_as64(nb), layer_norm=norm, act=act))
    ok, error, allowed = within_tolerance(out, eager, reference)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", [(1024, 4096), (2560, 10240)])  # Pythia-410M's and Phi-2's fc2
def test_two_residual_adds_at_model_sizes(dtype, n, k):
    """A parallel-residual block's fc2 with mlp + attn + x folded (gemv_residual2) against float64."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(1, 1, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b, attn, hidden = (torch.randn(n, device="cuda", generator=gen).to(dtype) for _ in range(3))
    out = torch.ops.fxopt.gemv(x, w, b, attn, None, 0.0, False, None, False, "none", hidden)
    eager = torch.nn.functional.linear(x, w, b) + attn + hidden
    reference = torch.nn.functional.linear(x.double(), w.double(), b.double()) + attn.double() + hidden.double()
    ok, error, allowed = within_tolerance(out, eager, reference)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, d, k", [(16, 64, 1024), (12, 64, 768), (25, 64, 1600)])  # gpt2-medium, gpt2, -xl
def test_gemv_qkv_with_layer_norm_at_gpt2_sizes(dtype, heads, d, k):
    """fxopt::gemv_qkv as GPT-2's decode step runs it: LayerNorm prologue, c_attn's bias, head split and both
    cache writes at a slot, no RoPE; q and the written rows within tolerance of float64, the rest untouched."""
    gen = torch.Generator(device="cuda").manual_seed(heads + k)
    n, slot, max_len = 3 * heads * d, 333, 1024
    x = (torch.randn(1, 1, k, device="cuda", generator=gen) * 3 + 2).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype)
    g = (1 + 0.2 * torch.randn(k, device="cuda", generator=gen)).to(dtype)
    nb = (0.5 * torch.randn(k, device="cuda", generator=gen)).to(dtype)
    caches = [torch.randn(1, heads, max_len, d, device="cuda", generator=gen).to(dtype) for _ in range(2)]
    pos = torch.tensor([slot], device="cuda")
    got = [c.clone() for c in caches]
    q = torch.ops.fxopt.gemv_qkv(x, w, b, g, 1e-5, None, None, *got, pos, norm_bias=nb, layer_norm=True)
    eager = [c.clone() for c in caches]
    ep = gemv.Folded(norm_weight=g, eps=1e-5, norm_bias=nb, layer_norm=True)
    q_eager = gemv.gemv_qkv_reference(x, w, b, ep, None, None, *eager, pos)
    exact = [c.double() for c in caches]
    ep64 = gemv.Folded(norm_weight=g.double(), eps=1e-5, norm_bias=nb.double(), layer_norm=True)
    q_exact = gemv.gemv_qkv_reference(x.double(), w.double(), b.double(), ep64, None, None, *exact, pos)
    for ours, theirs, ref in [(q, q_eager, q_exact)] + [(a[:, :, slot], e[:, :, slot], r[:, :, slot])
                                                       for a, e, r in zip(got, eager, exact)]:
        ok, error, allowed = within_tolerance(ours, theirs, ref)
        assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
    keep = torch.arange(max_len, device="cuda") != slot
    assert all(torch.equal(a[:, :, keep], c[:, :, keep]) for a, c in zip(got, caches))


@torch.no_grad()
def test_hf_gpt2_decode_with_folds_matches_recompute():
    """HF GPT-2 (Conv1D, spelled-out GELU) at a few layers: the CUDA-graphed batch-1 decode step with every fold
    gives full recompute's greedy tokens in fp32, and its program is 4 GEMVs a layer plus the lm_head."""
    pytest.importorskip("transformers")
    from fxopt.generate import build_generator
    from fxopt.zoo import load_model

    model = load_model("hf:gpt2,n_layer=4,n_embd=256,n_head=4,vocab_size=1024", device="cuda").eval()
    rng = torch.Generator(device="cuda").manual_seed(1)
    for name, p in model.named_parameters():  # decisive logits: the default init's are near-uniform
        spread = 1.5 / min(p.shape) ** 0.5 if p.dim() == 2 else 0.3
        centre = 1.0 if p.dim() == 1 and "bias" not in name else 0.0  # LayerNorm weights around 1
        p.copy_(torch.randn(p.shape, device="cuda", generator=rng) * spread + centre)
    ids = torch.randint(0, 1024, (1, 9), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    gen = build_generator(model, {"input_ids": ids}, max_seq_len=64, max_batch=1)
    out = gen.generate(ids, 16)
    ref = ids
    for _ in range(16):
        ref = torch.cat([ref, model(ref, use_cache=False).logits[:, -1].argmax(-1)[:, None]], dim=1)
    assert torch.equal(out, ref)
    targets = [n.target for n in gen.decode_program(1).graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxopt.gemv_qkv.default) == 4 and targets.count(torch.ops.fxopt.gemv.default) == 13
    left = [n for n in gen.notes if "layer_norm" in n or "LayerNorm" in n or "gelu" in n.lower()]  # folds refused
    assert targets.count(torch.ops.aten.layer_norm.default) == targets.count(torch.ops.aten.tanh.default) == 0, left
