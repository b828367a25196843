"""Attention kernel benchmark: fxopt FlashAttention / Flash-Decoding against PyTorch's SDPA backends and
the GPU's copy bandwidth, every peer measured in the same run on the same GPU.

    python -m fxopt.bench.attention [--quick] [--json out.json] [--sections prefill,decode,window,memory]

Timings are triton.testing.do_bench medians after a warm-up call (compilation and autotuning happen
outside the timed region). Sections:
  1. copy bandwidth (read + write bytes per second), the memory-bound ceiling;
  2. prefill (bf16 B4 H32 N4096 d128, causal and not): TFLOP/s vs SDPA flash / cuDNN / efficient;
  3. decode (bf16 batch 1, 32 query / 8 KV heads, d128, 16k keys): effective bandwidth vs copy
     bandwidth and vs the best SDPA backend, launched from Python and replayed from CUDA graphs (fxopt
     and every SDPA backend captured the same way; the generation runtime replays its decode step),
     plus the host time per decode_attention call;
  4. decode (32 / 32 heads, 128k keys): fraction of copy bandwidth;
  5. sliding window 4096 at 16k keys (bf16 B1, 32 query / 8 KV heads, d128), prefill and decode: against the
     same kernel without a window (time ratio next to the expected work ratio) and against SDPA backends given
     the equivalent boolean mask (which cannot skip the keys outside the band);
  6. prefill peak memory (B1 H32 d128 bf16 causal, N = 4k..32k) next to an N^2 score matrix.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

from fxopt import config
from fxopt.codegen import flash_decoding as fd
from fxopt.codegen import pdl
from fxopt.codegen.flash_attention import attention_flops, flash_attention
from fxopt.codegen.flash_decoding import (
    choose_num_splits,
    decode_attention,
    decode_hbm_bytes,
)
from fxopt.hardware import get_hardware, measure_copy_bandwidth, sm_count

GIB = 1 << 30


def _do_bench(fn, quick: bool) -> float:
    """Median milliseconds of fn() after one untimed warm-up call."""

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200, return_mode="median")


def _do_bench_graph(fn) -> float | None:
    """Median milliseconds of fn() replayed from a CUDA graph (no launch overhead), or None."""
    try:

        fn()
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as err:  # older Triton without return_mode, or capture failure
        print(f"  (CUDA-graph timing unavailable: {type(err).__name__}: {err})")
        return None


def _host_us(fn, n: int = 200) -> float:
    """Microseconds of host time per call of fn (launch overhead: no synchronisation inside the loop)."""

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n
    torch.cuda.synchronize()
    return host * 1e6


def _sdpa_backends():

    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def _time_sdpa(backend, q, k, v, *, causal, quick, gqa=False, graph=False, attn_mask=None):
    """(ms, note) for one pinned SDPA backend, or (None, reason) if it refuses these inputs; with
    graph=True also the CUDA-graph replay time: (ms, graph_ms, note).

    GQA (fewer KV heads) uses enable_gqa=True when this torch and backend take it; otherwise K/V are
    repeated to the query heads outside the timed region (the note says so). attn_mask: passed through
    (a boolean mask: True = attend)."""

    note = ""
    kwargs = {"is_causal": causal}
    if attn_mask is not None:
        kwargs["attn_mask"] = attn_mask
    if gqa:
        kwargs["enable_gqa"] = True
    try:
        with sdpa_kernel(backend):
            try:
                F.scaled_dot_product_attention(q, k, v, **kwargs)
            except (RuntimeError, TypeError):
                if not gqa:
                    raise
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                kwargs.pop("enable_gqa")
                note = "K/V repeated to all heads outside timing"
            ms = _do_bench(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs), quick)
            if graph:  # captured under the same backend pin
                graph_ms = _do_bench_graph(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs))
                return ms, graph_ms, note
        return ms, note
    except RuntimeError as err:
        return (None, None, f"unavailable: {str(err).splitlines()[0][:100]}") if graph else (
            None, f"unavailable: {str(err).splitlines()[0][:100]}")


def _row(results, section, metric, fxopt, peer, peer_name, unit, **extra):
    ratio = fxopt / peer if (fxopt is not None and peer) else None
    row = {"section": section, "metric": metric, "fxopt": fxopt, "peer": peer, "peer_name": peer_name,
           "ratio": ratio, "unit": unit, **extra}
    results.append(row)
    return row


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def bench_prefill(results, copy_bw, quick):

    b, h, n, d = (1, 8, 1024, 128) if quick else (4, 32, 4096, 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    for causal in (False, True):
        label = f"prefill bf16 B{b} H{h} N{n} d{d} {'causal' if causal else 'full'}"
        flops = attention_flops(b, h, n, n, d, causal)
        out = flash_attention(q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        max_err = (out.float() - ref.float()).abs().max().item()
        ms = _do_bench(lambda c=causal: flash_attention(q, k, v, causal=c), quick)
        tflops = flops / (ms * 1e-3) / 1e12
        print(f"{label}: fxopt {ms:.3f} ms = {tflops:.1f} TFLOP/s (max |fxopt - sdpa| = {max_err:.2g})")
        for name, backend in _sdpa_backends().items():
            peer_ms, note = _time_sdpa(backend, q, k, v, causal=causal, quick=quick)
            if peer_ms is None:
                print(f"  {name}: {note}")
                continue
            peer_tflops = flops / (peer_ms * 1e-3) / 1e12
            print(f"  {name}: {peer_ms:.3f} ms = {peer_tflops:.1f} TFLOP/s "
                  f"-> fxopt x{tflops / peer_tflops:.2f}")
            _row(results, "prefill", f"{label} TFLOP/s", tflops, peer_tflops, name, "TFLOP/s",
                 fxopt_ms=ms, peer_ms=peer_ms, max_abs_diff_vs_sdpa=max_err)


def _with_setting(fn, owner, name: str, value):
    """fn() with owner.name set to value and fresh Flash-Decoding launch plans, then the default restored."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    fd._PLANS.clear()
    try:
        return fn()
    finally:
        setattr(owner, name, saved)
        fd._PLANS.clear()


def _without_pdl(fn):
    """fn() with each kernel launched after the one before ends, not early (programmatic dependent launch off)."""
    return _with_setting(fn, pdl, "ENABLED", False)


def _with_merge_kernel(fn):
    """fn() with Flash-Decoding's splits merged by its second kernel, not by the last split program."""
    return _with_setting(fn, fd, "MERGE_IN_SPLIT_MAX_ROWS", 0)


def bench_decode(results, copy_bw, quick, *, hq, hkv, n, label, sweep=False):

    d = 128
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv_len = torch.full((1,), n, dtype=torch.int32, device="cuda")
    nbytes = decode_hbm_bytes(1, hq, hkv, 1, n, d, 2, num_splits=0)  # K + V + q + o, no partials
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
    out = decode_attention(q, k, v, kv_len)
    max_err = (out.float() - ref.float()).abs().max().item()
    ms = _do_bench(lambda: decode_attention(q, k, v, kv_len), quick)
    bw = nbytes / (ms * 1e-3)
    print(f"{label}: fxopt {ms * 1e3:.1f} us = {bw / 1e9:.0f} GB/s = {100 * bw / copy_bw:.1f}% of copy "
          f"bandwidth (max |fxopt - sdpa| = {max_err:.2g})")
    _row(results, "decode", f"{label} GB/s vs copy", bw / 1e9, copy_bw / 1e9, "copy bandwidth", "GB/s",
         fxopt_ms=ms, max_abs_diff_vs_sdpa=max_err)
    host_us = _host_us(lambda: decode_attention(q, k, v, kv_len))
    print(f"  host time per call (Python, launches; no sync): {host_us:.1f} us")
    _row(results, "decode", f"{label} host us per call", host_us, None, "", "us")
    graph_ms = _do_bench_graph(lambda: decode_attention(q, k, v, kv_len))
    if graph_ms is not None:
        graph_bw = nbytes / (graph_ms * 1e-3)
        print(f"  fxopt replayed from a CUDA graph: {graph_ms * 1e3:.1f} us = "
              f"{100 * graph_bw / copy_bw:.1f}% of copy")
        _row(results, "decode", f"{label} GB/s vs copy (CUDA graph)", graph_bw / 1e9, copy_bw / 1e9,
             "copy bandwidth", "GB/s", fxopt_ms=graph_ms)
        serial_ms = _without_pdl(lambda: _do_bench_graph(lambda: decode_attention(q, k, v, kv_len)))
        if serial_ms is not None:
            print(f"  the same, each kernel launched only after the one before (PDL off): "
                  f"{serial_ms * 1e3:.1f} us = {100 * nbytes / (serial_ms * 1e-3) / copy_bw:.1f}% of copy")
        two_ms = _with_merge_kernel(lambda: _do_bench_graph(lambda: decode_attention(q, k, v, kv_len)))
        if two_ms is not None:
            print(f"  the same, the splits merged by a second kernel: "
                  f"{two_ms * 1e3:.1f} us = {100 * nbytes / (two_ms * 1e-3) / copy_bw:.1f}% of copy")
            _row(results, "decode", f"{label} GB/s vs copy (CUDA graph, merge kernel)", nbytes / (two_ms * 1e-3) / 1e9,
                 copy_bw / 1e9, "copy bandwidth", "GB/s", fxopt_ms=two_ms)
    if sweep:  # how the split count chosen by choose_num_splits compares with its neighbours
        sms = sm_count(q.device)
        chosen = choose_num_splits(hkv, n, sms)
        print(f"  split sweep ({sms} SMs, default {chosen}; {get_hardware(None).sm_count} assumed without a GPU; "
              f"replayed from CUDA graphs):")
        for splits in sorted({max(1, chosen // 4), max(1, chosen // 2), chosen, 2 * chosen, 4 * chosen}):
            call = lambda s=splits: decode_attention(q, k, v, kv_len, num_splits=s)  # noqa: E731
            sweep_ms = _do_bench_graph(call) or _do_bench(call, quick)
            sweep_bw = nbytes / (sweep_ms * 1e-3)
            print(f"    num_splits={splits}: {sweep_ms * 1e3:.1f} us = {100 * sweep_bw / copy_bw:.1f}% of copy")
            results.append({"section": "decode-sweep", "metric": f"{label} num_splits={splits} GB/s",
                            "fxopt": sweep_bw / 1e9, "peer": copy_bw / 1e9, "peer_name": "copy bandwidth",
                            "ratio": sweep_bw / copy_bw, "unit": "GB/s", "fxopt_ms": sweep_ms})
    # SDPA backends timed both ways too: the fair peer of fxopt's graph-replayed decode step is SDPA
    # replayed from a CUDA graph captured the same way
    best, best_graph = None, None
    for name, backend in _sdpa_backends().items():
        peer_ms, peer_graph_ms, note = _time_sdpa(backend, q, k, v, causal=False, quick=quick, gqa=hq != hkv,
                                                  graph=True)
        if peer_ms is None:
            print(f"  {name}: {note}")
            continue
        graph_note = "" if peer_graph_ms is None else (
            f"; from a CUDA graph {peer_graph_ms * 1e3:.1f} us = {100 * nbytes / (peer_graph_ms * 1e-3) / copy_bw:.1f}%"
            " of copy")
        print(f"  {name}: {peer_ms * 1e3:.1f} us = {nbytes / (peer_ms * 1e-3) / 1e9:.0f} GB/s{graph_note}"
              f"{' (' + note + ')' if note else ''}")
        if best is None or peer_ms < best[1]:
            best = (name, peer_ms, note)
        if peer_graph_ms is not None and (best_graph is None or peer_graph_ms < best_graph[1]):
            best_graph = (name, peer_graph_ms, note)
    if best is not None:
        name, peer_ms, note = best
        peer_bw = nbytes / (peer_ms * 1e-3)
        print(f"  fxopt vs best SDPA ({name}), both launched from Python: x{bw / peer_bw:.2f}")
        _row(results, "decode", f"{label} GB/s vs best SDPA", bw / 1e9, peer_bw / 1e9, name, "GB/s",
             fxopt_ms=ms, peer_ms=peer_ms, note=note)
    if best_graph is not None and graph_ms is not None:
        name, peer_ms, note = best_graph
        peer_bw = nbytes / (peer_ms * 1e-3)
        print(f"  fxopt vs best SDPA ({name}), both replayed from CUDA graphs: x{graph_bw / peer_bw:.2f}")
        _row(results, "decode", f"{label} GB/s vs best SDPA (CUDA graphs)", graph_bw / 1e9, peer_bw / 1e9, name,
             "GB/s", fxopt_ms=graph_ms, peer_ms=peer_ms, note=note)


def _window_sdpa_rows(results, label, q, k, v, mask, ms, work, quick, *, unit_name, graph_ms=None):
    """SDPA backends given the window as a boolean mask: printed next to fxopt's window timing (ms), and one
    row each; `work` converts milliseconds into the figure of `unit_name` (TFLOP/s or GB/s of useful work)."""
    for name, backend in _sdpa_backends().items():
        timed = _time_sdpa(backend, q, k, v, causal=False, quick=quick, gqa=q.shape[1] != k.shape[1],
                           graph=graph_ms is not None, attn_mask=mask)
        peer_ms, note = timed[0], timed[-1]
        if peer_ms is None:
            print(f"  {name} (boolean mask): {note}")
            continue
        peer_graph = timed[1] if graph_ms is not None else None
        graph_note = "" if peer_graph is None or graph_ms is None else (
            f"; from a CUDA graph {peer_graph * 1e3:.1f} us -> fxopt's graph x{peer_graph / graph_ms:.2f} faster")
        print(f"  {name} with the boolean mask: {peer_ms * 1e3:.1f} us = {work(peer_ms):.4g} {unit_name} -> fxopt "
              f"x{peer_ms / ms:.2f} faster{graph_note}{' (' + note + ')' if note else ''}")
        _row(results, "window", f"{label} {unit_name} vs SDPA masked", work(ms), work(peer_ms),
             f"{name} (bool mask)", unit_name, fxopt_ms=ms, peer_ms=peer_ms, note=note)
        if peer_graph is not None:
            _row(results, "window", f"{label} {unit_name} vs SDPA masked (CUDA graphs)", work(graph_ms),
                 work(peer_graph), f"{name} (bool mask)", unit_name, fxopt_ms=graph_ms, peer_ms=peer_graph)


def bench_window(results, copy_bw, quick):
    """Sliding window (HF Mistral's: query p sees keys p - window < j <= p) in both kernels."""

    b, hq, hkv, d = 1, 32, 8, 128
    n, w = (4096, 1024) if quick else (16384, 4096)
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    rows = torch.arange(n, device="cuda")[:, None]
    cols = torch.arange(n, device="cuda")[None, :]
    band = (cols <= rows) & (cols > rows - w)  # (n, n) True = attend

    # prefill
    label = f"window{w} prefill bf16 B{b} {hq}/{hkv} heads N{n} d{d}"
    flops = attention_flops(b, hq, n, n, d, True, window=w)
    expected = flops / attention_flops(b, hq, n, n, d, True)
    out = flash_attention(q, k, v, causal=True, window=w)
    group = hq // hkv
    ref_rows = slice(n - 256, n)  # max error on the last rows (a full-length float reference would not fit)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, ref_rows].float(), k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float(),
        attn_mask=band[ref_rows])
    max_err = (out[:, :, ref_rows].float() - ref).abs().max().item()
    ms = _do_bench(lambda: flash_attention(q, k, v, causal=True, window=w), quick)
    ms_causal = _do_bench(lambda: flash_attention(q, k, v, causal=True), quick)
    tflops = lambda t: flops / (t * 1e-3) / 1e12  # noqa: E731 - the band's useful FLOPs per second
    print(f"{label}: fxopt {ms * 1e3:.0f} us = {tflops(ms):.1f} TFLOP/s; without the window (causal) "
          f"{ms_causal * 1e3:.0f} us: time ratio {ms / ms_causal:.3f}, expected work ratio {expected:.3f} "
          f"(window/length {w / n:.3f}) (max |fxopt - fp32 sdpa| on the last rows = {max_err:.2g})")
    _row(results, "window", f"{label} ms vs no window", ms, ms_causal, "fxopt causal, no window", "ms",
         ratio_expected=expected, window_over_length=w / n, max_abs_diff_vs_sdpa=max_err)
    _window_sdpa_rows(results, label, q, k, v, band, ms, tflops, quick, unit_name="TFLOP/s")
    del out, ref
    torch.cuda.empty_cache()

    # decode: one new token at position n - 1 over an n-key cache
    label = f"window{w} decode bf16 B{b} {hq}/{hkv} heads kv{n // 1024}k d{d}"
    qd = q[:, :, -1:].contiguous()
    kv_len = torch.full((b,), n, dtype=torch.int32, device="cuda")
    nbytes = decode_hbm_bytes(b, hq, hkv, 1, w, d, 2, num_splits=0)  # the band's K + V, q + o
    expected = w / n
    call = lambda: decode_attention(qd, k, v, kv_len, window=w)  # noqa: E731
    full = lambda: decode_attention(qd, k, v, kv_len)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(
        qd.float(), k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float(),
        attn_mask=band[-1:])
    max_err = (call().float() - ref).abs().max().item()
    ms, ms_full = _do_bench(call, quick), _do_bench(full, quick)
    graph_ms, graph_full = _do_bench_graph(call), _do_bench_graph(full)
    gbs = lambda t: nbytes / (t * 1e-3) / 1e9  # noqa: E731 - the band's bytes per second
    graph_note = "" if graph_ms is None or graph_full is None else (
        f"; from CUDA graphs {graph_ms * 1e3:.1f} against {graph_full * 1e3:.1f} us: ratio {graph_ms / graph_full:.3f}")
    print(f"{label}: fxopt {ms * 1e3:.1f} us = {gbs(ms):.0f} GB/s = {100 * gbs(ms) * 1e9 / copy_bw:.1f}% of copy; "
          f"without the window {ms_full * 1e3:.1f} us: ratio {ms / ms_full:.3f}{graph_note}; expected work ratio "
          f"{expected:.3f} (max |fxopt - fp32 sdpa| = {max_err:.2g})")
    _row(results, "window", f"{label} us vs no window", ms * 1e3, ms_full * 1e3, "fxopt, no window", "us",
         ratio_expected=expected, max_abs_diff_vs_sdpa=max_err)
    if graph_ms is not None and graph_full is not None:
        _row(results, "window", f"{label} us vs no window (CUDA graph)", graph_ms * 1e3, graph_full * 1e3,
             "fxopt, no window", "us", ratio_expected=expected)
    _window_sdpa_rows(results, label, qd, k, v, band[-1:], ms, gbs, quick, unit_name="GB/s", graph_ms=graph_ms)


def bench_memory(results, quick):

    b, h, d = 1, 32, 128
    sizes = (1024, 2048) if quick else (4096, 8192, 16384, 32768)
    previous = None
    with config.override(attn_autotune=False):  # peak memory does not depend on the tile; skip tuning
        for n in sizes:
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flash_attention(q, k, v, causal=True)  # compile outside the measurement
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = flash_attention(q, k, v, causal=True)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            scores = b * h * n * n * 2  # one bf16 score matrix
            growth = f", x{peak / previous:.2f} vs N/2" if previous else ""
            print(f"prefill peak memory N={n}: {peak / 2**20:.1f} MiB "
                  f"(output {out.numel() * 2 / 2**20:.1f} MiB){growth}; "
                  f"an N^2 bf16 score matrix: {scores / 2**20:.0f} MiB")
            _row(results, "memory", f"prefill peak MiB N={n}", peak / 2**20, scores / 2**20,
                 "N^2 bf16 scores", "MiB")
            previous = peak
            del q, k, v, out
            torch.cuda.empty_cache()


SECTIONS = ("prefill", "decode", "window", "memory")


def run(out_json=None, *, quick=False, sections=SECTIONS) -> list[dict]:
    """Run the sections (default all) on the present GPU; print a table; write the rows to out_json."""
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")


    results: list[dict] = []
    device = torch.cuda.get_device_name()
    print(f"device {device}, torch {torch.__version__}, triton {triton.__version__}")

    copy_bw = measure_copy_bandwidth(nbytes=(256 << 20) if quick else GIB)
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
    _row(results, "copy", "copy bandwidth GB/s", copy_bw / 1e9, None, "", "GB/s")

    if "prefill" in sections:
        bench_prefill(results, copy_bw, quick)
    if "decode" not in sections:
        pass
    elif quick:
        bench_decode(results, copy_bw, quick, hq=32, hkv=8, n=4096, label="decode bf16 B1 32/8 heads kv4k",
                     sweep=True)
    else:
        bench_decode(results, copy_bw, quick, hq=32, hkv=8, n=16384, label="decode bf16 B1 32/8 heads kv16k",
                     sweep=True)
        torch.cuda.empty_cache()
        bench_decode(results, copy_bw, quick, hq=32, hkv=32, n=131072,
                     label="decode bf16 B1 32/32 heads kv128k")
    torch.cuda.empty_cache()
    if "window" in sections:
        bench_window(results, copy_bw, quick)
    torch.cuda.empty_cache()
    if "memory" in sections:
        bench_memory(results, quick)

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for row in results:
        row.update(device=device, date=stamp, torch=torch.__version__, triton=triton.__version__)

    table = [r for r in results if r["section"] != "decode-sweep"]
    width = max(len(r["metric"]) for r in table)
    print()
    print(f"{'metric':<{width}}  {'fxopt':>10}  {'peer':>10}  {'ratio':>6}  peer")
    for r in table:
        cells = f"{_fmt(r['fxopt']):>10}  {_fmt(r['peer']):>10}  {_fmt(r['ratio']):>6}"
        print(f"{r['metric']:<{width}}  {cells}  {r['peer_name']}")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {out_json}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run in seconds")
    parser.add_argument("--json", default=None, help="write the result rows to this file")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    run(args.json, quick=args.quick, sections=sections)


if __name__ == "__main__":
    main()
