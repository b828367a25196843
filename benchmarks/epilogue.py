"""The bias + GELU(tanh) epilogue (codegen/epilogue.py) against linear then GELU, on the GPU. One table.

    python benchmarks/epilogue.py

Shapes: GPT-2 medium's MLP up-projection at batch 8 x seq 1024 and at 1 x 128, bf16; triton.testing.do_bench
medians, the two variants timed alternately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing

import fxopt.codegen.epilogue  # noqa: F401  (registers torch.ops.fxopt.linear_gelu_tanh)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: bias + GELU(tanh) epilogue, bf16, median ms")
    print("| rows x K -> N | linear, then GELU | linear_gelu_tanh | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for rows, k, n in ((8192, 1024, 4096), (128, 1024, 4096)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        two = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
        one = lambda: torch.ops.fxopt.linear_gelu_tanh(x, w, b)  # noqa: E731
        times = {"two": [], "one": []}
        for _ in range(3):
            times["two"].append(triton.testing.do_bench(two))
            times["one"].append(triton.testing.do_bench(one))
        t2, t1 = (sorted(v)[1] for v in (times["two"], times["one"]))
        print(f"| {rows} x {k} -> {n} | {t2:.4f} | {t1:.4f} | {t2 / t1:.2f}x |")


if __name__ == "__main__":
    main()
