"""Tensor-parallel generation benchmark: `fxopt bench MODEL --decode --tp N`, one process per GPU.

    torchrun --nproc-per-node N -m fxopt.cli bench MODEL --decode --tp N [--configs 1x512x128,8x512x128]

Every rank builds the model on the meta device and materialises only its shard (fxopt/tensor_parallel.py), so no
rank ever holds the whole model. The weights are random: each parameter is drawn from a generator seeded by its
name, so every rank draws the same full tensor and keeps its own rows or columns; buffers computed from the
config (RoPE tables, causal masks) come from a one-layer copy of the model built on the CPU. Each rank runs
greedy generation with CUDA-graph replays (its collectives inside the graph); rank 0 prints per config:

  ms/token     (t(new) - t(1)) / (new - 1), wall time on rank 0 after a barrier
  weights      the bytes of this rank's shard one decode step streams, as % of the copy bandwidth
  collectives  the NCCL kernels' share of one step (torch.profiler over a few replays; GPU only)

The backend is NCCL on GPUs and gloo on CPUs (a smoke run: CPU timings say nothing about GPUs).

For an `hf:` model the peer in the same run is HF transformers' own tensor parallelism: rank 0 writes the same
random weights as a checkpoint to a temporary folder (the whole model passes through its CPU memory once), every
rank loads it with `from_pretrained(..., tp_plan="auto")` (it needs accelerate) and times greedy `generate()`;
`match` is the share of its tokens equal to fxopt's.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import zlib

import torch
import torch.distributed as dist

from fxopt import models, zoo
from fxopt.errors import UserError
from fxopt.generate import build_generator
from fxopt.hardware import measure_copy_bandwidth
from fxopt.models.inputs import random_token_ids

INIT_STD = 0.02  # random weights: N(0, INIT_STD^2) matrices and tables


def run(spec: str, tp: int, *, configs, dtype: torch.dtype = torch.bfloat16, repeat: int = 3,
        json_path: str | None = None) -> list[dict]:
    """Rank-local measurements of every config (rank 0 prints the table and writes `json_path`); call under
    torchrun."""
    group = _init(tp)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        longest = max(p + n for _, p, n in configs)
        meta = zoo.load_model(spec, device="meta", dtype=dtype)
        zoo.check_sizes(meta, spec, seq=longest, seq_flag="prompt + new")
        weights = random_weights(spec, meta, dtype)
        vocab = getattr(getattr(meta, "config", None), "vocab_size", None) or 256
        copy_bw = measure_copy_bandwidth() if device.type == "cuda" else None
        example = random_token_ids(1, 8, vocab, seed=0, device=device)
        gen = build_generator(meta, {"input_ids": example}, max_seq_len=longest,
                              max_batch=max(b for b, _, _ in configs), device=device, tensor_parallel=group,
                              weights=weights)  # one shard and its caches for every config
        hf = _hf_tp_peer(spec, weights, dtype) if spec.startswith("hf:") else None
        results = []
        for batch, prompt, new in configs:
            ids = random_token_ids(batch, prompt, vocab, seed=0, device=device)
            row = _measure(gen, ids, new, repeat, copy_bw)
            if hf is not None:
                row.update(_measure_hf(hf, ids, new, repeat, row["tokens"]))
            results.append(row)
        if rank == 0:
            print(format_table(spec, tp, device, configs, results, gen.tp_report))
            if json_path:
                rows = [{k: v for k, v in r.items() if k != "tokens"} for r in results]
                report = {"model": spec, "tp": tp, "device": _device_name(device), "date": time.strftime("%Y-%m-%d"),
                          "copy_bandwidth": copy_bw, "shard": str(gen.tp_report), "rows": rows}
                with open(json_path, "w") as fh:
                    json.dump(report, fh, indent=2)
        return results
    finally:
        dist.destroy_process_group()


def _init(tp: int) -> dist.ProcessGroup:
    how = f"run it as: torchrun --nproc-per-node {tp} -m fxopt.cli bench MODEL --decode --tp {tp}"
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        except ValueError:  # not started by torchrun: no rank or rendezvous address
            raise UserError(f"--tp {tp} needs {tp} processes, one per GPU", how) from None
    if dist.get_world_size() != tp:
        world = dist.get_world_size()
        dist.destroy_process_group()
        raise UserError(f"--tp {tp}, but torchrun started {world} processes", how)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    return dist.group.WORLD


def random_weights(spec: str, meta: torch.nn.Module, dtype: torch.dtype):
    """name -> the full tensor of `name`: parameters drawn from a generator seeded by the name (the same tensor
    on every rank; tied ones by their first name), 1-d weights (norm scales) ones and biases zeros, buffers from a
    one-layer copy of the model on the CPU (layer k's buffers are layer 0's)."""
    canonical: dict[int, str] = {}  # a tied parameter (lm_head = embedding) is drawn under its first name
    params = {}
    for name, p in meta.named_parameters(remove_duplicate=False):
        params[name] = (canonical.setdefault(id(p), name), p)
    buffers: dict[str, torch.Tensor] | None = None

    def tensor(name: str) -> torch.Tensor:
        nonlocal buffers
        if name in params:
            first, p = params[name]
            if p.dim() < 2:  # norm scales (ones) and biases (zeros)
                return (torch.ones if name.endswith("weight") else torch.zeros)(p.shape, dtype=p.dtype)
            g = torch.Generator().manual_seed(zlib.crc32(first.encode()))
            return (torch.randn(p.shape, generator=g) * INIT_STD).to(p.dtype)
        if buffers is None:
            buffers = dict(_one_layer_copy(spec, dtype).named_buffers())
        found = buffers.get(name, buffers.get(re.sub(r"\.(\d+)\.", ".0.", name, count=1)))
        if found is None:
            raise KeyError(f"no value for {name!r} (not a parameter, and not a buffer of the one-layer copy)")
        return found

    return tensor


def _one_layer_copy(spec: str, dtype: torch.dtype) -> torch.nn.Module:
    if spec in models.PRESETS:
        return models.build(spec, device="cpu", dtype=dtype, n_layers=1)
    if spec.startswith("hf:"):
        return zoo.load_model(spec + ",num_hidden_layers=1", device="cpu", dtype=dtype)
    raise UserError(f"bench --decode --tp builds random weights for presets and hf: specs, not {spec!r}",
                    "use a preset or an hf: spec")


def _ms_per_token(generate, new: int, repeat: int, device: torch.device) -> float:
    """(t(new) - t(1)) / (new - 1) in ms: median wall times of `generate(n)` between barriers of every rank."""
    def timed(n: int) -> float:
        times = []
        for _ in range(repeat):
            _barrier(device)
            start = time.perf_counter()
            generate(n)
            _barrier(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return 1e3 * (timed(new) - timed(1)) / max(new - 1, 1)


def _measure(gen, ids: torch.Tensor, new: int, repeat: int, copy_bw: float | None) -> dict:
    batch = ids.shape[0]
    tokens = gen.generate(ids, new)  # warm-up: compiles and captures
    ms = _ms_per_token(lambda n: gen.generate(ids, n), new, repeat, ids.device)
    weight_bytes = gen.weight_stream_bytes(batch)
    row = {"batch": batch, "prompt": ids.shape[1], "new": new, "ms_per_token": ms,
           "local_weight_bytes": weight_bytes, "weight_pct": None, "collective_pct": None,
           "tokens": tokens.cpu()}
    if copy_bw:
        row["weight_pct"] = 100 * weight_bytes / (ms * 1e-3) / copy_bw
        row["collective_pct"] = _collective_share(gen, ids)
    return row


def _hf_tp_peer(spec: str, weights, dtype: torch.dtype):
    """The same model and weights under HF's tensor parallelism (None, with a line on rank 0's stderr, when
    transformers or accelerate is missing or HF refuses the architecture)."""
    import shutil
    import sys
    import tempfile

    try:
        import accelerate  # noqa: F401 - HF's tp_plan needs it
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        if dist.get_rank() == 0:
            print(f"no HF tensor-parallel peer: {exc}", file=sys.stderr)
        return None
    folder = [tempfile.mkdtemp(prefix="fxopt-tp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder)
    try:
        if dist.get_rank() == 0:
            model = zoo.load_model(spec, device="cpu", dtype=dtype)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(weights(name))
            model.save_pretrained(folder[0])
            del model
        dist.barrier()
        try:
            hf = AutoModelForCausalLM.from_pretrained(folder[0], tp_plan="auto", dtype=dtype).eval()
        except Exception as exc:  # noqa: BLE001 - the peer is optional; fxopt's rows stand alone
            if dist.get_rank() == 0:
                print(f"no HF tensor-parallel peer: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            return None
        hf.generation_config.eos_token_id = None  # every run generates all its tokens
        hf.generation_config.pad_token_id = 0
        return hf
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(folder[0], ignore_errors=True)


def _measure_hf(hf, ids: torch.Tensor, new: int, repeat: int, fxopt_tokens: torch.Tensor) -> dict:
    """HF's greedy generate() under its tensor parallelism: ms/token as fxopt's, and the share of equal tokens."""
    def generate(n):
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=n, do_sample=False)

    tokens = generate(new)  # warm-up
    prompt = ids.shape[1]
    same = (tokens[:, prompt:].cpu() == fxopt_tokens[:, prompt:]).float().mean().item()
    return {"hf_ms_per_token": _ms_per_token(generate, new, repeat, ids.device), "hf_match": same}


def _barrier(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _collective_share(gen, ids: torch.Tensor) -> float:
    """% of the GPU time of a few decode replays that NCCL kernels take (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gen.generate(ids, 2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate(ids, 8)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    total = sum(e.device_time for e in events)
    nccl = sum(e.device_time for e in events if "nccl" in e.name.lower())
    return 100 * nccl / total if total else float("nan")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_table(spec, tp, device, configs, results, report) -> str:
    lines = [f"{spec} over {tp} ranks ({_device_name(device)} each, {time.strftime('%Y-%m-%d')}); {report}",
             f"{'config':<14}{'ms/token':>10}{'shard weights GB/step':>23}{'% copy':>8}{'% in collectives':>18}"
             f"{'HF TP ms/token':>16}{'x HF TP':>9}{'match':>7}"]
    for (b, p, n), r in zip(configs, results):
        pct = "-" if r["weight_pct"] is None else f"{r['weight_pct']:.1f}"
        coll = "-" if r["collective_pct"] is None else f"{r['collective_pct']:.1f}"
        hf_ms = r.get("hf_ms_per_token")
        hf = (f"{hf_ms:>16.3f}{hf_ms / r['ms_per_token']:>9.2f}{r['hf_match']:>7.2f}" if hf_ms is not None
              else f"{'-':>16}{'-':>9}{'-':>7}")
        lines.append(f"{f'{b}x{p}+{n}':<14}{r['ms_per_token']:>10.3f}{r['local_weight_bytes'] / 1e9:>23.3f}"
                     f"{pct:>8}{coll:>18}{hf}")
    return "\n".join(lines)
