"""Cost pass: FLOPs and bytes moved per node, symbolic in the named dims.

The unfused cost of a node: every input tensor read once and every output
written once at its dtype's size; layout ops (views, reshapes, transposes,
metadata) cost nothing. Matmul costs 2·M·N·K, attention 4·b·h·sq·skv·d (halved
when causal), softmax 3 ops per element, other reductions one op per input
element, pointwise ops one op per primitive per element. Arithmetic intensity
and the roofline bound derive from a Cost and a Hardware; they are not stored.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from fxopt.codegen import (
    attention_op,  # noqa: F401 - registers torch.ops.fxopt.attention
    epilogue,  # noqa: F401 - registers torch.ops.fxopt.linear_gelu_tanh
    swiglu_gemm,  # noqa: F401 - registers torch.ops.fxopt.linear_swiglu
)
from fxopt.codegen import gemv as gemv_op  # noqa: F401 - registers torch.ops.fxopt.gemv
from fxopt.codegen import rope as rope_op  # noqa: F401 - registers torch.ops.fxopt.rope, rope_cache_write
from fxopt.codegen.flash_attention import attention_flops
from fxopt.hardware import Hardware
from fxopt.passes.infra import PassContext, PassResult

aten = torch.ops.aten
COST_KEY = "fxopt.cost"

KINDS = ("matmul", "attention", "pointwise", "reduction", "layout", "other", "unknown")
COMPUTE_KINDS = ("matmul", "attention")


@dataclass(frozen=True)
class Cost:
    """A node's arithmetic and memory traffic as sympy expressions in role symbols (b, s, ...)."""

    flops: sympy.Expr
    bytes_read: sympy.Expr
    bytes_written: sympy.Expr
    kind: str
    dtype: torch.dtype | None = None
    note: str = ""
    link_bytes: sympy.Expr = sympy.Integer(0)  # bytes this GPU sends to its peers (collectives)

    @property
    def bytes(self) -> sympy.Expr:
        return self.bytes_read + self.bytes_written

    def intensity(self, ctx: PassContext) -> float:
        nbytes = ctx.evaluate(self.bytes)
        return ctx.evaluate(self.flops) / nbytes if nbytes else float("inf")

    def time(self, ctx: PassContext, hw: Hardware | None = None) -> float:
        """Roofline time; a collective's is the larger of that and its time on the interconnect."""
        hw = hw or ctx.hardware
        dtype = self.dtype or torch.float32
        local = hw.predicted_time(
            ctx.evaluate(self.flops), ctx.evaluate(self.bytes), dtype, matmul=self.kind in COMPUTE_KINDS
        )
        return max(local, hw.link_time(ctx.evaluate(self.link_bytes)))

    def bound(self, ctx: PassContext, hw: Hardware | None = None) -> str:
        if self.kind == "unknown":
            return "unknown"
        hw = hw or ctx.hardware
        link = hw.link_time(ctx.evaluate(self.link_bytes))
        if link and link >= self.time(ctx, hw):
            return "interconnect"
        return hw.bound(
            ctx.evaluate(self.flops),
            ctx.evaluate(self.bytes),
            self.dtype or torch.float32,
            matmul=self.kind in COMPUTE_KINDS,
        )


ZERO = sympy.Integer(0)
FREE = Cost(ZERO, ZERO, ZERO, "layout")


# ---------------------------------------------------------------- shapes and bytes
def tensor_vals(value) -> list[torch.Tensor]:
    """The tensors in a node's meta['val'] (a tensor, or a tuple/list of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in tensor_vals(item)]
    return []


def input_tensors(node: fx.Node) -> list[torch.Tensor]:
    """The distinct tensor inputs of a node (a tensor used twice is read once)."""
    seen: dict[fx.Node, None] = {}
    fx.node.map_arg((node.args, node.kwargs), lambda n: seen.setdefault(n, None))
    return [v for n in seen for v in tensor_vals(n.meta.get("val"))]


def numel(ctx: PassContext, val: torch.Tensor) -> sympy.Expr:
    return sympy.Mul(*ctx.shape(val)) if val.dim() else sympy.Integer(1)


def nbytes(ctx: PassContext, val: torch.Tensor) -> sympy.Expr:
    return numel(ctx, val) * val.element_size()


def io_cost(ctx: PassContext, node: fx.Node, flops: sympy.Expr, kind: str, note: str = "") -> Cost:
    """Cost with every input read once and every output written once."""
    outs = tensor_vals(node.meta.get("val"))
    read = sum((nbytes(ctx, t) for t in input_tensors(node)), ZERO)
    written = sum((nbytes(ctx, t) for t in outs), ZERO)
    dtype = _compute_dtype(node, outs)
    return Cost(sympy.expand(flops), sympy.expand(read), sympy.expand(written), kind, dtype, note)


def _compute_dtype(node: fx.Node, outs: list[torch.Tensor]) -> torch.dtype | None:
    ins = [t for t in input_tensors(node) if t.is_floating_point()]
    if ins:
        return ins[0].dtype
    return outs[0].dtype if outs else None


# ---------------------------------------------------------------- per-op rules
def matmul_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """2·(output elements)·K, K the contraction size; bias adds are not counted (as FlopCounterMode)."""
    out = tensor_vals(node.meta["val"])[0]
    first = node.args[1] if node.target in (aten.addmm.default, aten.baddbmm.default) else node.args[0]
    k = ctx.named(first.meta["val"].shape[-1])
    if first.meta["val"].dim() == 1:  # vector @ matrix
        k = ctx.named(first.meta["val"].shape[0])
    return io_cost(ctx, node, 2 * numel(ctx, out) * k, "matmul")


def linear_swiglu_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """fxopt::linear_swiglu(x, [W_gate; W_up]): both halves' GEMMs, 2·2·(output elements)·K; the epilogue's
    silu and product are not counted (as the GELU epilogue's). Bytes: x and W read, the product written."""
    out = tensor_vals(node.meta["val"])[0]
    k = ctx.named(node.args[0].meta["val"].shape[-1])
    return io_cost(ctx, node, 4 * numel(ctx, out) * k, "matmul")


def gemv_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """fxopt::gemv: 2·(rows of W)·K for the product (with glu W holds gate and up rows: twice the outputs);
    its folded norm, SwiGLU and residual add are O(K + N) and not counted. Bytes: every input and the output."""
    weight = node.args[1].meta["val"]
    return io_cost(ctx, node, 2 * ctx.named(weight.shape[0]) * ctx.named(weight.shape[1]), "matmul")


def gemv_qkv_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """fxopt::gemv_qkv: the GEMV's 2·rows·K FLOPs; bytes: x, W, bias, norm weight, the RoPE row and pos read,
    q written and one new row of K and of V written into the caches (never the whole cache)."""
    x, weight, bias, norm_w, _, cos, sin, k_cache, v_cache, pos = node.args
    read = sum((distinct_bytes(ctx, a.meta["val"]) for a in (x, weight, bias, norm_w, cos, sin, pos)
                if isinstance(a, fx.Node)), ZERO)
    q = node.meta["val"]
    kv_rows = sum(c.meta["val"].shape[1] * c.meta["val"].shape[3] * c.meta["val"].element_size()
                  for c in (k_cache, v_cache))
    flops = 2 * ctx.named(weight.meta["val"].shape[0]) * ctx.named(weight.meta["val"].shape[1])
    return Cost(sympy.expand(flops), sympy.expand(read), sympy.expand(nbytes(ctx, q) + kv_rows), "matmul",
                weight.meta["val"].dtype)


def sdpa_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """4·b·h·sq·skv·d for QKᵀ and PV, halved when causal."""
    q, k = node.args[0].meta["val"], node.args[1].meta["val"]
    causal = _arg(node, 5, "is_causal", False)
    batch_heads = sympy.Mul(*ctx.shape(q)[:-2])
    sq, d = ctx.named(q.shape[-2]), ctx.named(q.shape[-1])
    skv = ctx.named(k.shape[-2])
    flops = 4 * batch_heads * sq * skv * d
    return io_cost(ctx, node, flops / 2 if causal else flops, "attention")


def fxopt_attention_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """fxopt::attention(q, k, v, key_padding_mask, attn_bias, causal, scale): one fused kernel.

    FLOPs: attention_flops (4·b·hq·sq·skv·d, causal counts only visible pairs, a sliding window only its
    band). Bytes: the kernel's HBM traffic -- q, K, V (un-repeated KV heads) and the masks read once, O
    written once; the sq×skv score matrix never reaches memory. With a window of w keys only the last
    sq + w - 1 keys are read (the kernel skips key blocks wholly outside every query's band).
    """
    q, k = node.args[0].meta["val"], node.args[1].meta["val"]
    b, hq, sq, d = ctx.shape(q)
    hkv, skv = ctx.named(k.shape[1]), ctx.named(k.shape[2])
    window = int(node.kwargs.get("window", 0) or 0)
    flops = attention_flops(b, hq, sq, skv, d, bool(node.args[5]), window=window)
    cost = io_cost(ctx, node, flops, "attention")
    if not window:
        return cost
    per_key = 2 * b * hkv * d * k.element_size()  # one key and one value row of every KV head
    band = per_key * sympy.Min(skv, sq + window - 1)
    return Cost(cost.flops, sympy.expand(cost.bytes_read - per_key * skv + band), cost.bytes_written, cost.kind,
                cost.dtype, f"sliding window of {window} keys")


def cached_attention_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """fxopt::cached_attention(q, k_cache, v_cache, kv_start, kv_len, scale): new queries over a static cache.

    The live length is a device tensor, so the cost is the bound at a full cache (max_len keys): FLOPs
    4·b·hq·sq·max_len·d, bytes q + K + V + O once each. Linear in the cache length, as decode should be."""
    q, k = node.args[0].meta["val"], node.args[1].meta["val"]
    b, hq, sq, d = ctx.shape(q)
    max_len = ctx.named(k.shape[2])
    return io_cost(ctx, node, 4 * b * hq * sq * max_len * d, "attention", note="at a full cache")


def cache_write_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """fxopt::cache_write(cache, new, pos): reads the new rows, writes them into the cache in place."""
    new = node.args[1].meta["val"]
    return Cost(ZERO, sympy.expand(nbytes(ctx, new)), sympy.expand(nbytes(ctx, new)), "other", new.dtype)


def distinct_bytes(ctx: PassContext, val: torch.Tensor) -> sympy.Expr:
    """Bytes of the distinct elements a view reaches: a broadcast (stride-0) dim is read once."""
    sizes = [ctx.named(n) for n, st in zip(val.shape, val.stride()) if not (isinstance(st, int) and st == 0)]
    return sympy.Mul(*sizes) * val.element_size() if sizes else sympy.Integer(val.element_size())


def _rope_read(ctx: PassContext, tables: list[fx.Node]) -> sympy.Expr:
    """x, cos and sin read once each (the same node twice is read once), broadcast tables at their own size."""
    return sum((distinct_bytes(ctx, n.meta["val"]) for n in dict.fromkeys(tables)), ZERO)


def rope_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """fxopt::rope(x, cos, sin): one pass -- x, cos, sin read once, the output written once; 3 FLOPs per
    rotated element (two products and a sum; the negation is free; partial rotary copies the other columns)."""
    out = node.meta["val"]
    read = _rope_read(ctx, list(node.args[:3]))
    return Cost(sympy.expand(3 * numel(ctx, out) * _rotated_share(node.args[:3])), sympy.expand(read),
                sympy.expand(nbytes(ctx, out)), "pointwise", node.args[0].meta["val"].dtype)


def _rotated_share(x_cos_sin) -> sympy.Rational:
    """The share of x's columns that RoPE rotates: r / d with partial rotary's tables of r columns, else 1."""
    x, cos, sin = (a.meta["val"] for a in x_cos_sin)
    return sympy.Rational(rope_op.rotary_dim(x, cos, sin), x.shape[-1])


def rope_cache_write_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """fxopt::rope_cache_write(cache, x, cos, sin, pos): rope's reads (and pos), x's elements written into the
    cache in place at the cache's dtype; 3 FLOPs per element."""
    cache, x = node.args[0].meta["val"], node.args[1].meta["val"]
    read = _rope_read(ctx, list(node.args[1:4])) + distinct_bytes(ctx, node.args[4].meta["val"])
    written = numel(ctx, x) * cache.element_size()
    flops = 3 * numel(ctx, x) * _rotated_share(node.args[1:4])
    return Cost(sympy.expand(flops), sympy.expand(read), sympy.expand(written), "pointwise", x.dtype)


def embedding_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """A gather reads only the rows it looks up, not the whole table."""
    indices, out = node.args[1].meta["val"], node.meta["val"]
    read = nbytes(ctx, indices) + nbytes(ctx, out)
    return Cost(ZERO, sympy.expand(read), sympy.expand(nbytes(ctx, out)), "other", out.dtype)


TP_WORLD_KEY = "fxopt.tp.world_size"  # set by passes/tensor_parallel on the collectives it inserts


def all_reduce_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """A ring all-reduce of B bytes over N GPUs: each sends (and receives) 2(N-1)/N · B, reads and writes B
    in HBM and adds (N-1)/N of the elements."""
    val, world = node.args[0].meta["val"], node.meta.get(TP_WORLD_KEY)
    if world is None:  # a collective fxopt did not insert: its group's size is not in the graph
        return Cost(ZERO, ZERO, ZERO, "unknown", note="unknown cost (all_reduce over a group of unknown size)")
    size, share = nbytes(ctx, val), sympy.Rational(world - 1, world)
    return Cost(share * numel(ctx, val), size, size, "collective", val.dtype, link_bytes=2 * share * size)


def all_gather_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """An all-gather into an output of B bytes: each GPU sends its shard to the N-1 others (ring: (N-1)/N · B)."""
    val, world = node.meta["val"], int(node.args[1])
    size, share = nbytes(ctx, val), sympy.Rational(world - 1, world)
    return Cost(ZERO, size / world, size, "collective", val.dtype, link_bytes=share * size)


def per_output_element(ops: float, kind: str) -> Callable[[PassContext, fx.Node], Cost]:
    def rule(ctx: PassContext, node: fx.Node) -> Cost:
        out = tensor_vals(node.meta["val"])[0]
        return io_cost(ctx, node, sympy.nsimplify(ops) * numel(ctx, out), kind)

    return rule


def per_input_element(ops: float, kind: str) -> Callable[[PassContext, fx.Node], Cost]:
    def rule(ctx: PassContext, node: fx.Node) -> Cost:
        first = tensor_vals(node.args[0].meta["val"])[0]
        return io_cost(ctx, node, sympy.nsimplify(ops) * numel(ctx, first), kind)

    return rule


def moves_bytes(ctx: PassContext, node: fx.Node) -> Cost:
    return io_cost(ctx, node, ZERO, "other")


def cast_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """A dtype conversion is a copy, free when it changes nothing."""
    src = tensor_vals(node.args[0].meta.get("val"))
    out = tensor_vals(node.meta.get("val"))
    if src and out and src[0].dtype == out[0].dtype and src[0].device == out[0].device:
        return FREE
    return io_cost(ctx, node, ZERO, "pointwise")


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _op(name: str):
    """An ATen overload by 'op.overload' name; None when this torch version lacks it."""
    packet, overload = name.split(".")
    return getattr(getattr(aten, packet, None), overload, None)


def _free(ctx: PassContext, node: fx.Node) -> Cost:
    return FREE


LAYOUT_OPS = [
    _op("view.default"),
    _op("reshape.default"),
    _op("_unsafe_view.default"),
    _op("transpose.int"),
    _op("permute.default"),
    _op("expand.default"),
    _op("unsqueeze.default"),
    _op("squeeze.dim"),
    _op("squeeze.dims"),
    _op("squeeze.default"),
    _op("slice.Tensor"),
    _op("select.int"),
    _op("t.default"),
    _op("split.Tensor"),
    _op("split_with_sizes.default"),
    _op("chunk.default"),
    _op("unbind.int"),
    _op("alias.default"),
    _op("detach.default"),
    _op("flatten.using_ints"),
    _op("unflatten.int"),
    _op("as_strided.default"),
    _op("contiguous.default"),
    _op("sym_size.int"),
    _op("sym_numel.default"),
    _op("_assert_tensor_metadata.default"),
    _op("dropout.default"),
    _op("lift_fresh_copy.default"),
    _op("view_as.default"),
    _op("expand_as.default"),
    _op("numpy_T.default"),
    _op("mT.default"),
]

# Ops whose FLOPs per output element exceed one (primitives counted); other pointwise ops cost 1.
POINTWISE_OPS_PER_ELEMENT = {
    _op("gelu.default"): 9,
    _op("silu.default"): 4,
    _op("sigmoid.default"): 3,
    _op("tanh.default"): 1,
    _op("softplus.default"): 3,
    _op("erf.default"): 1,
    _op("hardswish.default"): 4,
    _op("mish.default"): 5,
}

BITWISE_OPS = {
    op
    for op in (
        _op("__and__.Tensor"),
        _op("__or__.Tensor"),
        _op("__xor__.Tensor"),
        _op("bitwise_not.default"),
        _op("bitwise_and.Tensor"),
        _op("bitwise_or.Tensor"),
        _op("logical_and.default"),
    )
    if op
}

_RULES: dict[object, Callable[[PassContext, fx.Node], Cost]] = {
    **{op: _free for op in LAYOUT_OPS},
    operator.getitem: _free,
    **{
        op: matmul_cost
        for op in (
            _op("mm.default"),
            _op("bmm.default"),
            _op("matmul.default"),
            _op("linear.default"),
            _op("addmm.default"),
            _op("baddbmm.default"),
        )
    },
    torch.ops.fxopt.gemv.default: gemv_cost,
    torch.ops.fxopt.gemv_qkv.default: gemv_qkv_cost,
    torch.ops._c10d_functional.all_reduce.default: all_reduce_cost,
    torch.ops._c10d_functional.all_gather_into_tensor.default: all_gather_cost,
    _op("scaled_dot_product_attention.default"): sdpa_cost,
    torch.ops.fxopt.attention.default: fxopt_attention_cost,
    torch.ops.fxopt.linear_gelu_tanh.default: matmul_cost,  # the GEMM's FLOPs; the epilogue's are not counted
    torch.ops.fxopt.linear_swiglu.default: linear_swiglu_cost,
    torch.ops.fxopt.cached_attention.default: cached_attention_cost,
    torch.ops.fxopt.cache_write.default: cache_write_cost,
    torch.ops.fxopt.rope.default: rope_cost,
    torch.ops.fxopt.rope_cache_write.default: rope_cache_write_cost,
    _op("embedding.default"): embedding_cost,
    _op("softmax.int"): per_input_element(3, "reduction"),
    _op("_softmax.default"): per_input_element(3, "reduction"),
    _op("log_softmax.int"): per_input_element(4, "reduction"),
    _op("_log_softmax.default"): per_input_element(4, "reduction"),
    _op("layer_norm.default"): per_input_element(8, "reduction"),
    _op("native_layer_norm.default"): per_input_element(8, "reduction"),
    _op("rms_norm.default"): per_input_element(4, "reduction"),
    **{
        op: per_input_element(1, "reduction")
        for op in (
            _op("sum.dim_IntList"),
            _op("sum.default"),
            _op("mean.dim"),
            _op("mean.default"),
            _op("amax.default"),
            _op("amin.default"),
            _op("max.dim"),
            _op("min.dim"),
            _op("argmax.default"),
            _op("cumsum.default"),
            _op("prod.dim_int"),
            _op("any.dim"),
            _op("all.dim"),
        )
    },
    _op("var.correction"): per_input_element(3, "reduction"),
    _op("var_mean.correction"): per_input_element(3, "reduction"),
    **{
        op: cast_cost
        for op in (
            _op("_to_copy.default"),
            _op("to.dtype"),
            _op("to.dtype_layout"),
            _op("to.device"),
            _op("type_as.default"),
        )
    },
    **{
        op: moves_bytes
        for op in (
            _op("clone.default"),
            _op("cat.default"),
            _op("stack.default"),
            _op("index.Tensor"),
            _op("index_select.default"),
            _op("gather.default"),
            _op("arange.default"),
            _op("arange.start"),
            _op("arange.start_step"),
            _op("full.default"),
            _op("zeros.default"),
            _op("ones.default"),
            _op("new_ones.default"),
            _op("new_zeros.default"),
            _op("zeros_like.default"),
            _op("ones_like.default"),
            _op("full_like.default"),
            _op("tril.default"),
            _op("triu.default"),
            _op("repeat_interleave.self_int"),
            _op("repeat.default"),
            _op("copy_.default"),
            _op("scatter.src"),
            _op("index_put.default"),
            _op("diff.default"),
            _op("roll.default"),
            _op("flip.default"),
            _op("empty.memory_format"),
            _op("scalar_tensor.default"),
        )
    },
}
COST_RULES = {op: rule for op, rule in _RULES.items() if op is not None}
IN_PLACE_RULES = {torch.ops.fxopt.cache_write.default, torch.ops.fxopt.rope_cache_write.default}


def node_cost(ctx: PassContext, node: fx.Node) -> Cost:
    """The Cost of one node; an op without a rule gets kind 'unknown' rather than a crash."""
    if node.op in ("placeholder", "output", "get_attr"):
        return FREE
    if node.op == "call_module" and node.target == "_guards_fn":
        return FREE  # export's input-shape checks
    if node.op == "call_module" and COST_KEY in node.meta:
        return node.meta[COST_KEY]  # a fused region: its cost was set when it was formed
    if node.op != "call_function":
        return Cost(ZERO, ZERO, ZERO, "unknown", note=f"unknown cost ({node.op} {node.target})")
    rule = COST_RULES.get(node.target)
    if rule is not None and node.target in IN_PLACE_RULES:
        return rule(ctx, node)  # returns nothing, but moves bytes
    if not tensor_vals(node.meta.get("val")):
        return FREE  # symbolic-int arithmetic and assertions move no tensor data
    if rule is not None:
        return rule(ctx, node)
    if node.target in BITWISE_OPS or (
        isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
    ):
        ops = POINTWISE_OPS_PER_ELEMENT.get(node.target, 1)
        return per_output_element(ops, "pointwise")(ctx, node)
    custom = getattr(node.target, "fxopt_cost", None)  # fxopt's own ops carry their rule
    if custom is not None:
        return custom(ctx, node)
    return Cost(ZERO, ZERO, ZERO, "unknown", note=f"unknown cost ({_op_name(node)})")


def _op_name(node: fx.Node) -> str:
    target = node.target
    return (
        str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    )


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Annotate every node with node.meta['fxopt.cost']; never changes the graph."""
    unknown = []
    for node in gm.graph.nodes:
        try:
            cost = node_cost(ctx, node)
        except Exception as exc:  # noqa: BLE001 - a rule failing on an odd node must not stop analysis
            cost = Cost(ZERO, ZERO, ZERO, "unknown", note=f"unknown cost ({_op_name(node)}: {exc})")
        node.meta[COST_KEY] = cost
        if cost.kind == "unknown":
            unknown.append(_op_name(node))
    notes = [f"unknown cost: {name}" for name in sorted(set(unknown))]
    return PassResult(changed=False, notes=notes, counts={"unknown": len(unknown)})


# ---------------------------------------------------------------- grouping and totals
LAYER_PATTERN = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def module_path(node: fx.Node) -> str:
    """The innermost nn.Module path a node was traced in, e.g. 'transformer.h.3.attn'."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if not str(path).startswith("_empty_nn_module_stack")]
    if not paths:
        return ""
    path = paths[-1]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def layer_of(node: fx.Node) -> str:
    """The repeated block a node belongs to ('model.layers.3'), or its top module."""
    path = module_path(node)
    match = LAYER_PATTERN.match(path)
    if match:
        return match.group(1)
    return path.split(".")[0] if path else ""


def total(costs: list[Cost]) -> Cost:
    flops = sympy.expand(sum((c.flops for c in costs), ZERO))
    read = sympy.expand(sum((c.bytes_read for c in costs), ZERO))
    written = sympy.expand(sum((c.bytes_written for c in costs), ZERO))
    link = sympy.expand(sum((c.link_bytes for c in costs), ZERO))
    return Cost(flops, read, written, "other", link_bytes=link)


def graph_total(gm: fx.GraphModule) -> Cost:
    return total([n.meta[COST_KEY] for n in gm.graph.nodes if COST_KEY in n.meta])


def kv_cache_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype=torch.float16) -> int:
    """K and V for one token in every layer: 2·n_layers·kv_heads·head_dim·element size."""
    return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
