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

from fxopt.codegen.loader import ops_use_kernels
from fxopt.errors import GenerationError
from fxopt.zoo import position_limit as limit

ERROR_FACTOR = {torch.float16: 3.0, torch.bfloat16: 3.0}
NAN_REFERENCE_RTOL = 1e-4
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}


class VerificationError(AssertionError):
    """The optimized module disagrees with the original beyond the tolerance."""


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item() if value.numel() else 0.0


def within_tolerance(
    optimized: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor
) -> tuple[bool, float, float]:
    """(ok, optimized error, allowed error) of one output against its float64 reference.

    Where the float64 model itself overflows to NaN/inf but eager does not (HF masks fill with the dtype's
    minimum, which overflows in float64 on fully masked rows), eager stands in as the reference there, with a
    relative allowance of NAN_REFERENCE_RTOL instead of the float64 contract."""
    if not optimized.is_floating_point():
        return bool(torch.equal(optimized, eager)), float(not torch.equal(optimized, eager)), 0.0
    broken = ~torch.isfinite(reference) & torch.isfinite(eager)
    if bool(broken.any()):
        reference = torch.where(broken, eager.to(reference.dtype), reference)
    if not torch.isfinite(optimized).all() and torch.isfinite(reference).all():
        return False, float("inf"), 0.0
    scale = reference.double().abs().max().item() if reference.numel() else 0.0
    allowed = ERROR_FACTOR.get(eager.dtype, 2.0) * max_error(eager, reference) + FLOOR.get(
        eager.dtype, 1e-6
    ) * max(scale, 1.0)
    if bool(broken.any()):
        allowed = max(allowed, NAN_REFERENCE_RTOL * max(scale, 1.0))
    error = max_error(optimized, reference)
    return error <= allowed, error, allowed


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(torch.float64)


def _to_float64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _tensors(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


#: Extra keys past a window when verify picks its longer length (the band must slide past its width).
PAST_THRESHOLD = 8
def position_limit(model: torch.nn.Module) -> int | None:
    """Positions the model can embed (its position table), None when unbounded: fxopt.zoo's reading."""

    return limit(model)


def token_ids(kwargs: dict) -> torch.Tensor | None:
    """The example's 2-d integer input (token ids), if it has exactly one obvious one."""
    for name in ("input_ids", "ids", "idx", "tokens"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    ints = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()
            and v.dtype != torch.bool]
    return ints[0] if len(ints) == 1 else None


def _attention_windows(optimized) -> list[int]:
    gm = getattr(optimized, "gm", None)
    if gm is None:
        return []
    infos = [n.meta.get("fxopt.attention") for n in gm.graph.nodes]
    return [i.window for i in infos if getattr(i, "window", 0)]


def longer_length(model: torch.nn.Module, seq: int, windows: list[int]) -> int | None:
    """The second length verify checks: the longer of 2x the capture and every window + PAST_THRESHOLD,
    within the position table; None when it cannot be longer than `seq`."""
    length = max([2 * seq] + [w + PAST_THRESHOLD for w in windows])
    limit = position_limit(model)
    if limit is not None:
        length = min(length, limit)
    return length if length > seq else None


def _tile_seq(value, seq: int, length: int):
    """A (b, seq, ...) example input repeated along dim 1 to `length` (other values unchanged)."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != seq:
        return value
    reps = -(-length // seq)
    return value.repeat(1, reps, *([1] * (value.dim() - 2)))[:, :length]


def _comparable(output: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """Elements to compare: rows of padded queries (attention mask 0) are excluded -- fxopt defines a fully
    masked attention row as 0, whatever eager gives."""
    masks = [v for k, v in kwargs.items() if "mask" in k.lower() and isinstance(v, torch.Tensor) and v.dim() == 2]
    if len(masks) != 1 or output.dim() < 2 or tuple(output.shape[:2]) != tuple(masks[0].shape):
        return None
    keep = masks[0].to(output.device) != 0
    return keep.reshape(keep.shape + (1,) * (output.dim() - 2)).expand(output.shape)


def _kernels_statement(args: tuple, kwargs: dict) -> str:

    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if tensors and all(ops_use_kernels(t) for t in tensors):
        return "with the generated kernels" + (" (Triton interpreter)" if not tensors[0].is_cuda else "")
    return ("with the PyTorch references of fxopt's kernels only (no GPU: set TRITON_INTERPRET=1 "
            "FXOPT_INTERPRET_OPS=1 to run the generated kernels in the Triton interpreter)")


@torch.no_grad()
def verify(model: torch.nn.Module, optimized: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Run original, optimized and a float64 copy on one input; raise VerificationError naming the worst region."""
    eager = _tensors(model(*args, **kwargs))
    fast = _tensors(optimized(*args, **kwargs))
    args64 = [_to_float64(a) for a in args]
    reference = _tensors(float64_copy(model)(*args64, **{k: _to_float64(v) for k, v in kwargs.items()}))
    failures = []
    for index, (o, e, r) in enumerate(zip(fast, eager, reference)):
        keep = _comparable(o, kwargs)
        if keep is not None:
            o, e, r = o[keep], e[keep], r[keep]
        ok, error, allowed = within_tolerance(o, e, r)
        if not ok:
            failures.append(f"output {index}: error {error:.3g} > allowed {allowed:.3g}")
    if failures:
        worst = worst_region(optimized.gm, args, kwargs) if hasattr(optimized, "gm") else None
        where = f"; worst region: {worst[0]} (error {worst[1]:.3g})" if worst else ""
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        raise VerificationError(f"optimized model disagrees with eager at {shapes}: " + "; ".join(failures) + where)


def verify_forward(model: torch.nn.Module, optimized, args: tuple, kwargs: dict) -> str:
    """verify() at the example shape and at a longer sequence past every window; returns what was compared."""
    verify(model, optimized, args, kwargs)
    checked = [_seq_of(kwargs)]
    seq = checked[0]
    longer = longer_length(model, seq, _attention_windows(optimized)) if seq else None
    if longer is not None and not args:
        verify(model, optimized, args, {k: _tile_seq(v, seq, longer) for k, v in kwargs.items()})
        checked.append(longer)
    lengths = " and ".join(str(n) for n in checked if n)
    return f"matched eager at sequence length {lengths or 'of the example'} {_kernels_statement(args, kwargs)}"


def _seq_of(kwargs: dict) -> int | None:
    ids = token_ids(kwargs)
    return int(ids.shape[1]) if ids is not None else None


@torch.no_grad()
def verify_generator(model: torch.nn.Module, gen, kwargs: dict) -> str:
    """Prefill + step-by-step decode against the model's full forward, at a length past every window."""
    ids = token_ids(kwargs)
    if ids is None:
        raise VerificationError("verify: cannot tell the token-id input of the example")
    windows = [n.kwargs.get("window", 0) for n in gen.programs.prefill.graph.nodes if n.op == "call_function"]
    windows = [w for w in windows if isinstance(w, int) and w > 0]
    seq = int(ids.shape[1])
    length = min(max([seq, 2 * seq] + [w + PAST_THRESHOLD for w in windows]), gen.max_seq_len)
    batch = min(int(ids.shape[0]), gen.max_batch)
    prompt = _tile_seq(ids[:batch], seq, length).to(gen.device)
    if prompt.shape[1] < 2:
        raise VerificationError("verify: the example needs at least 2 tokens (a prefill and a decode step)")

    def full_forward(x):
        out = model(input_ids=x) if "input_ids" in kwargs else model(x)
        return getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)


    try:
        error = gen.verify(full_forward, prompt, prefill_len=max(1, min(seq, prompt.shape[1] - 1)))
    except GenerationError as exc:
        raise VerificationError(str(exc)) from exc
    return (f"prefill of {min(seq, prompt.shape[1] - 1)} tokens + decode to {prompt.shape[1]} matched the full "
            f"forward (max abs error {error:.3g}) {_kernels_statement((), {'ids': prompt})}")


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
