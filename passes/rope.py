"""RoPE pass: the traced rotary position embedding -> one fxopt::rope call (codegen/rope.py).

As traced, `x * cos + rotate_half(x) * sin` is two slices, a neg, a cat, two muls and an add: the fusion
codegen cannot fuse slice/neg/cat, so each application runs three or four kernels (more HBM passes over q
and k in prefill, a string of ~2 us launches per layer in decode). Three rules, rows of RULES:

  rope              add(mul(x, cos), mul(rotate_half(x), sin)), rotate_half(x) = cat([neg(x[..., h:]),
                    x[..., :h]], -1), h = d / 2 -> fxopt::rope(x, cos, sin); or GPT-J's rotate_every_two(x) =
                    flatten(stack([neg(x[..., 1::2]), x[..., ::2]], -1), -2) -> fxopt::rope(x, cos, sin, True),
                    through slices that keep the whole tensor (x[:, 0:]). Either operand order of the add and
                    of each mul; slice bounds None/0 and INT_MAX/d; dim -1 or rank - 1; the negation as
                    aten.neg or a multiply by -1. cos/sin must broadcast to x without changing its shape, and the
                    intermediates must have no other users (else nothing is saved). A near-match is left with
                    a note saying why (e.g. halves swapped without the negation: not rotate_half).
  rope_partial      cat([fxopt::rope(x[..., :r], cos, sin), x[..., r:]], -1) -> fxopt::rope(x, cos, sin) with
                    tables of r columns: partial rotary (GPT-NeoX, Phi, StableLM) as one pass over x instead
                    of a rope kernel and a cat.
  rope_cache_write  fxopt::cache_write(cache, fxopt::rope(x, cos, sin), pos), the rope read only by the write
                    (K in a decode program) -> fxopt::rope_cache_write(cache, x, cos, sin, pos): the rotated
                    rows go straight into the static cache.

The new node's meta["val"] comes from the op's fake implementation (x's dim order, dense, eager's dtype);
when its strides differ from the add's, the layout ops downstream are re-run over them and the match is
left if one of them (a view) fails. Results change only by rounding: the kernel computes in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.codegen import rope as rope_codegen
from fxopt.nodes import INT_MAX
from fxopt.nodes import node_val as _val
from fxopt.passes import cost as cost_pass
from fxopt.passes.infra import PassContext, PassResult
from fxopt.passes.rules import Rewriter, Rule, run_rules

aten = torch.ops.aten
ADD, MUL, NEG, CAT, SLICE = aten.add.Tensor, aten.mul.Tensor, aten.neg.default, aten.cat.default, aten.slice.Tensor
STACK, FLATTEN = aten.stack.default, aten.flatten.using_ints
ROPE = torch.ops.fxopt.rope.default
ROPE_CACHE_WRITE = torch.ops.fxopt.rope_cache_write.default
CACHE_WRITE = torch.ops.fxopt.cache_write.default


# ------------------------------------------------------------------------------------------ reading the graph
def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _bound(value, d: int, default: int) -> int | None:
    """A slice bound as Python clamps it to [0, d] (negative counts from the end), None if not constant."""
    if value is None:
        return default
    if not isinstance(value, int):
        return None
    return min(max(value + d if value < 0 else value, 0), d)


def _last_dim_slice(node) -> tuple[fx.Node, int, int] | None:
    """(source, start, end) for slice(source, last dim, start, end, step 1) with constant bounds, normalised to
    [0, d] (None/INT_MAX -> d, negative from the end); else None."""
    if not _is(node, SLICE) or not isinstance(_val(node.args[0]), torch.Tensor):
        return None
    src, val = node.args[0], _val(node.args[0])
    given = dict(zip(("dim", "start", "end", "step"), node.args[1:]), **node.kwargs)
    dim, step, d = given.get("dim", 0), given.get("step", 1), val.shape[-1]
    if not isinstance(d, int) or not isinstance(dim, int) or dim % val.dim() != val.dim() - 1 or step != 1:
        return None
    start, end = _bound(given.get("start"), d, 0), _bound(given.get("end"), d, d)
    if start is None or end is None:
        return None
    return src, start, end


def _whole(node) -> fx.Node:
    """node through slices that keep every element (x[:, 0:], as GPT-J's indexing traces): their source."""
    while _is(node, SLICE) and len(node.args) >= 2 and not node.kwargs and all(
            a == b for a, b in zip(node.args[2:], (0, INT_MAX, 1))) and len(node.args) <= 5:
        node = node.args[0]
    return node


def _every_other(node) -> tuple[fx.Node, int] | None:
    """(source, start) for source[..., start::2] over the last dim (start 0 or 1, to the end); else None."""
    if not _is(node, SLICE) or not isinstance(_val(node.args[0]), torch.Tensor):
        return None
    val = _val(node.args[0])
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    if node.kwargs or not isinstance(dim, int) or dim % val.dim() != val.dim() - 1 or step != 2 \
            or start not in (0, 1, None) or end not in (None, INT_MAX):
        return None
    return _whole(node.args[0]), start or 0


def _negated(node) -> tuple[fx.Node, fx.Node] | None:
    """(operand, the negation node) for neg(a), mul(a, -1) or mul(-1, a); else None."""
    if _is(node, NEG):
        return node.args[0], node
    if _is(node, MUL) and len(node.args) == 2:
        a, b = node.args
        if isinstance(b, (int, float)) and b == -1 and isinstance(a, fx.Node):
            return a, node
        if isinstance(a, (int, float)) and a == -1 and isinstance(b, fx.Node):
            return b, node
    return None


def _other(mul: fx.Node, operand) -> Any:
    """The other operand of a two-operand mul, or None when `operand` is not one of them."""
    a, b = mul.args[:2]
    return b if a is operand else a if b is operand else None


# ------------------------------------------------------------------------------------------ rule: rope
@dataclass
class Reading:
    """One way to read add(direct, rotated): direct = x * cos, rotated = cat(...) * sin."""

    direct: fx.Node
    rotated: fx.Node
    cat: fx.Node  # rotate_half's cat, or rotate_every_two's flatten
    sin: Any
    x: fx.Node | None = None
    cos: Any = None
    inner: list[fx.Node] = field(default_factory=list)  # nodes that go when the match is rewritten
    only_reads: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (node, its one reader) pairs
    slices: list[fx.Node] = field(default_factory=list)  # x's slices, dropped when unused
    adjacent: bool = False  # rotate_every_two: pairs (2i, 2i + 1)


@dataclass
class RopeMatch:
    add: fx.Node
    readings: list[Reading]
    chosen: Reading | None = None
    vals: dict[fx.Node, Any] = field(default_factory=dict)  # downstream layout values (new strides)


def rope_candidates(gm: fx.GraphModule) -> list[RopeMatch]:
    """Every add of two muls where one mul reads a cat: the shape of x * cos + rotate_half(x) * sin."""
    out = []
    for node in gm.graph.nodes:
        if not _is(node, ADD) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        readings = []
        for direct, rotated in (node.args, node.args[::-1]):
            if not (_is(direct, MUL) and _is(rotated, MUL) and len(rotated.args) == 2):
                continue
            for cat, sin in (rotated.args, rotated.args[::-1]):
                if _is(cat, CAT) or _is(cat, FLATTEN):
                    readings.append(Reading(direct, rotated, cat, sin))
        if readings:
            out.append(RopeMatch(node, readings))
    return out


def _read_rotation(r: Reading) -> str | None:
    """Fill r.x / r.cos / r.inner when r.cat is rotate_half(x) or rotate_every_two(x) and r.direct multiplies
    x; else why not."""
    if _is(r.cat, FLATTEN):
        return _read_every_two(r)
    parts = r.cat.args[0]
    dim = r.cat.args[1] if len(r.cat.args) > 1 else r.cat.kwargs.get("dim", 0)
    rank = _val(r.cat).dim() if isinstance(_val(r.cat), torch.Tensor) else 0
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not rank or dim % rank != rank - 1:
        return "the cat is not of two halves along the last dim"
    first, second = parts
    neg = _negated(first)
    if neg is None:
        if _last_dim_slice(first) is not None:
            return "the halves are swapped without negating the first: not rotate_half"
        return "the first half of the cat is not a negated slice"
    upper, lower = _last_dim_slice(neg[0]), _last_dim_slice(second)
    if upper is None or lower is None or upper[0] is not lower[0]:
        return "the cat's halves are not last-dim slices of one tensor"
    x, d = upper[0], _val(upper[0]).shape[-1]
    if d % 2 or upper[1:] != (d // 2, d) or lower[1:] != (0, d // 2):
        return f"the slices {lower[1:]} and {upper[1:]} are not the halves (0, {d // 2}) and ({d // 2}, {d})"
    cos = _other(r.direct, x)
    if cos is None:
        return f"`{r.direct.name}` does not multiply the rotated tensor `{x.name}`"
    r.x, r.cos = x, cos
    r.inner = [r.direct, r.rotated, r.cat, neg[1]]
    r.only_reads = [(r.direct, None), (r.rotated, None), (r.cat, r.rotated), (neg[1], r.cat)]
    r.slices = [second, neg[0]]
    return None


def _read_every_two(r: Reading) -> str | None:
    """r.cat = flatten(stack([neg(x[..., 1::2]), x[..., ::2]], -1), -2): GPT-J's rotate_every_two."""
    stack = r.cat.args[0]
    flat_dims = tuple(r.cat.args[1:3]) + (-1,) * (3 - len(r.cat.args))
    rank = _val(r.cat).dim() if isinstance(_val(r.cat), torch.Tensor) else 0
    if not _is(stack, STACK) or not rank or [d % (rank + 1) for d in flat_dims] != [rank - 1, rank]:
        return "the flatten is not of a stack's last two dims"
    parts = stack.args[0]
    dim = stack.args[1] if len(stack.args) > 1 else 0
    if len(parts) != 2 or dim % (rank + 1) != rank:
        return "the stack is not of two parts along a new last dim"
    neg = _negated(parts[0])
    odd, even = (_every_other(neg[0]) if neg else None), _every_other(parts[1])
    if odd is None or even is None or odd[0] is not even[0] or (odd[1], even[1]) != (1, 0):
        return "the stacked parts are not -x[..., 1::2] and x[..., ::2] of one tensor"
    x = odd[0]
    cos = _other(r.direct, x)
    if cos is None:
        return f"`{r.direct.name}` does not multiply the rotated tensor `{x.name}`"
    r.x, r.cos, r.adjacent = x, cos, True
    r.inner = [r.direct, r.rotated, r.cat, stack, neg[1]]
    r.only_reads = [(r.direct, None), (r.rotated, None), (r.cat, r.rotated), (stack, r.cat), (neg[1], stack)]
    r.slices = [parts[1], neg[0]]
    return None


def _check_tables(r: Reading) -> str | None:
    for name, table in (("cos", r.cos), ("sin", r.sin)):
        val = _val(table)
        if not isinstance(val, torch.Tensor):
            return f"{name} is not a tensor"
        if not val.is_floating_point():
            return f"{name} is {val.dtype}"
    if not _val(r.x).is_floating_point():
        return f"x is {_val(r.x).dtype}"
    try:
        rope_codegen.check_inputs(_val(r.x), _val(r.cos), _val(r.sin))
    except ValueError as exc:
        return f"cos/sin not broadcastable to x: {exc}"
    return None


def _only_used_by(node: fx.Node, user: fx.Node) -> bool:
    return set(node.users) == {user}


def check_rope(rw: Rewriter, m: RopeMatch) -> str | None:
    """A reading that parses as rope, whose intermediates nothing else reads and whose fake value stands in
    for the add's (same shape and dtype; downstream views still valid over its strides)."""
    reasons = []
    for r in m.readings:
        reason = _read_rotation(r) or _check_tables(r)
        if reason is None:
            m.chosen = r
            break
        reasons.append(reason)
    if m.chosen is None:
        return reasons[0]
    r = m.chosen
    for node, user in r.only_reads:
        if not _only_used_by(node, user or m.add):
            return f"`{node.name}` is also used outside the rotation"
    vals = _stands_in(rw, m.add, _rope_args(r), "the add")
    if isinstance(vals, str):
        return vals
    m.vals = vals
    return None


def _stands_in(rw: Rewriter, old: fx.Node, args: tuple, what: str) -> dict[fx.Node, Any] | str:
    """The downstream layout values for fxopt::rope(*args) replacing `old` (empty when its strides are old's), or
    why it cannot: its fake value must have old's shape and dtype, and the views after old must hold over its
    strides."""
    before = _val(old)
    try:
        new = rw.fake_run(ROPE, args)
    except Exception as exc:  # noqa: BLE001 - the op cannot stand in: leave the match
        return f"fake run failed: {type(exc).__name__}: {exc}"
    if new.dtype != before.dtype or new.dim() != before.dim() or not all(
            statically_known_true(a == b) for a, b in zip(new.shape, before.shape)):
        return f"fxopt::rope gives {tuple(new.shape)} {new.dtype}, {what} {tuple(before.shape)} {before.dtype}"
    if all(statically_known_true(a == b) for a, b in zip(new.stride(), before.stride())):
        return {}
    return rw.downstream_vals({old: new})


def _rope_args(r: Reading) -> tuple:
    """fxopt::rope's arguments for a reading: (x, cos, sin), and True for adjacent pairs."""
    return (r.x, r.cos, r.sin, True) if r.adjacent else (r.x, r.cos, r.sin)


def rewrite_rope(rw: Rewriter, m: RopeMatch) -> None:
    r = m.chosen
    with rw.gm.graph.inserting_before(m.add):
        node = rw.call(ROPE, _rope_args(r), m.add)
    m.add.replace_all_uses_with(node)
    rw.apply_vals(m.vals)
    rw.gm.graph.erase_node(m.add)
    rw.drop_if_unused(*r.inner)
    _drop_slices(rw, r.slices)


def _drop_slices(rw: Rewriter, pieces: list[fx.Node]) -> None:
    """Erase the slices nothing reads any more, then the whole-tensor slices they were taken through."""
    for piece in pieces:
        while _is(piece, SLICE) and not piece.users:
            source = piece.args[0]
            rw.gm.graph.erase_node(piece)
            piece = source


# ------------------------------------------------------------------------------------------ rule: rope_partial
@dataclass
class PartialMatch:
    cat: fx.Node
    rope: fx.Node
    vals: dict[fx.Node, Any] = field(default_factory=dict)


def partial_candidates(gm: fx.GraphModule) -> list[PartialMatch]:
    """Every cat whose first part is a fxopt::rope: the shape of cat([rope(x[..., :r]), x[..., r:]], -1)."""
    return [PartialMatch(n, n.args[0][0]) for n in gm.graph.find_nodes(op="call_function", target=CAT)
            if isinstance(n.args[0], (list, tuple)) and n.args[0] and _is(n.args[0][0], ROPE)]


def _partial_source(m: PartialMatch) -> tuple[fx.Node | None, str | None]:
    """(x, None) when the cat joins rope(x[..., :r], cos, sin) with x[..., r:] along the last dim, r the tables'
    width; (None, why not) otherwise."""
    parts = m.cat.args[0]
    dim = m.cat.args[1] if len(m.cat.args) > 1 else m.cat.kwargs.get("dim", 0)
    rank = _val(m.cat).dim()
    if len(parts) != 2 or dim % rank != rank - 1:
        return None, "the cat is not of two parts along the last dim"
    rotated, passed = _last_dim_slice(m.rope.args[0]), _last_dim_slice(parts[1])
    if rotated is None or passed is None or _whole(rotated[0]) is not _whole(passed[0]):
        return None, "the rotated and passed parts are not last-dim slices of one tensor"
    x, d = _whole(rotated[0]), _val(rotated[0]).shape[-1]
    r = rotated[2]
    if rotated[1] != 0 or passed[1:] != (r, d) or not 0 < r < d:
        return None, f"the slices {rotated[1:]} and {passed[1:]} do not split the last dim as (0, r), (r, {d})"
    cos, sin = (_val(t) for t in m.rope.args[1:3])
    if not all(isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == r for t in (cos, sin)):
        return None, f"cos/sin are not {r} columns wide"
    return x, None


def check_partial(rw: Rewriter, m: PartialMatch) -> str | None:
    x, reason = _partial_source(m)
    if reason is not None:
        return reason
    if not _only_used_by(m.rope, m.cat):
        return f"`{m.rope.name}` is also read outside the cat"
    vals = _stands_in(rw, m.cat, (x, *m.rope.args[1:]), "the cat")
    if isinstance(vals, str):
        return vals
    m.vals = vals
    return None


def rewrite_partial(rw: Rewriter, m: PartialMatch) -> None:
    x, _ = _partial_source(m)
    with rw.gm.graph.inserting_before(m.cat):
        node = rw.call(ROPE, (x, *m.rope.args[1:]), m.cat)
    m.cat.replace_all_uses_with(node)
    rw.apply_vals(m.vals)
    pieces = [m.rope.args[0], m.cat.args[0][1]]
    rw.gm.graph.erase_node(m.cat)
    rw.drop_if_unused(m.rope)
    _drop_slices(rw, pieces)


# ------------------------------------------------------------------------------------------ rule: rope_cache_write
@dataclass
class CacheWriteMatch:
    write: fx.Node
    rope: fx.Node


def cache_write_candidates(gm: fx.GraphModule) -> list[CacheWriteMatch]:
    """fxopt::cache_write nodes whose new rows come straight from a fxopt::rope."""
    return [CacheWriteMatch(n, n.args[1]) for n in gm.graph.nodes if _is(n, CACHE_WRITE) and _is(n.args[1], ROPE)]


def check_cache_write(rw: Rewriter, m: CacheWriteMatch) -> str | None:
    if not _only_used_by(m.rope, m.write):
        return f"`{m.rope.name}` is also read elsewhere (e.g. by attention over the fresh K)"
    if len(m.write.args) != 3 or m.write.kwargs or len(m.rope.args) not in (3, 4) or m.rope.kwargs:
        return "unexpected arguments"
    return None


def rewrite_cache_write(rw: Rewriter, m: CacheWriteMatch) -> None:
    cache, _, pos = m.write.args
    x, cos, sin, *adjacent = m.rope.args
    with rw.gm.graph.inserting_before(m.write):
        node = rw.gm.graph.call_function(ROPE_CACHE_WRITE, (cache, x, cos, sin, pos, *adjacent))
    node.meta["val"] = None
    for key in ("nn_module_stack", "stack_trace"):
        if key in m.write.meta:
            node.meta[key] = m.write.meta[key]
    if rw.costed:
        node.meta[cost_pass.COST_KEY] = cost_pass.node_cost(rw.ctx, node)
    rw.gm.graph.erase_node(m.write)
    rw.gm.graph.erase_node(m.rope)


# ------------------------------------------------------------------------------------------ the table
RULES: tuple[Rule, ...] = (
    Rule("rope", rope_candidates, check_rope, rewrite_rope),
    Rule("rope_partial", partial_candidates, check_partial, rewrite_partial),
    Rule("rope_cache_write", cache_write_candidates, check_cache_write, rewrite_cache_write),
)


def _describe(match) -> str:
    return match.add.name if isinstance(match, RopeMatch) else match.cat.name if isinstance(match, PartialMatch) \
        else match.write.name


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Apply RULES; counts per rule (matches rewritten); a note per near-match left."""
    return run_rules(gm, ctx, RULES, _describe, "rope")[0]
