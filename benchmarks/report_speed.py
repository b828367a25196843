"""How long the report renderers take on a large model's graph: the table, DOT and HTML of a real analysis.

    python benchmarks/report_speed.py [MODEL] [--seq 4096] [--rounds 3]

The default is llama-70b-like on the meta device (no weights; 80 layers, ~3.9k report nodes). Timings are the
best of `rounds`; the analysis itself (capture and passes) is timed once and reported apart, since it is not the
renderers' work.
"""

from __future__ import annotations

import argparse
import time

import torch

from fxopt import analyze, zoo
from fxopt import report as render


def best_of(rounds: int, fn) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="llama-70b-like")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    model = zoo.load_model(args.model, device="meta", dtype=torch.float16)
    data = analyze(model, name=args.model, batch=1, seq=args.seq).report
    analysis_s = time.perf_counter() - start
    rows = [("table", best_of(args.rounds, lambda: render.format_table(data, all_nodes=True))),
            ("dot", best_of(args.rounds, lambda: render.to_dot(data))),
            ("html", best_of(args.rounds, lambda: render.to_html(data)))]
    print(f"{args.model}: {len(data['nodes'])} nodes, analysis {analysis_s:.1f} s (once)")
    for name, seconds in rows:
        print(f"{name:>6}: {seconds:.3f} s (best of {args.rounds})")


if __name__ == "__main__":
    main()
