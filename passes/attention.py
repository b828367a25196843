"""Attention pass: every attention subgraph -> one ``torch.ops.fxopt.attention`` call.

Rewriting is data, run by the rule engine every pass shares (passes/rules.py). ``RULES`` holds one
``Rule(name, pattern, check, rewrite)`` per attention form: its pattern lists the form's sites (an sdpa
call; a softmax fed by a matmul) with the root a match walks back from, its check matches the site's
``Pattern`` and builds the :class:`Plan` or gives the reason to leave it, its rewrite puts one fxopt
attention call in the Plan's place. Every site is counted (per rule, or "unmatched" with its reason),
all are decided on the graph as captured and rewritten in graph order. ``BATCHED_RULES`` first view 3-d
batched products (Bloom's baddbmm over (b*h, s, d)) as the 4-d ones the patterns match.

The matching language is ``PATTERNS``, a table of (name, steps, plan) entries:

* ``steps`` is a chain of :class:`Step` matchers walked *backward* from the pattern's root node;
  each step names the ops it accepts, how the walk continues (which input, and what the step
  captures on the way: v, a mask, a scale factor) and a check that explains a refusal.
  Steps may be optional and repeated.
* ``plan`` turns a matched chain into a :class:`Plan` (q, k, v, scale, mask parts, GQA) or
  refuses with a reason.

    explicit   matmul(P, v) <- [dropout(eval) | cast | clone]* <- softmax(-1) <- [cast]*
               <- [masked_fill | where | + bias]* <- [cap * tanh(. / cap)] <- [* c | / c]* <- [cast]*
               <- matmul(q, kᵀ)
    sdpa       aten.scaled_dot_product_attention (is_causal, attn_mask, scale, enable_gqa)

K and V are un-repeated when they come from ``repeat_kv`` (unsqueeze/expand/reshape, slices
allowed) or ``repeat_interleave`` on the head dim, so the op reads the original KV heads (GQA).
A constant multiplying q before q·kᵀ is folded into the scale.

Masks are classified by passes/masks.py, which proves their form from the graph that builds them
(comparisons of aranges, tril/triu buffers, where/masked_fill, the attention-mask input read per key):

    none            hides nothing                                                -> dropped
    causal          key j hidden exactly when j > i                              -> causal=True
    window w        hidden when j > i or j <= i - w (a causal sliding window)    -> causal=True, window=w
    padding         hidden exactly where input[b, j] == 0                        -> key_padding_mask
    (combinations of padding with causal or a window; ALiBi slopes read off an additive bias)

Anything it cannot prove -- a learned or prefix bias, a mask built from parameters -- stays an additive
``attn_bias`` (one fxopt attention call through the SDPA fallback: correct, slower) and `explain` gives the
reason. On the meta device buffers hold no values: the one idiom recognised there by structure alone,
``buffer[:s, :s] == 0`` used as a -inf fill (GPT-2's tril buffer), is recorded as causal with evidence
saying it was assumed. Scores soft-capped as ``cap * tanh(s / cap)`` (Gemma-2) record the cap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from fxopt import opnames
from fxopt.codegen import attention_op
from fxopt.nodes import aten_ops, fetch_attr, is_full_slice, node_arg, op_name, tensor_val
from fxopt.nodes import node_val as _val
from fxopt.nodes import same_shape as _same_shape
from fxopt.nodes import same_size as _same
from fxopt.nodes import size_expr as _expr
from fxopt.passes import cost as cost_pass
from fxopt.passes import masks
from fxopt.passes.infra import PassContext, PassResult, add_constant, finish
from fxopt.passes.rules import Rewriter, Rule, apply_rules

aten = torch.ops.aten
ATTENTION_KEY = "fxopt.attention"
ATTENTION_OP = torch.ops.fxopt.attention.default

HIDDEN_AT_MOST = masks.HIDDEN_AT_MOST
#: Largest tensor the mask evaluator materialises.
MAX_EVAL_NUMEL = 1 << 24


MATMUL = aten_ops("matmul.default")
SOFTMAX = aten_ops("softmax.int", "_softmax.default", "_safe_softmax.default")
SDPA = aten_ops("scaled_dot_product_attention.default")
DROPOUT = aten_ops(*opnames.DROPOUT)
CASTS = aten_ops(*opnames.CASTS)
IDENTITY = aten_ops(*opnames.IDENTITY)
PASSTHROUGH = DROPOUT | CASTS | IDENTITY
MASKED_FILL = aten_ops("masked_fill.Scalar", "masked_fill.Tensor")
WHERE = aten_ops("where.self", "where.ScalarOther", "where.ScalarSelf")
ADD = aten_ops("add.Tensor")
MASK_OPS = MASKED_FILL | WHERE | ADD
MUL = aten_ops("mul.Tensor", "mul.Scalar", "mul_.Tensor", "mul_.Scalar")  # in place: Falcon's `scores *= c`
DIV = aten_ops("div.Tensor", "div.Scalar", "div_.Tensor", "div_.Scalar")
SCALE_OPS = MUL | DIV
RESHAPES = aten_ops(*opnames.RESHAPES)
OTHER_SCORE_OPS = aten_ops("bmm.default", "einsum.default", "baddbmm.default", "mm.default")


class NoMatch(Exception):
    """A candidate that cannot be rewritten; the message says why (shown by `fxopt explain`)."""


class Unevaluable(Exception):
    """A mask or scale subgraph that cannot be evaluated at compile time."""


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class AttentionInfo:
    """What the pass decided for one fxopt attention node (node.meta["fxopt.attention"])."""

    causal: bool
    scale: float
    mask_kind: str  # none | causal | window | padding | causal+padding | window+padding | general
    gqa_groups: int
    kernel: str  # flash_prefill | flash_decode | sdpa
    fallback_reason: str  # why the SDPA fallback runs ("" for flash)
    pattern: str  # the PATTERNS entry that matched
    evidence: str = ""  # how the mask kind was established
    window: int = 0  # sliding window: a query sees its last `window` keys, itself included (0: none)
    softcap: float = 0.0  # scores soft-capped as softcap * tanh(s / softcap) (0: none)
    alibi: bool = False  # per-head ALiBi slopes * (j - i) added to the scores


@dataclass
class Plan:
    """A matched attention site, ready to rewrite."""

    pattern: str
    root: fx.Node  # replaced by the attention node
    anchor: fx.Node  # the softmax (explicit) or the sdpa node: what explain reports
    q: fx.Node
    k: fx.Node  # (b, hkv, skv, d) or, with k_transposed, (b, hkv, d, skv)
    v: fx.Node
    scale: float
    parts: list[MaskPart] = field(default_factory=list)  # in forward order
    is_causal: bool = False  # sdpa's flag
    k_transposed: bool = False
    gqa_groups: int = 1
    chain: list[fx.Node] = field(default_factory=list)  # nodes the match replaces
    extra: list[fx.Node] = field(default_factory=list)  # GQA repeat / q-scale / kᵀ nodes that may die
    softcap: float = 0.0  # cap of softcap * tanh(scores / softcap) between the scale and the mask


MaskDecision = masks.MaskForm
MaskPart = masks.MaskPart


# --------------------------------------------------------------------------------------------- helpers
def _is_4d(node: Any) -> bool:
    t = tensor_val(node)
    return t is not None and t.dim() == 4


def _gm(node: fx.Node) -> fx.GraphModule:
    return node.graph.owning_module


def _parameter_names(gm: fx.GraphModule) -> set[str]:
    return {name for name, _ in gm.named_parameters(remove_duplicate=False)}


# --------------------------------------------------------------------------------------------- evaluation
def _hints(vals: list[Any]) -> dict[sympy.Symbol, int]:
    """Example values of every export symbol, read from the shape env of the given fake values."""
    for val in vals:
        sizes = list(val.shape) if isinstance(val, torch.Tensor) else [val]
        for size in sizes:
            if isinstance(size, torch.SymInt):
                env = size.node.shape_env
                table = getattr(env, "backed_var_to_val", None) or env.var_to_val
                return {sym: int(v) for sym, v in table.items()}
    return {}


def _concrete(value, assignment: dict) -> Any:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        expr = sympy.sympify(sympy.sympify(value.node.expr).xreplace(assignment))
        if expr.free_symbols:
            raise Unevaluable(f"size {value} has no value")
        if isinstance(value, torch.SymBool):
            return bool(expr)
        return int(expr) if isinstance(value, torch.SymInt) else float(expr)
    return value


def _subgraph(outputs: list[fx.Node]) -> list[fx.Node]:
    """Ancestors of `outputs` in graph order, not looking past nodes whose value is a size."""
    seen: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(_val(node), (torch.SymInt, torch.SymFloat, torch.SymBool)):
            continue
        stack.extend(node.all_input_nodes)
    return [n for n in outputs[0].graph.nodes if n in seen]


def _to_cpu(value):
    if isinstance(value, torch.device):
        return torch.device("cpu")
    return value


def _evaluate_constant(output: fx.Node) -> Any:
    """Run the size-free subgraph computing `output` (a scale factor) on the CPU.

    Buffers and constants supply their values; inputs, parameters, random and in-place ops refuse.
    """
    gm = _gm(output)
    params = _parameter_names(gm)
    env: dict[fx.Node, Any] = {}
    for node in _subgraph([output]):
        val = _val(node)
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            env[node] = _concrete(val, {})
        elif node.op == "placeholder":
            raise Unevaluable(f"depends on the input `{node.target}`")
        elif node.op == "get_attr":
            if node.target in params:
                raise Unevaluable(f"depends on the parameter `{node.target}`")
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                if value.device.type == "meta":
                    raise Unevaluable(f"buffer `{node.target}` has no values (meta device)")
                value = value.detach().cpu()
            env[node] = value
        elif node.op == "call_function":
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                if torch.Tag.nondeterministic_seeded in target.tags:
                    raise Unevaluable(f"random op {target}")
                if target._schema.is_mutable and target != aten.detach_.default:  # would write to buffers
                    raise Unevaluable(f"in-place op {target}")
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            args = fx.node.map_aggregate(args, _to_cpu)
            kwargs = {k: _to_cpu(v) for k, v in kwargs.items()}
            try:
                result = target(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure means "cannot evaluate here"
                raise Unevaluable(f"{op_name(node, namespace=False)} failed: {exc}") from exc
            if isinstance(result, torch.Tensor) and result.numel() > MAX_EVAL_NUMEL:
                raise Unevaluable("mask too large to evaluate")
            env[node] = result
        else:
            raise Unevaluable(f"{node.op} {node.target}")
    return env[output]


def _scalar(arg: Any, what: str = "scale") -> float:
    """A python number, a size-free symbolic float, or a constant 1-element tensor as a float."""
    if isinstance(arg, bool):
        raise NoMatch(f"{what} is a boolean")
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, fx.Node):
        raise NoMatch(f"{what} is not a number ({type(arg).__name__})")
    val = _val(arg)
    if isinstance(val, (torch.SymInt, torch.SymFloat)):
        expr = sympy.sympify(val.node.expr)
        if expr.free_symbols:
            raise NoMatch(f"{what} depends on a dynamic size ({expr})")
        return float(expr)
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return float(val)
    if not isinstance(val, torch.Tensor):
        raise NoMatch(f"{what} is not a number")
    if val.dim() and not all(isinstance(d, int) and d == 1 for d in val.shape):
        raise NoMatch(f"{what} is a tensor of shape {tuple(val.shape)}, not a scalar")
    try:
        value = _evaluate_constant(arg)
    except Unevaluable as exc:
        text = str(exc)
        if "parameter" in text or "input" in text:
            raise NoMatch(f"{what} is a runtime tensor ({text})") from exc
        if "has no value" in text:
            raise NoMatch(f"{what} depends on a dynamic size") from exc
        raise NoMatch(f"{what} is a tensor whose value is unknown at compile time ({text})") from exc
    return float(value.reshape(()).item())


# --------------------------------------------------------------------------------------------- pattern language
Follow = Callable[[fx.Node], "list[tuple[fx.Node, Any]] | str"]


@dataclass(frozen=True)
class Step:
    """Match one node of a chain walked backward from the root.

    `follow(node)` returns the inputs the walk may continue from, each with what this step
    captures (a mask part, a scale factor, v), or a string: why the node was refused.
    An empty list ends the chain (the last step). `repeat` steps are also optional.
    """

    role: str
    ops: frozenset
    follow: Follow
    optional: bool = False
    repeat: bool = False
    mismatch: Callable[[fx.Node], str | None] | None = None  # a specific reason for a wrong op
    applies: Callable[[fx.Node], bool] | None = None  # a further check that the node is this step's op


@dataclass(frozen=True)
class Pattern:
    name: str
    steps: tuple[Step, ...]
    plan: Callable[[list[tuple[str, fx.Node, Any]]], Plan]  # the check: build a Plan or raise NoMatch

    @property
    def root_ops(self) -> frozenset:
        return self.steps[0].ops


class _Failures:
    """The most telling refusal: a checked op beats a wrong op, deeper beats shallower."""

    def __init__(self):
        self.best: tuple[bool, int, str] | None = None

    def add(self, specific: bool, depth: int, reason: str) -> None:
        key = (specific, depth, reason)
        if self.best is None or key[:2] > self.best[:2]:
            self.best = key

    @property
    def reason(self) -> str:
        return self.best[2] if self.best else "no pattern matched"


def _walk(node: fx.Node, steps: tuple[Step, ...], i: int, acc: list, root: fx.Node, fails: _Failures):
    step = steps[i]
    if node.op == "call_function" and node.target in step.ops and (step.applies is None or step.applies(node)):
        choices: list | str
        if node is not root and len(node.users) != 1:
            name = op_name(node, namespace=False)
            choices = f"{name} ({step.role}) is also used outside the attention (e.g. returned)"
        else:
            choices = step.follow(node)
        if isinstance(choices, str):
            fails.add(True, len(acc), choices)
        elif i == len(steps) - 1:
            return acc + [(step.role, node, choices[0][1] if choices else None)]
        else:
            for nxt, detail in choices:
                if not isinstance(nxt, fx.Node):
                    continue
                found = _walk(nxt, steps, i if step.repeat else i + 1, acc + [(step.role, node, detail)], root,
                              fails)
                if found is not None:
                    return found
    elif not (step.optional or step.repeat):
        specific = step.mismatch(node) if step.mismatch else None
        fails.add(specific is not None, len(acc),
                  specific or f"expected {step.role} ({', '.join(sorted(str(o) for o in step.ops))}), "
                              f"found {op_name(node, namespace=False)}")
    if (step.optional or step.repeat) and i + 1 < len(steps):
        return _walk(node, steps, i + 1, acc, root, fails)
    return None


def match(pattern: Pattern, root: fx.Node) -> Plan | str:
    """The pattern's Plan for `root`, or the reason it does not apply."""
    fails = _Failures()
    acc = _walk(root, pattern.steps, 0, [], root, fails)
    if acc is None:
        return fails.reason
    try:
        return pattern.plan(acc)
    except NoMatch as exc:
        return str(exc)


# --------------------------------------------------------------------------------------------- steps
def _follow_pv(node: fx.Node):
    probs, v = node.args[0], node.args[1]
    if not (_is_4d(node) and _is_4d(probs) and _is_4d(v)):
        return "P @ V is not a 4-d (b, h, sq, skv) @ (b, h, skv, d) product"
    return [(probs, v)]


def _follow_passthrough(node: fx.Node):
    src = node.args[0]
    if node.target in DROPOUT:
        if node_arg(node, 2, "train", False) is not False:
            return "dropout in training mode"
        return [(src, None)]
    out, inp = tensor_val(node), tensor_val(src)
    if node.target in CASTS and out is not None and inp is not None:
        if not (out.is_floating_point() and inp.is_floating_point()):
            return f"cast from {inp.dtype} to {out.dtype}"
        if out.device != inp.device:
            return "device change inside the attention"
    if node.target in RESHAPES and not (out is not None and inp is not None and _same_shape(out, inp)):
        return "a reshape that changes the shape of the scores"
    return [(src, None)]


def _follow_softmax(node: fx.Node):
    val = tensor_val(node)
    dim = node_arg(node, 1, "dim")
    if val is None or not isinstance(dim, int) or dim % val.dim() != val.dim() - 1:
        return "softmax not over the last dim"
    return [(node.args[0], None)]


def _hiding_value(arg: Any, what: str) -> float:
    value = _scalar(arg, what)
    if not value <= HIDDEN_AT_MOST:  # NaN fails too
        raise NoMatch(f"{what} {value} is not a mask value (need <= {HIDDEN_AT_MOST:g} or -inf)")
    return value


def _follow_mask(node: fx.Node):
    """Which operand carries the scores, and the MaskPart the op applies."""
    try:
        if node.target in MASKED_FILL:
            scores, mask, value = node.args[0], node.args[1], node.args[2]
            return [(scores, MaskPart("fill", mask, _hiding_value(value, "masked_fill value")))]
        if node.target in ADD:
            if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
                return "add with alpha"
            a, b = node.args[0], node.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return "scores plus a constant (not a mask)"
            return [(x, MaskPart("add", y)) for x, y in ((a, b), (b, a)) if _is_4d(x)]
        if node.target in WHERE:
            cond, a, b = node.args[0], node.args[1], node.args[2]
            choices = []
            if isinstance(a, fx.Node) and _is_4d(a) and not _is_scalar_like(a):
                choices.append((a, MaskPart("keep", cond, _hiding_value(b, "where fill value"))))
            if isinstance(b, fx.Node) and _is_4d(b) and not _is_scalar_like(b):
                choices.append((b, MaskPart("hide", cond, _hiding_value(a, "where fill value"))))
            return choices or "where between two tensors (not a mask)"
    except NoMatch as exc:
        return str(exc)
    return "not a mask op"


def _is_scalar_like(node: Any) -> bool:
    t = tensor_val(node)
    return t is None or all(isinstance(d, int) and d == 1 for d in t.shape)


def _follow_scale(node: fx.Node):
    a, b = node.args[0], node.args[1]
    options = [(a, b)] if node.target in DIV else [(a, b), (b, a)]
    for scores, factor in options:
        if not (isinstance(scores, fx.Node) and _is_4d(scores)) or not _is_scalar_like(factor):
            continue
        if node.target in DIV and node_arg(node, 2, "rounding_mode") is not None:
            return "division with a rounding mode"
        try:
            value = _scalar(factor)
        except NoMatch as exc:
            return str(exc)
        if value == 0:
            return "scale is zero"
        return [(scores, 1.0 / value if node.target in DIV else value)]
    return f"scores {'divided' if node.target in DIV else 'multiplied'} by a tensor, not a scalar scale"


def _follow_qk(node: fx.Node):
    q, kt = node.args[0], node.args[1]
    if not (_is_4d(node) and _is_4d(q) and _is_4d(kt)):
        return "scores are not a 4-d q @ kᵀ (b, h, sq, skv)"
    return []


def _qk_mismatch(node: fx.Node) -> str | None:
    if node.op == "call_function" and node.target in MASK_OPS:
        return "a mask is applied before the scale (scores must be scaled first)"
    if node.op == "call_function" and node.target in OTHER_SCORE_OPS:
        return f"scores computed by {op_name(node, namespace=False)} (only a 4-d matmul q @ kᵀ is matched)"
    return None


TANH = aten_ops("tanh.default")


def _follow_softcap(node: fx.Node):
    """cap * tanh(scores / cap) (Gemma-2's attn_logit_softcapping): continue from scores, capture cap."""
    for t, c in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not (isinstance(t, fx.Node) and t.target in TANH and len(t.users) == 1 and _is_scalar_like(c)):
            continue
        inner = t.args[0]
        if not (isinstance(inner, fx.Node) and inner.target in SCALE_OPS and len(inner.users) == 1):
            continue
        try:
            cap = _scalar(c, "soft-cap")
            factor = _scalar(inner.args[1], "soft-cap divisor")
        except NoMatch as exc:
            return str(exc)
        divisor = factor if inner.target in DIV else (1.0 / factor if factor else 0.0)
        if cap <= 0 or not math.isclose(divisor, cap, rel_tol=1e-6):
            return f"tanh between the scores and softmax is not a soft-cap (cap {cap}, divisor {divisor})"
        if not _is_4d(inner.args[0]):
            return "soft-capped scores are not 4-d"
        return [(inner.args[0], cap)]
    return "not a soft-cap (cap * tanh(scores / cap))"


PV = Step("p @ v", MATMUL, _follow_pv)
PASS = Step("dropout/cast/same-shape view", PASSTHROUGH | RESHAPES, _follow_passthrough, repeat=True)
SOFTMAX_STEP = Step("softmax", SOFTMAX, _follow_softmax)
MASK = Step("mask", MASK_OPS, _follow_mask, repeat=True)
PRESCALE_MASK = Step("mask", MASK_OPS, _follow_mask, repeat=True)  # (s + bias) * c: a bias under the scale
SOFTCAP = Step("softcap", MUL, _follow_softcap, optional=True,
               applies=lambda node: any(isinstance(a, fx.Node) and a.target in TANH for a in node.args[:2]))
SCALE = Step("scale", SCALE_OPS, _follow_scale, repeat=True)
QK = Step("q @ kᵀ", MATMUL, _follow_qk, mismatch=_qk_mismatch)
SDPA_STEP = Step("sdpa", SDPA, lambda node: [])


# --------------------------------------------------------------------------------------------- q, k, v
def _skip_slices(node: Any, seen: list[fx.Node]) -> Any:
    while isinstance(node, fx.Node) and is_full_slice(node):
        seen.append(node)
        node = node.args[0]
    return node


def unrepeat_kv(node: fx.Node) -> tuple[fx.Node, int, list[fx.Node]]:
    """(original K/V, groups, nodes of the repeat) for repeat_kv / repeat_interleave(dim=1) spellings.

    Only repeats that put copy r of KV head j at head j * groups + r are undone -- the grouping the
    attention op uses (query head h reads KV head h // groups); `repeat` (tiling) is left alone.
    """
    out = tensor_val(node)
    if out is None or out.dim() != 4:
        return node, 1, []
    if node.target == aten.repeat_interleave.self_int:
        x, reps, dim = node.args[0], node.args[1], node_arg(node, 2, "dim")
        if isinstance(reps, int) and reps > 1 and dim in (1, -3) and _is_4d(x):
            return x, reps, [node]
        return node, 1, []
    if node.target not in RESHAPES:
        return node, 1, []
    seen = [node]
    expand = _skip_slices(node.args[0], seen)
    if not (isinstance(expand, fx.Node) and expand.target == aten.expand.default):
        return node, 1, []
    seen.append(expand)
    unsq = _skip_slices(expand.args[0], seen)
    if not (isinstance(unsq, fx.Node) and unsq.target == aten.unsqueeze.default and unsq.args[1] in (2, -3)):
        return node, 1, []
    seen.append(unsq)
    base = _skip_slices(unsq.args[0], seen)
    x, e = tensor_val(base), tensor_val(expand)
    if x is None or e is None or x.dim() != 4 or e.dim() != 5:
        return node, 1, []
    groups = e.shape[2]
    if not isinstance(groups, int) or groups < 2:
        return node, 1, []
    b, h, s, d = x.shape
    if not (all(_same(p, q) for p, q in zip(e.shape, (b, h, groups, s, d)))
            and all(_same(p, q) for p, q in zip(out.shape, (b, h * groups, s, d)))):
        return node, 1, []
    return base, groups, seen


def _untranspose(kt: fx.Node) -> tuple[fx.Node, bool]:
    """k (b, h, skv, d) behind kᵀ when kᵀ is its last-two-dims transpose; else (kᵀ, True)."""
    if kt.target == aten.transpose.int and _is_4d(kt.args[0]):
        dims = sorted(d % 4 for d in kt.args[1:3])
        if dims == [2, 3]:
            return kt.args[0], False
    if kt.target == aten.permute.default and [d % 4 for d in kt.args[1]] == [0, 1, 3, 2]:
        return kt.args[0], False
    return kt, True


def _exact_upcasts(q: fx.Node, k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """(q, k, the casts) behind casts that only widen q and k to float32 from v's half-precision dtype (GPT-J
    upcasts both before the scores): the products of the narrow values are exact in fp32, so the kernel's
    fp32 accumulation over them computes the same scores. (q, k, []) otherwise."""
    tv, narrow = tensor_val(v), []
    for t in (q, k):
        src = t.args[0] if t.op == "call_function" and t.target in CASTS and t.args else None
        ts, tt = (tensor_val(src) if isinstance(src, fx.Node) else None), tensor_val(t)
        if ts is None or tt is None or tv is None or tt.dtype != torch.float32 or ts.dtype != tv.dtype \
                or ts.dtype not in (torch.float16, torch.bfloat16) or not _same_shape(ts, tt):
            return q, k, []
        narrow.append(src)
    return narrow[0], narrow[1], [q, k]


def _absorb_q_scale(q: fx.Node) -> tuple[fx.Node, float, list[fx.Node]]:
    """q * c (or q / c) feeding only q·kᵀ: fold c into the scale and read the unscaled q."""
    if q.op == "call_function" and q.target in SCALE_OPS and len(q.users) == 1:
        options = [(q.args[0], q.args[1])] if q.target in DIV else [(q.args[0], q.args[1]), (q.args[1], q.args[0])]
        for x, factor in options:
            if isinstance(x, fx.Node) and _is_4d(x) and _is_scalar_like(factor):
                tx, tq = tensor_val(x), tensor_val(q)
                if not _same_shape(tx, tq) or tx.dtype != tq.dtype:
                    continue
                try:
                    value = _scalar(factor)
                except NoMatch:
                    return q, 1.0, []
                if value == 0:
                    return q, 1.0, []
                return x, (1.0 / value if q.target in DIV else value), [q]
    return q, 1.0, []


def _check_qkv(q: fx.Node, k: fx.Node, v: fx.Node, k_transposed: bool, root: fx.Node) -> None:
    tq, tk, tv = tensor_val(q), tensor_val(k), tensor_val(v)
    if any(t is None or t.dim() != 4 for t in (tq, tk, tv)):
        raise NoMatch("q, k, v are not 4-d (b, h, s, d)")
    kshape = list(tk.shape)
    if k_transposed:
        kshape[2], kshape[3] = kshape[3], kshape[2]
    b, hq, _, d = tq.shape
    if not (_same(kshape[0], b) and _same(tv.shape[0], b)):
        raise NoMatch("q, k, v batch sizes differ (broadcast batch)")
    if not (_same(kshape[1], tv.shape[1]) and _same(kshape[2], tv.shape[2])):
        raise NoMatch("k and v shapes differ")
    if not _same(kshape[3], d):
        raise NoMatch("q and k head dims differ")
    hkv = kshape[1]
    if not (isinstance(hq, int) and isinstance(hkv, int) and hkv > 0 and hq % hkv == 0):
        raise NoMatch(f"query heads {hq} not a multiple of key/value heads {hkv}")
    if not (tq.dtype == tk.dtype == tv.dtype):
        raise NoMatch(f"q, k, v dtypes differ ({tq.dtype}, {tk.dtype}, {tv.dtype})")
    out = tensor_val(root)
    expected = tuple(tq.shape[:-1]) + (tv.shape[-1],)
    if out is None or out.dim() != 4 or not all(_same(a, e) for a, e in zip(out.shape, expected)):
        raise NoMatch("output shape is not (b, hq, sq, dv)")
    if out.dtype != tq.dtype:
        raise NoMatch(f"output dtype {out.dtype} differs from q's {tq.dtype}")


def _kv_groups(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, int, list[fx.Node]]:
    k0, gk, kn = unrepeat_kv(k)
    v0, gv, vn = unrepeat_kv(v)
    if gk == gv and gk > 1:
        return k0, v0, gk, kn + vn
    return k, v, 1, []


# --------------------------------------------------------------------------------------------- plans
def _plan_explicit(acc: list[tuple[str, fx.Node, Any]]) -> Plan:
    root, v = acc[0][1], acc[0][2]
    qk = acc[-1][1]
    softmax = next(node for role, node, _ in acc if role == "softmax")
    softcap = next((detail for role, _, detail in acc if role == "softcap"), 0.0)
    # Walking back from the softmax, a mask found past a scale was applied before it: (s + bias) * c. Its
    # part records c, so an additive bias (ALiBi) is scaled with the scores.
    parts, scale, past_softcap = [], 1.0, False
    for role, node, detail in acc:
        if role == "scale":
            scale *= detail
        elif role == "softcap":
            past_softcap = True
        elif role == "mask":
            if past_softcap:
                raise NoMatch("a mask applied inside the soft-cap's tanh")
            if detail.value is not None and not detail.value * scale <= HIDDEN_AT_MOST:
                raise NoMatch(f"mask fill value {detail.value:g} times the scale {scale:g} after it no longer hides "
                              f"(need <= {HIDDEN_AT_MOST:g})")
            parts.append(dataclasses.replace(detail, scale=scale) if scale != 1.0 else detail)
    parts.reverse()
    q, q_factor, q_nodes = _absorb_q_scale(qk.args[0])
    scale *= q_factor
    k, k_transposed = _untranspose(qk.args[1])
    extra = q_nodes + ([qk.args[1]] if not k_transposed else [])
    groups = 1
    if not k_transposed:
        k, v, groups, kv_nodes = _kv_groups(k, v)
        extra += kv_nodes
    q, k, casts = _exact_upcasts(q, k, v)
    extra += casts
    _check_qkv(q, k, v, k_transposed, root)
    return Plan("explicit", root, softmax, q, k, v, scale, parts, False, k_transposed, groups,
                [node for _, node, _ in acc], extra, softcap)


def _plan_sdpa(acc: list[tuple[str, fx.Node, Any]]) -> Plan:
    node = acc[0][1]
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = node_arg(node, 3, "attn_mask")
    dropout_p = node_arg(node, 4, "dropout_p", 0.0)
    is_causal = node_arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    enable_gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise NoMatch(f"dropout_p={dropout_p} (training-mode dropout)")
    if not isinstance(is_causal, bool):
        raise NoMatch("is_causal is not a constant")
    if not all(_is_4d(t) for t in (q, k, v)):
        raise NoMatch("q, k, v are not 4-d (b, h, s, d)")
    d = tensor_val(q).shape[-1]
    if scale is None:
        if not isinstance(d, int):
            raise NoMatch("head dim is dynamic and no scale is given")
        scale = 1.0 / math.sqrt(d)
    else:
        scale = _scalar(scale)
    extra: list[fx.Node] = []
    groups = 1
    if enable_gqa:
        hq, hkv = tensor_val(q).shape[1], tensor_val(k).shape[1]
        groups = hq // hkv if isinstance(hq, int) and isinstance(hkv, int) and hkv else 1
    else:
        k, v, groups, extra = _kv_groups(k, v)
    parts = []
    if isinstance(mask, fx.Node):
        tm = tensor_val(mask)
        parts = [MaskPart("keep", mask, float("-inf")) if tm is not None and tm.dtype == torch.bool
                 else MaskPart("add", mask)]
    elif mask is not None:
        raise NoMatch("attn_mask is not a tensor")
    if is_causal and not _same(tensor_val(q).shape[2], tensor_val(k).shape[2]):
        raise NoMatch("is_causal with sq != skv (top-left aligned causal mask)")
    _check_qkv(q, k, v, False, node)
    return Plan("sdpa", node, node, q, k, v, scale, parts, is_causal, False, groups, [node], extra)


#: The pattern table: (name, steps walked backward from the root, plan/check); RULES' checks match them.
SDPA_PATTERN = Pattern("sdpa", (SDPA_STEP,), _plan_sdpa)
EXPLICIT_PATTERN = Pattern("explicit", (PV, PASS, SOFTMAX_STEP, PASS, MASK, SOFTCAP, SCALE, PASS, PRESCALE_MASK, SCALE,
                                        PASS, QK), _plan_explicit)
PATTERNS: tuple[Pattern, ...] = (SDPA_PATTERN, EXPLICIT_PATTERN)


# --------------------------------------------------------------------------------------------- masks
def _classify(plan: Plan, ctx: PassContext | None, cache: dict) -> MaskDecision:
    """The mask's form, proved from the graph that builds it (passes/masks.py), cached per mask."""
    tq, tk = tensor_val(plan.q), tensor_val(plan.k)
    sq, skv = tq.shape[2], (tk.shape[3] if plan.k_transposed else tk.shape[2])
    key = (tuple((p.kind, p.node, p.value, p.scale) for p in plan.parts), plan.is_causal, str(_expr(sq)),
           str(_expr(skv)), str(_expr(tq.shape[0])), str(_expr(tq.shape[1])))
    if key in cache:
        return cache[key]
    decision = masks.classify(plan.parts, is_causal=plan.is_causal, q_val=tq, k_val=tk,
                              k_transposed=plan.k_transposed)
    if decision.kind == "general" and "meta device" in decision.reason:
        decision = _structural(plan, _same(sq, skv)) or decision
    cache[key] = decision
    return decision


def _structural(plan: Plan, square: bool) -> MaskDecision | None:
    """GPT-2's `tril_buffer[:s, :s] == 0` filled with -inf, recognised without the buffer's values."""
    sq = tensor_val(plan.q).shape[2]
    if not square or plan.is_causal or len(plan.parts) != 1 or plan.parts[0].kind != "fill":
        return None
    eq = plan.parts[0].node
    if eq.target != aten.eq.Scalar or eq.args[1] != 0:
        return None
    node, slices = eq.args[0], []
    while isinstance(node, fx.Node) and node.target == aten.slice.Tensor:
        slices.append(node)
        node = node.args[0]
    buf = tensor_val(node)
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = fetch_attr(_gm(node), node.target)
    if not (isinstance(value, torch.Tensor) and value.device.type == "meta"):
        return None  # real values were there to evaluate: the evaluation's verdict stands
    if not (buf is not None and buf.dim() == 2
            and len(slices) == 2 and {node_arg(s, 1, "dim", 0) % 2 for s in slices} == {0, 1}
            and all(node_arg(s, 2, "start") in (None, 0) and node_arg(s, 4, "step", 1) == 1 for s in slices)
            and tensor_val(eq).dim() == 2 and all(_same(d, sq) for d in tensor_val(eq).shape)):  # buf[:sq, :sq]
        return None
    return MaskDecision("causal", True, evidence=f"assumed from the idiom `{node.target}[:s, :s] == 0` "
                        "(buffer values unavailable, e.g. on the meta device)")


# --------------------------------------------------------------------------------------------- rewriting
def _new_node(graph: fx.Graph, target, args: tuple, like: fx.Node, made: list[fx.Node],
              kwargs: dict | None = None) -> fx.Node:
    """A call_function node with meta["val"] from the op's fake implementation, recorded in `made`."""
    from torch._guards import detect_fake_mode

    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    vals, kwvals = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    flat = [v for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    fake_mode = detect_fake_mode(flat)
    if target == aten.matmul.default and all(v.dim() == 4 for v in vals):
        # (b, h, m, k) @ (b, h, k, n): the shape directly. Running matmul's decomposition on fake CUDA tensors
        # (torch 2.11) guards on strides and specialises the batch and sequence symbols to their hints.
        a, b = vals
        node.meta["val"] = a.new_empty((*a.shape[:-1], b.shape[-1]))
    elif fake_mode is not None:
        with fake_mode:
            node.meta["val"] = target(*vals, **kwvals)
    else:
        node.meta["val"] = target(*vals, **kwvals)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    made.append(node)
    return node


def _bias_from_parts(graph: fx.Graph, plan: Plan, like: fx.Node, made: list[fx.Node]) -> fx.Node:
    """One additive float mask (q's dtype) equal to the sum of the plan's mask parts."""
    dtype = tensor_val(plan.q).dtype
    terms = []
    for part in plan.parts:
        if part.kind == "add":
            term = part.node
            if part.scale != 1.0:
                term = _new_node(graph, aten.mul.Tensor, (term, part.scale), like, made)
        elif part.kind in ("fill", "hide"):  # a fill before a scale hides with the scaled value
            term = _new_node(graph, aten.where.Scalar, (part.node, part.value * part.scale, 0.0), like, made)
        else:
            term = _new_node(graph, aten.where.Scalar, (part.node, 0.0, part.value * part.scale), like, made)
        if tensor_val(term).dtype != dtype:
            term = _new_node(graph, aten._to_copy.default, (term,), like, made, {"dtype": dtype})
        terms.append(term)
    bias = terms[0]
    for term in terms[1:]:
        bias = _new_node(graph, aten.add.Tensor, (bias, term), like, made)
    return bias


def _meta_tensor(ctx: PassContext | None, val: torch.Tensor) -> torch.Tensor:
    if ctx is None:
        shape = [int(_concrete(d, _hints([val]))) for d in val.shape]
    else:
        shape = [max(1, int(ctx.evaluate(ctx.named(d)))) for d in val.shape]
    return torch.empty(shape, dtype=val.dtype, device="meta")


def _kernel(ctx: PassContext | None, node: fx.Node) -> tuple[str, str]:
    q, k, v, kpm, bias, causal, scale = node.args
    metas = [_meta_tensor(ctx, tensor_val(t)) if isinstance(t, fx.Node) else None for t in (q, k, v, kpm, bias)]
    features = {name: (_meta_tensor(ctx, tensor_val(value)) if isinstance(value, fx.Node) else value)
                for name, value in node.kwargs.items()}
    kernel, reason = attention_op.kernel_choice(*metas, causal=causal, scale=scale, **features)
    if kernel == "flash":  # the label: a dynamic query length is prefill (the op picks per call at run time)
        sq = tensor_val(q).shape[2]
        few = isinstance(sq, int) and sq <= attention_op.DECODE_MAX_QUERIES
        kernel = "flash_decode" if few else "flash_prefill"
    return kernel, reason


def _erase_dead(graph: fx.Graph, seeds: list[fx.Node]) -> list[fx.Node]:
    """Erase the seeds and their ancestors that no longer have users (never impure nodes)."""
    erased: list[fx.Node] = []
    gone: set[fx.Node] = set()
    work = list(seeds)
    while work:
        node = work.pop()
        if node in gone or node.users or node.op in ("placeholder", "output", "call_module"):
            continue
        eval_dropout = node.target in DROPOUT and node_arg(node, 2, "train", False) is False
        if node.op == "call_function" and not eval_dropout and node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        gone.add(node)
        erased.append(node)
        work.extend(inputs)
    return erased


def _bytes(ctx: PassContext | None, node: fx.Node) -> float:
    if ctx is None:
        return 0.0
    try:
        return ctx.evaluate(cost_pass.node_cost(ctx, node).bytes)
    except Exception:  # noqa: BLE001 - a cost rule failing must not stop the rewrite
        return 0.0


def rewrite(gm: fx.GraphModule, plan: Plan, decision: MaskDecision, ctx: PassContext | None,
            shared: dict | None = None) -> tuple[fx.Node, dict]:
    """Replace the plan's root with one attention node; erase what died. Returns (node, report entry).

    `shared` carries key-padding masks already built for earlier sites (rewrite sites in graph order).
    """
    shared = {} if shared is None else shared
    graph = gm.graph
    root = plan.root
    replaced = list(dict.fromkeys(plan.chain + plan.extra))
    before_cost = {node: _bytes(ctx, node) for node in replaced}
    new_nodes: list[fx.Node] = []
    with graph.inserting_before(root):
        k = plan.k
        if plan.k_transposed:
            k = _new_node(graph, aten.transpose.int, (plan.k, -2, -1), root, new_nodes)
        kpm = None
        source = decision.padding_source
        if source is not None and tensor_val(source).dtype == torch.bool:
            kpm = source
        elif source is not None:
            if source not in shared or shared[source].graph is not graph:
                shared[source] = _new_node(graph, aten.ne.Scalar, (source, 0), root, new_nodes)
            kpm = shared[source]
        bias, slopes = None, None
        causal, window = decision.causal, decision.window
        if decision.kind == "general":
            bias = _bias_from_parts(graph, plan, root, new_nodes)
            causal, window = plan.is_causal, 0  # never together with a mask in a valid sdpa call
        elif decision.alibi_slopes is not None:
            slopes = add_constant(gm, "alibi_slopes", torch.tensor(decision.alibi_slopes, dtype=torch.float32),
                                  root)
            new_nodes.append(slopes)
        made: list[fx.Node] = []
        features = {"window": window, "softcap": float(plan.softcap), "alibi_slopes": slopes}
        node = _new_node(graph, ATTENTION_OP, (plan.q, k, plan.v, kpm, bias, causal, float(plan.scale)), root,
                         made, {name: value for name, value in features.items() if value})
    root.replace_all_uses_with(node)
    seeds = root.all_input_nodes + [p.node for p in plan.parts] + replaced
    graph.erase_node(root)  # replaced outright (an sdpa node counts as random: its dropout_p is 0 here)
    erased = [root] + _erase_dead(graph, [n for n in seeds if n is not root])
    erased_set = set(erased)
    kernel, reason = _kernel(ctx, node)
    if decision.kind == "general" and reason == "general additive mask":
        reason = f"general additive mask ({decision.reason})"
    info = AttentionInfo(causal, float(plan.scale), decision.kind, plan.gqa_groups, kernel, reason if kernel == "sdpa"
                         else "", plan.pattern, decision.evidence, window, float(plan.softcap), slopes is not None)
    node.meta[ATTENTION_KEY] = info
    if ctx is not None:
        for n in [node] + new_nodes:
            try:
                n.meta[cost_pass.COST_KEY] = cost_pass.node_cost(ctx, n)
            except Exception:  # noqa: BLE001
                pass
    entry = {
        "node": node.name,
        "module": cost_pass.module_path(node),
        "pattern": plan.pattern,
        "causal": causal,
        "mask": decision.kind,
        "gqa_groups": plan.gqa_groups,
        "kernel": kernel,
        "reason": info.fallback_reason,
        "bytes_before": sum(b for n, b in before_cost.items() if n in erased_set),
        "bytes_after": sum(_bytes(ctx, n) for n in [node] + new_nodes),
    }
    return node, entry


# --------------------------------------------------------------------------------------------- sites
@dataclass
class Site:
    """One attention-like place in the graph, a softmax fed by a matmul or an sdpa call: a match of RULES.

    A rule's pattern finds it with the `root` its Pattern walks back from; the rule's check fills `plan` or
    `reason`; its rewrite records what it made (the attention node and its info, the bytes it moved)."""

    anchor: fx.Node
    kind: str  # softmax | sdpa
    module: str
    plan: Plan | None = None
    reason: str = ""
    root: fx.Node | None = None  # sdpa: the call itself; softmax: the P @ V matmul it feeds (None: none does)
    new_node: fx.Node | None = None  # rewritten: the fxopt attention node now in its place
    info: AttentionInfo | None = None  # rewritten: what the pass decided (also the node's meta)
    outcome: str = ""  # rewritten: why its mask stays general or the SDPA fallback runs ("" for neither)
    entry: dict | None = None  # rewritten: its PassResult.attention_rewrites entry (bytes before and after)

    @property
    def where(self) -> str:
        return self.module or self.anchor.name

    def record(self) -> dict:
        """Its PassResult.attention_sites entry, what `fxopt explain` and the report read."""
        done = self.new_node is not None
        return {"node": self.anchor.name, "module": self.module, "kind": self.kind, "matched": done,
                "pattern": self.plan.pattern if done else None, "reason": self.outcome if done else self.reason,
                "info": self.info, "new_node": self.new_node.name if done else None}


#: Ops a softmax's input may pass through on its way from the q·kᵀ matmul (for `explain`).
SCORE_PATH = PASSTHROUGH | MASK_OPS | SCALE_OPS | RESHAPES | aten_ops(
    "transpose.int", "permute.default", "expand.default", "unsqueeze.default", "squeeze.dim", "slice.Tensor",
    "sub.Tensor", "neg.default", "tanh.default")


def _attention_like(softmax: fx.Node, hops: int = 8) -> bool:
    """Does a matmul feed this softmax through at most `hops` score-path ops (casts, masks, scales, views)?"""
    frontier, seen = [softmax.args[0]], set()
    for _ in range(hops):
        nxt = []
        for node in frontier:
            if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
                continue
            seen.add(node)
            if node.target in MATMUL | OTHER_SCORE_OPS:
                return True
            if node.target in SCORE_PATH:
                nxt.extend(n for n in node.all_input_nodes if tensor_val(n) is not None)
        frontier = nxt
    return False


# --------------------------------------------------------------------------------------------- 3-d helpers
BMM = aten_ops("bmm.default")
BADDBMM = aten_ops("baddbmm.default")


def _unmerged(node: Any) -> fx.Node | None:
    """The 4-d (B, H, S, D) tensor that `node` = reshape to (B*H, S, D) merges the leading dims of, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in RESHAPES):
        return None
    src, out, inp = node.args[0], tensor_val(node), tensor_val(node.args[0])
    if out is None or inp is None or out.dim() != 3 or inp.dim() != 4:
        return None
    merged = _expr(inp.shape[0]) * _expr(inp.shape[1])
    if sympy.expand(merged - _expr(out.shape[0])) != 0 or not all(_same(a, b) for a, b in
                                                                  zip(inp.shape[2:], out.shape[1:])):
        return None
    return src


def _unmerged_kt(node: Any) -> fx.Node | None:
    """kᵀ as 4-d (B, H, D, S) from a (B*H, D, S) operand: transpose(merge(k)) or merge(kᵀ)."""
    if (isinstance(node, fx.Node) and node.target == aten.transpose.int and
            sorted(d % 3 for d in node.args[1:3]) == [1, 2]):
        k = _unmerged(node.args[0])
        return None if k is None else ("transpose", k)
    kt = _unmerged(node)
    return None if kt is None else ("as_is", kt)


def _from_softmax(node: Any) -> bool:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in PASSTHROUGH:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target in SOFTMAX


def _positions(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(gm.graph.nodes)}


# --------------------------------------------------------------------------------------------- 3-d products
@dataclass
class Product:
    """A 3-d batched product (bmm / baddbmm over (b*h, s, d) views) and the 4-d operands BATCHED_RULES read."""

    node: fx.Node
    p: fx.Node | None = None  # P @ V: the 4-d probabilities and values behind the merged views
    v: fx.Node | None = None
    view: fx.Node | None = None  # scores: the view back to (b, h, sq, skv), replaced by the 4-d scores
    q: fx.Node | None = None
    kt: tuple[str, fx.Node] | None = None  # ("transpose", k) or ("as_is", kᵀ), 4-d
    alpha: float = 1
    beta: float = 1


def batched_pv(gm: fx.GraphModule) -> list[Product]:
    """bmm(merge(P), ·) where P is a softmax's output (through dropouts, casts, copies)."""
    return [Product(n, p=_unmerged(n.args[0])) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in BMM and _from_softmax(_unmerged(n.args[0]))]


def check_batched_pv(rw: Rewriter | None, m: Product) -> str | None:
    """V must be a merged 4-d tensor whose (b*h) rows split into the heads P's do, to pair up as 4-d."""
    m.v = _unmerged(m.node.args[1])
    if m.v is None:
        return "v is not a (b*h, s, d) view of a 4-d tensor"
    if not _same(tensor_val(m.p).shape[1], tensor_val(m.v).shape[1]):
        return "the (b*h) rows of p and v split into different heads"
    return None


def pv_to_4d(rw: Rewriter, m: Product) -> None:
    """bmm(merge(P), merge(V)) -> flatten(P @ V, 0, 1): the same (b*h, sq, d) values."""
    graph, node, made = rw.gm.graph, m.node, []
    with graph.inserting_before(node):
        out = _new_node(graph, aten.matmul.default, (m.p, m.v), node, made)  # (b, h, sq, d)
        flat = _new_node(graph, aten.flatten.using_ints, (out, 0, 1), node, made)  # (b*h, sq, d)
    node.replace_all_uses_with(flat)
    graph.erase_node(node)


def batched_scores(gm: fx.GraphModule) -> list[Product]:
    """Single-use bmm / baddbmm products that are not a softmax's P @ V (batched_pv's)."""
    return [Product(n) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in BMM | BADDBMM and len(n.users) == 1
            and not (n.target in BMM and _from_softmax(_unmerged(n.args[0])))]


def check_batched_scores(rw: Rewriter | None, m: Product) -> str | None:
    """view4(baddbmm(bias, q3, kᵀ3, beta, alpha)): a 4-d view with static heads, q and kᵀ merged from 4-d
    tensors of those heads, constant alpha and beta, a bias of (1 or b*h) rows."""
    node = m.node
    m.view = next(iter(node.users))
    out = tensor_val(m.view)
    if m.view.target not in RESHAPES or out is None or out.dim() != 4 or not isinstance(out.shape[1], int):
        return "not viewed back to 4-d (b, h, sq, skv) with a static head count"
    qi, ki = (1, 2) if node.target in BADDBMM else (0, 1)
    m.q, m.kt = _unmerged(node.args[qi]), _unmerged_kt(node.args[ki])
    if m.q is None or m.kt is None or not all(_same(tensor_val(t).shape[1], out.shape[1]) for t in (m.q, m.kt[1])):
        return "q's, k's and the scores' (b*h) rows do not split into the same heads"
    m.beta, m.alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in (m.beta, m.alpha)):
        return "alpha or beta is not a constant"
    if node.target in BADDBMM and m.beta != 0:
        tb, heads = tensor_val(node.args[0]), out.shape[1]
        if tb is None or tb.dim() != 3 or not (_same(tb.shape[0], 1) or sympy.expand(
                _expr(tb.shape[0]) - _expr(tensor_val(m.q).shape[0]) * heads) == 0):
            return "the bias is not a 3-d tensor of 1 or b*h rows"
    return None


def scores_to_4d(rw: Rewriter, m: Product) -> None:
    """view4(baddbmm(bias, q3, kᵀ3, beta, alpha)) -> alpha * (q @ kᵀ) + beta * bias, all (b, h, sq, skv)."""
    graph, node, view, made = rw.gm.graph, m.node, m.view, []
    with graph.inserting_before(view):
        how, k = m.kt
        if how == "transpose":
            k = _new_node(graph, aten.transpose.int, (k, -2, -1), view, made)  # (b, h, d, skv)
        scores = _new_node(graph, aten.matmul.default, (m.q, k), view, made)  # (b, h, sq, skv)
        if m.alpha != 1:
            scores = _new_node(graph, aten.mul.Tensor, (scores, m.alpha), view, made)
        if node.target in BADDBMM and m.beta != 0:
            bias, heads = node.args[0], tensor_val(view).shape[1]
            merged = _expr(tensor_val(m.q).shape[0]) * heads
            if sympy.expand(_expr(tensor_val(bias).shape[0]) - merged) == 0:
                bias = _new_node(graph, aten.unflatten.int, (bias, 0, [-1, heads]), view, made)  # (b, h, ., skv)
            if m.beta != 1:
                bias = _new_node(graph, aten.mul.Tensor, (bias, m.beta), view, made)
            scores = _new_node(graph, aten.add.Tensor, (scores, bias), view, made)
    view.replace_all_uses_with(scores)
    graph.erase_node(view)
    graph.erase_node(node)


#: 3-d batched attention (Bloom: baddbmm(alibi, q, kᵀ) on (B*H, S, D) views, viewed back to (B, H, Sq, Skv),
#: softmax, bmm with v) -> the 4-d matmuls RULES match. Exact: the same products, scale and bias.
BATCHED_RULES: tuple[Rule, ...] = (
    Rule("batched_pv", batched_pv, check_batched_pv, pv_to_4d),
    Rule("batched_scores", batched_scores, check_batched_scores, scores_to_4d),
)


def normalize_batched(gm: fx.GraphModule, ctx: PassContext | None = None) -> int:
    """BATCHED_RULES over gm, products in graph order; returns how many were rewritten. Their notes are not the
    pass's: a product left 3-d is reported at its attention site ("P @ V computed by bmm", "scores computed by
    baddbmm")."""
    position = _positions(gm)
    rw, _ = apply_rules(gm, ctx, BATCHED_RULES, lambda m: m.node.name, "attention",
                        order=lambda m: position[m.node], fake=False)
    count = sum(rw.counts[rule.name] for rule in BATCHED_RULES)
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


# --------------------------------------------------------------------------------------------- the rules
def sdpa_sites(gm: fx.GraphModule) -> list[Site]:
    """Every scaled_dot_product_attention call, its own root."""
    return [Site(n, "sdpa", cost_pass.module_path(n), root=n) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in SDPA]


def softmax_sites(gm: fx.GraphModule) -> list[Site]:
    """Every softmax a matmul feeds (within a few score-path ops), rooted at the P @ V matmul it feeds."""
    return [Site(n, "softmax", cost_pass.module_path(n), root=_pv_root(n)) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in SOFTMAX and _attention_like(n)]


def _pv_root(softmax: fx.Node) -> fx.Node | None:
    """The matmul the explicit Pattern walks back from to this softmax: the one its output reaches as the first
    operand through single-use dropouts, casts and same-shape reshapes (the walk refuses any other path)."""
    cur = softmax
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if user.op != "call_function" or not user.args or user.args[0] is not cur:
            return None
        if user.target in MATMUL:
            return user
        if user.target not in PASSTHROUGH | RESHAPES:
            return None
        cur = user
    return None


def check_sdpa(rw: Rewriter | None, site: Site) -> str | None:
    """The sdpa Pattern's Plan for the call, or why it does not apply (dropout, a traced flag, shapes, ...)."""
    return _planned(site, match(SDPA_PATTERN, site.root))


def check_explicit(rw: Rewriter | None, site: Site) -> str | None:
    """The explicit Pattern's Plan walked back from the softmax's P @ V, or the most telling reason none applies."""
    result = match(EXPLICIT_PATTERN, site.root) if site.root is not None else None
    if isinstance(result, Plan) and result.anchor is site.anchor:
        return _planned(site, result)
    return _planned(site, _softmax_reason(site.anchor, {site.root: result}))


def _planned(site: Site, result: Plan | str) -> str | None:
    """Record a match's Plan (None: rewrite it) or its refusal (returned: the reason)."""
    if isinstance(result, Plan):
        site.plan = result
        return None
    site.reason = result
    return result


def _softmax_reason(softmax: fx.Node, tried: dict) -> str:
    """Why no Plan covers this softmax: what its output goes to, or the explicit Pattern's refusal at that
    matmul (`tried`: results already matched, by root)."""
    if _follow_softmax(softmax) == "softmax not over the last dim":
        return "softmax not over the last dim"
    cur = softmax
    while len(cur.users) == 1 and next(iter(cur.users)).target in PASSTHROUGH:
        cur = next(iter(cur.users))
    users = list(cur.users)
    if len(users) > 1:
        return "the attention probabilities are also used outside the attention (e.g. returned)"
    if users and users[0].target in OTHER_SCORE_OPS:
        return f"P @ V computed by {op_name(users[0], namespace=False)} (only a 4-d matmul is matched)"
    if not users:
        return "no matmul with v after softmax (its output is unused)"
    if users[0].target not in MATMUL or users[0].args[0] is not cur:
        return f"no matmul with v after softmax (its output goes to {op_name(users[0], namespace=False)})"
    result = tried[users[0]] if users[0] in tried else match(EXPLICIT_PATTERN, users[0])
    return result if isinstance(result, str) else ""


def rewrite_site(rw: Rewriter, site: Site) -> None:
    """The site's Plan -> one fxopt attention node, its mask classified first (rw.memo: forms cached per mask,
    key-padding masks built once for every site that reads them); the SDPA fallback is counted and noted."""
    decision = _classify(site.plan, rw.ctx, rw.memo.setdefault("attention.mask_forms", {}))
    site.new_node, site.entry = rewrite(rw.gm, site.plan, decision, rw.ctx, rw.memo.setdefault("attention.kpm", {}))
    site.info = site.new_node.meta[ATTENTION_KEY]
    site.outcome = decision.reason or site.info.fallback_reason
    if site.info.kernel == "sdpa":
        rw.count("fallback")
        rw.notes.append(f"{site.where}: SDPA fallback: {site.info.fallback_reason}")


def _unmatched(rule: Rule, site: Site, reason: str) -> str:
    return f"{site.where}: attention-like {site.kind} not rewritten: {reason}"


#: One rule per attention form, named as its Pattern (so PassResult.counts has a count per PATTERNS name). Sites a
#: check leaves are counted "unmatched" and noted with the reason; rewrites on the SDPA fallback count "fallback".
RULES: tuple[Rule, ...] = (
    Rule("sdpa", sdpa_sites, check_sdpa, rewrite_site, refused="unmatched"),
    Rule("explicit", softmax_sites, check_explicit, rewrite_site, refused="unmatched"),
)


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every attention-like site in graph order with its Plan, or the reason none applies: what RULES' patterns
    and checks decide, without rewriting anything."""
    sites = []
    for rule in RULES:
        for site in rule.pattern(gm):
            rule.check(None, site)
            sites.append(site)
    position = _positions(gm)
    return sorted(sites, key=lambda site: position[site.anchor])


# --------------------------------------------------------------------------------------------- the pass
def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace every recognised attention with one fxopt attention node; report the rest.

    RULES run through the shared engine: every site decided on the graph as found (after the 3-d products are
    viewed as 4-d), then rewritten or noted in graph order -- sites do not overlap, and the order names the new
    nodes and places a key-padding mask shared by several sites before the first of them."""
    normalized = normalize_batched(gm, ctx)
    position = _positions(gm)
    rw, notes = apply_rules(gm, ctx, RULES, None, "attention", order=lambda site: position[site.anchor],
                            note=_unmatched, keys=("fallback",), fake=False)
    sites = [site for _, site, _ in rw.log]
    if normalized:
        notes.append(f"{normalized} 3-d batched (b*h, s, d) products viewed as 4-d (b, h, s, d) to be matched")
    changed = bool(normalized) or any(rw.counts[rule.name] for rule in RULES)
    if changed:
        finish(gm)
    return PassResult(changed=changed, notes=notes, counts=rw.counts, attention_sites=[s.record() for s in sites],
                      attention_rewrites=[s.entry for s in sites if s.entry is not None])


__all__ = [
    "ATTENTION_KEY",
    "AttentionInfo",
    "BATCHED_RULES",
    "MaskDecision",
    "MaskPart",
    "NoMatch",
    "PATTERNS",
    "Pattern",
    "Plan",
    "RULES",
    "Site",
    "Step",
    "find_sites",
    "match",
    "rewrite",
    "run",
    "unrepeat_kv",
]
