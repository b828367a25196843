"""How every fxopt Triton kernel family chooses its launch config: one mechanism for all of them.

A `TunedKernel` wraps a @triton.jit kernel with a config list, a `prune` that orders the configs fitting a
launch (heuristic default first) and a cache of the choice keyed by the launch's shape bucket (the `key`
arguments), its tensor dtypes and its device. Without tuning the first pruned config runs, so the first call of
an optimized model costs compiles, not a sweep. With the family's autotune knob on (FXOPT_AUTOTUNE or the
family's own, on a GPU) each candidate is timed once per cache key with `do_bench`, the fastest is kept in
memory and written to `<dump dir>/tuning/<family>.json` under the device's name, so a second process does not
tune again.

A repeated launch skips Triton's per-launch argument binding: the first launch with a given launch signature
(every non-tensor argument's value, each tensor's dtype, device, shape and 16-byte alignment, the keyword
arguments) records the compiled kernel, the grid and the constexpr tail of its arguments; later launches with
that signature call the compiled kernel's launcher directly, as torch.compile's generated code does. A grid
may depend only on the launch's arguments and tensor shapes (it is evaluated once per signature).

The families: the generated fused kernels (codegen/fused_runtime.py), RoPE (codegen/rope.py), the decode GEMVs
(codegen/gemv.py) and prefill attention (codegen/flash_attention.py). Flash-Decoding's split kernel has no
config list: its tiles follow from the plan it caches per cache shape (codegen/flash_decoding.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import triton
from triton.runtime import driver
from triton.testing import do_bench

from fxopt import config as knobs

try:  # Triton >= 3.4: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

WARMUP_MS, REP_MS = 5, 25  # configs differ by a few percent; compile time dominates a sweep

Prune = Callable[..., list]  # prune(configs, named_args, **kwargs) -> the fitting configs, default first

MAX_SIGNATURES = 4096  # direct launchers kept per kernel before the table starts over
_DRY_RUNS = [0]  # > 0 inside `dry_run()`: launches go through Triton (which then only compiles)


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
        self.direct: dict[tuple, DirectLaunch] = {}  # by launch_signature

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, *args, **kwargs)

    def run(self, grid, *args, **kwargs):
        signature = launch_signature(args, kwargs)
        try:
            direct = self.direct.get(signature)
        except TypeError:  # an unhashable argument
            direct = signature = None
        if direct is not None and not _DRY_RUNS[0] and direct.device == driver.active.get_current_device():
            return direct(args, self.arg_names)
        key = self.cache_key(args, kwargs)
        choice = self.chosen.get(key)
        if choice is None:
            choice = self.chosen[key] = _with_launch_kwargs(self.choose(key, grid, args, kwargs))
        kernel = self._launch(grid, choice, args, kwargs)
        if signature is not None and not _DRY_RUNS[0]:
            self._remember(signature, kernel, grid, choice, args, kwargs)
        return kernel

    def _remember(self, signature, kernel, grid, choice, args, kwargs) -> None:
        """Record a direct launcher for this signature when Triton gave a loaded compiled kernel (not in the
        interpreter) and every argument past the positional ones has a value."""
        if getattr(kernel, "function", None) is None or not hasattr(kernel, "packed_metadata"):
            return
        config, launch_kwargs = choice
        params = getattr(self.fn, "params", None)
        if params is None:
            return
        tail = []
        for param in params[len(args):]:
            if param.name in kwargs:
                tail.append(kwargs[param.name])
            elif param.name in launch_kwargs:
                tail.append(launch_kwargs[param.name])
            elif param.has_default:
                tail.append(param.default)
            else:
                return
        named = {**dict(zip(self.arg_names, args)), **kwargs, **launch_kwargs}
        grid = tuple(grid(named) if callable(grid) else grid) + (1, 1)
        if len(self.direct) >= MAX_SIGNATURES:
            self.direct.clear()
        hook_kwargs = {**kwargs, **launch_kwargs} if config.pre_hook is not None else None
        self.direct[signature] = DirectLaunch(kernel, grid[:3], tuple(tail), config.pre_hook, hook_kwargs,
                                              driver.active.get_current_device())

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


class DirectLaunch:
    """One launch signature's compiled kernel, grid and constexpr tail: a launch calls the kernel's launcher
    with the positional arguments and the tail (Triton's own launch, minus its argument binding)."""

    __slots__ = ("kernel", "grid", "tail", "pre_hook", "kwargs", "device")

    def __init__(self, kernel, grid, tail, pre_hook, kwargs, device):
        self.kernel, self.grid, self.tail, self.pre_hook, self.kwargs, self.device = (
            kernel, grid, tail, pre_hook, kwargs, device)

    def __call__(self, args, arg_names):
        if self.pre_hook is not None:
            self.pre_hook({**dict(zip(arg_names, args)), **self.kwargs})
        kernel, (g0, g1, g2) = self.kernel, self.grid
        enter, exit_ = _hook(triton.knobs.runtime.launch_enter_hook), _hook(triton.knobs.runtime.launch_exit_hook)
        stream = driver.active.get_current_stream(self.device)
        metadata = kernel.launch_metadata(self.grid, stream, *args, *self.tail) if enter is not None else None
        kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, metadata, enter, exit_,
                   *args, *self.tail)
        return kernel


def _hook(chain):
    """A launch hook (Triton's HookChain) as the launcher takes it: None when nothing is registered."""
    return None if chain is None or not getattr(chain, "calls", True) else chain


def launch_signature(args, kwargs) -> tuple:
    """What a compiled launch depends on besides tensor addresses: non-tensor values (Triton specialises ints
    on their value), tensor dtypes, devices, shapes (a grid may read them) and 16-byte alignment (Triton
    specialises pointers on it), TMA descriptors' layout, and the keyword arguments (constexprs), each value
    with its type. A launch
    whose signature cannot be hashed always goes through Triton."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.get_device(), a.shape, a.data_ptr() % 16 == 0))
        elif TensorDescriptor is not None and isinstance(a, TensorDescriptor):
            base = a.base
            parts.append((base.dtype, base.get_device(), tuple(a.shape), tuple(a.strides), tuple(a.block_shape),
                          base.data_ptr() % 16 == 0))
        else:
            parts.append((a.__class__, a))  # 1, 1.0 and True hash alike; Triton types them apart
    return tuple(parts), tuple((name, value.__class__, value) for name, value in kwargs.items())


@contextlib.contextmanager
def dry_run():
    """Inside the block every launch goes through Triton (codegen/precompile.py's compile-only launches) and
    none is recorded."""
    _DRY_RUNS[0] += 1
    try:
        yield
    finally:
        _DRY_RUNS[0] -= 1


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
