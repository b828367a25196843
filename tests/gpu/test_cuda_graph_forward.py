"""optimize()'s forward through CUDA graphs (fxopt/cuda_graphs.py): same outputs as the uncaptured program,
outputs the caller keeps survive later calls, one graph per input shape up to the bound, then uncaptured; a shape
measured faster uncaptured keeps no graph.

Skipped without a GPU (tests/gpu/conftest.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

import fxopt
from fxopt import models

DEVICE = "cuda"


@pytest.fixture(scope="module")
def optimized():
    if not torch.cuda.is_available():  # module fixtures run before conftest's per-test skip
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    model = models.build("gpt2-tiny", device=DEVICE, dtype=torch.float32).eval()
    return model, fxopt.optimize(model, model.example_inputs(2, 32, device=DEVICE))


def _ids(batch, seq, seed):
    return torch.randint(0, 256, (batch, seq), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed))


def test_graphs_are_on_by_default_and_replay_the_same_program(optimized):
    model, fast = optimized
    assert fast.graphs is not None
    with torch.no_grad():
        for seed in range(3):
            ids = _ids(2, 32, seed)
            torch.testing.assert_close(fast(input_ids=ids), fast.gm(input_ids=ids), rtol=0, atol=0)
            torch.testing.assert_close(fast(input_ids=ids), model(input_ids=ids), rtol=1e-4, atol=1e-4)
    assert fast.graphs.buckets and all(b.graph is not None for b in fast.graphs.buckets.values())  # host-bound


def test_a_kept_output_is_not_overwritten_by_the_next_call(optimized):
    _, fast = optimized
    with torch.no_grad():
        first_ids, second_ids = _ids(2, 32, 10), _ids(2, 32, 11)
        first = fast(input_ids=first_ids)
        kept = first.clone()
        fast(input_ids=second_ids)  # same bucket: the graph's static output buffer is rewritten
        assert torch.equal(first, kept)


def test_new_shapes_get_graphs_up_to_the_bound_then_run_uncaptured():
    torch.manual_seed(0)
    model = models.build("gpt2-tiny", device=DEVICE, dtype=torch.float32).eval()
    fast = fxopt.optimize(model, model.example_inputs(2, 32, device=DEVICE))
    fast.graphs.max_graphs = 2
    with torch.no_grad():
        for seq in (16, 24):
            fast(input_ids=_ids(2, seq, seq))
        assert len(fast.graphs.buckets) == 2
        with pytest.warns(UserWarning, match="2 input shapes already have CUDA graphs"):
            out = fast(input_ids=_ids(2, 40, 1))
        torch.testing.assert_close(out, model(input_ids=_ids(2, 40, 1)), rtol=1e-4, atol=1e-4)
        assert len(fast.graphs.buckets) == 2 and fast.graphs.uncaptured_calls >= 1


def test_autograd_calls_run_uncaptured_with_one_warning(optimized):
    model, fast = optimized
    ids = _ids(2, 32, 5)
    with pytest.warns(UserWarning, match="autograd on"):
        out = fast(input_ids=ids)
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), model(input_ids=ids), rtol=1e-4, atol=1e-4)


def test_graphs_off_on_request():
    model = models.build("gpt2-tiny", device=DEVICE, dtype=torch.float32).eval()
    fast = fxopt.optimize(model, model.example_inputs(2, 32, device=DEVICE), cuda_graphs=False)
    assert fast.graphs is None


def test_a_shape_faster_uncaptured_keeps_no_graph():
    """One kernel writing 256 MB runs faster launched than replayed and copied out (the copy doubles its
    traffic): no graph. Two hundred tiny kernels are host-bound: their graph stays."""
    from fxopt.cuda_graphs import GraphedForward

    one_write = GraphedForward(lambda x: x * 2.0)
    many_launches = GraphedForward(lambda x: functools.reduce(lambda y, _: y + 1.0, range(200), x))
    big = torch.randn(8192, 8192, device=DEVICE)
    small = torch.arange(8, device=DEVICE, dtype=torch.float32)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(one_write(big), big * 2.0)
            assert torch.equal(many_launches(small), small + 200.0)
    assert [b.graph is None for b in one_write.buckets.values()] == [True]
    assert [b.graph is None for b in many_launches.buckets.values()] == [False]
