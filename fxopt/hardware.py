"""GPU specs for the roofline: datasheet presets and on-device calibration.

A `Hardware` holds the two ceilings of the roofline model: peak arithmetic
rate per dtype and memory bandwidth. The ridge point (FLOP per byte) where a
kernel turns from memory- to compute-bound is their ratio.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from triton.testing import do_bench

TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class Hardware:
    """Peak rates (FLOP/s) per dtype for matrix units and vector units, and HBM bandwidth (bytes/s)."""

    name: str
    bandwidth: float
    matmul_flops: dict[str, float] = field(default_factory=dict)
    vector_flops: dict[str, float] = field(default_factory=dict)
    source: str = "datasheet"
    sm_count: int = 132  # streaming multiprocessors: how many programs one wave of a launch runs
    interconnect: float = 0.0  # bytes/s one GPU sends to its peers (NVLink or PCIe, one direction); 0: unknown
    shared_memory: int = 227 * 1024  # bytes of shared memory one block may opt in to

    def link_time(self, nbytes: float) -> float:
        """Seconds to send nbytes over the interconnect (inf when its bandwidth is unknown)."""
        if not nbytes:
            return 0.0
        return nbytes / self.interconnect if self.interconnect else float("inf")

    def peak(self, dtype: torch.dtype | str, *, matmul: bool = True) -> float:
        key = dtype_key(dtype)
        table = self.matmul_flops if matmul else self.vector_flops
        return table.get(key, table["float32"])

    def ridge(self, dtype: torch.dtype | str = "float16", *, matmul: bool = True) -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute-bound."""
        return self.peak(dtype, matmul=matmul) / self.bandwidth

    def predicted_time(self, flops: float, nbytes: float, dtype, *, matmul: bool) -> float:
        """Roofline time in seconds: the larger of compute time and memory time."""
        return max(flops / self.peak(dtype, matmul=matmul), nbytes / self.bandwidth)

    def bound(self, flops: float, nbytes: float, dtype, *, matmul: bool) -> str:
        if flops == 0 and nbytes == 0:
            return "free"
        compute = flops / self.peak(dtype, matmul=matmul)
        memory = nbytes / self.bandwidth
        return "compute" if compute > memory else "memory"


def dtype_key(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "half": "float16"}.get(dtype, dtype)


def _spec(name, bandwidth_gbs, *, sms, link_gbs, smem_kib, fp16, bf16, tf32, fp32, vec16, fp8=None) -> Hardware:
    matmul = {"float16": fp16 * TERA, "bfloat16": bf16 * TERA, "float32": tf32 * TERA, "float64": fp32 / 2 * TERA}
    if fp8:
        matmul["float8_e4m3fn"] = matmul["float8_e5m2"] = fp8 * TERA
    vector = {"float16": vec16 * TERA, "bfloat16": vec16 * TERA, "float32": fp32 * TERA, "float64": fp32 / 2 * TERA}
    return Hardware(name, bandwidth_gbs * GIGA, matmul, vector, sm_count=sms, interconnect=link_gbs * GIGA,
                    shared_memory=smem_kib * 1024)


# Dense (no sparsity) datasheet figures. matmul float32 is the TF32 tensor-core rate. link_gbs: what one GPU
# sends per second, one direction: NVLink 4 (H100/H200 SXM) 900 GB/s both ways, NVLink 3 (A100 SXM) 600, PCIe 4 x16
# (A10) 32. smem_kib: the opt-in shared memory per block (sm_86 99 KiB, sm_80 163, sm_90 227).
PRESETS: dict[str, Hardware] = {
    "a10": _spec("A10", 600, sms=72, link_gbs=32, smem_kib=99,
                 fp16=125, bf16=125, tf32=62.5, fp32=31.2, vec16=31.2),
    "a100-40gb": _spec("A100 40GB SXM", 1555, sms=108, link_gbs=300, smem_kib=163,
                       fp16=312, bf16=312, tf32=156, fp32=19.5, vec16=78),
    "a100-80gb": _spec("A100 80GB SXM", 2039, sms=108, link_gbs=300, smem_kib=163,
                       fp16=312, bf16=312, tf32=156, fp32=19.5, vec16=78),
    "h100": _spec("H100 SXM", 3350, sms=132, link_gbs=450, smem_kib=227,
                  fp16=989.4, bf16=989.4, tf32=494.7, fp32=66.9, vec16=133.8, fp8=1978.9),
    "h200": _spec("H200", 4800, sms=132, link_gbs=450, smem_kib=227,
                  fp16=989.4, bf16=989.4, tf32=494.7, fp32=66.9, vec16=133.8, fp8=1978.9),
}
ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "h100sxm": "h100"}


def get_hardware(name: str | Hardware | None) -> Hardware:
    """Look up a preset by name ("h100", "a100-80gb", ...), or "calibrate" to measure the present GPU."""
    if isinstance(name, Hardware):
        return name
    if name is None:
        return PRESETS["h100"]
    key = name.lower().replace("_", "-")
    if key == "calibrate":
        return calibrate()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown hardware {name!r}; choose one of {sorted(PRESETS)} or 'calibrate'")
    return PRESETS[key]


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str | None = None) -> int:
    """The SMs of a CUDA device (read once per device); without one, the default preset's (an H100's), so
    launch shapes chosen on CPU (the interpreter, tests) are those of the usual target."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return get_hardware(None).sm_count


def measure_copy_bandwidth(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""

    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def measure_matmul_rate(n: int = 8192, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> float:
    """Dense matmul rate in FLOP/s on random (never zero) operands."""

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def measure_all_reduce_bandwidth(group, nbytes: int | None = None, rounds: int = 20) -> float:
    """Bytes/s each rank of `group` sends during a ring all-reduce (nccl-tests' "bus bandwidth": 2(N-1)/N of
    the tensor per call / time), timed on this rank's device: CUDA for NCCL, CPU for gloo. The median of
    `rounds` calls after a warm-up, each between barriers; every rank must call it."""
    world = dist.get_world_size(group)
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    nbytes = nbytes or ((256 << 20) if on_gpu else (4 << 20))
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    times = []
    for i in range(rounds + 3):  # 3 warm-up calls (NCCL sets up its rings on the first)
        dist.barrier(group)
        sync()
        start = time.perf_counter()
        dist.all_reduce(x, group=group)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return 2 * (world - 1) / world * x.numel() * x.element_size() / median


def calibrate(base: str = "h100") -> Hardware:
    """Measure copy bandwidth and bf16 matmul rate on the present GPU; other rates scale from `base`."""
    if not torch.cuda.is_available():
        raise RuntimeError("calibrate needs a CUDA GPU; use a preset (--hw h100) on this machine")
    reference = PRESETS[base]
    bandwidth = measure_copy_bandwidth()
    bf16 = measure_matmul_rate()
    scale = bf16 / reference.matmul_flops["bfloat16"]
    matmul = {k: v * scale for k, v in reference.matmul_flops.items()}
    matmul["bfloat16"] = bf16
    name = f"{torch.cuda.get_device_name()} (calibrated)"
    return replace(reference, name=name, bandwidth=bandwidth, matmul_flops=matmul, source="measured")
