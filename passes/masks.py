"""One mask analysis for the attention and KV-cache passes: a mask's form, proved from the graph that builds it.

An attention mask is a function of the score element's indices (batch b, head h, query i, key j). This module
interprets the subgraph that computes a mask *symbolically*: every tensor in it becomes one sympy expression in
index symbols (one per dim), e.g. ``arange(s)`` is ``x0``, ``arange(s)[:, None] >= arange(s)[None, :]`` is
``x0 >= x1``, a ``tril`` buffer of ones is ``Piecewise((1, x1 - x0 <= 0), (0, True))`` (its values are checked
over the whole buffer), an attention-mask input is an opaque ``attention_mask(x0, x1)``. What hides a key is then
one boolean formula H(b, h, i, j). With j = i + d it must depend on d alone (plus, for padding, on the key's
flag ``input[b, j] != 0``; an integer input named like a mask is taken to hold 0/1, the convention of
attention-mask arguments, as HF's are); its atoms are linear in d, so the integer line of d splits at their
finitely many thresholds into intervals on which every atom is constant, and evaluating H once per interval decides it
for every d: a proof by exhaustive case analysis, not a sample at a few lengths.

    none            nothing hidden
    causal          hidden iff d > 0
    window w        hidden iff d > 0 or d <= -w          (query i sees keys i-w < j <= i: w keys)
    padding         hidden iff input[b, j] == 0          (also combined with causal / window)
    general         anything else: the mask stays an additive bias (correct, slower), with the reason

ALiBi (an additive bias ``slope[h] * j`` or ``slope[h] * (j - i)`` that is otherwise 0 or hidden) is read off
the same formulas: the bias minus its value at j = i must be ``c(h) * d`` with c a per-head constant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from sympy.core.relational import Relational
from sympy.logic.boolalg import Boolean, BooleanFunction
from torch import fx

from fxopt.nodes import node_val as _val

aten = torch.ops.aten

#: A fill or additive value at or below this hides a key (exp(-1e4) underflows to 0 in fp16..fp64).
HIDDEN_AT_MOST = -1e4
_HIDDEN = sympy.Integer(-10000)  # the same bound, exact
#: Largest mask subgraph interpreted (nodes); larger ones are "general".
MAX_NODES = 600
#: Largest number of constant runs a Toeplitz buffer may have along its diagonals.
MAX_RUNS = 64

X = tuple(sympy.Symbol(f"x{i}", integer=True, nonnegative=True) for i in range(8))  # index of dim i
D = sympy.Symbol("d", integer=True)  # key index minus query index
FLAG = sympy.Symbol("key_flag")  # the padding input's value at (b, j): the key is visible when it is nonzero


class Unprovable(Exception):
    """The mask subgraph uses something the symbolic interpreter cannot express; the message says what."""


@dataclass(frozen=True)
class MaskPart:
    """One masking op on the scores: hide where `node` (fill/hide), keep where `node` (keep), or add it."""

    kind: str  # fill | keep | hide | add
    node: fx.Node
    value: float | None = None  # the fill value for fill/keep/hide
    scale: float = 1.0  # a scale applied to the scores after this part (Falcon-ALiBi: (s + bias) * c)


@dataclass(frozen=True)
class MaskForm:
    """What a set of mask parts computes (the attention node records it)."""

    kind: str  # none | causal | window | padding | causal+padding | window+padding | general
    causal: bool = False
    window: int = 0  # keys a query sees, itself included (0: no window)
    padding_source: fx.Node | None = None  # (b, skv) input: key j visible where input[b, j] != 0
    alibi_slopes: tuple[float, ...] | None = None  # per query head: adds slope * (j - i)
    evidence: str = ""
    reason: str = ""  # why the mask is general


@dataclass(frozen=True)
class _Elem:
    """A tensor of the mask subgraph: its value at index (x0, ..., x{rank-1}), shape and dtype class."""

    expr: Any  # sympy expression (number-valued) or Boolean
    shape: tuple  # sizes: ints or export sympy expressions
    kind: str  # bool | int | float

    @property
    def rank(self) -> int:
        return len(self.shape)


# --------------------------------------------------------------------------------------------- helpers
def _size_expr(size) -> Any:
    if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return sympy.sympify(size.node.expr)
    return size


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point or dtype.is_complex else "int"


def _number(value) -> Any:
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, float):
        if math.isinf(value):
            return sympy.oo if value > 0 else -sympy.oo
        if math.isnan(value):
            raise Unprovable("NaN constant")
        return sympy.Rational(value)  # exact: finfo.min + 1e4 must not round back to finfo.min
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return sympy.sympify(value.node.expr)
    raise Unprovable(f"constant of type {type(value).__name__}")


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _reindex(expr, mapping: dict[int, Any]):
    """Substitute index symbols simultaneously: x_i -> mapping[i]."""
    if not mapping:
        return expr
    return expr.xreplace({X[i]: v for i, v in mapping.items()}) if hasattr(expr, "xreplace") else expr


def _broadcast(elem: _Elem, shape: tuple) -> Any:
    """elem's expression read at the indices of a tensor of `shape` it broadcasts to (right-aligned)."""
    offset = len(shape) - elem.rank
    if offset < 0:
        raise Unprovable("operand of higher rank than the result")
    mapping = {}
    for i, size in enumerate(elem.shape):
        out = shape[i + offset]
        mapping[i] = sympy.Integer(0) if _is_one(size) and not _is_one(out) else X[i + offset]
    return _reindex(elem.expr, mapping)


def _as_bool(expr, kind: str):
    if kind == "bool":
        return expr
    return sympy.Ne(expr, 0)


def _as_number(expr, kind: str):
    if kind != "bool":
        return expr
    if expr is sympy.true:
        return sympy.Integer(1)
    if expr is sympy.false:
        return sympy.Integer(0)
    return sympy.Piecewise((1, expr), (0, True))


def _logic(expr):
    """A boolean formula with number-valued Piecewise inside relations unfolded into And/Or of conditions."""
    if isinstance(expr, sympy.Piecewise):
        terms, prior = [], []
        for value, cond in expr.args:
            c = _logic(cond)
            terms.append(sympy.And(*prior, c, _logic(value)))
            prior.append(sympy.Not(c))
        return sympy.Or(*terms)
    if isinstance(expr, Relational):
        canon = expr.func(sympy.expand(expr.lhs - expr.rhs), 0)
        if canon.has(sympy.Piecewise):
            folded = sympy.piecewise_fold(canon)
            if isinstance(folded, sympy.Piecewise):
                return _logic(folded)
        return canon
    if isinstance(expr, BooleanFunction):
        return expr.func(*[_logic(a) for a in expr.args])
    return expr


def _canonical(expr):
    """Every relation as (lhs - rhs) op 0, so a difference like (x2 + d) - x2 cancels."""
    return expr.replace(lambda e: isinstance(e, Relational), lambda e: e.func(sympy.expand(e.lhs - e.rhs), 0))


# --------------------------------------------------------------------------------------------- interpreter
class _Interpreter:
    """Symbolic values of mask-subgraph nodes, memoised per node (masks are shared by every layer)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
        self.values: dict[fx.Node, Any] = {}
        self.inputs: dict[str, fx.Node] = {}  # opaque function name -> placeholder
        self.tables: dict[str, torch.Tensor] = {}  # 1-d constant buffers read by index
        self.visited = 0

    def value(self, arg):
        """An argument as _Elem (tensors), sympy (sizes, scalars) or a python list of those."""
        if isinstance(arg, fx.Node):
            if arg not in self.values:
                self.visited += 1
                if self.visited > MAX_NODES:
                    raise Unprovable("mask subgraph too large")
                self.values[arg] = self._node(arg)
            return self.values[arg]
        if isinstance(arg, (list, tuple)):
            return [self.value(a) for a in arg]
        if arg is None or isinstance(arg, (torch.dtype, torch.device, torch.layout, torch.memory_format, str)):
            return arg
        return _number(arg)

    def _node(self, node: fx.Node):
        val = _val(node)
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float)) and node.op != "placeholder":
            return _number(val)
        if node.op == "placeholder":
            if not isinstance(val, torch.Tensor):
                raise Unprovable(f"input `{node.target}` is not a tensor")
            name = f"input_{node.name}"
            self.inputs[name] = node
            return _Elem(sympy.Function(name)(*X[:val.dim()]), tuple(_size_expr(d) for d in val.shape),
                         _kind(val.dtype))
        if node.op == "get_attr":
            return self._buffer(node)
        if node.op != "call_function":
            raise Unprovable(f"{node.op} `{node.target}`")
        if not isinstance(val, torch.Tensor):
            raise Unprovable(f"{node.target} gives no tensor")
        handler = HANDLERS.get(getattr(node.target, "overloadpacket", node.target))
        if handler is None:
            raise Unprovable(f"op {node.target} has no symbolic rule")
        shape = tuple(_size_expr(d) for d in val.shape)
        expr = handler(self, node, shape)
        return _Elem(expr, shape, _kind(val.dtype))

    def elem(self, arg, shape: tuple):
        """An operand (tensor or scalar) read at the indices of a result of `shape`."""
        v = self.value(arg)
        if isinstance(v, _Elem):
            return _broadcast(v, shape), v.kind
        if isinstance(v, Boolean):
            return v, "bool"
        if isinstance(v, sympy.Basic):
            return v, ("int" if v.is_integer else "float")
        raise Unprovable(f"operand {arg!r}")

    def _buffer(self, node: fx.Node) -> _Elem:
        if node.target in self.params:
            raise Unprovable(f"depends on the parameter `{node.target}` (a learned bias)")
        obj = self.gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor):
            raise Unprovable(f"`{node.target}` is not a tensor")
        if obj.device.type == "meta":
            raise Unprovable(f"buffer `{node.target}` has no values (meta device)")
        t = obj.detach().cpu()
        shape, kind = tuple(t.shape), _kind(t.dtype)
        if t.numel() == 0:
            raise Unprovable(f"buffer `{node.target}` is empty")
        flat = t.reshape(-1)
        if bool((flat == flat[0]).all()):
            return _Elem(_constant(flat[0].item(), kind), shape, kind)
        if t.dim() == 1:
            name = f"table_{node.name}"
            self.tables[name] = t
            return _Elem(sympy.Function(name)(X[0]), shape, kind)
        return _Elem(_toeplitz(t, node.target, kind), shape, kind)


def _constant(value, kind: str):
    if kind == "bool":
        return sympy.true if value else sympy.false
    return _number(float(value) if kind == "float" else int(value))


def _toeplitz(t: torch.Tensor, name: str, kind: str):
    """A buffer whose values depend only on (column - row) of its last two dims, as a Piecewise of that
    difference (every diagonal checked, so any top-left slice [:s, :s] is covered)."""
    r = t.dim()
    lead = t.reshape(-1, t.shape[-2], t.shape[-1])
    if not bool((lead == lead[:1]).all()):
        raise Unprovable(f"buffer `{name}` differs along its leading dims")
    m = lead[0]
    rows, cols = m.shape
    runs: list[tuple[Any, int]] = []  # (value, last difference of the run)
    for diff in range(-(rows - 1), cols):
        diagonal = m.diagonal(diff)
        if not bool((diagonal == diagonal[0]).all()):
            raise Unprovable(f"buffer `{name}` is not a function of (column - row)")
        value = diagonal[0].item()
        if runs and runs[-1][0] == value:
            runs[-1] = (value, diff)
        else:
            runs.append((value, diff))
    if len(runs) > MAX_RUNS:
        raise Unprovable(f"buffer `{name}` has {len(runs)} diagonal runs")
    d = X[r - 1] - X[r - 2]
    pieces = [(_constant(v, kind), d <= last) for v, last in runs[:-1]] + [(_constant(runs[-1][0], kind), True)]
    return sympy.Piecewise(*pieces) if len(pieces) > 1 else pieces[0][0]


# --------------------------------------------------------------------------------------------- op rules
def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _unary(fn):
    def rule(it: _Interpreter, node, shape):
        x, kind = it.elem(node.args[0], shape)
        return fn(x, kind)
    return rule


def _binary(fn, *, result: str = "number"):
    def rule(it: _Interpreter, node, shape):
        a, ka = it.elem(node.args[0], shape)
        b, kb = it.elem(node.args[1], shape)
        if result == "bool":
            if ka != "bool" or kb != "bool":
                raise Unprovable(f"{node.target} on integers (bitwise)")
            return fn(a, b)
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            b = b * _number(alpha)
        return fn(_as_number(a, ka), _as_number(b, kb))
    return rule


def _arange(it, node, shape):
    args = [it.value(a) for a in node.args]
    if node.target == aten.arange.default:
        start, step = sympy.Integer(0), sympy.Integer(1)
    else:
        start = args[0]
        step = args[2] if len(args) > 2 else sympy.Integer(_arg(node, 2, "step", 1))
    return start + step * X[0]


def _full(it, node, shape):
    fill = {aten.full: 1, aten.new_full: 2, aten.full_like: 1}.get(node.target.overloadpacket)
    if fill is not None:
        value = it.value(node.args[fill])
    elif node.target.overloadpacket in (aten.ones, aten.new_ones, aten.ones_like):
        value = 1
    else:
        value = 0
    kind = _kind(_val(node).dtype)
    if isinstance(value, sympy.Basic) and not value.is_number:
        raise Unprovable("fill value depends on a size")
    return _constant(float(value) if kind == "float" else (bool(value) if kind == "bool" else int(value)), kind)


def _scalar_tensor(it, node, shape):
    return _constant(float(it.value(node.args[0])), _kind(_val(node).dtype))


def _cast(it, node, shape):
    src = it.value(node.args[0])
    if not isinstance(src, _Elem):
        raise Unprovable("cast of a non-tensor")
    kind = _kind(_val(node).dtype)
    if kind == "bool":
        return _as_bool(src.expr, src.kind)
    if src.kind == "float" and kind == "int":
        raise Unprovable("float to integer cast")
    return _as_number(src.expr, src.kind)


def _identity(it, node, shape):
    src = it.value(node.args[0])
    return src.expr


def _where(it, node, shape):
    cond, kc = it.elem(node.args[0], shape)
    a, ka = it.elem(node.args[1], shape)
    b, kb = it.elem(node.args[2], shape)
    if ka == kb == "bool":
        return sympy.Or(sympy.And(cond, a), sympy.And(sympy.Not(cond), b))
    return sympy.Piecewise((_as_number(a, ka), _as_bool(cond, kc)), (_as_number(b, kb), True))


def _masked_fill(it, node, shape):
    x, kx = it.elem(node.args[0], shape)
    m, km = it.elem(node.args[1], shape)
    v, kv = it.elem(node.args[2], shape)
    if kx == "bool":
        return sympy.Or(sympy.And(m, _as_bool(v, kv)), sympy.And(sympy.Not(m), x))
    return sympy.Piecewise((_as_number(v, kv), _as_bool(m, km)), (x, True))


def _unsqueeze(it, node, shape):
    src = it.value(node.args[0])
    dim = _norm(node.args[1], src.rank + 1)
    return _reindex(src.expr, {i: X[i + 1] if i >= dim else X[i] for i in range(src.rank)})


def _squeeze(it, node, shape):
    src = it.value(node.args[0])
    dims = _arg(node, 1, "dim", None)
    if dims is None:
        dims = [i for i, s in enumerate(src.shape) if _is_one(s)]
    dims = {_norm(d, src.rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    dims = {d for d in dims if _is_one(src.shape[d])}
    mapping, out = {}, 0
    for i in range(src.rank):
        if i in dims:
            mapping[i] = sympy.Integer(0)
        else:
            mapping[i] = X[out]
            out += 1
    return _reindex(src.expr, mapping)


def _expand(it, node, shape):
    return _broadcast(it.value(node.args[0]), shape)


def _reshape(it, node, shape):
    """Views that insert or drop size-1 dims, merge adjacent dims into one or split one into adjacent dims
    (Falcon's ALiBi bias: (b, h, s) -> (b*h, 1, s) -> (b, h, 1, s)); the dims keep their order."""
    src = it.value(node.args[0])
    keep_in = [i for i, s in enumerate(src.shape) if not _is_one(s)]
    keep_out = [i for i, s in enumerate(shape) if not _is_one(s)]
    mapping = {i: sympy.Integer(0) for i in range(src.rank)}
    a = b = 0
    while a < len(keep_in) and b < len(keep_out):
        ins, outs = _reshape_group(src.shape, keep_in[a:], shape, keep_out[b:])
        if outs == 1:  # identity or merge: in index t is (m // (product of later dims)) % its size
            m, later = X[keep_out[b]], 1
            for i in reversed(keep_in[a:a + ins]):
                mapping[i] = sympy.floor(m / later) % src.shape[i] if ins > 1 else m
                later *= src.shape[i]
        else:  # split: the in index is the row-major linear index of the out dims
            linear, stride = sympy.Integer(0), 1
            for j in reversed(keep_out[b:b + outs]):
                linear += X[j] * stride
                stride *= shape[j]
            mapping[keep_in[a]] = linear
        a, b = a + ins, b + outs
    if a != len(keep_in) or b != len(keep_out):
        raise Unprovable("reshape that merges or splits dims")
    return _within_bounds(_reindex(src.expr, mapping), shape)


def _same_size(x, y) -> bool:
    return sympy.expand(sympy.sympify(x) - sympy.sympify(y)) == 0


def _reshape_group(in_shape, ins, out_shape, outs) -> tuple[int, int]:
    """How many of the leading in and out dims (size-1 dims dropped) form one group of equal product."""
    if _same_size(in_shape[ins[0]], out_shape[outs[0]]):
        return 1, 1
    for n in range(2, len(ins) + 1):
        if _same_size(sympy.Mul(*[in_shape[i] for i in ins[:n]]), out_shape[outs[0]]):
            return n, 1
    for n in range(2, len(outs) + 1):
        if _same_size(in_shape[ins[0]], sympy.Mul(*[out_shape[j] for j in outs[:n]])):
            return 1, n
    raise Unprovable("reshape that regroups dims (neither a merge nor a split)")


def _within_bounds(expr, shape: tuple):
    """floor(q + x/s) -> q and Mod(q*s + x, s) -> x where index x runs over [0, s) (a split after a merge)."""
    if not hasattr(expr, "replace"):
        return expr
    bound = {X[i]: size for i, size in enumerate(shape)}

    def quotient(arg):  # arg = n / s: (n // s, n % s) when n = s*q + x with 0 <= x < s, else None
        num, den = sympy.fraction(sympy.together(arg))
        terms = sympy.Add.make_args(sympy.expand(num))
        rest = [t for t in terms if sympy.fraction(sympy.cancel(t / den))[1] != 1]
        if len(rest) != 1 or rest[0] not in bound or not _same_size(bound[rest[0]], den):
            return None
        return sympy.expand(sympy.Add(*[t for t in terms if t is not rest[0]]) / den), rest[0]

    def simpler_floor(e):
        found = quotient(e.args[0])
        return found[0] if found is not None else e

    def simpler_mod(e):
        found = quotient(e.args[0] / e.args[1])
        return found[1] if found is not None else e

    expr = expr.replace(lambda e: isinstance(e, sympy.floor), simpler_floor)
    return expr.replace(lambda e: isinstance(e, sympy.Mod), simpler_mod)


def _repeat(it, node, shape):
    """x.repeat(sizes): tiles; output index x_k reads input index x_k mod the input's size (dims right-aligned)."""
    src = it.value(node.args[0])
    shift = len(shape) - src.rank
    mapping = {}
    for i, size in enumerate(src.shape):
        out = X[i + shift]
        mapping[i] = sympy.Integer(0) if _is_one(size) else (out if _same_size(size, shape[i + shift])
                                                             else sympy.Mod(out, size))
    return _reindex(src.expr, mapping)


def _permute(it, node, shape):
    src = it.value(node.args[0])
    if node.target == aten.transpose.int:
        a, b = _norm(node.args[1], src.rank), _norm(node.args[2], src.rank)
        order = list(range(src.rank))
        order[a], order[b] = order[b], order[a]
    else:
        order = [_norm(d, src.rank) for d in node.args[1]]
    return _reindex(src.expr, {order[k]: X[k] for k in range(src.rank)})


def _start(it, value, size) -> Any:
    if value is None:
        return sympy.Integer(0)
    v = it.value(value) if isinstance(value, fx.Node) else _number(value)
    if v.is_number and v < 0:
        return sympy.sympify(size) + v
    return v


def _slice(it, node, shape):
    src = it.value(node.args[0])
    dim = _norm(_arg(node, 1, "dim", 0), src.rank)
    start = _start(it, _arg(node, 2, "start"), src.shape[dim])
    step = _arg(node, 4, "step", 1)
    if not isinstance(step, int) or step < 1:
        raise Unprovable("slice with a computed or non-positive step")
    mapping = {i: X[i] for i in range(src.rank)}
    mapping[dim] = start + step * X[dim]
    return _reindex(src.expr, mapping)


def _select(it, node, shape):
    src = it.value(node.args[0])
    dim = _norm(node.args[1], src.rank)
    index = _start(it, node.args[2], src.shape[dim])
    mapping = {i: (X[i] if i < dim else X[i - 1]) for i in range(src.rank)}
    mapping[dim] = index
    return _reindex(src.expr, mapping)


def _index(it, node, shape):
    """x[..., idx_0, ..., idx_m-1, ...] with one run of adjacent integer index tensors."""
    src = it.value(node.args[0])
    indices = list(node.args[1])
    positions = [i for i, t in enumerate(indices) if t is not None]
    if not positions or positions != list(range(positions[0], positions[-1] + 1)):
        raise Unprovable("advanced indexing with separated index tensors")
    k, m = positions[0], len(positions)
    idx = [it.value(indices[p]) for p in positions]
    if any(not isinstance(e, _Elem) or e.kind == "bool" for e in idx):
        raise Unprovable("boolean or non-tensor index")
    if not all(sympy.sympify(e.expr).is_nonnegative for e in idx):  # a negative index wraps around
        raise Unprovable("an index that may be negative")
    brank = max(e.rank for e in idx)
    bshape = shape[k:k + brank]
    mapping = {i: X[i] for i in range(k)}
    for t, e in enumerate(idx):
        mapping[k + t] = _reindex(_broadcast(e, bshape), {u: X[k + u] for u in range(brank)})
    for i in range(k + m, src.rank):
        mapping[i] = X[i - m + brank]
    return _reindex(src.expr, mapping)


def _tri(upper: bool):
    def rule(it, node, shape):
        src = it.value(node.args[0])
        diagonal = _arg(node, 1, "diagonal", 0)
        r = src.rank
        d = X[r - 1] - X[r - 2]
        keep = d >= diagonal if upper else d <= diagonal
        zero = sympy.false if src.kind == "bool" else sympy.Integer(0)
        if src.kind == "bool":
            return sympy.And(keep, src.expr)
        return sympy.Piecewise((src.expr, keep), (zero, True))
    return rule


def _diff(it, node, shape):
    src = it.value(node.args[0])
    n = _arg(node, 1, "n", 1)
    dim = _norm(_arg(node, 2, "dim", -1), src.rank)
    prepend, append = _arg(node, 3, "prepend"), _arg(node, 4, "append")
    if n != 1 or append is not None or src.kind == "bool":
        raise Unprovable("diff other than n=1 with an optional prepend")
    x = src.expr
    t = X[dim]
    if prepend is None:
        return sympy.expand(_reindex(x, {dim: t + 1}) - x)
    p = it.value(prepend)
    p_expr = _reindex(_broadcast(p, src.shape) if isinstance(p, _Elem) else p, {dim: sympy.Integer(0)})
    step = sympy.expand(x - _reindex(x, {dim: t - 1}))
    first = sympy.expand(_reindex(x, {dim: sympy.Integer(0)}) - p_expr)
    if not step.has(t) and sympy.expand(first - step) == 0:
        return step
    return sympy.Piecewise((first, sympy.Eq(t, 0)), (step, True))


def _cumsum(it, node, shape):
    src = it.value(node.args[0])
    dim = _norm(node.args[1], src.rank)
    x = _as_number(src.expr, src.kind)
    if x.has(X[dim]):
        raise Unprovable("cumsum of a value that varies along the summed dim")
    return sympy.expand(x * (X[dim] + 1))


def _minmax(fn):
    def rule(it, node, shape):
        a, ka = it.elem(node.args[0], shape)
        b, kb = it.elem(node.args[1], shape)
        return fn(_as_number(a, ka), _as_number(b, kb))
    return rule


def _floor_divide(it, node, shape):
    a, _ = it.elem(node.args[0], shape)
    b, _ = it.elem(node.args[1], shape)
    return sympy.floor(a / b)


def _div(it, node, shape):
    a, ka = it.elem(node.args[0], shape)
    b, kb = it.elem(node.args[1], shape)
    mode = node.kwargs.get("rounding_mode")
    q = _as_number(a, ka) / _as_number(b, kb)
    if mode == "floor":
        return sympy.floor(q)
    if mode == "trunc":
        raise Unprovable("division rounding toward zero")
    return q


def _compare(fn):
    def rule(it, node, shape):
        a, ka = it.elem(node.args[0], shape)
        b, kb = it.elem(node.args[1], shape)
        if fn in (sympy.Eq, sympy.Ne) and ka == kb == "bool":
            same = sympy.Or(sympy.And(a, b), sympy.And(sympy.Not(a), sympy.Not(b)))
            return same if fn is sympy.Eq else sympy.Not(same)
        return fn(_as_number(a, ka), _as_number(b, kb))
    return rule


def _logical_not(it, node, shape):
    x, kind = it.elem(node.args[0], shape)
    if kind != "bool" and node.target.overloadpacket == aten.bitwise_not:
        raise Unprovable("bitwise not of an integer")
    return sympy.Not(_as_bool(x, kind))


def _pow(it, node, shape):
    a, ka = it.elem(node.args[0], shape)
    b, kb = it.elem(node.args[1], shape)
    return sympy.Pow(_as_number(a, ka), _as_number(b, kb))


def _cat(it, node, shape):
    """Piecewise along the joined dim: piece t covers [offset_t, offset_t + size_t)."""
    pieces = [it.value(t) for t in node.args[0]]
    pieces = [p for p in pieces if isinstance(p, _Elem) and not (p.rank == 1 and p.shape[0] == 0)]
    dim = _norm(_arg(node, 1, "dim", 0), len(shape))
    offset, branches = sympy.Integer(0), []
    for piece in pieces:
        expr = _reindex(piece.expr, {i: (X[i] - offset if i == dim else X[i]) for i in range(piece.rank)})
        offset = offset + sympy.sympify(piece.shape[dim])
        branches.append((_as_number(expr, piece.kind), X[dim] < offset))
    branches[-1] = (branches[-1][0], True)
    return sympy.Piecewise(*branches) if len(branches) > 1 else branches[0][0]


def _ops(*names):
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


HANDLERS: dict[Any, Any] = {}
for packet in _ops("arange"):
    HANDLERS[packet] = _arange
for packet in _ops("full", "zeros", "ones", "new_ones", "new_zeros", "new_full", "full_like", "zeros_like",
                   "ones_like"):
    HANDLERS[packet] = _full
HANDLERS[aten.scalar_tensor] = _scalar_tensor
for packet in _ops("to", "_to_copy", "type_as", "_to_dim_order_copy"):
    HANDLERS[packet] = _cast
for packet in _ops("clone", "contiguous", "alias", "detach", "detach_", "lift_fresh_copy"):
    HANDLERS[packet] = _identity
HANDLERS.update({
    aten.add: _binary(lambda a, b: a + b),
    aten.sub: _binary(lambda a, b: a - b),
    aten.rsub: _binary(lambda a, b: b - a),
    aten.mul: _binary(lambda a, b: a * b),
    aten.div: _div,
    aten.floor_divide: _floor_divide,
    aten.neg: _unary(lambda x, k: -_as_number(x, k)),
    aten.abs: _unary(lambda x, k: sympy.Abs(_as_number(x, k))),
    aten.minimum: _minmax(sympy.Min),
    aten.maximum: _minmax(sympy.Max),
    aten.eq: _compare(sympy.Eq),
    aten.ne: _compare(sympy.Ne),
    aten.lt: _compare(sympy.Lt),
    aten.le: _compare(sympy.Le),
    aten.gt: _compare(sympy.Gt),
    aten.ge: _compare(sympy.Ge),
    aten.where: _where,
    aten.masked_fill: _masked_fill,
    aten.logical_not: _logical_not,
    aten.bitwise_not: _logical_not,
    aten.unsqueeze: _unsqueeze,
    aten.squeeze: _squeeze,
    aten.expand: _expand,
    aten.broadcast_to: _expand,
    aten.view: _reshape,
    aten.reshape: _reshape,
    aten._unsafe_view: _reshape,
    aten.flatten: _reshape,
    aten.repeat: _repeat,
    aten.unflatten: _reshape,
    aten.permute: _permute,
    aten.transpose: _permute,
    aten.slice: _slice,
    aten.select: _select,
    aten.index: _index,
    aten.triu: _tri(True),
    aten.tril: _tri(False),
    aten.diff: _diff,
    aten.cumsum: _cumsum,
    aten.pow: _pow,
    aten.cat: _cat,
})
for packet in _ops("__and__", "bitwise_and", "logical_and"):
    HANDLERS[packet] = _binary(sympy.And, result="bool")
for packet in _ops("__or__", "bitwise_or", "logical_or"):
    HANDLERS[packet] = _binary(sympy.Or, result="bool")
for packet in _ops("__xor__", "bitwise_xor", "logical_xor"):
    HANDLERS[packet] = _binary(sympy.Xor, result="bool")


# --------------------------------------------------------------------------------------------- classification
def _thresholds(formula) -> list[sympy.Rational]:
    """Where each atom (a relation linear in d) can change its truth value."""
    points = []
    for atom in formula.atoms(Relational):
        expr = sympy.expand(atom.lhs - atom.rhs)
        if not expr.has(D):
            continue
        poly = sympy.Poly(expr, D) if expr.is_polynomial(D) else None
        if poly is None or poly.degree() != 1 or not all(c.is_number for c in poly.all_coeffs()):
            raise Unprovable(f"condition {atom} is not linear in the key-query distance")
        a, b = poly.all_coeffs()
        points.append(sympy.Rational(-b) / sympy.Rational(a) if b.is_Rational and a.is_Rational else -b / a)
    return points


def _representatives(points) -> list[int]:
    """Integers of d that together cover every interval on which all atoms are constant."""
    big = 1 << 40
    reps = {-big, big, 0}
    for p in points:
        f = int(math.floor(float(p)))
        reps.update(f + k for k in (-1, 0, 1, 2))
    return sorted(r for r in reps if -big <= r <= big)


def _truth(formula, values: dict) -> bool:
    result = formula.xreplace(values)
    if result not in (sympy.true, sympy.false):
        result = sympy.simplify(result)
    if result not in (sympy.true, sympy.false):
        raise Unprovable(f"could not decide {result}")
    return result is sympy.true


def _interval(reps: list[int], visible: list[bool]) -> tuple[float, float] | None:
    """The visible set of d as one interval [lo, hi] (infinite ends as inf), or None when it is not one."""
    idx = [i for i, v in enumerate(visible) if v]
    if not idx:
        return None
    if idx != list(range(idx[0], idx[-1] + 1)):
        return None
    lo = -math.inf if idx[0] == 0 else reps[idx[0]]
    hi = math.inf if idx[-1] == len(reps) - 1 else reps[idx[-1] + 1] - 1
    return lo, hi


def _score_shape(q_val: torch.Tensor, k_val: torch.Tensor, k_transposed: bool) -> tuple:
    skv = k_val.shape[3] if k_transposed else k_val.shape[2]
    return tuple(_size_expr(d) for d in (q_val.shape[0], q_val.shape[1], q_val.shape[2], skv))


def _is_mask_name(name: str) -> bool:
    return "mask" in name.lower()


def _flag_substitution(formula, it: _Interpreter, score_shape) -> tuple[Any, fx.Node | None, str]:
    """Replace the one padding input read at (b, j) by FLAG; (formula, input node, FLAG's domain)."""
    apps = [a for a in formula.atoms(sympy.core.function.AppliedUndef) if str(a.func).startswith("input_")]
    tables = [a for a in formula.atoms(sympy.core.function.AppliedUndef) if str(a.func).startswith("table_")]
    if tables:
        raise Unprovable("the mask reads a constant table by a computed index")
    if not apps:
        return formula, None, ""
    if len(apps) > 1:
        raise Unprovable("the mask reads an input at several places (not one flag per key)")
    app = apps[0]
    node = it.inputs[str(app.func)]
    val = _val(node)
    skv = score_shape[3]
    ok_args = len(app.args) == 2 and app.args[1] == X[3] and app.args[0] in (X[0], sympy.Integer(0))
    if not ok_args or val.dim() != 2 or sympy.expand(sympy.sympify(_size_expr(val.shape[1])) - skv) != 0:
        raise Unprovable(f"the mask reads input `{node.target}` other than as one flag per (batch, key)")
    if val.dtype == torch.bool:
        return formula.xreplace({app: FLAG}), node, "bool"
    if _is_mask_name(str(node.target)):
        return formula.xreplace({app: FLAG}), node, "01"
    # any other input (token ids): only `input != 0` / `input == 0` is a padding flag
    flag_atoms = {a for a in formula.atoms(Relational) if a.has(app)}
    mapping = {}
    for atom in flag_atoms:
        expr = sympy.expand(atom.lhs - atom.rhs)
        if expr != app or not isinstance(atom, (sympy.Eq, sympy.Ne)):
            raise Unprovable(f"the mask compares input `{node.target}` other than with 0")
        mapping[atom] = FLAG if isinstance(atom, sympy.Ne) else sympy.Not(FLAG)
    formula = formula.xreplace(mapping)
    if formula.has(app):
        raise Unprovable(f"the mask uses the values of input `{node.target}`")
    return formula, node, "bool"


def _flag_values(domain: str) -> list[tuple[Any, bool]]:
    """(FLAG value, whether the key counts as visible by padding) for each case."""
    if domain == "bool":
        return [(sympy.true, True), (sympy.false, False)]
    return [(sympy.Integer(1), True), (sympy.Integer(0), False)]


def _alibi_slopes(bias, it: _Interpreter, heads) -> tuple[float, ...] | None:
    """Per-head slopes c(h) when the additive `bias` is c(h) * j plus terms constant in j (ALiBi), else None.

    Under softmax a per-row constant cancels, so c(h) * j and c(h) * (j - i) are the same attention."""
    if not isinstance(heads, int) or bias.has(sympy.Piecewise) or bias.atoms(Relational) or not bias.has(X[3]):
        return None
    linear = sympy.expand(bias - _reindex(bias, {3: X[2]}))  # bias(j) - bias(i) = c(h) * (j - i) for ALiBi
    linear = sympy.expand(linear.xreplace({X[3]: X[2] + D}))
    coeff = sympy.expand(linear / D)
    if coeff.has(D) or coeff.free_symbols - {X[1]}:
        return None
    slopes = []
    for h in range(heads):
        value = coeff.xreplace({X[1]: sympy.Integer(h)})
        for name, table in it.tables.items():
            value = value.replace(sympy.Function(name), lambda i, t=table: sympy.Rational(float(t[int(i)])))
        value = sympy.N(value)
        if not value.is_number:
            return None
        slopes.append(float(value))
    return tuple(slopes)


OVERWHELMING = -1e30  # a hidden value no bias added to it can lift (finfo.min, -1e38, -inf)


def _split_bias(value) -> tuple[Any, Any] | None:
    """(hide, visible): the additive `value` is <= -1e4 where `hide` holds and `visible` elsewhere, or None.

    masked_fill(alibi, mask, min) is a Piecewise of a hidden constant and the bias; a sum of such terms hides
    where any term does when the hidden constants overwhelm whatever else is added."""
    if value.is_number:
        return (sympy.true, sympy.Integer(0)) if value <= _HIDDEN else (sympy.false, value)
    if isinstance(value, sympy.Piecewise):
        hide, shown, earlier = [], [], sympy.false
        for branch, cond in value.args:
            taken = sympy.And(cond, sympy.Not(earlier))
            if branch.is_number and branch <= _HIDDEN:
                hide.append(taken)
            elif _moderate(branch) and all(sympy.expand(branch - other) == 0 for other in shown):
                shown.append(branch)
            else:
                return None
            earlier = sympy.Or(earlier, cond)
        return sympy.Or(*hide), (shown[0] if shown else sympy.Integer(0))
    if isinstance(value, sympy.Mul):  # c * Piecewise(...): scale every branch (c > 0 keeps what hides)
        factor, rest = value.as_independent(X[0], X[1], X[2], X[3], *value.free_symbols)
        if factor.is_number and factor > 0 and isinstance(rest, sympy.Piecewise):
            return _split_bias(sympy.Piecewise(*[(factor * b, c) for b, c in rest.args]))
    if isinstance(value, sympy.Add):
        splits = [_split_bias(term) for term in value.args]
        if any(s is None for s in splits):
            return None
        hides = [s[0] for s in splits if s[0] is not sympy.false]
        if hides and not all(_overwhelms(term) for term, s in zip(value.args, splits) if s[0] is not sympy.false):
            return None
        return sympy.Or(*hides), sympy.Add(*[s[1] for s in splits])
    return (sympy.false, value) if _moderate(value) else None


def _moderate(expr) -> bool:
    """No case split, no comparison and no constant of hiding size (a bias like ALiBi's slope * j, not a
    mask spelled arithmetically as (1 - flag) * finfo.min, which the general proof handles)."""
    return not (expr.has(sympy.Piecewise) or expr.atoms(Relational)) and all(
        abs(float(c)) < -HIDDEN_AT_MOST for c in expr.atoms(sympy.Number))


def _overwhelms(term) -> bool:
    branches = term.args if isinstance(term, sympy.Piecewise) else [(term, True)]
    return all(not (b.is_number and b <= _HIDDEN) or b <= OVERWHELMING for b, _ in branches)


def _visible_bias(total, it: "_Interpreter", shape: tuple) -> tuple[tuple[float, ...] | None, str]:
    """What the additive bias on visible keys is: nothing, a per-row constant (softmax ignores it) or ALiBi."""
    if total == 0:
        return None, ""
    if not total.has(X[3]) and not (total.free_symbols - set(X[:3])):
        return None, "; a bias constant along the keys (softmax cancels it)"
    slopes = _alibi_slopes(total, it, shape[1])
    if slopes is None:
        raise Unprovable(f"a position-dependent bias on visible keys that is not ALiBi "
                         f"({str(sympy.N(total, 3))[:80]})")
    return slopes, "; ALiBi slopes (one per head) read from the additive bias"


def classify(parts: list[MaskPart], *, is_causal: bool, q_val: torch.Tensor, k_val: torch.Tensor,
             k_transposed: bool = False) -> MaskForm:
    """The form of the mask the parts apply to scores q·kᵀ of shape (b, h, sq, skv)."""
    if not parts:
        if is_causal:
            return MaskForm("causal", True, evidence="sdpa is_causal=True")
        return MaskForm("none")
    it = _Interpreter(parts[0].node.graph.owning_module)
    shape = _score_shape(q_val, k_val, k_transposed)
    try:
        hidden, checks, visible = [], [], []
        for part in parts:
            expr, kind = it.elem(part.node, shape)
            if not part.scale > 0:
                raise Unprovable(f"a scale {part.scale} after the mask (it must be positive to keep hiding)")
            if part.value is not None and not part.value * part.scale <= HIDDEN_AT_MOST:
                raise Unprovable(f"fill value {part.value:g} scaled by {part.scale:g} no longer hides "
                                 f"(need <= {HIDDEN_AT_MOST:g})")
            if part.kind in ("fill", "hide"):
                hidden.append(_as_bool(expr, kind))
            elif part.kind == "keep":
                hidden.append(sympy.Not(_as_bool(expr, kind)))
            else:
                value = _as_number(expr, kind)
                value = value * part.scale if part.scale != 1.0 else value
                split = _split_bias(value)
                if split is None:  # proved below: the bias is only 0 or hidden
                    hidden.append(sympy.Le(value, _HIDDEN))
                    checks.append(sympy.Or(sympy.Le(value, _HIDDEN), sympy.Eq(value, 0)))
                else:
                    hidden.append(split[0])
                    visible.append(split[1])
        slopes, bias_note = _visible_bias(sympy.expand(sympy.Add(*visible)), it, shape)
        if is_causal:
            hidden.append(X[3] > X[2])
        form = _decide(_logic(sympy.Or(*hidden)), _logic(sympy.And(*checks)), it, shape)
        if bias_note:
            form = dataclasses.replace(form, alibi_slopes=slopes, evidence=form.evidence + bias_note)
        return form
    except Unprovable as exc:
        return MaskForm("general", reason=f"mask is not a provable causal/window/padding form: {exc}")
    except (TypeError, ValueError, AttributeError, sympy.SympifyError) as exc:
        return MaskForm("general", reason=f"mask is not a provable causal/window/padding form ({exc})")


def _decide(formula, checks, it: _Interpreter, shape: tuple) -> MaskForm:
    """Decide the form of the hiding formula (and that additive biases are only 0 or hidden) over all d."""
    square = sympy.expand(sympy.sympify(shape[2]) - sympy.sympify(shape[3])) == 0
    formula, source, domain = _flag_substitution(formula, it, shape)
    checks, _, _ = _flag_substitution(checks, it, shape)
    formula, checks = (_canonical(f.xreplace({X[3]: X[2] + D})) for f in (formula, checks))
    free = (formula.free_symbols | checks.free_symbols) - {D, FLAG}
    if free:
        names = ", ".join(sorted(str(s) for s in free))
        raise Unprovable(f"the mask depends on more than the key-query distance ({names})")
    if not square and formula.has(D):
        raise Unprovable("queries and keys differ in length (no common position origin)")
    reps = _representatives(_thresholds(sympy.And(formula, checks)))
    visible = {}
    for flag, key_visible in (_flag_values(domain) if source is not None else [(None, True)]):
        values = [{D: sympy.Integer(d), **({FLAG: flag} if flag is not None else {})} for d in reps]
        if not all(_truth(checks, v) for v in values):
            raise Unprovable("an additive bias with values other than 0 and <= -1e4 (a position-dependent bias)")
        visible[key_visible] = [not _truth(formula, v) for v in values]
    if source is not None and any(visible[False]):
        raise Unprovable(f"a key whose `{source.target}` flag is 0 stays visible")
    band = _interval(reps, visible[True])
    if band is None:
        raise Unprovable("the visible keys of a query are not one contiguous range")
    lo, hi = band
    padding = "+padding" if source is not None else ""
    where = "proved from the mask graph"
    if source is not None:
        where += f" (key j visible where `{source.target}`[b, j] != 0)"
    if lo == -math.inf and hi == math.inf:
        return MaskForm("padding" if source is not None else "none", False, 0, source, None, where)
    if hi != 0 or not square:
        raise Unprovable(f"queries see keys {lo} <= j - i <= {hi} (not causal)")
    if lo == -math.inf:
        return MaskForm("causal" + padding, True, 0, source, None, where)
    width = int(-lo) + 1
    return MaskForm("window" + padding, True, width, source, None, where + f": sliding window of {width} keys")
