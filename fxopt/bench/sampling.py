"""The decode step's token pick on its own: greedy_pick, sample_pick (temperature) and sample_top_k (top-k, with
and without top-p) from codegen/greedy.py, at one logits shape, each replayed from a CUDA graph of `calls`
back-to-back picks (as the decode graph runs it: no launch overhead in the figure), timed with
triton.testing.do_bench; microseconds per pick.

    python -m fxopt.bench.sampling                       # 1 x 128256 bf16 (Llama-3 vocabulary)
    python -m fxopt.bench.sampling --rows 8 --vocab 151936
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from fxopt.codegen import greedy


def _graphed(pick: Callable[[], None], calls: int) -> Callable[[], None]:
    pick()  # compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            pick()
    return graph.replay


def run(rows: int = 1, vocab: int = 128256, dtype: torch.dtype = torch.bfloat16, calls: int = 20) -> dict:
    import triton.testing

    logits = (4 * torch.randn(rows, vocab, device="cuda")).to(dtype)  # (rows, vocab)
    ids = torch.zeros(rows, 1, dtype=torch.long, device="cuda")
    history = torch.zeros(rows, 16, dtype=torch.long, device="cuda")
    slot, seed = torch.tensor(3, device="cuda"), torch.tensor(1, device="cuda")
    picks = {
        "greedy_pick": lambda: greedy.greedy_pick(logits, ids, history, slot),
        "sample_pick t=0.8": lambda: greedy.sample_pick(logits, ids, history, slot, seed, 1.25),
        "sample_top_k k=50 p=0.95": lambda: greedy.sample_top_k(logits, ids, history, slot, seed, top_k=50,
                                                                top_p=0.95, inv_temperature=1.25),
        "sample_top_k k=128": lambda: greedy.sample_top_k(logits, ids, history, slot, seed, top_k=128,
                                                          inv_temperature=1.25),
    }
    us = {name: 1e3 * triton.testing.do_bench(_graphed(pick, calls), warmup=50, rep=300) / calls
          for name, pick in picks.items()}
    print(f"token pick, {rows} x {vocab} {str(dtype).removeprefix('torch.')} logits, on {torch.cuda.get_device_name()}"
          f" ({time.strftime('%Y-%m-%d')}), {calls} picks per CUDA graph")
    for name, t in us.items():
        print(f"  {name:<26}{t:8.1f} us")
    return us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxopt.bench.sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--calls", type=int, default=20, help="picks per captured graph")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the sampling benchmark times CUDA kernels")
    run(args.rows, args.vocab, calls=args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
