"""Capture a model as an ATen-level torch.fx graph with named symbolic dims.

torch.export (strict=False) traces the model with FakeTensors; every node's
meta["val"] then carries shapes as SymInts. Export names those symbols s0,
s77, ...; we map each back to the role of the input dim it came from, so cost
formulas read ``2*b*s*h**2`` instead of ``2*s77*s27*h**2``.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx
from torch.export import Dim
from torch.fx.experimental import proxy_tensor

from fxopt.errors import CaptureError  # noqa: F401  (raised here, defined with the other refusals)

# Role of a dynamic input dim -> the short symbol formulas use.
ROLE_SYMBOLS = {"batch": "b", "seq": "s", "src_seq": "s_src", "cache": "n", "new": "q"}

# Size to capture each role at when the caller gives none: >= 2 so export keeps the dim symbolic.
CAPTURE_SIZES = {"batch": 2, "seq": 16, "src_seq": 16, "cache": 32, "new": 2}


def role_symbol(role: str) -> sympy.Symbol:
    return sympy.Symbol(ROLE_SYMBOLS.get(role, role), integer=True, positive=True)


@dataclass
class Captured:
    """An exported graph plus what is needed to read its symbolic shapes."""

    gm: fx.GraphModule
    exported: torch.export.ExportedProgram
    example_kwargs: dict[str, Any]
    dynamic_dims: dict[str, dict[int, str]]
    symbols: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)  # export symbol -> role symbol
    sizes: dict[str, int] = field(default_factory=dict)  # role -> size of the example inputs
    fixed_kwargs: dict[str, Any] = field(default_factory=dict)  # non-tensor kwargs capture added
    hints: dict[sympy.Symbol, int] = field(default_factory=dict)  # every export symbol -> example value
    pinned: list[tuple[str, int, str, int]] = field(default_factory=list)  # (input, axis, role, size) made static

    def named(self, value) -> sympy.Expr:
        """A node size (int or SymInt) as a sympy expression in role symbols."""
        if isinstance(value, torch.SymInt):
            return value.node.expr.xreplace(self.symbols)
        return sympy.Integer(value)

    def shape(self, val: torch.Tensor) -> tuple[sympy.Expr, ...]:
        return tuple(self.named(d) for d in val.shape)

    @property
    def role_values(self) -> dict[sympy.Symbol, int]:
        return {role_symbol(role): size for role, size in self.sizes.items()}


def default_dynamic_dims(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, dict[int, str]]:
    """Roles of dynamic input dims: the model's own `dynamic_dims()`, else (batch, seq) for 2-D inputs and
    (batch, seq, ...) for higher-rank ones whose leading dims match theirs (masks, embeddings); with no 2-D
    input, dims 0 and 1 of every input of rank >= 2. Dims the model's code then fixes are reported
    (Captured.pinned)."""
    if hasattr(model, "dynamic_dims"):
        return model.dynamic_dims()
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    dims = {name: {0: "batch", 1: "seq"} for name, value in tensors.items() if value.dim() == 2}
    shapes = {tuple(tensors[name].shape) for name in dims}
    for name, value in tensors.items():
        if value.dim() < 3:
            continue
        if not dims:
            dims[name] = {0: "batch", 1: "seq"}
        elif any(value.shape[0] == b for b, _ in shapes):
            dims[name] = {0: "batch"}
            dims[name].update({axis: "seq" for axis in range(1, value.dim())
                               if any(value.shape[axis] == s and s > 1 for _, s in shapes)})
    return {name: d for name, d in dims.items()}


def _is_tensor_of_rank(value, rank: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == rank


def _is_hf_model(model: torch.nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def capture(
    model: torch.nn.Module,
    example_kwargs: dict[str, Any],
    dynamic_dims: dict[str, dict[int, str]] | None = None,
    *,
    args: tuple = (),
    source_lines: bool = True,
) -> Captured:
    """Export `model(**example_kwargs)` to an ATen GraphModule with dims symbolic by role.

    Dims of size 0 or 1 cannot stay symbolic in torch.export; capture at sizes >= 2
    and evaluate formulas at the sizes you want. source_lines=False leaves out each node's
    meta["stack_trace"] (the model line that made it, used only in error messages): recording
    them is about a quarter of the capture time of a 1B-parameter model.
    """
    kwargs = dict(example_kwargs)
    fixed = {"use_cache": False} if _is_hf_model(model) and "use_cache" not in kwargs else {}
    kwargs.update(fixed)  # a DynamicCache output cannot be exported
    dynamic_dims = dynamic_dims if dynamic_dims is not None else default_dynamic_dims(model, kwargs)
    def dims_of(name):
        return {axis: Dim.AUTO for axis in dynamic_dims[name]} if name in dynamic_dims else None

    dynamic_shapes = {name: dims_of(name) for name in kwargs}
    if args:  # forward(*args): export keys the positional dims by the var-positional parameter's name
        star = next(p.name for p in inspect.signature(model.forward).parameters.values()
                    if p.kind is inspect.Parameter.VAR_POSITIONAL)
        dynamic_shapes[star] = tuple(dims_of(f"arg{i}") for i in range(len(args)))
    try:
        with torch.no_grad(), _stack_traces(source_lines):  # inference: no autograd wrappers
            exported = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with a diagnosis
        raise CaptureError(explain_export_failure(exc, model)) from exc
    gm = exported.module()
    strip_export_assertions(gm)
    captured = Captured(gm, exported, {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}, dynamic_dims)
    captured.fixed_kwargs = fixed
    _name_symbols(captured)
    if captured.pinned:
        warnings.warn(pinned_message(captured.pinned, "was captured static"), stacklevel=2)
    return captured


def pinned_message(pinned: list[tuple[str, int, str, int]], what: str) -> str:
    """Which input dims the model's own code made static, and what to do about it."""
    dims = ", ".join(f"`{name}` dim {axis} ({role}) at {size}" for name, axis, role, size in pinned)
    return (f"{dims} {what}: the model's code fixes that size (e.g. a reshape or mask built with the "
            "example's literal size), so other sizes will not run. Build it from x.shape at run time, or "
            "capture at the size you will run (dynamic_dims={...} marks which dims should vary).")


@contextlib.contextmanager
def _stack_traces(record: bool):
    """Let torch.fx record a stack trace per traced node, or not.

    torch >= 2.12 has a switch (torch.fx.config.do_not_emit_stack_traces); before it, export's
    module-stack tracer turns recording on in its constructor, so the constructor is wrapped.
    """
    if record:
        yield
    elif hasattr(torch.fx.config, "do_not_emit_stack_traces"):
        saved = torch.fx.config.do_not_emit_stack_traces
        torch.fx.config.do_not_emit_stack_traces = True
        try:
            yield
        finally:
            torch.fx.config.do_not_emit_stack_traces = saved
    else:

        tracer = proxy_tensor._ModuleStackTracer
        init = tracer.__init__

        def init_without_traces(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.record_stack_traces = False

        tracer.__init__ = init_without_traces
        try:
            yield
        finally:
            tracer.__init__ = init


EXPORT_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default}


def strip_export_assertions(gm: fx.GraphModule) -> None:
    """Drop export's dtype/device assertions: they hold by construction and pin values in place."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in EXPORT_ASSERTIONS and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def _name_symbols(captured: Captured) -> None:
    """Map each export symbol found on a dynamic input dim to its role symbol."""
    placeholders = {node.target: node for node in captured.gm.graph.nodes if node.op == "placeholder"}
    placeholders.update({f"arg{i}": node for i, node in enumerate(
        n for n in captured.gm.graph.nodes if n.op == "placeholder" and n.target.startswith("args_"))})
    for name, roles in captured.dynamic_dims.items():
        node = placeholders.get(name)
        value = captured.example_kwargs.get(name)
        if node is None or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        for axis, role in roles.items():
            size = node.meta["val"].shape[axis]
            if isinstance(size, torch.SymInt):
                env = size.node.shape_env
                hints = getattr(env, "backed_var_to_val", None) or env.var_to_val
                captured.hints.update({sym: int(v) for sym, v in hints.items()})
            captured.sizes[role] = int(value.shape[axis])
            static = not isinstance(size, torch.SymInt) or sympy.sympify(size.node.expr).is_number
            if static and int(value.shape[axis]) > 1:  # sizes 0 and 1 are always specialised by export
                captured.pinned.append((name, axis, role, int(size)))
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                captured.symbols.setdefault(size.node.expr, role_symbol(role))


# (pattern in the export error, what to tell the user). First match wins.
EXPORT_ADVICE: list[tuple[str, str]] = [
    (r"DynamicCache|Cache'> in output", "the model returns a KV-cache object; call it with use_cache=False"),
    (
        r"data-dependent|GuardOnDataDependentSymNode|\.item\(\)",
        "a branch or size depends on tensor values (e.g. .item(), .tolist(), if x.any()); "
        "compute it with tensor ops, or use torch.cond for real control flow",
    ),
    (
        r"Constraints violated|specialized|ConstraintViolation",
        "the code specialises a dynamic dim to a constant (an assert or branch on its size); "
        "remove the check or capture at the size you will run",
    ),
    (
        r"not a known type|register a pytree",
        "an input or output is a custom class; return tensors or "
        "register it with torch.utils._pytree.register_pytree_node",
    ),
    (r"Unsupported|not supported", "an operation torch.export cannot trace; rewrite it with torch ops"),
]


def explain_export_failure(exc: BaseException, model: torch.nn.Module) -> str:
    message = f"{type(exc).__name__}: {exc}"
    advice = next((tip for pattern, tip in EXPORT_ADVICE if re.search(pattern, message)), None)
    frame = _first_model_frame(exc)
    lines = [f"torch.export could not capture {type(model).__name__}."]
    if frame:
        lines.append(f"First unsupported construct, in the model's code: {frame}")
    lines.append(f"Export said: {message.splitlines()[0][:500]}")
    lines.append(f"What to do: {advice or 'simplify the construct above, or run the model unoptimized'}.")
    return "\n".join(lines)


def _first_model_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch's own sources: the model line export choked on."""
    frames = []
    for error in (exc, exc.__cause__, exc.__context__):
        if error is not None and error.__traceback__ is not None:
            frames.extend(traceback.extract_tb(error.__traceback__))
    user = [f for f in frames if "/torch/" not in f.filename and "fxopt/capture.py" not in f.filename]
    if not user:
        return None
    last = user[-1]
    return f"{last.filename}:{last.lineno} `{(last.line or '').strip()}`"
