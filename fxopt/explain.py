"""`fxopt explain`: which attention-like subgraphs the attention pass rewrote, and why not the others.

An attention-like site is every softmax whose input comes from a matmul (within a few ops) and
every ``scaled_dot_product_attention`` call. For each, the explanation says whether the attention
pass turned it into one fxopt attention call (with the kernel it will run and the mask it saw)
or why it did not ("scale is a runtime tensor", "softmax not over the last dim", "no matmul with
v after softmax", ...). A site that was rewritten but runs the SDPA fallback says why too
("mask is neither causal nor padding", an unsupported dtype, ...).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from fxopt import zoo
from fxopt.capture import capture
from fxopt.passes.attention import AttentionInfo
from fxopt.pipeline import EXPLAIN, make_context, run_passes


@dataclass(frozen=True)
class Candidate:
    """One attention-like site and what the attention pass made of it."""

    node: str  # the softmax or sdpa node in the captured graph
    module: str  # where it was traced ("blocks.3.attn.core")
    kind: str  # softmax | sdpa
    matched: bool  # rewritten into one fxopt attention call
    pattern: str | None  # the PATTERNS entry that matched
    kernel: str | None  # flash_prefill | flash_decode | sdpa (matched sites)
    reason: str  # why not matched, or why the SDPA fallback runs; "" when neither
    info: AttentionInfo | None = None

    @property
    def where(self) -> str:
        return self.module or self.node


def explain(model: torch.nn.Module, example_kwargs: dict[str, Any], *, dynamic_dims=None, hw=None,
            sizes: dict[str, int] | None = None) -> list[Candidate]:
    """Capture `model`, run the cost and attention passes, and list every attention-like site."""
    captured = capture(model, example_kwargs, dynamic_dims)
    program = run_passes(captured, make_context(captured, hw, sizes, {"attention": True}), EXPLAIN,
                         program="explain")
    candidates = []
    for record in program.results["attention"].attention_sites:
        info = record["info"]
        candidates.append(Candidate(
            node=record["node"],
            module=record["module"],
            kind=record["kind"],
            matched=record["matched"],
            pattern=record["pattern"],
            kernel=info.kernel if info else None,
            reason=_reason(record),
            info=info,
        ))
    return candidates


def _reason(record: dict) -> str:
    info: AttentionInfo | None = record["info"]
    if info is None:
        return record["reason"]
    if info.kernel != "sdpa":
        return ""
    reason = info.fallback_reason
    mask_reason = record["reason"] if info.mask_kind == "general" else ""
    if mask_reason and mask_reason not in reason:
        reason = f"{mask_reason}; {reason}" if reason else mask_reason
    return reason


def format_explanation(candidates: list[Candidate], *, title: str | None = None) -> str:
    """A readable summary: one line per site, unmatched and fallback sites first."""
    lines = [title] if title else []
    if not candidates:
        lines.append("no attention-like subgraphs (no softmax fed by a matmul, no scaled_dot_product_attention)")
        return "\n".join(lines)
    matched = [c for c in candidates if c.matched]
    flash = [c for c in matched if c.kernel != "sdpa"]
    lines.append(f"{len(candidates)} attention-like site(s): {len(matched)} rewritten to fxopt attention "
                 f"({len(flash)} on the flash kernels, {len(matched) - len(flash)} on the SDPA fallback), "
                 f"{len(candidates) - len(matched)} not rewritten")
    order = sorted(candidates, key=lambda c: (c.matched, c.kernel != "sdpa"))
    for c in order:
        if not c.matched:
            lines.append(f"  NOT REWRITTEN  {c.where} ({c.kind} {c.node}): {c.reason}")
            continue
        info = c.info
        mask = info.mask_kind if info else "?"
        detail = f"pattern={c.pattern} mask={mask}"
        if info:
            detail += f" causal={info.causal} scale={info.scale:.6g} gqa={info.gqa_groups}"
        status = "SDPA FALLBACK" if c.kernel == "sdpa" else f"{c.kernel.upper()}"
        line = f"  {status:<14} {c.where} ({c.kind} {c.node}): {detail}"
        if c.reason:
            line += f" -- {c.reason}"
        lines.append(line)
    return "\n".join(lines)


def cmd_explain(args: argparse.Namespace) -> int:

    model = zoo.load_model(args.model)
    example_kwargs = zoo.example_inputs(model, 2, 16)
    candidates = explain(model, example_kwargs, sizes={"seq": args.seq, "batch": args.batch, "src_seq": args.seq})
    print(format_explanation(candidates, title=f"attention in {args.model}"))
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `fxopt explain MODEL` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "explain", help="list attention-like subgraphs and why each was or was not rewritten")
    parser.add_argument("model", help="a models/ preset (gpt2-small, llama-1b-like, ...), "
                                      "package.module:factory, or hf:MODEL_TYPE[,key=value]")
    parser.add_argument("--batch", type=int, default=1, help="batch size the kernel choice is made at")
    parser.add_argument("--seq", type=int, default=128, help="sequence length the kernel choice is made at")
    parser.set_defaults(func=cmd_explain)
    return parser
