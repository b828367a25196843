"""fxopt's one-row GEMV (codegen/gemv.py) against cuBLAS (F.linear) at llama-1b-like decode sizes. One table.

    python benchmarks/gemv_sizes.py

Each size is timed over as many distinct weights as a decode step has layers (16; 2 for the lm_head), one
call after the other in a CUDA graph, so no call finds its weight in L2 (50 MB on an H200) as a real step
would not. Columns: microseconds per call and % of the copy bandwidth measured in the same run, for cuBLAS,
the kernel's default config, and the best of its tuning configs.
"""

import torch
import torch.nn.functional as F

from fxopt.codegen import gemv

# (N, K): calls per llama-1b-like decode step (after fusing q/k/v and gate/up)
SIZES = {(3072, 2048): 16, (2048, 2048): 16, (11264, 2048): 16, (2048, 5632): 16, (32000, 2048): 1}


def graph_us(fn, reps: int = 10) -> float:
    """Median microseconds of one `fn()` replayed from a CUDA graph of `reps` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[3]


def time_size(n: int, k: int, copies: int, dtype) -> tuple[dict[str, float], str]:
    """Microseconds per call of cuBLAS, the default config and the best tuning config (and its name)."""
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    x_row = x.reshape(-1)
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
    y = torch.empty(n, device="cuda", dtype=dtype)
    reference = F.linear(x.double(), weights[0].double())[0]

    def per_call(launch):
        return graph_us(lambda: [launch(w) for w in weights]) / len(weights)

    timed = {"cublas": per_call(lambda w: F.linear(x, w)),
             "default": per_call(lambda w: gemv._launch(x_row, w, y, gemv.default_config(n, k)))}
    tuning = []
    for config in gemv.tuning_configs(n, k):
        gemv._launch(x_row, weights[0], y, config)
        assert (y.double() - reference).abs().max() < 0.05, config
        tuning.append((per_call(lambda w, c=config: gemv._launch(x_row, w, y, c)), str(config)))
    timed["tuned"], best = min(tuning)
    return timed, best


def main(dtype=torch.bfloat16) -> None:
    src = torch.empty(2**28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() / graph_us(lambda: dst.copy_(src)) / 1e6
    print(f"{torch.cuda.get_device_name()}  copy {copy_tbs:.2f} TB/s  ({dtype})")
    print(f"{'N':>6} {'K':>5} {'MB':>6} | {'cuBLAS us':>9} {'%copy':>6} | {'fxopt us':>8} {'%copy':>6} | "
          f"{'tuned us':>8} {'%copy':>6}  best config")
    totals = {"cublas": 0.0, "default": 0.0, "tuned": 0.0}
    for (n, k), calls in SIZES.items():
        timed, best = time_size(n, k, max(2, calls), dtype)
        mb = n * k * torch.empty((), dtype=dtype).element_size() / 1e6
        for name in totals:
            totals[name] += timed[name] * calls
        cells = " | ".join(f"{timed[c]:>8.2f} {100 * mb / timed[c] / copy_tbs:>6.1f}" for c in totals)
        print(f"{n:>6} {k:>5} {mb:>6.1f} | {cells}  {best}")
    print("per decode step (llama-1b-like, batch 1): " + ", ".join(f"{c} {t:.0f} us" for c, t in totals.items()))


if __name__ == "__main__":
    main()
