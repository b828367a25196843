"""The op tables of the fused-region code generator, as data.

Three tables, keyed by ATen overload (the targets torch.export's training IR produces):

- `POINTWISE`: one output element from the same-index elements of the (broadcast) operands.
  A `PointwiseRule` names the schema arguments that carry values, gives the Triton
  expression (a format template over those operands, or a small function for the few
  ops that need attributes: gelu, pow, casts, alpha, clamp), and the FLOPs per element.
- `REDUCTIONS`: reductions over the last dim (sum, mean, amax, amin, var, std, vector norm)
  and the composites softmax, log_softmax, layer_norm and rms_norm. A `ReductionRule`
  lowers the op, through a builder the emitter passes in, to primitive row reductions
  (sum, max, min) and pointwise expressions; FLOPs per input element.
- `LAYOUT`: views (unsqueeze, expand, permute, slice, ...). `classify` calls them "other"
  (the cost pass has its own layout class); the emitter absorbs them where they re-index a
  region *input* (the launcher applies the view, the kernel reads through its strides) and
  where they are broadcasts or trailing size-1 dims of computed values.

`classify(node)` and `unsupported_reason(node)` check a node against the tables and its
arguments (reduction over the last dim only, layer_norm over one dim, known gelu mode, ...).
The cost pass uses `flops_per_element(node)`.

Value types inside kernels: every floating value is computed in fp32 (casts to fp16/bf16
round explicitly, so `x.half().float()` keeps its meaning), bools are int1, integers int32
or int64. The strings "fp32", "i1", "i32", "i64" name these compute types.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.nodes import meta_val as _val

aten = torch.ops.aten

# ----------------------------------------------------------------------------- compute types

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
SUPPORTED_DTYPES = FLOAT_DTYPES + INT_DTYPES + (torch.bool,)

TL_TYPE = {"fp32": "tl.float32", "i1": "tl.int1", "i32": "tl.int32", "i64": "tl.int64"}
TL_STORAGE = {
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float32: "tl.float32",
    torch.int8: "tl.int8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.uint8",  # bools travel as uint8 (the launcher views them so)
}


def compute_type(dtype: torch.dtype) -> str:
    """The type a value of `dtype` is computed in inside a generated kernel."""
    if dtype in FLOAT_DTYPES:
        return "fp32"
    if dtype == torch.bool:
        return "i1"
    if dtype == torch.int64:
        return "i64"
    if dtype in INT_DTYPES:
        return "i32"
    raise NotImplementedError(f"dtype {dtype} is not supported in generated kernels")


_RANK = {"i1": 0, "i32": 1, "i64": 2, "fp32": 3}


def common_type(*types: str) -> str:
    """Promotion of compute types: bool < int32 < int64 < fp32."""
    return max(types, key=_RANK.__getitem__)


def literal(value: Any, ctype: str | None = None) -> str:
    """A Python constant as Triton source, converted to `ctype` when given."""
    if ctype == "i1":
        return "True" if value else "False"
    if isinstance(value, bool):
        return "True" if value else "False"
    if ctype == "fp32" or isinstance(value, float):
        value = float(value)
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else '-float("inf")'
        return repr(value)
    return repr(int(value))


def cast(expr: str, src: str, dst: str) -> str:
    """Convert an expression between compute types."""
    if src == dst:
        return expr
    if dst == "i1":
        return f"({expr} != 0)"
    # tl.cast, not .to(): an int argument equal to 1 arrives as a constexpr, which has no .to()
    return f"tl.cast({expr}, {TL_TYPE[dst]})"


def literal_type(value: Any) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, float):
        return "fp32"
    return "i32"


# ----------------------------------------------------------------------------- arguments


def normalized_args(node: fx.Node) -> dict[str, Any]:
    """All schema arguments of an ATen call by name, defaults filled in."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _rank(x) -> int | None:
    v = _val(x)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _is_last_dim(dims, rank: int | None) -> bool:
    if rank is None or rank == 0:
        return False
    if dims is None:
        return rank == 1
    if isinstance(dims, int):
        dims = [dims]
    dims = list(dims)
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] in (-1, rank - 1)


# ----------------------------------------------------------------------------- pointwise


@dataclass(frozen=True)
class PointwiseRule:
    """How to emit one pointwise op.

    operands: schema argument names whose values (tensors or Python scalars) feed the op.
    emit: a template over the operands ("{self} + {other}") or a function
          emit(operands: dict[str, str], attrs: dict, types: dict[str, str]) -> str,
          where attrs are all schema arguments and types the operands' compute types
          (after the cast below) plus types["out"], the result's.
    flops: FLOPs per output element (an int, or a function of the node).
    operand_type: cast applied to operands first: "result" (the result's compute type),
          "common" (their promoted type, for comparisons), "none".
    bool_operands: operands always converted to bool (masks, conditions).
    helpers: @triton.jit helper functions the expression calls (emitted once per module).
    check: extra argument check, returning a reason the node is unsupported or None.
    """

    operands: tuple[str, ...]
    emit: str | Callable[[dict, dict, dict], str]
    flops: int | Callable[[fx.Node], int] = 1
    operand_type: str = "result"
    bool_operands: tuple[str, ...] = ()
    helpers: tuple[str, ...] = ()
    check: Callable[[fx.Node, dict], str | None] | None = None


# Helper functions emitted into generated modules that use them. Written with core tl ops
# only (stable across Triton 3.x; no libdevice).
HELPERS: dict[str, str] = {
    "_tanh": '''@triton.jit
def _tanh(x):
    # tanh from exp (fp32): a short odd series near 0, where 1 - e would cancel
    e = tl.exp(-2.0 * tl.abs(x))
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    return tl.where(tl.abs(x) < 0.125, small, big)''',
    "_maximum": '''@triton.jit
def _maximum(a, b):
    # NaN-propagating like torch.maximum
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)''',
    "_minimum": '''@triton.jit
def _minimum(a, b):
    # NaN-propagating like torch.minimum
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)''',
}


def _alpha(op: str, reverse: bool = False):
    def emit(a, attrs, types):
        alpha = attrs.get("alpha", 1)
        lhs, rhs = (a["other"], a["self"]) if reverse else (a["self"], a["other"])
        if types["out"] == "i1" and op == "+":
            return f"{lhs} | {rhs}"  # bool + bool is logical or in torch
        if alpha is None or alpha == 1:
            return f"{lhs} {op} {rhs}"
        return f"{lhs} {op} {rhs} * {literal(alpha, types['out'])}"

    return emit


def _alpha_flops(node: fx.Node) -> int:
    return 1 if normalized_args(node).get("alpha", 1) in (1, None) else 2


def _mul(a, attrs, types):
    return f"{a['self']} & {a['other']}" if types["out"] == "i1" else f"{a['self']} * {a['other']}"


def _gelu(a, attrs, types):
    x = a["self"]
    if attrs.get("approximate", "none") == "tanh":
        # 0.5 * x * (1 + tanh(u)) == x / (1 + exp(-2u)), u = sqrt(2/pi) * (x + 0.044715 x^3): one exp2 and one
        # non-IEEE division (2 ulp) -- the instruction count, not memory, bounded this chain at ~84% of copy
        return (f"tl.fdiv({x}, 1.0 + tl.exp2(-2.302208198144325 * ({x} + 0.044715 * {x} * {x} * {x})), "
                f"ieee_rounding=False)")
    return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"


def _gelu_check(node, attrs):
    if attrs.get("approximate", "none") not in ("none", "tanh"):
        return f"gelu approximate={attrs.get('approximate')!r}"
    return None


def _pow_exponent(attrs):
    e = attrs.get("exponent")
    return e if isinstance(e, (int, float)) and not isinstance(e, bool) else None


def _pow(a, attrs, types):
    x, e = a["self"], _pow_exponent(attrs)
    if e == int(e) and abs(e) <= 8:
        n = abs(int(e))
        body = " * ".join([x] * n) if n else "1.0"
        return f"1.0 / ({body})" if e < 0 else body
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -0.5:
        return f"tl.rsqrt({x})"
    # x ** e = exp2(e * log2(x)); NaN for x < 0 like torch (non-integer exponent)
    return f"tl.exp2({literal(float(e))} * tl.log2({x}))"


def _pow_flops(node):
    e = _pow_exponent(normalized_args(node))
    if e is not None and e == int(e) and abs(e) <= 8:
        return max(1, abs(int(e)) - 1 + (e < 0))
    return 3


def _pow_check(node, attrs):
    if _pow_exponent(attrs) is None:
        return "pow with a non-numeric exponent"
    if compute_type(node.meta["val"].dtype) != "fp32":
        return "integer pow"
    return None


def _clamp(lo_key: str | None, hi_key: str | None):
    def emit(a, attrs, types):
        x = a["self"]
        lo = attrs.get(lo_key) if lo_key else None
        hi = attrs.get(hi_key) if hi_key else None
        # comparisons are False for NaN, so NaN passes through like torch.clamp
        if lo is not None:
            lo_s = literal(lo, types["out"])
            x = f"tl.where({x} < {lo_s}, {lo_s}, {x})"
        if hi is not None:
            hi_s = literal(hi, types["out"])
            x = f"tl.where({x} > {hi_s}, {hi_s}, {x})"
        return x

    return emit


def _clamp_check(*keys):
    def check(node, attrs):
        for k in keys:
            if isinstance(attrs.get(k), fx.Node):
                return f"clamp with a tensor {k}"
        return None

    return check


def _target_dtype(attrs) -> torch.dtype | None:
    return attrs.get("dtype")


def _cast_emit(a, attrs, types):
    """Explicit dtype casts: convert, and round through fp16/bf16 so the cast keeps its meaning."""
    x, src = a["self"], types["self"]
    dtype = _target_dtype(attrs)
    if dtype is None:
        return x
    dst = compute_type(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        if src == "i1":
            return cast(x, src, "fp32")  # 0/1 are exact
        x = cast(x, src, "fp32")
        if dtype == torch.bfloat16:  # _round_bf16: fused_runtime.round_bf16_for (interpreter rounding)
            return f"tl.cast(_round_bf16({x}), tl.bfloat16).to(tl.float32)"
        return f"tl.cast({x}, tl.float16).to(tl.float32)"
    if dst != "fp32" and dst != "i1" and src == "fp32":
        return f"tl.cast({x}, {TL_TYPE[dst]})"  # truncation toward zero like torch
    return cast(x, src, dst)


def _cast_check(node, attrs):
    dtype = _target_dtype(attrs)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"cast to {dtype}"
    dev = attrs.get("device")
    src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if dev is not None and src is not None and torch.device(dev) != src.device:
        return "device transfer"
    if attrs.get("layout") not in (None, torch.strided):
        return "layout change"
    return None


def _logical_not(a, attrs, types):
    return f"{a['self']} == 0"


def _bitwise_not(a, attrs, types):
    return f"{a['self']} == 0" if types["self"] == "i1" else f"~{a['self']}"


_UNARY_TL = {
    aten.exp.default: ("tl.exp({self})", 1),
    aten.exp2.default: ("tl.exp2({self})", 1),
    aten.log.default: ("tl.log({self})", 1),
    aten.log2.default: ("tl.log2({self})", 1),
    aten.sqrt.default: ("tl.sqrt({self})", 1),
    aten.rsqrt.default: ("tl.rsqrt({self})", 1),
    aten.sin.default: ("tl.sin({self})", 1),
    aten.cos.default: ("tl.cos({self})", 1),
    aten.erf.default: ("tl.erf({self})", 1),
    aten.sigmoid.default: ("tl.sigmoid({self})", 3),
    aten.floor.default: ("tl.floor({self})", 1),
    aten.ceil.default: ("tl.ceil({self})", 1),
    aten.reciprocal.default: ("1.0 / {self}", 1),
}

POINTWISE: dict[Any, PointwiseRule] = {
    aten.add.Tensor: PointwiseRule(("self", "other"), _alpha("+"), _alpha_flops),
    aten.add.Scalar: PointwiseRule(("self", "other"), _alpha("+"), _alpha_flops),
    aten.sub.Tensor: PointwiseRule(("self", "other"), _alpha("-"), _alpha_flops),
    aten.sub.Scalar: PointwiseRule(("self", "other"), _alpha("-"), _alpha_flops),
    aten.rsub.Tensor: PointwiseRule(("self", "other"), _alpha("-", reverse=True), _alpha_flops),
    aten.rsub.Scalar: PointwiseRule(("self", "other"), _alpha("-", reverse=True), _alpha_flops),
    aten.mul.Tensor: PointwiseRule(("self", "other"), _mul),
    aten.mul.Scalar: PointwiseRule(("self", "other"), _mul),
    aten.div.Tensor: PointwiseRule(("self", "other"), "{self} / {other}"),
    aten.div.Scalar: PointwiseRule(("self", "other"), "{self} / {other}"),
    aten.neg.default: PointwiseRule(("self",), "-{self}"),
    aten.abs.default: PointwiseRule(("self",), "tl.abs({self})"),
    **{op: PointwiseRule(("self",), tpl, flops) for op, (tpl, flops) in _UNARY_TL.items()},
    aten.tanh.default: PointwiseRule(("self",), "_tanh({self})", 6, helpers=("_tanh",)),
    aten.silu.default: PointwiseRule(("self",), "{self} * tl.sigmoid({self})", 4),
    aten.relu.default: PointwiseRule(("self",), "tl.where({self} < 0, 0, {self})", 1),
    aten.gelu.default: PointwiseRule(
        ("self",), _gelu, lambda n: 9 if normalized_args(n).get("approximate") == "tanh" else 8,
        check=_gelu_check,
    ),
    aten.pow.Tensor_Scalar: PointwiseRule(("self",), _pow, _pow_flops, check=_pow_check),
    aten.maximum.default: PointwiseRule(("self", "other"), "_maximum({self}, {other})", helpers=("_maximum",)),
    aten.minimum.default: PointwiseRule(("self", "other"), "_minimum({self}, {other})", helpers=("_minimum",)),
    aten.clamp.default: PointwiseRule(("self",), _clamp("min", "max"), 2, check=_clamp_check("min", "max")),
    aten.clamp_min.default: PointwiseRule(("self",), _clamp("min", None), check=_clamp_check("min")),
    aten.clamp_max.default: PointwiseRule(("self",), _clamp(None, "max"), check=_clamp_check("max")),
    aten.hardtanh.default: PointwiseRule(("self",), _clamp("min_val", "max_val"), 2),
    aten.where.self: PointwiseRule(
        ("condition", "self", "other"), "tl.where({condition}, {self}, {other})", bool_operands=("condition",)
    ),
    aten.masked_fill.Scalar: PointwiseRule(
        ("self", "mask", "value"), "tl.where({mask}, {value}, {self})", bool_operands=("mask",)
    ),
    aten.masked_fill.Tensor: PointwiseRule(
        ("self", "mask", "value"), "tl.where({mask}, {value}, {self})", bool_operands=("mask",)
    ),
    **{
        getattr(aten, name).__getattr__(overload): PointwiseRule(
            ("self", "other"), f"{{self}} {sym} {{other}}", operand_type="common"
        )
        for name, sym in (("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="))
        for overload in ("Tensor", "Scalar")
    },
    aten.logical_not.default: PointwiseRule(("self",), _logical_not, operand_type="none"),
    aten.bitwise_not.default: PointwiseRule(("self",), _bitwise_not, operand_type="none"),
    aten.logical_and.default: PointwiseRule(
        ("self", "other"), "{self} & {other}", bool_operands=("self", "other")
    ),
    aten.logical_or.default: PointwiseRule(("self", "other"), "{self} | {other}", bool_operands=("self", "other")),
    aten._to_copy.default: PointwiseRule(("self",), _cast_emit, 0, operand_type="none", check=_cast_check),
    aten.to.dtype: PointwiseRule(("self",), _cast_emit, 0, operand_type="none", check=_cast_check),
    aten.to.dtype_layout: PointwiseRule(("self",), _cast_emit, 0, operand_type="none", check=_cast_check),
    aten.clone.default: PointwiseRule(("self",), "{self}", 0, operand_type="none"),
    aten.alias.default: PointwiseRule(("self",), "{self}", 0, operand_type="none"),
    aten.detach.default: PointwiseRule(("self",), "{self}", 0, operand_type="none"),
    aten.lift_fresh_copy.default: PointwiseRule(("self",), "{self}", 0, operand_type="none"),
}
if hasattr(aten, "contiguous"):
    POINTWISE[aten.contiguous.default] = PointwiseRule(("self",), "{self}", 0, operand_type="none")
# bitwise and/or/xor: logical on bools, bitwise on integers (the operands take the result's type)
for _name, _sym in (("and", "&"), ("or", "|"), ("xor", "^")):
    for _packet in (f"__{_name}__", f"bitwise_{_name}"):
        for _ov in ("Tensor", "Scalar"):
            _op = getattr(getattr(aten, _packet, None), _ov, None)
            if _op is not None:
                POINTWISE[_op] = PointwiseRule(("self", "other"), f"{{self}} {_sym} {{other}}")
for _name in ("ScalarSelf", "ScalarOther", "Scalar"):
    if hasattr(aten.where, _name):
        POINTWISE[getattr(aten.where, _name)] = POINTWISE[aten.where.self]

# Ops whose pointwise value equals their first operand (the emitter aliases instead of copying).
IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
if hasattr(aten, "contiguous"):
    IDENTITY.add(aten.contiguous.default)

# ----------------------------------------------------------------------------- reductions


@dataclass(frozen=True)
class ReductionRule:
    """A reduction over the last dim, or a composite lowered to row reductions + pointwise.

    lower(b, attrs) -> handle, with the builder b (see fused._Builder):
      b.input(arg) -> handle of a value argument as fp32 (None stays None)
      b.reduce("sum" | "max" | "min" | "mean", h, suffix, keepdim=True) -> per-row handle
      b.pointwise(template, *handles, suffix=None) -> handle ("{0} - {1}" over the handles)
      b.n(h) -> source of the length of the dim reduced in h ("N", or "1" if h is per-row)
    suffix names intermediates "<node>_<suffix>"; the handle returned is the node's value.
    flops: per input element.
    """

    lower: Callable[[Any, dict], Any]
    flops: int
    value_arg: str = "self"  # the argument reduced over its last dim
    dims_arg: str | None = "dim"  # None: the normalized_shape argument (norms)
    check: Callable[[fx.Node, dict], str | None] | None = None


def _lower_simple(op):
    return lambda b, a: b.reduce(op, b.input(a["self"]), None, keepdim=bool(a.get("keepdim")))


def _lower_softmax(b, a):
    x = b.input(a["self"])
    row_max = b.reduce("max", x, "max")
    e = b.pointwise("tl.exp({0} - {1})", x, row_max, suffix="exp")
    total = b.reduce("sum", e, "sum")
    out = getattr(b, "node", None)
    out = out.meta.get("val") if out is not None else None
    if isinstance(out, torch.Tensor) and out.dtype in (torch.float16, torch.bfloat16):
        # one reciprocal per row and a multiply per element instead of a division per element: within an
        # fp32 ulp or two, far below the half-precision rounding of the output (measured 1-2% faster)
        return b.pointwise("{0} * {1}", e, b.pointwise("1.0 / {0}", total, suffix="inv"))
    return b.pointwise("{0} / {1}", e, total)


def _lower_log_softmax(b, a):
    x = b.input(a["self"])
    row_max = b.reduce("max", x, "max")
    total = b.reduce("sum", b.pointwise("tl.exp({0} - {1})", x, row_max, suffix="exp"), "sum")
    lse = b.pointwise("{0} + tl.log({1})", row_max, total, suffix="logsumexp")
    return b.pointwise("{0} - {1}", x, lse)


def _lower_layer_norm(b, a):
    x = b.input(a["input"])
    mean = b.reduce("mean", x, "mean")
    centered = b.pointwise("{0} - {1}", x, mean, suffix="centered")
    var = b.reduce("mean", b.pointwise("{0} * {0}", centered, suffix="sq"), "var")
    rstd = b.pointwise(f"tl.rsqrt({{0}} + {literal(float(a['eps']))})", var, suffix="rstd")
    y = b.pointwise("{0} * {1}", centered, rstd, suffix="normed" if a["weight"] or a["bias"] else None)
    if a["weight"] is not None:
        y = b.pointwise("{0} * {1}", y, b.input(a["weight"]), suffix="scaled" if a["bias"] is not None else None)
    if a["bias"] is not None:
        y = b.pointwise("{0} + {1}", y, b.input(a["bias"]))
    return y


def _lower_rms_norm(b, a):
    x = b.input(a["input"])
    eps = a["eps"]
    if eps is None:  # ATen's default: epsilon of the op-math type (fp32 for fp16/bf16/fp32)
        eps = torch.finfo(torch.float32).eps
    mean_sq = b.reduce("mean", b.pointwise("{0} * {0}", x, suffix="sq"), "mean_sq")
    inv_rms = b.pointwise(f"tl.rsqrt({{0}} + {literal(float(eps))})", mean_sq, suffix="inv_rms")
    if a["weight"] is None:
        return b.pointwise("{0} * {1}", x, inv_rms)
    y = b.pointwise("{0} * {1}", x, inv_rms, suffix="normed")
    return b.pointwise("{0} * {1}", y, b.input(a["weight"]))


def _correction(a) -> float:
    if "unbiased" in a:  # var.dim / std.dim
        return 1.0 if a["unbiased"] in (None, True) else 0.0
    return 1.0 if a.get("correction") is None else float(a["correction"])


def _lower_var(sqrt: bool):
    def lower(b, a):
        x = b.input(a["self"])
        mean = b.reduce("mean", x, "mean")
        centered = b.pointwise("{0} - {1}", x, mean, suffix="centered")
        sumsq = b.reduce("sum", b.pointwise("{0} * {0}", centered, suffix="sq"), "sumsq",
                         keepdim=bool(a.get("keepdim")))
        var = f"{{0}} / ({b.n(x)} - {literal(_correction(a))})"  # N - 1 = 0 gives NaN like torch
        return b.pointwise(f"tl.sqrt({var})" if sqrt else var, sumsq)

    return lower


def _lower_norm(b, a):
    x = b.input(a["self"])
    keepdim = bool(a.get("keepdim"))
    order = float(a["ord"])
    if order == 2:
        return b.pointwise("tl.sqrt({0})", b.reduce("sum", b.pointwise("{0} * {0}", x, suffix="sq"), "sumsq",
                                                     keepdim=keepdim))
    if order == 1:
        return b.reduce("sum", b.pointwise("tl.abs({0})", x, suffix="abs"), None, keepdim=keepdim)
    return b.reduce("max", b.pointwise("tl.abs({0})", x, suffix="abs"), None, keepdim=keepdim)


def _norm_check(node, attrs):
    order = attrs.get("ord")
    if not isinstance(order, (int, float)) or float(order) not in (1.0, 2.0, math.inf):
        return f"vector norm of order {order!r}"
    return _no_dtype_change(node, attrs)


def _no_dtype_change(node, attrs):
    if attrs.get("dtype") is not None and attrs["dtype"] not in FLOAT_DTYPES:
        return f"reduction to {attrs['dtype']}"
    return None


REDUCTIONS: dict[Any, ReductionRule] = {
    aten.sum.dim_IntList: ReductionRule(_lower_simple("sum"), 1, check=_no_dtype_change),
    aten.mean.dim: ReductionRule(_lower_simple("mean"), 1, check=_no_dtype_change),
    aten.amax.default: ReductionRule(_lower_simple("max"), 1),
    aten.amin.default: ReductionRule(_lower_simple("min"), 1),
    aten.softmax.int: ReductionRule(_lower_softmax, 5, check=_no_dtype_change),
    aten._softmax.default: ReductionRule(_lower_softmax, 5),
    aten.log_softmax.int: ReductionRule(_lower_log_softmax, 5, check=_no_dtype_change),
    aten._log_softmax.default: ReductionRule(_lower_log_softmax, 5),
    aten.var.dim: ReductionRule(_lower_var(False), 4),
    aten.var.correction: ReductionRule(_lower_var(False), 4),
    aten.std.dim: ReductionRule(_lower_var(True), 4),
    aten.std.correction: ReductionRule(_lower_var(True), 4),
    aten.linalg_vector_norm.default: ReductionRule(_lower_norm, 2, check=_norm_check),
    aten.layer_norm.default: ReductionRule(_lower_layer_norm, 8, value_arg="input", dims_arg=None),
    aten.rms_norm.default: ReductionRule(_lower_rms_norm, 4, value_arg="input", dims_arg=None),
}

# ----------------------------------------------------------------------------- layout

LAYOUT = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.expand.default,
    aten.expand_as.default,
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.slice.Tensor,
    aten.select.int,
    aten.alias.default,
}

# Side-effect-only nodes that export leaves in graphs; the emitter skips them.
NOOPS = {aten._assert_tensor_metadata.default}
for _name in ("_assert_scalar", "sym_constrain_range_for_size", "_assert_async"):
    for _ov in ("default", "msg"):
        _op = getattr(getattr(aten, _name, None), _ov, None)
        if _op is not None:
            NOOPS.add(_op)

# ----------------------------------------------------------------------------- queries


def _tensor_dtype_reason(node: fx.Node) -> str | None:
    for x in [*node.args, *node.kwargs.values()]:
        for y in x if isinstance(x, (list, tuple)) else [x]:
            v = _val(y)
            if isinstance(v, torch.Tensor) and v.dtype not in SUPPORTED_DTYPES:
                return f"operand dtype {v.dtype}"
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return "no tensor meta['val']"
    if v.dtype not in SUPPORTED_DTYPES:
        return f"result dtype {v.dtype}"
    return None


def unsupported_reason(node: fx.Node) -> str | None:
    """Why the generated kernels cannot compute `node` (None when they can)."""
    if node.op != "call_function":
        return f"{node.op} node"
    target = node.target
    if target in POINTWISE:
        rule = POINTWISE[target]
        reason = _tensor_dtype_reason(node)
        if reason:
            return reason
        attrs = normalized_args(node)
        for k in rule.operands:
            v = attrs.get(k)
            if isinstance(v, (list, tuple)) or (v is not None and not isinstance(v, (fx.Node, int, float, bool))):
                return f"argument {k}={v!r}"
        return rule.check(node, attrs) if rule.check else None
    if target in REDUCTIONS:
        rule = REDUCTIONS[target]
        reason = _tensor_dtype_reason(node)
        if reason:
            return reason
        attrs = normalized_args(node)
        x = attrs[rule.value_arg]
        rank = _rank(x)
        if rank is None:
            return "reduced value is not a tensor"
        if compute_type(_val(x).dtype) != "fp32":
            return "reduction of a non-floating tensor"
        if rule.dims_arg is None:
            if len(attrs["normalized_shape"]) != 1 or rank == 0:
                return "normalization over more than the last dim"
        elif not _is_last_dim(attrs[rule.dims_arg], rank):
            return f"reduction over dims {attrs[rule.dims_arg]} (only the last dim is fused)"
        return rule.check(node, attrs) if rule.check else None
    if target in LAYOUT:
        return "layout op (absorbed on region inputs, and as broadcasts / trailing size-1 dims of values)"
    return f"no rule for {target}"


def classify(node: fx.Node) -> str:
    """'pointwise', 'reduction' (over the last dim only) or 'other'."""
    if unsupported_reason(node) is not None:
        return "other"
    return "pointwise" if node.target in POINTWISE else "reduction"


def flops_per_element(node: fx.Node) -> int:
    """FLOPs per output element (pointwise) or per input element (reductions); 0 if unknown."""
    rule = POINTWISE.get(node.target) or REDUCTIONS.get(node.target)
    if rule is None:
        return 0
    return rule.flops(node) if callable(rule.flops) else rule.flops
