"""Test-wide set-up: without a GPU, Triton kernels run through Triton's interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FXOPT_DUMP_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "fxopt-test-dump"))
