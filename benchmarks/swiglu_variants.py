"""Hand-written SwiGLU kernels against torch.compile's and fxopt's generated one, (8192, 4096) bf16. One table.

    python benchmarks/swiglu_variants.py

The fused-chain suite finds fxopt's SwiGLU and torch.compile's at a tie at copy speed. This sweeps what a
pointwise kernel can still change (elements per program, warps, evict-first loads, streaming stores) to see
whether any layout beats torch.compile's kernel. Timed like the suite (do_bench with an L2 flush, median of
three interleaved rounds).
"""

import statistics

import torch
import triton
import triton.language as tl

from fxopt.bench.fused import _time, swiglu
from fxopt.codegen.fused import compile_region, region_from_fn

ROUNDS = 3
LAYOUTS = [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)]  # (elements per program, warps)


@triton.jit
def swiglu_kernel(A, B, O, numel, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr, STREAM_STORE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    policy: tl.constexpr = "evict_first" if EVICT_FIRST else ""
    a = tl.load(A + offs, mask=mask, other=0, eviction_policy=policy).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0, eviction_policy=policy).to(tl.float32)
    y = (a * tl.sigmoid(a) * b).to(tl.bfloat16)
    tl.store(O + offs, y, mask=mask, cache_modifier=".cs" if STREAM_STORE else "")


def main() -> None:
    a, b = (torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref = swiglu(a, b)
    out = torch.empty_like(a)
    compiled = torch.compile(swiglu)
    generated = compile_region(region_from_fn(swiglu, a, b), "swiglu_variants")
    timers = {"torch.compile": lambda: _time(compiled, (a, b)), "fxopt generated": lambda: _time(generated, (a, b))}
    for block, warps in LAYOUTS:
        for evict, stream in ((False, False), (True, False), (False, True), (True, True)):
            def launch(block=block, warps=warps, evict=evict, stream=stream):
                swiglu_kernel[(triton.cdiv(a.numel(), block),)](a, b, out, a.numel(), BLOCK=block, EVICT_FIRST=evict,
                                                                 STREAM_STORE=stream, num_warps=warps)
            launch()
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
            timers[f"{block} x {warps}w evict={int(evict)} cs={int(stream)}"] = (
                lambda launch=launch: _time(lambda: launch(), ()))
    runs = {name: [] for name in timers}
    names = list(timers)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(timers[name]())
    base = statistics.median(runs["torch.compile"])
    print(f"{torch.cuda.get_device_name()}: SwiGLU (8192, 4096) bf16")
    print(f"{'kernel':32}{'us':>8}{'x compile':>11}")
    for name in names:
        ms = statistics.median(runs[name])
        print(f"{name:32}{ms * 1e3:8.2f}{base / ms:11.3f}")


if __name__ == "__main__":
    main()
