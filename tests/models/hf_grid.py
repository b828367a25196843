"""The real-architecture grid: tiny HuggingFace decoders built from configs, random weights, nothing downloaded.

Used by tests/models/test_hf_grid.py and benchmarks/hf_grid_table.py. Each case is an architecture (a
transformers ``model_type`` with tiny sizes and the config quirks worth exercising: GQA, sliding windows,
softcapping, partial rotary, ALiBi, multi-query, scaled embeddings) times an attention implementation
("eager": HF's hand-written matmul/softmax/matmul, "sdpa": ``F.scaled_dot_product_attention``).

Everything that is expensive (capture through torch.export, the passes) is built once per case and kept in
a process-wide cache, so the three tests of a case share one optimized module and one generator. A build
that raises is cached as the exception and re-raised to every test that needs it.

The checks themselves live here too (``check_logits``, ``attention_summary``, ``check_kv_greedy``) so the
benchmark table and the tests judge a case the same way.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------------- the grid
VOCAB = 256
PAD = 0  # pad id everywhere (HF generate, fxopt generate, the padded prompt); eos is switched off
LAYERS = 2
WINDOW = 16  # sliding window of mistral / gemma2 / gemma3: smaller than the longest test length
LENGTHS = (16, 24, 40)  # logits test: 40 is past the windows
CAPTURE = (2, 16)  # batch, seq of the optimize() example
PROMPT, NEW = 8, 24  # KV test: batch-1 prompt, new tokens (8 + 24 = 32 > WINDOW)
PADDED = 3  # pad tokens at the left of row 0 in the batch-2 KV test
MAX_SEQ_LEN, MAX_BATCH = 64, 2
RTOL = 1e-4  # logits: max |fast - eager| <= RTOL * max |eager|
# fp32 everywhere; CPU unless FXOPT_GRID_DEVICE says otherwise (benchmarks/hf_grid_table.py on a GPU)
DEVICE = torch.device(os.environ.get("FXOPT_GRID_DEVICE", "cpu"))

# Sizes shared by the HF-style configs (hidden 64, 4 heads of 16, 2 layers, vocab 256, 128 positions).
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)
_GQA = dict(num_key_value_heads=2)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16)
# Weights: every matrix redrawn from N(0, WEIGHT_STD**2) (norm weights and biases as HF made them). With HF's
# initializer_range of 0.02 most of these tiny models are degenerate: greedy decoding repeats one token, and
# with tied embeddings the logits copy the input token, so identical tokens would prove little. At 0.15 every
# case generates many distinct tokens and its top-2 logit margins stay >= 1e-4 of the largest logit, far above
# the fp32 differences of a correct rewrite. Embeddings are untied (HF's default for gemma, starcoder2 and
# falcon is tied), except in gpt2 and nanoGPT, which keep the tied head.
WEIGHT_STD = 0.15
_GPT2_STYLE = dict(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_inner=128, n_positions=128,
                   bos_token_id=1, eos_token_id=2, pad_token_id=PAD)


@dataclass(frozen=True)
class Arch:
    """One architecture of the grid: a transformers model_type and the config fields it is built with."""

    name: str
    model_type: str
    config: dict[str, Any]
    what: str  # the quirk it exercises, for the table

    def fields(self) -> dict[str, Any]:
        return {"tie_word_embeddings": False, **self.config}  # untied unless the entry says (see WEIGHT_STD)


ARCHS: tuple[Arch, ...] = (
    Arch("llama", "llama", {**_COMMON, **_GQA}, "RoPE, GQA 4/2"),
    Arch("mistral", "mistral", {**_COMMON, **_GQA, "sliding_window": WINDOW}, f"sliding window {WINDOW}, GQA"),
    Arch("qwen2", "qwen2", {**_COMMON, **_GQA}, "q/k/v bias, GQA"),
    Arch("qwen3", "qwen3", {**_COMMON, **_GQA, "head_dim": 16}, "q/k RMSNorm, GQA"),
    Arch("phi3", "phi3", {**_COMMON, **_GQA}, "fused qkv_proj and gate_up_proj, GQA"),
    Arch("gemma", "gemma", {**_COMMON, **_GQA, **_GEMMA}, "scaled embeddings, (1+w) RMSNorm, GeGLU"),
    Arch("gemma2", "gemma2", {**_COMMON, **_GQA, **_GEMMA, "sliding_window": WINDOW,
                              "layer_types": ["sliding_attention", "full_attention"],
                              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
         f"attention softcapping 50, final softcapping 30, sliding {WINDOW} / full alternating"),
    Arch("gemma3_text", "gemma3_text", {**_COMMON, **_GQA, **_GEMMA, "sliding_window": WINDOW,
                                        "layer_types": ["sliding_attention", "full_attention"]},
         f"q/k RMSNorm, sliding {WINDOW} / full alternating, two RoPE tables"),
    Arch("opt", "opt", {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": LAYERS,
                        "num_attention_heads": 4, "ffn_dim": 128, "max_position_embeddings": 128,
                        "word_embed_proj_dim": 64, "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2},
         "learned positions offset by 2 (from the attention mask), ReLU"),
    Arch("gpt_neox", "gpt_neox", {**_COMMON, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.25}},
         "partial rotary 0.25, parallel residual, fused qkv"),
    Arch("falcon-rotary", "falcon", {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": LAYERS,
                                     "num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 128,
                                     "max_position_embeddings": 128, "new_decoder_architecture": True,
                                     "alibi": False, "parallel_attn": True, "bias": False,
                                     "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2},
         "new decoder architecture (40B style): RoPE, GQA 4/2, parallel attention"),
    Arch("falcon-alibi", "falcon", {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": LAYERS,
                                    "num_attention_heads": 4, "ffn_hidden_size": 128,
                                    "max_position_embeddings": 128, "alibi": True, "multi_query": False,
                                    "new_decoder_architecture": False, "parallel_attn": False, "bias": True,
                                    "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2},
         "ALiBi (RW style), no RoPE"),
    Arch("falcon-mqa", "falcon", {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": LAYERS,
                                  "num_attention_heads": 4, "ffn_hidden_size": 128, "max_position_embeddings": 128,
                                  "multi_query": True, "new_decoder_architecture": False, "alibi": False,
                                  "parallel_attn": True, "bias": False,
                                  "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2},
         "multi-query (7B style): one KV head, RoPE"),
    Arch("gptj", "gptj", {**_GPT2_STYLE, "rotary_dim": 8, "tie_word_embeddings": False},
         "interleaved partial rotary (rotary_dim 8 of 16), parallel residual"),
    Arch("bloom", "bloom", {"vocab_size": VOCAB, "hidden_size": 64, "n_layer": LAYERS, "n_head": 4,
                            "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2},
         "ALiBi from the attention mask, baddbmm scores"),
    Arch("stablelm", "stablelm", {**_COMMON, **_GQA}, "partial rotary 0.25, LayerNorm, GQA"),
    Arch("starcoder2", "starcoder2", {**_COMMON, **_GQA}, "biases, GQA, gelu MLP"),
    Arch("olmo", "olmo", {**_COMMON, **_GQA}, "non-parametric LayerNorm, GQA"),
    Arch("granite", "granite", {**_COMMON, **_GQA, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                "attention_multiplier": 0.0625, "logits_scaling": 8.0},
         "attention scale 1/d instead of 1/sqrt(d), embedding/residual/logit multipliers"),
    Arch("gpt2", "gpt2", {**_GPT2_STYLE, "tie_word_embeddings": True},
         "learned positions, Conv1D, tril-buffer mask, tied head"),
)
ARCH_BY_NAME = {a.name: a for a in ARCHS}
IMPLS = ("eager", "sdpa")

NANOGPT_PATH = Path(__file__).with_name("nanogpt.py")
NANOGPT_IMPLS = ("flash-off", "flash-on")
NANOGPT_WHAT = {"flash-off": "nanoGPT: masked_fill with the tril buffer, learned positions, last-position logits",
                "flash-on": "nanoGPT: sdpa(is_causal=True), learned positions, last-position logits"}


def case_ids() -> list[tuple[str, str]]:
    """Every (architecture, impl) the grid runs: the HF ones, then the nanoGPT model (when its file exists)."""
    cases = [(a.name, impl) for a in ARCHS for impl in IMPLS]
    cases += [("nanogpt", impl) for impl in NANOGPT_IMPLS]
    return cases


class Unsupported(Exception):
    """A combination HF (or the nanoGPT file) does not offer: the tests skip with this reason."""


# --------------------------------------------------------------------------------------------- building
def _seed(name: str, impl: str) -> int:
    # one seed per architecture, so "eager" and "sdpa" of an architecture hold the same weights
    return sum(map(ord, name)) % 10007


def redraw(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter of 2 or more dims from N(0, WEIGHT_STD**2), from a seeded generator (tied ones once)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * WEIGHT_STD)
    return model


def build_hf(name: str, impl: str) -> torch.nn.Module:
    import transformers

    arch = ARCH_BY_NAME[name]
    config = transformers.AutoConfig.for_model(arch.model_type, **arch.fields())
    auto = transformers.AutoModelForCausalLM
    cls = auto._model_mapping[type(config)]
    if impl == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        raise Unsupported(f"HF {cls.__name__} has no sdpa attention (_supports_sdpa is False)")
    torch.manual_seed(_seed(name, impl))
    try:
        model = auto.from_config(config, attn_implementation=impl)
    except ValueError as exc:  # HF refuses an implementation it does not offer for this class
        if "attn_implementation" in str(exc) or "does not support" in str(exc):
            raise Unsupported(f"HF {cls.__name__}: {exc}") from exc
        raise
    model = redraw(model, _seed(name, impl)).to(device=DEVICE, dtype=torch.float32).eval()
    got = model.config._attn_implementation
    if got != impl:
        raise Unsupported(f"HF {cls.__name__} built with attn_implementation={got!r}, not {impl!r}")
    # greedy generation runs all its tokens: no eos, one pad id
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = None
    return model


def _nanogpt_module():
    if not NANOGPT_PATH.exists():
        raise Unsupported(f"{NANOGPT_PATH.name} is absent (another engineer is writing it)")
    name = "fxopt_grid_nanogpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, NANOGPT_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def build_nanogpt(impl: str) -> torch.nn.Module:
    """The nanoGPT-style model of tests/models/nanogpt.py: GPT(GPTConfig(...)), `flash` off or on.

    The file is written elsewhere, so this adapts to what it offers: a GPTConfig dataclass with nanoGPT's
    field names (n_layer, n_head, n_embd, block_size, vocab_size, bias, dropout), and either a `flash`
    config field or a `flash` attribute on each attention module (nanoGPT's CausalSelfAttention.flash)."""
    import dataclasses

    module = _nanogpt_module()
    GPT, GPTConfig = getattr(module, "GPT", None), getattr(module, "GPTConfig", None)
    if GPT is None or GPTConfig is None:
        raise Unsupported(f"{NANOGPT_PATH.name} has no GPT / GPTConfig")
    want = dict(n_layer=LAYERS, n_head=4, n_embd=64, block_size=128, vocab_size=VOCAB, bias=True, dropout=0.0)
    flash = impl == "flash-on"
    names = {f.name for f in dataclasses.fields(GPTConfig)} if dataclasses.is_dataclass(GPTConfig) else set(want)
    kwargs = {k: v for k, v in want.items() if k in names}
    if "flash" in names:
        kwargs["flash"] = flash
    torch.manual_seed(_seed("nanogpt", impl))
    model = GPT(GPTConfig(**kwargs))
    if "flash" not in names:
        switched = 0
        for sub in model.modules():
            if hasattr(sub, "flash"):
                sub.flash = flash
                switched += 1
        if not switched:
            raise Unsupported(f"{NANOGPT_PATH.name}: no `flash` switch (config field or module attribute)")
    return redraw(model, _seed("nanogpt", impl)).to(device=DEVICE, dtype=torch.float32).eval()


def build_model(name: str, impl: str) -> torch.nn.Module:
    return build_nanogpt(impl) if name == "nanogpt" else build_hf(name, impl)


def num_layers(model: torch.nn.Module) -> int:
    config = model.config
    for key in ("num_hidden_layers", "n_layer", "n_layers"):
        if hasattr(config, key):
            return int(getattr(config, key))
    raise AttributeError(f"cannot tell the number of layers of {type(model).__name__}")


def logits_of(out) -> torch.Tensor:
    """Logits from a ModelOutput, a (logits, ...) tuple (nanoGPT returns (logits, loss)) or a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"no logits in a {type(out).__name__}")


def token_arg(model: torch.nn.Module) -> str:
    """The forward's token-id argument: input_ids for HF models, nanoGPT's `idx`."""
    params = list(inspect.signature(model.forward).parameters)
    return "input_ids" if "input_ids" in params else params[0]


def eager_logits(model: torch.nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    kwargs = {token_arg(model): ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if hasattr(model, "generation_config"):  # HF: no cache for a plain forward
        kwargs["use_cache"] = False
    with torch.no_grad():
        return logits_of(model(**kwargs))


# --------------------------------------------------------------------------------------------- the cache
@dataclass
class Case:
    """Everything built for one (architecture, impl); each slot a value, or the exception its build raised."""

    name: str
    impl: str
    model: Any = None
    fast: Any = None
    gen: Any = None
    seconds: dict[str, float] = field(default_factory=dict)


_CASES: dict[tuple[str, str], Case] = {}


def _built(case: Case, slot: str, make: Callable[[], Any]):
    value = getattr(case, slot)
    if value is None:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = make()
        except Exception as exc:  # noqa: BLE001 - cached and re-raised to every test that needs it
            value = exc
        case.seconds[slot] = time.perf_counter() - start
        setattr(case, slot, value)
    if isinstance(value, BaseException):
        raise value
    return value


def get_case(name: str, impl: str) -> Case:
    return _CASES.setdefault((name, impl), Case(name, impl))


def example_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Token ids avoiding PAD and the (disabled) bos/eos ids 1, 2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator).to(DEVICE)


def model_of(name: str, impl: str) -> torch.nn.Module:
    case = get_case(name, impl)
    return _built(case, "model", lambda: build_model(name, impl))


def fast_of(name: str, impl: str):
    import fxopt

    model = model_of(name, impl)
    case = get_case(name, impl)
    return _built(case, "fast", lambda: fxopt.optimize(model, {token_arg(model): example_ids(*CAPTURE)}))


def gen_of(name: str, impl: str):
    import fxopt

    model = model_of(name, impl)
    case = get_case(name, impl)
    example = {token_arg(model): example_ids(*CAPTURE)}
    return _built(case, "gen", lambda: fxopt.optimize(model, example, kv_cache=True, max_seq_len=MAX_SEQ_LEN,
                                                      max_batch=MAX_BATCH))


def forget(name: str, impl: str) -> None:
    _CASES.pop((name, impl), None)


# --------------------------------------------------------------------------------------------- the checks
class GridMismatch(AssertionError):
    """A check of the grid failed; the message is one line."""


def check_logits(name: str, impl: str, lengths=LENGTHS) -> dict[int, float]:
    """fast(input_ids=x) vs the eager model at each length (batch 2): {length: max err / max |eager|}."""
    model, fast = model_of(name, impl), fast_of(name, impl)
    errors = {}
    for i, seq in enumerate(lengths):
        x = example_ids(2, seq, seed=100 + i)
        ref = eager_logits(model, x)
        with torch.no_grad():
            got = logits_of(fast(**{token_arg(model): x}))
        if got.shape != ref.shape:
            raise GridMismatch(f"seq {seq}: logits shape {tuple(got.shape)} != eager {tuple(ref.shape)}")
        scale = float(ref.abs().max())
        err = (got.float() - ref.float()).abs()
        errors[seq] = float(err.max()) / scale if scale else float(err.max())
    bad = {s: e for s, e in errors.items() if not e <= RTOL}  # NaN fails too
    if bad:
        where = ", ".join(f"seq {s}: {e:.2e}" for s, e in bad.items())
        ok = ", ".join(f"seq {s}: {e:.1e}" for s, e in errors.items() if s not in bad)
        raise GridMismatch(f"logits differ (max err / max|eager|, limit {RTOL:g}): {where}"
                           + (f" (ok: {ok})" if ok else ""))
    return errors


@dataclass
class AttentionSummary:
    layers: int
    counts: dict[str, int]
    matched: int
    notes: list[str]
    nodes: list[tuple[str, str, str]]  # (node, kernel, mask kind with its features) of each attention node
    fallbacks: list[str]  # notes of the SDPA fallbacks

    def kernels(self) -> str:
        """'flash_prefill x2 (causal)' style summary of the attention nodes."""
        seen: dict[tuple[str, str], int] = {}
        for _, kernel, mask in self.nodes:
            seen[(kernel, mask)] = seen.get((kernel, mask), 0) + 1
        return ", ".join(f"{k} x{n} ({m})" for (k, m), n in seen.items()) or "none"


def attention_summary(name: str, impl: str) -> AttentionSummary:
    from fxopt.passes import attention as attention_pass

    model, fast = model_of(name, impl), fast_of(name, impl)
    result = fast.program.results["attention"]
    counts = dict(result.counts)
    matched = sum(counts.get(p.name, 0) for p in attention_pass.PATTERNS)
    nodes = []
    for node in fast.gm.graph.nodes:
        info = node.meta.get(attention_pass.ATTENTION_KEY)
        if info is not None and node.op == "call_function":
            features = [f"window {info.window}"] if info.window else []
            features += ["ALiBi"] * info.alibi + [f"soft-cap {info.softcap:g}"] * bool(info.softcap)
            nodes.append((node.name, info.kernel, ", ".join([info.mask_kind.replace("window", "causal")] + features)))
    fallbacks = [n for n in result.notes if "SDPA fallback" in n]
    return AttentionSummary(num_layers(model), counts, matched, list(result.notes), nodes, fallbacks)


def check_attention(name: str, impl: str) -> AttentionSummary:
    summary = attention_summary(name, impl)
    if summary.matched != summary.layers or summary.counts.get("unmatched", 0):
        unmatched = [n for n in summary.notes if "not rewritten" in n]
        if unmatched:
            why = f": {unmatched[0]}"
        else:
            unseen = summary.layers - summary.matched - summary.counts.get("unmatched", 0)
            why = f": {unseen} layers' attention not found as a site at all (no note)" if unseen > 0 else ""
        raise GridMismatch(f"{summary.matched} of {summary.layers} layers' attention rewritten "
                           f"(counts {summary.counts}){why}")
    return summary


def _first_difference(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got != want).nonzero()
    row, pos = (int(v) for v in diff[0])
    return (f"row {row} first differs at position {pos} (new token {pos - PROMPT + 1}): {int(got[row, pos])} vs "
            f"{int(want[row, pos])}; {len(diff)} tokens differ")


def _margin(model, tokens: torch.Tensor, row: int, pos: int, mask=None) -> float:
    """Top-1 minus top-2 logit of the eager model where `pos` was predicted (how close to a tie)."""
    logits = eager_logits(model, tokens[:, :pos], None if mask is None else mask[:, :pos])[row, -1]
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def recompute_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """The reference without any cache: the full forward every step, argmax of the last position."""
    tokens = ids
    for _ in range(new):
        nxt = eager_logits(model, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def hf_generate(model, ids, mask=None, new=NEW) -> torch.Tensor:
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=PAD, eos_token_id=None, **kwargs)


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2 of PROMPT tokens; row 0 left-padded with PADDED pad tokens (attention_mask 0 there)."""
    ids = example_ids(2, PROMPT, seed=7)
    mask = torch.ones_like(ids)  # on DEVICE, as ids
    ids[0, :PADDED] = PAD
    mask[0, :PADDED] = 0
    return ids, mask


def is_hf(model) -> bool:
    return hasattr(model, "generation_config")


def check_kv_greedy(name: str, impl: str) -> None:
    """Greedy KV generation, batch 1 against the model's own generate (HF generate; nanoGPT's greedy loop) and
    a full-recompute argmax loop; batch 2 with row 0 left-padded against HF generate with that attention_mask
    (nanoGPT, which takes no mask: against each row generated alone, without its padding).
    Raises GridMismatch naming every comparison that failed."""
    model, gen = model_of(name, impl), gen_of(name, impl)
    failures = []
    ids = example_ids(1, PROMPT, seed=3)
    got = gen.generate(ids, NEW, pad_token_id=PAD)
    if is_hf(model):
        refs = {"HF generate": hf_generate(model, ids)}
    else:
        with torch.no_grad():
            refs = {"model.generate": model.generate(ids, NEW, greedy=True)}
    refs["full recompute"] = recompute_greedy(model, ids, NEW)
    for what, want in refs.items():
        if not torch.equal(got, want):
            where = _first_difference(got, want)
            if got.shape == want.shape:
                pos = int((got != want).nonzero()[0][1])
                where += f"; eager top-2 margin there {_margin(model, want, 0, pos):.1e}"
            failures.append(f"batch 1 vs {what}: {where}")
    pids, mask = padded_prompts()
    got2 = gen.generate(pids, NEW, attention_mask=mask, pad_token_id=PAD)
    if is_hf(model):
        want2, what = hf_generate(model, pids, mask), "HF generate"
    else:  # each row alone: its tokens after the padding, then the same number of new tokens
        rows = []
        for r in range(pids.shape[0]):
            pads = int((mask[r] == 0).sum())
            alone = recompute_greedy(model, pids[r:r + 1, pads:], NEW)
            rows.append(torch.cat([pids[r:r + 1, :pads], alone], dim=1))
        want2, what = torch.cat(rows), "each row generated alone"
    if not torch.equal(got2, want2):
        where = _first_difference(got2, want2)
        if got2.shape == want2.shape and is_hf(model):
            row, pos = (int(v) for v in (got2 != want2).nonzero()[0])
            full = torch.cat([mask, mask.new_ones(2, NEW)], dim=1)
            where += f"; eager top-2 margin there {_margin(model, want2, row, pos, full):.1e}"
        failures.append(f"batch 2 left-padded vs {what}: {where}")
    if failures:
        raise GridMismatch("; ".join(failures))


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception as one line: its type and the first line of its message, shortened."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    line = f"{type(exc).__name__}: {first}" if not isinstance(exc, GridMismatch) else first
    return line if len(line) <= limit else line[: limit - 3] + "..."


def cpu_reference_kernels():
    """Context for CPU runs: fused regions run as their PyTorch reference rather than in the Triton interpreter.

    tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU; the interpreter takes seconds per
    fused region per call, which would make the grid take far longer than CI allows. The generated kernels'
    numerics are the codegen tests' job; the grid checks what the passes did to real architectures (attention
    matching, masks, positions, KV caches), so with FXOPT_GRID_INTERPRET unset the grid runs every fused
    region as the PyTorch subgraph it replaced. FXOPT_GRID_INTERPRET=1 keeps the interpreter.
    """
    import contextlib

    @contextlib.contextmanager
    def scope():
        if torch.cuda.is_available() or os.environ.get("FXOPT_GRID_INTERPRET") == "1":
            yield
            return
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old

    return scope()


# --------------------------------------------------------------------------------------------- running cases
TESTS = ("logits", "attention", "kv_greedy")


@dataclass
class Outcome:
    """One test of one case: pass / fail / skip, a one-line message, and the details (traceback, notes)."""

    status: str  # pass | fail | skip
    message: str = ""
    detail: str = ""


@dataclass
class CaseResult:
    """All three tests of a case, plus what the table reports (plain data: it crosses process boundaries)."""

    name: str
    impl: str
    outcomes: dict[str, Outcome]
    attention: str = ""  # "2/2: flash_prefill x2 (causal)"
    fallbacks: list[str] = field(default_factory=list)  # fallback / not-rewritten notes of the attention pass
    kv: str = ""  # "accepted (...)" or the refusal
    logits_error: float | None = None  # worst max|diff| / max|eager| over the lengths
    seconds: float = 0.0


def _attempt(fn) -> tuple[Outcome, Any]:
    import traceback

    try:
        return Outcome("pass"), fn()
    except Unsupported as exc:
        return Outcome("skip", str(exc)), None
    except GridMismatch as exc:
        return Outcome("fail", str(exc)), None
    except Exception as exc:  # noqa: BLE001 - reported as the test's failure
        return Outcome("fail", one_line(exc) + _raised_at(exc), traceback.format_exc()), None


def _raised_at(exc: BaseException) -> str:
    """' (at passes/fusion.py:54 in cost)': the innermost frame inside this repository, for the one line."""
    import traceback

    if type(exc).__module__.startswith("fxopt."):  # a deliberate refusal (KVCacheError, ...): its message says why
        return ""
    root = Path(__file__).resolve().parents[2]
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename).resolve()
        if root in path.parents and "tests" not in path.relative_to(root).parts[:1]:
            where = f" (at {path.relative_to(root)}:{frame.lineno} in {frame.name})"
    return where


def run_case(name: str, impl: str, *, keep: bool = False) -> CaseResult:
    """Build the case and run its three checks; nothing raises. `keep=False` frees the case afterwards."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built, _ = _attempt(lambda: model_of(name, impl))
        if built.status != "pass":
            return CaseResult(name, impl, {t: built for t in TESTS}, seconds=time.perf_counter() - start)
        outcomes = {}
        outcomes["logits"], errors = _attempt(lambda: check_logits(name, impl))
        outcomes["attention"], summary = _attempt(lambda: check_attention(name, impl))
        result = CaseResult(name, impl, outcomes)
        if errors:
            result.logits_error = max(errors.values())
        try:  # the table reports the summary also when the check failed
            summary = summary or attention_summary(name, impl)
            result.attention = f"{summary.matched}/{summary.layers}: {summary.kernels()}"
            result.fallbacks = [n for n in summary.notes if "SDPA fallback" in n or "not rewritten" in n]
            missing = summary.layers - summary.matched - summary.counts.get("unmatched", 0)
            if missing > 0:  # neither rewritten nor reported: the pass did not see an attention site at all
                result.fallbacks.append(f"{missing} of {summary.layers} layers: no attention-like site found "
                                        "(the pass has no note for them)")
            if outcomes["attention"].status == "pass":
                outcomes["attention"].detail = "\n".join([result.attention, *result.fallbacks])
        except Exception as exc:  # noqa: BLE001 - optimize failed: the outcomes say so
            result.attention = f"optimize failed: {one_line(exc)}"
        kv_built, gen = _attempt(lambda: gen_of(name, impl))
        if kv_built.status == "pass":
            result.kv = f"accepted ({len(gen.programs.caches)} cached layers)"
            outcomes["kv_greedy"], _ = _attempt(lambda: check_kv_greedy(name, impl))
        else:
            result.kv = "refused: " + kv_built.message.removeprefix("KVCacheError: ").removeprefix(
                "kv_cache: cannot insert a KV cache: ")
            outcomes["kv_greedy"] = kv_built
    result.seconds = time.perf_counter() - start
    if not keep:
        forget(name, impl)
    return result


def _worker(name: str, impl: str) -> CaseResult:
    """A case in a worker process: one intra-op thread (the workers share the cores), CPU reference kernels."""
    torch.set_num_threads(1)
    with cpu_reference_kernels():
        return run_case(name, impl)


def default_workers() -> int:
    """FXOPT_GRID_WORKERS, else one worker process per core up to 2 (capture is single-threaded Python, so
    two processes halve the grid's time on CI's 2 cores); 0 or 1: everything in this process."""
    env = os.environ.get("FXOPT_GRID_WORKERS")
    return int(env) if env else min(2, os.cpu_count() or 1)


class Grid:
    """Results of cases, computed in worker processes (spawned: a clean torch in each) or in this process.

    Every case is submitted at once; `result(name, impl)` waits for that case only."""

    def __init__(self, cases: list[tuple[str, str]], workers: int | None = None):
        self.cases = list(dict.fromkeys(cases))
        workers = default_workers() if workers is None else workers
        self.workers = min(workers, len(self.cases))
        self._futures: dict[tuple[str, str], Any] = {}
        self._results: dict[tuple[str, str], CaseResult] = {}
        self._pool = None
        if self.workers > 1:
            import concurrent.futures
            import multiprocessing

            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers,
                                                                mp_context=multiprocessing.get_context("spawn"))
            for case in self.cases:
                self._futures[case] = self._pool.submit(_worker, *case)

    def result(self, name: str, impl: str) -> CaseResult:
        key = (name, impl)
        if key not in self._results:
            future = self._futures.get(key)
            if future is not None:
                try:
                    self._results[key] = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker died: the case's tests fail with why
                    failed = Outcome("fail", f"grid worker failed: {one_line(exc)}")
                    self._results[key] = CaseResult(name, impl, {t: failed for t in TESTS})
            else:
                with cpu_reference_kernels():
                    self._results[key] = run_case(name, impl)
        return self._results[key]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
