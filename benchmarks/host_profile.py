"""Where the host's time goes in a forward launched kernel by kernel (no CUDA graphs): cProfile of fxopt's
and torch.compile's forward, top functions by own time. One table per peer.

    python benchmarks/host_profile.py [MODEL] [--batch 1] [--seq 128] [--calls 20]

A small shape keeps the GPU idle, so each call's wall time is host time: per launch it is what the
`--profile` timeline of `fxopt bench` reports as host µs per launch.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import fxopt
from fxopt import zoo


def profile_calls(fn, calls: int) -> tuple[float, str]:
    """(ms per call, cProfile's top-25 table by own time) over `calls` synchronised calls of fn."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    ms = (time.perf_counter() - start) * 1e3 / calls
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    return ms, out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="gpt2-medium")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    model = zoo.load_model(args.model, device="cuda", dtype=torch.bfloat16)
    inputs = zoo.example_inputs(model, args.batch, args.seq, device="cuda")
    with torch.no_grad():
        optimized = fxopt.optimize(model, inputs, cuda_graphs=False)
        compiled = torch.compile(model)
        for name, fn in (("fxopt (no CUDA graphs)", lambda: optimized(**inputs)),
                         ("torch.compile", lambda: compiled(**inputs))):
            ms, table = profile_calls(fn, args.calls)
            print(f"== {name}: {ms:.2f} ms per call under cProfile\n{table}")


if __name__ == "__main__":
    main()
