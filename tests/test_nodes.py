"""fxopt/nodes.py's facts about fx nodes, on hand-built graphs whose meta values the test sets."""

import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fxopt.nodes import INT_MAX, is_full_slice

aten = torch.ops.aten


def _slice(x_val, out_val, *args):
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = x_val
    node = g.call_function(aten.slice.Tensor, (x, *args))
    node.meta["val"] = out_val
    return node


@pytest.mark.parametrize("args, full", [
    ((1, 0, INT_MAX), True),
    ((1, None, None), True),
    ((1, 0, 5), True),  # the dim's own size
    ((1, 0, 9), True),  # past it
    ((1, 0, 3), False),
    ((1, 1, INT_MAX), False),
    ((1, 0, INT_MAX, 2), False),
    ((1,), True),
])
def test_full_slice_by_its_arguments(args, full):
    x = torch.empty(2, 5)
    out = x[:, slice(*args[1:3])] if len(args) > 1 else x
    assert is_full_slice(_slice(x, out, *args)) == full


def test_full_slice_when_the_fake_output_size_does_not_simplify():
    """Sliced to INT_MAX: whatever the output's size expression (Min(INT_MAX, s) on some torch releases), the
    arguments say the slice keeps the dim; so does an end that is the dim's own size."""
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x = mode.from_tensor(torch.empty(2, 7), symbolic_context=None)
    other = torch.empty(2, 3)  # an output value that does not look like x
    assert is_full_slice(_slice(x, other, 1, 0, INT_MAX))
    assert is_full_slice(_slice(x, other, 1, 0, x.shape[1]))
    assert not is_full_slice(_slice(x, other, 1, 0, 3))
