"""`fxopt bench MODEL --decode`: generation throughput, fxopt against its peers, in one run on one GPU.

MODEL is any causal LM: a models/ preset, a factory, or an hf: spec (hf:llama-3.2-1b builds that
architecture with random weights). Rows, all on the same config and the same weights:
  eager recompute     the cache-less model, full forward over the whole sequence for every new token
  hf eager cache      the HF model with its own DynamicCache, eager: an HF model itself; a Llama preset's
                      weight-copied HF twin (LlamaForCausalLM); other models have no HF rows
  hf static+compile   the same HF model, generate(cache_implementation="static") with torch.compile
                      (mode="reduce-overhead": CUDA graphs) -- the reference ratios are taken against
  fxopt               the automatic KV cache: eager prefill, decode step (fused by the fusion pass)
                      replayed from a CUDA graph
  fxopt-unfused       the same without fusing the decode step (ATen ops in the CUDA graph)

Configs (default): llama-1b-like, bf16, batch 1 / prompt 512 / 256 new; batch 8 / prompt 512 / 256 new;
batch 1 / prompt 8192 / 256 new. Per row and config:
  ms/token    (t(new) - t(1)) / (new - 1): the decode step alone, prefill cancelled out (medians of
              `repeat` timed generate() calls with `new` and with 1 new token)
  tokens/s    batch / (ms/token): decode throughput over all rows
  e2e tok/s   batch * new / t(new): including prefill
  weights/s   bytes of weights one decode step must stream (every weight once; embedding tables only the
              rows looked up) per second, and as % of the copy bandwidth measured in the same run
  KV/s        K/V bytes a step reads (mean cache length over the generation) per second
Greedy decoding with eos disabled (the rows fxopt-sampled and fxopt-temperature, asked for by --rows, sample
in fxopt's replayed graph: temperature 0.8, top-k 50, top-p 0.95 / temperature 0.8 alone); `match` is the
share of each row's tokens equal to HF static+compile's (eager recompute's where there is no HF row), `agree`
the steps before the first token that differs in any sequence (bf16: a near-tie can flip a token and the
continuation with it, so `match` alone says little).

    python -m fxopt.bench.decode                                # everything above, json to bench_decode.json
    python -m fxopt.bench.decode --configs 1x512x256 --rows fxopt,hf-static-compile
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from fxopt import cli_args, models, progress, zoo
from fxopt.cli_args import nonnegative_int, positive_int
from fxopt.errors import UserError, check_output, require_cuda
from fxopt.generate import Generator, build_generator
from fxopt.hardware import measure_copy_bandwidth
from fxopt.models.inputs import random_token_ids
from fxopt.progress import stage
from fxopt.zoo import _parse_value

ROWS = ("eager-recompute", "hf-eager-cache", "hf-static-compile", "fxopt", "fxopt-unfused")
# sampled generation in fxopt's replayed graph, timed against its greedy row (not in the default rows)
SAMPLED_ROWS = {"fxopt-sampled": dict(temperature=0.8, top_k=50, top_p=0.95),
                "fxopt-temperature": dict(temperature=0.8)}
REFERENCE_ROW = "hf-static-compile"
DEFAULT_CONFIGS = ((1, 512, 256), (8, 512, 256), (1, 8192, 256))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Measurement:
    row: str
    batch: int
    prompt: int
    new: int
    t_one_s: float = float("nan")  # generate() with 1 new token (prefill + first token)
    t_all_s: float = float("nan")  # generate() with `timed_new` new tokens
    timed_new: int = 0  # new tokens of the timed run (recompute rows may time fewer)
    ms_per_token: float = float("nan")
    tokens_per_s: float = float("nan")
    e2e_tokens_per_s: float = float("nan")
    weight_bytes_per_step: float = 0.0
    kv_bytes_per_step: float = 0.0
    weight_bw: float = float("nan")  # bytes/s
    weight_bw_pct: float = float("nan")  # % of measured copy bandwidth
    kv_bw: float = float("nan")
    ratio_vs_ref: float = float("nan")  # tokens/s over HF static+compile's
    match: float = float("nan")  # share of new tokens equal to the reference row's
    agree: int = -1  # new tokens equal to the reference row's in every sequence before the first difference
    # --profile (fxopt rows): one greedy step's CUDA graph replayed at the prompt's length
    replay_ms: float = float("nan")  # the step alone, between CUDA events
    kernels_per_step: float = float("nan")  # GPU kernels (memcpy/memset apart) under torch.profiler
    kernels_per_layer: float = float("nan")
    gpu_busy_ms: float = float("nan")  # per profiled step: time some kernel ran ...
    profiled_step_ms: float = float("nan")  # ... of first kernel start to last kernel end (the rest: GPU idle)
    note: str = ""
    error: str = ""


# ---------------------------------------------------------------------------------------------------
# HF twin of models/llama.py
# ---------------------------------------------------------------------------------------------------


def hf_llama_from(model: torch.nn.Module, *, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """transformers' LlamaForCausalLM with the same config and (copied) weights as a models/ Llama."""
    import transformers

    cfg = model.config
    param = next(model.parameters())
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    hf_cfg._attn_implementation = attn_implementation
    with torch.device(param.device):
        hf = transformers.LlamaForCausalLM._from_config(hf_cfg, torch_dtype=param.dtype)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to HF Llama failed: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "generate", None)) and getattr(model, "generation_config", None) is not None


def load_causal_lm(spec: str, device, dtype: torch.dtype, longest: int, overrides: dict | None, *, hf_peer: bool
                   ) -> tuple[torch.nn.Module, torch.nn.Module | None, dict]:
    """The model to bench (a preset, a factory or an hf: spec), its HF peer (an HF model is its own; a Llama
    preset gets a weight-copied HF twin; others none) and the preset overrides used. Raises UserError for a
    model that is not a causal LM or whose position table is shorter than the longest config."""
    overrides = dict(overrides or {})
    if spec in models.PRESETS:
        cfg = models.get_config(spec, **overrides)
        if getattr(cfg, "max_positions", longest) < longest:
            overrides["max_positions"] = longest  # RoPE tables long enough for the longest config
        model = models.build(spec, device=device, dtype=dtype, **overrides)
        if not getattr(model, "is_causal_lm", False):
            raise UserError(f"{spec} is not a causal LM", "bench --decode takes a model that maps input_ids "
                                                          "to next-token logits")
        hf = hf_llama_from(model) if hf_peer and type(model).__name__ == "Llama" else None
        return model, hf, overrides
    if overrides:
        raise UserError("--override sets a preset's config fields", "put fields in the spec: hf:llama,key=value")
    model = zoo.load_model(spec, device=device, dtype=dtype)
    zoo.check_sizes(model, spec, seq=longest, seq_flag="prompt + new")
    hf = None
    if is_hf_causal_lm(model):
        model.generation_config.eos_token_id = None  # every run generates all its tokens
        model.generation_config.pad_token_id = 0
        hf = model if hf_peer else None
    return model, hf, overrides


def prompt_ids(model: torch.nn.Module, batch: int, prompt: int) -> torch.Tensor:
    """(batch, prompt) random token ids, the same for every row (seeded; the presets' own example tokens)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
    return random_token_ids(batch, prompt, vocab, seed=0, device=next(model.parameters()).device)


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], repeat: int, device) -> float:
    """Median wall time of fn() in seconds (synchronised)."""
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def _recompute_generate(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):
        out = model(input_ids=ids)
        nxt = getattr(out, "logits", out)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def _row_functions(model, hf, gen: Generator, plain: Generator, ids: torch.Tensor
                   ) -> dict[str, Callable[[int], torch.Tensor]]:
    """row -> generate(n new tokens) for the prompt `ids`, greedy, eos disabled."""
    fns: dict[str, Callable[[int], torch.Tensor]] = {
        "eager-recompute": lambda n: _recompute_generate(model, ids, n),
        "fxopt": lambda n: gen.generate(ids, n),
        "fxopt-unfused": lambda n: plain.generate(ids, n),
        **{row: (lambda n, kw=kw: gen.generate(ids, n, seed=0, **kw)) for row, kw in SAMPLED_ROWS.items()},
    }
    if hf is not None:
        from transformers import CompileConfig

        compile_config = CompileConfig(mode="reduce-overhead")  # CUDA graphs; HF's default fullgraph
        fns["hf-eager-cache"] = lambda n: hf.generate(ids, max_new_tokens=n, do_sample=False)
        fns["hf-static-compile"] = lambda n: hf.generate(ids, max_new_tokens=n, do_sample=False,
                                                         cache_implementation="static",
                                                         compile_config=compile_config)
    return fns


def measure_row(row: str, fns: dict[str, Callable[[int], torch.Tensor]], batch: int, prompt: int, new: int, *,
                repeat: int, device, recompute_steps: int) -> tuple[Measurement, torch.Tensor | None]:
    m = Measurement(row, batch, prompt, new)
    fn = fns[row]
    timed_new = new
    if row == "eager-recompute" and recompute_steps and new > recompute_steps:
        timed_new = recompute_steps
        m.note = f"timed over the first {recompute_steps} new tokens"
    tokens = fn(timed_new)  # warm-up (compiles and captures) and the tokens for `match`
    fn(1)
    m.t_one_s = _time(lambda: fn(1), repeat, device)
    m.t_all_s = _time(lambda: fn(timed_new), repeat, device)
    m.timed_new = timed_new
    m.ms_per_token = 1e3 * (m.t_all_s - m.t_one_s) / max(timed_new - 1, 1)
    m.tokens_per_s = batch / (m.ms_per_token * 1e-3)
    m.e2e_tokens_per_s = batch * timed_new / m.t_all_s
    return m, tokens


def run(model_name: str = "llama-1b-like", *, dtype: str = "bf16", configs=DEFAULT_CONFIGS, rows=ROWS,
        repeat: int = 3, recompute_steps: int = 32, device: str = "cuda", json_path: str | None = None,
        overrides: dict | None = None, profile: bool = False) -> dict:
    """Measure every row on every (batch, prompt, new) config; print one table; return (and dump) json. With
    `profile`, the fxopt rows' decode step is also profiled: kernels per step and per layer, GPU busy time."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_decode measures on a GPU; pass device='cpu' only for a smoke run")
    torch_dtype = DTYPES[dtype]
    longest = max(p + n for _, p, n in configs)
    model, hf, overrides = load_causal_lm(model_name, device, torch_dtype, longest, overrides,
                                          hf_peer=any(r.startswith("hf-") for r in rows))
    copy_bw = None
    if device == "cuda":

        copy_bw = measure_copy_bandwidth()

    with stage(f"capturing {model_name} and inserting the KV cache"):
        base = build_generator(model, zoo.example_inputs(model, 1, 8), max_seq_len=8, max_batch=1)
    programs, weight_bytes = base.programs, base.weight_bytes  # one capture; caches sized per config below
    del base
    results: list[Measurement] = []
    for batch, prompt, new in configs:
        ids = prompt_ids(model, batch, prompt)
        gen = Generator(programs, max_seq_len=prompt + new, max_batch=batch, device=torch.device(device),
                        weight_bytes=weight_bytes)
        plain = Generator(programs, max_seq_len=prompt + new, max_batch=batch, device=torch.device(device),
                          weight_bytes=weight_bytes, fuse_decode=False)  # decode step without fusion
        w_bytes = gen.weight_stream_bytes(batch)
        kv_bytes = batch * (prompt + (new - 1) / 2) * gen.kv_bytes_per_token()
        fns = _row_functions(model, hf, gen, plain, ids)
        tokens: dict[str, torch.Tensor] = {}
        config_rows = []
        for row in rows:
            if row not in fns:
                config_rows.append(Measurement(row, batch, prompt, new, error="not available for this model"))
                continue
            with stage(f"bench_decode {row}: batch {batch}, prompt {prompt}, {new} new"):
                try:
                    m, toks = measure_row(row, fns, batch, prompt, new, repeat=repeat, device=device,
                                          recompute_steps=recompute_steps)
                    tokens[row] = toks
                    if profile and device == "cuda" and row in PROFILED_ROWS:
                        _profile_step(m, gen if row == "fxopt" else plain, ids, new)
                except Exception as exc:  # noqa: BLE001 - one row failing must not lose the others
                    m = Measurement(row, batch, prompt, new, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            m.weight_bytes_per_step, m.kv_bytes_per_step = float(w_bytes), float(kv_bytes)
            if m.ms_per_token == m.ms_per_token:
                m.weight_bw = w_bytes / (m.ms_per_token * 1e-3)
                m.kv_bw = kv_bytes / (m.ms_per_token * 1e-3)
                if copy_bw:
                    m.weight_bw_pct = 100 * m.weight_bw / copy_bw
            config_rows.append(m)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        ref = next((m for m in config_rows if m.row == REFERENCE_ROW and not m.error), None)
        for m in config_rows:
            if ref is not None and m.tokens_per_s == m.tokens_per_s:
                m.ratio_vs_ref = m.tokens_per_s / ref.tokens_per_s
            match_ref = REFERENCE_ROW if REFERENCE_ROW in tokens else "eager-recompute"
            if match_ref in tokens and m.row in tokens and m.row not in SAMPLED_ROWS:
                a, b = tokens[m.row][:, prompt:], tokens[match_ref][:, prompt:]
                n = min(a.shape[1], b.shape[1])
                m.match = float((a[:, :n] == b[:, :n]).float().mean())
                m.agree = leading_agreement(a[:, :n], b[:, :n])
        results.extend(config_rows)
        del gen, plain
        gc.collect()

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report = {
        "model": model_name, "overrides": overrides, "dtype": dtype, "device": device_name,
        "date": time.strftime("%Y-%m-%d"), "copy_bandwidth": copy_bw,
        "torch": torch.__version__, "rows": [asdict(m) for m in results],
    }
    print(format_table(report))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {json_path}", file=sys.stderr)
    return report


PROFILED_ROWS = ("fxopt", "fxopt-unfused")


def _profile_step(m: Measurement, gen: Generator, ids: torch.Tensor, new: int) -> None:
    """Fill m's --profile fields from profile_decode.step_profile: its replays must fit in the cache's room for
    the `new` tokens, else the row notes that it was not profiled."""
    from fxopt.bench.profile_decode import WARMUP_REPLAYS, step_profile

    n = min(50, new - 1)
    if n < WARMUP_REPLAYS:
        m.note = (m.note + "; " if m.note else "") + f"not profiled: --profile needs {WARMUP_REPLAYS + 1}+ new tokens"
        return
    step = step_profile(gen, ids, replays=n, steps=n)
    m.replay_ms, m.kernels_per_step = step["replay_ms"], step["kernels_per_step"]
    m.kernels_per_layer, m.gpu_busy_ms = step["kernels_per_layer"], step["gpu_busy_ms"]
    m.profiled_step_ms = step["profiled_step_ms"]


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """Steps (columns of two (batch, new) token tensors) before the first one where any sequence differs: after
    a bf16 near-tie flips a token the continuations differ anyway, so the share of equal tokens says little."""
    same = (a == b).all(dim=0)  # (new,)
    return int(same.shape[0] if bool(same.all()) else int((~same).nonzero()[0]))


def format_table(report: dict) -> str:
    bw = report.get("copy_bandwidth")
    head = (f"{report['model']} {report['dtype']} on {report['device']} ({report['date']}); copy bandwidth "
            f"{bw / 1e9:.0f} GB/s" if bw else f"{report['model']} {report['dtype']} on {report['device']}")
    lines = [head, f"{'config':<16}{'row':<19}{'tok/s':>9}{'ms/tok':>8}{'vs HF':>7}{'e2e tok/s':>10}"
                   f"{'weights GB/s':>13}{'% copy':>7}{'match':>7}{'agree':>7}"]
    for r in report["rows"]:
        config = f"{r['batch']}x{r['prompt']}+{r['new']}"
        if r["error"]:
            lines.append(f"{config:<16}{r['row']:<19}  error: {r['error'][:70]}")
            continue

        def f(x, spec):
            return format(x, spec) if x == x else "-"

        lines.append(f"{config:<16}{r['row']:<19}{f(r['tokens_per_s'], '9.1f')}{f(r['ms_per_token'], '8.2f')}"
                     f"{f(r['ratio_vs_ref'], '7.2f')}{f(r['e2e_tokens_per_s'], '10.1f')}"
                     f"{f(r['weight_bw'] / 1e9, '13.0f')}{f(r['weight_bw_pct'], '7.1f')}"
                     f"{f(r['match'], '7.2f')}{r.get('agree', -1) if r.get('agree', -1) >= 0 else '-':>7}"
                     + (f"  ({r['note']})" if r["note"] else ""))
    profiled = [r for r in report["rows"] if r.get("kernels_per_step", float("nan")) == r.get("kernels_per_step")]
    if profiled:
        lines.append("--profile: one greedy step's CUDA graph replayed at the prompt's length; idle % of the "
                     "profiled step, first kernel start to last kernel end")
        lines.append(f"{'config':<16}{'row':<19}{'step ms':>8}{'kernels':>8}{'/layer':>7}{'GPU busy ms':>12}"
                     f"{'idle %':>7}")
        for r in profiled:
            idle = 100 * (1 - r["gpu_busy_ms"] / r["profiled_step_ms"])
            config = f"{r['batch']}x{r['prompt']}+{r['new']}"
            lines.append(f"{config:<16}{r['row']:<19}{r['replay_ms']:>8.3f}"
                         f"{r['kernels_per_step']:>8.1f}{r['kernels_per_layer']:>7.1f}{r['gpu_busy_ms']:>12.3f}"
                         f"{idle:>7.1f}")
    return "\n".join(lines)


def parse_rows(text: str) -> tuple[str, ...]:
    """'fxopt,hf-static-compile' -> ('fxopt', 'hf-static-compile'); UserError on a row this bench lacks."""
    rows = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = sorted(set(rows) - set(ROWS) - set(SAMPLED_ROWS))
    if unknown or not rows:
        raise UserError(f"bad --rows {text!r}" + (f": unknown {unknown}" if unknown else ""),
                        f"choose from {', '.join(ROWS + tuple(SAMPLED_ROWS))}")
    return rows


def _parse_configs(text: str) -> tuple[tuple[int, int, int], ...]:
    """'1x512x256,8x512x256' -> ((1, 512, 256), (8, 512, 256))."""
    out = []
    for item in text.split(","):
        batch, prompt, new = (int(v) for v in item.lower().replace("+", "x").split("x"))
        out.append((batch, prompt, new))
    return tuple(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and caches")
    parser.add_argument("--configs", default=",".join(f"{b}x{p}x{n}" for b, p, n in DEFAULT_CONFIGS),
                        help="batch x prompt x new, comma separated")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"any of {', '.join(ROWS + tuple(SAMPLED_ROWS))}")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed generate() calls per figure")
    parser.add_argument("--recompute-steps", type=nonnegative_int, default=32,
                        help="time eager recompute over this many new tokens (0: all)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run only)")
    parser.add_argument("--json", default="bench_decode.json", metavar="PATH", help="write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the fxopt rows' decode step: kernels per step and per layer, GPU busy")


def main(argv: list[str] | None = None) -> int:

    class Formatter(argparse.RawDescriptionHelpFormatter, cli_args.HelpFormatter):
        pass

    parser = cli_args.Parser(prog="python -m fxopt.bench.decode", description=__doc__, formatter_class=Formatter)
    parser.add_argument("model", nargs="?", default="llama-1b-like",
                        help="a causal LM: a models/ preset, package.module:factory or hf:MODEL_TYPE / hf:NAME")
    parser.add_argument("--override", action="append", default=[], help="config field=value (e.g. n_layers=2)")
    add_arguments(parser)
    cli_args.add_common_flags(parser, top=True)
    argv = list(sys.argv[1:] if argv is None else argv)

    def go() -> int:

        args = parser.parse_args(argv)
        progress.configure(enabled=not args.quiet)
        bad = [o for o in args.override if "=" not in o]
        if bad:
            raise UserError(f"bad --override {bad[0]!r}", "write field=value, e.g. --override n_layers=2")
        overrides = dict((k, _parse_value(v)) for k, v in (o.split("=", 1) for o in args.override))
        rows = parse_rows(args.rows)
        try:
            configs = _parse_configs(args.configs)
        except ValueError:
            raise UserError(f"bad --configs {args.configs!r}", "write BATCHxPROMPTxNEW, comma separated") from None
        if any(v <= 0 for config in configs for v in config):
            raise UserError(f"bad --configs {args.configs!r}: every size must be positive", "e.g. 1x512x256")
        if args.device.startswith("cuda"):
            require_cuda("bench_decode", "or pass --device cpu for a smoke run")
        if args.json:
            check_output(args.json, "--json")
        run(args.model, dtype=args.dtype, configs=configs, rows=rows, repeat=args.repeat,
            recompute_steps=args.recompute_steps, device=args.device, json_path=args.json, overrides=overrides,
            profile=args.profile)
        return 0

    try:
        return cli_args.guarded(go, debug="--debug" in argv)
    finally:
        progress.configure(enabled=None)


if __name__ == "__main__":
    sys.exit(main())
