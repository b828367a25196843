"""How every fxopt Triton kernel family chooses its launch config: one mechanism for all of them.

A `TunedKernel` wraps a @triton.jit kernel with a config list, a `prune` that orders the configs fitting a
launch (heuristic default first) and a cache of the choice keyed by the launch's shape bucket (the `key`
arguments), its tensor dtypes and its device. Without tuning the first pruned config runs, so the first call of
an optimized model costs compiles, not a sweep. With the family's autotune knob on (FXOPT_AUTOTUNE or the
family's own, on a GPU) each candidate is timed once per cache key with `do_bench`, the fastest is kept in
memory and written to `<dump dir>/tuning/<family>.json` under the device's name, so a second process does not
tune again. A repeated launch costs one key lookup.

The families: the generated fused kernels (codegen/fused_runtime.py), RoPE (codegen/rope.py), the decode GEMVs
(codegen/gemv.py) and prefill attention (codegen/flash_attention.py). Flash-Decoding's split kernel has no
config list: its tiles follow from the plan it caches per cache shape (codegen/flash_decoding.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import triton
from triton.testing import do_bench

from fxopt import config as knobs

WARMUP_MS, REP_MS = 5, 25  # configs differ by a few percent; compile time dominates a sweep

Prune = Callable[..., list]  # prune(configs, named_args, **kwargs) -> the fitting configs, default first


class TunedKernel:
    """A Triton kernel launched as `kernel[grid](*args, **kwargs)` with the config chosen for that launch.

    `key` names the arguments whose values select a config (the shape bucket and the constexpr flags that
    change the code); `prune(configs, named_args, **kwargs)` returns the candidates for a launch, best guess
    first, and may derive configs of its own (e.g. a flag that depends on the tile). `tune` is a bool or the
    name of a knob read when a new key is seen. A config's `pre_hook` runs before each launch that uses it."""

    def __init__(self, fn, configs: Sequence[triton.Config], key: Sequence[str], prune: Prune | None = None, *,
                 family: str, tune: bool | str = False):
        self.fn, self.configs, self.prune, self.family, self.tune = fn, list(configs), prune, family, tune
        self.arg_names = list(fn.arg_names)
        self.key_at = [(self.arg_names.index(name), name) for name in key]
        self.chosen: dict[tuple, tuple[triton.Config, dict]] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, *args, **kwargs)

    def run(self, grid, *args, **kwargs):
        key = self.cache_key(args, kwargs)
        choice = self.chosen.get(key)
        if choice is None:
            choice = self.chosen[key] = _with_launch_kwargs(self.choose(key, grid, args, kwargs))
        return self._launch(grid, choice, args, kwargs)

    def cache_key(self, args, kwargs) -> tuple:
        """The key arguments' values, the tensor arguments' dtypes and the device of the first tensor."""
        values = tuple(args[i] if i < len(args) else kwargs[name] for i, name in self.key_at)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = str(tensors[0].device) if tensors else "cpu"
        return values, tuple(t.dtype for t in tensors), device

    def candidates(self, args, kwargs) -> list[triton.Config]:
        if self.prune is None:
            return self.configs
        kept = self.prune(self.configs, dict(zip(self.arg_names, args)), **kwargs)
        if not kept:
            raise ValueError(f"{self.family}: no launch config fits these arguments")
        return kept

    def config(self, args, kwargs) -> triton.Config:
        """The config a launch with these arguments runs (chosen, and timed when tuning, on first sight)."""
        key = self.cache_key(args, kwargs)
        if key not in self.chosen:
            self.chosen[key] = _with_launch_kwargs(self.choose(key, None, args, kwargs))
        return self.chosen[key][0]

    def choose(self, key, grid, args, kwargs) -> triton.Config:
        configs = self.candidates(args, kwargs)
        if len(configs) == 1 or grid is None or not can_time(key[2]) or not self._tuning():
            return configs[0]
        disk_key = f"{_device_name(key[2])}|{key[0]!r}|{[str(d) for d in key[1]]}"
        stored = _read_cache(self.family).get(disk_key)
        for config in configs:
            if stored is not None and _describe(config) == stored:
                return config
        times = [self._time(grid, config, args, kwargs) for config in configs]
        best = configs[min(range(len(configs)), key=times.__getitem__)]
        _write_cache(self.family, disk_key, _describe(best))
        return best

    def _tuning(self) -> bool:
        return knobs.get(self.tune) if isinstance(self.tune, str) else bool(self.tune)

    def _launch(self, grid, choice, args, kwargs):
        config, launch_kwargs = choice
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **launch_kwargs})
        return self.fn[grid](*args, **kwargs, **launch_kwargs)

    def _time(self, grid, config, args, kwargs) -> float:
        choice = _with_launch_kwargs(config)
        try:
            return do_bench(lambda: self._launch(grid, choice, args, kwargs), warmup=WARMUP_MS, rep=REP_MS)
        except (triton.OutOfResources, triton.CompilationError):
            return math.inf


def tuned(configs: Sequence[triton.Config], key: Sequence[str], prune: Prune | None = None, *, family: str,
          tune: bool | str = False):
    """Decorator form of TunedKernel for a @triton.jit function."""
    return lambda fn: TunedKernel(fn, configs, key, prune, family=family, tune=tune)


def can_time(device: str) -> bool:
    """Configs are timed on GPUs only (the interpreter's timings say nothing about a GPU)."""
    return device.startswith("cuda")


def _with_launch_kwargs(config: triton.Config) -> tuple[triton.Config, dict]:
    return config, config.all_kwargs()


def _describe(config: triton.Config) -> dict[str, Any]:
    return {"kwargs": {k: v for k, v in config.kwargs.items()}, "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


def _cache_path(family: str) -> Path:
    root = knobs.get("dump_dir") or Path.home() / ".cache" / "fxopt"
    return Path(root) / "tuning" / f"{family}.json"


def _read_cache(family: str) -> dict:
    try:
        return json.loads(_cache_path(family).read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(family: str, key: str, value: dict) -> None:
    """Best effort: a read-only cache directory only costs the next process a sweep."""
    path = _cache_path(family)
    entries = _read_cache(family)
    entries[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(entries)}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass
