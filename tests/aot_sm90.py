"""Compile Triton kernels for sm_90 ahead of time, without a GPU, in a subprocess.

The CPU tests run kernels in Triton's interpreter, which never lowers them; these tests compile the real
thing to PTX. Triton decides interpreter-or-not when it is imported, hence the subprocess without
TRITON_INTERPRET. A test's script starts with PRELUDE and calls compile_sm90(jit, signature, constexprs,
**options); run_script runs it and returns its stdout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRELUDE = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(jit, signature, constexprs, **options):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    try:
        src = ASTSource(jit, signature, constexprs=constexprs)
    except TypeError:
        print("SKIP: ASTSource takes another signature format")
        sys.exit(0)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
'''


def run_script(tmp_path, name: str, body: str) -> str:
    """Run PRELUDE + body as a fresh Python process; skip if this Triton cannot, fail on any error."""
    pytest.importorskip("triton.backends.nvidia")
    script = tmp_path / f"{name}.py"
    script.write_text(PRELUDE + body)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    if "SKIP:" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
