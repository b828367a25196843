"""Where a forward's time goes, from the profiler's timeline: the host's share (launch calls) and the GPU's.

A kernel suite run under CUDA graphs never shows host overhead; a whole model launched kernel by kernel
does. For one call of a function this reads the torch.profiler trace (CPU and CUDA activities) and reports

  * launches: the host's kernel-launch API calls (cudaLaunchKernel, cuLaunchKernel(Ex), cudaGraphLaunch, ...);
  * host µs per launch: the host's span from its first to its last launch call over their count — the
    Python launcher, argument handling and descriptor encoding included, which is what a launch costs;
  * GPU busy: the union of the device's kernel, copy and memset intervals; GPU idle: the rest of the span
    from the first device activity to the last (the gaps the host leaves between kernels);
  * GPU time per kernel family (matmul, attention, generated Triton, other).

The profiler adds about a microsecond to each launch for every peer alike: compare peers timed here, and
take absolute times from the interleaved timings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

#: The host API calls that put work on a stream.
LAUNCH_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
    "cudaLaunchCooperativeKernel", "cudaMemcpyAsync", "cudaMemsetAsync",
})

#: Kernel families by name (first match wins); anything else is "other".
FAMILIES = (
    ("attention", re.compile(r"flash|fmha|attention|attn|decoding", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|matmul|_mm_|splitk", re.I)),
    ("triton", re.compile(r"^triton_|^fused_|^fx_|_kernel$", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|fill|cat", re.I)),
)


@dataclass
class Timeline:
    launches: int
    host_ms: float  # first to last launch call
    gpu_busy_ms: float
    gpu_idle_ms: float
    kernels: int
    families_ms: dict[str, float] = field(default_factory=dict)

    @property
    def host_us_per_launch(self) -> float:
        return self.host_ms * 1e3 / max(self.launches, 1)

    def row(self) -> dict:
        return {"launches": self.launches, "kernels": self.kernels, "host_us_per_launch": self.host_us_per_launch,
                "host_ms": self.host_ms, "gpu_busy_ms": self.gpu_busy_ms, "gpu_idle_ms": self.gpu_idle_ms,
                **{f"{name}_ms": ms for name, ms in self.families_ms.items()}}


def family(kernel_name: str) -> str:
    return next((name for name, pattern in FAMILIES if pattern.search(kernel_name)), "other")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def summarize(events) -> Timeline:
    """A Timeline from profiler FunctionEvents (times in µs)."""
    launches = sorted((e.time_range.start, e.time_range.end) for e in events
                      if e.device_type == DeviceType.CPU and e.name in LAUNCH_CALLS)
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in device]
    busy = busy_time(spans)
    whole = (max(s[1] for s in spans) - min(s[0] for s in spans)) if spans else 0.0
    families: dict[str, float] = {}
    for e in device:
        name = family(e.name)
        families[name] = families.get(name, 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    host = (launches[-1][1] - launches[0][0]) if launches else 0.0
    return Timeline(launches=len(launches), host_ms=host / 1e3, gpu_busy_ms=busy / 1e3,
                    gpu_idle_ms=(whole - busy) / 1e3, kernels=len(device), families_ms=families)


def launch_timeline(fn) -> Timeline:
    """The Timeline of one call of fn (after one warm call), on the current CUDA device."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return summarize(prof.events())


def format_timelines(timelines: dict[str, Timeline]) -> str:
    """One row per variant: launches, host µs per launch, GPU busy and idle, GPU ms per kernel family."""
    names = sorted({k for t in timelines.values() for k in t.families_ms})
    head = ["variant", "launches", "host µs/launch", "host ms", "GPU busy ms", "GPU idle ms", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, t in timelines.items():
        cells = [variant, str(t.launches), f"{t.host_us_per_launch:.1f}", f"{t.host_ms:.2f}", f"{t.gpu_busy_ms:.2f}",
                 f"{t.gpu_idle_ms:.2f}", *(f"{t.families_ms.get(n, 0.0):.2f}" for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
