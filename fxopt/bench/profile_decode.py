"""Where a decode step's time goes: ms/token from CUDA-graph replay, the top GPU kernels, kernels per step,
weight bytes per token and the bandwidth they imply.

    python -m fxopt.bench.profile_decode llama-1b-like --batch 1 --prompt 512
    python -m fxopt.bench.profile_decode llama-1b-like --batch 1 --prompt 512 --compare   # matmul pass on and off

The generator is built as fxopt/bench/decode.py builds it (models/ preset, bf16, build_generator, decode step
fused by the fusion pass and captured in a CUDA graph). After a warm-up generate(), the prompt is prefilled and
one decode step taken; then the step's CUDA graph is replayed from that cache length (each replay feeds its
greedy pick to the next and advances the slot, as greedy generate() does; every loop restarts at that length):
  (a) ms/token   mean of `--replays` graph replays between CUDA events (the step alone), and
                 (t(new) - t(1)) / (new - 1) of timed generate() calls (the same replays, plus prefill cancelled)
  (b) kernels    torch.profiler over `--steps` replays: key_averages() sorted by cuda_time_total, top `--top`
  (c) count      GPU kernels (and memcpy/memset) per replayed step
  (d) bytes      weight bytes one step reads (Generator.weight_stream_bytes: every weight once, embedding
                 tables only the rows looked up) and the K/V bytes at this length; GB/s at (a)'s time, and as a
                 share of the copy bandwidth measured in the same run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fxopt import models
from fxopt.generate import batch_buckets, build_generator
from fxopt.hardware import measure_copy_bandwidth
from fxopt.zoo import _parse_value

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MATMUL_OPS = (torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
              torch.ops.aten.matmul.default)


def _sync() -> None:
    torch.cuda.synchronize()


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _program_census(program: torch.fx.GraphModule) -> dict[str, int]:
    nodes = [n for n in program.graph.nodes if n.op in ("call_function", "call_module")]
    return {
        "graph ops": len(nodes),
        "matmuls": sum(n.target in MATMUL_OPS for n in nodes),
        "fused regions": sum(n.op == "call_module" and str(n.target).startswith("fused_") for n in nodes),
        "fxopt weights": sum(n.op == "get_attr" and str(n.target).startswith("fxopt_") for n in program.graph.nodes),
    }


WARMUP_REPLAYS = 10  # replays before the timed ones


def step_profile(gen, ids: torch.Tensor, *, replays: int = 200, steps: int = 20) -> dict:
    """Prefill `ids`, take one greedy decode step, then replay that step's CUDA graph from this cache length:
    `replays` timed between CUDA events (ms/token of the step alone) and `steps` under torch.profiler. Returns
    replay_ms, kernels_per_step (GPU kernels, memcpy/memset apart), copies_per_step, kernels_per_layer,
    gpu_busy_ms and profiled_step_ms (per step under the profiler, which slows the replay: the time some kernel
    ran, and first kernel start to last kernel end; their difference is the GPU idle between kernels), the
    profile and where its events came from. Every loop of replays starts at the same cache length, so the
    cache needs room for prompt + 1 + max(WARMUP_REPLAYS, replays, steps) positions: ValueError if it lacks it."""
    batch, prompt = ids.shape
    needed = prompt + 1 + max(WARMUP_REPLAYS, replays, steps)
    if needed > gen.max_seq_len:
        raise ValueError(f"step_profile: {needed} cache positions needed (prompt {prompt}, one step, then up to "
                         f"{max(WARMUP_REPLAYS, replays, steps)} replays), the generator has {gen.max_seq_len}")
    logits = gen.prefill(ids)
    gen.decode_step(logits.argmax(-1)[:, None])
    bucket = next(size for size in batch_buckets(gen.max_batch) if size >= batch)
    step = gen._graphs[(bucket, None)]  # the greedy step
    gen._slot.fill_(gen.length)  # each replay advances the device-side slot: every loop starts from this one
    for _ in range(WARMUP_REPLAYS):
        step.graph.replay()
    gen._slot.fill_(gen.length)
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        step.graph.replay()
    end.record()
    _sync()
    replay_ms = start.elapsed_time(end) / replays

    gen._slot.fill_(gen.length)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step.graph.replay()
        _sync()
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    source = f"{steps} CUDA-graph replays"
    if not device_events:  # this profiler cannot see into graph replays: profile the same step run eagerly
        program = gen.decode_program(bucket)
        gen._slot.fill_(gen.length)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                program(step.ids, gen._slot, step.kv_start, *step.caches)
            _sync()
        device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        source = f"{steps} eager decode steps (graph replays were not visible to the profiler)"
    gen._slot.fill_(gen.length)
    gen._slot_holds = gen.length
    copies = sum(("memcpy" in e.name.lower() or "memset" in e.name.lower()) for e in device_events)
    kernels = (len(device_events) - copies) / steps
    busy_us, span_us = _busy_and_span(device_events)
    layers = max(1, len(gen.programs.caches))
    return {"replay_ms": replay_ms, "kernels_per_step": kernels, "copies_per_step": copies / steps,
            "layers": layers, "kernels_per_layer": kernels / layers, "gpu_busy_ms": busy_us / steps / 1e3,
            "profiled_step_ms": span_us / steps / 1e3, "bucket": bucket, "profile": prof, "source": source}


def _busy_and_span(events) -> tuple[float, float]:
    """(us the GPU ran any of `events`, us from the first one's start to the last one's end): the union of
    their intervals, so that overlapping kernels are not counted twice."""
    ranges = sorted((e.time_range.start, e.time_range.end) for e in events)
    if not ranges:
        return 0.0, 0.0
    busy, (open_start, open_end) = 0.0, ranges[0]
    for start, end in ranges[1:]:
        if start > open_end:
            busy += open_end - open_start
            open_start, open_end = start, end
        else:
            open_end = max(open_end, end)
    busy += open_end - open_start
    return busy, max(end for _, end in ranges) - ranges[0][0]


def profile_variant(model, *, batch: int, prompt: int, new: int, matmul: bool, replays: int, steps: int, top: int,
                    repeat: int, copy_bw: float | None) -> dict:
    label = "matmul pass on" if matmul else "matmul pass off"
    print(f"\n=== {label} ===", flush=True)
    # room for the replays below: each advances the cache by one position (the graph moves the slot)
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=prompt + new + 16 + replays + steps,
                          max_batch=batch, matmul=matmul)
    ids = model.example_inputs(batch, prompt, seed=0)["input_ids"]

    # warm-up: prefill, decode-program fusion, CUDA-graph capture
    gen.generate(ids, min(new, 8), eos_token_id=None)
    prefill_s = _median_time(lambda: gen.prefill(ids), repeat)
    t_one = _median_time(lambda: gen.generate(ids, 1, eos_token_id=None), repeat)
    t_all = _median_time(lambda: gen.generate(ids, new, eos_token_id=None), repeat)
    generate_ms = 1e3 * (t_all - t_one) / max(new - 1, 1)

    step = step_profile(gen, ids, replays=replays, steps=steps)
    replay_ms, prof, bucket = step["replay_ms"], step["profile"], step["bucket"]
    kernels_per_step = step["kernels_per_step"]

    weight_bytes = gen.weight_stream_bytes(batch)
    kv_bytes = batch * gen.length * gen.kv_bytes_per_token()
    census = _program_census(gen.decode_program(bucket))

    print(f"{gen.describe()}")
    print(f"decode program (batch {bucket}): " + ", ".join(f"{k} {v}" for k, v in census.items()))
    print(f"\n(b) top {top} GPU kernels over {step['source']}, sorted by cuda_time_total:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top))
    print(f"(a) ms/token      {replay_ms:8.3f} ms  CUDA-graph replay at cache length {gen.length} "
          f"(mean of {replays})")
    print(f"                  {generate_ms:8.3f} ms  generate(): (t({new}) - t(1)) / {new - 1}, median of {repeat}")
    print(f"    prefill       {1e3 * prefill_s:8.2f} ms  batch {batch} x prompt {prompt}")
    print(f"(c) kernels/step  {kernels_per_step:8.1f}      (+ {step['copies_per_step']:.1f} memcpy/memset), "
          f"{step['kernels_per_layer']:.1f} per layer ({step['layers']} layers); GPU busy "
          f"{step['gpu_busy_ms']:.3f} ms of {step['profiled_step_ms']:.3f} ms per profiled step")
    line = (f"(d) weights/step  {weight_bytes / 1e9:8.3f} GB  -> {weight_bytes / (replay_ms * 1e-3) / 1e9:7.1f} GB/s"
            f"; with K/V ({kv_bytes / 1e9:.3f} GB) {(weight_bytes + kv_bytes) / (replay_ms * 1e-3) / 1e9:7.1f} GB/s")
    if copy_bw:
        line += (f"\n                  = {100 * (weight_bytes + kv_bytes) / (replay_ms * 1e-3) / copy_bw:.1f}% of "
                 f"the measured copy bandwidth {copy_bw / 1e9:.0f} GB/s; weights + K/V alone at that bandwidth: "
                 f"{1e3 * (weight_bytes + kv_bytes) / copy_bw:.3f} ms")
    print(line, flush=True)
    result = {"variant": label, "replay_ms": replay_ms, "generate_ms": generate_ms, "prefill_ms": 1e3 * prefill_s,
              "kernels_per_step": kernels_per_step, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
              **census}
    gen = step = None  # free the caches and captured graph before the next variant
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxopt.bench.profile_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="llama-1b-like", help="a models/ preset")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64, help="new tokens of the timed generate() calls")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--replays", type=int, default=200, help="graph replays timed for (a)")
    parser.add_argument("--steps", type=int, default=20, help="graph replays profiled for (b) and (c)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed in (b)")
    parser.add_argument("--repeat", type=int, default=3, help="timed generate() / prefill calls (median)")
    parser.add_argument("--no-matmul", action="store_true", help="build without the matmul layout pass")
    parser.add_argument("--compare", action="store_true", help="profile with the matmul pass on, then off")
    parser.add_argument("--override", action="append", default=[], help="config field=value (e.g. n_layers=2)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profile_decode profiles a CUDA GPU")


    overrides = dict((k, _parse_value(v)) for k, v in (o.split("=", 1) for o in args.override))
    cfg = models.get_config(args.model, **overrides)
    if getattr(cfg, "max_positions", args.prompt + args.new) < args.prompt + args.new:
        overrides["max_positions"] = args.prompt + args.new
    model = models.build(args.model, device="cuda", dtype=DTYPES[args.dtype], **overrides).eval()
    copy_bw = measure_copy_bandwidth()
    print(f"{args.model} {args.dtype}, batch {args.batch}, prompt {args.prompt}, on {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    variants = [True, False] if args.compare else [not args.no_matmul]
    results = [profile_variant(model, batch=args.batch, prompt=args.prompt, new=args.new, matmul=v,
                               replays=args.replays, steps=args.steps, top=args.top, repeat=args.repeat,
                               copy_bw=copy_bw) for v in variants]
    print("\nsummary")
    print(f"{'variant':<18}{'replay ms':>10}{'gen ms':>9}{'prefill ms':>11}{'kernels':>9}{'matmuls':>9}"
          f"{'weights GB':>11}{'GB/s':>8}")
    for r in results:
        gbs = (r["weight_bytes"] + r["kv_bytes"]) / (r["replay_ms"] * 1e-3) / 1e9
        print(f"{r['variant']:<18}{r['replay_ms']:>10.3f}{r['generate_ms']:>9.3f}{r['prefill_ms']:>11.2f}"
              f"{r['kernels_per_step']:>9.1f}{r['matmuls']:>9}{r['weight_bytes'] / 1e9:>11.3f}{gbs:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
