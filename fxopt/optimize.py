"""`fxopt.optimize`: a faster module with the model's call signature, built by the pipeline."""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch

from fxopt import numerics
from fxopt.capture import capture
from fxopt.pipeline import Program, make_context, run_passes


class OptimizedModule(torch.nn.Module):
    """The optimized graph, called like the original model; `program` holds what the passes did."""

    def __init__(self, program: Program, signature: inspect.Signature | None = None, positional: bool = False):
        super().__init__()
        self.gm = program.gm
        self.program = program
        self.fixed_kwargs = program.captured.fixed_kwargs  # e.g. use_cache=False for HF models
        self.signature = signature  # the model's: positional calls bind to the captured keyword names
        self.positional = positional  # captured through forward(*args)

    def forward(self, *args, **kwargs):
        if args and not self.positional and self.signature is not None:
            args, kwargs = (), dict(self.signature.bind(*args, **kwargs).arguments)
        return self.gm(*args, **{**self.fixed_kwargs, **kwargs})

    def report(self) -> str:
        """What was fused, what attention became, and what stayed a PyTorch op."""
        lines = []
        for name, result in self.program.results.items():
            counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
            lines.append(
                f"{name}: {'changed' if result.changed else 'unchanged'}{' (' + counts + ')' if counts else ''}"
            )
            lines.extend(f"  {note}" for note in result.notes)
        return "\n".join(lines)


def split_inputs(model: torch.nn.Module, example_inputs) -> tuple[tuple, dict[str, Any]]:
    """Example inputs as (positional, keyword): a tuple binds to forward's named parameters where it can."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return tuple(example_inputs), {}
    return (), dict(inspect.signature(model.forward).bind(*example_inputs).arguments)


def _precompile(optimized: OptimizedModule, args: tuple, kwargs: dict) -> bool:
    """Compile all of the program's Triton kernels at once (a dry call, see codegen/precompile.py) so the
    first real call does not compile them one by one. Only on CUDA inputs and without autotuning."""
    from torch.utils import _pytree as pytree

    from fxopt.codegen import precompile

    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors or not all(t.is_cuda for t in tensors) or precompile.autotuning() or not precompile.available():
        return False
    with torch.no_grad(), precompile.compile_in_parallel():
        optimized(*args, **kwargs)
    return True


def optimize(
    model: torch.nn.Module,
    example_inputs,
    *,
    hw=None,
    fuse: bool = True,
    attention: bool = True,
    matmul: bool = True,
    verify: bool = False,
    dump_dir=None,
    dynamic_dims=None,
    kv_cache: bool = False,
    max_seq_len: int | None = None,
    max_batch: int | None = None,
    **options,
):
    """Capture `model`, rewrite attention, fuse memory-bound regions into generated Triton kernels.

    Returns an nn.Module called like `model` (or, with kv_cache=True, a generator with prefill,
    decode_step and generate). The user's model is never mutated. With verify=True the optimized
    module is run against the original on the example inputs and a disagreement beyond the
    tolerance of DESIGN.md raises, naming the worst region.
    """
    args, kwargs = split_inputs(model, example_inputs)
    if kv_cache:
        from fxopt.generate import build_generator

        return build_generator(model, kwargs, max_seq_len=max_seq_len, max_batch=max_batch, hw=hw, matmul=matmul,
                               **options)
    start = time.perf_counter()
    captured = capture(model, kwargs, dynamic_dims, args=args, source_lines=False)  # errors here name nodes
    capture_seconds = time.perf_counter() - start
    ctx = make_context(
        captured, hw, None, {"fuse": fuse, "rope": fuse, "attention": attention, "matmul": matmul, "dump_dir": dump_dir,
         **options}
    )
    optimized = OptimizedModule(run_passes(captured, ctx), inspect.signature(model.forward), positional=bool(args))
    optimized.program.seconds = {"capture": capture_seconds, **optimized.program.seconds}
    start = time.perf_counter()
    if _precompile(optimized, args, kwargs):
        optimized.program.seconds["precompile"] = time.perf_counter() - start
    if verify:
        numerics.verify(model, optimized, args, {**kwargs, **captured.fixed_kwargs})
    return optimized
