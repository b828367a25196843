"""The `fxopt` command line: annotate, bench, explain, generate, calibrate."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a models/ preset (gpt2-small, llama-1b-like, ...), "
        "package.module:factory, or hf:MODEL_TYPE[,key=value]",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument(
        "--hw", default="h100", help="a preset (a10, a100-40gb, a100-80gb, h100, h200) or 'calibrate'"
    )


def cmd_annotate(args: argparse.Namespace) -> int:
    from fxopt import report as render
    from fxopt.analyze import analyze

    analysis = analyze(args.model, batch=args.batch, seq=args.seq, hw=args.hw, dtype=DTYPES[args.dtype],
                       attention=not args.no_attention, fuse=not args.no_fusion)
    data = analysis.report
    print(render.format_table(data, max_rows=args.max_rows))
    print(render.format_rewrites(data))
    writers = [
        (args.json, render.write_json),
        (args.dot, render.write_dot),
        (args.svg, render.write_svg),
        (args.html, render.write_html),
    ]
    for path, write in writers:
        if path:
            try:
                write(data, path)
                print(f"wrote {path}", file=sys.stderr)
            except RuntimeError as exc:
                print(f"could not write {path}: {exc}", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fxopt.hardware import calibrate

    hw = calibrate()
    print(
        f"{hw.name}: copy bandwidth {hw.bandwidth / 1e9:.0f} GB/s, "
        f"bf16 matmul {hw.matmul_flops['bfloat16'] / 1e12:.0f} TFLOP/s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    annotate = sub.add_parser("annotate", help="print FLOPs, bytes, intensity and roofline bound per node")
    _add_model_args(annotate)
    annotate.add_argument("--json")
    annotate.add_argument("--dot")
    annotate.add_argument("--svg")
    annotate.add_argument("--html")
    annotate.add_argument("--max-rows", type=int, default=None, help="print at most this many node rows")
    annotate.add_argument("--no-attention", action="store_true", help="keep attention as captured (no rewrite)")
    annotate.add_argument("--no-fusion", action="store_true", help="do not outline fusion regions")
    annotate.set_defaults(func=cmd_annotate)

    from fxopt import bench, explain, generate

    bench.add_cli(sub)
    explain.add_cli(sub)
    generate.add_cli(sub)

    calibrate = sub.add_parser("calibrate", help="measure copy bandwidth and bf16 matmul rate on this GPU")
    calibrate.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
