"""The real-architecture grid (tests/models/hf_grid.py) as one Markdown table, for the README.

    python benchmarks/hf_grid_table.py                    # every case, CPU, fp32
    python benchmarks/hf_grid_table.py --only llama,gpt2  # some architectures
    FXOPT_GRID_DEVICE=cuda python benchmarks/hf_grid_table.py   # on a GPU: the Triton kernels run

One row per architecture and attention implementation (HF "eager" / "sdpa"; nanoGPT `flash` off / on):

* attention: how many of the layers' attention sites became fxopt attention nodes, and which kernel and
  mask kind each node got (node.meta["fxopt.attention"], an AttentionInfo);
* fallback: attention sites run through the SDPA fallback, and those not rewritten at all, with the
  pass's reason (fast.program.results["attention"].notes);
* KV cache: whether fxopt.optimize(..., kv_cache=True) accepted the model, else its refusal;
* logits: fast(input_ids) vs the eager model at lengths 16, 24, 40: worst max|diff| / max|eager|;
* greedy: KV-cached greedy generation identical to HF generate (batch 1 and left-padded batch 2) and to a
  full-recompute argmax loop, or the first difference.

The same checks as tests/models/test_hf_grid.py, from the same helpers. Combinations HF does not offer are
listed under the table, not as rows. On CPU, fused regions run as their PyTorch reference (not the Triton
interpreter, which is far too slow for a whole grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))

import hf_grid as grid  # noqa: E402
import torch  # noqa: E402


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fallback_reason(note: str) -> str:
    """'model.layers.0.self_attn: SDPA fallback: general additive mask' -> 'layers.0.self_attn: general ...'."""
    where, _, why = note.partition(": SDPA fallback: ")
    if not why:
        where, _, why = note.partition(": attention-like ")
        if not why:
            return note
        why = "not rewritten: " + why.split("not rewritten: ", 1)[-1]
    for prefix in ("model.", "transformer.", "gpt_neox."):
        where = where.removeprefix(prefix)
    return f"{where}: {why}"


def _outcome(outcome) -> str:
    return "ok" if outcome.status == "pass" else f"FAIL: {outcome.message}"


def cells(result) -> dict[str, str]:
    """The table cells of one case's grid.CaseResult."""
    arch = grid.ARCH_BY_NAME.get(result.name)
    quirks = arch.what if arch else grid.NANOGPT_WHAT.get(result.impl, result.name)
    logits = result.outcomes["logits"]
    greedy = result.outcomes["kv_greedy"]
    return {
        "architecture": result.name,
        "impl": result.impl,
        "quirks": quirks,
        "attention": result.attention,
        "fallback": "; ".join(dict.fromkeys(_fallback_reason(n) for n in result.fallbacks)) or "-",
        "kv cache": result.kv,
        "logits": f"ok ({result.logits_error:.0e})" if logits.status == "pass" else _outcome(logits),
        "greedy": "-" if result.kv.startswith("refused") else _outcome(greedy),
    }


COLUMNS = ("architecture", "impl", "quirks", "attention", "fallback", "kv cache", "logits", "greedy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated architecture names (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: FXOPT_GRID_WORKERS "
                                                                  "or min(2, cores); 0: this process)")
    parser.add_argument("--width", type=int, default=200, help="longest cell, in characters")
    args = parser.parse_args(argv)
    only = {n for n in args.only.split(",") if n}
    cases = [(name, impl) for name, impl in grid.case_ids() if not only or name in only]
    start = time.perf_counter()
    torch.set_num_threads(1)
    runner = grid.Grid(cases, workers=args.workers)
    rows, missing = [], []
    try:
        for name, impl in cases:
            result = runner.result(name, impl)
            print(f"{name}-{impl}: {result.seconds:.1f} s", file=sys.stderr)
            if all(o.status == "skip" for o in result.outcomes.values()):
                missing.append(f"{name}-{impl}: {result.outcomes['logits'].message}")
            else:
                rows.append(cells(result))
    finally:
        runner.close()
    device = torch.cuda.get_device_name() if grid.DEVICE.type == "cuda" else "CPU"
    print(f"fxopt on tiny decoders ({grid.LAYERS} layers, hidden 64, 4 heads, vocab {grid.VOCAB}), random weights, "
          f"fp32, {device}. attention: layers rewritten, kernel x nodes (mask kind); logits: worst "
          f"max|diff| / max|eager| at lengths {', '.join(map(str, grid.LENGTHS))} (tolerance {grid.RTOL:g}); "
          f"greedy: prompt {grid.PROMPT} + {grid.NEW} new tokens vs HF generate (batch 1, and batch 2 "
          f"left-padded by {grid.PADDED}) and a full-recompute loop.\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("| " + " | ".join("---" for _ in COLUMNS) + " |")
    for row in rows:
        print("| " + " | ".join(_cell(row.get(c, ""), args.width) for c in COLUMNS) + " |")
    if missing:
        print("\nNot offered by HF (or the nanoGPT file absent):")
        for line in missing:
            print(f"- {line}")
    print(f"\n{len(rows)} cases in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
