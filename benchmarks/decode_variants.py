"""Flash-Decoding (codegen/flash_decoding.py) launch-parameter variants, back to back from a CUDA graph. One table.

    python benchmarks/decode_variants.py

bf16, batch 1, one new token, d128: 32 query / 8 KV heads over 4k and 16k keys. Each variant patches one field of
the cached launch plan (the L2 prefetch before the wait, the merge kernel's warps, the split count) and is timed
with triton.testing.do_bench_cudagraph in three interleaved rounds (median). Columns: microseconds per call and %
of the copy bandwidth measured in the same run. Where the defaults in flash_decoding.py come from.
"""

import statistics

import torch
from triton.testing import do_bench_cudagraph

from fxopt.codegen import flash_decoding as fd
from fxopt.hardware import measure_copy_bandwidth

ROUNDS = 3
# name -> (plan.meta changes, plan.merge_meta changes, num_splits)
VARIANTS = {
    "defaults": ({}, {}, None),
    "prefetch 64 keys": ({"PREFETCH_N": 64}, {}, None),
    "prefetch 128 keys": ({"PREFETCH_N": 128}, {}, None),
    "prefetch 256 keys": ({"PREFETCH_N": 256}, {}, None),
    "merge on 1 warp": ({}, {"num_warps": 1}, None),
    "merge on 4 warps": ({}, {"num_warps": 4}, None),
    "merge on 8 warps": ({}, {"num_warps": 8}, None),
    "16 splits": ({}, {}, 16),
    "66 splits": ({}, {}, 66),
}


def timer(q, k, v, kv_len, meta, merge_meta, splits):
    """A function timing decode_attention with the plan patched; checks the output against SDPA first."""
    group = q.shape[1] // k.shape[1]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1))

    def run() -> float:
        fd._PLANS.clear()
        call = lambda: fd.decode_attention(q, k, v, kv_len, num_splits=splits)  # noqa: E731
        call()
        (plan,) = fd._PLANS.values()
        plan.meta.update(meta)
        plan.merge_meta.update(merge_meta)
        err = (call().float() - ref).abs().max().item()
        assert err < 2e-2, err
        us = do_bench_cudagraph(call, rep=50, return_mode="median") * 1e3
        fd._PLANS.clear()
        return us

    return run


def main() -> None:
    copy_bw = measure_copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print(f"{'keys':>6}  {'variant':24}{'us':>8}{'% copy':>8}")
    for n in (4096, 16384):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        kv_len = torch.full((1,), n, dtype=torch.int32, device="cuda")
        nbytes = fd.decode_hbm_bytes(1, 32, 8, 1, n, 128, 2, num_splits=0)
        runs = {name: [] for name in VARIANTS}
        timers = {name: timer(q, k, v, kv_len, *spec) for name, spec in VARIANTS.items()}
        names = list(VARIANTS)
        for r in range(ROUNDS):  # rotated order, so drift lands on every variant
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name].append(timers[name]())
        for name in names:
            us = statistics.median(runs[name])
            print(f"{n:>6}  {name:24}{us:8.2f}{100 * nbytes / (us * 1e-6) / copy_bw:8.1f}")


if __name__ == "__main__":
    main()
