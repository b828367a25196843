"""Flash-Decoding (codegen/flash_decoding.py) launch-parameter variants, back to back from a CUDA graph. One table.

    python benchmarks/decode_variants.py

bf16, batch 1, one new token, d128: 32 query / 8 KV heads over 1k, 4k and 16k keys. Each variant patches the cached
launch plan (how whole key tiles are loaded and their size, the L2 prefetch before the wait, how the merge kernel
splits its work, the split count) and is timed with triton.testing.do_bench_cudagraph in three interleaved rounds
(median). Columns: microseconds per call and % of the copy bandwidth measured in the same run. Where the defaults in
flash_decoding.py come from.
"""

import statistics

import torch
from triton.testing import do_bench_cudagraph

from fxopt.codegen import flash_decoding as fd
from fxopt.hardware import measure_copy_bandwidth

ROUNDS = 3


def tiles(block_n, stages, tma):
    """Whole key tiles of block_n keys, `stages` deep, by TMA descriptors or by pointer loads."""
    def patch(plan):
        plan.meta.update(BLOCK_N=block_n, num_stages=stages, TMA=tma, num_warps=4)
        plan.tma_tile = (block_n, plan.meta["BLOCK_D"]) if tma else None
        plan.descriptors = None
    return patch


def merge(slice_d, warps):
    """One merge program per slice_d head dims of a row, on `warps` warps."""
    def patch(plan):
        plan.merge_meta.update(SLICE=slice_d, num_warps=warps)
        plan.merge_grid = (plan.merge_grid[0], plan.merge_meta["BLOCK_D"] // slice_d)
    return patch


def meta(**changes):
    return lambda plan: plan.meta.update(changes)


# name -> (plan patch, num_splits); a tile patch keeps the chunk the default tile gave (a multiple of 64 keys)
VARIANTS = {
    "defaults": (None, None),
    "pointer loads, 64-key tiles": (tiles(64, 3, False), None),
    "TMA, 64-key tiles x3": (tiles(64, 3, True), None),
    "TMA, 128-key tiles x3": (tiles(128, 3, True), None),
    "TMA, 128-key tiles x2": (tiles(128, 2, True), None),
    "prefetch 64 keys": (meta(PREFETCH_N=64), None),
    "merge: row per program, 2 warps": (merge(128, 2), None),
    "merge: 64 dims per program": (merge(64, 1), None),
    "merge: 32 dims, 2 warps": (merge(32, 2), None),
    "16 splits": (None, 16),
    "66 splits": (None, 66),
}


def timer(q, k, v, kv_len, patch, splits):
    """A function timing decode_attention with the plan patched; checks the output against SDPA first."""
    group = q.shape[1] // k.shape[1]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1))

    def run() -> float:
        fd._PLANS.clear()
        call = lambda: fd.decode_attention(q, k, v, kv_len, num_splits=splits)  # noqa: E731
        call()
        (plan,) = fd._PLANS.values()
        if patch is not None:
            patch(plan)
        err = (call().float() - ref).abs().max().item()
        assert err < 2e-2, err
        us = do_bench_cudagraph(call, rep=50, return_mode="median") * 1e3
        fd._PLANS.clear()
        return us

    return run


def main() -> None:
    copy_bw = measure_copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print(f"{'keys':>6}  {'variant':34}{'us':>8}{'% copy':>8}")
    for n in (1024, 4096, 16384):
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
            print(f"{n:>6}  {name:34}{us:8.2f}{100 * nbytes / (us * 1e-6) / copy_bw:8.1f}")


if __name__ == "__main__":
    main()
