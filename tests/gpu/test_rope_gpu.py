"""fxopt::rope / rope_cache_write compiled on CUDA at model sizes, and inside a CUDA-graph decode step.

Skipped without a GPU (tests/gpu/conftest.py). The interpreter-sized checks are tests/codegen/test_rope.py,
which also run here on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from fxopt import models
from fxopt.codegen import rope as R
from fxopt.generate import build_generator
from fxopt.numerics import within_tolerance

DEVICE = "cuda"


@pytest.mark.parametrize("adjacent", [False, True])  # True: GPT-J's rotate_every_two pairs
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d, r", [(64, 64), (80, 80), (128, 128), (64, 16), (80, 32), (128, 32)])  # r < d: partial
def test_prefill_sized_rope(dtype, d, r, adjacent):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    b, s, h = 2, 1023, 32
    x = torch.randn(b, s, h, d, device=DEVICE, generator=gen).to(dtype).transpose(1, 2)  # (b, h, s, d) view
    cos = torch.randn(b, 1, s, r, device=DEVICE, generator=gen).to(dtype)
    sin = torch.randn(b, 1, s, r, device=DEVICE, generator=gen).to(dtype)
    out = R.rope(x, cos, sin, adjacent)
    if r < d:
        assert torch.equal(out[..., r:], x[..., r:])  # the columns past the tables pass through
    eager = R.rope_reference(x, cos, sin, adjacent)
    exact = R.rope_reference(x.double(), cos.double(), sin.double(), adjacent)
    ok, error, allowed = within_tolerance(out, eager, exact)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
    assert out.stride() == torch.empty_like(x).stride() and out.dtype == eager.dtype  # x's dim order, dense


def test_rope_cache_write_at_device_slots():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    b, h, n, d, L = 4, 8, 1, 128, 4096
    cache = torch.randn(b, h, L, d, device=DEVICE, generator=gen).bfloat16()
    expected = cache.clone()
    x = torch.randn(b, n, h, d, device=DEVICE, generator=gen).bfloat16().transpose(1, 2)
    cos, sin = (torch.randn(b, 1, n, d, device=DEVICE, generator=gen).bfloat16() for _ in range(2))
    slots = torch.tensor([3000], device=DEVICE)
    R.rope_cache_write(cache, x, cos, sin, slots)
    expected.index_copy_(2, slots, R.rope_reference(x, cos, sin))
    rest = torch.ones(L, dtype=torch.bool, device=DEVICE)
    rest[3000] = False
    assert torch.equal(cache[:, :, rest], expected[:, :, rest])
    torch.testing.assert_close(cache[:, :, 3000], expected[:, :, 3000], rtol=2e-2, atol=2e-2)


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_graph_decode_uses_rope_kernels(batch):
    """Greedy tokens of the graphed decode equal full recompute's; at batch 2 RoPE runs as fxopt::rope and
    fxopt::rope_cache_write, at batch 1 inside the q/k/v GEMV (fxopt::gemv_qkv)."""
    torch.manual_seed(0)
    model = models.build("llama-tiny").to(DEVICE).eval()
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=64, max_batch=2)
    ids = model.example_inputs(batch, 8, seed=2)["input_ids"]
    out = gen.generate(ids, 24)
    ref = ids
    for _ in range(24):
        ref = torch.cat([ref, model(ref)[:, -1].argmax(-1)[:, None]], dim=1)
    assert torch.equal(out, ref)
    program = gen.decode_program(batch)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    layers = model.config.n_layers
    expected = {1: (0, 0, layers), 2: (layers, layers, 0)}[batch]
    assert (targets.count(torch.ops.fxopt.rope_cache_write.default), targets.count(torch.ops.fxopt.rope.default),
            targets.count(torch.ops.fxopt.gemv_qkv.default)) == expected
