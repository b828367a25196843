"""Triton code generation for fused memory-bound regions.

A region is a `torch.fx.GraphModule` cut out of a captured model by the fusion pass:
placeholders are the region's external inputs (tensors broadcastable to one iteration
space, or Python scalars), `call_function` nodes are ATen ops from the tables in
`fxopt.codegen.ops`, and the output node returns a tuple. `generate_source` turns it into
one Python module holding Triton kernels and a launcher `launch(*inputs)` (what every such
module shares — config choice, launch plans, bf16 rounding — it imports from
`fxopt.codegen.fused_runtime`);
`compile_region` writes that module to the dump dir, loads it and wraps it in a
`FusedKernel` that dispatches CUDA tensors to Triton, CPU tensors under TRITON_INTERPRET=1
to the Triton interpreter, and other CPU tensors to the region itself (the reference).

A model repeats a few region structures once per layer, so the code is generated from the
region's structure alone (`generate_kernel`: inputs in0, in1, ... by position, values named
after their ops, kernels named `fused_<first ops>_<hash of the code>`). Only the comment
header (node names, predicted bytes and FLOPs) is per region. The loader keys modules by the
code below the header, so every copy of a structure shares one module, one set of @jit
functions and one Triton compile, while each region still gets its own dump file.

Two kinds of kernel:

* pointwise (no reduction): the iteration space is the broadcast shape of the inputs.
  A contiguous variant walks linear offsets (inputs of one element are loaded once);
  when the launcher's collapsed dims are two (a broadcast bias row or column, a transposed
  operand) a 2-D tiled variant reads every input through its two strides with no
  per-element index division; otherwise a strided variant unravels the linear index over
  the collapsed dims and reads every input through its strides (stride 0 = broadcast).
* row reduction: the iteration space is (rows, N), N the last dim. Pointwise prologue ->
  row reductions (sum, max, min; composites like softmax and layer_norm are lowered to
  them by the op table) -> pointwise epilogue on the reduced values broadcast along the
  row. Rows up to WHOLE_ROW_MAX_N columns live in registers (several rows per program
  for small N); longer rows take one loop over column blocks per dependent stage of
  reductions (recomputing what each reduction reads), then a final pass for outputs.
  Inputs with no leading dims (a norm's weight and bias) are loaded as one vector per
  column block (evict_last), not once per row.

Values are computed in fp32 (bool as int1, integers as int32/int64) and cast to each
output's dtype on store. Outputs are allocated contiguous; an output that varies over
fewer dims than the iteration space (it depends on broadcast inputs only) is returned as a
view of a full buffer. Layout ops (unsqueeze, permute, slice, ...) applied to region
inputs are run by the launcher (the kernel reads through the view's strides). Every size is
read at call time: the generated code depends only on ranks, dtypes and which dims are
statically 1. What cannot be emitted raises `UnsupportedRegion` naming the node, so the
fusion pass can leave that region to PyTorch.
"""

from __future__ import annotations

import builtins
import hashlib
import inspect
import keyword
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.fx as fx

from fxopt.codegen import loader
from fxopt.codegen.ops import (
    FLOAT_DTYPES,
    HELPERS,
    IDENTITY,
    LAYOUT,
    NOOPS,
    POINTWISE,
    REDUCTIONS,
    SUPPORTED_DTYPES,
    TL_STORAGE,
    cast,
    common_type,
    compute_type,
    flops_per_element,
    literal,
    literal_type,
    normalized_args,
    unsupported_reason,
)

__all__ = [
    "FusedKernel", "GeneratedKernel", "UnsupportedRegion", "compile_region", "generate_kernel", "generate_source",
    "region_from_fn",
]

SCALAR, ROW, FULL = 0, 1, 2  # how far a value varies: not at all, per row, per element

# Rows longer than this are reduced in a loop over column blocks (module-level in the
# generated source too, where tests lower it to reach the loop at small sizes).
WHOLE_ROW_MAX_N = 8192


class UnsupportedRegion(NotImplementedError):
    """The region holds something the generator cannot emit; the message names the node."""


# ----------------------------------------------------------------------------- dataflow


@dataclass(eq=False)
class _Input:
    """An external input: a placeholder, or a view of inputs computed by the launcher."""

    name: str
    node: fx.Node
    is_tensor: bool
    dtype: torch.dtype | None = None
    level: int = FULL
    shape: tuple = ()
    ctype: str = "fp32"  # for scalars


@dataclass(eq=False)
class _Val:
    """A value inside the kernel, named by the variable that holds it."""

    name: str
    level: int
    ctype: str
    kind: str  # "load" | "arg" | "expr" | "reduce"
    expr: str = ""
    deps: tuple = ()
    op: str = ""  # reductions: "sum" | "max" | "min" | "mean"
    inp: _Input | None = None
    origin: fx.Node | None = None
    dropped: bool = False  # from a keepdim=False reduction: shaped like the rows, not the rows x N space


def _neutral(v: _Val) -> bool:
    """Broadcasts the same way whatever the alignment: Python scalars and 0-dim inputs."""
    return v.level == SCALAR or (v.kind == "load" and len(v.inp.shape) == 0)


def _dropped(deps, node) -> bool:
    kinds = {d.dropped for d in deps if not _neutral(d)}
    if len(kinds) > 1:
        raise UnsupportedRegion(f"{node.name}: mixes a keepdim=False reduction with unreduced values")
    return kinds == {True}


@dataclass(eq=False)
class _Output:
    name: str  # the launcher's tensor variable (and "<name>_ptr" in kernels)
    node: fx.Node
    dtype: torch.dtype
    val: _Val | None = None
    source: _Input | None = None  # output that is an input (or a view of one): returned as is
    shape_kind: str = "full"  # "full" (one element per iteration point) | "row" (one per row) | "input"
    alloc: str = "shape"  # launcher expression of the shape of the buffer the kernel writes
    result: str = ""  # launcher expression returned (the buffer, or a view of it)


# keywords and builtins (op stems like pow or round must not shadow them), then generated names
_RESERVED = set(keyword.kwlist) | set(dir(builtins)) | {
    "tl", "triton", "torch", "math", "os", "float", "int", "range", "min", "max", "abs", "sum", "len",
    "pid", "offs", "mask", "rows", "row_mask", "cols", "col_mask", "col_idx", "col_start", "numel",
    "numel_bucket", "n_bucket", "n_rows", "N", "rem", "idx", "out_offs", "launch", "shape", "lead",
    "device", "grid", "plan", "args", "tensors", "block_n", "meta", "BLOCK", "BLOCK_N", "ROWS",
    "INDEX_64", "NDIM", "LEAD_DIMS", "INTERPRET", "autotune", "self", "None", "True", "False",
    # launcher locals and module globals of the generated source
    "bucket", "contiguous", "scalar", "ndim", "sizes", "strides", "index_64", "n_cols", "lead_dims",
    "lead_sizes", "lead_strides", "col_strides", "WHOLE_ROW_MAX_N", "POINTWISE_CONFIGS", "ROW_CONFIGS",
    "LOOP_CONFIGS", "ValueError", "inspect", "TILE_CONFIGS", "ROWS_T", "BLOCK_C", "size0_bucket", "pid_c",
    "pid_r", "AUTOTUNE", "ROW_BYTES_PER_COLUMN", "TILE_BYTES", "ELEMENT_BYTES",
    # names the preamble imports or binds (the runtime module and what is taken from it)
    "rt", "functools", "_config", "_round_bf16", "prune_pointwise", "prune_rows",
}
_DERIVED = ("_ptr", "_row", "_off", "_acc", "_stride_n")


# Every kernel's @triton.jit functions are named `fused_<ops>_<hash>_<variant>`: no variable may start so.
_KERNEL_PREFIX = "fused_"


class _Namer:
    """Unique identifiers for generated code, derived from canonical stems (see `_canonical_stems`)."""

    def __init__(self, reserved=()):
        self.used: set[str] = set(_RESERVED) | set(reserved)

    def _taken(self, name: str) -> bool:
        derived = [name + s for s in _DERIVED] + [name.upper() + "_SCALAR"]
        derived += [f"{name}_stride{d}" for d in range(8)] + [f"{name}_stride_r{d}" for d in range(8)]
        return name in self.used or any(d in self.used for d in derived)

    def fresh(self, base: str) -> str:
        base = re.sub(r"\W", "_", base) or "v"
        if base[0].isdigit() or base.startswith(_KERNEL_PREFIX):
            base = "v_" + base
        name, i = base, 1
        while self._taken(name) or re.fullmatch(r"(idx|rem|size|lead_size)\d+", name):
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        self.used.update(name + s for s in _DERIVED)
        self.used.add(name.upper() + "_SCALAR")
        return name


def _level(shape) -> int:
    """SCALAR never; ROW when the last dim is statically 1 (or rank 0); else FULL."""
    if len(shape) == 0:
        return ROW
    last = shape[-1]
    return ROW if isinstance(last, int) and last == 1 else FULL


def _size_key(s):
    """A size as an int, or the string of its sympy expression (symbols unified by the shape env)."""
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        env = getattr(s.node, "shape_env", None)
        if env is not None and hasattr(env, "replace"):
            expr = env.replace(expr)
        return int(expr) if getattr(expr, "is_Integer", False) else str(expr)
    return int(s)


def _shape_key(shape) -> tuple:
    return tuple(_size_key(s) for s in shape)


def _broadcastable(key: tuple, target: tuple) -> bool:
    if len(key) > len(target):
        return False
    return all(k in (1, t) for k, t in zip(key[::-1], target[::-1]))


def _broadcast_keys(keys: list[tuple]) -> tuple:
    rank = max((len(k) for k in keys), default=0)
    out = []
    for i in range(rank):
        sizes = [k[len(k) - rank + i] for k in keys if len(k) - rank + i >= 0]
        non1 = [s for s in sizes if s != 1]
        out.append(non1[0] if non1 else 1)
    return tuple(out)


_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.bool: "b8", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8",
}


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        dims = ", ".join(str(_size_key(s)) for s in v.shape)
        return f"{_SHORT.get(v.dtype, str(v.dtype))}[{dims}]"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_describe(x) for x in v) + ")"
    return type(v).__name__ if v is not None else ""


def _op_stem(target) -> str:
    """An op's short name as an identifier stem: aten.add.Tensor -> add, aten._softmax -> softmax."""
    name = getattr(target, "_opname", None) or getattr(target, "__name__", None) or "v"
    return re.sub(r"\W", "_", name).strip("_") or "v"


def _canonical_stems(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Variable-name stems that depend on the region's structure, never on its node names.

    Placeholders are in0, in1, ... by position; computed nodes take their op's name (the namer
    numbers repeats in graph order). Two copies of one structure (a norm in every layer) so give
    byte-identical kernel code, which lets them share one module and one Triton compile.
    """
    stems, n_inputs = {}, 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            stems[node], n_inputs = f"in{n_inputs}", n_inputs + 1
        elif node.op == "call_function":
            stems[node] = _op_stem(node.target)
    return stems


class _Lowering:
    """Walks a region graph once: inputs, launcher-side views, kernel values, outputs.

    Generated names come from `_canonical_stems`; node names appear only in error messages.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.stems = _canonical_stems(gm)
        self.names = _Namer()
        self.placeholders: list[_Input] = []
        self.scalar_sources: list[_Input] = []  # scalar placeholders, then sizes the launcher computes
        self.tensor_sources: list[_Input] = []  # placeholders and views, in graph order
        self.views: list[tuple[_Input, str]] = []  # launcher lines computing views of inputs
        self.vals: list[_Val] = []  # creation order == topological order
        self.env: dict[fx.Node, _Input | _Val] = {}
        self.loads: dict[_Input, _Val] = {}
        self.helpers: list[str] = []
        self.outputs: list[_Output] = []
        self.symbols: dict[Any, str] = {}  # sympy symbol -> launcher expression
        self.flops = 0
        for node in gm.graph.nodes:
            self._visit(node)
        self._finish()

    # -- graph walk
    def _visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.op == "output":
            return self._output(node)
        if node.op != "call_function":
            raise UnsupportedRegion(f"{node.name}: {node.op} nodes are not supported in a fused region")
        if node.target in NOOPS:
            return None
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            return None  # a size computation (sym_size); layout args read it from the symbol map
        if node.target in LAYOUT:
            return self._view(node) if self._only_inputs(node) else self._value_layout(node)
        reason = unsupported_reason(node)
        if reason is not None:
            raise UnsupportedRegion(f"{node.name} ({node.target}): {reason}")
        self.flops += flops_per_element(node)
        if node.target in POINTWISE:
            return self._pointwise(node)
        return self._reduction(node)

    def _placeholder(self, node: fx.Node):
        v = node.meta.get("val")
        name = self.names.fresh(self.stems[node])
        if isinstance(v, torch.Tensor):
            if v.dtype not in SUPPORTED_DTYPES:
                raise UnsupportedRegion(f"{node.name}: input dtype {v.dtype}")
            inp = _Input(name, node, True, v.dtype, _level(v.shape), tuple(v.shape))
            for d, s in enumerate(v.shape):
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                    self.symbols.setdefault(s.node.expr, f"{name}.shape[{d}]")
            self.tensor_sources.append(inp)
        else:
            if isinstance(v, (bool, torch.SymBool)):
                ctype = "i1"
            elif isinstance(v, (int, torch.SymInt)):
                ctype = "i64"
            elif isinstance(v, (float, torch.SymFloat)):
                ctype = "fp32"
            else:
                raise UnsupportedRegion(f"{node.name}: placeholder without a tensor or scalar meta['val']")
            inp = _Input(name, node, False, ctype=ctype, level=SCALAR)
            if isinstance(v, torch.SymInt) and v.node.expr.is_Symbol:
                self.symbols.setdefault(v.node.expr, name)
            self.scalar_sources.append(inp)
        self.placeholders.append(inp)
        self.env[node] = inp

    def _only_inputs(self, node: fx.Node) -> bool:
        tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        return bool(tensors) and all(isinstance(self.env.get(a), _Input) for a in tensors)

    def _view(self, node: fx.Node):
        v = node.meta["val"]
        name = self.names.fresh(self.stems[node])
        args = [self._py(a) for a in node.args] + [f"{k}={self._py(a)}" for k, a in node.kwargs.items()]
        code = f"{name} = torch.ops.{node.target}({', '.join(args)})"
        inp = _Input(name, node, True, v.dtype, _level(v.shape), tuple(v.shape))
        self.views.append((inp, code))
        self.tensor_sources.append(inp)
        self.env[node] = inp

    def _value_layout(self, node: fx.Node):
        """A layout op on a computed value, kept where the kernel's implicit broadcasting covers
        it: expand (to a shape the value broadcasts to), and adding or dropping the trailing
        size-1 dim of a per-row value (unsqueeze(-1) / squeeze(-1) / view)."""
        src = node.args[0]
        if not isinstance(src, fx.Node) or src not in self.env:
            raise UnsupportedRegion(f"{node.name} ({node.target}): layout op on an unsupported value")
        v = self.value(src)
        in_key = _shape_key(src.meta["val"].shape)
        out_key = _shape_key(node.meta["val"].shape)
        expand = node.target in (torch.ops.aten.expand.default, torch.ops.aten.expand_as.default)
        if out_key == in_key or (expand and not v.dropped and _broadcastable(in_key, out_key)):
            self.env[node] = v
        elif v.dropped and out_key == in_key + (1,):
            self.env[node] = self.new_val(name=self.names.fresh(self.stems[node]), level=v.level, ctype=v.ctype,
                                          kind="expr", expr=v.name, deps=(v,), origin=node)
        elif not v.dropped and v.level < FULL and in_key[-1:] == (1,) and out_key == in_key[:-1]:
            self.env[node] = self.new_val(name=self.names.fresh(self.stems[node]), level=v.level, ctype=v.ctype,
                                          kind="expr", expr=v.name, deps=(v,), origin=node, dropped=True)
        else:
            raise UnsupportedRegion(f"{node.name} ({node.target}): re-indexes a computed value {in_key} -> {out_key}")

    def _py(self, a) -> str:
        """A layout op's argument as launcher source (sizes resolved from the inputs' shapes)."""
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self._py(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, fx.Node):
            if isinstance(self.env.get(a), _Input):
                return self.env[a].name
            return self._py(a.meta.get("val"))
        if isinstance(a, torch.SymInt):
            return self._sym(a.node.expr)
        if isinstance(a, torch.dtype):
            return str(a)
        if isinstance(a, torch.device):
            return f"torch.device({str(a)!r})"
        if isinstance(a, torch.memory_format):
            return str(a)
        if a is None or isinstance(a, (bool, int, float, str)):
            return repr(a)
        raise UnsupportedRegion(f"layout argument {a!r}")

    def _sym(self, expr) -> str:
        if expr.is_Integer:
            return str(int(expr))
        if expr.is_Symbol:
            if expr not in self.symbols:
                raise UnsupportedRegion(f"size {expr} is not a dim of any region input")
            return self.symbols[expr]
        if expr.is_Add:
            return "(" + " + ".join(self._sym(a) for a in expr.args) + ")"
        if expr.is_Mul:
            return "(" + " * ".join(self._sym(a) for a in expr.args) + ")"
        raise UnsupportedRegion(f"size expression {expr}")

    def value(self, node_or_const) -> _Val:
        if node_or_const not in self.env:
            self._size_scalar(node_or_const)
        x = self.env[node_or_const]
        if isinstance(x, _Val):
            return x
        if x in self.loads:
            return self.loads[x]
        if x.is_tensor:
            v = _Val(x.name, x.level, compute_type(x.dtype), "load", inp=x)
        else:
            v = _Val(x.name, SCALAR, x.ctype, "arg", inp=x)
        self.loads[x] = v
        self.vals.append(v)
        return v

    def _size_scalar(self, node: fx.Node):
        """A size computed from the inputs' shapes (sym_size & co.) used as a value: the launcher
        computes it and passes it as a scalar argument."""
        v = node.meta.get("val")
        if not isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) or isinstance(v, bool):
            raise UnsupportedRegion(f"{node.name} ({node.target}) is not supported in a fused region")
        name = self.names.fresh(self.stems.get(node, "size"))
        inp = _Input(name, node, False, ctype="fp32" if isinstance(v, (float, torch.SymFloat)) else "i64",
                     level=SCALAR)
        self.views.append((inp, f"{name} = {self._py(v)}"))
        self.scalar_sources.append(inp)
        self.env[node] = inp

    def new_val(self, **kw) -> _Val:
        v = _Val(**kw)
        self.vals.append(v)
        return v

    def _pointwise(self, node: fx.Node):
        rule = POINTWISE[node.target]
        attrs = normalized_args(node)
        out_type = compute_type(node.meta["val"].dtype)
        sources: dict[str, Any] = {}
        for k in rule.operands:
            a = attrs.get(k)
            sources[k] = self.value(a) if isinstance(a, fx.Node) else a
        given = {k: (s.ctype if isinstance(s, _Val) else literal_type(s)) for k, s in sources.items()}
        common = common_type(*given.values()) if given else out_type
        operands, types, deps = {}, {}, []
        for k, s in sources.items():
            if k in rule.bool_operands:
                t = "i1"
            elif rule.operand_type == "result":
                t = out_type
            elif rule.operand_type == "common":
                t = common
            else:
                t = given[k]
            types[k] = t
            if isinstance(s, _Val):
                operands[k] = cast(s.name, s.ctype, t)
                deps.append(s)
            else:
                operands[k] = literal(s, t if rule.operand_type != "none" else None)
        types["out"] = out_type
        expr = rule.emit.format(**operands) if isinstance(rule.emit, str) else rule.emit(operands, attrs, types)
        for h in rule.helpers:
            if h not in self.helpers:
                self.helpers.append(h)
        if deps and (node.target in IDENTITY or expr == deps[0].name) and deps[0].ctype == out_type:
            self.env[node] = deps[0]  # same value: alias, no new variable
            return
        level = max((d.level for d in deps), default=SCALAR)
        self.env[node] = self.new_val(
            name=self.names.fresh(self.stems[node]), level=level, ctype=out_type, kind="expr", expr=expr,
            deps=tuple(deps), origin=node, dropped=_dropped(deps, node),
        )

    def _reduction(self, node: fx.Node):
        rule = REDUCTIONS[node.target]
        result = rule.lower(_Builder(self, node), normalized_args(node))
        self.env[node] = result

    def _output(self, node: fx.Node):
        outs = node.args[0]
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        by_node: dict[fx.Node, _Output] = {}
        for n in outs:
            if not isinstance(n, fx.Node):
                raise UnsupportedRegion(f"output {n!r} is not a graph value")
            if n in by_node:
                self.outputs.append(by_node[n])
                continue
            x = self.env.get(n)
            v = n.meta.get("val")
            if not isinstance(v, torch.Tensor):
                raise UnsupportedRegion(f"output {n.name} is not a tensor")
            if isinstance(x, _Input):
                out = _Output(x.name, n, v.dtype, source=x, shape_kind="input", result=x.name)
            elif isinstance(x, _Val):
                if x.level == SCALAR:
                    raise UnsupportedRegion(f"output {n.name} depends on no tensor input")
                out = _Output(self.names.fresh(f"{self.stems.get(n, 'v')}_out"), n, v.dtype, val=x)
            else:
                raise UnsupportedRegion(f"output {n.name} is not computed by the region")
            by_node[n] = out
            self.outputs.append(out)

    # -- after the walk: what the kernel needs, its iteration space, output shapes
    def _finish(self):
        computed = [o for o in self._distinct_outputs() if o.val is not None]
        self.needed = self._closure([o.val for o in computed])
        needed_ids = {id(v) for v in self.needed}
        self.kernel_inputs = [i for i in self.tensor_sources if i in self.loads and id(self.loads[i]) in needed_ids]
        self.kernel_scalars = [i for i in self.scalar_sources if i in self.loads and id(self.loads[i]) in needed_ids]
        self.kernel_outputs = computed
        self.has_reduction = any(v.kind == "reduce" for v in self.needed)
        self.kind = "none" if not computed else ("rows" if self.has_reduction else "pointwise")
        if computed and not self.kernel_inputs:
            raise UnsupportedRegion("the region's outputs depend on no tensor input")
        keys = [_shape_key(i.shape) for i in self.kernel_inputs]
        self.iter_key = _broadcast_keys(keys)
        self.rank = len(self.iter_key)
        if self.kind == "rows" and self.rank == 0:
            raise UnsupportedRegion("row reduction over a 0-dim iteration space")
        for o in computed:
            # the buffer the kernel writes: the iteration space, or one element per row
            # (keepdim or not); an output varying over fewer dims is returned as a view of it
            key = _shape_key(o.node.meta["val"].shape)
            per_row = o.val.dropped or key[-1:] == (1,) or self.iter_key[-1:] == (1,)
            if self.kind == "rows" and o.val.level == ROW and per_row:
                o.shape_kind = "row"
                target, o.alloc = self.iter_key[:-1] + (1,), "tuple(shape[:-1]) + (1,)"
            else:
                target, o.alloc = self.iter_key, "shape"
            base = o.name
            if o.val.dropped:  # constant along the last dim: drop it
                target, base = target[:-1], f"{o.name}[..., 0]"
            o.result = base if key == target else self._broadcast_view(o, key, target, base)

    def _broadcast_view(self, o: _Output, key: tuple, target: tuple, base: str) -> str:
        """An output smaller than the space it varies over (it depends on broadcast inputs only):
        the kernel writes the full buffer (equal values along broadcast dims) and the launcher
        returns the view of one slice of it."""
        parts = []
        for j, t in enumerate(target):
            i = j - (len(target) - len(key))
            if i < 0:
                parts.append("0")
            elif key[i] == t:
                parts.append(":")
            elif key[i] == 1:
                parts.append("0:1")
            else:
                raise UnsupportedRegion(f"output {o.node.name} has shape {key}, not broadcastable to {target}")
        return f"{base}[{', '.join(parts)}]" if parts else base

    def _distinct_outputs(self) -> list[_Output]:
        seen, out = set(), []
        for o in self.outputs:
            if id(o) not in seen:
                seen.add(id(o))
                out.append(o)
        return out

    def _closure(self, roots: list[_Val], stop=None) -> list[_Val]:
        """Values `roots` depend on (themselves included), in topological order."""
        want: set[int] = set()
        stack = list(roots)
        while stack:
            v = stack.pop()
            if id(v) in want or (stop is not None and stop(v) and v not in roots):
                continue
            want.add(id(v))
            stack.extend(v.deps)
        return [v for v in self.vals if id(v) in want]


class _Builder:
    """What a ReductionRule's lowering builds with (see ops.ReductionRule)."""

    def __init__(self, low: _Lowering, node: fx.Node):
        self.low, self.node = low, node

    def _name(self, suffix):
        stem = self.low.stems[self.node]
        return self.low.names.fresh(f"{stem}_{suffix}" if suffix else stem)

    def input(self, arg):
        if arg is None:
            return None
        v = self.low.value(arg)
        if v.ctype != "fp32":
            v = self.low.new_val(
                name=self._name("f32"), level=v.level, ctype="fp32", kind="expr",
                expr=cast(v.name, v.ctype, "fp32"), deps=(v,), origin=self.node,
            )
        return v

    def reduce(self, op: str, h: _Val, suffix, keepdim: bool = True):
        if h.dropped:
            raise UnsupportedRegion(f"{self.node.name}: reduces a keepdim=False reduction (not the last dim)")
        helper = {"max": "_maximum", "min": "_minimum"}.get(op)
        if helper and helper not in self.low.helpers and h.level == FULL:
            self.low.helpers.append(helper)
        if h.level < FULL:  # reducing a dim of size 1: the value itself
            if keepdim:
                return h
            return self.low.new_val(
                name=self._name(suffix), level=h.level, ctype=h.ctype, kind="expr", expr=h.name, deps=(h,),
                origin=self.node, dropped=True,
            )
        return self.low.new_val(
            name=self._name(suffix), level=ROW, ctype="fp32", kind="reduce", op=op, deps=(h,), origin=self.node,
            dropped=not keepdim,
        )

    def n(self, h: _Val) -> str:
        return "N" if h.level == FULL else "1"

    def pointwise(self, template: str, *hs: _Val, suffix=None):
        return self.low.new_val(
            name=self._name(suffix), level=max(h.level for h in hs), ctype="fp32", kind="expr",
            expr=template.format(*[h.name for h in hs]), deps=tuple(dict.fromkeys(hs)), origin=self.node,
            dropped=_dropped(hs, self.node),
        )


# ----------------------------------------------------------------------------- emission helpers


def _from_storage(expr: str, dtype: torch.dtype) -> str:
    """A loaded value converted to its compute type."""
    if dtype == torch.bool:
        return f"({expr} != 0)"
    if dtype in (torch.float16, torch.bfloat16):
        return f"{expr}.to(tl.float32)"
    if dtype in (torch.int8, torch.int16, torch.uint8):
        return f"{expr}.to(tl.int32)"
    return expr


def _to_storage(v: _Val, dtype: torch.dtype) -> str:
    """A value converted to an output's storage type."""
    if dtype == torch.bool:
        return f"{cast(v.name, v.ctype, 'i1')}.to(tl.uint8)"
    if dtype in FLOAT_DTYPES:
        x = cast(v.name, v.ctype, "fp32")
        if dtype == torch.bfloat16:
            return f"_round_bf16({x}).to(tl.bfloat16)"
        return x if dtype == torch.float32 else f"{x}.to({TL_STORAGE[dtype]})"
    return f"{v.name}.to({TL_STORAGE[dtype]})"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _names_with_dtype(items) -> str:
    return ", ".join(f"{i.name} ({_SHORT[i.dtype]})" for i in items) or "nothing"


def _unravel(index: str, size: str, stride: str, off: str, tensors: list[str], ndim: str, dmax: int) -> list[str]:
    """Offsets of `tensors` for a linear `index` over up to `dmax` dims (innermost first).

    size.format(d) / stride.format(t, d) / off.format(t) name the size of dim d, tensor t's
    stride along it and its offset variable. Branches on the constexpr `ndim` so only the
    index math of the dims at hand is compiled.
    """
    lines: list[str] = []

    def emit(d: int, rem: str, pad: str):
        op = "=" if d == 0 else "+="
        last = [f"{pad}{off.format(t)} {op} {rem} * {stride.format(t, d)}" for t in tensors]
        if d == dmax - 1:
            lines.extend(last)
            return
        lines.append(f"{pad}if {ndim} == {d + 1}:")
        lines.extend("    " + s for s in last)
        lines.append(f"{pad}else:")
        inner = pad + "    "
        lines.append(f"{inner}idx{d} = {rem} % {size.format(d)}")
        lines.append(f"{inner}rem{d} = {rem} // {size.format(d)}")
        lines.extend(f"{inner}{off.format(t)} {op} idx{d} * {stride.format(t, d)}" for t in tensors)
        emit(d + 1, f"rem{d}", inner)

    emit(0, index, "")
    return lines


def _indent(lines: list[str], n: int = 1) -> list[str]:
    pad = "    " * n
    return [pad + s if s else s for s in lines]


# The generated module's imports and mode: every shared helper comes from fxopt.codegen.fused_runtime (as rt),
# given the mode and knobs this module reads when it is imported (the loader keys modules by them).
_PREAMBLE = """
import functools

import torch
import triton
import triton.language as tl

from fxopt import config as _config
from fxopt.codegen import fused_runtime as rt

INTERPRET = _config.get("interpret")
# Timing every config is opt-in (FXOPT_AUTOTUNE=1 or FXOPT_FUSED_AUTOTUNE=1); by default the first
# (pruned) config runs, so the first call of an optimized model costs compiles, not a tuning sweep.
AUTOTUNE = _config.get("fused_autotune")
autotune = functools.partial(rt.autotune, interpret=INTERPRET, tune=AUTOTUNE)
# applied before every fp32 -> bf16 cast: rounds to nearest even in the interpreter (which truncates)
_round_bf16 = rt.round_bf16_for(INTERPRET)
"""


def _pointwise_globals(element_bytes: int) -> str:
    """A pointwise module's constants: its configs and the pruner that orders them by its element size."""
    return (
        "# bytes of an element of the widest input or output\n"
        f"ELEMENT_BYTES = {element_bytes}\n"
        "POINTWISE_CONFIGS = rt.pointwise_configs(INTERPRET)\n"
        "TILE_CONFIGS = rt.tile_configs(INTERPRET)\n"
        "prune_pointwise = rt.pointwise_pruner(ELEMENT_BYTES)"
    )


def _row_globals(row_bytes_per_column: int) -> str:
    """A row-reduction module's constants: the whole-row limit, its configs and its row pruner."""
    return (
        "# rows longer than this are reduced in a loop over column blocks\n"
        f"WHOLE_ROW_MAX_N = {WHOLE_ROW_MAX_N}\n"
        "# bytes each column of a row reads and writes (inputs that vary by row, outputs)\n"
        f"ROW_BYTES_PER_COLUMN = {row_bytes_per_column}\n"
        "ROW_CONFIGS = rt.row_configs(INTERPRET)\n"
        "LOOP_CONFIGS = rt.loop_configs(INTERPRET)\n"
        "prune_rows = rt.row_pruner(ROW_BYTES_PER_COLUMN)"
    )


class _Emitter:
    def __init__(self, low: _Lowering, kname: str):
        self.low, self.k = low, kname
        self.ins = low.kernel_inputs
        self.scalars = low.kernel_scalars
        self.outs = low.kernel_outputs

    # -- shared pieces
    def _load_line(self, v: _Val, ptr_expr: str, mask: str | None) -> str:
        raw = f"tl.load({ptr_expr}, mask={mask}, other=0)" if mask else f"tl.load({ptr_expr})"
        return f"{v.name} = {_from_storage(raw, v.inp.dtype)}"

    def _value_lines(self, vals: list[_Val], load, reduce=None) -> list[str]:
        lines = []
        # loads first (they depend on nothing), then the values in dependency order
        for v in sorted(vals, key=lambda v: v.kind != "load"):
            if v.kind == "load":
                lines.extend(load(v))
            elif v.kind == "expr":
                lines.append(f"{v.name} = {v.expr}")
            elif v.kind == "reduce":
                lines.append(reduce(v))
        return lines

    def _flops_note(self) -> str:
        return f"{self.low.flops} FLOPs per element (op table)"

    # -- pointwise
    def pointwise(self) -> str:
        low, k = self.low, self.k
        dmax = max(1, low.rank)
        needed = low.needed
        ins, outs = self.ins, self.outs
        in_bytes = sum(_itemsize(i.dtype) for i in ins)
        out_bytes = sum(_itemsize(o.dtype) for o in outs)
        reads = (
            f"# Each program handles BLOCK elements of the iteration space: it reads BLOCK elements of\n"
            f"# {_names_with_dtype(ins)} and writes BLOCK elements of {_names_with_dtype(outs)}:\n"
            f"# {in_bytes + out_bytes}*BLOCK bytes, {self._flops_note()}."
        )
        scalars = [s.name for s in self.scalars]
        stores = [f"tl.store({o.name}_ptr + offs, {_to_storage(o.val, o.dtype)}, mask=mask)" for o in outs]
        head = [
            "pid = tl.program_id(0)",
            "if INDEX_64:",
            "    pid = pid.to(tl.int64)",
            "offs = pid * BLOCK + tl.arange(0, BLOCK)",
            "mask = offs < numel",
        ]

        # contiguous variant
        def load_contig(v):
            flag = v.inp.name.upper() + "_SCALAR"
            return [
                f"if {flag}:",
                "    " + self._load_line(v, f"{v.name}_ptr", None),
                "else:",
                "    " + self._load_line(v, f"{v.name}_ptr + offs", "mask"),
            ]

        params = [[f"{i.name}_ptr" for i in ins], scalars, [f"{o.name}_ptr" for o in outs], ["numel", "numel_bucket"]]
        params += [[f"{i.name.upper()}_SCALAR: tl.constexpr" for i in ins]]
        params += [["INDEX_64: tl.constexpr", "BLOCK: tl.constexpr"]]
        body = head + self._value_lines(needed, load_contig) + stores
        contiguous = self._kernel(
            f"{k}_contiguous", params, body,
            'autotune(POINTWISE_CONFIGS, key=["numel_bucket"], prune=prune_pointwise)',
            "Contiguous inputs: linear offsets (an input of one element is loaded once).\n" + reads,
        )

        # strided variant
        params = [[f"{i.name}_ptr"] + [f"{i.name}_stride{d}" for d in range(dmax)] for i in ins]
        params += [scalars, [f"{o.name}_ptr" for o in outs], ["numel"] + [f"size{d}" for d in range(dmax)]]
        params += [["numel_bucket"], ["NDIM: tl.constexpr", "INDEX_64: tl.constexpr", "BLOCK: tl.constexpr"]]
        unravel = _unravel("offs", "size{}", "{}_stride{}", "{}_off", [i.name for i in ins], "NDIM", dmax)
        body = head + ["# offsets of each input: unravel the linear index over the collapsed dims"] + unravel
        body += self._value_lines(needed, lambda v: [self._load_line(v, f"{v.name}_ptr + {v.name}_off", "mask")])
        body += stores
        strided = self._kernel(
            f"{k}_strided", params, body,
            'autotune(POINTWISE_CONFIGS, key=["numel_bucket"], prune=prune_pointwise)',
            "Any strides (0 = broadcast): dims innermost first, NDIM of them after collapsing.\n" + reads,
        )

        # 2-D variant: two collapsed dims (a broadcast row or column, a transposed input): tiles of
        # ROWS_T x BLOCK_C, no per-element division, inner-dim runs stay vector loads
        params = [[f"{i.name}_ptr", f"{i.name}_stride0", f"{i.name}_stride1"] for i in ins]
        params += [scalars, [f"{o.name}_ptr" for o in outs], ["size0", "size1", "size0_bucket", "numel_bucket"]]
        params += [["INDEX_64: tl.constexpr", "ROWS_T: tl.constexpr", "BLOCK_C: tl.constexpr"]]
        body = [
            "pid_c = tl.program_id(0)",
            "pid_r = tl.program_id(1)",
            "rows = pid_r * ROWS_T + tl.arange(0, ROWS_T)",
            "cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)",
            "if INDEX_64:",
            "    rows = rows.to(tl.int64)",
            "    cols = cols.to(tl.int64)",
            "mask = (rows < size1)[:, None] & (cols < size0)[None, :]",
            "offs = rows[:, None] * size0 + cols[None, :]",
        ]
        body += self._value_lines(needed, lambda v: [self._load_line(
            v, f"{v.name}_ptr + rows[:, None] * {v.name}_stride1 + cols[None, :] * {v.name}_stride0", "mask")])
        body += stores
        tiled = self._kernel(
            f"{k}_tiled", params, body,
            'autotune(TILE_CONFIGS, key=["size0_bucket", "numel_bucket"], prune=rt.prune_tile_configs)',
            "Two collapsed dims (size0 inner, size1 outer), any strides: ROWS_T x BLOCK_C tiles.\n"
            + reads.replace("BLOCK elements", "ROWS_T*BLOCK_C elements").replace(
                "*BLOCK bytes", "*ROWS_T*BLOCK_C bytes"),
        )
        return contiguous + "\n\n\n" + strided + "\n\n\n" + tiled

    # -- rows
    def _row_params(self, lmax: int) -> list[list[str]]:
        params = []
        for i in self.ins:
            params.append(
                [f"{i.name}_ptr"] + [f"{i.name}_stride_r{d}" for d in range(lmax)]
                + ([f"{i.name}_stride_n"] if i.level == FULL else [])
            )
        params += [[s.name for s in self.scalars], [f"{o.name}_ptr" for o in self.outs]]
        params += [["n_rows", "N"] + [f"lead_size{d}" for d in range(lmax)], ["n_bucket"]]
        params += [["LEAD_DIMS: tl.constexpr", "INDEX_64: tl.constexpr"]]
        params += [["BLOCK_N: tl.constexpr", "ROWS: tl.constexpr"]]
        return params

    def _row_invariant(self, i: _Input) -> bool:
        """A full-width input the same for every row (leading dims statically 1 or absent, like a norm's
        weight): loaded once per column block as a vector, kept in cache (evict_last)."""
        return i.level == FULL and all(k == 1 for k in _shape_key(i.shape)[:-1])

    def _row_head(self, lmax: int) -> list[str]:
        lines = [
            "pid = tl.program_id(0)",
            "if INDEX_64:",
            "    pid = pid.to(tl.int64)",
            "rows = pid * ROWS + tl.arange(0, ROWS)",
            "row_mask = rows < n_rows",
            "col_idx = tl.arange(0, BLOCK_N)",
            "if INDEX_64:",
            "    col_idx = col_idx.to(tl.int64)",
            "# row offset of each input: unravel the row index over the collapsed leading dims",
        ]
        names = [i.name for i in self.ins if not self._row_invariant(i)]
        if not names:
            return lines
        return lines + _unravel("rows", "lead_size{}", "{}_stride_r{}", "{}_row", names, "LEAD_DIMS", lmax)

    def _row_load(self, v: _Val) -> list[str]:
        if v.level == FULL and self._row_invariant(v.inp):
            raw = (f'tl.load({v.name}_ptr + cols * {v.name}_stride_n, mask=col_mask, other=0, '
                   f'eviction_policy="evict_last")')
            return [f"{v.name} = {_from_storage(raw, v.inp.dtype)}[None, :]"]
        if v.level == FULL:
            ptr = f"{v.name}_ptr + {v.name}_row[:, None] + cols[None, :] * {v.name}_stride_n"
            return [self._load_line(v, ptr, "mask")]
        return [self._load_line(v, f"{v.name}_ptr + {v.name}_row[:, None]", "row_mask[:, None]")]

    def _row_stores(self, outs: list[_Output]) -> list[str]:
        lines = []
        for o in outs:
            if o.shape_kind == "full":
                lines.append(f"tl.store({o.name}_ptr + out_offs, {_to_storage(o.val, o.dtype)}, mask=mask)")
            else:
                value = _to_storage(o.val, o.dtype)
                lines.append(f"tl.store({o.name}_ptr + rows[:, None], {value}, mask=row_mask[:, None])")
        return lines

    _NEUTRAL = {"sum": "0.0", "mean": "0.0", "max": '-float("inf")', "min": 'float("inf")'}

    @staticmethod
    def _reduce_rows(op: str, tile: str) -> str:
        """Row reduction of a [ROWS, BLOCK_N] tile to [ROWS, 1]; max/min propagate NaN like torch."""
        if op in ("sum", "mean"):
            return f"tl.sum({tile}, axis=1)[:, None]"
        return f"tl.reduce({tile}, 1, {'_maximum' if op == 'max' else '_minimum'})[:, None]"

    def element_bytes(self) -> int:
        return max([_itemsize(x.dtype) for x in self.ins + self.outs if x.dtype is not None], default=4)

    def row_bytes_per_column(self) -> int:
        """Bytes one column of one row moves: full inputs that are not broadcast along rows, full outputs."""
        def varies_by_row(shape) -> bool:
            return not all(isinstance(d, int) and d == 1 for d in shape[:-1])

        reads = [i for i in self.ins if i.level == FULL and varies_by_row(i.shape)]
        writes = [o for o in self.outs if o.shape_kind == "full"]
        return max(1, sum(_itemsize(x.dtype) for x in reads + writes))

    def _reads_note(self) -> str:
        full_in = [i for i in self.ins if i.level == FULL]
        row_in = [i for i in self.ins if i.level != FULL]
        full_out = [o for o in self.outs if o.shape_kind == "full"]
        row_out = [o for o in self.outs if o.shape_kind != "full"]
        note = f"reads ROWS*N elements of {_names_with_dtype(full_in)}"
        if row_in:
            note += f"\n# and ROWS elements of the per-row {_names_with_dtype(row_in)}"
        note += f"; writes ROWS*N elements of {_names_with_dtype(full_out)}"
        if row_out:
            note += f"\n# and ROWS elements of the per-row {_names_with_dtype(row_out)}"
        return note + ". Inputs broadcast along rows (stride 0) are re-read from cache."

    def rows(self) -> str:
        low, k = self.low, self.k
        lmax = max(1, low.rank - 1)
        params = self._row_params(lmax)
        needed = low.needed
        full_outs = [o for o in self.outs if o.shape_kind == "full"]

        # whole rows in registers
        def reduce_inline(v):
            x = v.deps[0].name
            red = self._reduce_rows(v.op, f"tl.where(mask, {x}, {self._NEUTRAL[v.op]})")
            return f"{v.name} = {red}" + (" / N" if v.op == "mean" else "")

        body = self._row_head(lmax) + [
            "cols = col_idx",
            "col_mask = cols < N",
            "mask = row_mask[:, None] & col_mask[None, :]",
        ]
        body += self._value_lines(needed, self._row_load, reduce_inline)
        if full_outs:
            body.append("out_offs = rows[:, None] * N + cols[None, :]")
        body += self._row_stores(self.outs)
        reductions = ", ".join(f"{v.op}({v.deps[0].name})" for v in needed if v.kind == "reduce")
        whole = self._kernel(
            f"{k}_row", params, body, 'autotune(ROW_CONFIGS, key=["n_bucket"], prune=prune_rows)',
            f"Whole rows in registers (BLOCK_N >= N): reductions {reductions}.\n"
            f"# Each program handles ROWS rows: it {self._reads_note()}\n# {self._flops_note()}.",
        )

        # long rows: one loop over column blocks per stage of reductions, then the outputs
        avail: dict[int, int] = {}
        stage: dict[int, int] = {}
        for v in needed:
            a = max((avail[id(d)] for d in v.deps), default=0)
            if v.kind == "reduce":
                stage[id(v)] = a + 1
                a += 1
            avail[id(v)] = a
        n_stages = max(stage.values(), default=0)
        n_passes = n_stages + (1 if full_outs else 0)
        body = self._row_head(lmax)
        emitted: set[int] = set()

        def emit_outside(upto: int) -> list[str]:
            vals = [
                v for v in needed
                if v.level < FULL and v.kind != "reduce" and avail[id(v)] <= upto and id(v) not in emitted
            ]
            emitted.update(id(v) for v in vals)
            return self._value_lines(vals, self._row_load)

        def loop_header() -> list[str]:
            return [
                "for col_start in range(0, N, BLOCK_N):",
                "    cols = col_start + col_idx",
                "    col_mask = cols < N",
                "    mask = row_mask[:, None] & col_mask[None, :]",
            ]

        def in_loop(roots: list[_Val]) -> list[_Val]:
            vals = low._closure(roots, stop=lambda v: v.level < FULL or v.kind == "reduce")
            return [v for v in vals if v.level == FULL and v.kind != "reduce"]

        body += emit_outside(0)
        for s in range(1, n_stages + 1):
            reds = [v for v in needed if v.kind == "reduce" and stage[id(v)] == s]
            what = ", ".join(f"{v.op}({v.deps[0].name})" for v in reds)
            body.append(f"# pass {s} of {n_passes}: {what}")
            for v in reds:
                init = "tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)" if v.op in ("sum", "mean") else (
                    f"tl.full([ROWS, BLOCK_N], {self._NEUTRAL[v.op]}, tl.float32)"
                )
                body.append(f"{v.name}_acc = {init}")
            body += loop_header()
            body += _indent(self._value_lines(in_loop([v.deps[0] for v in reds]), self._row_load))
            for v in reds:
                x, acc = v.deps[0].name, f"{v.name}_acc"
                masked = f"tl.where(mask, {x}, {self._NEUTRAL[v.op]})"
                if v.op in ("sum", "mean"):
                    body.append(f"    {acc} += {masked}")
                else:
                    body.append(f"    {acc} = {'_maximum' if v.op == 'max' else '_minimum'}({acc}, {masked})")
            for v in reds:
                red = self._reduce_rows(v.op, f"{v.name}_acc")
                body.append(f"{v.name} = {red}" + (" / N" if v.op == "mean" else ""))
            body += emit_outside(s)
        if full_outs:
            body.append(f"# pass {n_passes} of {n_passes}: outputs")
            body += loop_header()
            body += _indent(self._value_lines(in_loop([o.val for o in full_outs]), self._row_load))
            body.append("    out_offs = rows[:, None] * N + cols[None, :]")
            body += _indent(self._row_stores(full_outs))
        body += self._row_stores([o for o in self.outs if o.shape_kind != "full"])
        loop = self._kernel(
            f"{k}_loop", params, body, 'autotune(LOOP_CONFIGS, key=["n_bucket"])',
            f"Long rows: {n_passes} passes over column blocks of BLOCK_N, each recomputing what it needs.\n"
            f"# Each program handles ROWS rows: per pass it {self._reads_note()}\n"
            f"# Passes after the first mostly hit L2. {self._flops_note()}.",
        )
        return whole + "\n\n\n" + loop

    def _kernel(self, name: str, params: list[list[str]], body: list[str], deco: str, doc: str) -> str:
        lines = [f"@{deco}", "@triton.jit", f"def {name}("]
        lines += ["    " + ", ".join(group) + "," for group in params if group]
        lines.append("):")
        text = " ".join(s.lstrip("# ") for s in doc.splitlines())
        lines += ["    # " + s for s in textwrap.wrap(text, 100)]
        lines += _indent(body)
        return "\n".join(lines)

    # -- launcher
    def launcher(self) -> str:
        low, k = self.low, self.k
        params = [p.name for p in low.placeholders]
        outs = low.outputs
        doc = "Run the fused region: returns (" + ", ".join(o.name for o in outs) + ("," if len(outs) == 1 else "")
        lines = [f"def launch({', '.join(params)}):", f'    """{doc})."""']
        lines += [f"    {code}" for _, code in low.views]
        ret = "(" + ", ".join(o.result for o in outs) + ("," if len(outs) == 1 else "") + ")"
        if low.kind == "none":
            lines.append(f"    return {ret}")
            return "\n".join(lines)
        first = self.ins[0].name

        def ptr(i):
            return f"{i.name}.view(torch.uint8)" if i.dtype == torch.bool else i.name

        lines.append(f"    tensors = ({', '.join(i.name for i in self.ins)},)")
        if low.kind == "pointwise":
            dmax = max(1, low.rank)
            lines.append(f"    shape, numel, bucket, contiguous, scalar, ndim, sizes, strides, index_64 = "
                         f"rt.plan(rt.pointwise_plan, tensors, {dmax})")
        else:
            lmax = max(1, low.rank - 1)
            lines.append(f"    shape, n_rows, n_cols, lead_dims, lead_sizes, lead_strides, col_strides, index_64 = "
                         f"rt.plan(rt.row_plan, tensors, {lmax})")
        for o in self.outs:
            lines.append(f"    {o.name} = torch.empty({o.alloc}, dtype={o.dtype}, device={first}.device)")
        out_ptrs = [f"{o.name}.view(torch.uint8)" if o.dtype == torch.bool else o.name for o in self.outs]
        scalars = [s.name for s in self.scalars]
        if low.kind == "pointwise":
            flags = [f"{i.name.upper()}_SCALAR=scalar[{n}]" for n, i in enumerate(self.ins)]
            contiguous = [[ptr(i) for i in self.ins], scalars, out_ptrs, ["numel", "bucket"], flags,
                          ["INDEX_64=index_64"]]
            strided = [[ptr(i), f"*strides[{n}]"] for n, i in enumerate(self.ins)]
            strided += [scalars, out_ptrs, ["numel", "*sizes", "bucket"], ["NDIM=ndim", "INDEX_64=index_64"]]
            tiled = [[ptr(i), f"strides[{n}][0]", f"strides[{n}][1]"] for n, i in enumerate(self.ins)]
            tiled += [scalars, out_ptrs, ["sizes[0]", "sizes[1]", "triton.next_power_of_2(sizes[0])", "bucket"],
                      ["INDEX_64=index_64"]]
            lines += [
                "    if numel > 0:",
                '        grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)',
                "        if contiguous:",
                *_call(f"{k}_contiguous[grid]", contiguous, 3),
                "        elif ndim == 2 and sizes[1] <= 65535:  # 2-D tiles (grid y holds the row blocks)",
                '            grid = lambda meta: (triton.cdiv(sizes[0], meta["BLOCK_C"]), '
                'triton.cdiv(sizes[1], meta["ROWS_T"]))',
                *_call(f"{k}_tiled[grid]", tiled, 3),
                "        else:",
                *_call(f"{k}_strided[grid]", strided, 3),
            ]
        else:
            args = [
                [ptr(i), f"*lead_strides[{n}]"] + ([f"col_strides[{n}]"] if i.level == FULL else [])
                for n, i in enumerate(self.ins)
            ]
            args += [scalars, out_ptrs, ["n_rows", "n_cols", "*lead_sizes"]]
            lines += [
                "    if n_rows > 0:",
                "        if n_cols == 0:",
                '            raise ValueError("fused row reduction over an empty last dim")',
                '        grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)',
                "        if n_cols <= WHOLE_ROW_MAX_N:  # whole rows in registers",
                "            block_n = max(16, triton.next_power_of_2(n_cols))",
                *_call(f"{k}_row[grid]", args + [["block_n"], ["LEAD_DIMS=lead_dims", "INDEX_64=index_64",
                                                               "BLOCK_N=block_n"]], 3),
                "        else:  # loop over column blocks",
                *_call(f"{k}_loop[grid]", args + [["triton.next_power_of_2(n_cols)"],
                                                  ["LEAD_DIMS=lead_dims", "INDEX_64=index_64"]], 3),
            ]
        lines.append(f"    return {ret}")
        return "\n".join(lines)


def _call(fn: str, groups: list[list[str]], indent: int) -> list[str]:
    """A call laid out one argument group per line."""
    pad = "    " * indent
    return [f"{pad}{fn}("] + [f"{pad}    {', '.join(g)}," for g in groups if g] + [f"{pad})"]


def _header(gm: fx.GraphModule, region_name: str, kernel: GeneratedKernel, header_lines) -> list[str]:
    """The region's own comment header: its graph nodes (original names), the kernel variable each
    became, and the caller's lines (predicted bytes and FLOPs). Not part of the shared code."""
    low = kernel.low
    kind = {
        "pointwise": "pointwise (contiguous, 2-D tiled and strided variants)",
        "rows": "row reduction over the last dim (whole-row and multi-pass variants)",
        "none": "no kernel (outputs are inputs)",
    }[low.kind]
    lines = [
        f"# fxopt fused kernel: {kernel.name}",
        f"# region: {region_name}",
        "# Generated by fxopt.codegen.fused from a torch.fx region. Do not edit: regenerated from the graph.",
        "# The code below this header depends only on the region's structure (ops, constants, dtypes, ranks):",
        "# every region with this code shares one loaded module (and one Triton compile) of this kernel.",
        f"# kind: {kind}",
        "# region nodes (graph node, op, value, kernel variable):",
    ]
    rows = []
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if n.op == "placeholder":
            what = "input"
        else:
            args = ", ".join(_arg_str(a) for a in n.args)
            kw = ", ".join(f"{k}={_arg_str(v)}" for k, v in n.kwargs.items())
            what = f"{n.target}({args}{', ' if args and kw else ''}{kw})"
        var = low.env.get(n)
        rows.append((n.name, what, _describe(n.meta.get("val")), var.name if var is not None else ""))
    w0 = max((len(r[0]) for r in rows), default=0)
    w1 = min(60, max((len(r[1]) for r in rows), default=0))
    w2 = max((len(r[2]) for r in rows), default=0)
    lines += [f"#   {a.ljust(w0)}  {b.ljust(w1)}  {c.ljust(w2)}  {d}".rstrip() for a, b, c, d in rows]
    lines.append("# outputs: " + ", ".join(o.node.name for o in low.outputs))
    lines += [f"# {part}".rstrip() for h in header_lines for part in str(h).splitlines()]
    return lines


def _arg_str(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg_str(x) for x in a) + "]"
    if isinstance(a, torch.SymInt):
        return str(_size_key(a))
    return repr(a) if not isinstance(a, torch.dtype) else str(a)


def _safe_name(name: str) -> str:
    name = re.sub(r"\W", "_", name) or "fused"
    return name if not name[0].isdigit() else "k_" + name


def _module_code(low: _Lowering, kname: str) -> str:
    """The generated module minus its header: imports (the shared runtime, fxopt.codegen.fused_runtime), the
    module's constants, kernels named `kname_*`, launcher."""
    em = _Emitter(low, kname)
    parts = [_PREAMBLE.strip("\n")]
    if low.kind == "pointwise":
        parts.append(_pointwise_globals(em.element_bytes()))
    elif low.kind == "rows":
        parts.append(_row_globals(em.row_bytes_per_column()))
    parts += [HELPERS[h] for h in low.helpers]
    if low.kind == "pointwise":
        parts.append(em.pointwise())
    elif low.kind == "rows":
        parts.append(em.rows())
    parts.append(em.launcher())
    return "\n\n\n".join(p.strip("\n") for p in parts) + "\n"


_CASTS = {"to_copy", "to", "type_as"}


def _op_summary(gm: fx.GraphModule, limit: int = 3) -> str:
    """The first `limit` distinct computing ops of a region (casts and copies aside), for a readable
    kernel name."""
    stems = []
    for node in gm.graph.nodes:
        quiet = node.target in NOOPS or node.target in LAYOUT or node.target in IDENTITY
        computes = isinstance(node.meta.get("val"), torch.Tensor) and not quiet
        if node.op == "call_function" and computes and _op_stem(node.target) not in _CASTS:
            stem = _op_stem(node.target)
            if stem not in stems:
                stems.append(stem)
    return "_".join(stems[:limit]) or "views"


@dataclass(frozen=True)
class GeneratedKernel:
    """A region's kernel module without the per-region header.

    `code` depends only on the region's structure (canonical variable names), and `name`, the
    prefix of its @triton.jit functions (what profilers show), is `fused_<first ops>_<hash of the
    code>`: regions that differ in anything baked into the code (a constant, a dtype, a rank) get
    different code and so a different name and module.
    """

    name: str
    code: str
    low: _Lowering = field(repr=False, compare=False)


def generate_kernel(region: fx.GraphModule) -> GeneratedKernel:
    """The canonical kernel code of `region` (raises UnsupportedRegion naming the node it cannot emit)."""
    low = _Lowering(region)
    # the code with a neutral kernel name identifies the structure; the real name carries its hash
    digest = hashlib.sha1(_module_code(low, _KERNEL_PREFIX.rstrip("_")).encode()).hexdigest()[:8]
    name = f"{_KERNEL_PREFIX}{_op_summary(region)}_{digest}"
    return GeneratedKernel(name, _module_code(low, name), low)


def _with_header(region: fx.GraphModule, name: str, kernel: GeneratedKernel, header_lines) -> str:
    return "\n".join(_header(region, _safe_name(name), kernel, header_lines)) + "\n\n\n" + kernel.code


def generate_source(region: fx.GraphModule, name: str, *, header_lines=()) -> str:
    """Triton source for `region`: a header naming its nodes (`name` is the region's), then the
    canonical kernel code (kernels plus `launch(*inputs) -> tuple[Tensor, ...]`)."""
    return _with_header(region, name, generate_kernel(region), header_lines)


# ----------------------------------------------------------------------------- runtime wrapper


@dataclass(eq=False)
class FusedKernel:
    """A compiled region: call it like the region (CUDA -> Triton, CPU -> interpreter or reference).

    `name` is the shared kernel's (its @triton.jit functions are `<name>_<variant>`), `region_name`
    the region's; `path` is this region's own dump file. The module may have been imported from
    another region's file with the same code (see loader.load_kernel_module).
    """

    name: str
    source: str = field(repr=False)
    path: Path
    region: fx.GraphModule = field(repr=False)
    dump_dir: Path | None = field(default=None, repr=False)
    region_name: str = ""
    _modules: dict = field(default_factory=dict, repr=False)

    @property
    def module(self) -> ModuleType:
        """The generated module for the current mode (GPU or TRITON_INTERPRET)."""
        mode = loader.interpreting()
        mod = self._modules.get(mode)
        if mod is None:
            file_name = self.region_name or self.name
            mod = self._modules[mode] = loader.load_kernel_module(self.source, self.dump_dir, name=file_name)
        return mod

    def reference(self, *inputs) -> tuple:
        """The region run eagerly by PyTorch (the CPU path and the test oracle)."""
        out = self.region(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def __call__(self, *inputs) -> tuple:
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
        if device is not None and device.type == "cuda":
            return self.module.launch(*inputs)
        if loader.interpreting():
            return self.module.launch(*inputs)
        return self.reference(*inputs)


def compile_region(region: fx.GraphModule, name: str, *, dump_dir=None, header_lines=()) -> FusedKernel:
    """Generate, write and load the kernel module of `region` (`name`: the region's, for its dump file).

    Regions of one structure share the module: the first one's file is imported, the others
    write their own dump file (their header, the same code) and reuse it.
    """
    kernel = generate_kernel(region)
    source = _with_header(region, name, kernel, header_lines)
    region_name = _safe_name(name)
    path = loader.source_path(source, dump_dir, name=region_name)
    dump = Path(dump_dir) if dump_dir is not None else None
    compiled = FusedKernel(kernel.name, source, path, region, dump, region_name=region_name)
    compiled.module  # noqa: B018 - write and import now, so errors surface at compile time
    return compiled


# ----------------------------------------------------------------------------- building regions


def region_from_fn(fn, *example_args, dynamic: bool = False) -> fx.GraphModule:
    """Export `fn(*example_args)` into a region GraphModule like the fusion pass produces.

    Tensor arguments become placeholders (named after fn's parameters), in order; other
    arguments are baked in as constants. torch.export(strict=False) gives the training IR
    (softmax, layer_norm, gelu, silu stay single ops). With dynamic=True every dim is
    exported as Dim.AUTO, so sizes in meta["val"] are symbolic where export allows.
    """
    tensor_pos = [i for i, a in enumerate(example_args) if isinstance(a, torch.Tensor)]
    try:
        params = list(inspect.signature(fn).parameters.values())
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    if len(names) != len(example_args):
        names = [f"in{i}" for i in range(len(example_args))]
    arg_names = [names[i] if names[i].isidentifier() and names[i] != "self" else f"in{i}" for i in tensor_pos]
    if len(set(arg_names)) != len(arg_names):
        arg_names = [f"in{i}" for i in tensor_pos]

    def call(*tensors):
        args = list(example_args)
        for i, t in zip(tensor_pos, tensors):
            args[i] = t
        return fn(*args)

    src = f"def forward(self, {', '.join(arg_names)}):\n    return self.call({', '.join(arg_names)})\n"
    scope: dict[str, Any] = {}
    exec(src, scope)  # a forward whose parameters carry fn's names (they name the placeholders)

    class Region(torch.nn.Module):
        forward = scope["forward"]

        def __init__(self):
            super().__init__()
            self.call = call

    tensors = tuple(example_args[i] for i in tensor_pos)
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in tensors)
    ep = torch.export.export(Region(), tensors, strict=False, dynamic_shapes=dynamic_shapes)
    sig = ep.graph_signature
    if sig.parameters or sig.buffers or getattr(sig, "lifted_tensor_constants", None):
        raise ValueError("region_from_fn: fn must not create parameters, buffers or tensor constants")
    gm = ep.graph_module
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in NOOPS and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
