"""The numerical contract (DESIGN.md "Numerics") and `verify`.

Both the optimized and the eager result are compared with a float64 reference: the optimized
error may be at most 2x eager's (3x for fp16/bf16 outputs), plus a small floor so exact eager
results do not demand exact optimized ones.
"""

from __future__ import annotations

import copy

import torch
from torch import fx
from torch.utils import _pytree as pytree

ERROR_FACTOR = {torch.float16: 3.0, torch.bfloat16: 3.0}
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}


class VerificationError(AssertionError):
    """The optimized module disagrees with the original beyond the tolerance."""


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item() if value.numel() else 0.0


def within_tolerance(
    optimized: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor
) -> tuple[bool, float, float]:
    """(ok, optimized error, allowed error) of one output against its float64 reference."""
    if not optimized.is_floating_point():
        return bool(torch.equal(optimized, eager)), float(not torch.equal(optimized, eager)), 0.0
    if not torch.isfinite(optimized).all() and torch.isfinite(reference).all():
        return False, float("inf"), 0.0
    scale = reference.double().abs().max().item() if reference.numel() else 0.0
    allowed = ERROR_FACTOR.get(eager.dtype, 2.0) * max_error(eager, reference) + FLOOR.get(
        eager.dtype, 1e-6
    ) * max(scale, 1.0)
    error = max_error(optimized, reference)
    return error <= allowed, error, allowed


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(torch.float64)


def _to_float64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _tensors(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def verify(model: torch.nn.Module, optimized: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Run original, optimized and a float64 copy; raise VerificationError naming the worst region."""
    eager = _tensors(model(*args, **kwargs))
    fast = _tensors(optimized(*args, **kwargs))
    args64 = [_to_float64(a) for a in args]
    reference = _tensors(float64_copy(model)(*args64, **{k: _to_float64(v) for k, v in kwargs.items()}))
    failures = []
    for index, (o, e, r) in enumerate(zip(fast, eager, reference)):
        ok, error, allowed = within_tolerance(o, e, r)
        if not ok:
            failures.append(f"output {index}: error {error:.3g} > allowed {allowed:.3g}")
    if failures:
        worst = worst_region(optimized.gm, args, kwargs) if hasattr(optimized, "gm") else None
        where = f"; worst region: {worst[0]} (error {worst[1]:.3g})" if worst else ""
        raise VerificationError("optimized model disagrees with eager: " + "; ".join(failures) + where)


class _RegionChecker(fx.Interpreter):
    """Runs the optimized graph and, at every fused call, compares the kernel with its reference."""

    def __init__(self, gm):
        super().__init__(gm)
        self.errors: dict[str, float] = {}

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        module = self.fetch_attr(target)
        kernel = getattr(module, "kernel", None)
        if kernel is not None:
            expected = kernel.reference(*[_to_float64(a) for a in args])
            errs = [
                max_error(o, e) / max(e.double().abs().max().item(), 1e-12)
                for o, e in zip(_tensors(out), _tensors(expected))
                if o.is_floating_point()
            ]
            self.errors[str(target)] = max(errs, default=0.0)
        return out


@torch.no_grad()
def worst_region(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[str, float] | None:
    """The fused region whose kernel strays furthest (relative error) from its float64 reference."""
    checker = _RegionChecker(gm)
    flat = pytree.tree_leaves((tuple(args), kwargs))
    checker.run(*flat)
    if not checker.errors:
        return None
    return max(checker.errors.items(), key=lambda item: item[1])
