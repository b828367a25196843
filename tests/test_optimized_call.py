"""OptimizedModule's call path (fxopt/optimize.py): positional arguments bind by the model's parameter names,
and torch.export's input checks run once per input signature, not at every call."""

import pytest
import torch
from torch import nn

import fxopt


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, residual, scale: float = 1.0):
        return torch.relu(self.proj(x) + residual) * scale


@pytest.fixture
def optimized():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    example = {"x": torch.randn(2, 5, 8), "residual": torch.randn(2, 5, 8)}
    return model, fxopt.optimize(model, example, dynamic_dims={"x": {0: "batch", 1: "seq"},
                                                               "residual": {0: "batch", 1: "seq"}})


def _count_export_checks(monkeypatch, gm) -> list:
    """Wrap the graph module's forward pre-hooks (export's input checks): count the calls that run them."""
    calls = []
    for key, hook in list(gm._forward_pre_hooks.items()):
        def counted(*args, _hook=hook, **kwargs):
            calls.append(1)
            return _hook(*args, **kwargs)
        monkeypatch.setitem(gm._forward_pre_hooks, key, counted)
    return calls


def test_positional_and_keyword_calls_agree_with_eager(optimized):
    model, fast = optimized
    x, r = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    with torch.no_grad():
        expected = model(x, r)
        torch.testing.assert_close(fast(x, r), expected)
        torch.testing.assert_close(fast(x, residual=r), expected)
        torch.testing.assert_close(fast(residual=r, x=x), expected)
    with pytest.raises(TypeError):
        fast(x, r, 1.0, 2.0)  # one positional too many: the model's own binding error
    with pytest.raises(TypeError):
        fast(x, x=x)  # x given twice


def test_export_checks_run_once_per_input_signature(monkeypatch, optimized):
    model, fast = optimized
    checks = _count_export_checks(monkeypatch, fast.gm)
    assert checks == [] and fast.gm._forward_pre_hooks  # export registered its checks as pre-hooks
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(fast(a, b), model(a, b))
        n_first = len(checks)
        assert n_first > 0
        c = torch.randn(4, 6, 8)  # a new shape: checked again
        torch.testing.assert_close(fast(c, c), model(c, c))
        assert len(checks) > n_first
        fast(c, c)
        assert len(checks) == 2 * n_first
        with pytest.raises(Exception):  # a dtype export's checks refuse is refused on every call, not cached
            fast(c.double(), c.double())
        with pytest.raises(Exception):
            fast(c.double(), c.double())
