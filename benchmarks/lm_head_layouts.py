"""Which layout makes cuBLAS fast for a vocab-sized projection (N = 50257, unaligned)? One table.

    python benchmarks/lm_head_layouts.py
"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def main(m=8192, k=1024, n=50257, dtype=torch.bfloat16):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    n_pad = (n + 63) // 64 * 64
    w_pad = torch.cat([w, w.new_zeros(n_pad - n, k)])
    w_pad_t = w_pad.t().contiguous()  # (k, n_pad)
    cases = {
        "F.linear(x, W[n, k])": lambda: F.linear(x, w),
        "F.linear(x, W_pad[n_pad, k])[:, :n]": lambda: F.linear(x, w_pad)[:, :n],
        "x @ W_pad_t[k, n_pad] then [:, :n]": lambda: (x @ w_pad_t)[:, :n],
        "torch.mm(x, W_pad.t())": lambda: torch.mm(x, w_pad.t()),
    }
    flops = 2 * m * n * k
    for name, fn in cases.items():
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"{name:40s} {ms:8.3f} ms  {flops / ms / 1e9:8.1f} TFLOP/s")


if __name__ == "__main__":
    main()
