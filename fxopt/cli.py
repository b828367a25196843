"""The `fxopt` command line: annotate, bench, explain, generate, calibrate.

A mistake in the command (an unknown model, hardware or dtype, a size the model cannot take, a GPU-only
command without a GPU, an output file that cannot be written) exits 2 with `fxopt: error: ...` on stderr;
--debug (or FXOPT_DEBUG=1) shows the traceback instead. Progress goes to stderr; --quiet turns it off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shutil
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from fxopt import explain, generate, progress, zoo
from fxopt import report as render
from fxopt.analyze import analyze
from fxopt.bench import forward as bench
from fxopt.cli_args import (  # noqa: F401  (the shared argument vocabulary and parser, re-exported)
    DTYPES,
    HW_HELP,
    MODEL_HELP,
    HelpFormatter,
    Parser,
    add_common_flags,
    default_seq,
    guarded,
    nonnegative_int,
    positive_float,
    positive_int,
    report_error,
    resolve_hw,
)
from fxopt.errors import UserError, check_output, debug_enabled, require_cuda, require_positive
from fxopt.hardware import calibrate, measure_all_reduce_bandwidth
from fxopt.passes.tensor_parallel import ShardingError

ANNOTATE_SEQ = 128


# ---------------------------------------------------------------------------------------------------
# argparse: one-line errors, defaults in --help, argument types
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Checks shared by the subcommands (all before any capture)
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# annotate, calibrate
# ---------------------------------------------------------------------------------------------------


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size the costs are evaluated at")
    parser.add_argument("--seq", type=positive_int, default=None,
                        help=f"sequence length the costs are evaluated at (default: {ANNOTATE_SEQ}, or the "
                             "model's position limit if smaller)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weights and activations")
    parser.add_argument("--hw", default="h100", help=HW_HELP)


def cmd_annotate(args: argparse.Namespace) -> int:

    outputs = [("--json", args.json, render.write_json), ("--dot", args.dot, render.write_dot),
               ("--svg", args.svg, render.write_svg), ("--html", args.html, render.write_html)]
    for flag, path, _ in outputs:
        if path:
            check_output(path, flag)
    if args.svg and shutil.which("dot") is None:
        raise UserError("--svg needs Graphviz's `dot` program, which is not installed",
                        "install graphviz (apt-get install graphviz / brew install graphviz), "
                        "or write the DOT source with --dot FILE")
    hw = resolve_hw(args.hw)
    if args.link_gbs is not None:
        hw = dataclasses.replace(hw, interconnect=args.link_gbs * 1e9, source=f"{hw.source}, interconnect given")
    dtype = DTYPES[args.dtype]
    model = zoo.load_model(args.model, device="meta", dtype=dtype)
    seq = args.seq if args.seq is not None else default_seq(model, ANNOTATE_SEQ)
    zoo.check_sizes(model, args.model, batch=args.batch, seq=seq)
    try:
        analysis = analyze(model, name=args.model, batch=args.batch, seq=seq, hw=hw, dtype=dtype,
                           attention=not args.no_attention, fuse=not args.no_fusion, tensor_parallel=args.tp)
    except ShardingError as exc:
        raise UserError(f"{args.model} cannot be sharded over {args.tp} GPUs: {exc}",
                        "choose a --tp that divides the attention heads, the MLP width and the vocabulary") from None
    data = analysis.report
    print(render.format_table(data, max_rows=args.max_rows, all_nodes=args.all_nodes))
    print(render.format_rewrites(data))
    failed: list[UserError] = []
    for flag, path, write in outputs:
        if not path:
            continue
        try:
            write(data, path)
            print(f"wrote {path}", file=sys.stderr)
        except render.GraphvizNotFoundError:
            failed.append(UserError("--svg needs Graphviz's `dot` program, which is not installed",
                                    "install graphviz, or write the DOT source with --dot FILE"))
        except (OSError, RuntimeError) as exc:
            failed.append(UserError(f"could not write {flag} {path}: {str(exc).splitlines()[0]}",
                                    "choose a path in a writable directory"))
    if failed:
        raise failed[0]
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:

    require_cuda("fxopt calibrate", "on this machine use a datasheet preset instead: --hw h100 (or a10, "
                                    "a100-80gb, h200)")
    if args.tp > 1:
        return _calibrate_interconnect(args.tp)
    with progress.stage("measuring copy bandwidth and bf16 matmul rate"):
        hw = calibrate()
    print(
        f"{hw.name}: copy bandwidth {hw.bandwidth / 1e9:.0f} GB/s, "
        f"bf16 matmul {hw.matmul_flops['bfloat16'] / 1e12:.0f} TFLOP/s"
    )
    return 0


def _calibrate_interconnect(world_size: int) -> int:
    """`fxopt calibrate --tp N` under torchrun: the all-reduce bus bandwidth between the N GPUs (NCCL)."""
    how = f"run it as: torchrun --nproc-per-node {world_size} -m fxopt.cli calibrate --tp {world_size}"
    try:
        dist.init_process_group("nccl")  # torchrun's rank, world size and rendezvous address
    except ValueError:  # not launched by torchrun: no rank to rendezvous with
        raise UserError(f"--tp {world_size} needs {world_size} processes, one per GPU", how) from None
    try:
        if dist.get_world_size() != world_size:
            raise UserError(f"--tp {world_size}, but torchrun started {dist.get_world_size()} processes", how)
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
        link = measure_all_reduce_bandwidth(dist.group.WORLD)
        if dist.get_rank() == 0:
            print(f"{torch.cuda.get_device_name()} x {world_size}: all-reduce bus bandwidth {link / 1e9:.0f} GB/s "
                  f"(pass it to `fxopt annotate --tp {world_size} --link-gbs {link / 1e9:.0f}`)")
    finally:
        dist.destroy_process_group()
    return 0


def _checked_explain(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """explain's own command, after the size checks every subcommand makes."""

    def run(args: argparse.Namespace) -> int:

        require_positive("--batch", getattr(args, "batch", None))
        require_positive("--seq", getattr(args, "seq", None))
        limit = zoo.spec_position_limit(args.model)
        if limit is not None and getattr(args, "seq", None) and args.seq > limit:
            raise UserError(f"--seq {args.seq} is past {args.model}'s position table ({limit} positions)",
                            f"use --seq {limit} or less")
        out = io.StringIO()  # printed after the progress line is closed
        try:
            with progress.stage(f"capturing {args.model} and matching its attention"), \
                    contextlib.redirect_stdout(out):
                return func(args)
        finally:
            sys.stdout.write(out.getvalue())

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fxopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)

    annotate = sub.add_parser("annotate", help="print FLOPs, bytes, intensity and roofline bound per node",
                              description="Per-node FLOPs, bytes, arithmetic intensity and roofline bound at "
                                          "the given sizes (the model is built on the meta device: no weights).")
    _add_model_args(annotate)
    annotate.add_argument("--json", metavar="PATH", help="write the report as JSON")
    annotate.add_argument("--dot", metavar="PATH", help="write the annotated graph as Graphviz DOT source")
    annotate.add_argument("--svg", metavar="PATH", help="render the annotated graph to SVG (needs Graphviz)")
    annotate.add_argument("--html", metavar="PATH", help="write a self-contained HTML report with the roofline")
    annotate.add_argument("--max-rows", type=nonnegative_int, default=None,
                          help="print at most this many node rows (default: all)")
    annotate.add_argument("--all-nodes", action="store_true",
                          help="also list bookkeeping nodes (size reads, getitem, export's guards)")
    annotate.add_argument("--no-attention", action="store_true", help="keep attention as captured (no rewrite)")
    annotate.add_argument("--no-fusion", action="store_true", help="do not outline fusion regions")
    annotate.add_argument("--tp", type=positive_int, default=1, metavar="N",
                          help="costs of one GPU of N running the model tensor-parallel (rank 0's shard), with "
                               "the all-reduce bytes per layer priced on the --hw interconnect")
    annotate.add_argument("--link-gbs", type=positive_float, default=None, metavar="GB/S",
                          help="the interconnect bandwidth for --tp (one GPU, one direction; default: the --hw "
                               "preset's; `fxopt calibrate --tp N` measures it)")
    annotate.set_defaults(func=cmd_annotate)


    bench.add_cli(sub)
    explain.add_cli(sub)
    generate.add_cli(sub)
    sub.choices["explain"].set_defaults(func=_checked_explain(explain.cmd_explain))

    calibrate = sub.add_parser("calibrate", help="measure copy bandwidth and bf16 matmul rate on this GPU")
    calibrate.add_argument("--tp", type=positive_int, default=1, metavar="N",
                           help="instead, the all-reduce bandwidth between N GPUs (run under torchrun)")
    calibrate.set_defaults(func=cmd_calibrate)
    for subparser in sub.choices.values():
        add_common_flags(subparser)
    return parser


# ---------------------------------------------------------------------------------------------------
# main: the one place errors become exit codes
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled() or "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as err:
        if debug:
            raise
        return report_error(err)
    progress.configure(enabled=not args.quiet)
    try:
        return guarded(lambda: args.func(args), debug=args.debug, model=lambda: getattr(args, "model", None))
    finally:
        progress.configure(enabled=None)  # back to the library default (in-process callers, tests)


if __name__ == "__main__":
    sys.exit(main())
