"""Host time per launch: fxopt's generated kernels and ops against torch.compile's Triton kernel and eager.

    python benchmarks/launch_cost.py [--calls 2000] [--profile]

Each peer runs the same small op many times without synchronising: the tensors are tiny, so the GPU finishes
each kernel before the host has launched the next one and the time per call is the host's cost of one call.
Peers: add + RMSNorm (one fused kernel for fxopt and for torch.compile, four ATen kernels eager) and causal
attention (fxopt's op, its kernel function, SDPA). `--profile` adds cProfile's top functions by own time for
fxopt's calls.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

import fxopt
from fxopt.codegen import (
    attention_op,  # noqa: F401 - registers torch.ops.fxopt.attention
    flash_attention,
)
from fxopt.passes.fusion import FusedRegionModule


class AddRMSNorm(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))

    def forward(self, x, residual):
        h = x + residual
        return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype) * self.weight


def host_us(fn, calls: int) -> float:
    """Microseconds per call over `calls` back-to-back calls (one synchronisation at the end)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / calls


def top_functions(fn, calls: int, rows: int = 14) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def peers(dtype=torch.bfloat16) -> dict:
    x = torch.randn(4, 256, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    norm = AddRMSNorm(256).to("cuda", dtype)
    optimized = fxopt.optimize(norm, (x, r), cuda_graphs=False)
    region = next(m for m in optimized.gm.modules() if isinstance(m, FusedRegionModule))
    compiled = torch.compile(norm)
    q, k, v = (torch.randn(1, 4, 16, 64, device="cuda", dtype=dtype) for _ in range(3))
    scale = 64 ** -0.5
    return {
        "add+rmsnorm eager": lambda: norm(x, r),
        "add+rmsnorm torch.compile": lambda: compiled(x, r),
        "add+rmsnorm fxopt module": lambda: optimized(x, r),
        "add+rmsnorm fxopt kernel": lambda: region(x, r, norm.weight),
        "attention SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "attention fxopt op": lambda: torch.ops.fxopt.attention(q, k, v, None, None, True, scale),
        "attention fxopt kernel": lambda: flash_attention.flash_attention(q, k, v, causal=True, scale=scale),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with torch.no_grad():
        table = peers()
        times = {name: host_us(fn, args.calls) for name, fn in table.items()}
        times = {name: min(t, host_us(table[name], args.calls)) for name, t in times.items()}  # 2nd round
        if args.profile:
            for name in ("add+rmsnorm fxopt kernel", "attention fxopt op"):
                print(f"== {name}\n{top_functions(table[name], 500)}")
    print(f"{'peer':32} {'host us/call':>12}")
    for name, us in times.items():
        print(f"{name:32} {us:12.1f}")


if __name__ == "__main__":
    main()
