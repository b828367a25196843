"""Resolve a MODEL argument to a module and example inputs.

MODEL is one of
  * a models/ preset name: ``gpt2-medium``, ``llama-70b-like`` (``fxopt.models.PRESETS``);
  * a factory path ``package.module:factory`` returning a module (or ``(module, example_kwargs)``);
  * ``hf:MODEL_TYPE[,key=value...]``: a transformers config built from its defaults, random weights
    (needs the ``hf`` extra; nothing is downloaded), e.g. ``hf:llama,num_hidden_layers=2``;
  * ``hf:NAME[,key=value...]`` for a published checkpoint's architecture in HF_CONFIGS (its config.json's
    sizes, random weights), e.g. ``hf:llama-3.2-1b`` or ``hf:mistral-7b,num_hidden_layers=4``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

import torch

from fxopt import models
from fxopt.errors import UserError, require_positive

#: Config fields that bound the sequence length (a learned position table, a RoPE/sinusoid table, a mask).
POSITION_FIELDS = ("max_positions", "max_seq_len", "n_positions", "max_position_embeddings", "n_ctx",
                   "max_sequence_length", "block_size")


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **overrides
) -> torch.nn.Module:
    if spec in models.PRESETS:
        return models.build(spec, device=device, dtype=dtype, **overrides)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], device=device, dtype=dtype, **overrides)
    if ":" in spec:
        return _load_factory(spec, device=device, dtype=dtype)
    close = difflib.get_close_matches(spec, list(models.PRESETS), n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"unknown model {spec!r}",
        f"{guess}use a preset ({', '.join(sorted(models.PRESETS))}), package.module:factory, or hf:MODEL_TYPE",
    )


def position_limit(model: torch.nn.Module | Any) -> int | None:
    """The longest sequence `model` can take: its config's position-table size (`max_positions`,
    `n_positions`, HF `max_position_embeddings`, ...); None for a model without a position table.
    Accepts a module or a config."""
    config = getattr(model, "config", model)
    if config is None:
        return None
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def spec_position_limit(spec: str) -> int | None:
    """position_limit of a preset by name, without building it (None for other specs)."""
    config = models.PRESETS.get(spec)
    return position_limit(config) if config is not None else None


def check_sizes(model: torch.nn.Module | Any, spec: str, *, batch: int | None = None, seq: int | None = None,
                seq_flag: str = "--seq") -> None:
    """UserError for a batch/seq <= 0, or a seq past the model's position table (before any capture)."""

    require_positive("--batch", batch)
    require_positive(seq_flag, seq)
    limit = position_limit(model)
    if seq is not None and limit is not None and seq > limit:
        raise UserError(f"{seq_flag} {seq} is past {spec}'s position table ({limit} positions)",
                        f"use {seq_flag} {limit} or less")


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)

#: Published checkpoints' architectures (the sizes in their config.json), as hf: specs: the real-model rows of
#: the benchmarks, built with random weights. Sizes only: Llama-3.2-1B's llama3 rope_scaling is left out (it
#: changes the RoPE frequencies, not the work per token).
HF_CONFIGS = {
    "llama-3.2-1b": "llama,hidden_size=2048,intermediate_size=8192,num_hidden_layers=16,num_attention_heads=32,"
                    "num_key_value_heads=8,head_dim=64,vocab_size=128256,tie_word_embeddings=true,"
                    "rope_theta=500000.0,max_position_embeddings=131072,rms_norm_eps=1e-05",
    "mistral-7b": "mistral,hidden_size=4096,intermediate_size=14336,num_hidden_layers=32,num_attention_heads=32,"
                  "num_key_value_heads=8,head_dim=128,vocab_size=32768,sliding_window=none,rope_theta=1000000.0,"
                  "max_position_embeddings=32768,rms_norm_eps=1e-05",
    "qwen2.5-0.5b": "qwen2,hidden_size=896,intermediate_size=4864,num_hidden_layers=24,num_attention_heads=14,"
                    "num_key_value_heads=2,vocab_size=151936,tie_word_embeddings=true,rope_theta=1000000.0,"
                    "max_position_embeddings=32768,rms_norm_eps=1e-06,use_sliding_window=false",
    "qwen3-0.6b": "qwen3,hidden_size=1024,intermediate_size=3072,num_hidden_layers=28,num_attention_heads=16,"
                  "num_key_value_heads=8,head_dim=128,vocab_size=151936,tie_word_embeddings=true,"
                  "rope_theta=1000000.0,max_position_embeddings=40960,rms_norm_eps=1e-06",
    "gpt2-medium": "gpt2,n_embd=1024,n_layer=24,n_head=16,n_positions=1024,vocab_size=50257",
    "pythia-410m": "gpt_neox,hidden_size=1024,intermediate_size=4096,num_hidden_layers=24,num_attention_heads=16,"
                   "vocab_size=50304,rotary_pct=0.25,rotary_emb_base=10000,max_position_embeddings=2048,"
                   "use_parallel_residual=true,layer_norm_eps=1e-05,tie_word_embeddings=false",
    "stablelm-2-1.6b": "stablelm,hidden_size=2048,intermediate_size=5632,num_hidden_layers=24,num_attention_heads=32,"
                       "num_key_value_heads=32,vocab_size=100352,partial_rotary_factor=0.25,rope_theta=10000.0,"
                       "use_qkv_bias=true,max_position_embeddings=4096,layer_norm_eps=1e-05",
    "phi-2": "phi,hidden_size=2560,intermediate_size=10240,num_hidden_layers=32,num_attention_heads=32,"
             "num_key_value_heads=32,vocab_size=51200,partial_rotary_factor=0.4,rope_theta=10000.0,"
             "max_position_embeddings=2048,layer_norm_eps=1e-05",
}


def _expand_hf(spec: str) -> str:
    """An hf:NAME spec with a published architecture's name expanded into its fields (later fields win)."""
    name, _, rest = spec.partition(",")
    known = HF_CONFIGS.get(name.lower())
    return known + ("," + rest if rest else "") if known else spec


def _load_hf(spec: str, *, device, dtype, **overrides) -> torch.nn.Module:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise UserError("hf: models need transformers, which is not installed",
                        "pip install -e '.[hf]'") from exc
    model_type, *pairs = _expand_hf(spec).split(",")
    bad = [pair for pair in pairs if "=" not in pair or not pair.split("=", 1)[0]]
    if not model_type or bad:
        raise UserError(f"bad hf: model spec 'hf:{spec}'" + (f" (no key=value in {bad[0]!r})" if bad else ""),
                        "write hf:MODEL_TYPE[,key=value...], e.g. hf:llama,num_hidden_layers=2")
    fields = dict(pair.split("=", 1) for pair in pairs)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise UserError(f"unknown transformers model type {model_type!r}",
                        "e.g. hf:llama, hf:gpt2, hf:mistral, or a published architecture: "
                        + ", ".join(f"hf:{name}" for name in HF_CONFIGS))
    try:
        config = transformers.AutoConfig.for_model(
            model_type, **{k: _parse_value(v) for k, v in fields.items()}, **overrides
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"transformers rejected 'hf:{spec}': {str(exc).splitlines()[0][:200]}",
                        "check the key=value fields against the model's config class") from exc
    asked = getattr(config, "_attn_implementation", None)
    config._attn_implementation = asked or "sdpa"
    auto = transformers.AutoModel if model_type in HF_ENCODERS else transformers.AutoModelForCausalLM
    with torch.device(device):
        try:
            model = auto.from_config(config, **{_hf_dtype_kwarg(transformers.__version__): dtype})
        except ValueError as exc:  # this transformers has no SDPA path for the architecture (GPT-J before 5.2x)
            if asked or "scaled_dot_product_attention" not in str(exc):
                raise
            config._attn_implementation = "eager"
            model = auto.from_config(config, **{_hf_dtype_kwarg(transformers.__version__): dtype})
    return model.eval()


def _hf_dtype_kwarg(version: str) -> str:
    """transformers 4.56 renamed from_config's torch_dtype to dtype (and warns about the old name)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


HF_ENCODERS = {"bert", "roberta", "distilbert", "electra"}


def _load_factory(spec: str, *, device, dtype) -> torch.nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"bad model spec {spec!r}", "write package.module:factory, e.g. mypkg.models:build")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise UserError(f"cannot import {module_name!r} (model {spec!r}): {exc}",
                            "check the module path and that its package is installed or on PYTHONPATH") from exc
        raise UserError(f"importing {module_name!r} (model {spec!r}) failed: {exc}",
                        "the module imports something that is not installed") from exc
    if not hasattr(module, attr):
        raise UserError(f"module {module_name!r} has no {attr!r} (model {spec!r})",
                        "name a function in it that returns a torch.nn.Module")
    factory = getattr(module, attr)
    if not callable(factory):
        raise UserError(f"{spec!r} is not callable", "name a function that returns a torch.nn.Module")
    made = factory()
    model = made[0] if isinstance(made, tuple) else made
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module",
                        "return a module, or (module, example_kwargs)")
    if isinstance(made, tuple):
        model._fxopt_example_kwargs = made[1]
    return model.to(device=device, dtype=dtype).eval() if device != "meta" else model.eval()


def example_inputs(model: torch.nn.Module, batch: int, seq: int, *, device=None) -> dict[str, torch.Tensor]:
    """Keyword inputs for `model` at (batch, seq): the model's own `example_inputs`, else token ids."""
    device = device or _device_of(model)
    if hasattr(model, "example_inputs"):
        return model.example_inputs(batch, seq, device=device)
    if hasattr(model, "_fxopt_example_kwargs"):
        return model._fxopt_example_kwargs
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    inputs = {"input_ids": ids}
    if type(model).__name__.lower().startswith(tuple(HF_ENCODERS)):
        inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=device)
    return inputs


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
