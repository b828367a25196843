"""tests/gpu: tests that need a CUDA GPU. Skipped (not failed) on machines without one."""

import os

import pytest
import torch

# One kernel config per specialisation instead of an autotuning sweep per shape: keeps compile time
# of the full grid to minutes. Tests that exercise tuning turn it back on themselves.
os.environ.setdefault("FXOPT_ATTN_AUTOTUNE", "0")

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.path).startswith(_HERE):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _require_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
