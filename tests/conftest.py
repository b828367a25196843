"""Test-wide set-up: without a GPU, Triton kernels run through Triton's interpreter on CPU tensors."""

import os

import pytest
import torch

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # pytest-xdist's worker name ("gw0", ...), None in one process

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
dump = "fxopt-test-dump" + (f"-{WORKER}" if WORKER else "")  # a folder per worker: no two write one file
os.environ.setdefault("FXOPT_DUMP_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), dump))
if WORKER:
    torch.set_num_threads(1)  # the workers share the cores (pyproject runs one per core)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny graphs: one intra-op thread avoids oversubscription (CI boxes have 2 shared cores). Modules use it
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
