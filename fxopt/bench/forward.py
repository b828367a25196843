"""`fxopt bench MODEL`: runtimes before and after fxopt, per fused region and for the whole forward.

On a GPU every figure is a triton.testing.do_bench median after warm-up, next to peers measured in
the same run: eager PyTorch, torch.compile, the roofline prediction, and the copy bandwidth measured
on this GPU (achieved GB/s as a % of it). On CPU the whole forward is timed with
torch.utils.benchmark and the GPU-only columns say so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import triton
from torch import fx
from torch.profiler import ProfilerActivity, profile
from torch.utils import _pytree as pytree
from torch.utils.benchmark import Timer
from triton.testing import do_bench

from fxopt import models, zoo
from fxopt.bench import attention as bench_attention
from fxopt.bench import decode as bench_decode
from fxopt.bench import decode_tp as bench_decode_tp
from fxopt.bench import fused as bench_fused
from fxopt.bench.fused import interleaved_runs
from fxopt.bench.timeline import Timeline, format_timelines, launch_timeline
from fxopt.cli_args import DTYPES, HW_HELP, MODEL_HELP, positive_int, resolve_hw
from fxopt.errors import UserError, check_output, require_cuda
from fxopt.hardware import get_hardware, measure_copy_bandwidth
from fxopt.optimize import optimize
from fxopt.passes.cost import COST_KEY
from fxopt.passes.fusion import FusedRegionModule
from fxopt.progress import note, progress, stage

GPU_ONLY = "n/a (GPU only)"

#: `fxopt bench` without flags: the full configuration on a GPU, a CPU-sized one elsewhere (seq is further
#: capped by the model's position table). CPU batch 2, not 1: export would specialise a batch of 1 (and say so).
GPU_DEFAULTS = {"model": "gpt2-medium", "batch": 8, "seq": 1024, "dtype": "bf16", "compile": True, "regions": True,
                "min_run_time": 0.5}
CPU_DEFAULTS = {"model": "gpt2-small", "batch": 2, "seq": 64, "dtype": "fp32", "compile": False, "regions": False,
                "min_run_time": 0.2}


@dataclass
class BenchResult:
    model: str
    device: str
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    whole: dict[str, Any] = field(default_factory=dict)
    timelines: dict[str, Timeline] = field(default_factory=dict)  # --profile: host and GPU time per variant

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "device": self.device, "config": self.config,
                           "regions": self.rows, "forward": self.whole,
                           "timelines": {k: t.row() for k, t in self.timelines.items()}}, indent=2, default=str)


def time_ms(fn, device: torch.device, min_run_time: float = 0.5) -> float:
    """Median milliseconds of fn(): do_bench on CUDA, torch.utils.benchmark on CPU (for min_run_time s)."""
    if device.type == "cuda":

        return do_bench(fn, warmup=50, rep=300, return_mode="median")

    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_interleaved(fns: dict[str, Any], device: torch.device, rounds: int = 5,
                     min_run_time: float = 0.5) -> dict[str, float]:
    """Median milliseconds of each fn, measured in `rounds` rounds that visit every fn in a rotated order.

    Timing one variant right after another's sustained load and the next after an idle pause (a compile)
    would fold the GPU's clock and power state into the comparison; interleaving gives every variant the
    same mix of states."""
    if device.type != "cuda":
        timed = {}
        for name, fn in fns.items():
            with stage(f"timing {name} forward"):
                timed[name] = time_ms(fn, device, min_run_time)
        return timed


    with stage(f"timing {', '.join(fns)} ({rounds} interleaved rounds)"):
        for fn in fns.values():  # warm-up outside the rounds
            do_bench(fn, warmup=25, rep=50, return_mode="median")
        runs = interleaved_runs(fns, rounds, lambda fn: do_bench(fn, warmup=10, rep=100, return_mode="median"))
    return {name: statistics.median(values) for name, values in runs.items()}


class _RegionInputs(fx.Interpreter):
    """Runs the optimized graph once and keeps each fused call's actual inputs."""

    def __init__(self, gm):
        super().__init__(gm)
        self.inputs: dict[str, tuple] = {}

    def call_module(self, target, args, kwargs):
        if isinstance(self.fetch_attr(target), FusedRegionModule):
            self.inputs[target] = args
        return super().call_module(target, args, kwargs)


def bench_regions(optimized, args, kwargs, device, copy_bw, hw, compile_regions: bool,
                  min_run_time: float = 0.5) -> list[dict[str, Any]]:
    """Each fused region alone: its kernel vs its ops run eagerly vs torch.compile of the same ops."""

    recorder = _RegionInputs(optimized.gm)
    with torch.no_grad():
        recorder.run(*pytree.tree_leaves((tuple(args), kwargs)))
    rows = []
    ctx = optimized.program.ctx
    time_ms_ = partial(time_ms, min_run_time=min_run_time)
    nodes = [node for node in optimized.gm.graph.nodes
             if node.op == "call_module" and node.target in recorder.inputs]
    for node in progress(nodes, desc="timing fused regions"):
        module, region_inputs = optimized.gm.get_submodule(node.target), recorder.inputs[node.target]
        cost = node.meta[COST_KEY]
        region = node.meta["fxopt.region"]
        nbytes = sum(t.numel() * t.element_size() for t in region_inputs if isinstance(t, torch.Tensor))
        nbytes += sum(v.numel() * v.element_size() for v in module.kernel.reference(*region_inputs))
        row = {"region": node.target, "nodes": len(region.nodes), "bytes": nbytes}
        row["eager_ms"] = time_ms_(partial(module.kernel.reference, *region_inputs), device)
        row["fxopt_ms"] = time_ms_(partial(module.kernel, *region_inputs), device)
        if device.type == "cuda":
            if compile_regions:
                compiled = torch.compile(module.kernel.region, dynamic=False)
                row["compile_ms"] = time_ms_(partial(compiled, *region_inputs), device)
            row["predicted_ms"] = hw.predicted_time(ctx.evaluate(cost.flops), nbytes, cost.dtype, matmul=False) * 1e3
            row["GB/s"] = nbytes / row["fxopt_ms"] / 1e6
            row["%copy_bw"] = 100 * row["GB/s"] * 1e9 / copy_bw
        else:
            row.update({"compile_ms": GPU_ONLY, "predicted_ms": GPU_ONLY, "GB/s": GPU_ONLY, "%copy_bw": GPU_ONLY})
        rows.append(row)
    return rows


def top_kernels(fn, n: int = 12) -> str:
    """The n GPU kernels taking the most time in one call of fn (torch.profiler), as a text table."""

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def predicted_forward_ms(optimized, hw) -> float:
    ctx = optimized.program.ctx
    costs = [n.meta[COST_KEY] for n in optimized.gm.graph.nodes if COST_KEY in n.meta]
    return sum(c.time(ctx, hw) for c in costs if c.kind != "unknown") * 1e3


def bench_model(spec: str, *, batch: int = 8, seq: int | None = None, dtype=torch.bfloat16,
                attn_impl: str | None = None, device: str | None = None, hw: str = "h100", compile: bool = True,
                backend: bool | None = None, regions: bool = True, cuda_graphs: bool | None = None,
                attention: bool = True, profile: bool = False, epilogues: bool = False,
                max_autotune: bool = False, min_run_time: float = 0.5, default_seq: int = 1024,
                **overrides) -> BenchResult:
    """Eager vs fxopt vs torch.compile on one model, with the roofline prediction and copy bandwidth.

    backend (default: as `compile`): also time torch.compile(model, backend="fxopt"), fxopt's passes run on
    each Dynamo subgraph, beside fxopt.optimize; its largest difference from eager is reported too.

    seq None: default_seq, or the model's position limit if smaller. A batch or seq the model cannot take is a
    UserError before anything is captured. min_run_time: seconds each CPU timing runs for.
    epilogues: also time fxopt without GEMM epilogues (optimize(..., epilogues=False)), the fold's gain.
    max_autotune: also time torch.compile(mode="max-autotune") (its first call takes minutes)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if attn_impl is not None:
        overrides["attn_impl"] = attn_impl
    with stage(f"building {spec} ({str(dtype).removeprefix('torch.')}, {device.type})"):
        model = zoo.load_model(spec, device=device, dtype=dtype, **overrides)
    limit = zoo.position_limit(model)
    seq = seq if seq is not None else min(default_seq, limit or default_seq)
    zoo.check_sizes(model, spec, batch=batch, seq=seq)
    inputs = zoo.example_inputs(model, batch, seq, device=device)
    hardware = get_hardware(hw)
    copy_bw = None
    if device.type == "cuda":
        with stage("measuring copy bandwidth"):
            copy_bw = measure_copy_bandwidth()
    config = {"batch": batch, "seq": seq, "dtype": str(dtype), "attn_impl": attn_impl, "attention_rewrite": attention,
              "hw": hardware.name,
              "copy_bw_GBs": copy_bw / 1e9 if copy_bw else GPU_ONLY, **overrides}
    result = BenchResult(spec, torch.cuda.get_device_name() if device.type == "cuda" else "cpu", config)

    with torch.no_grad():
        with stage(f"eager warm-up (b={batch}, s={seq})"):
            _warm_process(model, inputs, device)
        start = time.perf_counter()
        with stage(f"optimizing {spec} with fxopt (capture, passes, kernels)"):
            optimized = optimize(model, inputs, hw=hardware, attention=attention, cuda_graphs=cuda_graphs)
            fxopt_call = lambda: optimized(**inputs)  # noqa: E731
            fxopt_call()
            _sync(device)
        whole = {"optimize_wall_s": time.perf_counter() - start}
        whole.update({f"{name}_s": seconds for name, seconds in optimized.program.seconds.items()})
        result.config["passes"] = {name: r.counts for name, r in optimized.program.results.items() if r.counts}
        variants = {"eager": lambda: model(**inputs), "fxopt": fxopt_call}
        if optimized.graphs is not None:  # the same program launched kernel by kernel: the host's share
            plain = {**optimized.fixed_kwargs, **inputs}
            variants["fxopt_no_graphs"] = lambda: optimized.gm(**plain)
        if epilogues:
            with stage("optimizing again without GEMM epilogues"):
                unfolded = optimize(model, inputs, hw=hardware, attention=attention, cuda_graphs=cuda_graphs,
                                    epilogues=False)
                unfolded(**inputs)
            whole["epilogues_max_abs_diff"] = _max_abs_diff(unfolded(**inputs), fxopt_call())
            variants["fxopt_no_epilogues"] = lambda: unfolded(**inputs)
        if compile:
            start = time.perf_counter()
            with stage("torch.compile first call"):
                compiled = torch.compile(model)
                compiled(**inputs)
                _sync(device)
            whole["compile_first_call_s"] = time.perf_counter() - start
            variants["compile"] = lambda: compiled(**inputs)
            if device.type == "cuda":  # torch.compile's own CUDA graphs, the peer of fxopt's
                with stage("torch.compile(mode='reduce-overhead') first call"):
                    graphed = torch.compile(model, mode="reduce-overhead")
                    for _ in range(3):  # cudagraph trees record after warm-up runs
                        graphed(**inputs)
                    _sync(device)
                variants["compile_reduce_overhead"] = lambda: _cloned(graphed(**inputs))
            if max_autotune:
                start = time.perf_counter()
                with stage("torch.compile(mode='max-autotune') first call (minutes)"):
                    tuned = torch.compile(model, mode="max-autotune")
                    for _ in range(3):
                        tuned(**inputs)
                    _sync(device)
                whole["max_autotune_first_call_s"] = time.perf_counter() - start
                variants["compile_max_autotune"] = lambda: _cloned(tuned(**inputs))
        if compile if backend is None else backend:
            start = time.perf_counter()
            with stage("torch.compile(backend='fxopt') first call"):
                through_backend = torch.compile(model, backend="fxopt", options={"hw": hardware})
                got = through_backend(**inputs)
                _sync(device)
            whole["backend_first_call_s"] = time.perf_counter() - start
            whole["backend_max_abs_diff"] = _max_abs_diff(got, model(**inputs))
            variants["fxopt_backend"] = lambda: through_backend(**inputs)
        timed = time_interleaved(variants, device, min_run_time=min_run_time)
        whole.update({f"{name}_ms": ms for name, ms in timed.items()})
        if optimized.graphs is not None:  # shapes measured faster uncaptured keep none (fxopt/cuda_graphs.py)
            whole["fxopt_graph_kept"] = int(any(b.graph is not None for b in optimized.graphs.buckets.values()))
        whole["predicted_ms"] = predicted_forward_ms(optimized, hardware)
        if profile and device.type == "cuda":
            print("== eager ==\n" + top_kernels(lambda: model(**inputs)))
            print("== fxopt ==\n" + top_kernels(fxopt_call))
            if compile:
                print("== torch.compile ==\n" + top_kernels(lambda: compiled(**inputs)))
            with stage("profiling each variant's timeline (host launches, GPU busy and idle)"):
                result.timelines = {name: launch_timeline(fn) for name, fn in variants.items()}
        whole["speedup_vs_eager"] = whole["eager_ms"] / whole["fxopt_ms"]
        if compile:
            whole["speedup_vs_compile"] = whole["compile_ms"] / whole["fxopt_ms"]
            best = min(v for k, v in whole.items() if k.startswith("compile") and k.endswith("_ms"))
            whole["speedup_vs_compile_best"] = best / whole["fxopt_ms"]
            whole["optimize_vs_compile_wall"] = whole["optimize_wall_s"] / whole["compile_first_call_s"]
        result.whole = whole
        if regions:
            result.rows = bench_regions(optimized, (), inputs, device, copy_bw, hardware, compile, min_run_time)
    return result


def _cloned(out):
    """Outputs copied, as fxopt's graphed forward returns them (torch.compile's are overwritten by the next
    replay): the two graphed peers pay the same copy."""
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def _max_abs_diff(got, want) -> float:
    """Largest |got - want| over the logits of two forward outputs (tensors or HF outputs)."""
    def logits(out):
        out = getattr(out, "logits", out)
        return out[0] if isinstance(out, (tuple, list)) else out
    return float((logits(got).float() - logits(want).float()).abs().max())


def _warm_process(model, inputs, device) -> None:
    """One-time process set-up, before either compiler's first call is timed: the model's eager forward
    (CUDA context, cuBLAS handles, lazily loaded PyTorch kernels) and Triton's driver utilities, which the
    first of fxopt or torch.compile to run would otherwise pay alone."""
    model(**inputs)
    if device.type == "cuda":

        triton.runtime.driver.active.utils  # noqa: B018 (builds/loads Triton's CUDA helper module)
    _sync(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_result(result: BenchResult) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in result.config.items())
    lines = [f"fxopt bench {result.model} on {result.device}: {settings}"]
    if result.rows:
        columns = list(result.rows[0])
        widths = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in result.rows)) for c in columns]
        lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in result.rows:
            lines.append("  ".join(_fmt(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    lines.append("whole forward: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.whole.items()))
    if result.timelines:
        lines.append("timeline of one call per variant (torch.profiler):\n" + format_timelines(result.timelines))
    return "\n".join(lines)


def add_cli(subparsers) -> None:

    gpu, cpu = GPU_DEFAULTS, CPU_DEFAULTS
    parser = subparsers.add_parser(
        "bench", help="runtimes before and after fxopt (per region and whole forward)",
        description="Eager PyTorch vs fxopt vs torch.compile on one model. Without a GPU the defaults are a "
                    f"CPU-sized configuration ({cpu['model']}, batch {cpu['batch']}, seq {cpu['seq']}, {cpu['dtype']}, "
                    "whole forward only, no torch.compile peer, shorter timings); the flags override it.")
    parser.add_argument("model", nargs="?", default=None,
                        help=MODEL_HELP + f" (default: {gpu['model']} on a GPU, {cpu['model']} on CPU; "
                                          "llama-1b-like with --decode)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help=f"batch size (default: {gpu['batch']} on a GPU, {cpu['batch']} on CPU)")
    parser.add_argument("--seq", type=positive_int, default=None,
                        help=f"sequence length (default: {gpu['seq']} on a GPU, {cpu['seq']} on CPU; at most the "
                             "model's position limit)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help=f"(default: {gpu['dtype']} on a GPU, {cpu['dtype']} on CPU)")
    parser.add_argument("--attn-impl", choices=["explicit", "sdpa"], default=None,
                        help="a preset's attention implementation (default: the preset's own)")
    parser.add_argument("--hw", default="h100", help="roofline predictions for this GPU: " + HW_HELP)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile peers (default: on a GPU; off on CPU, where its first call "
                             "takes minutes)")
    parser.add_argument("--backend", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile(model, backend='fxopt') beside fxopt.optimize (default: as "
                             "--compile)")
    parser.add_argument("--regions", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each fused region alone (default: on a GPU; off on CPU, where a "
                             "region runs its reference ops)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="fxopt's forward replayed from a CUDA graph per input shape (default: on a GPU); "
                             "with graphs on, the same program without them is timed too")
    parser.add_argument("--compare-epilogues", dest="epilogues", action="store_true",
                        help="also time fxopt without bias+GELU folded into the GEMM (optimize(..., epilogues=False))")
    parser.add_argument("--max-autotune", action="store_true",
                        help="also time torch.compile(mode='max-autotune'), whose first call takes minutes")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="override the preset's layer count (default: the preset's)")
    parser.add_argument("--no-attention", action="store_true", help="fuse only: leave attention as captured")
    parser.add_argument("--profile", action="store_true",
                        help="print the top GPU kernels of each variant, and each variant's timeline: launches, "
                             "host time per launch, GPU busy and idle time, GPU time per kernel family; with "
                             "--decode: the fxopt rows' kernels per decode step and per layer, GPU busy and idle")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--decode", action="store_true",
                        help="generation instead: eager recompute, HF caches, HF static+compile and fxopt (GPU)")
    parser.add_argument("--configs", default="1x512x256,8x512x256,1x8192x256",
                        help="with --decode: batch x prompt x new-tokens, comma separated")
    parser.add_argument("--rows", default=",".join(bench_decode.ROWS),
                        help=f"with --decode: any of {', '.join(bench_decode.ROWS + tuple(bench_decode.SAMPLED_ROWS))}")
    parser.add_argument("--tp", type=positive_int, default=1, metavar="N",
                        help="with --decode: tensor-parallel over N GPUs, one process each (run under torchrun)")
    parser.add_argument("--suite", choices=["fused", "attention"],
                        help="instead of a model: the fused-kernel or attention-kernel benchmark suite (GPU)")
    parser.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:

    if args.json:
        check_output(args.json, "--json")
    if args.suite:
        require_cuda(f"bench --suite {args.suite}", "run the kernel suites on a machine with an NVIDIA GPU")

        {"fused": bench_fused, "attention": bench_attention}[args.suite].run(args.json)
        return 0
    if args.tp > 1 and not args.decode:
        raise UserError(f"--tp {args.tp} is for --decode", "add --decode (`fxopt annotate MODEL --tp N` costs a "
                                                           "sharded forward)")
    if args.decode:
        rows = bench_decode.parse_rows(args.rows)
        require_cuda("bench --decode", "on CPU time one model with 'fxopt generate MODEL'")

        model = args.model or "llama-1b-like"
        try:
            configs = bench_decode._parse_configs(args.configs)
        except ValueError:
            raise UserError(f"bad --configs {args.configs!r}", "write BATCHxPROMPTxNEW, comma separated, "
                                                               "e.g. 1x512x256,8x512x256") from None
        if any(v <= 0 for config in configs for v in config):
            raise UserError(f"bad --configs {args.configs!r}: every size must be positive", "e.g. 1x512x256")
        dtype = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(args.dtype, args.dtype or "bf16")
        if args.tp > 1:
            bench_decode_tp.run(model, args.tp, configs=configs, dtype=bench_decode.DTYPES[dtype],
                                json_path=args.json)
            return 0
        bench_decode.run(model, dtype=dtype, configs=configs, rows=rows,
                         json_path=args.json, profile=args.profile)
        return 0
    on_gpu = torch.cuda.is_available()
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    model_given = args.model is not None
    args.model = args.model or defaults["model"]
    hw = resolve_hw(args.hw)
    overrides = {"n_layers": args.layers} if args.layers else {}
    if args.model not in models.PRESETS:
        if args.layers:
            raise UserError(f"--layers overrides a preset's layer count; {args.model!r} is not a preset",
                            "drop --layers, or set the layer count in the model spec (hf:...,num_hidden_layers=2)")
        if args.attn_impl:
            raise UserError(f"--attn-impl picks a preset's attention; {args.model!r} is not a preset",
                            "drop --attn-impl")
        overrides = {}
    limit = zoo.spec_position_limit(args.model)
    if limit is not None and args.seq:  # a preset: check before building it (others: bench_model checks)
        zoo.check_sizes(models.PRESETS[args.model], args.model, seq=args.seq)
    batch = args.batch or defaults["batch"]
    dtype = args.dtype or defaults["dtype"]
    compile = defaults["compile"] if args.compile is None else args.compile
    regions = defaults["regions"] if args.regions is None else args.regions
    if not on_gpu:
        seq_text = f"seq {min(defaults['seq'], limit)}" if limit else f"seq {defaults['seq']} or the model's limit"
        chosen = [None if model_given else args.model, f"batch {batch}" if args.batch is None else None,
                  seq_text if args.seq is None else None,
                  dtype if args.dtype is None else None,
                  "whole forward only" if args.regions is None else None,
                  "no torch.compile peer" if args.compile is None else None,
                  f"{defaults['min_run_time']} s per timing"]
        note("no GPU: bench runs a CPU-sized configuration (" + ", ".join(c for c in chosen if c)
             + "); the GPU columns read n/a. --batch/--seq/--dtype/--regions/--compile override it")
    result = bench_model(args.model, batch=batch, seq=args.seq, default_seq=defaults["seq"], dtype=DTYPES[dtype],
                         attn_impl=args.attn_impl, hw=hw, compile=compile, backend=args.backend,
                         regions=regions, cuda_graphs=args.cuda_graphs,
                         attention=not args.no_attention, profile=args.profile, epilogues=args.epilogues,
                         max_autotune=args.max_autotune, min_run_time=defaults["min_run_time"], **overrides)
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(result.to_json())
    return 0
