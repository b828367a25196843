"""FlashAttention prefill (codegen/flash_attention.py): every candidate tile, K/V by pointer loads and by TMA
descriptors, beside SDPA's FLASH and cuDNN backends. One table.

    python benchmarks/prefill_tiles.py [--d 128]

bf16 B4 H32 N4096, causal and not; triton.testing.do_bench medians, TFLOP/s. The TMA rows need Hopper or later.
Where the tile tables (_TILES, _TILES_TMA) and their first (untuned default) entries come from.
"""

import argparse
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from fxopt.codegen import flash_attention as fa


def tflops(fn, flops) -> float:
    return flops / (do_bench(fn, warmup=25, rep=100) * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    b, h, n, d = 4, 32, 4096, args.d
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    block_d = fa._block_d(d)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    modes = [("pointer", False, fa._TILES[block_d])] + ([("tma", True, fa._TILES_TMA[block_d])] if hopper else [])
    print(f"{torch.cuda.get_device_name()}, bf16 B{b} H{h} N{n} d{d}, TFLOP/s")
    print(f"{'loads':8}{'tile (M, N, warps, stages)':30}{'non-causal':>12}{'causal':>10}")
    for name, backend in (("FLASH", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
        rates = []
        for causal in (False, True):
            with sdpa_kernel(backend):
                sdpa = partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=causal)
                rates.append(tflops(sdpa, fa.attention_flops(b, h, n, n, d, causal)))
        print(f"{'sdpa':8}{name:30}{rates[0]:12.1f}{rates[1]:10.1f}", flush=True)
    rows = {}
    for mode, tma, tiles in modes:
        for tile in tiles:
            for causal in (False, True):
                flops = fa.attention_flops(b, h, n, n, d, causal)
                run = partial(fa._launch, q, k, v, causal=causal, scale=None, key_padding_mask=None, q_offset=0,
                              kv_len=None, tile=tile, tma=tma)
                try:
                    ref = fa.attention_reference(q[:1, :2], k[:1, :2], v[:1, :2], causal=causal)
                    err = (run()[:1, :2].float() - ref.float()).abs().max().item()
                    assert err < 5e-2, err
                    rows[(mode, tile, causal)] = f"{tflops(run, flops):.1f}"
                except Exception as exc:  # noqa: BLE001  (a tile that does not fit this GPU)
                    rows[(mode, tile, causal)] = type(exc).__name__
            print(f"{mode:8}{str(tile):30}{rows[(mode, tile, False)]:>12}{rows[(mode, tile, True)]:>10}", flush=True)


if __name__ == "__main__":
    main()
