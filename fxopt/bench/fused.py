"""Benchmark of generated fused kernels against eager PyTorch, torch.compile and copy bandwidth.

    python -m fxopt.bench.fused [--out results.json]

On a CUDA GPU, in one run: the device-to-device copy bandwidth (fxopt.hardware), then for
each chain the median time (triton.testing.do_bench, return_mode="median", after warm-up)
of the fxopt kernel, eager PyTorch and torch.compile of the same Python function. fxopt and
torch.compile are timed ROUNDS times each in alternating order (fxopt first, then compile
first, ...) and compared by the medians. Bandwidth counts each external input and output once
(what a perfect fusion moves); beside the fraction of the 1 GiB copy bandwidth it reports the
fraction of a copy of the same bytes timed the same way (launch and L2 effects at this size),
and the first-call wall time of fxopt (generate + compile + autotune) and of torch.compile.

Goals: E = D + (A+B)*C on 2**26 fp32 at >= 90% of copy bandwidth and >= 1.6x eager; the
row chains, SwiGLU and GELU on (8192, 4096) bf16 at >= 85% of copy bandwidth and >= 1.0x
torch.compile. They are reported (the "goal" columns), never asserted.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fxopt import cli_args, progress
from fxopt.codegen.fused import compile_region, region_from_fn
from fxopt.errors import check_output, require_cuda
from fxopt.hardware import measure_copy_bandwidth
from fxopt.progress import stage


def chain_e(a, b, c, d):
    return d + (a + b) * c


def rmsnorm_residual(x, r, w):
    # the Llama/HF form: residual add, fp32 statistics, cast back, scale
    h = x + r
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
    return h, w * y.to(h.dtype)


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def softmax(x):
    return torch.softmax(x * 0.125, dim=-1)


def swiglu(a, b):
    return F.silu(a) * b


def gelu_tanh(x, bias):
    return F.gelu(x + bias, approximate="tanh")


def log_softmax_vocab(x):
    return F.log_softmax(x.float(), dim=-1)


@dataclass
class Case:
    name: str
    fn: Callable
    inputs: Callable[[], list[torch.Tensor]]
    bw_goal: float  # fraction of copy bandwidth
    eager_goal: float | None = None  # speedup over eager
    compile_goal: float | None = None  # speedup over torch.compile


def _randn(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype)


R, N = 8192, 4096
BF16 = torch.bfloat16
CASES = [
    Case("E=D+(A+B)*C 2^26 fp32", chain_e, lambda: [_randn(1 << 26, dtype=torch.float32) for _ in range(4)],
         0.90, eager_goal=1.6),
    Case("RMSNorm+residual 8192x4096 bf16", rmsnorm_residual,
         lambda: [_randn(R, N, dtype=BF16), _randn(R, N, dtype=BF16), _randn(N, dtype=BF16)], 0.85, compile_goal=1.0),
    Case("LayerNorm 8192x4096 bf16", layer_norm,
         lambda: [_randn(R, N, dtype=BF16), _randn(N, dtype=BF16), _randn(N, dtype=BF16)], 0.85, compile_goal=1.0),
    Case("softmax(x/8) 8192x4096 bf16", softmax, lambda: [_randn(R, N, dtype=BF16)], 0.85, compile_goal=1.0),
    Case("SwiGLU 8192x4096 bf16", swiglu, lambda: [_randn(R, N, dtype=BF16), _randn(R, N, dtype=BF16)], 0.85,
         compile_goal=1.0),
    Case("GELU-tanh(x+b) 8192x4096 bf16", gelu_tanh, lambda: [_randn(R, N, dtype=BF16), _randn(N, dtype=BF16)],
         0.85, compile_goal=1.0),
    Case("log_softmax 512x50257 bf16->fp32 (multi-pass)", log_softmax_vocab, lambda: [_randn(512, 50257, dtype=BF16)],
         0.0),
]


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _bytes(inputs, outputs) -> int:
    """External inputs and outputs counted once each (distinct storages)."""
    seen, total = set(), 0
    for t in [*inputs, *outputs]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _time(fn, args) -> float:

    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    return do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median")


ROUNDS = 3  # fxopt and torch.compile timed in alternating order, ROUNDS times each


def interleaved_runs(fns: dict[str, Callable[[], object]], rounds: int, time_one) -> dict[str, list[float]]:
    """`rounds` timings of each fn by time_one, every round visiting all fns in a rotated order (the first
    goes first, then the second, ...), so clock and thermal drift within the run lands on all of them."""
    names = list(fns)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        first = r % len(names)
        for name in names[first:] + names[:first]:
            runs[name].append(time_one(fns[name]))
    return runs


def _time_pair(fx, peer, args) -> tuple[float, float, list[float], list[float]]:
    """Medians over ROUNDS alternating do_bench runs (fxopt first, then the peer first, ...); returns
    (fx ms, peer ms, fx runs, peer runs)."""
    runs = interleaved_runs({"fx": fx, "peer": peer}, ROUNDS, lambda fn: _time(fn, args))
    return statistics.median(runs["fx"]), statistics.median(runs["peer"]), runs["fx"], runs["peer"]


def _first_call_s(fn, args) -> float:
    """Wall seconds of a first call (compilation, autotuning) through its synchronised result."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _copy_ms(nbytes: int) -> float:
    """A device copy moving nbytes in all (nbytes / 2 read, nbytes / 2 written), timed like the cases:
    what the copy engine itself reaches at this size (launch and cache effects included)."""
    src = torch.randn(max(1, nbytes // 4), device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return _time(lambda: dst.copy_(src), ())


def run(out_json: str | None = None) -> list[dict]:
    """Run every case once on the current GPU; returns one dict per case (and writes out_json)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_fused needs a CUDA GPU")
    with stage("measuring copy bandwidth"):
        copy_bw = measure_copy_bandwidth()
    results = []
    for i, case in enumerate(CASES, 1):
        args = case.inputs()
        name = "bench_" + "".join(c if c.isalnum() else "_" for c in case.fn.__name__)
        with stage(f"[{i}/{len(CASES)}] {case.name}: compiling fxopt's kernel and torch.compile's"):
            torch.cuda.synchronize()
            start = time.perf_counter()
            kernel = compile_region(region_from_fn(case.fn, *args), name)
            outputs = _as_tuple(kernel(*args))  # first call: Triton compile + autotune (or their disk caches)
            torch.cuda.synchronize()
            first_fx = time.perf_counter() - start
            compiled = torch.compile(case.fn)
            first_compile = _first_call_s(compiled, args)
        with stage(f"[{i}/{len(CASES)}] {case.name}: timing fxopt, torch.compile and eager"):
            ms_fx, ms_compile, fx_runs, compile_runs = _time_pair(kernel, compiled, args)
            ms_eager = _time(case.fn, args)
        eager_out = _as_tuple(case.fn(*args))
        max_err = max((o.float() - e.float()).abs().max().item() for o, e in zip(outputs, eager_out))
        nbytes = _bytes(args, outputs)
        gbs = nbytes / (ms_fx * 1e-3) / 1e9
        ms_copy = _copy_ms(nbytes)
        row = {
            "case": case.name,
            "fxopt_ms": ms_fx,
            "eager_ms": ms_eager,
            "compile_ms": ms_compile,
            "fxopt_ms_runs": fx_runs,
            "compile_ms_runs": compile_runs,
            "bytes": nbytes,
            "fxopt_GBps": gbs,
            "copy_GBps": copy_bw / 1e9,
            "pct_copy_bw": 100 * gbs * 1e9 / copy_bw,
            "same_size_copy_ms": ms_copy,
            "pct_same_size_copy": 100 * ms_copy / ms_fx,
            "speedup_vs_eager": ms_eager / ms_fx,
            "speedup_vs_compile": ms_compile / ms_fx,
            "first_call_s": first_fx,
            "compile_first_call_s": first_compile,
            "max_abs_diff_vs_eager": max_err,
            "kernel_source": str(kernel.path),
        }
        goals = []
        if case.bw_goal:
            goals.append(row["pct_copy_bw"] >= 100 * case.bw_goal)
        if case.eager_goal:
            goals.append(row["speedup_vs_eager"] >= case.eager_goal)
        if case.compile_goal:
            goals.append(row["speedup_vs_compile"] >= case.compile_goal)
        print(f"  {case.name}: fxopt {ms_fx * 1e3:.1f} us ({row['pct_copy_bw']:.1f}% copy, "
              f"{row['pct_same_size_copy']:.1f}% same-size copy), compile {ms_compile * 1e3:.1f} us "
              f"(runs fx {', '.join(f'{t * 1e3:.1f}' for t in fx_runs)} / compile "
              f"{', '.join(f'{t * 1e3:.1f}' for t in compile_runs)}), eager {ms_eager * 1e3:.1f} us, "
              f"first call {first_fx:.1f} s vs compile {first_compile:.1f} s", flush=True)
        row["goal"] = {
            "pct_copy_bw": 100 * case.bw_goal or None,
            "vs_eager": case.eager_goal,
            "vs_compile": case.compile_goal,
            "met": all(goals) if goals else None,
        }
        results.append(row)
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_GBps": copy_bw / 1e9,
    }
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    _print_table(meta, results)
    return results


def _print_table(meta: dict, results: list[dict]) -> None:
    print(f"{meta['device']}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"copy bandwidth {meta['copy_GBps']:.0f} GB/s")
    head = f"{'case':<46} {'fxopt ms':>9} {'eager ms':>9} {'compile':>9} {'GB/s':>7} {'%copy':>6} " \
           f"{'%cp@size':>8} {'x eager':>8} {'x compile':>9} {'1st s':>6} {'cmp 1st':>7}  goal"
    print(head)
    print("-" * len(head))
    for r in results:
        met = r["goal"]["met"]
        print(f"{r['case']:<46} {r['fxopt_ms']:9.4f} {r['eager_ms']:9.4f} {r['compile_ms']:9.4f} "
              f"{r['fxopt_GBps']:7.0f} {r['pct_copy_bw']:6.1f} {r['pct_same_size_copy']:8.1f} "
              f"{r['speedup_vs_eager']:8.2f} {r['speedup_vs_compile']:9.2f} {r['first_call_s']:6.2f} "
              f"{r['compile_first_call_s']:7.2f}  {'-' if met is None else ('met' if met else 'MISSED')}")
    print("%copy: vs the 1 GiB copy bandwidth above (the goal); %cp@size: a copy of the same bytes timed the "
          "same way; x compile: medians of alternating runs; 1st s: first-call seconds (fxopt compile_region "
          "+ first launch, torch.compile first call)")


def main(argv=None) -> int:

    parser = cli_args.Parser(prog="python -m fxopt.bench.fused", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_fused.json", metavar="PATH", help="where to write the JSON results")
    cli_args.add_common_flags(parser, top=True)
    argv = list(sys.argv[1:] if argv is None else argv)

    def go() -> int:
        args = parser.parse_args(argv)
        progress.configure(enabled=not args.quiet)
        require_cuda("bench_fused", "run it on a machine with an NVIDIA GPU")
        if args.out:
            check_output(args.out, "--out")
        run(args.out)
        return 0

    try:
        return cli_args.guarded(go, debug="--debug" in argv)
    finally:
        progress.configure(enabled=None)


if __name__ == "__main__":
    sys.exit(main())
