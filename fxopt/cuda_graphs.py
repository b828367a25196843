"""CUDA graphs for an optimized forward: one captured graph per input-shape bucket, replayed.

A forward of a few hundred kernels pays the host's cost of launching each of them (Python launchers,
argument handling) on every call; replaying a captured CUDA graph launches them all at once. This is what
torch.compile's mode="reduce-overhead" does, for fxopt.optimize's module.

The contract, per bucket (the shapes, dtypes and devices of the tensor inputs plus the other inputs' values):
* the first call of a bucket runs the forward uncaptured (warm-up: compiles and autotunes kernels), then
  captures it into a graph whose inputs and outputs live in static buffers, all buckets sharing one
  memory pool;
* every call copies the inputs into the bucket's buffers, replays, and returns *copies* of the outputs, so
  a result the caller keeps is never overwritten by a later call (the copy is one read and write of the
  outputs: for logits (b, s, vocab) it is part of the measured time);
* a bucket whose forward runs faster launched kernel by kernel than replayed and copied out keeps no graph
  (the first call times both, TIMED_CALLS each, best of): at GPU-bound shapes the launches hide behind the
  GPU work while a replay still copies its outputs, e.g. (8, 1024, 128256) bf16 logits, 2.1 GB;
* at most `max_graphs` buckets are captured; a call outside them runs uncaptured, with one warning;
* a forward that cannot be captured (a host sync, a CPU tensor) runs uncaptured from then on, with one
  warning naming the error;
* calls with autograd on run uncaptured (a replay would not rebuild the autograd graph), with one warning:
  call under torch.no_grad() or torch.inference_mode().
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

MAX_GRAPHS = 8  # input-shape buckets captured per module before calls run uncaptured
WARMUP_CALLS = 2  # uncaptured calls on a side stream before a capture (kernel compiles, autotuning)
TIMED_CALLS = 2  # after a capture, replays and uncaptured calls timed (best of) to decide whether to keep it
KEEP_GRAPH_UNLESS = 0.99  # the graph is dropped when uncaptured calls take less than this share of a replay's time


class _Bucket:
    """One captured graph: its static inputs (flat), its static outputs (a pytree) and the graph (None: this
    bucket runs uncaptured, measured faster)."""

    def __init__(self, graph: torch.cuda.CUDAGraph | None, inputs: list, outputs: Any):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs

    def replay(self, leaves: list) -> Any:
        for static, given in zip(self.inputs, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(given)
        self.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.outputs)


class GraphedForward:
    """Calls `fn(*args, **kwargs)` through a CUDA graph per input bucket (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], *, max_graphs: int = MAX_GRAPHS, name: str = "forward"):
        self.fn, self.max_graphs, self.name = fn, max_graphs, name
        self.buckets: dict[tuple, _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.disabled = ""  # why graphs are off (a failed capture), "" while they are on
        self._warned_full = self._warned_grad = False
        self.uncaptured_calls = 0

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if self.disabled or not _all_cuda(leaves):
            return self._uncaptured(args, kwargs)
        if torch.is_grad_enabled():
            if not self._warned_grad:
                warnings.warn(f"fxopt: {self.name} called with autograd on: it runs without its CUDA graph (call it "
                              "under torch.no_grad() or torch.inference_mode())", stacklevel=3)
                self._warned_grad = True
            return self._uncaptured(args, kwargs)
        key = (spec, tuple(_key(leaf) for leaf in leaves))
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_graphs:
                if not self._warned_full:
                    warnings.warn(f"fxopt: {self.name}: {self.max_graphs} input shapes already have CUDA graphs; "
                                  "calls at other shapes run without one (cuda_graphs=False turns them off)",
                                  stacklevel=3)
                    self._warned_full = True
                return self._uncaptured(args, kwargs)
            bucket = self._capture(key, leaves, spec)
            if bucket is None:
                return self._uncaptured(args, kwargs)
        if bucket.graph is None:
            return self._uncaptured(args, kwargs)
        return bucket.replay(leaves)

    def _uncaptured(self, args, kwargs):
        self.uncaptured_calls += 1
        return self.fn(*args, **kwargs)

    def _capture(self, key: tuple, leaves: list, spec) -> _Bucket | None:
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self.fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: run without, say why once
            torch.cuda.synchronize()
            self.disabled = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"fxopt: {self.name} could not be captured in a CUDA graph ({self.disabled}); it runs "
                          "without one", stacklevel=4)
            return None
        bucket = _Bucket(graph, static, outputs)
        uncaptured_s = _best_time(lambda: self.fn(*args, **kwargs))
        if uncaptured_s < KEEP_GRAPH_UNLESS * _best_time(lambda: bucket.replay(static)):
            bucket = _Bucket(None, [], None)  # frees the graph and its static outputs
        self.buckets[key] = bucket
        return bucket


def _best_time(call: Callable[[], Any]) -> float:
    """Seconds of the fastest of TIMED_CALLS calls, the GPU synchronized around each."""
    best = float("inf")
    for _ in range(TIMED_CALLS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad)
    return ("value", leaf)


def _all_cuda(leaves: list) -> bool:
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return bool(tensors) and all(t.is_cuda for t in tensors)
