"""`torch.compile(model, backend="fxopt")`: fxopt's passes on every subgraph Dynamo captures.

    compiled = torch.compile(model, backend="fxopt", options={"fuse": True, "attention": True, "hw": "h100"})
    compiled = torch.compile(model, backend=fxopt.backend.make_backend(fuse=False))   # the same, bound

The backend is registered through the `torch_dynamo_backends` entry point (pyproject.toml), so the name
"fxopt" resolves without importing fxopt first. How one Dynamo subgraph is compiled:

  Dynamo graph (torch IR, graph breaks already cut by Dynamo, weights as inputs)
   -> aot_autograd            ATen, functionalized, meta["val"] = FakeTensors over Dynamo's ShapeEnv
   -> freeze                  weights/buffers Dynamo marked static become get_attr nodes (shared tensors)
   -> normalize (NORMALIZE)   post-dispatch ATen back to the forms torch.export keeps, which the passes read:
                              cse     identical pure nodes merged (the x of sibling linears is one node again)
                              sdpa    _scaled_dot_product_flash_attention_for_cpu / _efficient_attention / ...
                                      -> aten.scaled_dot_product_attention
                              matmul  view(bmm(reshape(expand(a)), reshape(expand(b)))) -> aten.matmul(a, b)
                              linear  view(addmm(b, view(x), t(W))) / mm(x, t(W)) -> aten.linear(x, W[, b])
   -> context                 Dynamo's symbols mapped to roles (dim 0 / dim 1 of the graph's 2+-D tensor
                              inputs -> b / s), hints from the ShapeEnv
   -> fxopt.pipeline.FORWARD  the same pass list as fxopt.optimize, each pass timed and named

Only inference graphs (torch.no_grad / inference_mode, or no input needing grad) are optimized; a training
graph runs unoptimized after one warning. A pass that raises, or an optimized graph that raises on a call,
makes that subgraph run unoptimized, with one warning naming the pass and the error: never wrong, never a
crash of the user's model.

Like fxopt.optimize (and Inductor's freezing), weights are read when the subgraph is compiled: the matmul
pass may concatenate sibling weights, so after changing weights in place call `torch._dynamo.reset()`, or
compile with options={"freeze": False} (weights stay graph inputs; the passes that need constant weights
then do less).

`last_programs()` lists what each compiled subgraph became (its optimized GraphModule, the pipeline
Program with every pass's result, or why it fell back); `reset()` clears that log.
"""

from __future__ import annotations

import collections
import operator
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx
from torch._dynamo import exc as dynamo_exc
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._guards import TracingContext, detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from fxopt import pipeline
from fxopt.capture import Captured, role_symbol
from fxopt.nodes import size_expr as _expr
from fxopt.passes.fusion import FusedRegionModule

aten = torch.ops.aten

#: What each subgraph is compiled with unless options say otherwise (fxopt.optimize's defaults).
DEFAULT_OPTIONS: dict[str, Any] = {
    "fuse": True,
    "attention": True,
    "matmul": True,
    "rope": None,  # None: follows "fuse", as in fxopt.optimize
    "epilogues": None,  # None: follows "matmul", as in fxopt.optimize
    "hw": None,  # a fxopt.hardware preset name or Hardware; None: h100
    "dump_dir": None,
    "freeze": True,  # weights and buffers become constants of the graph (see the module docstring)
}

#: How many compiled subgraphs last_programs() remembers.
KEEP_PROGRAMS = 64


@dataclass
class SubgraphProgram:
    """One Dynamo subgraph as the backend compiled it."""

    index: int  # 0, 1, ... in compile order since the last reset()
    aten_gm: fx.GraphModule  # the ATen graph aot_autograd produced: what runs when it falls back
    gm: fx.GraphModule | None = None  # the optimized graph (None when the subgraph fell back)
    program: Any = None  # fxopt.pipeline.Program: every pass's PassResult and seconds
    frozen: list[str] = field(default_factory=list)  # inputs that became get_attr constants
    symbols: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)  # Dynamo symbol -> role symbol
    fallback: str | None = None  # why the subgraph runs unoptimized, else None
    training: bool = False  # a training (autograd) graph: not optimized
    normalized: dict[str, int] = field(default_factory=dict)  # NORMALIZE rule -> nodes it rewrote

    @property
    def optimized(self) -> bool:
        return self.gm is not None and self.fallback is None

    def calls(self) -> collections.Counter:
        """Call targets of the optimized graph: fxopt ops by name ("fxopt.attention"), fused regions as
        "fused_region"; what tests and reports look at to see that the passes did something."""
        counts: collections.Counter = collections.Counter()
        if self.gm is None:
            return counts

        for node in self.gm.graph.nodes:
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), FusedRegionModule):
                counts["fused_region"] += 1
            elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                namespace = node.target.namespace
                if namespace != "aten":
                    counts[f"{namespace}.{node.target._opname}"] += 1
        return counts

    def report(self) -> str:
        head = f"subgraph {self.index}: "
        if self.fallback is not None:
            return head + f"unoptimized ({self.fallback})"
        calls = ", ".join(f"{k}={v}" for k, v in sorted(self.calls().items()))
        lines = [head + (calls or "no fxopt calls")]
        for name, result in (self.program.results.items() if self.program is not None else ()):
            counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
            state = "changed" if result.changed else "unchanged"
            lines.append(f"  {name}: {state}{' (' + counts + ')' if counts else ''}")
        return "\n".join(lines)


_programs: collections.deque[SubgraphProgram] = collections.deque(maxlen=KEEP_PROGRAMS)
_count = 0  # subgraphs compiled since reset()
_warned_training = False


def last_programs(n: int | None = None) -> list[SubgraphProgram]:
    """The last `n` (all remembered, by default) compiled subgraphs, oldest first."""
    items = list(_programs)
    return items if n is None else items[len(items) - n:] if n else []


def reset() -> None:
    """Forget the compiled subgraphs (does not reset Dynamo: use torch._dynamo.reset() for that)."""
    global _count, _warned_training
    _programs.clear()
    _count = 0
    _warned_training = False


def report() -> str:
    return "\n".join(p.report() for p in _programs)


def make_backend(**options) -> Callable:
    """A Dynamo backend with `options` bound: `torch.compile(m, backend=fxopt.backend.make_backend(fuse=False))`.
    Options given to torch.compile(options=...) as well override these."""

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None, **kwargs):
        return fxopt_backend(gm, example_inputs, options={**bound, **(options or {})}, **kwargs)

    bound = dict(options)
    backend.__name__ = "fxopt"
    return backend


def fxopt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None,
                  mode: str | None = None) -> Callable:
    """The Dynamo backend registered as "fxopt": lower `gm` to ATen with aot_autograd, run fxopt's passes.

    `options` are fxopt.optimize's keywords (fuse, attention, matmul, rope, hw, dump_dir, and freeze);
    `mode` (torch.compile's) is accepted and ignored.
    """

    opts = _resolve_options(options)
    dynamo_inputs = list(example_inputs)
    dynamo_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]

    def inference_compiler(aten_gm: fx.GraphModule, fake_inputs):
        return _compile_inference(aten_gm, dynamo_inputs, dynamo_names, opts)

    def training_compiler(aten_gm: fx.GraphModule, fake_inputs):
        global _warned_training
        if not _warned_training:
            _warned_training = True
            warnings.warn("fxopt optimizes inference graphs only: this graph needs autograd, so it runs "
                          "unoptimized; call the model under torch.no_grad() or torch.inference_mode()",
                          stacklevel=2)
        _remember(SubgraphProgram(_next_index(), aten_gm, fallback="training graph", training=True))
        return make_boxed_func(aten_gm)

    def backward_compiler(aten_gm: fx.GraphModule, fake_inputs):
        return make_boxed_func(aten_gm)

    lower = aot_autograd(fw_compiler=training_compiler, bw_compiler=backward_compiler,
                         inference_compiler=inference_compiler)
    try:
        return lower(gm, example_inputs)
    except Exception as exc:  # noqa: BLE001 - the user's model must still run
        if _must_propagate(exc):
            raise
        _warn(f"lowering to ATen (aot_autograd) failed: {type(exc).__name__}: {_first_line(exc)}")
        _remember(SubgraphProgram(_next_index(), gm, fallback=f"aot_autograd: {type(exc).__name__}"))
        return gm.forward


# ------------------------------------------------------------------------------------------- one subgraph
class _CompiledSubgraph:
    """The optimized graph called with the inputs it kept; on an error, the unoptimized graph from then on."""

    def __init__(self, record: SubgraphProgram, keep: list[int]):
        self.record = record
        self.keep = keep
        self.optimized = record.gm

    def __call__(self, *args):
        if self.optimized is None:
            return self.record.aten_gm(*args)
        try:
            return self.optimized(*[args[i] for i in self.keep])
        except Exception as exc:  # noqa: BLE001 - retried on the graph fxopt did not touch
            out = self.record.aten_gm(*args)  # raises too: the inputs' fault, not fxopt's; keep the optimized graph
            self.optimized = None
            self.record.fallback = f"call failed: {type(exc).__name__}: {_first_line(exc)}"
            _warn(f"the optimized subgraph {self.record.index} failed when called "
                  f"({type(exc).__name__}: {_first_line(exc)})", tail="it runs unoptimized from now on")
            return out


def _compile_inference(aten_gm: fx.GraphModule, dynamo_inputs: list, dynamo_names: list[str], opts: dict):

    record = SubgraphProgram(_next_index(), aten_gm)
    _remember(record)
    try:
        with unset_fake_temporarily():  # aot_autograd calls us inside its FakeTensorMode; the passes compute
            program, keep = _optimize(aten_gm, record, dynamo_inputs, dynamo_names, opts)  # with real tensors
    except _PassFailed as failed:
        exc, stage = failed.error, failed.stage
        if _must_propagate(exc):
            raise exc from None
        record.fallback = f"{stage}: {type(exc).__name__}: {_first_line(exc)}"
        _warn(f"pass `{stage}` failed on subgraph {record.index}: {type(exc).__name__}: {_first_line(exc)}")
        return aten_gm
    record.gm, record.program = program.gm, program
    return _CompiledSubgraph(record, keep)


class _PassFailed(Exception):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(stage)
        self.stage, self.error = stage, error


def _optimize(aten_gm: fx.GraphModule, record: SubgraphProgram, dynamo_inputs: list, dynamo_names: list[str],
              opts: dict):
    """Freeze, normalize, build the context, run pipeline.FORWARD on a copy of aten_gm; -> (Program, kept
    input indices). Any exception comes out as _PassFailed naming the stage (the pass) it came from."""

    stage = "copy"
    try:
        work = _copy_module(aten_gm)
        stage = "freeze"
        keep = list(range(_count_placeholders(work)))
        if opts["freeze"]:
            keep, record.frozen = _freeze(work, dynamo_inputs, dynamo_names)
        for name, rule in NORMALIZE:
            stage = f"normalize ({name})"
            record.normalized[name] = rule(work)
        stage = "context"
        captured = _captured(work)
        record.symbols = dict(captured.symbols)
        ctx = pipeline.make_context(captured, opts["hw"], None, _pass_options(opts))
        stage = "passes"
        try:
            program = pipeline.run_passes(work, ctx, pipeline.FORWARD)
        except pipeline.PassError as exc:  # name the pass, keep its own exception
            stage = exc.pass_name or stage
            raise (exc.__cause__ or exc) from None
        program.captured = captured
    except Exception as exc:  # noqa: BLE001 - partial optimization, never a crash
        raise _PassFailed(stage, exc) from exc
    return program, keep


def _resolve_options(options: dict | None) -> dict:
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    if opts["rope"] is None:
        opts["rope"] = opts["fuse"]
    if opts["epilogues"] is None:
        opts["epilogues"] = opts["matmul"]
    return opts


def _pass_options(opts: dict) -> dict:
    """The PassContext options: everything but what the backend itself consumes."""
    return {k: v for k, v in opts.items() if k not in ("hw", "freeze")}


def _next_index() -> int:
    global _count
    _count += 1
    return _count - 1


def _remember(record: SubgraphProgram) -> None:
    _programs.append(record)


def _warn(what: str, tail: str = "this subgraph runs unoptimized") -> None:
    warnings.warn(f"fxopt backend: {what}; {tail}", stacklevel=3)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _must_propagate(exc: BaseException) -> bool:
    """Dynamo's control-flow exceptions (restart the analysis) are not failures."""

    restart = tuple(getattr(dynamo_exc, name) for name in ("TensorifyScalarRestartAnalysis", "RestartAnalysis")
                    if hasattr(dynamo_exc, name))
    return isinstance(exc, restart)


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of gm's graph (meta shared, attributes shared): the passes rewrite the
    copy, the original stays runnable as the fallback."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(getattr(gm, "meta", {}))
    return copy


def _count_placeholders(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "placeholder")


# ------------------------------------------------------------------------------------------------ freeze
def _freeze(gm: fx.GraphModule, dynamo_inputs: list, dynamo_names: list[str]) -> tuple[list[int], list[str]]:
    """Turn the placeholders of weights and buffers into get_attr nodes of the real (shared) tensors.

    The graph's placeholders are aot_autograd's flat inputs: the parameters it lifted (none when Dynamo
    inlines nn.Modules, the default) then Dynamo's inputs. Frozen: inputs Dynamo marked static (parameters
    and buffers) that the graph neither mutates nor returns a view of. Returns the indices of the inputs the
    graph still takes, and the attribute names of the frozen ones. Anything unexpected: freeze nothing.
    """

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    everything = list(range(len(placeholders)))
    tracing = TracingContext.try_get()
    meta = tracing.fw_metadata if tracing is not None else None
    if meta is None:
        return everything, []
    lifted = list(tracing.params_flat or [])
    real = lifted + list(dynamo_inputs)
    names = [f"param_{i}" for i in range(len(lifted))] + list(dynamo_names)
    if len(real) != len(placeholders) or len(meta.input_info) != len(placeholders):
        return everything, []
    static = set(meta.static_input_indices or ()) | set(range(len(lifted)))
    aliased = {o.base_idx for o in meta.output_info if getattr(o, "base_idx", None) is not None}
    keep, frozen = [], []
    anchor = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    for i, (node, value) in enumerate(zip(placeholders, real)):
        info = meta.input_info[i]
        val = node.meta.get("val")
        freezable = (
            i in static and i not in aliased
            and not (info.mutates_data or info.mutates_metadata)
            and type(value) in (torch.Tensor, torch.nn.Parameter) and not isinstance(value, FakeTensor)
            and isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape)
            and tuple(value.shape) == tuple(val.shape) and value.dtype == val.dtype
        )
        if not freezable or anchor is None:
            keep.append(i)
            continue
        name = _attr_name(gm, names[i])
        if isinstance(value, torch.nn.Parameter):
            gm.register_parameter(name, value)
        else:
            gm.register_buffer(name, value)
        with gm.graph.inserting_before(anchor):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
        frozen.append(name)
    gm.graph.lint()
    gm.recompile()
    return keep, frozen


def _attr_name(gm: fx.GraphModule, dynamo_name: str) -> str:
    """`L_self_modules_blocks_modules_0_modules_attn_parameters_weight_` -> `blocks_0_attn_weight`."""
    name = re.sub(r"^[lL]_self_", "", dynamo_name)
    name = re.sub(r"(^|_)(modules|parameters|buffers)_", r"\1", name).strip("_")
    name = re.sub(r"\W", "_", name) or "const"
    if name[0].isdigit():
        name = "c_" + name
    candidate, k = name, 1
    while hasattr(gm, candidate):
        candidate, k = f"{name}_{k}", k + 1
    return candidate


# ------------------------------------------------------------------------------------------ sdpa normalize
def _sdpa_variants() -> dict:
    """Post-dispatch sdpa op -> how to read (attn_mask, dropout_p, is_causal, scale) from its node."""
    table = {}

    def add(name, reader):
        op = getattr(getattr(aten, name, None), "default", None)
        if op is not None:
            table[op] = reader

    def arg(node, i, key, default=None):
        return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)

    # (q, k, v, dropout_p=0, is_causal=False, *, attn_mask=None, scale=None)
    add("_scaled_dot_product_flash_attention_for_cpu",
        lambda n: (n.kwargs.get("attn_mask"), arg(n, 3, "dropout_p", 0.0), arg(n, 4, "is_causal", False),
                   n.kwargs.get("scale"), False))
    # (q, k, v, dropout_p=0, is_causal=False, return_debug_mask=False, *, scale=None)
    add("_scaled_dot_product_flash_attention",
        lambda n: (None, arg(n, 3, "dropout_p", 0.0), arg(n, 4, "is_causal", False), n.kwargs.get("scale"),
                   arg(n, 5, "return_debug_mask", False)))
    # (q, k, v, attn_bias, compute_log_sumexp, dropout_p=0, is_causal=False, *, scale=None)
    add("_scaled_dot_product_efficient_attention",
        lambda n: (arg(n, 3, "attn_bias"), arg(n, 5, "dropout_p", 0.0), arg(n, 6, "is_causal", False),
                   n.kwargs.get("scale"), False))
    # (q, k, v, attn_bias, compute_log_sumexp, dropout_p=0, is_causal=False, return_debug_mask=False, *, scale)
    add("_scaled_dot_product_cudnn_attention",
        lambda n: (arg(n, 3, "attn_bias"), arg(n, 5, "dropout_p", 0.0), arg(n, 6, "is_causal", False),
                   n.kwargs.get("scale"), arg(n, 7, "return_debug_mask", False)))
    return table


def _normalize_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite `getitem(<backend sdpa op>(q, k, v, ...), 0)` as `aten.scaled_dot_product_attention(...)`.

    aot_autograd lowers F.scaled_dot_product_attention past the dispatcher, to the op of the backend it
    would run (flash on CPU, flash/efficient/cudnn on CUDA); the attention pass reads the op above them,
    as torch.export keeps it. Only when nothing but the output is used and there is no dropout.
    """


    variants = _sdpa_variants()
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in variants:
            continue
        mask, dropout_p, is_causal, scale, debug = variants[node.target](node)
        users = list(node.users)
        if debug or dropout_p != 0 or not users or any(
                u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue
        q, k, v = node.args[:3]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(aten.scaled_dot_product_attention.default,
                                         (q, k, v, mask, 0.0, bool(is_causal)),
                                         {"scale": scale} if scale is not None else {})
        fake_args = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in (q, k, v, mask)]
        val = users[0].meta.get("val")
        fake_mode = detect_fake_mode([a for a in fake_args if isinstance(a, torch.Tensor)])
        if fake_mode is not None:
            with fake_mode:
                val = aten.scaled_dot_product_attention.default(*fake_args, 0.0, bool(is_causal),
                                                                **({"scale": scale} if scale is not None else {}))
        new.meta.update({k_: v_ for k_, v_ in users[0].meta.items() if k_ != "val"})
        new.meta["val"] = val
        for user in users:
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


# ----------------------------------------------------------------------------------------------- context
def _captured(gm: fx.GraphModule):
    """A fxopt.capture.Captured for a graph torch.export did not make: Dynamo's symbols named by role.

    The first 2+-D tensor input whose dim 0 (dim 1) is a bare symbol names it b (s); further symbols keep
    Dynamo's names (s27 ...) and are evaluated at their hints. (capture._name_symbols does this by input
    name for exported graphs; duplicated here for graphs without input names.)
    """

    symbols: dict[sympy.Symbol, sympy.Symbol] = {}
    sizes: dict[str, int] = {}
    hints: dict[sympy.Symbol, int] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        dims = list(val.shape) if isinstance(val, torch.Tensor) else [val]
        for d in dims:
            if isinstance(d, torch.SymInt):
                env = d.node.shape_env
                table = getattr(env, "backed_var_to_val", None) or env.var_to_val
                hints.update({sym: int(v) for sym, v in table.items() if getattr(v, "is_Integer", True)})
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            continue
        for axis, role in ((0, "batch"), (1, "seq")):
            size = val.shape[axis]
            if role in sizes or not isinstance(size, torch.SymInt) or not isinstance(size.node.expr, sympy.Symbol):
                continue
            if size.node.expr in symbols:
                continue
            symbols[size.node.expr] = role_symbol(role)
            sizes[role] = hints.get(size.node.expr, 1)
    return Captured(gm, exported=None, example_kwargs={}, dynamic_dims={}, symbols=symbols, sizes=sizes,
                    hints=hints)


# ------------------------------------------------------------------------------------ normalize: cse, matmul
def _cse(gm: fx.GraphModule) -> int:
    """Merge call_function nodes that compute the same pure op of the same arguments.

    aot_autograd traces each `x.view(...)` anew, so the three projections of one hidden state read three
    identical views; merged, they are siblings the matmul pass can concatenate.
    """

    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _pure(node.target):
            continue
        try:
            key = (node.target, _key(node.args), _key(tuple(sorted(node.kwargs.items()))))
            hash(key)
        except TypeError:
            continue
        other = seen.get(key)
        if other is None:
            seen[key] = node
            continue
        if node.target is not operator.getitem and not _same_val(node.meta.get("val"), other.meta.get("val")):
            continue
        node.replace_all_uses_with(other)
        gm.graph.erase_node(node)
        merged += 1
    if merged:
        gm.graph.lint()
        gm.recompile()
    return merged


def _pure(target) -> bool:

    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not target._opname.startswith(("empty", "new_empty", "_local_scalar_dense", "copy"))


def _key(value):
    """A hashable key of an argument: nodes by identity, scalars with their type (1, 1.0, True, -0.0 differ)."""
    if isinstance(value, fx.Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Tensor)):
        raise TypeError("not a plain argument")
    return (type(value).__name__, value)


def _same_dims(a, b) -> bool:
    """Two shapes equal as formulas (no guard is added to Dynamo's ShapeEnv)."""
    return len(a) == len(b) and all(sympy.expand(_expr(x) - _expr(y)) == 0 for x, y in zip(a, b))


def _same_val(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.device == b.device and _same_dims(a.shape, b.shape)
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)


_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _expanded_operand(node) -> tuple[fx.Node, Any] | None:
    """`reshape(clone?(expand(a)))`, the way aten.matmul feeds bmm: (a, expand's value), else None."""
    if not (isinstance(node, fx.Node) and node.target in _RESHAPES and isinstance(node.args[0], fx.Node)):
        return None
    node = node.args[0]
    if node.target is aten.clone.default and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.target is not aten.expand.default or not isinstance(node.args[0], fx.Node):
        return None
    source, expanded = node.args[0], node.meta.get("val")
    if not isinstance(source.meta.get("val"), torch.Tensor) or not isinstance(expanded, torch.Tensor):
        return None
    if expanded.dim() < 3 or not _same_dims(expanded.shape[-2:], source.meta["val"].shape[-2:]):
        return None  # the expand broadcasts batch dims only
    return source, expanded


def _restore_matmul(gm: fx.GraphModule) -> int:
    """`view(bmm(reshape(expand(a)), reshape(expand(b))), out)` -> `aten.matmul(a, b)`.

    aten.matmul of two 3+-D tensors is traced as the broadcast, a reshape to 3-D, bmm and a view back;
    the attention pass reads q @ k^T and p @ v as matmuls. Rewritten only where matmul's own fake value
    has the shape, dtype and device of the view it replaces.
    """

    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _RESHAPES:
            continue
        bmm = node.args[0]
        if not (isinstance(bmm, fx.Node) and bmm.target is aten.bmm.default and len(bmm.users) == 1):
            continue
        left, right = _expanded_operand(bmm.args[0]), _expanded_operand(bmm.args[1])
        if left is None or right is None:
            continue
        (a, ea), (b, eb) = left, right
        out = node.meta.get("val")
        if not (isinstance(out, torch.Tensor) and _same_dims(ea.shape[:-2], eb.shape[:-2])):
            continue
        fake_mode = detect_fake_mode([a.meta["val"], b.meta["val"]])
        if fake_mode is None:
            continue
        try:
            with fake_mode:
                val = aten.matmul.default(a.meta["val"], b.meta["val"])
        except Exception:  # noqa: BLE001 - not a matmul after all
            continue
        if not _same_val(val, out):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(aten.matmul.default, (a, b))
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        new.meta["val"] = val
        node.replace_all_uses_with(new)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


def _flattened(node) -> fx.Node | None:
    """x of `view(x, [-1, K])` (or reshape's `_unsafe_view(clone(x))`), the 2-D operand matmul gives mm."""
    if not (isinstance(node, fx.Node) and node.target in _RESHAPES and isinstance(node.args[0], fx.Node)):
        return None
    x = node.args[0]
    if x.target is aten.clone.default and isinstance(x.args[0], fx.Node) and not x.kwargs.keys() - {"memory_format"}:
        x = x.args[0]
    return x


def _restore_linear(gm: fx.GraphModule) -> int:
    """`view(mm(view(x, [-1, K]), t(W)), [..., N])` -> `aten.linear(x, W)`, with addmm(b, ...) -> linear(x, W, b);
    a 2-D x without the views too. F.linear is traced that way; the matmul pass fuses sibling *linears*.
    Rewritten only where linear's own fake value has the shape, dtype and device of what it replaces."""

    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        bias, a, wt = (None, *node.args[:2]) if node.target is aten.mm.default else node.args[:3]
        if node.kwargs or not (isinstance(wt, fx.Node) and wt.target is aten.t.default):
            continue
        weight = wt.args[0]
        out, x = node, a
        users = list(node.users)
        if len(users) == 1 and users[0].target in _RESHAPES and _flattened(a) is not None:
            out, x = users[0], _flattened(a)  # the 3+-D form
        vals = [v.meta.get("val") if isinstance(v, fx.Node) else v for v in (x, weight, bias)]
        if not all(isinstance(v, torch.Tensor) for v in vals[:2]) or vals[1].dim() != 2:
            continue
        if bias is not None and not (isinstance(vals[2], torch.Tensor) and vals[2].dim() == 1):
            continue
        fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        if fake_mode is None:
            continue
        args = (x, weight) + ((bias,) if bias is not None else ())
        try:
            with fake_mode:
                val = aten.linear.default(*[v for v in vals if v is not None])
        except Exception:  # noqa: BLE001 - not a linear after all
            continue
        if not _same_val(val, out.meta.get("val")):
            continue
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(aten.linear.default, args)
        new.meta.update({k: v for k, v in out.meta.items() if k != "val"})
        new.meta["val"] = val
        out.replace_all_uses_with(new)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


#: Post-dispatch ATen -> the forms the passes read, in order: (name, rule(gm) -> nodes rewritten).
NORMALIZE: list[tuple[str, Callable[[fx.GraphModule], int]]] = [
    ("cse", _cse),
    ("sdpa", _normalize_sdpa),
    ("matmul", _restore_matmul),
    ("linear", _restore_linear),
]
