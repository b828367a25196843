"""Tensor-parallel sharding (Megatron layout) of a captured forward graph, for rank r of N.

    plan = plan_shards(gm, world_size=N, rank=r)   # analysis only: raises ShardingError, touches no weight
    apply_plan(gm, plan, group_name, load)          # rewrites gm, checks its fake values, then slices weights

What is sharded is found by graph patterns, never by module names:

  attention  every aten.scaled_dot_product_attention node, and every matmul(P, v) whose P is the softmax of matmul(q,
             kᵀ) scaled and masked by operands that do not vary by head (the written-out form). Walking back from q, k
             and v through ops that act per head (pointwise ops with head-free operands, slices and cats off the head
             dim, transposes, the unsqueeze/expand/reshape of repeat_kv) reaches the view that splits a linear's output
             into heads; that linear (or one output segment of it, through a split: a fused qkv) is column-parallel:
             rank r keeps the rows of heads [r*H/N, (r+1)*H/N). KV heads are divided the same way, or, when n_kv < N,
             each rank keeps the one KV head its q heads read. The head split view, repeat_kv's expand/reshape, the
             split sizes and the merge after attention get the local head count. The linear after the merge is row-
             parallel (the same heads' columns), followed by one all-reduce (sum).
  MLP        a linear whose input is computed from other constant-weight linears by elementwise ops only
             (gelu(up(x)), silu(gate(x)) * up(x)): those are column-parallel (rows [r*F/N, (r+1)*F/N)) and it is
             row-parallel + one all-reduce.
  lm_head    the linear whose output is the graph's output: vocab-parallel (rows [r*V/N, (r+1)*V/N)), its
             logits all-gathered.
  embedding  an aten.embedding of the input ids in a constant table of V rows, V divisible by N: vocab-parallel,
             the lm_head's rows (a tied table is one shard for both). Rank r looks up the ids in its rows, zeroes
             the others' and an all-reduce (sum) gives every rank the full rows.

A row-parallel linear's bias is added once, after the all-reduce. Everything else (norms, position tables,
linears no pattern claims) is replicated, and listed in the plan. Attention that cannot be proven
shardable (a head count not divisible by N, an op between the head split and the attention that is not known to
act per head, a value of the sharded heads read elsewhere) raises ShardingError naming the node before any
weight is sliced. Collectives are the functional c10d ops (torch.ops._c10d_functional: all_reduce +
wait_tensor, all_gather_into_tensor), which trace into fx graphs, have fake kernels and run under gloo on CPU.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._guards import detect_fake_mode

from fxopt import opnames
from fxopt.nodes import aten_ops, fetch_attr, is_full_slice, tensor_val
from fxopt.passes.cost import TP_WORLD_KEY

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

SDPA = aten.scaled_dot_product_attention.default
LINEAR = aten.linear.default
MATMUL = aten.matmul.default
EMBEDDING = aten.embedding.default
ALL_REDUCE = c10d.all_reduce.default
ALL_GATHER = c10d.all_gather_into_tensor.default
WAIT = c10d.wait_tensor.default
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
RESHAPES = aten_ops(*opnames.RESHAPES)
TRANSPOSES = (aten.transpose.int, aten.permute.default)
# elementwise ops: a value's element depends only on its operands' same-index elements (and scalars)
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.mul.Scalar,
    aten.div.Scalar, aten.add.Scalar, aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default,
    aten.sigmoid.default, aten.pow.Tensor_Scalar, aten.to.dtype, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.dropout.default, aten.erf.default, aten.exp.default,
}


class ShardingError(ValueError):
    """The graph cannot be sharded as asked; the message names the node."""


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class AttrShard:
    """How rank r builds one tensor attribute: `source` (the model's name for it) narrowed along `dim` to the
    concatenation of `ranges` [(start, end), ...]; dim None: the whole tensor (replicated)."""

    source: str
    full_shape: tuple[int, ...]
    dtype: torch.dtype
    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = sum(b - a for a, b in self.ranges)
        return tuple(shape)

    def slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `full` (a copy: a memory-mapped source is read only where the ranges are)."""
        if tuple(full.shape) != self.full_shape:
            raise ShardingError(f"`{self.source}` has shape {tuple(full.shape)}, the graph expects {self.full_shape}")
        if self.dim is None:
            return full.detach().clone()
        parts = [full.narrow(self.dim, a, b - a) for a, b in self.ranges]
        return torch.cat(parts, dim=self.dim).contiguous()


@dataclass
class Segment:
    """Rows [start, end) of a column-parallel linear's output that one head split (or MLP) reads, and the rows of
    it this rank keeps (relative to start)."""

    start: int
    end: int
    keep: tuple[tuple[int, int], ...]

    @property
    def local(self) -> int:
        return sum(b - a for a, b in self.keep)


@dataclass
class Site:
    """One sharded structure (an attention or an MLP): its column linears, its row linear, shape-arg edits."""

    kind: str  # "attention" | "mlp"
    name: str  # the node it is reported by
    columns: dict[fx.Node, list[Segment]] = field(default_factory=dict)  # linear -> its output segments
    row: fx.Node | None = None
    row_keep: tuple[tuple[int, int], ...] = ()  # the row linear's input columns this rank keeps
    edits: list[tuple[fx.Node, int, object]] = field(default_factory=list)  # (node, arg index, new arg)


@dataclass
class ShardPlan:
    """What rank `rank` of `world_size` keeps and which graph edits make its program; made from shapes only."""

    rank: int
    world_size: int
    sites: list[Site] = field(default_factory=list)
    lm_head: fx.Node | None = None
    lm_head_keep: tuple[int, int] | None = None
    embeddings: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # lookup -> the table rows kept
    attrs: dict[str, AttrShard] = field(default_factory=dict)  # target in the sharded gm -> how to build it
    replicated_linears: list[str] = field(default_factory=list)
    retarget: list[tuple[fx.Node, str, str]] = field(default_factory=list)  # (linear, weight|bias, new attribute)

    def bytes(self, local: bool = True) -> int:
        """Bytes of the tensors the sharded program reads (local=True) or of the same tensors unsharded."""
        size = lambda a: _numel(a.local_shape if local else a.full_shape) * _itemsize(a.dtype)  # noqa: E731
        if local:
            return sum(size(a) for a in self.attrs.values())
        return sum(size(a) for a in {a.source: a for a in self.attrs.values()}.values())

    def replicated(self) -> list[str]:
        """Sources kept whole on every rank."""
        return sorted({a.source for a in self.attrs.values() if a.dim is None})

    def sharded(self) -> list[str]:
        return sorted({a.source for a in self.attrs.values() if a.dim is not None})


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------ reading the graph
def _is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _const_linear(node) -> bool:
    """linear(x, W[, b]) with W (and b) read by get_attr: a weight the plan can slice."""
    if not _is_call(node, (LINEAR,)) or len(node.args) < 2:
        return False
    w, b = node.args[1], _bias(node)
    return w.op == "get_attr" and (b is None or (isinstance(b, fx.Node) and b.op == "get_attr"))


def _bias(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def _where(linear: fx.Node) -> str:
    """The module a linear belongs to, by its weight's name: `layers.0.attn.q_proj`."""
    return str(linear.args[1].target).removesuffix(".weight")


def _shape(node) -> tuple:
    val = tensor_val(node)
    if val is None:
        raise ShardingError(f"`{node.name}` has no tensor meta['val']: capture the graph with fxopt.capture")
    return tuple(val.shape)


def _int(x) -> int | None:
    return x if isinstance(x, int) else None


def _ranges(blocks: list[int], width: int) -> tuple[tuple[int, int], ...]:
    """Row ranges of the blocks (heads) `blocks`, each `width` rows, merged where contiguous."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b * width:
            out[-1][1] = (b + 1) * width
        else:
            out.append([b * width, (b + 1) * width])
    return tuple((a, b) for a, b in out)


def _offset(ranges, by: int) -> tuple[tuple[int, int], ...]:
    return tuple((a + by, b + by) for a, b in ranges)


# ------------------------------------------------------------------------------------------ attention
@dataclass
class HeadChain:
    """q, k or v of one attention, traced back to the view that splits a linear's output into heads."""

    view: fx.Node  # [..., s, H*hd] -> [..., s, H, hd]
    heads: int  # H at the view
    head_dim: int
    linear: fx.Node
    segment: tuple[int, int]  # the linear's output rows the view reads (all of them without a split)
    split: tuple[fx.Node, int] | None = None  # (the split node, which output) for a fused projection
    repeat: tuple[fx.Node, fx.Node] | None = None  # repeat_kv's (expand, reshape)
    nodes: set = field(default_factory=set)  # every node between the view and the attention


def _walk_heads(sdpa: fx.Node, start: fx.Node, inside: frozenset = frozenset()) -> HeadChain:
    """Trace an attention input [b, H, s, hd] back to its head split, checking each op acts per head. `inside`:
    the attention's own nodes besides `sdpa` (the explicit form's scores, softmax, kᵀ), which may read it."""
    chain, found, repeat = set(), set(), None
    stack = [(start, 1)]  # (node, its head dim)
    while stack:
        node, hdim = stack.pop()
        if node in chain:
            continue
        if _is_call(node, RESHAPES) and _is_split_view(node, hdim):
            found.add(node)
            continue
        if node.op != "call_function":
            raise ShardingError(f"`{node.name}` feeds `{sdpa.name}` with its heads but is not computed per head")
        chain.add(node)
        if _is_call(node, RESHAPES) and _is_call(node.args[0], (aten.expand.default,)):
            repeat, stack = _walk_repeat(sdpa, node, hdim, chain, stack)
            continue
        for arg, arg_hdim in _head_inputs(sdpa, node, hdim):
            stack.append((arg, arg_hdim))
    if len(found) != 1:
        raise ShardingError(f"`{start.name}` (an input of `{sdpa.name}`) comes from {len(found)} head splits, "
                            "expected one view of a linear's output")
    view = found.pop()
    heads, head_dim = _shape(view)[-2:]
    linear, segment, split = _view_source(view)
    _check_closed(sdpa, chain | {view}, inside | {sdpa})
    return HeadChain(view, int(heads), int(head_dim), linear, segment, split, repeat, chain)


def _check_closed(sdpa: fx.Node, chain: set, attention: set) -> None:
    """Values holding the heads must reach nothing but the attention: elsewhere they would be a rank's subset."""
    for node in chain:
        for user in node.users:
            if user not in chain and user not in attention:
                raise ShardingError(f"`{user.name}` reads `{node.name}`, which holds the heads of `{sdpa.name}`: "
                                    "not shardable by heads")


def _is_split_view(node: fx.Node, hdim: int) -> bool:
    """view(x [..., H*hd]) -> [..., H, hd] with the heads at `hdim` = the output's dim -2."""
    src, out = _shape(node.args[0]), _shape(node)
    return len(out) == len(src) + 1 and hdim == len(out) - 2 and out[:-2] == src[:-1] and \
        isinstance(out[-1], int) and isinstance(out[-2], int)


def _walk_repeat(sdpa, reshape, hdim, chain, stack):
    """repeat_kv: reshape(expand(unsqueeze(x, hdim + 1), [.., kv, rep, ..]), [.., kv*rep, ..]) -> keep walking at x.
    Full slices around the unsqueeze (how `x[:, :, None, :, :]` is captured) are walked through."""
    expand = reshape.args[0]
    if hdim != 1:
        raise ShardingError(f"`{reshape.name}` repeats heads at dim {hdim}; expected [b, h, s, hd]")
    unsq = _through_full_slices(expand.args[0], chain)
    if not _is_call(unsq, (aten.unsqueeze.default,)) or unsq.args[1] != hdim + 1 or len(expand.users) > 1:
        raise ShardingError(f"`{reshape.name}` merges heads of `{expand.name}` in a way not known to be repeat_kv")
    chain.update({expand, unsq})
    stack.append((_through_full_slices(unsq.args[0], chain), hdim))
    return (expand, reshape), stack


def _through_full_slices(node, chain: set):
    """The first input up from `node` that is not a full slice `x[:]` of some dim (those added to chain)."""
    while is_full_slice(node) and len(node.users) == 1:
        chain.add(node)
        node = node.args[0]
    return node


def _head_inputs(sdpa: fx.Node, node: fx.Node, hdim: int) -> list[tuple[fx.Node, int]]:
    """The inputs of a per-head op that carry the heads (with their head dim); refuses any other op."""
    out_rank = len(_shape(node))
    if _is_call(node, TRANSPOSES):
        perm = _permutation(node, out_rank)
        return [(node.args[0], perm[hdim])]
    if _is_call(node, (aten.slice.Tensor,)) and node.args[1] % out_rank != hdim:
        return [(node.args[0], hdim)]
    if _is_call(node, (aten.cat.default,)):
        dim = node.args[1] if len(node.args) > 1 else 0
        if dim % out_rank != hdim:
            return [(a, hdim) for a in node.args[0]]
    if _is_call(node, ELEMENTWISE):
        heads = _shape(node)[hdim]
        carried = []
        for arg in node.args:
            val = tensor_val(arg)
            if val is None:
                continue
            aligned = hdim - (out_rank - val.dim())  # the operand's dim under the output's head dim
            if aligned >= 0 and val.shape[aligned] == heads and val.dim() == out_rank:
                carried.append((arg, hdim))
            elif aligned >= 0 and val.shape[aligned] != 1:
                raise ShardingError(f"`{node.name}` mixes `{arg.name}` into the heads of `{sdpa.name}` along the "
                                    "head dim: not shardable by heads")
        return carried
    raise ShardingError(f"`{node.name}` ({node.target}) between `{sdpa.name}` and its head split is not known "
                        "to act per head")


def _permutation(node: fx.Node, rank: int) -> list[int]:
    """For each output dim of a transpose/permute, the input dim it reads."""
    if node.target is aten.permute.default:
        return [d % rank for d in node.args[1]]
    perm = list(range(rank))
    a, b = node.args[1] % rank, node.args[2] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _view_source(view: fx.Node) -> tuple[fx.Node, tuple[int, int], tuple[fx.Node, int] | None]:
    """The linear whose output (or one split segment of it) the head split views."""
    src = view.args[0]
    if len(src.users) != 1:
        raise ShardingError(f"`{src.name}` is split into heads by `{view.name}` but also read elsewhere")
    if _const_linear(src):
        return src, (0, _shape(src)[-1]), None
    if src.target is operator.getitem and _is_call(src.args[0], SPLITS):
        split, index = src.args[0], src.args[1]
        linear = split.args[0]
        if _const_linear(linear) and len(linear.users) == 1 and _split_dim(split) == len(_shape(linear)) - 1:
            sizes = _split_sizes(split)
            start = sum(sizes[:index])
            return linear, (start, start + sizes[index]), (split, index)
    raise ShardingError(f"`{view.name}` splits `{src.name}` into heads, which is not a linear's output (or a "
                        "split of one) with constant weights")


def _split_dim(split: fx.Node) -> int:
    rank = len(_shape(split.args[0]))
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    return dim % rank


def _split_sizes(split: fx.Node) -> list[int]:
    width = _shape(split.args[0])[_split_dim(split)]
    size = split.args[1]
    if isinstance(size, int):
        return [min(size, width - a) for a in range(0, width, size)]
    return list(size)


def _attention_site(sdpa: fx.Node, n: int, r: int, inputs: tuple | None = None,
                    inside: frozenset = frozenset()) -> Site:
    """The column/row layout of one attention for rank r of n, with the shape-arg edits of its program. `sdpa`:
    the node whose output holds the heads (an SDPA call, or the explicit form's P·V); `inputs`: its q, k, v
    (SDPA's first three arguments by default)."""
    q, k, v = (_walk_heads(sdpa, start, inside) for start in (inputs or sdpa.args[:3]))
    site = Site("attention", sdpa.name)
    h = q.heads
    if h % n:
        raise ShardingError(f"head count {h} not divisible by {n} at `{_where(q.linear)}`")
    h_local = h // n
    q_heads = list(range(r * h_local, (r + 1) * h_local))
    for chain in (k, v):
        kv = chain.heads
        if kv % n == 0:
            kv_heads = list(range(r * (kv // n), (r + 1) * (kv // n)))
        elif n % kv == 0 and h % kv == 0:
            kv_heads = [q_heads[0] // (h // kv)]  # n_kv < n: each rank's q heads share one KV head
        else:
            raise ShardingError(f"KV head count {kv} neither divisible by nor dividing {n} at `{_where(chain.linear)}`")
        _add_chain(site, chain, kv_heads)
        if chain.repeat is not None:
            expand, reshape = chain.repeat
            rep_local = h_local // len(kv_heads)
            site.edits += _shape_edit(expand, {1: len(kv_heads), 2: rep_local}, (kv, h // kv))
            site.edits += _shape_edit(reshape, {1: h_local}, (h,))
    _add_chain(site, q, q_heads)
    _row_after_attention(site, sdpa, q, _ranges(q_heads, q.head_dim))
    return site


def _add_chain(site: Site, chain: HeadChain, heads: list[int]) -> None:
    """Column-parallel rows of the chain's linear segment, and the local head count at its view (and split)."""
    keep = _ranges(heads, chain.head_dim)
    site.columns.setdefault(chain.linear, []).append(Segment(*chain.segment, keep))
    site.edits += _shape_edit(chain.view, {-2: len(heads)}, (chain.heads,))


def _shape_edit(node: fx.Node, local: dict[int, int], globals_: tuple[int, ...]) -> list:
    """Edits of a view/expand/reshape's shape list: entry i (a literal equal to the global size, or -1) -> local."""
    shape = list(node.args[1])
    for (i, size), global_size in zip(local.items(), globals_):
        if shape[i] == -1:
            continue
        if shape[i] != global_size:
            raise ShardingError(f"`{node.name}` has size {shape[i]} where the graph has {global_size} heads")
        shape[i] = size
    return [(node, 1, shape)]


def _row_after_attention(site: Site, sdpa: fx.Node, q: HeadChain, keep) -> None:
    """attention [b, H, s, hd] -> (same-shape reshape) -> transpose(1, 2) -> (clone) -> reshape [b, s, H*hd] ->
    linear: row-parallel."""
    node = _only_user(sdpa)
    while _is_call(node, RESHAPES) and _shape(node) == _shape(sdpa):  # HF's view(b, -1, s, hd) of the output
        site.edits += _shape_edit(node, {1: sum(b - a for a, b in keep) // q.head_dim}, (q.heads,))
        node = _only_user(node)
    if not _is_call(node, TRANSPOSES) or _permutation(node, 4) != [0, 2, 1, 3]:
        raise ShardingError(f"`{node.name}` reads `{sdpa.name}`'s heads; expected a transpose of dims 1 and 2")
    node = _only_user(node)
    while _is_call(node, (aten.clone.default, aten.contiguous.default)):
        node = _only_user(node)
    if not _is_call(node, RESHAPES) or _shape(node)[-1] != q.heads * q.head_dim or len(_shape(node)) != 3:
        raise ShardingError(f"`{node.name}` reads `{sdpa.name}`'s heads; expected the merge [b, s, H*hd]")
    site.edits += _shape_edit(node, {-1: sum(b - a for a, b in keep)}, (q.heads * q.head_dim,))  # H_l * hd
    row = _only_user(node)
    if not _const_linear(row) or row.args[0] is not node:
        raise ShardingError(f"`{row.name}` reads `{sdpa.name}`'s merged heads; expected a linear with constant "
                            "weights (the output projection)")
    site.row, site.row_keep = row, keep


def _only_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise ShardingError(f"`{node.name}` holds sharded heads and has {len(node.users)} users, expected one")
    return next(iter(node.users))


# ------------------------------------------------------------------------------------------ MLP
def _mlp_site(row: fx.Node, n: int, r: int, claimed: set) -> Site | None:
    """Columns -> elementwise ops -> row, or None when `row`'s input is not made that way (left replicated)."""
    width = _shape(row.args[0])[-1]
    columns, region, stack = [], set(), [row.args[0]]
    while stack:
        node = stack.pop()
        if node in region or node in columns:
            continue
        if _const_linear(node) and node not in claimed and _shape(node)[-1] == width:
            columns.append(node)
            continue
        if not _is_call(node, ELEMENTWISE) or _shape(node)[-1] != width:
            return None
        region.add(node)
        for arg in node.args:
            val = tensor_val(arg)
            if val is None:
                continue
            if val.dim() and val.shape[-1] == width:
                stack.append(arg)
            elif val.numel() != 1 and val.shape[-1] != 1:
                return None  # an operand along the sharded dim: left replicated
    inside = region | set(columns) | {row}
    if not columns or any(u not in inside for node in region | set(columns) for u in node.users):
        return None
    if width % n:
        raise ShardingError(f"MLP width {width} not divisible by {n} at `{_where(columns[0])}`")
    keep = ((r * width // n, (r + 1) * width // n),)
    site = Site("mlp", row.name, {c: [Segment(0, width, keep)] for c in columns}, row, keep)
    return site


# ------------------------------------------------------------------------------------------ planning
def plan_shards(gm: fx.GraphModule, world_size: int, rank: int) -> ShardPlan:
    """Find every shardable structure and what rank `rank` keeps; raises ShardingError naming the node.

    Reads shapes only (meta['val'] and attribute shapes: a meta-device capture will do) and changes nothing."""
    if not 0 <= rank < world_size:
        raise ShardingError(f"rank {rank} is not in [0, {world_size})")
    plan = ShardPlan(rank, world_size)
    claimed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        explicit = _explicit_attention(node)
        if _is_call(node, (SDPA,)) or explicit is not None:
            if explicit is None:
                _check_sdpa(node)
            site = _attention_site(node, world_size, rank, *(explicit or ()))
            plan.sites.append(site)
            claimed.update(site.columns, {site.row})
    for node in list(gm.graph.nodes):
        if _const_linear(node) and node not in claimed:
            site = _mlp_site(node, world_size, rank, claimed)
            if site is not None:
                plan.sites.append(site)
                claimed.update(site.columns, {site.row})
    _plan_lm_head(gm, plan, claimed)
    _plan_embeddings(gm, plan)
    plan.replicated_linears = [_where(n) for n in gm.graph.nodes if _const_linear(n) and n not in claimed
                               and n is not plan.lm_head]
    _plan_attrs(gm, plan)
    return plan


SCORE_OPS = ELEMENTWISE | {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.softmax.int, aten._softmax.default,
                           aten.where.self}
SOFTMAX = (aten.softmax.int, aten._softmax.default)


def _explicit_attention(pv: fx.Node) -> tuple[tuple[fx.Node, fx.Node, fx.Node], frozenset] | None:
    """((q, k, v), the attention's nodes) when pv = matmul(P, v) [b, H, s, hd] and P is softmax over the last
    dim of q @ kᵀ, scaled and masked by operands that do not vary by head: attention as models/ (attn_impl
    "explicit") and HF's eager attention write it. None for any other node. A per-head score operand (ALiBi
    written out) raises ShardingError: a rank would read other ranks' heads."""
    if not _is_call(pv, (MATMUL,)) or len(_shape(pv)) != 4:
        return None
    inside, node, softmax, per_head = {pv}, pv.args[0], False, []
    while _is_call(node, SCORE_OPS):
        softmax = softmax or _is_call(node, SOFTMAX)
        scores = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) == _shape(node)]
        if not scores:
            return None
        others = [a for a in node.args if isinstance(a, fx.Node) and a is not scores[0]]
        per_head += [(node, a) for a in others if len(_shape(a)) == 4 and _shape(a)[1] != 1]
        inside.add(node)
        node = scores[0]
    kt = node.args[1] if _is_call(node, (MATMUL,)) else None
    if not softmax or kt is None or not _is_call(kt, TRANSPOSES) or _permutation(kt, 4) != [0, 1, 3, 2]:
        return None
    if per_head:  # masks and biases must be broadcast over the heads
        op, operand = per_head[0]
        raise ShardingError(f"`{op.name}` mixes the per-head `{operand.name}` into `{pv.name}`'s scores: not "
                            "shardable by heads yet")
    inside.update({node, kt})
    return (node.args[0], kt.args[0], pv.args[1]), frozenset(inside)


def _check_sdpa(sdpa: fx.Node) -> None:
    """A mask or bias with its own value per head cannot be read by a rank holding a subset of the heads."""
    mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
    val = tensor_val(mask)
    if val is not None and val.dim() == 4 and val.shape[1] != 1:
        raise ShardingError(f"`{sdpa.name}` has a per-head mask `{mask.name}`: not shardable by heads yet")


def _plan_lm_head(gm: fx.GraphModule, plan: ShardPlan, claimed: set) -> None:
    """The constant-weight linear that is the graph's only output: vocab-parallel when V divides by N."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = _flat(out.args)
    if len(leaves) != 1 or not _const_linear(leaves[0]) or leaves[0] in claimed:
        return
    head = leaves[0]
    vocab = _shape(head)[-1]
    if vocab % plan.world_size:
        return  # replicated: still correct, listed in the plan
    local = vocab // plan.world_size
    plan.lm_head, plan.lm_head_keep = head, (plan.rank * local, (plan.rank + 1) * local)


def _plan_embeddings(gm: fx.GraphModule, plan: ShardPlan) -> None:
    """Every lookup of input token ids in a constant table whose rows divide by N: vocab-parallel, rows
    [r*V/N, (r+1)*V/N). Tables read by computed indices (learned positions) stay whole: small, and no all-reduce."""
    for node in gm.graph.find_nodes(op="call_function", target=EMBEDDING):
        table, ids = node.args[:2]
        rows = _shape(table)[0] if table.op == "get_attr" and ids.op == "placeholder" else None
        if isinstance(rows, int) and rows % plan.world_size == 0:
            local = rows // plan.world_size
            plan.embeddings[node] = (plan.rank * local, (plan.rank + 1) * local)


def _flat(args) -> list:
    out: list = []
    fx.node.map_arg(args, out.append)
    return out


def _plan_attrs(gm: fx.GraphModule, plan: ShardPlan) -> None:
    """Every tensor the sharded program reads: sliced rows/columns of the sharded weights, the rest whole.

    A get_attr read both by a sharded linear and by something else (a tied lm_head's embedding) keeps its whole
    tensor for the others; the linear reads a new attribute `fxopt_tp_<name>` (plan.retarget)."""
    wanted: dict[tuple[fx.Node, str], tuple[int, tuple]] = {}  # (linear, "weight" | "bias") -> (dim, ranges)
    for site in plan.sites:
        for linear, segments in site.columns.items():
            rows = tuple(r for seg in sorted(segments, key=lambda s: s.start) for r in _offset(seg.keep, seg.start))
            if _gaps(sorted((s.start, s.end) for s in segments), _shape(linear)[-1]):
                raise ShardingError(f"`{linear.name}` ({_where(linear)}) has output rows no head split reads")
            wanted[(linear, "weight")] = (0, rows)
            if _bias(linear) is not None:
                wanted[(linear, "bias")] = (0, rows)
        wanted[(site.row, "weight")] = (1, site.row_keep)  # its bias: whole, added after the all-reduce
    if plan.lm_head is not None:
        wanted[(plan.lm_head, "weight")] = (0, (plan.lm_head_keep,))
    for lookup, keep in plan.embeddings.items():
        wanted[(lookup, "weight")] = (0, (keep,))
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        tensor = fetch_attr(gm, node.target)
        if not isinstance(tensor, torch.Tensor):
            continue
        whole = AttrShard(node.target, tuple(tensor.shape), tensor.dtype)
        uses = [(user, which) for user in node.users for which in ("weight", "bias") if _input(user, which) is node]
        sharded = [(use, wanted[use]) for use in uses if use in wanted]
        if len(sharded) < len(node.users):
            plan.attrs[node.target] = whole  # some reader wants it whole
        for use, (dim, ranges) in sharded:
            shard = AttrShard(node.target, whole.full_shape, whole.dtype, dim, ranges)
            target = node.target if len(node.users) == 1 else f"fxopt_tp_{node.target.replace('.', '_')}"
            if plan.attrs.setdefault(target, shard) != shard:
                raise ShardingError(f"`{node.target}` is read by two structures that shard it differently")
            if target != node.target:
                plan.retarget.append((use[0], use[1], target))


def _input(user: fx.Node, which: str):
    """A linear's weight or bias node; an embedding's table (its "weight")."""
    if user.op == "call_function" and user.target is EMBEDDING:
        return user.args[0] if which == "weight" else None
    if user.op != "call_function" or user.target is not LINEAR:
        return None
    return user.args[1] if which == "weight" else _bias(user)


def _gaps(covered: list[tuple[int, int]], width: int) -> bool:
    end = 0
    for a, b in covered:
        if a != end:
            return True
        end = b
    return end != width


# ------------------------------------------------------------------------------------------ applying the plan
def apply_plan(gm: fx.GraphModule, plan: ShardPlan, group_name: str, load: Callable[[str], torch.Tensor],
               device: torch.device | str | None = None) -> None:
    """Rewrite gm into rank plan.rank's program, re-derive every meta['val'] over the local shapes (a node that no
    longer fits raises ShardingError, before any weight is read), then build each attribute from `load(name)`
    (the model's tensor of that name; only this rank's rows/columns are kept) and drop every other attribute."""
    fake_mode = detect_fake_mode([tensor_val(n) for n in gm.graph.nodes if tensor_val(n) is not None])
    if fake_mode is None:
        raise ShardingError("the graph has no fake values: capture it with fxopt.capture")
    before = {node: (node.target, node.args, node.kwargs) for node in gm.graph.nodes}
    for site in plan.sites:
        for node, index, value in site.edits:
            node.args = node.args[:index] + (value,) + node.args[index + 1:]
        for linear, segments in site.columns.items():
            _set_split_sizes(linear, segments)
        _all_reduce_after(gm, site.row, group_name)
    for linear, which, target in plan.retarget:
        shard = plan.attrs[target]
        if not hasattr(gm, target):  # a stand-in until _materialise: get_attr wants an attribute to name
            gm.register_buffer(target, torch.empty(shard.local_shape, dtype=shard.dtype, device="meta"))
        with gm.graph.inserting_before(linear):
            _set_input(linear, which, gm.graph.get_attr(target))
    if plan.lm_head is not None:
        _all_gather_after(gm, plan.lm_head, plan.world_size, group_name)
    for lookup, keep in plan.embeddings.items():
        _vocab_parallel_lookup(gm, lookup, keep, group_name)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    device = device if device is not None else _input_device(gm)
    _off_the_meta_device(gm, device, fake_mode, before)
    _propagate(gm, plan, before, fake_mode, device)
    for node in [*gm.graph.find_nodes(op="call_function", target=ALL_REDUCE),
                 *gm.graph.find_nodes(op="call_function", target=ALL_GATHER)]:
        node.meta[TP_WORLD_KEY] = plan.world_size  # the cost pass prices the ring by it
        source = node.args[0]
        if "nn_module_stack" in source.meta:  # reported with the layer of the linear or lookup it sums
            node.meta.setdefault("nn_module_stack", source.meta["nn_module_stack"])
    _materialise(gm, plan, load, device)
    gm.graph.lint()
    gm.recompile()


def _set_split_sizes(linear: fx.Node, segments: list[Segment]) -> None:
    """A fused projection's split (q | k | v) takes the local widths of its segments, in order."""
    split = next(iter(linear.users))
    if not _is_call(split, SPLITS):
        return
    local = [seg.local for seg in sorted(segments, key=lambda s: s.start)]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if len(set(local)) == 1:
        split.target, split.args, split.kwargs = aten.split.Tensor, (linear, local[0], dim), {}
    else:
        split.target, split.args, split.kwargs = aten.split_with_sizes.default, (linear, local, dim), {}


def _set_input(linear: fx.Node, which: str, node) -> None:
    if linear.target is EMBEDDING:
        linear.args = (node, *linear.args[1:])
    elif which == "weight":
        linear.args = (linear.args[0], node, *linear.args[2:])
    elif len(linear.args) > 2:
        linear.args = (*linear.args[:2], node)
    else:
        linear.kwargs = {**linear.kwargs, "bias": node}


def _all_reduce_after(gm: fx.GraphModule, row: fx.Node, group_name: str) -> None:
    """row-parallel linear -> all_reduce(sum) -> wait [-> + bias]: the partial sums of every rank, bias once."""
    bias = _bias(row)
    row.args, row.kwargs = tuple(row.args[:2]), {}
    with gm.graph.inserting_after(row):
        reduced = gm.graph.call_function(ALL_REDUCE, (row, "sum", group_name))
    with gm.graph.inserting_after(reduced):
        out = gm.graph.call_function(WAIT, (reduced,))
    if bias is not None:
        with gm.graph.inserting_after(out):
            out = gm.graph.call_function(aten.add.Tensor, (out, bias))
    row.replace_all_uses_with(out, delete_user_cb=lambda user: user is not reduced)


def _vocab_parallel_lookup(gm: fx.GraphModule, lookup: fx.Node, keep: tuple[int, int], group_name: str) -> None:
    """embedding(table rows [start, end), ids) -> the rows of ids in [start, end), zeros for the others' ids,
    all-reduced (sum): every id's row comes from the one rank that holds it."""
    start, end = keep
    ids = lookup.args[1]
    graph = gm.graph
    with graph.inserting_before(lookup):
        mine = graph.call_function(aten.logical_and.default, (graph.call_function(aten.ge.Scalar, (ids, start)),
                                                              graph.call_function(aten.lt.Scalar, (ids, end))))
        local = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.sub.Tensor, (ids, start)), mine))
        row_mask = graph.call_function(aten.unsqueeze.default, (mine, -1))  # (b, s, 1)
    lookup.args = (lookup.args[0], local, *lookup.args[2:])  # (b, s) ids in [0, end - start): 0 where not mine
    with graph.inserting_after(lookup):
        kept = graph.call_function(aten.mul.Tensor, (lookup, row_mask))  # (b, s, d): others' rows zero
    with graph.inserting_after(kept):
        reduced = graph.call_function(ALL_REDUCE, (kept, "sum", group_name))
    with graph.inserting_after(reduced):
        out = graph.call_function(WAIT, (reduced,))
    lookup.replace_all_uses_with(out, delete_user_cb=lambda user: user is not kept)


def _all_gather_after(gm: fx.GraphModule, head: fx.Node, world_size: int, group_name: str) -> None:
    """Vocab-parallel logits [..., V/N] -> all-gather along the vocab -> [..., V] (gathered on dim 0: moved there)."""
    rank = len(_shape(head))
    to_front = [rank - 1, *range(rank - 1)]  # [..., V/N] -> [V/N, ...]
    to_back = [*range(1, rank), 0]
    graph, after = gm.graph, head
    steps = [
        (aten.permute.default, lambda x: (x, to_front), {}),
        (aten.clone.default, lambda x: (x,), {"memory_format": torch.contiguous_format}),
        (ALL_GATHER, lambda x: (x, world_size, group_name), {}),
        (WAIT, lambda x: (x,), {}),
        (aten.permute.default, lambda x: (x, to_back), {}),
        (aten.clone.default, lambda x: (x,), {"memory_format": torch.contiguous_format}),
    ]
    first = None
    for target, args, kwargs in steps:
        with graph.inserting_after(after):
            after = graph.call_function(target, args(after), kwargs)
        first = first or after
    head.replace_all_uses_with(after, delete_user_cb=lambda user: user is not first)


def _input_device(gm: fx.GraphModule) -> torch.device:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and tensor_val(node) is not None:
            return tensor_val(node).device
    return torch.device("cpu")


def _off_the_meta_device(gm: fx.GraphModule, device: torch.device, fake_mode, before: dict) -> None:
    """A model captured on the meta device runs its shard on `device`: the `device=meta` its forward baked into
    the tensors it makes (HF's RoPE: `inv_freq.to(x.device)`) becomes `device`, and every value captured on
    meta is relabelled (same sizes and strides, symbolic ones included), so that _propagate mixes no devices.
    These nodes compute what they did: `before` takes their new arguments, so they count as unedited."""
    if device.type == "meta":
        return

    def relabel(val):
        if isinstance(val, torch.Tensor) and val.device.type == "meta":
            with fake_mode:
                return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device)
        return val

    def moved(arg):
        return device if isinstance(arg, torch.device) and arg.type == "meta" else arg

    for node in gm.graph.nodes:
        if node.op == "call_function":
            args, kwargs = fx.node.map_aggregate(node.args, moved), fx.node.map_aggregate(node.kwargs, moved)
            if (args, kwargs) != (node.args, node.kwargs):
                unedited = before.get(node) == (node.target, node.args, node.kwargs)
                node.args, node.kwargs = args, kwargs
                if unedited:
                    before[node] = (node.target, node.args, node.kwargs)
        if "val" in node.meta:
            node.meta["val"] = torch.utils._pytree.tree_map(relabel, node.meta["val"])


def _propagate(gm: fx.GraphModule, plan: ShardPlan, before: dict, fake_mode, device) -> None:
    """meta['val'] recomputed under the graph's FakeTensorMode, attributes at their local shapes, for every node the
    sharding touched: a sharded attribute, a node new or edited since `before` (node -> its target, args, kwargs),
    and everything computed from them; an attribute captured on another device (a model on the meta device) at
    `device`. The rest (masks, positions) keep the values capture gave them."""
    changed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        edited = before.get(node) != (node.target, node.args, node.kwargs)
        captured = node.meta.get("val")
        if node.op == "get_attr" and node.target in plan.attrs:
            shard = plan.attrs[node.target]
            with fake_mode:
                val = torch.empty(shard.local_shape, dtype=shard.dtype, device=device)
        elif node.op == "get_attr" and isinstance(captured, torch.Tensor) and captured.device != device:
            with fake_mode:  # a replicated tensor of a model captured on the meta device: it will live on `device`
                val = torch.empty_strided(captured.shape, captured.stride(), dtype=captured.dtype, device=device)
        elif node.op == "call_function" and (edited or any(a in changed for a in node.all_input_nodes)):
            args = fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val"))
            try:
                with fake_mode:
                    val = _linear_val(*args, **kwargs) if node.target is LINEAR else node.target(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised naming the node
                raise ShardingError(f"`{node.name}` ({node.target}) does not fit the local shapes after "
                                    f"sharding: {type(exc).__name__}: {exc}") from exc
        else:
            continue
        node.meta["val"] = val
        node.meta.pop("tensor_meta", None)
        changed.add(node)


def _linear_val(x, w, bias=None):
    """linear's value from the shapes (the fake linear over a symbolic batch failed on torch 2.11: rules.py)."""
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _materialise(gm: fx.GraphModule, plan: ShardPlan, load: Callable[[str], torch.Tensor], device) -> None:
    """Each planned attribute from `load(source)`, sliced; every attribute the program does not read, dropped."""
    kinds = {name: True for name, _ in gm.named_parameters(remove_duplicate=False)}
    kinds.update({name: False for name, _ in gm.named_buffers(remove_duplicate=False)})
    made = {}
    for target, shard in plan.attrs.items():  # before any attribute goes: `load` may read gm's own tensors
        with torch.no_grad():
            local = shard.slice(load(shard.source))
        made[target] = local.to(device) if device is not None else local
    for name in kinds:
        _set_attr(gm, name, None)
    for target, local in made.items():
        param = kinds.get(plan.attrs[target].source, False)
        _set_attr(gm, target, torch.nn.Parameter(local, requires_grad=False) if param else local)


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor | None) -> None:
    """Set (a parameter or buffer) or, with None, delete the attribute a dotted get_attr target names."""
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if value is None:
        if hasattr(owner, attr):
            delattr(owner, attr)
    elif isinstance(value, torch.nn.Parameter):
        owner.register_parameter(attr, value)
    else:
        owner.register_buffer(attr, value)
