"""Resolve a MODEL argument to a module and example inputs.

MODEL is one of
  * a models/ preset name: ``gpt2-medium``, ``llama-70b-like`` (``fxopt.models.PRESETS``);
  * a factory path ``package.module:factory`` returning a module (or ``(module, example_kwargs)``);
  * ``hf:MODEL_TYPE[,key=value...]``: a transformers config built from its defaults, random weights
    (needs the ``hf`` extra; nothing is downloaded), e.g. ``hf:llama,num_hidden_layers=2``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from fxopt import models


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **overrides
) -> torch.nn.Module:
    if spec in models.PRESETS:
        return models.build(spec, device=device, dtype=dtype, **overrides)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], device=device, dtype=dtype, **overrides)
    if ":" in spec:
        return _load_factory(spec, device=device, dtype=dtype)
    raise ValueError(
        f"unknown model {spec!r}: use a preset ({', '.join(sorted(models.PRESETS))}), "
        "package.module:factory, or hf:MODEL_TYPE"
    )


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _load_hf(spec: str, *, device, dtype, **overrides) -> torch.nn.Module:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError("hf: models need the hf extra: pip install -e '.[hf]'") from exc
    model_type, *pairs = spec.split(",")
    fields = dict(pair.split("=", 1) for pair in pairs)
    config = transformers.AutoConfig.for_model(
        model_type, **{k: _parse_value(v) for k, v in fields.items()}, **overrides
    )
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    auto = transformers.AutoModel if model_type in HF_ENCODERS else transformers.AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(config, torch_dtype=dtype)
    return model.eval()


HF_ENCODERS = {"bert", "roberta", "distilbert", "electra"}


def _load_factory(spec: str, *, device, dtype) -> torch.nn.Module:
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    made = factory()
    model = made[0] if isinstance(made, tuple) else made
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
