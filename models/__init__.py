"""Reference transformer family (installed as fxopt.models).

Four plain-PyTorch families -- GPT-2-style and Llama-style decoders, a BERT-style encoder and
the encoder-decoder Transformer -- each a frozen config dataclass plus an ``nn.Module``, with
named presets from "tiny" (for tests) to "70b-like" (for analysis on the meta device).

    model = build("llama-7b-like", n_layers=2, attn_impl="explicit")
    kwargs = model.example_inputs(batch=2, seq=16)
    logits = model(**kwargs)

Every model has ``config``, ``is_causal_lm``, ``example_inputs(batch, seq, *, device, seed)``
and ``dynamic_dims()`` (each input's dynamic dims named by role, for torch.export).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .bert import PRESETS as _BERT_PRESETS
from .bert import Bert, BertConfig
from .gpt import GPT, GPTConfig
from .gpt import PRESETS as _GPT_PRESETS
from .llama import PRESETS as _LLAMA_PRESETS
from .llama import Llama, LlamaConfig, RMSNorm
from .transformer import PRESETS as _TRANSFORMER_PRESETS
from .transformer import Transformer, TransformerConfig

__all__ = [
    "PRESETS",
    "MODEL_CLASSES",
    "INIT_STD",
    "Config",
    "build",
    "get_config",
    "init_weights",
    "param_count",
    "GPT",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "Bert",
    "BertConfig",
    "Transformer",
    "TransformerConfig",
]

Config = GPTConfig | LlamaConfig | BertConfig | TransformerConfig

#: Which model class a config builds.
MODEL_CLASSES: dict[type, type[nn.Module]] = {
    GPTConfig: GPT,
    LlamaConfig: Llama,
    BertConfig: Bert,
    TransformerConfig: Transformer,
}

#: Every named configuration, name -> config instance.
PRESETS: dict[str, Config] = {
    **_GPT_PRESETS,
    **_LLAMA_PRESETS,
    **_BERT_PRESETS,
    **_TRANSFORMER_PRESETS,
}

#: Standard deviation of the random weights (GPT-2's), so activations and logits stay O(1).
INIT_STD = 0.02


def get_config(name_or_config: str | Config, **overrides) -> Config:
    """A preset by name (or a config as given), with ``overrides`` replacing fields."""
    if isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise KeyError(f"unknown model preset {name_or_config!r}; known presets: {sorted(PRESETS)}")
        config = PRESETS[name_or_config]
    else:
        config = name_or_config
    if type(config) not in MODEL_CLASSES:
        known = [c.__name__ for c in MODEL_CLASSES]
        raise TypeError(f"expected a preset name or one of {known}, got {config!r}")
    if overrides:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"{type(config).__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    return config


def build(
    name_or_config: str | Config,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
) -> nn.Module:
    """Build a model with seeded random weights, in eval mode.

    The module is first built on the meta device, so nothing is allocated twice and
    ``device="meta"`` builds even llama-70b-like for free (parameters without storage, for
    shape analysis and export). For a real device the storage is then allocated directly in
    ``dtype`` and filled by :func:`init_weights`; non-persistent buffers (masks, RoPE and
    sinusoid tables) are recomputed by each module's ``reset_buffers``.

    The same (config, seed, device type) always gives the same weights, whatever the dtype:
    values are drawn in fp32 and rounded to ``dtype``.
    """
    config = get_config(name_or_config, **overrides)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    device = torch.device(device)
    with torch.device("meta"):
        model = MODEL_CLASSES[type(config)](config)
    model = model.to(dtype=dtype)
    if device.type != "meta":
        model = model.to_empty(device=device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # to_empty gives each module its own tensor
        for module in model.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()
        init_weights(model, seed=seed)
    return model.eval()


@torch.no_grad()
def init_weights(model: nn.Module, *, seed: int = 0, std: float = INIT_STD) -> None:
    """Fill every parameter with seeded normal noise; none is left zero or constant.

    Linear and embedding weights and all biases ~ N(0, std); norm weights ~ 1 + N(0, std), so
    they start near identity without being constant. Values are drawn in fp32 from a private
    generator on the parameters' device (the global RNG is untouched) and cast on copy. Shared
    (tied) parameters are filled once.
    """
    params = list(model.parameters())
    if not params:
        return
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.LayerNorm, RMSNorm))
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            values = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * std
            if is_norm and name == "weight":
                values += 1.0
            p.copy_(values)


def param_count(model: nn.Module) -> int:
    """Number of parameters, counting a tied (shared) tensor once."""
    return sum(p.numel() for p in model.parameters())
