"""The SwiGLU GEMM (codegen/swiglu_gemm.py) against what the forward runs without it: cuBLAS's GEMM over
[W_gate; W_up], then fxopt's fused silu(gate) * up kernel. One table, on the GPU.

    python benchmarks/swiglu_gemm.py [--autotune]

Shapes: the MLP up-projections of llama-1b-like / Llama-3.2-1B (K 2048, F 8192) and Mistral-7B (K 4096,
F 14336) at batch 8 x seq 1024 and 1 x 128 tokens, bf16; triton.testing.do_bench_cudagraph medians, the
variants timed alternately in three rounds. `--autotune` times the Triton GEMM's configs first
(FXOPT_SWIGLU_AUTOTUNE=1); by default the first config runs, as `fxopt.optimize` gives a user.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing

import fxopt
from fxopt import config
from fxopt.codegen import swiglu_gemm


class GateUp(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        gate, up = F.linear(x, self.weight).chunk(2, dim=-1)
        return F.silu(gate) * up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autotune", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: silu(x W_gateᵀ) * (x W_upᵀ), bf16, median ms (CUDA graphs)")
    print("| tokens x K -> F | cuBLAS GEMM + fused product | Triton SwiGLU GEMM | ratio | TFLOP/s (GEMM+fused) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with torch.no_grad(), config.override(swiglu_autotune=args.autotune):
        for rows, k, f in ((8192, 2048, 8192), (128, 2048, 8192), (8192, 4096, 14336), (128, 4096, 14336)):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(2 * f, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            with config.override(swiglu_gemm=False):
                unfolded = fxopt.optimize(GateUp(w), (x,), cuda_graphs=False)  # GEMM + generated fused kernel
            two = lambda: unfolded(x)  # noqa: E731
            one = lambda: swiglu_gemm.linear_swiglu_kernel(x, w)  # noqa: E731
            error = (one().float() - two().float()).abs().max().item()
            times = {"two": [], "one": []}
            for _ in range(3):
                times["two"].append(triton.testing.do_bench_cudagraph(two))
                times["one"].append(triton.testing.do_bench_cudagraph(one))
            t2, t1 = (sorted(v)[1] for v in (times["two"], times["one"]))
            tflops = 4 * rows * k * f / (t2 * 1e-3) / 1e12
            print(f"| {rows} x {k} -> {f} | {t2:.4f} | {t1:.4f} | {t2 / t1:.2f}x | {tflops:.0f} |"
                  f"  (max difference {error:.3g})")


if __name__ == "__main__":
    main()
