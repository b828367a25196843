"""KV-cache insertion: derive a prefill program and a decode program from a cache-less causal LM.

Input: the captured graph `input_ids [b, s] -> logits [b, s, vocab]`, after the attention pass turned
each attention into one `torch.ops.fxopt.attention` node (a raw `aten.scaled_dot_product_attention`
left in the graph is normalised here the same way).

1. Causal proof, attention by attention. A node holding causal=True and no mask is causal. A mask built
   from sizes and buffers only (tril buffers, arange comparisons, HF's mask functions) is evaluated at two
   small sizes and, when it is the causal pattern, dropped in favour of causal=True; then it is dead code.
   Anything else (no mask and causal=False, a mask read from an input) is bidirectional: refused.
2. Token-axis propagation over the live graph (`analyze`): every tensor value carries the dims that are
   token axes. Pointwise ops, linears and norms over the feature dims keep them; views and permutes move
   them (found by element strides and the symbolic size `s`); an attention output takes its query's token
   axis. Reducing, scanning, slicing or concatenating along a token axis mixes positions: refused, naming
   the node. So does using the sequence length as a value.
3. Position sources: `arange` over `s` and slices `[:s]` of buffers (position tables, RoPE cos/sin, mask
   buffers). Everything computed from them alone is the *position subgraph*. In both programs it runs on
   per-row positions under `torch.vmap`: an arange becomes the row's positions, a table slice an
   `index_select` of the table by them (never a slice with a data-dependent start: the decode step must be
   capturable in a CUDA graph). Each row's positions are its slots minus its left-padding count.
4. Programs (`KVPrograms`), both plain GraphModules over the same weights:
     prefill(input_ids, slot, kv_start, key_mask, *caches) -> logits
         the full forward; each attention first writes its K and V (after RoPE, GQA not repeated) into
         the static caches at [slot, slot + s) and attends over the fresh K, V (causal, key_mask for
         left padding).
     decode(input_ids, slot, kv_start, *caches) -> logits
         the new tokens only; each attention writes its new K/V rows at `slot` and runs
         `fxopt::cached_attention` over the cache, row b's keys in [kv_start[b], slot + n).
   `slot` is a 0-dim int64 device tensor, kv_start a (b,) int64 device tensor (= left-padding counts):
   nothing in the decode step depends on a host value, so it replays from a CUDA graph as `slot` grows.
"""

from __future__ import annotations

import dataclasses
import operator
import os
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

import fxopt.codegen.attention_op  # noqa: F401  (registers torch.ops.fxopt.*)
from fxopt import opnames
from fxopt.errors import KVCacheError  # noqa: F401  (raised here, defined with the other refusals)
from fxopt.nodes import INT_MAX, aten_packets, fetch_attr, node_arg, size_expr, tensor_val
from fxopt.nodes import meta_val as _val
from fxopt.nodes import op_name as _op_name
from fxopt.passes import masks
from fxopt.passes.infra import PassContext, PassResult, add_constant, finish
from fxopt.passes.rules import Rewriter, Rule, apply_rules
from fxopt.passes.tensor_parallel import ALL_GATHER, ALL_REDUCE, WAIT

aten = torch.ops.aten
ATTENTION = torch.ops.fxopt.attention.default
CACHED_ATTENTION = torch.ops.fxopt.cached_attention.default
CACHE_WRITE = torch.ops.fxopt.cache_write.default
SDPA = aten.scaled_dot_product_attention.default


def _refuse(node: fx.Node, why: str, hint: str = "") -> KVCacheError:
    where = _source_line(node)
    msg = f"kv_cache: cannot insert a KV cache: node `{node.name}` ({_op_name(node)}) {why}"
    if where:
        msg += f"\n  model code:\n    {where}"
    if hint:
        msg += f"\n  {hint}"
    return KVCacheError(msg)


def _source_line(node: fx.Node) -> str:
    """The model's source lines that produced `node`: the innermost two frames of its stack trace that are
    the model's own code (torch's and fxopt's frames skipped; all frames when none is left)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    frames = [(lines[i], lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else "")
              for i in range(len(lines)) if lines[i].startswith("File ")]
    user = [f for f in frames if not _library_frame(f[0])] or frames
    return "\n    ".join(f"{where}: {code}" if code else where for where, code in user[-2:])[:600]


def _library_frame(where: str) -> bool:
    """A `File "...", line N, in f` header of torch's own sources or of fxopt's passes and runtime."""
    path = where.split('"')[1] if where.count('"') >= 2 else where
    return os.path.abspath(path).startswith(_LIBRARY_DIRS)


_LIBRARY_DIRS = tuple(os.path.join(os.path.dirname(os.path.abspath(f)), "") for f in (
    torch.__file__, __file__, fxopt.codegen.attention_op.__file__, fxopt.__file__))


# ------------------------------------------------------------------------------------------------
# Small helpers over node metadata
# ------------------------------------------------------------------------------------------------


def _shape(node) -> tuple[sympy.Expr, ...]:
    return tuple(size_expr(d) for d in _val(node).shape)


def _rank(node) -> int:
    return _val(node).dim()


def _arg_expr(arg) -> sympy.Expr | None:
    """A size argument (int, SymInt node or meta SymInt) as a sympy expression."""
    if isinstance(arg, fx.Node):
        value = _val(arg)
        if isinstance(value, bool):  # a node's boolean value reads as the integer it is
            value = int(value)
        return size_expr(value) if isinstance(value, (int, torch.SymInt)) else None
    if isinstance(arg, (int, torch.SymInt)) and not isinstance(arg, bool):
        return size_expr(arg)
    return None


def _equal(a, b) -> bool:
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _flat_nodes(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: found.append(n))
    return found


def _packet(node: fx.Node):
    target = node.target
    return target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target


# ------------------------------------------------------------------------------------------------
# 1. Attention nodes and the causal proof
# ------------------------------------------------------------------------------------------------


def _sdpa_args(node: fx.Node) -> dict[str, Any]:
    """An aten.scaled_dot_product_attention call's arguments by name, defaults filled in."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    bound = dict(defaults)
    bound.update(dict(zip(names, node.args)))
    bound.update(node.kwargs)
    return bound


def _sdpa_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The raw sdpa calls the attention pass left (or that ran without it)."""
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target == SDPA]


def _check_sdpa(rw: Rewriter, node: fx.Node) -> str | None:
    """Every sdpa call is normalised; one with attention dropout refuses the whole model."""
    dropout_p = _sdpa_args(node)["dropout_p"]
    if dropout_p:
        raise _refuse(node, f"has attention dropout p={dropout_p}", "call the model in eval mode")
    return None


def _normalise_sdpa(rw: Rewriter, node: fx.Node) -> None:
    _sdpa_to_attention(rw.gm, node)


def _sdpa_to_attention(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """aten.scaled_dot_product_attention -> fxopt::attention (same semantics, mask as attn_bias)."""
    bound = _sdpa_args(node)
    q, k, v = bound["query"], bound["key"], bound["value"]
    scale = bound["scale"] if bound["scale"] is not None else _val(q).shape[-1] ** -0.5
    mask = bound["attn_mask"]
    kpm, bias = None, mask
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(ATTENTION, (q, k, v, kpm, bias, bool(bound["is_causal"]), float(scale)))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


#: Keyword arguments of fxopt::attention / cached_attention beyond the mask: carried into both programs.
ATTENTION_FEATURES = ("window", "softcap", "alibi_slopes")


def _attention_args(node: fx.Node) -> dict[str, Any]:
    names = ("q", "k", "v", "key_padding_mask", "attn_bias", "causal", "scale") + ATTENTION_FEATURES
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    bound.setdefault("key_padding_mask", None)
    bound.setdefault("attn_bias", None)
    return bound


def _features(args: dict[str, Any], env: dict | None = None) -> dict[str, Any]:
    """The node's window / softcap / ALiBi arguments that are set, mapped through `env` (nodes of a copy)."""
    out = {}
    for name in ATTENTION_FEATURES:
        value = args.get(name)
        if value is None or value == 0:
            continue
        out[name] = env[value] if env is not None and isinstance(value, fx.Node) else value
    return out


def _mask_form(node: fx.Node, args: dict[str, Any]):
    """The proved form (passes/masks.py) of an attention node's remaining mask, or a refusal naming it."""
    parts = []
    if args["key_padding_mask"] is not None:
        parts.append(masks.MaskPart("keep", args["key_padding_mask"], float("-inf")))
    bias = args["attn_bias"]
    if bias is not None:
        if not isinstance(bias, fx.Node):
            raise _refuse(node, f"has a constant mask {bias!r} kv_cache cannot interpret")
        boolean = _val(bias).dtype == torch.bool
        parts.append(masks.MaskPart("keep" if boolean else "add", bias, float("-inf") if boolean else None))
    q, k = _val(args["q"]), _val(args["k"])
    form = masks.classify(parts, is_causal=bool(args["causal"]), q_val=q, k_val=k)
    name = (bias if bias is not None else args["key_padding_mask"]).name
    if form.kind == "general":
        raise _refuse(node, f"attends with mask `{name}`, which is not a causal mask kv_cache can prove "
                            f"({form.reason})", "only causal (decoder-only) models take a KV cache")
    if form.padding_source is not None:
        raise _refuse(node, f"attends with mask `{name}`, which is not a causal mask: it is computed from the "
                            f"values of input `{form.padding_source.target}` (padding), not from positions alone",
                      "capture with input_ids only: the generator applies padding itself")
    if not form.causal:
        raise _refuse(node, f"attends with mask `{name}`, which is not a causal mask: every output row depends "
                            "on later positions (bidirectional attention)",
                      "only causal (decoder-only) models take a KV cache")
    return form


@dataclass
class CausalMatch:
    """An fxopt attention node, its arguments by name and, once proved, its mask's form."""

    node: fx.Node
    args: dict[str, Any] = field(default_factory=dict)
    form: masks.MaskForm | None = None


def _attention_calls(gm: fx.GraphModule) -> list[CausalMatch]:
    return [CausalMatch(node) for node in gm.graph.nodes if node.op == "call_function" and node.target == ATTENTION]


def _check_causal(rw: Rewriter, m: CausalMatch) -> str | None:
    """A mask to drop once proved causal (or a causal window); a node without one is left as it is when causal.
    Anything else refuses the whole model, naming the node."""
    m.args = _attention_args(m.node)
    if m.args["key_padding_mask"] is None and m.args["attn_bias"] is None:
        if not m.args["causal"]:
            raise _refuse(m.node, "is bidirectional attention (causal=False, no mask): every output row "
                                  "depends on later positions", "only causal (decoder-only) models take a KV cache")
        return "causal, no mask to prove"
    m.form = _mask_form(m.node, m.args)
    return None


def _drop_proven_mask(rw: Rewriter, m: CausalMatch) -> None:
    """causal=True (with the window and ALiBi slopes the form carries) in place of the mask, which goes dead."""
    node, args, form = m.node, m.args, m.form
    kwargs = dict(node.kwargs)
    if form.window:
        kwargs["window"] = form.window
    if form.alibi_slopes is not None:
        slopes = torch.tensor(form.alibi_slopes, dtype=torch.float32)
        kwargs["alibi_slopes"] = add_constant(rw.gm, "alibi_slopes", slopes, node)
    node.args = (args["q"], args["k"], args["v"], None, None, True, args["scale"])
    node.kwargs = {k: v for k, v in kwargs.items() if k in ATTENTION_FEATURES}
    info = node.meta.get("fxopt.attention")
    if info is not None:
        node.meta["fxopt.attention"] = dataclasses.replace(
            info, causal=True, window=form.window, mask_kind=form.kind, alibi=form.alibi_slopes is not None,
            evidence=form.evidence)


#: The causal proof's rewrites, in order (the second sees the attention nodes the first made). Their checks raise
#: KVCacheError for a model that cannot take a cache; an attention already causal and unmasked counts as "causal".
CAUSAL_RULES: tuple[Rule, ...] = (
    Rule("sdpa_normalised", _sdpa_calls, _check_sdpa, _normalise_sdpa),
    Rule("masks_proven_causal", _attention_calls, _check_causal, _drop_proven_mask, refused="causal"),
)


def prove_causal(gm: fx.GraphModule, ids: fx.Node) -> dict[str, int]:
    """Normalise attention nodes to `fxopt::attention` with causal=True (and its window) and no mask, or refuse.

    Each remaining mask's form is proved from its graph (passes/masks.py): causal or a causal sliding window,
    with ALiBi slopes where the bias carries them. Rewrites gm in place (CAUSAL_RULES); proven masks become dead
    code. Returns the counts: sdpa calls normalised, masks proven causal, attention nodes in all.
    """
    remove_dead_code(gm)  # attentions replaced by an earlier pass but left behind are not ours to check
    rw, _ = apply_rules(gm, None, CAUSAL_RULES, lambda m: getattr(m, "node", m).name, "kv_cache", fake=False)
    remove_dead_code(gm)
    proven = rw.counts["masks_proven_causal"]
    return {"sdpa_normalised": rw.counts["sdpa_normalised"], "masks_proven_causal": proven,
            "attention": proven + rw.counts["causal"]}


_DEAD_IF_ORPHAN = {aten._assert_tensor_metadata.default}


def remove_dead_code(gm: fx.GraphModule) -> int:
    """Drop nodes nothing live needs (pure ops and shape assertions on dead values)."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output", "call_module") or node.users:
            continue
        if node.op == "call_function" and node.target in (CACHE_WRITE,):
            continue
        pure = node.op == "get_attr" or node.target in _DEAD_IF_ORPHAN or not node.is_impure()
        if pure:
            gm.graph.erase_node(node)
            removed += 1
    gm.graph.lint()
    gm.recompile()
    return removed


# ------------------------------------------------------------------------------------------------
# 2. Token-axis analysis
# ------------------------------------------------------------------------------------------------

DATA, POS, CONST, SIZE = "data", "pos", "const", "size"

# Ops that only relabel or convert values elementwise (not tagged pointwise in ATen).
# Every overload of the ops the attention pass walks through as casts, copies and dropout (fxopt.opnames).
ELEMENTWISE = aten_packets(*opnames.CASTS, *opnames.IDENTITY, *opnames.DROPOUT) | {
    aten.lift_fresh_copy, aten._assert_tensor_metadata}
RESHAPES = aten_packets(*opnames.RESHAPES)  # view, reshape, _unsafe_view: repeat_kv's merge of the heads
VIEWS = RESHAPES | {aten.flatten, aten.unflatten}
CREATION = {aten.full, aten.zeros, aten.ones, aten.empty, aten.new_ones, aten.new_zeros, aten.new_full,
            aten.new_empty, aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.scalar_tensor}
# Ops whose SymInt args may be the sequence length (as a size, not a value).
EXPANDS = {aten.expand, aten.broadcast_to}  # same semantics: broadcast size-1 dims (Falcon broadcasts k, v)
SIZE_CONSUMERS = VIEWS | CREATION | EXPANDS | {aten.arange, aten.slice, aten.narrow, aten.split,
                                     aten.split_with_sizes, aten.sym_size, aten.select, aten.repeat}
# (x, dim, keepdim) reductions; dim None or missing = all dims.
REDUCE_DIM = {aten.mean, aten.sum, aten.amax, aten.amin, aten.prod, aten.any, aten.all, aten.logsumexp,
              aten.var, aten.std, aten.max, aten.min, aten.argmax, aten.argmin, aten.norm, aten.var_mean,
              aten.std_mean, aten.median, aten.nansum}
# (x, dim, ...) ops that mix values along `dim` and keep the shape.
ALONG_DIM = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod,
             aten.logcumsumexp, aten.cummax, aten.cummin, aten.sort, aten.topk, aten.diff, aten.flip,
             aten.roll, aten.kthvalue, aten.argsort}
NORMS = {aten.layer_norm, aten.native_layer_norm, aten.rms_norm, aten._fused_rms_norm}
MATMULS = {aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm, aten.addbmm}


@dataclass
class PositionSource:
    """A value that *is* a function of positions: arange(start, start + s), table[:s] along `dim`, or the
    cumulative sum along `dim` of an all-ones tensor (HF OPT: `cumsum(attention_mask, 1)`, = positions + 1)."""

    kind: str  # "arange" | "table" | "cumsum"
    start: int = 0
    dim: int = 0
    table_size: int | None = None
    dtype: torch.dtype | None = None


@dataclass
class Analysis:
    ids: fx.Node
    seq: sympy.Symbol
    batch: sympy.Expr | None
    live: list[fx.Node]
    axes: dict[fx.Node, Any] = field(default_factory=dict)  # tuple of token dims (list for tuple outputs)
    kind: dict[fx.Node, str] = field(default_factory=dict)
    sources: dict[fx.Node, PositionSource] = field(default_factory=dict)
    attention: list[fx.Node] = field(default_factory=list)
    constants: dict[fx.Node, Any] = field(default_factory=dict)  # non-tensor placeholders -> value
    position_limit: int | None = None  # positions beyond this index no table can look up
    # Values computed from the last position alone (`x[:, -1]`, `x[:, [-1]]`, `x[:, -1:]` on the token axis, and
    # everything computed from them): they carry no token axis; the programs keep them as they are (the last of
    # the call's tokens, every row's last slot under left padding).
    last: set[fx.Node] = field(default_factory=set)

    def has_seq(self, expr) -> bool:
        return expr is not None and sympy.sympify(expr).has(self.seq)

    def limit_positions(self, size: int) -> None:
        self.position_limit = size if self.position_limit is None else min(self.position_limit, size)


def find_token_input(gm: fx.GraphModule, ctx: PassContext | None = None, *, strict: bool = True
                     ) -> tuple[fx.Node, sympy.Symbol, sympy.Expr | None]:
    """The (b, s) integer input whose dim 1 is the symbolic sequence length (role "seq" when `ctx` names
    roles, else the one called input_ids, else the only 2-d integer input). `strict`: no other tensor input."""
    tensors = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(_val(n), torch.Tensor)]
    candidates = [n for n in tensors if _val(n).dim() == 2 and not _val(n).dtype.is_floating_point]
    roles = ctx.symbols if ctx is not None else {}
    by_role = [n for n in candidates if roles.get(size_expr(_val(n).shape[1])) == sympy.Symbol("s", integer=True,
                                                                                          positive=True)]
    chosen = by_role or candidates
    if len(chosen) > 1 and not strict:
        chosen = [n for n in chosen if n.target == "input_ids"] or chosen[:1]
    names = ", ".join(f"{n.name}{tuple(_val(n).shape)}" for n in tensors) or "none"
    if len(chosen) != 1 or (strict and len(tensors) != 1):
        raise KVCacheError(f"kv_cache: needs a decoder-only model called with one (batch, seq) token-id tensor and "
                           f"no other tensor input; the captured graph takes: {names}")
    ids = chosen[0]
    seq = size_expr(_val(ids).shape[1])
    if not isinstance(seq, sympy.Symbol):
        raise KVCacheError(f"kv_cache: input `{ids.name}` was captured with a static sequence length {seq}; "
                           "capture with a dynamic seq dim (seq >= 2)")
    batch = size_expr(_val(ids).shape[0])
    return ids, seq, batch


def live_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes the output depends on, in graph order."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    seen, stack = set(), [output]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        stack.extend(_flat_nodes((cur.args, cur.kwargs)))
    return [n for n in gm.graph.nodes if n in seen]


def analyze(gm: fx.GraphModule, ctx: PassContext | None = None) -> Analysis:
    """Token-axis propagation over the live graph; raises KVCacheError naming the first mixing node."""
    ids, seq, batch = find_token_input(gm, ctx)
    an = Analysis(ids=ids, seq=seq, batch=batch, live=live_nodes(gm))
    for node in an.live:
        if node.op == "output":
            _check_output(an, node)
            continue
        _check_size_uses(an, node)
        an.kind[node] = _kind_of(an, node)
        an.axes[node] = _axes_of(an, node)
        _track_last(an, node)
        if node.op == "call_function" and node.target == ATTENTION:
            an.attention.append(node)
    if not an.attention:
        raise KVCacheError("kv_cache: the model has no attention node to cache (did the attention pass run?)")
    return an


def _check_output(an: Analysis, node: fx.Node) -> None:
    outs = [n for n in _flat_nodes(node.args) if tensor_val(n) is not None]
    if not outs:
        raise _refuse(node, "returns no tensor")
    logits = outs[0]
    if an.kind.get(logits) != DATA:
        raise _refuse(logits, "is the output but does not depend on the input tokens")
    if logits in an.last:
        shape = _shape(logits)
        if not ((len(shape) == 3 and shape[1] == 1) or len(shape) == 2):
            raise _refuse(logits, f"is the output, the last position's values with shape {tuple(shape)}; expected "
                                  "(batch, 1, ...) or (batch, vocab)")
        return
    if an.axes[logits] != (1,):
        raise _refuse(logits, f"is the output with token axes {an.axes[logits]}; expected (batch, seq, ...) "
                              "with the tokens on dim 1")


def _track_last(an: Analysis, node: fx.Node) -> None:
    """Values computed from a last-position selection are last-only too; combining one with a value that still
    holds every position (broadcasting the last row over all rows) makes each row depend on the last: refused."""
    if node in an.last or node.op != "call_function":
        return
    inputs = [a for a in _flat_nodes((node.args, node.kwargs)) if a in an.kind]
    last = next((a for a in inputs if a in an.last), None)
    if last is None:
        return

    def carries_tokens(a):
        axes = an.axes.get(a)
        return any(axes) if isinstance(axes, list) else bool(axes)

    full = next((a for a in inputs if a not in an.last and carries_tokens(a)), None)
    if full is not None:
        raise _refuse(node, f"combines `{last.name}`, computed from the last position only, with `{full.name}`, "
                            "which holds every position: each row would depend on the last one")
    an.last.add(node)


def _check_size_uses(an: Analysis, node: fx.Node) -> None:
    """The sequence length may size tensors, never enter arithmetic on values."""
    if node.op != "call_function" or isinstance(_val(node), (int, torch.SymInt)):
        return
    if _packet(node) in SIZE_CONSUMERS or node.target in (ATTENTION,):
        return
    for arg in _flat_nodes((node.args, node.kwargs)):
        value = _val(arg)
        if isinstance(value, torch.SymInt) and an.has_seq(size_expr(value)):
            raise _refuse(node, f"uses the sequence length `{arg.name}` as a value: each output row would "
                                "depend on how many tokens follow it")


def _kind_of(an: Analysis, node: fx.Node) -> str:
    if node is an.ids:
        return DATA
    if node.op == "placeholder":
        an.constants[node] = _val(node)
        return CONST
    if node.op == "get_attr":
        return CONST
    value = _val(node)
    if isinstance(value, (int, torch.SymInt, float, bool, torch.SymFloat, torch.SymBool)) and not isinstance(
        value, torch.Tensor
    ):
        return SIZE
    inputs = [a for a in _flat_nodes((node.args, node.kwargs)) if a in an.kind]
    kinds = {an.kind[a] for a in inputs if not (a is an.ids and node.target in (aten.sym_size.int,))}
    if DATA in kinds:
        return DATA
    source = _position_source(an, node)  # before POS: cumsum of a (position-sized) all-ones tensor
    if source is not None:
        an.sources[node] = source
        return POS
    if POS in kinds:
        return POS
    if any(an.has_seq(_arg_expr(a)) for a in _size_args(node)):
        if _packet(node) in CREATION or _packet(node) in EXPANDS | {aten.repeat}:
            return POS  # constant along the tokens, sized by them: rebuilt at the new length
        raise _refuse(node, "builds a constant whose shape depends on the sequence length in a way kv_cache "
                            "cannot re-derive for new positions")
    return CONST


def _size_args(node: fx.Node) -> list:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _position_source(an: Analysis, node: fx.Node) -> PositionSource | None:
    packet = _packet(node)
    if packet is aten.arange:
        args = list(node.args)
        if node.target == aten.arange.default:
            start, end, step = 0, args[0], 1
        else:
            start, end = args[0], args[1]
            step = node_arg(node, 2, "step", 1)
        end_e, start_e = _arg_expr(end), _arg_expr(start)
        if not an.has_seq(end_e):
            return None
        if step != 1 or start_e is None or not start_e.is_Integer or not _equal(end_e - start_e, an.seq):
            raise _refuse(node, "is an arange over the sequence that is not start + [0, s)")
        return PositionSource("arange", start=int(start_e), dtype=_val(node).dtype)
    if node.target == aten.slice.Tensor:
        x = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        end_e = _arg_expr(end)
        if not an.has_seq(end_e) or an.kind.get(x) != CONST:
            return None
        if start not in (None, 0) or step != 1 or not _equal(end_e, an.seq):
            raise _refuse(node, "slices a buffer along the sequence other than [:s]")
        dim = _norm_dim(dim, _rank(x))
        size = int(_val(x).shape[dim])
        an.limit_positions(size)
        return PositionSource("table", dim=dim, table_size=size)
    if packet is aten.cumsum:
        x = node.args[0]
        if an.kind.get(x) not in (POS, CONST) or x in an.last:
            return None
        dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs["dim"], _rank(x))
        if dim not in _in_axes(an, x) or not _equal(_shape(x)[dim], an.seq) or not _all_ones(x):
            return None  # mixing along the tokens: refused by its rule
        return PositionSource("cumsum", start=1, dim=dim, dtype=_val(node).dtype)
    return None


def _all_ones(node: fx.Node) -> bool:
    """`node` is ones(...) / ones_like / full(..., 1) (HF's default attention mask), maybe converted, viewed or
    expanded."""
    while node.op == "call_function":
        packet = _packet(node)
        if packet in (aten.ones, aten.new_ones, aten.ones_like):
            return True
        if packet in (aten.full, aten.new_full, aten.full_like):
            fill = node.args[2] if packet is aten.new_full else node.args[1]
            return not isinstance(fill, fx.Node) and fill == 1
        if packet in ELEMENTWISE or packet in VIEWS or packet in EXPANDS or packet in (aten.unsqueeze, aten.permute,
                                                                                  aten.transpose, aten.slice):
            if not isinstance(node.args[0], fx.Node):
                return False
            node = node.args[0]
            continue
        return False
    return False


def _axes_of(an: Analysis, node: fx.Node):
    kind = an.kind[node]
    if node.op in ("placeholder", "get_attr"):
        return (1,) if node is an.ids else ()
    if kind == SIZE:
        return None
    if kind == CONST:
        value = _val(node)
        if isinstance(value, (list, tuple)):
            return [() for _ in value]
        return ()
    if node in an.sources:
        source = an.sources[node]
        if source.kind == "cumsum":
            return _in_axes(an, node.args[0])
        return (0,) if source.kind == "arange" else (source.dim,)
    if node.op != "call_function":
        raise _refuse(node, "is a module call kv_cache cannot see into")
    rule = _rule_for(node)
    if rule is None:
        raise _refuse(node, "mixes or reorders values in a way kv_cache does not know for a token-carrying input",
                      "supported: pointwise ops, linears, norms and reductions over feature dims, views, "
                      "permutes, slices and concatenations off the token axis, embeddings, causal attention")
    return rule(an, node)


def _in_axes(an: Analysis, arg) -> tuple[int, ...]:
    if not isinstance(arg, fx.Node):
        return ()
    axes = an.axes.get(arg)
    return axes if isinstance(axes, tuple) else ()


def _rule_for(node: fx.Node):
    """The token-axis rule of node's op (TOKEN_AXIS_RULES); None: kv_cache does not know how the op moves tokens."""
    target = node.target
    if target in TOKEN_AXIS_RULES:  # fxopt::attention and getitem, keyed by target
        return TOKEN_AXIS_RULES[target]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return _rule_pointwise  # any op ATen tags pointwise, whatever its packet's row says
    return TOKEN_AXIS_RULES.get(_packet(node))


def _rule_pointwise(an, node):
    out_rank = _rank(node)
    axes: set[int] = set()
    for arg in _flat_nodes((node.args, node.kwargs)):
        if tensor_val(arg) is not None:
            shift = out_rank - _rank(arg)
            axes |= {d + shift for d in _in_axes(an, arg)}
    return tuple(sorted(axes))


def _rule_creation(an, node):
    if node.target in (aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
                       aten.empty_like.default):
        return _in_axes(an, node.args[0])
    return tuple(i for i, e in enumerate(_shape(node)) if an.has_seq(e))


def _rule_getitem(an, node):
    parent, index = node.args
    axes = an.axes.get(parent)
    if isinstance(axes, list):
        return axes[index]
    return axes if isinstance(axes, tuple) else ()


def _rule_attention(an, node):
    args = _attention_args(node)
    for name in ("q", "k", "v"):
        if _in_axes(an, args[name]) != (2,) or an.kind.get(args[name]) != DATA:
            raise _refuse(node, f"takes {name} `{args[name].name}` with token axes {_in_axes(an, args[name])}; "
                                "kv_cache needs q, k, v of shape (b, heads, s, d) computed from the tokens")
    if not args["causal"] or args["key_padding_mask"] is not None or args["attn_bias"] is not None:
        raise _refuse(node, "is not a plain causal attention")
    return (2,)


def _inner(shape, dim) -> sympy.Expr:
    return sympy.Mul(*shape[dim + 1:]) if dim + 1 < len(shape) else sympy.Integer(1)


def _rule_view(an, node):
    x = node.args[0]
    axes = _in_axes(an, x)
    if not axes:
        return ()
    in_shape, out_shape = _shape(x), _shape(node)
    out_axes = []
    for t in axes:
        inner = _inner(in_shape, t)
        match = [d for d in range(len(out_shape)) if an.has_seq(out_shape[d]) and _equal(_inner(out_shape, d), inner)
                 and not sympy.fraction(sympy.cancel(out_shape[d] / an.seq))[1].has(an.seq)]
        if len(match) != 1:
            raise _refuse(node, f"reshapes {tuple(in_shape)} -> {tuple(out_shape)} so that the token axis {t} "
                                "is split or merged with the feature dims")
        out_axes.append(match[0])
    return tuple(sorted(set(out_axes)))


def _rule_permute(an, node):
    x = node.args[0]
    rank = _rank(x)
    if node.target == aten.t.default:
        perm = [1, 0] if rank == 2 else list(range(rank))
    elif _packet(node) is aten.transpose:
        a, b = _norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank)
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    elif _packet(node) is aten.movedim:
        src, dst = node.args[1], node.args[2]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [_norm_dim(d, rank) for d in src], [_norm_dim(d, rank) for d in dst]
        rest = [d for d in range(rank) if d not in src]
        perm = [None] * rank
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        it = iter(rest)
        perm = [p if p is not None else next(it) for p in perm]
    else:
        perm = [_norm_dim(d, rank) for d in node.args[1]]
    return tuple(sorted(perm.index(t) for t in _in_axes(an, x)))


def _rule_unsqueeze(an, node):
    dim = _norm_dim(node.args[1], _rank(node))
    return tuple(t + 1 if t >= dim else t for t in _in_axes(an, node.args[0]))


def _rule_squeeze(an, node):
    x = node.args[0]
    rank = _rank(x)
    if len(node.args) < 2:
        dims = [d for d, e in enumerate(_shape(x)) if e == 1]
    else:
        dims = node.args[1]
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [_norm_dim(d, rank) for d in dims if _shape(x)[_norm_dim(d, rank)] == 1]
    axes = _in_axes(an, x)
    return tuple(t - sum(1 for d in dims if d < t) for t in axes if t not in dims)


def _rule_expand(an, node):
    """Moves token axes right-aligned; a size-1 dim broadcast to the sequence length becomes a token axis
    (values constant along it)."""
    x = node.args[0]
    shift = _rank(node) - _rank(x)
    axes = {t + shift for t in _in_axes(an, x)}
    in_shape, out_shape = _shape(x), _shape(node)
    for d, size in enumerate(out_shape):
        if an.has_seq(size) and (d < shift or in_shape[d - shift] == 1):
            axes.add(d)
    return tuple(sorted(axes))


def _is_full_range(an, x, dim, start, end, step) -> bool:
    size = _shape(x)[dim]
    start_e = _arg_expr(start) if start is not None else sympy.Integer(0)
    if step not in (None, 1) or start_e is None or start_e != 0:
        return False
    if end is None:
        return True
    end_e = _arg_expr(end)
    return end_e is not None and (end_e == INT_MAX or _equal(end_e, size) or
                                  (end_e.is_Integer and size.is_Integer and end_e >= size))


def _rule_slice(an, node):
    x = node.args[0]
    rank = _rank(x)
    if _packet(node) is aten.narrow:
        dim, start, length = node.args[1], node.args[2], node.args[3]
        full = _arg_expr(start) == 0 and _equal(_arg_expr(length), _shape(x)[_norm_dim(dim, rank)])
        last = _arg_expr(length) == 1 and _is_last_index(x, _norm_dim(dim, rank), start)
    else:
        dim = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        full = _is_full_range(an, x, _norm_dim(dim, rank), start, end, step)
        last = step in (None, 1) and _is_last_index(x, _norm_dim(dim, rank), start) and _runs_to_end(x, rank, dim, end)
    dim = _norm_dim(dim, rank)
    axes = _in_axes(an, x)
    if dim in axes and last:
        return _take_last(an, node, x, dim)
    if dim in axes and not full:
        raise _refuse(node, f"takes a slice along the token axis (dim {dim}): which rows it keeps depends on "
                            "the sequence length", "kept: the whole axis, or the last position alone (x[:, -1:])")
    return axes


def _rule_select(an, node):
    x = node.args[0]
    dim = _norm_dim(node.args[1], _rank(x))
    axes = _in_axes(an, x)
    if dim in axes:
        if _is_last_index(x, dim, node.args[2]):
            return _take_last(an, node, x, dim)
        raise _refuse(node, f"selects one position along the token axis (dim {dim}) other than the last",
                      "kept: the last position alone (x[:, -1])")
    return tuple(t - 1 if t > dim else t for t in axes)


def _is_last_index(x: fx.Node, dim: int, index) -> bool:
    """`index` (an int, SymInt or a size node) is the last position of x's dim: -1 or size - 1."""
    expr = _arg_expr(index)
    return expr is not None and (expr == -1 or _equal(expr, _shape(x)[dim] - 1))


def _runs_to_end(x: fx.Node, rank: int, dim: int, end) -> bool:
    if end is None:
        return True
    end_e, size = _arg_expr(end), _shape(x)[_norm_dim(dim, rank)]
    return end_e is not None and (end_e == INT_MAX or _equal(end_e, size))


def _take_last(an: Analysis, node: fx.Node, x: fx.Node, dim: int) -> tuple[int, ...]:
    """`node` keeps x's last position along its token axis `dim` alone (nanoGPT's `lm_head(x[:, [-1], :])`): a
    function of the last token, which both programs compute as it is (the last of the call's new tokens)."""
    if _in_axes(an, x) != (dim,):
        raise _refuse(node, f"takes the last position of a value with several token axes {_in_axes(an, x)}")
    an.last.add(node)
    return ()


def _rule_split(an, node):
    x = node.args[0]
    rank = _rank(x)
    dim = node_arg(node, 2, "dim", 0)
    dim = _norm_dim(dim, rank)
    axes = _in_axes(an, x)
    if dim in axes:
        raise _refuse(node, f"splits along the token axis (dim {dim})")
    return [axes for _ in _val(node)]


def _rule_unbind(an, node):
    x = node.args[0]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, _rank(x))
    axes = _in_axes(an, x)
    if dim in axes:
        raise _refuse(node, f"unbinds along the token axis (dim {dim})")
    return [tuple(t - 1 if t > dim else t for t in axes) for _ in _val(node)]


def _rule_cat(an, node):
    tensors = node.args[0]
    rank = _rank(node)
    dim = _norm_dim(node_arg(node, 1, "dim", 0), rank)
    axes: set[int] = set()
    for t in tensors:
        axes |= set(_in_axes(an, t))
    if dim in axes:
        raise _refuse(node, f"concatenates along the token axis (dim {dim})")
    return tuple(sorted(axes))


def _rule_gather_ranks(an, node):
    """all_gather_into_tensor: every rank's tensor stacked along dim 0 (tensor parallelism's vocab-parallel logits,
    moved to dim 0 first): tokens stay where they are as long as dim 0 is not a token axis."""
    axes = _in_axes(an, node.args[0])
    if 0 in axes:
        raise _refuse(node, "gathers ranks' tensors along the token axis (dim 0)")
    return axes


def _rule_stack(an, node):
    tensors = node.args[0]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, _rank(node))
    axes: set[int] = set()
    for t in tensors:
        axes |= {a + 1 if a >= dim else a for a in _in_axes(an, t)}
    return tuple(sorted(axes))


def _rule_embedding(an, node):
    weight, indices = node.args[0], node.args[1]
    if _in_axes(an, weight):
        raise _refuse(node, "looks up a table that itself depends on the tokens")
    if an.kind.get(indices) == POS and an.kind.get(weight) == CONST:
        an.limit_positions(int(_val(weight).shape[0]))
    return _in_axes(an, indices)


def _rule_index_select(an, node):
    x, dim, index = node.args[0], node.args[1], node.args[2]
    dim = _norm_dim(dim, _rank(x))
    axes = set(_in_axes(an, x))
    if dim in axes:
        raise _refuse(node, f"gathers along the token axis (dim {dim})")
    if _in_axes(an, index):
        axes.add(dim)
        if an.kind.get(index) == POS and an.kind.get(x) == CONST:
            an.limit_positions(int(_val(x).shape[dim]))
    return tuple(sorted(axes))


def _rule_index(an, node):
    """aten.index (advanced indexing `x[..., idx, ...]`): dims not indexed keep their token axes (e.g. Falcon's
    `fused_qkv[..., [-2], :]` over the heads); an index's token axes land on the dims it creates (GPT-J's
    `embed_positions[position_ids]`, a table looked up by positions); on a token axis of x only the constant
    last position passes (nanoGPT's `x[:, [-1], :]`); anything else gathers along the tokens: refused."""
    x, indices = node.args[0], list(node.args[1])
    rank = _rank(x)
    x_axes = _in_axes(an, x)
    dims = [d for d, index in enumerate(indices) if index is not None]
    if any(not isinstance(indices[d], fx.Node) or tensor_val(indices[d]) is None for d in dims):
        raise _refuse(node, "indexes with something other than tensors")
    if any(_val(indices[d]).dtype == torch.bool for d in dims):
        if x_axes or any(_in_axes(an, indices[d]) for d in dims):
            raise _refuse(node, "indexes a token-carrying value with a boolean mask")
        return ()
    mixed = [d for d in dims if d in x_axes]
    if mixed:
        t = mixed[0]
        if len(dims) == 1 and not _in_axes(an, indices[t]) and _constant_all(indices[t], -1):
            return _take_last(an, node, x, t)
        raise _refuse(node, f"gathers along the token axis (dim {t}): which rows it keeps is not position-wise",
                      "kept: the last position alone (x[:, [-1]])")
    width = max(_rank(indices[d]) for d in dims)
    adjacent = dims == list(range(dims[0], dims[-1] + 1))
    offset = dims[0] if adjacent else 0
    out: set[int] = set()
    rest = [d for d in range(rank) if d not in dims]
    for t in x_axes:
        out.add((t if t < dims[0] else t - len(dims) + width) if adjacent else width + rest.index(t))
    for d in dims:
        index = indices[d]
        axes = _in_axes(an, index)
        out |= {offset + t + width - _rank(index) for t in axes}
        if axes and an.kind.get(index) == POS and an.kind.get(x) == CONST:
            an.limit_positions(int(_val(x).shape[d]))
    return tuple(sorted(out))


def _constant_all(node: fx.Node, value: int) -> bool:
    """`node` is a constant integer tensor (a lifted constant, maybe copied, or a `full`) holding only `value`."""
    while node.op == "call_function" and _packet(node) in ELEMENTWISE:
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    if node.op == "get_attr":
        try:
            obj = fetch_attr(node.graph.owning_module, node.target)
        except AttributeError:  # a target the module lacks holds no constant
            obj = None
        return (isinstance(obj, torch.Tensor) and not obj.dtype.is_floating_point and obj.numel() > 0
                and bool((obj == value).all()))
    if node.op == "call_function" and _packet(node) in (aten.full, aten.scalar_tensor):
        fill = node.args[1] if _packet(node) is aten.full else node.args[0]
        return not isinstance(fill, fx.Node) and fill == value
    return False


def _rule_gather(an, node):
    """gather(x, dim, index): out[..., i, ...] = x[..., index[..., i, ...], ...] along `dim`."""
    x, dim, index = node.args[0], node.args[1], node.args[2]
    dim = _norm_dim(dim, _rank(x))
    x_axes, index_axes = _in_axes(an, x), _in_axes(an, index)
    if dim in x_axes:
        raise _refuse(node, f"gathers along the token axis (dim {dim})")
    if index_axes and an.kind.get(index) == POS and an.kind.get(x) == CONST:
        an.limit_positions(int(_val(x).shape[dim]))
    return tuple(sorted(set(x_axes) | set(index_axes)))


def _rule_repeat_tensor(an, node):
    """x.repeat(*sizes): tiles; a token axis must be repeated once; a size-1 dim tiled to the sequence length
    becomes a token axis (constant along it), as with expand."""
    x, sizes = node.args[0], list(node.args[1])
    shift = len(sizes) - _rank(x)
    in_shape, out_shape = _shape(x), _shape(node)
    axes = set()
    for t in _in_axes(an, x):
        if _arg_expr(sizes[t + shift]) != 1:
            raise _refuse(node, f"repeats along the token axis (dim {t})")
        axes.add(t + shift)
    for d, size in enumerate(out_shape):
        if an.has_seq(size) and (d < shift or in_shape[d - shift] == 1):
            axes.add(d)
    return tuple(sorted(axes))


def _rule_repeat(an, node):
    x = node.args[0]
    dim = node_arg(node, 2, "dim")
    axes = _in_axes(an, x)
    if dim is None or _norm_dim(dim, _rank(x)) in axes or not isinstance(node.args[1], int):
        raise _refuse(node, "repeats along the token axis")
    return axes


def _reduce_dims(node, rank) -> tuple[list[int], bool]:
    args = list(node.args)
    dim = node_arg(node, 1, "dim")
    keepdim = args[2] if len(args) > 2 and isinstance(args[2], bool) else node.kwargs.get("keepdim", False)
    if node.target in (aten.norm.ScalarOpt_dim,):
        dim = node_arg(node, 2, "dim")
        keepdim = node_arg(node, 3, "keepdim", False)
    if dim is None or dim == []:
        dims = list(range(rank))
    elif isinstance(dim, int):
        dims = [_norm_dim(dim, rank)]
    else:
        dims = [_norm_dim(d, rank) for d in dim]
    return dims, bool(keepdim)


def _token_axes_outside(an, node, dims: list[int], why: str, hint: str = ""):
    """The token axes of node's input, refused (naming the node) when one of `dims` is among them."""
    axes = _in_axes(an, node.args[0])
    mixed = [t for t in axes if t in dims]
    if mixed:
        raise _refuse(node, why.format(dim=mixed[0]), hint)
    return axes


def _per_output(node, axes):
    """axes for each of node's outputs (a list for multi-output ops such as topk and max.dim)."""
    return [axes for _ in _val(node)] if isinstance(_val(node), (list, tuple)) else axes


def _rule_reduce(an, node):
    dims, keepdim = _reduce_dims(node, _rank(node.args[0]))
    axes = _token_axes_outside(an, node, dims, "reduces over the token axis (dim {dim}): each output would depend "
                                               "on every position, later ones included")
    return _per_output(node, axes if keepdim else tuple(t - sum(1 for d in dims if d < t) for t in axes))


def _rule_along(an, node):
    rank = _rank(node.args[0])
    if _packet(node) in (aten.topk, aten.kthvalue, aten.diff):
        dim = node_arg(node, 2, "dim", -1)
    elif _packet(node) in (aten.flip, aten.roll):
        dim = node.args[-1]
    else:
        dim = node_arg(node, 1, "dim", -1)
    dims = [_norm_dim(d, rank) for d in ([dim] if isinstance(dim, int) else dim)]
    hint = ""
    if _packet(node) in (aten.softmax, aten._softmax):
        hint = "(a softmax over positions outside an attention node: an attention the attention pass did not " \
               "recognise?)"
    axes = _token_axes_outside(an, node, dims, "mixes values along the token axis (dim {dim}): row i would see "
                                               "later rows", hint)
    return _per_output(node, axes)


def _rule_norm(an, node):
    x = node.args[0]
    rank = _rank(x)
    normalized = node.args[1]
    dims = list(range(rank - len(normalized), rank))
    axes = _in_axes(an, x)
    if any(t in dims for t in axes):
        raise _refuse(node, "normalises over the token axis")
    for arg in _flat_nodes(node.args[2:]):
        if _in_axes(an, arg):
            raise _refuse(node, "has token-dependent norm parameters")
    if isinstance(_val(node), (list, tuple)):
        return [axes] + [axes for _ in list(_val(node))[1:]]
    return axes


def _rule_linear(an, node):
    x = node.args[0]
    axes = _in_axes(an, x)
    if _rank(x) - 1 in axes:
        raise _refuse(node, "contracts over the token axis")
    for arg in _flat_nodes(node.args[1:]):
        if _in_axes(an, arg):
            raise _refuse(node, f"has a token-dependent weight `{arg.name}`")
    return axes


def _rule_matmul(an, node):
    packet = _packet(node)
    args = list(node.args)
    if packet in (aten.addmm, aten.baddbmm, aten.addbmm):
        bias, a, b = args[0], args[1], args[2]
        if _in_axes(an, bias) and packet is not aten.addmm:
            raise _refuse(node, "adds a token-dependent term")
    else:
        bias, a, b = None, args[0], args[1]
    ra, rb, ro = _rank(a), _rank(b), _rank(node)
    if ra < 2 or rb < 2:
        if _in_axes(an, a) or _in_axes(an, b):
            raise _refuse(node, "is a vector product over token-carrying values")
        return ()
    a_axes, b_axes = _in_axes(an, a), _in_axes(an, b)
    if ra - 1 in a_axes or rb - 2 in b_axes:
        raise _refuse(node, "contracts over the token axis: each output mixes positions")
    out: set[int] = set()
    for t in a_axes:
        out.add(ro - 2 if t == ra - 2 else t + ro - ra)
    for t in b_axes:
        out.add(ro - 1 if t == rb - 1 else t + ro - rb)
    if bias is not None:
        out |= {t + ro - _rank(bias) for t in _in_axes(an, bias)}
    return tuple(sorted(out))


def _first_wins(*rows: tuple[Any, Any]) -> dict[Any, Any]:
    """{op: rule} from (ops, rule) rows; an op in several rows takes its first row's rule."""
    table: dict[Any, Any] = {}
    for ops, rule in rows:
        for op in ops:
            table.setdefault(op, rule)
    return table


#: How each op moves token axes, a transfer function per op (the analysis, not a rewrite): by target for
#: fxopt::attention and getitem, else by ATen packet, rows in priority order. Ops ATen tags pointwise take
#: _rule_pointwise before their packet's row (_rule_for).
TOKEN_AXIS_RULES: dict[Any, Any] = _first_wins(
    ({ATTENTION}, _rule_attention),
    ({operator.getitem}, _rule_getitem),
    (ELEMENTWISE, _rule_pointwise),
    (CREATION, _rule_creation),
    (VIEWS, _rule_view),
    (REDUCE_DIM, _rule_reduce),
    (ALONG_DIM, _rule_along),
    (NORMS, _rule_norm),
    (MATMULS, _rule_matmul),
    ({aten.linear}, _rule_linear),
    ({aten.transpose, aten.permute, aten.t, aten.movedim}, _rule_permute),
    ({aten.unsqueeze}, _rule_unsqueeze),
    ({aten.squeeze}, _rule_squeeze),
    ({aten.expand, aten.broadcast_to}, _rule_expand),
    ({aten.slice, aten.narrow}, _rule_slice),
    ({aten.select}, _rule_select),
    ({aten.split, aten.split_with_sizes, aten.chunk}, _rule_split),
    ({aten.unbind}, _rule_unbind),
    ({aten.cat}, _rule_cat),
    ({aten.stack}, _rule_stack),
    ({aten.embedding}, _rule_embedding),
    ({aten.index_select}, _rule_index_select),
    ({aten.repeat_interleave}, _rule_repeat),
    ({aten.index}, _rule_index),
    ({aten.gather}, _rule_gather),
    ({aten.repeat}, _rule_repeat_tensor),
    # tensor parallelism's collectives (passes/tensor_parallel.py): every rank holds the same tokens
    ({ALL_REDUCE.overloadpacket, WAIT.overloadpacket}, _rule_pointwise),  # a sum over ranks; waiting for it
    ({ALL_GATHER.overloadpacket}, _rule_gather_ranks),
)


# ------------------------------------------------------------------------------------------------
# 3. Programs
# ------------------------------------------------------------------------------------------------


@dataclass
class CacheSpec:
    """One attention's K and V caches: (batch, kv_heads, max_seq_len, head_dim) each."""

    node: str
    kv_heads: int
    k_dim: int
    v_dim: int
    dtype: torch.dtype
    scale: float

    def bytes_per_token(self) -> int:
        return self.kv_heads * (self.k_dim + self.v_dim) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class KVPrograms:
    """What the pass produces: the two programs, the cache layout and facts the runtime checks."""

    prefill: fx.GraphModule  # (input_ids, slot, kv_start, key_mask, *caches) -> logits (b, s, V)
    prefill_last: fx.GraphModule  # same, logits of the last position only (b, 1, V)
    decode: fx.GraphModule  # (input_ids, slot, kv_start, *caches) -> logits (b, n, V)
    caches: list[CacheSpec]
    position_limit: int | None
    notes: list[str] = field(default_factory=list)
    # The model itself returns the last position's logits only (nanoGPT's `lm_head(x[:, [-1], :])`): every
    # program then returns (b, 1, V), prefill and decode of n > 1 tokens included.
    last_only: bool = False

    @property
    def n_caches(self) -> int:
        return 2 * len(self.caches)


class VmapPositions(torch.nn.Module):
    """Runs the position subgraph once per row: positions (b, n) -> its frontier values, batched on dim 0."""

    def __init__(self, fn: fx.GraphModule):
        super().__init__()
        self.fn = fn

    def forward(self, positions: torch.Tensor, input_ids: torch.Tensor):
        return torch.vmap(self.fn, in_dims=(0, None))(positions, input_ids)


def _strip_repeat_kv(node: fx.Node) -> fx.Node:
    """k after `repeat_kv` (unsqueeze/expand/reshape, identity slices) -> the un-repeated k."""

    def skip_identity(n: fx.Node) -> fx.Node:
        while (n.op == "call_function" and n.target == aten.slice.Tensor and len(n.args) >= 4
               and n.args[2] in (0, None) and n.args[3] == INT_MAX and (len(n.args) < 5 or n.args[4] == 1)):
            n = n.args[0]
        return n

    cur = skip_identity(node)
    if cur.op != "call_function" or _packet(cur) not in RESHAPES:
        return node
    expand = skip_identity(cur.args[0])
    if expand.op != "call_function" or _packet(expand) is not aten.expand:
        return node
    unsq = skip_identity(expand.args[0])
    if unsq.op != "call_function" or unsq.target != aten.unsqueeze.default or unsq.args[1] != 2:
        return node
    base = skip_identity(unsq.args[0])
    bshape, eshape, oshape = _shape(base), _shape(expand), _shape(node)
    if len(bshape) != 4 or len(eshape) != 5 or len(oshape) != 4:
        return node
    if not (_equal(eshape[1], bshape[1]) and _equal(oshape[1], eshape[1] * eshape[2])
            and _equal(eshape[3], bshape[2]) and _equal(eshape[4], bshape[3])):
        return node
    return base


class _Builder:
    """Copies the live graph into a new program: data nodes as they are, the position subgraph under vmap."""

    def __init__(self, gm: fx.GraphModule, an: Analysis, mode: str):
        self.gm, self.an, self.mode = gm, an, mode  # mode: "prefill" | "prefill_last" | "decode"
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.aligned: dict[tuple[fx.Node, int], fx.Node] = {}
        self.cache_nodes: list[fx.Node] = []
        self.specs: list[CacheSpec] = []
        self.modules: dict[str, torch.nn.Module] = {}

    # -- the position subgraph ------------------------------------------------------------------
    def _frontier(self) -> list[fx.Node]:
        an = self.an
        return [n for n in an.live if an.kind.get(n) == POS and any(an.kind.get(u) == DATA for u in n.users)]

    def _build_position_fn(self, frontier: list[fx.Node]) -> fx.GraphModule:
        an = self.an
        needed, stack = set(), list(frontier)
        while stack:
            cur = stack.pop()
            if cur in needed or cur is an.ids:
                continue
            needed.add(cur)
            if cur in an.sources and an.sources[cur].kind == "arange":
                continue
            if cur in an.sources and an.sources[cur].kind == "cumsum":  # needs its ones (the shape) only
                stack.append(cur.args[0])
                continue
            if cur in an.sources:
                stack.append(cur.args[0])
                continue
            stack.extend(_flat_nodes((cur.args, cur.kwargs)))
        graph = fx.Graph()
        positions = graph.placeholder("positions")
        ids = graph.placeholder("input_ids")
        env: dict[fx.Node, Any] = {an.ids: ids}
        for node in an.live:
            if node not in needed:
                continue
            if node in an.constants:
                env[node] = an.constants[node]
                continue
            source = an.sources.get(node)
            if source is not None and source.kind == "arange":
                value = positions
                if source.start:
                    value = graph.call_function(aten.add.Tensor, (value, source.start))
                if source.dtype is not None and source.dtype != torch.int64:
                    value = graph.call_function(aten._to_copy.default, (value,), {"dtype": source.dtype})
                env[node] = value
            elif source is not None and source.kind == "cumsum":  # ones.cumsum(dim) = (positions + 1) along dim
                ones = env[node.args[0]]
                shape = [1] * _rank(node.args[0])
                shape[source.dim] = -1
                value = graph.call_function(aten.add.Tensor, (positions, source.start))
                value = graph.call_function(aten.view.default, (value, shape))
                value = graph.call_function(aten.mul.Tensor, (ones, value))
                env[node] = graph.call_function(aten._to_copy.default, (value,), {"dtype": source.dtype})
            elif source is not None:
                env[node] = graph.call_function(aten.index_select.default,
                                                (env[node.args[0]], source.dim, positions))
            else:
                env[node] = graph.node_copy(node, lambda a: env[a])
        graph.output(tuple(env[n] for n in frontier))
        return fx.GraphModule(self.gm, graph, class_name="PositionSubgraph")

    def _align(self, value: fx.Node, frontier: fx.Node, consumer: fx.Node) -> fx.Node:
        """Place the batched frontier value (B, *orig) so it broadcasts against `consumer`'s operands."""
        key = (frontier, consumer)
        if key in self.aligned:
            return self.aligned[key]
        an, g = self.an, self.graph
        if not (consumer.op == "call_function" and (
                _packet(consumer) in ELEMENTWISE or (isinstance(consumer.target, torch._ops.OpOverload)
                                                     and torch.Tag.pointwise in consumer.target.tags))):
            raise _refuse(consumer, f"combines the position-dependent value `{frontier.name}` with token data in "
                                    "a non-elementwise op; kv_cache can only batch positions into elementwise ops")
        out_shape, orig = _shape(consumer), _shape(frontier)
        r, k = len(out_shape), len(orig)
        if an.batch is None or not _equal(out_shape[0], an.batch):
            raise _refuse(consumer, "combines positions with a value whose dim 0 is not the batch")
        if k < r:
            for _ in range(r - k - 1):
                value = g.call_function(aten.unsqueeze.default, (value, 1))
        elif orig[0] == 1:
            value = g.call_function(aten.squeeze.dim, (value, 1))
        elif _equal(orig[0], an.batch):  # expanded over the batch inside: each row keeps its own
            value = g.call_function(aten.diagonal.default, (value, 0, 0, 1))
            value = g.call_function(aten.movedim.int, (value, -1, 0))
        else:
            raise _refuse(consumer, f"broadcasts `{frontier.name}` of shape {orig} against the batch dim")
        self.aligned[key] = value
        return value

    # -- the program ----------------------------------------------------------------------------
    def build(self) -> tuple[fx.GraphModule, list[CacheSpec]]:
        an, g = self.an, self.graph
        decode = self.mode == "decode"
        ids = g.placeholder("input_ids")
        slot = g.placeholder("slot")
        kv_start = g.placeholder("kv_start")
        key_mask = None if decode else g.placeholder("key_mask")
        n_attn = len(an.attention)
        for i in range(n_attn):
            self.cache_nodes.append(g.placeholder(f"k_cache_{i}"))
            self.cache_nodes.append(g.placeholder(f"v_cache_{i}"))
        self.env[an.ids] = ids

        # Row b's position of slot j is j - kv_start[b] (left padding), clamped at 0 for pad slots.
        n = g.call_function(aten.sym_size.int, (ids, 1))
        b = g.call_function(aten.sym_size.int, (ids, 0))
        device = _val(an.ids).device
        steps = g.call_function(aten.arange.default, (n,), {"device": device})
        slots = g.call_function(aten.add.Tensor, (steps, slot))
        positions = g.call_function(aten.sub.Tensor, (g.call_function(aten.unsqueeze.default, (slots, 0)),
                                                      g.call_function(aten.unsqueeze.default, (kv_start, 1))))
        positions = g.call_function(aten.clamp_min.default, (positions, 0))
        self.slots = slots  # (n,) cache slots written this call, shared by every layer's cache_write
        kv_len = None
        if decode:
            kv_len = g.call_function(aten.add.Tensor, (g.call_function(aten.expand.default, (slot, [b])), n))

        frontier = self._frontier()
        batched: dict[fx.Node, fx.Node] = {}
        if frontier:
            fn = self._build_position_fn(frontier)
            self.modules["positions"] = VmapPositions(fn)
            values = g.call_module("positions", (positions, ids))
            for i, node in enumerate(frontier):
                batched[node] = g.call_function(operator.getitem, (values, i))

        out_node = next(nd for nd in reversed(self.gm.graph.nodes) if nd.op == "output")
        logits = [nd for nd in _flat_nodes(out_node.args) if tensor_val(nd) is not None][0]
        attn_index = {node: i for i, node in enumerate(an.attention)}

        for node in an.live:
            if node.op == "output" or node is an.ids:
                continue
            kind = an.kind.get(node)
            if node in an.constants:
                self.env[node] = an.constants[node]
                continue
            if kind == POS:
                continue  # computed under vmap
            if node in attn_index:
                self.env[node] = self._attention(node, attn_index[node], slot, kv_start, kv_len, key_mask)
                continue
            if node is logits and self.mode == "prefill_last" and node not in an.last:
                self.env[node] = self._last_only(node)
                continue

            def remap(arg, consumer=node):
                if arg in batched:
                    return self._align(batched[arg], arg, consumer)
                return self.env[arg]

            self.env[node] = g.node_copy(node, remap)
            self.env[node].meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
            if node.target == aten.view.default:
                # The capture saw SDPA's output layout, (b, s, h, d) in memory, so `y.transpose(1, 2)
                # .contiguous().view(b, s, -1)` lost its no-op contiguous; cached attention returns (b, h, n, d)
                # contiguous, over which that view fails once n > 1. reshape is the same view wherever a view
                # exists, and a copy where none does.
                self.env[node].target = aten.reshape.default
        out = self.env[logits]
        if logits in an.last and _rank(logits) == 2:  # x[:, -1] dropped the token axis: (b, 1, vocab) as always
            out = g.call_function(aten.unsqueeze.default, (out, 1))
        g.output(out)
        program = fx.GraphModule(self._root(), g, class_name=f"KV{self.mode.title().replace('_', '')}")
        program.graph.eliminate_dead_code()  # e.g. the repeat_kv copies of K and V: attention reads the caches
        program.recompile()
        return program, self.specs

    def _root(self) -> dict[str, Any]:
        """What the program's get_attr and call_module nodes name: the captured weights (shared, never
        copied) and the vmapped position function."""
        root: dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.op == "get_attr":
                root[node.target] = fetch_attr(self.gm, node.target)
            elif node.op == "call_module":
                root[node.target] = self.modules[node.target]
        return root

    def _last_only(self, node: fx.Node) -> fx.Node:
        """Logits of the last position only: slice the final projection's input (left padding keeps every
        row's last token at the last slot)."""
        g = self.graph
        if (node.op == "call_function" and node.target == aten.slice.Tensor and _rank(node) == 3
                and _norm_dim(node.args[1], 3) == 2 and len(node.args[0].users) == 1):  # padded lm_head (matmul.py)
            return g.call_function(aten.slice.Tensor, (self._last_only(node.args[0]), *node.args[1:]))
        if (node.op == "call_function" and _packet(node) in (aten.linear, aten.matmul)
                and self.an.axes.get(node.args[0]) == (1,) and _rank(node.args[0]) == 3):
            x = self.env[node.args[0]]
            last = g.call_function(aten.slice.Tensor, (x, 1, -1, INT_MAX))
            args = (last,) + tuple(fx.node.map_arg(node.args[1:], lambda a: self.env[a]))
            return g.call_function(node.target, args, fx.node.map_arg(node.kwargs, lambda a: self.env[a]))
        full = g.node_copy(node, lambda a: self.env[a])
        return g.call_function(aten.slice.Tensor, (full, 1, -1, INT_MAX))

    def _attention(self, node, index, slot, kv_start, kv_len, key_mask):
        g, env = self.graph, self.env
        args = _attention_args(node)
        q = env[args["q"]]
        k_src, v_src = _strip_repeat_kv(args["k"]), _strip_repeat_kv(args["v"])
        for src in (k_src, v_src):
            if src not in env:  # the un-repeated value was dead in the original graph: copy its chain
                raise _refuse(node, f"reads K/V `{src.name}` that kv_cache could not locate")
        k, v = env[k_src], env[v_src]
        kval, vval = _val(k_src), _val(v_src)
        for name, val in (("k", kval), ("v", vval)):
            if any(isinstance(d, torch.SymInt) for d in (val.shape[1], val.shape[3])):
                raise _refuse(node, f"has a {name} with symbolic heads or head dim {tuple(val.shape)}")
        self.specs.append(CacheSpec(node.name, int(kval.shape[1]), int(kval.shape[3]), int(vval.shape[3]),
                                    kval.dtype, float(args["scale"])))
        k_cache, v_cache = self.cache_nodes[2 * index], self.cache_nodes[2 * index + 1]
        g.call_function(CACHE_WRITE, (k_cache, k, self.slots))
        g.call_function(CACHE_WRITE, (v_cache, v, self.slots))
        features = _features(args, env)
        if self.mode == "decode":
            return g.call_function(CACHED_ATTENTION, (q, k_cache, v_cache, kv_start, kv_len, float(args["scale"])),
                                   features)
        return g.call_function(ATTENTION, (q, k, v, key_mask, None, True, float(args["scale"])), features)


def _ensure_kv_sources_live(gm: fx.GraphModule, an: Analysis) -> None:
    """The un-repeated K/V (before repeat_kv) is always live: it feeds the repeat chain."""
    for node in an.attention:
        args = _attention_args(node)
        for name in ("k", "v"):
            src = _strip_repeat_kv(args[name])
            if src not in an.kind:
                raise _refuse(node, f"K/V source `{src.name}` of `{args[name].name}` is not live")


def build_programs(gm: fx.GraphModule, an: Analysis) -> KVPrograms:
    _ensure_kv_sources_live(gm, an)
    programs = {}
    specs: list[CacheSpec] = []
    for mode in ("prefill", "prefill_last", "decode"):
        program, specs = _Builder(gm, an, mode).build()
        program.graph.lint()
        programs[mode] = program
    notes = [f"{len(specs)} attention layers cached: "
             f"{sum(s.bytes_per_token() for s in specs)} bytes of K/V per token per sequence"]
    if an.sources:
        kinds = sorted({f"{s.kind}" for s in an.sources.values()})
        notes.append(f"{len(an.sources)} position sources rewritten to per-row positions ({', '.join(kinds)})")
    logits = [n for n in _flat_nodes(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args)
              if tensor_val(n) is not None][0]
    return KVPrograms(programs["prefill"], programs["prefill_last"], programs["decode"], specs,
                      an.position_limit, notes, last_only=logits in an.last)


def propagate_meta(program: fx.GraphModule, *inputs: torch.Tensor) -> fx.GraphModule:
    """Fill meta["val"] on a program's nodes (fake tensors at the shapes of `inputs`), for passes that run
    after this one (cost, fusion) on a program specialised to one batch bucket."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(program, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    return program


def insert_kv_cache(gm: fx.GraphModule, ctx: PassContext | None = None) -> KVPrograms:
    """The whole pass on a captured (attention-rewritten) graph: prove causal, analyse, build."""
    ids, _, _ = find_token_input(gm, ctx, strict=False)
    counts = prove_causal(gm, ids)  # first: a bidirectional model is refused at its attention node
    an = analyze(gm, ctx)
    programs = build_programs(gm, an)
    programs.notes.insert(0, f"{counts['attention']} attention nodes, all causal "
                             f"({counts['masks_proven_causal']} causal masks proven and dropped)")
    return programs


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pass interface: proves the model causal and token-local; the KVPrograms come back in the result."""
    programs = insert_kv_cache(gm, ctx)
    finish(gm)
    ctx.report.extend(f"kv_cache: {note}" for note in programs.notes)
    return PassResult(True, list(programs.notes), {"attention_cached": len(programs.caches)},
                      kv_programs=programs)
