"""The benchmarks' interleaved timing (every round visits all variants, each round starting one later) and the
decode profile's busy time."""

from fxopt.bench.fused import interleaved_runs


def test_rounds_rotate_the_order_and_time_each_variant_once_per_round():
    visits = []

    def time_one(fn):
        visits.append(fn())
        return float(len(visits))

    runs = interleaved_runs({"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}, 4, time_one)
    assert visits == list("abc" "bca" "cab" "abc")
    assert runs == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}


def _events(spec):
    """Fake profiler events: (device, name, start µs, end µs)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    kinds = {"cpu": DeviceType.CPU, "cuda": DeviceType.CUDA}
    return [SimpleNamespace(device_type=kinds[d], name=n, time_range=SimpleNamespace(start=a, end=b))
            for d, n, a, b in spec]


def test_busy_time_is_the_union_of_intervals():
    import random

    from fxopt.bench.timeline import busy_time

    rng = random.Random(0)
    for _ in range(50):
        intervals = [(a, a + rng.randint(0, 30)) for a in (rng.randint(0, 100) for _ in range(rng.randint(0, 8)))]
        covered = {t for a, b in intervals for t in range(a, b)}  # unit cells [t, t+1)
        assert busy_time(intervals) == len(covered)


def test_timeline_counts_launches_host_span_and_gpu_gaps():
    from fxopt.bench.timeline import summarize

    events = _events([
        ("cpu", "cudaLaunchKernel", 0, 4), ("cpu", "aten::mm", 0, 10), ("cpu", "cuLaunchKernelEx", 20, 23),
        ("cpu", "cuLaunchKernelEx", 40, 42),
        ("cuda", "sm90_xmma_gemm_bf16", 10, 30), ("cuda", "triton_fused_rms", 35, 45),
        ("cuda", "flash_prefill_fwd", 60, 70),
    ])
    t = summarize(events)
    assert (t.launches, t.kernels) == (3, 3)
    assert t.host_ms == 42 / 1e3 and t.host_us_per_launch == 14.0
    assert t.gpu_busy_ms == 40 / 1e3 and t.gpu_idle_ms == 20 / 1e3  # span 10..70, gaps 30-35 and 45-60
    assert t.families_ms == {"matmul": 0.02, "triton": 0.01, "attention": 0.01}


def test_decode_profile_busy_time_is_the_union_of_kernel_intervals():
    """Overlapping kernels count once; the gap between them is idle. Against the intervals summed by hand."""
    from types import SimpleNamespace

    from fxopt.bench.profile_decode import _busy_and_span

    def event(start, end):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end))

    events = [event(10, 20), event(15, 25), event(40, 50), event(41, 42)]  # [10, 25] and [40, 50]
    assert _busy_and_span(events) == ((25 - 10) + (50 - 40), 50 - 10)
    assert _busy_and_span([]) == (0.0, 0.0)
