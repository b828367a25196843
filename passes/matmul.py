"""Matmul layout pass: sibling linears -> one linear over concatenated weights; weights padded to aligned N.

Two rewrites of matmuls whose weight is a constant of the GraphModule (a `get_attr`), each a row of RULES:

  fuse_siblings  linears that read the SAME input (q/k/v projections; gate/up of a SwiGLU MLP), same dtype and
                 device, biases all constant or all absent -> ONE linear over the weights concatenated along N
                 (once, now), followed by a slice view `out[..., a:b]` per original output. One GEMM (at batch 1
                 decode: one GEMV) instead of three: fewer launches, better bandwidth per launch.
  pad_n          a linear / mm / addmm / matmul whose output width N is not a multiple of the alignment tensor-core
                 GEMMs need (16 bytes: 8 bf16/fp16 elements) -> a linear over a COPY of the weight padded with
                 zero rows to an aligned N (64 when that costs at most 1/64 more weight bytes, else the minimum
                 alignment), followed by the view `out[..., :N]`. An lm_head of N=50257 otherwise runs cuBLAS's
                 unaligned fallback (measured 9.1 ms against 1.1 ms padded for 8192x1024x50257 bf16, H200).
                 The padding rows are zeros, so the kept columns are exactly the original dot products; a weight
                 shared with an embedding (tied lm_head) keeps its original for the lookup, only the matmul reads
                 the padded copy. K is never padded: that would need a copy of the activation at every call, so a
                 weight with an unaligned K is left alone and counted (`k_unaligned`).

DECODE_RULES rewrite a static batch-1 decode program (after the rope pass): each constant-weight linear (or mm /
addmm, HF's Conv1D, whose (K, N) weight is read through a row-major copy made once) becomes fxopt::gemv
(codegen/gemv.py), and the RMSNorm or LayerNorm before it, the SwiGLU product or GELU and the residual add after
it, and for the q/k/v projection the head split, RoPE and K/V cache writes (fxopt::gemv_qkv) are folded into that
kernel. Eval-mode dropouts are dropped first, so that a GPT-2 projection's residual add is its GEMV's user.

A rewrite whose outputs become strided views is refused when a downstream view (`aten.view`) can no longer be
taken over the new strides; the check re-runs every layout op downstream of the rewritten outputs under the
graph's FakeTensorMode, and those nodes' meta["val"] take the new strides. New tensors are registered as
buffers of the GraphModule; originals no node reads any more are dropped from it (the user's model keeps its
own). Results change only by float rounding (the same dot products, computed by a different GEMM call).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxopt import opnames
from fxopt.nodes import aten_ops, is_full_slice, only_user
from fxopt.nodes import meta_val as _val
from fxopt.passes import cost as cost_pass
from fxopt.passes.infra import PassContext, PassResult
from fxopt.passes.rules import LAYOUT_TARGETS, DownstreamVals, Rewriter, Rule, apply_rules, fetch, run_rules  # noqa: F401  (fetch, Rewriter: also read by tests)

aten = torch.ops.aten

PREFERRED_ALIGN = 64  # elements: whole tensor-core tiles
MAX_PAD_OVERHEAD = 1 / 64  # pad to PREFERRED_ALIGN only when it adds at most this share of the weight's bytes

LINEAR = aten.linear.default
ROPE = torch.ops.fxopt.rope.default  # registered by the cost pass's imports (codegen/rope.py, attention_op.py)
ROPE_CACHE_WRITE = torch.ops.fxopt.rope_cache_write.default
CACHE_WRITE = torch.ops.fxopt.cache_write.default
SLICE = aten.slice.Tensor
MATMUL_TARGETS = (aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default)
TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default)


def min_align(dtype: torch.dtype) -> int:
    """Elements per 16 bytes (what cuBLAS's aligned tensor-core kernels need), at least 8."""
    return max(8, 16 // torch.empty((), dtype=dtype).element_size())


def aligned_size(n: int, dtype: torch.dtype) -> int:
    """n itself when aligned; else the next multiple of 64 if that costs <= 1/64 more, else of min_align."""
    low = min_align(dtype)
    if n % low == 0:
        return n
    preferred = -(-n // PREFERRED_ALIGN) * PREFERRED_ALIGN
    if preferred - n <= n * MAX_PAD_OVERHEAD:
        return preferred
    return -(-n // low) * low


# ------------------------------------------------------------------------------------------ reading the graph
def _const(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a get_attr node names, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = fetch(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _is_transpose_2d(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in TRANSPOSES:
        return False
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return True


@dataclass
class WeightMatmul:
    """A matmul of an activation by a constant weight, normalised to the linear's view: y = x @ W.T + b, W (N, K).

    `transposed` says the stored tensor is W.T (K, N), as for mm(x, W_kn) and HF's Conv1D addmm; `via` is the
    transpose node between the get_attr and the matmul when the stored tensor is W (N, K) but read transposed.
    """

    node: fx.Node
    x: fx.Node
    weight: fx.Node  # get_attr
    tensor: torch.Tensor
    transposed: bool
    via: fx.Node | None = None
    bias: fx.Node | None = None

    @property
    def n(self) -> int:
        return int(self.tensor.shape[0 if not self.transposed else 1])

    @property
    def k(self) -> int:
        return int(self.tensor.shape[1 if not self.transposed else 0])

    def weight_nk(self) -> torch.Tensor:
        return self.tensor.t() if self.transposed else self.tensor


def as_weight_matmul(gm: fx.GraphModule, node: fx.Node) -> WeightMatmul | None:
    """linear(x, W[, b]) / mm(x, W') / matmul(x, W') / addmm(b, x, W') with W constant, else None."""
    if node.op != "call_function" or node.target not in MATMUL_TARGETS:
        return None
    args = _positional_args(node)
    if args is None:
        return None
    if node.target is LINEAR:
        if len(args) not in (2, 3) or not isinstance(args[0], fx.Node):
            return None
        tensor = _const(gm, args[1])
        if tensor is None or tensor.dim() != 2:
            return None
        return WeightMatmul(node, args[0], args[1], tensor, False, None, args[2] if len(args) == 3 else None)
    if node.target is aten.addmm.default:
        if len(args) != 3:
            return None
        bias, x, w = args
    else:
        if len(args) != 2:
            return None
        bias, x, w = None, args[0], args[1]
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
        return None
    via = None
    if _is_transpose_2d(w) and isinstance(w.args[0], fx.Node):
        via, w = w, w.args[0]
    tensor = _const(gm, w)
    if tensor is None or tensor.dim() != 2:
        return None
    return WeightMatmul(node, x, w, tensor, via is None, via, bias)


def _positional_args(node: fx.Node) -> list | None:
    """The node's arguments as a positional list (a bias=None keyword is dropped), or None if unknown."""
    if not node.kwargs:
        return list(node.args)
    if set(node.kwargs) - {"bias"}:
        return None
    args = list(node.args)
    if node.kwargs.get("bias") is not None:
        args.append(node.kwargs["bias"])
    return args


def _slice_last(rw: Rewriter, out: fx.Node, start: int, end: int, like: fx.Node) -> fx.Node:
    dim = out.meta["val"].dim() - 1
    return rw.call(SLICE, (out, dim, start, end), like)


def _last_dim_slice_of(node: fx.Node, src: fx.Node) -> tuple[int, int] | None:
    """(start, end) when `node` is slice(src, last dim, start, end) with constant bounds, else None."""
    if node.op != "call_function" or node.target is not SLICE or node.args[0] is not src:
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args
    rank = src.meta["val"].dim()
    if dim is None or dim % rank != rank - 1 or step not in (None, 1):
        return None
    start = 0 if start is None else start
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return start, end


# ------------------------------------------------------------------------------------------ rule: fuse siblings
@dataclass
class SiblingGroup:
    x: fx.Node
    members: list[WeightMatmul]
    vals: dict[fx.Node, Any] = field(default_factory=dict)  # set by the check: downstream layout values


def sibling_linears(gm: fx.GraphModule) -> list[SiblingGroup]:
    """Linears reading the same input with constant weights of one dtype/device/K, biases all or none constant."""
    groups: dict[tuple, list[WeightMatmul]] = {}
    for node in gm.graph.nodes:
        m = as_weight_matmul(gm, node)
        if m is None or node.target is not LINEAR:
            continue
        bias = _const(gm, m.bias) if m.bias is not None else None
        if m.bias is not None and (bias is None or bias.dim() != 1):
            continue  # a computed bias: left alone
        t = m.tensor
        key = (m.x, t.dtype, t.device, m.k, m.bias is not None)
        groups.setdefault(key, []).append(m)
    return [SiblingGroup(ms[0].x, ms) for ms in groups.values() if len(ms) > 1]


def check_siblings(rw: Rewriter, group: SiblingGroup) -> str | None:
    """The fused linear's slices must stand in for every member's output, views downstream included."""
    if any(not isinstance(_val(m.node), torch.Tensor) for m in group.members):
        return "an output without a tensor meta['val']"
    first = group.members[0]
    biases = [_const(rw.gm, m.bias) for m in group.members if m.bias is not None]
    if len({b.dtype for b in biases}) > 1:
        return "biases of different dtypes"
    total = sum(m.n for m in group.members)
    try:
        with rw.fake_mode:
            w = torch.empty((total, first.k), dtype=first.tensor.dtype, device=first.tensor.device)
            b = torch.empty((total,), dtype=biases[0].dtype, device=biases[0].device) if biases else None
        out = rw.fake_run(LINEAR, (group.x, w) + ((b,) if b is not None else ()))
        replaced, start = {}, 0
        with rw.fake_mode:
            for m in group.members:
                replaced[m.node] = aten.slice.Tensor(out, out.dim() - 1, start, start + m.n)
                if (replaced[m.node].shape, replaced[m.node].dtype) != (m.node.meta["val"].shape,
                                                                       m.node.meta["val"].dtype):
                    return f"the slice for `{m.node.name}` does not match its value"
                start += m.n
    except Exception as exc:  # noqa: BLE001 - the fused op cannot stand in: leave the group
        return f"fake run failed: {type(exc).__name__}: {exc}"
    vals = rw.downstream_vals(replaced)
    if isinstance(vals, str):
        return vals
    group.vals = vals
    return None


def fuse_siblings(rw: Rewriter, group: SiblingGroup) -> None:
    gm, members = rw.gm, group.members
    first = members[0]
    weights = [m.weight.target for m in members]
    name = rw.register(("cat", tuple(weights)), f"{first.weight.target}_cat{len(members)}",
                       lambda: torch.cat([m.tensor.detach() for m in members], dim=0).contiguous())
    bias_name = None
    if first.bias is not None:
        biases = [m.bias.target for m in members]
        bias_name = rw.register(("cat", tuple(biases)), f"{first.bias.target}_cat{len(members)}",
                                lambda: torch.cat([fetch(gm, t).detach() for t in biases], dim=0).contiguous())
    with gm.graph.inserting_before(first.node):
        args = (group.x, rw.get_attr(name)) + ((rw.get_attr(bias_name),) if bias_name else ())
        fused = rw.call(LINEAR, args, first.node)
        start = 0
        for m in members:
            piece = _slice_last(rw, fused, start, start + m.n, m.node)
            start += m.n
            m.node.replace_all_uses_with(piece)
    rw.apply_vals(group.vals)
    for m in members:
        rw.drop_if_unused(m.node)
        rw.drop_if_unused(m.weight, m.bias)
    rw.count("fused_linears", len(members))


# ------------------------------------------------------------------------------------------ rule: pad N
@dataclass
class PadMatch:
    m: WeightMatmul
    n_padded: int
    vals: dict[fx.Node, Any] = field(default_factory=dict)


def unaligned_matmuls(gm: fx.GraphModule) -> list[PadMatch]:
    """Weight matmuls whose N needs padding (K-unaligned weights are noted by the check, never padded)."""
    out = []
    for node in list(gm.graph.nodes):
        m = as_weight_matmul(gm, node)
        if m is None:
            continue
        n_padded = aligned_size(m.n, m.tensor.dtype)
        if n_padded != m.n or m.k % min_align(m.tensor.dtype):
            out.append(PadMatch(m, n_padded))
    return out


def check_pad(rw: Rewriter, match: PadMatch) -> str | None:
    m = match.m
    if m.k % min_align(m.tensor.dtype):
        rw.count("k_unaligned")
        return f"K={m.k} is not a multiple of {min_align(m.tensor.dtype)}: padding K would copy the activation"
    val = _val(m.node)
    if not isinstance(val, torch.Tensor) or not isinstance(_val(m.x), torch.Tensor):
        return "no tensor meta['val']"
    if m.bias is not None:
        bias = _const(rw.gm, m.bias)
        if bias is None or bias.dim() != 1 or bias.shape[0] != m.n:
            return "its bias is not a constant vector of N elements"
    try:
        with rw.fake_mode:
            w = torch.empty((match.n_padded, m.k), dtype=m.tensor.dtype, device=m.tensor.device)
        out = rw.fake_run(LINEAR, (m.x, w))
        with rw.fake_mode:
            new = aten.slice.Tensor(out, out.dim() - 1, 0, m.n)
        if tuple(new.shape) != tuple(val.shape) or new.dtype != val.dtype:
            return f"padded result {tuple(new.shape)} {new.dtype} != {tuple(val.shape)} {val.dtype}"
    except Exception as exc:  # noqa: BLE001
        return f"fake run failed: {type(exc).__name__}: {exc}"
    # a view that merges the padded dim becomes a copy: one pass over the output, far cheaper than the
    # unaligned product (8.8 ms -> 1.3 ms for gpt2's 50257-wide head on an H200)
    vals = rw.downstream_vals({m.node: new}, copy_if_needed=True)
    if isinstance(vals, str):
        return vals
    match.vals = vals
    return None


def pad_n(rw: Rewriter, match: PadMatch) -> None:
    gm, m, n_pad = rw.gm, match.m, match.n_padded

    def padded_weight() -> torch.Tensor:
        w = m.weight_nk().detach()
        out = w.new_zeros((n_pad, m.k))  # zero rows: the padded outputs are 0, never read
        out[: m.n].copy_(w)
        return out

    name = rw.register(("pad", m.weight.target, m.transposed, n_pad), f"{m.weight.target}_pad{n_pad}", padded_weight)
    bias_name = None
    if m.bias is not None:
        bias = _const(gm, m.bias).detach()

        def padded_bias() -> torch.Tensor:
            out = bias.new_zeros((n_pad,))
            out[: m.n].copy_(bias)
            return out

        bias_name = rw.register(("pad", m.bias.target, n_pad), f"{m.bias.target}_pad{n_pad}", padded_bias)
    with gm.graph.inserting_before(m.node):
        args = (m.x, rw.get_attr(name)) + ((rw.get_attr(bias_name),) if bias_name else ())
        wide = rw.call(LINEAR, args, m.node)
        narrow = _slice_last(rw, wide, 0, m.n, m.node)
    m.node.replace_all_uses_with(narrow)
    rw.apply_vals(match.vals)
    rw.drop_if_unused(m.node)
    rw.drop_if_unused(m.via)
    rw.drop_if_unused(m.weight, m.bias)
    # slice(slice(wide, 0, N), a, b) with b <= N (a fused sibling's piece) -> slice(wide, a, b)
    for user in list(narrow.users):
        bounds = _last_dim_slice_of(user, narrow)
        if bounds is not None and 0 <= bounds[0] and bounds[1] <= m.n:
            user.replace_input_with(narrow, wide)
    rw.drop_if_unused(narrow)


# ------------------------------------------------------------------------------------------ the table
RULES: tuple[Rule, ...] = (
    Rule("fuse_siblings", sibling_linears, check_siblings, fuse_siblings),
    Rule("pad_n", unaligned_matmuls, check_pad, pad_n),
)


# ------------------------------------------------------------------------------------------ decode: one-row GEMVs
def one_row_linears(gm: fx.GraphModule) -> list[WeightMatmul]:
    """linear(x, W[, b]), mm / matmul(x, W') or addmm(b, x, W') (HF's Conv1D: W' stored (K, N)) with W constant
    and x a single row of static size: decode at batch 1."""
    matches = []
    for node in gm.graph.nodes:
        m = as_weight_matmul(gm, node)
        x = _val(m.x) if m is not None else None
        if m is not None and isinstance(x, torch.Tensor) and x.dim() >= 1:
            rows = x.shape[:-1]
            if all(isinstance(d, int) for d in rows) and math.prod(rows) == 1:
                matches.append(m)
    return matches


def check_gemv(rw: Rewriter, m: WeightMatmul) -> str | None:
    from fxopt.codegen import gemv

    bias = fetch(rw.gm, m.bias.target) if isinstance(m.bias, fx.Node) and m.bias.op == "get_attr" else None
    if m.bias is not None and bias is None:
        return "bias is computed, not a constant"
    if bias is not None and bias.dim() != 1:
        return "bias is not a vector"
    out, x = _val(m.node), _val(m.x)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (*x.shape[:-1], m.n) or out.dtype != x.dtype:
        return "the product's value is not x's rows times N"
    # a weight stored (K, N) is read through its row-major (N, K) copy, made by the rewrite
    weight = m.tensor if not m.transposed else torch.empty((m.n, m.k), dtype=m.tensor.dtype, device="meta")
    return gemv.supports(x, weight, bias)


# fxopt::gemv's arguments, by position, and the defaults of those after the bias
G_X, G_W, G_BIAS, G_RES, G_NORM_W, G_EPS, G_GLU, G_NORM_B, G_LAYER, G_ACT, G_RES2 = range(11)
GEMV_DEFAULTS = (None, None, 0.0, False, None, False, "none", None)
CASTS = aten_ops(*opnames.CASTS)


def _row_major_weight(rw: Rewriter, m: WeightMatmul) -> fx.Node:
    """The get_attr of W (N, K) row-major: the matmul's own, or for a weight stored (K, N) (Conv1D) a transposed
    copy registered once per weight as a new buffer (the prefill program keeps reading the original)."""
    if not m.transposed:
        return m.weight
    name = rw.register(("t", m.weight.target), f"{m.weight.target}_t", lambda: m.tensor.detach().t().contiguous())
    return rw.get_attr(name)


def to_gemv(rw: Rewriter, m: WeightMatmul) -> None:
    from fxopt.codegen import gemv  # noqa: F401 - registers fxopt::gemv

    with rw.gm.graph.inserting_before(m.node):
        args = (m.x, _row_major_weight(rw, m), m.bias) + GEMV_DEFAULTS
        node = rw.call(torch.ops.fxopt.gemv.default, args, like=m.node)
    m.node.replace_all_uses_with(node)
    rw.gm.graph.erase_node(m.node)
    rw.drop_if_unused(m.via, m.weight)


def _gemvs(gm: fx.GraphModule) -> list[fx.Node]:
    target = getattr(getattr(torch.ops, "fxopt", None), "gemv", None)
    return [n for n in gm.graph.nodes if target is not None and n.op == "call_function"
            and n.target == torch.ops.fxopt.gemv.default]


def _set_gemv_args(rw: Rewriter, node: fx.Node, changes: dict[int, Any]) -> None:
    """Change some of a gemv node's arguments (position -> value) and recompute its fake value."""
    args = list(node.args) + list(GEMV_DEFAULTS[len(node.args) - G_RES:])
    for index, value in changes.items():
        args[index] = value
    node.args = tuple(args)
    node.meta["val"] = rw.fake_run(node.target, node.args)
    if rw.costed:
        node.meta[cost_pass.COST_KEY] = cost_pass.node_cost(rw.ctx, node)


# reshapes that keep a row's elements in order, and the size-1 dims one-row programs add and drop
ROW_RESHAPES = aten_ops(*opnames.RESHAPES, "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default")


def _is_reshape(node) -> bool:
    """node re-views its input keeping the row-major order of its elements: a reshape-like op, or a slice that
    keeps the whole dim (HF's `hidden_states[:, slice(-0, None)]` before the lm_head)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return False
    return node.target in ROW_RESHAPES or is_full_slice(node)


def _reshapes_below(node: fx.Node) -> list[fx.Node]:
    """The chain of reshapes reading node, each the only user of the one before (HF's Conv1D views its
    (1, N) product back to (1, 1, N)); [] when node's user is no reshape."""
    chain = []
    while (user := only_user(chain[-1] if chain else node)) is not None and _is_reshape(user):
        chain.append(user)
    return chain


def _reshapes_above(node) -> tuple[Any, list[fx.Node]]:
    """(source, chain): node's input through the reshapes node is made of, outermost first in chain."""
    chain = []
    while _is_reshape(node):
        chain.append(node)
        node = node.args[0]
    return node, chain


# ------------------------------------------------------------------------------------------ decode: dropouts
def identity_dropouts(gm: fx.GraphModule) -> list[fx.Node]:
    """dropout(x, p, train=False), or with p = 0: x itself (what an eval model's graph keeps between a
    projection and its residual add)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.dropout.default:
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
            if train is False or p == 0:
                out.append(node)
    return out


def check_dropout(rw: Rewriter, node: fx.Node) -> str | None:
    x = node.args[0]
    if not isinstance(x, fx.Node) or not isinstance(_val(x), torch.Tensor):
        return "not a tensor"
    if (_val(x).shape, _val(x).dtype) != (_val(node).shape, _val(node).dtype):
        return "changes the shape or dtype"
    return None


def drop_dropout(rw: Rewriter, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    rw.gm.graph.erase_node(node)


@dataclass
class GluMatch:
    gemv: fx.Node
    nodes: list[fx.Node]  # slice(gate), slice(up), silu, mul: replaced by the gemv's output


def swiglu_of(out: fx.Node) -> list[fx.Node] | None:
    """[slice(gate), slice(up), silu, mul] when `out`'s only uses are silu(out[..., :F]) * out[..., F:2F] (what
    fuse_siblings leaves of a SwiGLU MLP's gate/up projections), else None."""
    halves = sorted((_last_dim_slice_of(u, out) or (-1, -1), u.name, u) for u in out.users)
    n = _val(out).shape[-1]
    if len(halves) != 2 or [h[0] for h in halves] != [(0, n // 2), (n // 2, n)]:
        return None
    gate, up = halves[0][2], halves[1][2]
    silu = only_user(gate)
    mul = only_user(silu) if silu is not None and silu.target is aten.silu.default else None
    if mul is not None and mul.target is aten.mul.Tensor and set(mul.args) == {silu, up} and len(up.users) == 1:
        return [gate, up, silu, mul]
    return None


def swiglu_after_gemv(gm: fx.GraphModule) -> list[GluMatch]:
    """gemv(x, [W_gate; W_up]) -> silu(out[..., :F]) * out[..., F:2F]."""
    return [GluMatch(g, nodes) for g in _gemvs(gm) if not g.args[G_GLU] and (nodes := swiglu_of(g)) is not None]


def check_glu(rw: Rewriter, m: GluMatch) -> str | None:
    if m.gemv.args[G_BIAS] is not None or m.gemv.args[G_RES] is not None:
        return "the gate/up projection has a bias or an epilogue already"
    return None


def fold_glu(rw: Rewriter, m: GluMatch) -> None:
    *_, mul = m.nodes
    _set_gemv_args(rw, m.gemv, {G_GLU: True})
    mul.replace_all_uses_with(m.gemv)
    for node in reversed(m.nodes):
        rw.gm.graph.erase_node(node)


@dataclass
class ActMatch:
    gemv: fx.Node
    act: str  # codegen/gemv.ACTS: "gelu_tanh" or "gelu"
    src: fx.Node  # what the activation reads: the gemv, or the last of its reshapes
    nodes: list[fx.Node]  # the activation's nodes, its output first


def _scalar_operand(node, target, x) -> float | None:
    """c when node is target(x, c) or target(c, x) with c a number (no kwargs), else None."""
    if not isinstance(node, fx.Node) or node.target is not target or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    c = b if a is x else a if b is x else None
    return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else None


def _near(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= 1e-6 * abs(expected)


def _spelled_gelu_tanh(v: fx.Node) -> list[fx.Node] | None:
    """The nodes of 0.5 * v * (1 + tanh(sqrt(2/pi) * (v + 0.044715 * v**3))), output first, when they are
    all of v's users and each is used only on the way (HF's NewGELUActivation, "gelu_new"); else None."""
    mul, add = aten.mul.Tensor, aten.add.Tensor
    half = next((u for u in v.users if _scalar_operand(u, mul, v) == 0.5), None)
    cube = next((u for u in v.users if u.target is aten.pow.Tensor_Scalar and u.args[0] is v
                 and u.args[1] in (3, 3.0)), None)
    if half is None or cube is None or len(half.users) != 1:
        return None
    scaled = only_user(cube)
    if not _near(_scalar_operand(scaled, mul, cube), 0.044715):
        return None
    inner = only_user(scaled)
    if inner is None or inner.target is not add or inner.kwargs or set(inner.args) != {v, scaled}:
        return None
    arg = only_user(inner)
    if not _near(_scalar_operand(arg, mul, inner), math.sqrt(2 / math.pi)):
        return None
    tanh = only_user(arg)
    one_plus = only_user(tanh) if tanh is not None and tanh.target is aten.tanh.default else None
    if _scalar_operand(one_plus, add, tanh) != 1.0:
        return None
    out = only_user(one_plus)
    if out is None or out.target is not mul or out.kwargs or set(out.args) != {half, one_plus}:
        return None
    if set(v.users) != {half, cube, inner}:
        return None
    return [out, one_plus, tanh, arg, inner, scaled, cube, half]


def gelu_after_gemv(gm: fx.GraphModule) -> list[ActMatch]:
    """gelu(gemv(...)) (aten.gelu, tanh-approximated or exact, or the tanh form spelled out in ops), possibly
    through reshapes of the gemv: the activation of GPT-2's MLP up-projection."""
    matches = []
    for g in _gemvs(gm):
        src = (_reshapes_below(g) or [g])[-1]
        user = only_user(src)
        if user is not None and user.target is aten.gelu.default and user.args[0] is src:
            approximate = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
            act = {"tanh": "gelu_tanh", "none": "gelu"}.get(approximate)
            if act is not None:
                matches.append(ActMatch(g, act, src, [user]))
        elif (spelled := _spelled_gelu_tanh(src)) is not None:
            matches.append(ActMatch(g, "gelu_tanh", src, spelled))
    return matches


def check_act(rw: Rewriter, m: ActMatch) -> str | None:
    g = m.gemv
    if g.args[G_GLU] or g.args[G_RES] is not None or g.args[G_ACT] != "none":
        return "the projection has a SwiGLU, residual or activation epilogue already"
    out, src = _val(m.nodes[0]), _val(m.src)
    if not isinstance(out, torch.Tensor) or (out.shape, out.dtype) != (src.shape, src.dtype):
        return "the activation changes the shape or dtype"
    return None


def fold_act(rw: Rewriter, m: ActMatch) -> None:
    _set_gemv_args(rw, m.gemv, {G_ACT: m.act})
    m.nodes[0].replace_all_uses_with(m.src)
    for node in m.nodes:  # users first
        rw.gm.graph.erase_node(node)


@dataclass
class ResidualMatch:
    gemv: fx.Node
    add: fx.Node
    out: fx.Node | None = None  # what the add reads of the gemv: the gemv, or the last of its reshapes

    def __post_init__(self):
        self.out = self.out or self.gemv

    @property
    def residual(self):
        """The add's other operand, read when used: an earlier rewrite may have replaced it."""
        a, b = self.add.args[:2]
        return b if a is self.out else a


def residual_add_after_gemv(gm: fx.GraphModule) -> list[ResidualMatch]:
    """residual + gemv(...) (either order), possibly through reshapes of the gemv, where each node of the
    way is the only user of the one before; or gemv(...) += residual in place (Falcon's `mlp_output +=
    attention_output`): the GEMV's fresh output is what it mutates, so it is the same sum."""
    matches = []
    for g in _gemvs(gm):
        out = (_reshapes_below(g) or [g])[-1]
        add = only_user(out)
        if add is None or len(add.args) != 2 or add.kwargs:
            continue
        if add.target is aten.add.Tensor or (add.target is aten.add_.Tensor and add.args[0] is out):
            matches.append(ResidualMatch(g, add, out))
    return matches


def _defined_before(graph: fx.Graph, first: fx.Node, second: fx.Node) -> bool:
    for node in graph.nodes:
        if node is first:
            return True
        if node is second:
            return False
    return False


def check_residual(rw: Rewriter, m: ResidualMatch, slot: int = G_RES) -> str | None:
    residual, args = m.residual, list(m.gemv.args) + list(GEMV_DEFAULTS[len(m.gemv.args) - G_RES:])
    if slot == G_RES2 and (args[G_RES] is None or args[G_RES2] is not None):
        return "not a GEMV with one residual add folded"
    if args[slot] is not None or not isinstance(residual, fx.Node) or residual is m.out:
        return "no tensor residual"
    out, res = _val(m.add), _val(residual)
    if not isinstance(res, torch.Tensor) or not _defined_before(rw.gm.graph, residual, m.gemv):
        return "the residual is computed after the GEMV"
    if res.shape != out.shape or res.dtype != out.dtype or out.dtype != _val(m.gemv).dtype \
            or _val(m.out).shape != out.shape:
        return "the residual is broadcast or of another dtype"
    return None


def fold_residual(rw: Rewriter, m: ResidualMatch, slot: int = G_RES) -> None:
    _set_gemv_args(rw, m.gemv, {slot: m.residual})  # read as a flat vector of N: its shape may differ
    m.add.replace_all_uses_with(m.out)
    rw.gm.graph.erase_node(m.add)


def second_residual_add_after_gemv(gm: fx.GraphModule) -> list[ResidualMatch]:
    """residual_add_after_gemv's matches whose GEMV has one residual add folded already."""
    return [m for m in residual_add_after_gemv(gm) if m.gemv.args[G_RES] is not None]


def check_residual2(rw: Rewriter, m: ResidualMatch) -> str | None:
    return check_residual(rw, m, G_RES2)


def fold_residual2(rw: Rewriter, m: ResidualMatch) -> None:
    fold_residual(rw, m, G_RES2)


@dataclass
class NormMatch:
    gemv: fx.Node
    source: fx.Node  # the normalised row h
    weight: fx.Node  # get_attr of the norm's weight
    eps: float
    chain: list[fx.Node]  # weight * cast(h * rsqrt(mean(h^2) + eps)), users first


def _cast_source(node, dtype=None):
    """node's input when node is a dtype cast (to / _to_copy), optionally only to `dtype`; else None."""
    if not isinstance(node, fx.Node) or node.target not in CASTS:
        return None
    target = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    return node.args[0] if dtype is None or target == dtype else None


def _other(node: fx.Node, one) -> Any:
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def match_rms_norm(gm: fx.GraphModule, x: fx.Node) -> tuple | None:
    """(h, weight node, eps, chain) when x = weight * cast(hf * rsqrt(mean(hf^2, -1, keepdim) + eps)), hf = h
    or h cast to fp32 (LlamaRMSNorm, as models/llama.py and HF write it); else None."""
    if x.target is not aten.mul.Tensor or len(x.args) != 2:
        return None
    weight = next((a for a in x.args if _const(gm, a) is not None and _const(gm, a).dim() == 1), None)
    if weight is None:
        return None
    t = _other(x, weight)
    u = _cast_source(t) or t
    if not isinstance(u, fx.Node) or u.target is not aten.mul.Tensor:
        return None
    rsqrt = next((a for a in u.args if isinstance(a, fx.Node) and a.target is aten.rsqrt.default), None)
    hf = _other(u, rsqrt) if rsqrt is not None else None
    add = rsqrt.args[0] if rsqrt is not None else None
    if not isinstance(hf, fx.Node) or not isinstance(add, fx.Node) or add.target is not aten.add.Tensor:
        return None
    mean, eps = add.args[:2] if isinstance(add.args[0], fx.Node) else add.args[1::-1]
    if not isinstance(eps, float) or not isinstance(mean, fx.Node) or mean.target is not aten.mean.dim:
        return None
    rank = _val(hf).dim()
    if [d % rank for d in mean.args[1]] != [rank - 1] or not (mean.args[2:3] == (True,) or mean.kwargs.get("keepdim")):
        return None
    pow_ = mean.args[0]
    if not isinstance(pow_, fx.Node) or pow_.target is not aten.pow.Tensor_Scalar or pow_.args != (hf, 2):
        return None
    h = _cast_source(hf, torch.float32) or hf
    chain = [x] + ([t] if t is not u else []) + [u, rsqrt, add, mean, pow_] + ([hf] if h is not hf else [])
    return h, weight, eps, chain


def rms_norm_before_gemv(gm: fx.GraphModule) -> list[NormMatch]:
    matches = []
    for g in _gemvs(gm):
        x = g.args[G_X]
        found = match_rms_norm(gm, x) if isinstance(x, fx.Node) and g.args[G_NORM_W] is None else None
        if found is not None:
            matches.append(NormMatch(g, *found))
    return matches


def check_norm(rw: Rewriter, m: NormMatch) -> str | None:
    h, x, w = _val(m.source), _val(m.gemv.args[G_X]), _const(rw.gm, m.weight)
    if not isinstance(h, torch.Tensor) or h.dtype != x.dtype or h.shape != x.shape or w.dtype != x.dtype:
        return "the norm changes the dtype or shape"
    return None


def fold_norm(rw: Rewriter, m: NormMatch) -> None:
    _set_gemv_args(rw, m.gemv, {G_X: m.source, G_NORM_W: m.weight, G_EPS: m.eps})
    rw.drop_if_unused(*m.chain)


@dataclass
class LayerNormMatch:
    gemv: fx.Node
    norm: fx.Node  # the normalised row: layer_norm(h, ...), or getitem 0 of native_layer_norm(h, ...)
    nodes: list[fx.Node]  # the norm's nodes, its output first
    reshapes: list[fx.Node]  # between the norm and the gemv's x, outermost first
    source: fx.Node  # h
    weight: Any
    bias: Any
    eps: float
    shape: list  # normalized_shape
    vals: dict[fx.Node, Any] = field(default_factory=dict)  # set by the check: the reshapes' values over h


def match_layer_norm(node) -> tuple | None:
    """(nodes, h, weight, bias, eps, normalized_shape) when node is aten.layer_norm(h, shape, w, b, eps) or
    getitem(native_layer_norm(h, shape, w, b, eps), 0) whose mean and rstd nobody reads; else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    nodes = [node]
    if node.target is operator.getitem and node.args[1] == 0:
        native = node.args[0]
        if not isinstance(native, fx.Node) or native.target is not aten.native_layer_norm.default:
            return None
        rest = [u for u in native.users if u is not node]  # getitems of mean and rstd, which must be unread
        if any(u.target is not operator.getitem or u.users for u in rest):
            return None
        nodes += rest + [native]
        args = list(native.args)
    elif node.target is aten.layer_norm.default and not node.kwargs:
        args = list(node.args)
    else:
        return None
    h, shape, weight, bias, eps = (args + [None, None, 1e-5][len(args) - 2:])[:5]  # the schema's defaults
    if not isinstance(h, fx.Node) or not isinstance(eps, float):
        return None
    return nodes, h, weight, bias, eps, list(shape)


def layer_norm_before_gemv(gm: fx.GraphModule) -> list[LayerNormMatch]:
    """gemv(LayerNorm(h)) with possibly reshapes between (HF's Conv1D views its input to (rows, K)): the
    norm before GPT-2's attention, MLP and lm_head projections."""
    matches = []
    for g in _gemvs(gm):
        if g.args[G_NORM_W] is not None or not isinstance(g.args[G_X], fx.Node):
            continue
        norm, reshapes = _reshapes_above(g.args[G_X])
        found = match_layer_norm(norm)
        if found is not None:
            nodes, h, weight, bias, eps, shape = found
            matches.append(LayerNormMatch(g, norm, nodes, reshapes, h, weight, bias, eps, shape))
    return matches


def check_layer_norm(rw: Rewriter, m: LayerNormMatch) -> str | None:
    """The norm's output must feed this GEMV alone (a norm read elsewhere too would be computed twice), over
    the row's last dim, with constant weights of the row's dtype the kernel takes."""
    from fxopt.codegen import gemv

    path = [m.norm] + m.reshapes[::-1] + [m.gemv]  # the norm, its reshapes, the gemv
    for node, nxt in zip(path, path[1:]):
        others = [u for u in node.users if u is not nxt]
        if not m.reshapes and all(_reads_as_row(u, node) for u in others):
            continue  # other GEMVs of the same row (Phi's q/k/v and fc1): each folds it, as every program
            # of a GEMV computes the row's statistics anyway
        if others:  # anything else: the norm stays, folding would compute it twice
            return f"the LayerNorm's output is also read by {', '.join(u.name for u in others)}"
    if any(a is path[-2] for i, a in enumerate(m.gemv.args) if i != G_X):
        return "the LayerNorm's output is also the GEMV's residual"
    h, x = _val(m.source), _val(m.gemv.args[G_X])
    if not isinstance(h, torch.Tensor) or (h.dtype, h.numel()) != (x.dtype, x.shape[-1]) \
            or [int(d) for d in m.shape] != [h.shape[-1]]:
        return "the LayerNorm is not over the GEMV's row of K"
    weight = _const(rw.gm, m.weight)
    bias = _const(rw.gm, m.bias) if m.bias is not None else None
    if weight is None or (m.bias is not None and bias is None):
        return "the LayerNorm has no constant weight" if weight is None else "the LayerNorm's bias is computed"
    vals = rw.downstream_vals({m.norm: h}) if m.reshapes else {}
    if isinstance(vals, str):
        return vals
    m.vals = vals
    ep = gemv.Folded(norm_weight=weight, norm_bias=bias, eps=m.eps, layer_norm=True)
    return gemv.supports(x, _val(m.gemv.args[G_W]), _val(m.gemv.args[G_BIAS]), ep)


def _reads_as_row(user: fx.Node, x: fx.Node) -> bool:
    """user is a GEMV without a norm prologue whose row is x (and that reads x nowhere else)."""
    return user.target == torch.ops.fxopt.gemv.default and user.args[G_X] is x and user.args[G_NORM_W] is None \
        and sum(a is x for a in user.args) == 1


def fold_layer_norm(rw: Rewriter, m: LayerNormMatch) -> None:
    x = m.source
    if m.reshapes:  # the reshapes now view h itself
        m.reshapes[-1].replace_input_with(m.norm, m.source)
        rw.apply_vals(m.vals)
        x = m.gemv.args[G_X]
    _set_gemv_args(rw, m.gemv, {G_X: x, G_NORM_W: m.weight, G_NORM_B: m.bias, G_EPS: m.eps, G_LAYER: True})
    rw.drop_if_unused(*m.nodes)


# ------------------------------------------------------------------------------------------ decode: q/k/v heads
@dataclass
class HeadsMatch:
    gemv: fx.Node  # the fused [W_q; W_k; W_v] GEMV
    heads: list[fx.Node]  # q, k, v split into heads, (b, heads, 1, d): the transposes of split_heads
    splits: list[fx.Node]  # their slices and views, users first
    q: fx.Node  # what attention reads as q: fxopt::rope of q's heads, or those heads
    writes: list[fx.Node]  # k's fxopt::(rope_)cache_write, then v's fxopt::cache_write
    norms: list = field(default_factory=lambda: [None, None, None])  # per head: (weight, eps, chain) of an
    # RMSNorm over d between the head split and the transpose (Qwen3's q_norm and k_norm), or None
    interleaved: bool = False  # W's rows grouped per head as [q_h; k_h; v_h] (GPT-NeoX's query_key_value)
    early_ropes: list = field(default_factory=lambda: [None, None, None])  # per head: an fxopt::rope between
    # the (b, s, heads, d) view and the transpose (GPT-J, Meta's Llama), or None


def _split_heads(node: fx.Node, norms: dict) -> tuple[fx.Node, fx.Node, tuple | None, fx.Node | None] | None:
    """(view, transpose, norm, rope) when node's only user views it as (b, s, heads, d) and the token and head
    dims are then swapped: split_heads as models/ and HF write it, the transpose reading the view itself, (norm
    = (weight, eps, chain)) an RMSNorm of it over d whose nodes nobody else reads (Qwen3's q_norm / k_norm), or
    (rope) an fxopt::rope of it (RoPE before the transpose: GPT-J, Meta's Llama). `norms`: the graph's RMSNorms
    by their input (_rms_norms_by_input)."""
    view = only_user(node)
    if view is None or view.target not in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return None
    heads, norm, rope = only_user(view), None, None
    if heads is not None and heads.target is ROPE and heads.args[0] is view:
        rope, heads = heads, only_user(heads)
    elif heads is not None and heads.target is not aten.transpose.int:
        heads, norm = _after_head_norm(view, norms)
    if heads is None or heads.target is not aten.transpose.int or not isinstance(_val(heads), torch.Tensor):
        return None
    rank = _val(heads).dim()
    if rank != 4 or sorted(d % rank for d in heads.args[1:3]) != [1, 2]:
        return None
    return view, heads, norm, rope


def _rms_norms_by_input(gm: fx.GraphModule) -> dict[fx.Node, tuple]:
    """Every RMSNorm of the graph (match_rms_norm at each multiply), by the node it normalises:
    h -> (its output, weight, eps, chain)."""
    found = {}
    for node in gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor):
        match = match_rms_norm(gm, node)
        if match is not None:
            h, weight, eps, chain = match
            found.setdefault(h, (node, weight, eps, chain))
    return found


def _after_head_norm(view: fx.Node, norms: dict) -> tuple[fx.Node | None, tuple | None]:
    """(the norm's only reader, (weight, eps, chain)) when view feeds an RMSNorm over its last dim and nothing
    else; (None, None) otherwise."""
    if view not in norms:
        return None, None
    out, weight, eps, chain = norms[view]
    inside = set(chain)
    if any(u not in inside for n in chain[1:] for u in n.users) or any(u not in inside for u in view.users):
        return None, None
    return only_user(out), (weight, eps, chain)


SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


def _three_parts(g: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """g's output cut along its last dim into three consecutive pieces, in order: three slices (what
    fuse_siblings leaves) or the getitems of one split (GPT-2's c_attn(x).split(d, dim=2)), possibly of a
    reshape of g (HF's Conv1D views its product back to (b, s, N)). Returns (pieces, the reshapes and split
    between g and the pieces)."""
    n = _val(g).shape[-1]
    between = _reshapes_below(g)
    src = (between or [g])[-1]
    split = only_user(src)
    if split is not None and split.target in SPLITS:
        rank = _val(src).dim()
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        items = {u.args[1]: u for u in split.users if u.target is operator.getitem}
        if dim % rank != rank - 1 or _val(src).shape[-1] != n or len(split.users) != 3 or sorted(items) != [0, 1, 2]:
            return None
        return [items[i] for i in range(3)], between + [split]
    parts = sorted(((_last_dim_slice_of(u, g) or (-1, -1)), u.name, u) for u in g.users)
    bounds = [b for (start, end), _, _ in parts for b in (start, min(end, n))]
    if len(parts) != 3 or bounds != [0, bounds[1], bounds[1], bounds[3], bounds[3], n]:
        return None
    return [node for _, _, node in parts], []


def _interleaved_heads(g: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(q, k, v heads, the nodes between g and them, users first) when g is viewed as (b, s, heads, 3d), the
    token and head dims swapped and the last dim cut into three equal parts: GPT-NeoX's query_key_value, whose
    rows are grouped per head as [q_h; k_h; v_h]."""
    between = _reshapes_below(g)
    heads = only_user(between[-1]) if between else None
    if heads is None or heads.target is not aten.transpose.int or _val(heads).dim() != 4 \
            or sorted(d % 4 for d in heads.args[1:3]) != [1, 2]:
        return None
    split, three_d = only_user(heads), _val(heads).shape[-1]
    if split is None or split.target not in (aten.chunk.default, *SPLITS) or three_d % 3:
        return None
    size = split.args[1] if len(split.args) > 1 else None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    thirds = {aten.chunk.default: 3, aten.split.Tensor: three_d // 3,
              aten.split_with_sizes.default: [three_d // 3] * 3}[split.target]  # chunks, or their sizes
    items = {u.args[1]: u for u in split.users if u.target is operator.getitem}
    if (list(size) if isinstance(size, (list, tuple)) else size) != thirds or dim % 4 != 3 \
            or len(split.users) != 3 or sorted(items) != [0, 1, 2]:
        return None
    return [items[i] for i in range(3)], [split, heads, *between[::-1]]


def _grouped_heads(g: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(q, k, v heads, the nodes between g and them, users first) when g is viewed as (b, s, kv_heads, n, d),
    q the first n - 2 of each group flattened into heads, k and v the last two selected, each then head-first:
    Falcon's new decoder architecture (rows grouped per KV head as [its q heads; k; v])."""
    between = _reshapes_below(g)
    view = between[-1] if between else None
    if view is None or _val(view).dim() != 5 or len(view.users) != 3:
        return None
    n = _val(view).shape[3]
    parts: dict[str, fx.Node] = {}
    for user in view.users:
        dim = user.args[1] if len(user.args) > 1 else None
        if not isinstance(dim, int) or dim % 5 != 3:
            return None
        if user.target is SLICE and tuple(user.args[2:]) in ((0, -2), (0, n - 2), (None, -2)):
            parts["q"] = user
        elif user.target is aten.select.int and isinstance(user.args[2], int) and user.args[2] % n in (n - 2, n - 1):
            parts["k" if user.args[2] % n == n - 2 else "v"] = user
    if sorted(parts) != ["k", "q", "v"]:
        return None
    flat, kv_heads = only_user(parts["q"]), _val(view).shape[2]
    if flat is None or not (flat.target is aten.flatten.using_ints or _is_reshape(flat)) \
            or list(_val(flat).shape[2:]) != [kv_heads * (n - 2), _val(view).shape[4]]:
        return None  # q's heads: each KV head's n - 2 in order, (b, s, q_heads, d)
    heads = [only_user(node) for node in (flat, parts["k"], parts["v"])]
    if any(h is None or h.target is not aten.transpose.int or sorted(d % 4 for d in h.args[1:3]) != [1, 2]
           for h in heads):
        return None
    return heads, [flat, parts["q"], parts["k"], parts["v"], *between[::-1]]


def _contiguous_heads(g: fx.Node, norms: dict) -> tuple[list, list[fx.Node], list, list] | None:
    """(q, k, v heads, the nodes between g and them, users first, their head norms, their early ropes) when g
    is cut into three last-dim pieces and each is split into heads (split_heads)."""
    parts, between = _three_parts(g) or ([], [])
    split = [_split_heads(node, norms) for node in parts]
    if not split or any(s is None for s in split):
        return None
    return ([s[1] for s in split], [s[0] for s in split] + parts + between[::-1], [s[2] for s in split],
            [s[3] for s in split])


def qkv_heads_after_gemv(gm: fx.GraphModule) -> list[HeadsMatch]:
    """gemv -> q, k and v heads (three last-dim slices covering it, each split into heads; or GPT-NeoX's
    per-head [q_h; k_h; v_h] view cut in three) -> q: attention (through fxopt::rope or not), k:
    fxopt::(rope_)cache_write, v: fxopt::cache_write. What the kv_cache, rope and fuse_siblings rewrites leave
    of a decode step's attention input."""
    matches, norms = [], _rms_norms_by_input(gm)
    for g in _gemvs(gm):
        interleaved = _interleaved_heads(g) or _grouped_heads(g)
        found = (*interleaved, [None] * 3, [None] * 3) if interleaved else _contiguous_heads(g, norms)
        match = _attention_input(g, *found, interleaved is not None) if found else None
        if match is not None:
            matches.append(match)
    return matches


def _attention_input(g: fx.Node, heads: list[fx.Node], splits: list[fx.Node], head_norms: list, early_ropes: list,
                     interleaved: bool) -> HeadsMatch | None:
    """The HeadsMatch when g's q, k and v heads go where a decode step's attention input goes (q to attention
    through fxopt::rope or not, k and v into their caches); None otherwise."""
    rope = only_user(heads[0])
    q = rope if rope is not None and rope.target is ROPE and rope.args[0] is heads[0] else heads[0]
    writes = [only_user(heads[1]), only_user(heads[2])]
    if writes[0] is None or writes[0].target not in (ROPE_CACHE_WRITE, CACHE_WRITE) or writes[1] is None \
            or writes[1].target is not CACHE_WRITE or any(w.args[1] is not h for w, h in zip(writes, heads[1:])):
        return None
    return HeadsMatch(g, heads, splits, q, writes, head_norms, interleaved, early_ropes)


@dataclass
class SplitMatch:
    """A GEMV that fuse_siblings made of q/k/v and other projections of the same row (Phi's parallel
    attention and MLP): its output tiled by last-dim slices, the first three the attention input."""

    gemv: fx.Node
    parts: list[tuple[int, int, fx.Node]]  # (start, end, slice), in order


def _tiling_slices(g: fx.Node) -> list[tuple[int, int, fx.Node]] | None:
    """g's users as (start, end, slice) when all are last-dim slices of it that tile [0, N) in order."""
    parts = sorted(((*(_last_dim_slice_of(u, g) or (-1, -1)), u) for u in g.users), key=lambda p: (p[0], p[2].name))
    n = _val(g).shape[-1]
    if not parts or parts[0][0] != 0 or any(a[1] != b[0] for a, b in zip(parts, parts[1:])) or parts[-1][1] != n:
        return None
    return parts


def merged_attention_input(gm: fx.GraphModule) -> list[SplitMatch]:
    """gemv -> four or more last-dim slices, the first three q, k and v split into heads for the attention
    of a decode step (the other slices: an MLP's up projection, as Phi's fc1)."""
    matches, norms = [], _rms_norms_by_input(gm)
    for g in _gemvs(gm):
        parts = _tiling_slices(g)
        if parts is None or len(parts) < 4:
            continue
        split = [_split_heads(node, norms) for _, _, node in parts[:3]]
        if any(s is None for s in split):
            continue
        heads, splits = [s[1] for s in split], [s[0] for s in split] + [node for _, _, node in parts[:3]]
        if _attention_input(g, heads, splits, [s[2] for s in split], [s[3] for s in split], False) is not None:
            matches.append(SplitMatch(g, parts))
    return matches


def check_split(rw: Rewriter, m: SplitMatch) -> str | None:
    g = m.gemv
    if g.args[G_GLU] or g.args[G_RES] is not None or g.args[G_ACT] != "none":
        return "the projection has an epilogue already"
    if not isinstance(g.args[G_W], fx.Node) or (g.args[G_BIAS] is not None and not isinstance(g.args[G_BIAS], fx.Node)):
        return "the weight or bias is not a graph value"
    return None


def split_attention_input(rw: Rewriter, m: SplitMatch) -> None:
    """Two GEMVs over row views of the same weight (no copy): [W_q; W_k; W_v], which gemv_qkv then takes with
    RoPE and the cache writes, and the rest, whose activation the GELU rule can then fold."""
    g, n_qkv, n = m.gemv, m.parts[2][1], m.parts[-1][1]
    w, bias = g.args[G_W], g.args[G_BIAS]
    with rw.gm.graph.inserting_before(g):
        def rows(t, lo, hi):
            return None if t is None else rw.call(SLICE, (t, 0, lo, hi), like=g)

        gemv_op, x, tail = torch.ops.fxopt.gemv.default, g.args[G_X], g.args[G_RES:]
        qkv = rw.call(gemv_op, (x, rows(w, 0, n_qkv), rows(bias, 0, n_qkv), *tail), like=g)
        rest = rw.call(gemv_op, (x, rows(w, n_qkv, n), rows(bias, n_qkv, n), *tail), like=g)
    for _, _, node in m.parts[:3]:
        node.replace_input_with(g, qkv)
    for start, end, node in m.parts[3:]:
        if len(m.parts) == 4:  # the one other projection: the GEMV itself
            node.replace_all_uses_with(rest)
            rw.gm.graph.erase_node(node)
        else:
            node.args = (rest, node.args[1], start - n_qkv, end - n_qkv)
            node.meta["val"] = rw.fake_run(SLICE, node.args)
    rw.gm.graph.erase_node(g)


def _same_value(a, b, gm: fx.GraphModule | None = None) -> bool:
    """a and b compute the same thing: the same node, the same op over the same values (the rope pass leaves
    q's and k's copies of `unsqueeze(cos, 1)`), the same attribute, or two outputs of one call of a submodule
    of gm that computes them alike (GPT-J builds q's and k's tables twice, inside the positions module)."""
    if a is b:
        return True
    if not isinstance(a, fx.Node) and not isinstance(b, fx.Node):  # constants: ints, floats, dtypes, lists
        return type(a) is type(b) and (a == b if not isinstance(a, (list, tuple)) else len(a) == len(b) and all(
            _same_value(x, y, gm) for x, y in zip(a, b)))
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or b.op != a.op:
        return False
    if a.op == "get_attr":
        return a.target == b.target
    if a.op != "call_function" or a.target is not b.target or len(a.args) != len(b.args) or a.kwargs != b.kwargs:
        return False
    if a.target is operator.getitem and gm is not None and a.args[0] is b.args[0] and a.args[0].op == "call_module":
        outputs = _submodule_outputs(gm, a.args[0])
        i, j = a.args[1], b.args[1]
        return outputs is not None and all(isinstance(k, int) and 0 <= k < len(outputs) for k in (i, j)) \
            and _same_value(outputs[i], outputs[j])
    return all(_same_value(x, y, gm) for x, y in zip(a.args, b.args))


def _submodule_outputs(gm: fx.GraphModule, call: fx.Node) -> list | None:
    """The output nodes of the fx graph the submodule `call` runs, or None when it is not a traced graph
    returning a tuple. The decode program's positions module (kv_cache.VmapPositions) vmaps its graph `fn`
    over the rows: outputs equal in `fn` are equal in it."""
    from fxopt.passes.kv_cache import VmapPositions

    sub = gm.get_submodule(call.target)
    sub = sub.fn if isinstance(sub, VmapPositions) else sub
    if not isinstance(sub, fx.GraphModule):
        return None
    out = next(iter(sub.graph.find_nodes(op="output")))
    values = out.args[0]
    return list(values) if isinstance(values, (list, tuple)) else None


def _qkv_args(m: HeadsMatch) -> tuple:
    """fxopt::gemv_qkv's arguments: x, weight, bias, norm_weight, eps (the GEMV's), cos, sin, caches, pos."""
    g, (k_write, v_write) = m.gemv, m.writes
    q_rope = _q_rope(m)
    cos, sin = (q_rope.args[1], q_rope.args[2]) if q_rope is not None else (None, None)
    pos = k_write.args[4] if k_write.target is ROPE_CACHE_WRITE else k_write.args[2]
    return (g.args[G_X], g.args[G_W], g.args[G_BIAS], g.args[G_NORM_W], g.args[G_EPS], cos, sin,
            k_write.args[0], v_write.args[0], pos)


def _q_rope(m: HeadsMatch) -> fx.Node | None:
    """q's fxopt::rope: after the head transpose (what attention reads), before it, or None."""
    return m.q if m.q is not m.heads[0] else m.early_ropes[0]


def _k_rotation(m: HeadsMatch) -> tuple | None:
    """(cos, sin, adjacent) of k's rotation: its fxopt::rope_cache_write's, or its rope before the transpose."""
    k_write, early = m.writes[0], m.early_ropes[1]
    if k_write.target is ROPE_CACHE_WRITE:
        return (*k_write.args[2:4], bool(any(k_write.args[5:6])))
    return (*early.args[1:3], bool(any(early.args[3:4]))) if early is not None else None


def _qkv_kwargs(m: HeadsMatch) -> dict[str, Any]:
    """gemv_qkv's LayerNorm and q/k norm arguments, by keyword (passes/cost.py reads a node's ten positional
    ones)."""
    g = m.gemv
    args = list(g.args) + list(GEMV_DEFAULTS[len(g.args) - G_RES:])
    kwargs = {"norm_bias": args[G_NORM_B], "layer_norm": True} if args[G_LAYER] else {}
    q_norm, k_norm, _ = m.norms
    if q_norm is not None and k_norm is not None:
        kwargs.update(q_norm_weight=q_norm[0], k_norm_weight=k_norm[0], qk_eps=q_norm[1])
    if m.interleaved:
        kwargs["interleaved"] = True
    q_rope = _q_rope(m)
    if q_rope is not None and any(q_rope.args[3:4]):
        kwargs["adjacent"] = True
    return kwargs


def _consumers(m: HeadsMatch) -> list[fx.Node]:
    """The nodes the fused op must precede: the writes, and q's rope or else q's readers."""
    return m.writes + ([m.q] if m.q is not m.heads[0] else list(m.heads[0].users))


def check_qkv(rw: Rewriter, m: HeadsMatch) -> str | None:
    from fxopt.codegen import gemv

    g, (k_write, v_write) = m.gemv, m.writes
    if g.args[G_GLU] or g.args[G_RES] is not None or g.args[G_ACT] != "none":
        return "the projection has an epilogue already"
    if _qkv_args(m)[-1] is not v_write.args[2]:
        return "k and v are written at different positions"
    q_rope, k_rotation = _q_rope(m), _k_rotation(m)
    if (q_rope is None) != (k_rotation is None) or m.early_ropes[2] is not None:
        return "RoPE on only one of q and k, or on v"
    if (m.q is not m.heads[0] and m.early_ropes[0] is not None) or (
            k_write.target is ROPE_CACHE_WRITE and m.early_ropes[1] is not None):
        return "q or k rotated twice"
    if q_rope is not None and not all(_same_value(a, b, rw.gm) for a, b in zip(q_rope.args[1:3], k_rotation[:2])):
        return "q and k are rotated by different tables"
    if q_rope is not None and bool(any(q_rope.args[3:4])) != k_rotation[2]:
        return "q and k pair their columns differently"
    x, w, bias, norm_w, eps, cos, sin, k_cache, v_cache, pos = args = _qkv_args(m)
    kwargs = _qkv_kwargs(m)
    vals = [_val(a) if isinstance(a, fx.Node) else a for a in args]
    q_heads, kv_heads, d = gemv.qkv_heads(vals[1], vals[7])
    if [tuple(_val(h).shape) for h in m.heads] != [(1, q_heads, 1, d), (1, kv_heads, 1, d), (1, kv_heads, 1, d)]:
        return "the head split does not match the caches' heads and head dim"
    q_norm, k_norm, v_norm = m.norms
    if v_norm is not None or (q_norm is None) != (k_norm is None):
        return "a head norm on v, or on only one of q and k"
    if q_norm is not None and q_norm[1] != k_norm[1]:
        return "q and k are normalised with different eps"
    ep = gemv.Folded(norm_weight=vals[3], eps=eps, norm_bias=_val(kwargs.get("norm_bias")),
                     layer_norm=kwargs.get("layer_norm", False),
                     q_norm_weight=_const(rw.gm, q_norm[0]) if q_norm else None,
                     k_norm_weight=_const(rw.gm, k_norm[0]) if k_norm else None, qk_eps=q_norm[1] if q_norm else 0.0,
                     heads_interleaved=m.interleaved, rope_adjacent=bool(kwargs.get("adjacent")))
    reason = gemv.supports_qkv(vals[0], vals[1], vals[2], ep, *vals[5:])
    if reason is not None:
        return reason
    order = {node: i for i, node in enumerate(rw.gm.graph.nodes)}
    first = min(order[c] for c in _consumers(m))
    if any(isinstance(a, fx.Node) and order[a] >= first for a in (*args, *kwargs.values())):
        return "an input is computed after q, k or v is first used"
    return None


def fold_qkv(rw: Rewriter, m: HeadsMatch) -> None:
    from fxopt.codegen import gemv  # noqa: F401 - registers fxopt::gemv_qkv

    order = {node: i for i, node in enumerate(rw.gm.graph.nodes)}
    first = min(_consumers(m), key=order.__getitem__)
    with rw.gm.graph.inserting_before(first):
        node = rw.call(torch.ops.fxopt.gemv_qkv.default, _qkv_args(m), like=m.gemv)
    if _qkv_kwargs(m):  # the LayerNorm prologue, the q/k head norms, the interleaved layout
        node.kwargs = _qkv_kwargs(m)
        node.meta["val"] = rw.fake_run(node.target, node.args, node.kwargs)
    m.q.replace_all_uses_with(node)
    k_rotation = _k_rotation(m)
    k_tables = list(k_rotation[:2]) if k_rotation is not None else []
    # q is its heads' node when not rotated: each node dropped once
    norm_chains = [n for norm in m.norms if norm is not None for n in norm[2]]
    early = [r for r in m.early_ropes if r is not None]
    rw.drop_if_unused(*dict.fromkeys([*m.writes, m.q, *m.heads, *early, *norm_chains, *m.splits, m.gemv,
                                      *k_tables]))


DECODE_RULES: tuple[Rule, ...] = (
    Rule("identity_dropout", identity_dropouts, check_dropout, drop_dropout),  # eval dropout: x itself, so that
    # the residual add after a projection is the GEMV's user
    Rule("gemv", one_row_linears, check_gemv, to_gemv),  # cuBLAS GEMV -> fxopt's (codegen/gemv.py)
    # q/k/v merged with another projection of the row (Phi's fc1): split, so gemv_qkv and gemv_gelu can fold
    Rule("gemv_split_qkv", merged_attention_input, check_split, split_attention_input),
    Rule("gemv_swiglu", swiglu_after_gemv, check_glu, fold_glu),  # silu(gate) * up: the GEMV's epilogue
    Rule("gemv_gelu", gelu_after_gemv, check_act, fold_act),  # GELU (tanh or erf): epilogue, before + residual
    Rule("gemv_residual", residual_add_after_gemv, check_residual, fold_residual),  # + residual: epilogue
    # and a second add after it: a parallel-residual block's mlp + attn + x (GPT-NeoX, Phi)
    Rule("gemv_residual2", second_residual_add_after_gemv, check_residual2, fold_residual2),
    Rule("gemv_rms_norm", rms_norm_before_gemv, check_norm, fold_norm),  # RMSNorm of x: prologue
    Rule("gemv_layer_norm", layer_norm_before_gemv, check_layer_norm, fold_layer_norm),  # LayerNorm: prologue
    # split into heads, RoPE on q and k, K/V cache writes: the q/k/v GEMV's epilogue (after passes/rope.py)
    Rule("gemv_qkv", qkv_heads_after_gemv, check_qkv, fold_qkv),
)


# ------------------------------------------------------------------------------------------ epilogues
@dataclass
class EpilogueMatch:
    """An activation whose only input is a linear with a bias, that linear's only use: one GEMM with an
    epilogue (codegen/epilogue.py)."""

    act: fx.Node
    linear: fx.Node


def gelu_tanh_after_linear(gm: fx.GraphModule) -> list[EpilogueMatch]:
    """gelu(linear(x, W, b), approximate="tanh"): GPT-2's MLP up-projection."""
    matches = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.gelu.default:
            continue
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        src = node.args[0]
        if approximate == "tanh" and isinstance(src, fx.Node) and src.target is LINEAR and len(src.users) == 1:
            matches.append(EpilogueMatch(node, src))
    return matches


def check_gelu_epilogue(rw: Rewriter, m: EpilogueMatch) -> str | None:
    from fxopt.codegen import epilogue

    args = list(m.linear.args) + [None] * (3 - len(m.linear.args))
    x, weight, bias = (_val(a) if isinstance(a, fx.Node) else a for a in args[:3])
    if not all(isinstance(t, torch.Tensor) for t in (x, weight)):
        return "operands are not tensors"
    return epilogue.supports(x, weight, bias if isinstance(bias, torch.Tensor) else None)


def fold_gelu_epilogue(rw: Rewriter, m: EpilogueMatch) -> None:
    with rw.gm.graph.inserting_before(m.act):
        node = rw.call(torch.ops.fxopt.linear_gelu_tanh.default, tuple(m.linear.args[:3]), like=m.linear)
    m.act.replace_all_uses_with(node)
    rw.drop_if_unused(m.act, m.linear)


@dataclass
class SwigluMatch:
    """linear(x, [W_gate; W_up]) -> silu(out[..., :F]) * out[..., F:]: what fuse_siblings leaves of a SwiGLU MLP."""

    linear: fx.Node
    nodes: list[fx.Node]  # slice(gate), slice(up), silu, mul: the mul's uses read the fold's output


def swiglu_after_linear(gm: fx.GraphModule) -> list[SwigluMatch]:
    """linear(x, [W_gate; W_up]) -> silu(out[..., :F]) * out[..., F:2F]."""
    return [SwigluMatch(node, nodes) for node in gm.graph.find_nodes(op="call_function", target=LINEAR)
            if (nodes := swiglu_of(node)) is not None]


def check_swiglu_epilogue(rw: Rewriter, m: SwigluMatch) -> str | None:
    from fxopt import config
    from fxopt.codegen import swiglu_gemm

    if not config.get("swiglu_gemm"):
        return "FXOPT_SWIGLU_GEMM is off (the Triton GEMM runs only where it measured faster: codegen/swiglu_gemm.py)"
    args = list(m.linear.args) + [None] * (3 - len(m.linear.args))
    if args[2] is not None:
        return "the gate/up projection has a bias"
    x, weight = (_val(a) if isinstance(a, fx.Node) else a for a in args[:2])
    if not all(isinstance(t, torch.Tensor) for t in (x, weight)):
        return "operands are not tensors"
    return swiglu_gemm.supports(x, weight)


def fold_swiglu_epilogue(rw: Rewriter, m: SwigluMatch) -> None:
    *_, mul = m.nodes
    with rw.gm.graph.inserting_before(mul):
        node = rw.call(torch.ops.fxopt.linear_swiglu.default, tuple(m.linear.args[:2]), like=m.linear)
    mul.replace_all_uses_with(node)
    for dead in reversed(m.nodes):
        rw.gm.graph.erase_node(dead)
    rw.drop_if_unused(m.linear)


EPILOGUE_RULES: tuple[Rule, ...] = (
    # bias + GELU(tanh) in the cuBLASLt GEMM's epilogue: the activation written once, not three times
    Rule("gelu_tanh_epilogue", gelu_tanh_after_linear, check_gelu_epilogue, fold_gelu_epilogue),
    # silu(gate) * up in a Triton GEMM's epilogue (cuBLASLt has no gated one): the product written once
    Rule("swiglu_epilogue", swiglu_after_linear, check_swiglu_epilogue, fold_swiglu_epilogue),
)


def run_epilogues(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """EPILOGUE_RULES over the forward program (after `run`): counts per rule."""
    import fxopt.codegen.epilogue  # noqa: F401  (registers torch.ops.fxopt.linear_gelu_tanh)
    import fxopt.codegen.swiglu_gemm  # noqa: F401  (registers torch.ops.fxopt.linear_swiglu)

    return run_rules(gm, ctx, EPILOGUE_RULES, _describe, "matmul")[0]


def run_decode(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """The rules for a static one-token decode program (after `run`): counts per rule."""
    return run_rules(gm, ctx, DECODE_RULES, _describe, "matmul")[0]


def _describe(match) -> str:
    if isinstance(match, WeightMatmul):
        return match.node.name
    if isinstance(match, SwigluMatch):
        return match.linear.name
    if isinstance(match, (GluMatch, ActMatch, ResidualMatch, NormMatch, LayerNormMatch, HeadsMatch)):
        return match.gemv.name
    if isinstance(match, fx.Node):
        return match.name
    if isinstance(match, EpilogueMatch):
        return match.linear.name
    if isinstance(match, SiblingGroup):
        return "+".join(m.node.name for m in match.members)
    return match.m.node.name


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Apply RULES; counts per rule (matches rewritten) plus fused_linears, k_unaligned, dropped_weights."""
    result, rw = run_rules(gm, ctx, RULES, _describe, "matmul")
    if rw is not None:
        rw.counts["dropped_weights"] = rw.drop_unread_attributes()
    return result
