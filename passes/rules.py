"""The rule engine every rewriting pass shares (attention, matmul, rope, kv_cache): a rule is (name, pattern,
check, rewrite).

`pattern(gm)` lists candidate matches, `check(rw, match)` gives the reason to leave one (None: rewrite it; a check
may also raise, refusing the whole graph, as kv_cache does for a model that cannot take a cache), `rewrite(rw,
match)` does it; rules run in table order, each over the graph the previous ones left (or, with `order`, all
matches decided first and handled in one order across the table), and every match is counted (or noted with its
reason). The Rewriter carries what rewrites share: the graph's FakeTensorMode (new nodes get fake values and
costs), new buffers made once, values a table's rewrites reuse (`memo`), the log of every match, the layout ops
downstream of a rewrite re-checked over new strides, and weights no node reads any more dropped from the GraphModule.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxopt.nodes import fetch_attr as fetch  # noqa: F401  (matmul and its tests read it from here)
from fxopt.passes import cost as cost_pass
from fxopt.passes.infra import PassContext, PassResult, finish

aten = torch.ops.aten
LINEAR = aten.linear.default
LAYOUT_TARGETS = set(cost_pass.LAYOUT_OPS) | {operator.getitem}


class DownstreamVals(dict):
    """New meta['val'] per downstream layout node, plus the views that must become reshapes."""

    def __init__(self):
        super().__init__()
        self.reshapes: set[fx.Node] = set()


class Rewriter:
    """What the rules share: the graph, its FakeTensorMode, new-node bookkeeping, counts, notes and the match log."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext | None, fake_mode):
        self.gm, self.ctx, self.fake_mode = gm, ctx, fake_mode
        self.counts: dict[str, int] = {}
        self.notes: list[str] = []
        self.log: list[tuple[str, Any, str | None]] = []  # every match handled: (rule, match, reason; None: rewritten)
        self.memo: dict[Any, Any] = {}  # what a table's rewrites build once and reuse, keyed by the rules
        self.touched: set[str] = set()  # get_attr targets some rewrite stopped reading
        self.costed = any(cost_pass.COST_KEY in n.meta for n in gm.graph.nodes)
        self.made: dict[tuple, str] = {}  # (kind, source targets, size) -> buffer name, so a weight is made once

    @classmethod
    def over(cls, gm: fx.GraphModule, ctx: PassContext | None, *, fake: bool = True) -> Rewriter | None:
        """A rewriter over gm's fake values (their FakeTensorMode), or None when gm has none and `fake` asks for
        them (fake=False: rules that make their own values or none; fake_mode is then None where gm has none)."""
        from torch._guards import detect_fake_mode

        vals = [n.meta.get("val") for n in gm.graph.nodes]
        fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        return None if fake_mode is None and fake else cls(gm, ctx, fake_mode)

    def count(self, key: str, by: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + by

    # -- fake values
    def fake_run(self, target, args, kwargs=None, env: dict | None = None):
        """target(*args) on the fake values of the arg nodes (env overrides), under the graph's fake mode."""
        env = {} if env is None else env
        fargs = fx.node.map_arg(args, lambda n: self._value(n, env))
        fkwargs = fx.node.map_arg(kwargs or {}, lambda n: self._value(n, env))
        with self.fake_mode:
            if target is LINEAR:
                return _linear_val(*fargs)
            return target(*fargs, **fkwargs)

    def _value(self, node: fx.Node, env: dict) -> Any:
        """node's fake value: env's, else meta["val"], else (a size computation some torch releases leave without
        one, e.g. sym_size of the ids) derived from its inputs and kept in env."""
        if node in env:
            return env[node]
        if "val" in node.meta:
            return node.meta["val"]
        if node.op != "call_function":
            raise KeyError(f"{node.name} has no fake value")
        env[node] = self.fake_run(node.target, node.args, node.kwargs, env)
        return env[node]

    def fake_weight(self, tensor: torch.Tensor):
        try:
            return self.fake_mode.from_tensor(tensor, static_shapes=True)
        except Exception:  # noqa: BLE001 - e.g. the weight is already fake: an empty of its layout will do
            with self.fake_mode:
                return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)

    def downstream_vals(self, replaced: dict[fx.Node, Any], *, copy_if_needed: bool = False
                        ) -> dict[fx.Node, Any] | str:
        """New meta["val"] of the layout ops that view the `replaced` nodes' outputs (old node -> new value),
        transitively. A string (the reason) when one of them fails over the new strides, e.g. a view."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        env = dict(replaced)
        heap = [(order[u], id(u), u) for r in replaced for u in r.users]
        heapq.heapify(heap)
        seen: set[fx.Node] = set()
        out = DownstreamVals()
        while heap:
            _, _, node = heapq.heappop(heap)
            if node in seen:
                continue
            seen.add(node)
            if node.op != "call_function" or node.target not in LAYOUT_TARGETS:
                continue  # computes a fresh tensor: layout changes stop here
            try:
                env[node] = self.fake_run(node.target, node.args, node.kwargs, env)
            except Exception as exc:  # noqa: BLE001 - any failure means the rewrite is not safe as it is
                if not copy_if_needed or node.target is not aten.view.default:
                    return f"`{node.name}` ({node.target}) fails over the new strides: {type(exc).__name__}"
                try:  # a view that can no longer alias (e.g. merging the sliced dim) may copy instead
                    env[node] = self.fake_run(aten.reshape.default, node.args, node.kwargs, env)
                except Exception:  # noqa: BLE001
                    return f"`{node.name}` ({node.target}) fails over the new strides: {type(exc).__name__}"
                out.reshapes.add(node)
            if cost_pass.tensor_vals(env[node]):  # tensors (or a split's list): their strides may have changed
                out[node] = env[node]
            for user in node.users:
                heapq.heappush(heap, (order[user], id(user), user))
        return out

    def apply_vals(self, vals: dict[fx.Node, Any]) -> None:
        for node in getattr(vals, "reshapes", ()):
            node.target = aten.reshape.default  # copies where the padded layout cannot be viewed
            self.count("view_to_reshape")
        for node, val in vals.items():
            node.meta["val"] = val
            node.meta.pop("tensor_meta", None)

    # -- new nodes
    def register(self, key: tuple, hint: str, make: Callable[[], torch.Tensor]) -> str:
        """A new buffer on gm (made once per key), returning its name."""
        if key in self.made:
            return self.made[key]
        name = "fxopt_" + hint.replace(".", "_").removeprefix("fxopt_")
        while hasattr(self.gm, name):
            name += "_"
        with torch.no_grad():
            tensor = make()
        self.gm.register_buffer(name, tensor)
        self.made[key] = name
        return name

    def get_attr(self, name: str) -> fx.Node:
        node = self.gm.graph.get_attr(name)
        node.meta["val"] = self.fake_weight(fetch(self.gm, name))
        return node

    def call(self, target, args, like: fx.Node) -> fx.Node:
        """A call_function node with its fake value, cost and `like`'s module stack (insertion point: the caller's)."""
        node = self.gm.graph.call_function(target, args)
        node.meta["val"] = self.fake_run(target, args)
        for key in ("nn_module_stack", "stack_trace"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        if self.costed:
            node.meta[cost_pass.COST_KEY] = cost_pass.node_cost(self.ctx, node)
        return node

    def drop_if_unused(self, *nodes: fx.Node | None) -> None:
        for node in nodes:
            if isinstance(node, fx.Node) and not node.users and node.graph is self.gm.graph:
                if node.op == "get_attr":
                    self.touched.add(node.target)
                self.gm.graph.erase_node(node)

    def drop_unread_attributes(self) -> int:
        """Delete from gm the tensors some rewrite stopped reading and no get_attr reads any more."""
        read = {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        dropped = 0
        for target in sorted(self.touched - read):
            owner_path, _, attr = target.rpartition(".")
            owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
            if hasattr(owner, attr):
                delattr(owner, attr)
                dropped += 1
        return dropped


def _linear_val(x, w, bias=None):
    """linear's result (..., N), dense, built from the shapes: under torch 2.11 the fake linear over a symbolic
    batch raised "Cannot call numel() on tensor with symbolic sizes/strides", which left every match unrewritten
    on the GPU machine (measured 2026-11-21); the value itself needs no kernel to know."""
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@dataclass(frozen=True)
class Rule:
    """pattern: the graph -> candidate matches; check: a match -> the reason to leave it (None: rewrite it);
    rewrite: does it. Rules run in order, each over the graph the previous ones left. Matches rewritten are
    counted under `name`; matches left are noted, and counted under `refused` when it is set (several rules
    may share one refusal count, e.g. the attention pass's "unmatched")."""

    name: str
    pattern: Callable[[fx.GraphModule], list]
    check: Callable[[Rewriter, Any], str | None]
    rewrite: Callable[[Rewriter, Any], None]
    refused: str | None = None


Note = Callable[[Rule, Any, str], str]  # (rule, match, reason) -> the note for a match left


def apply_rules(gm: fx.GraphModule, ctx: PassContext | None, rules: tuple[Rule, ...], describe, label: str, *,
                order: Callable[[Any], Any] | None = None, note: Note | None = None, keys: tuple[str, ...] = (),
                fake: bool = True) -> tuple[Rewriter | None, list[str]]:
    """Run a table of rules over gm: each rule's matches are checked, rewritten or left with a note (by default
    "<rule>: left <describe(match)>: <reason>"); counts per rule (and per refusal key, and per name in `keys`, which
    the rewrites count themselves) in rw.counts, each present even when zero; every match in rw.log.

    order: a sort key over matches. None: rule after rule, each over the graph the previous ones left. Given: every
    rule's pattern and check run first, over the graph as found, and the matches are then rewritten or noted in key
    order across the whole table -- for matches that do not overlap (each rewrite leaves the other matches'
    subgraphs as they were) and must be handled, reported and named in one order (e.g. graph order).
    fake: False for rules that need no FakeTensorMode (they make their own values, or none): any graph then runs.
    Returns (None, [why]) when the graph has no fake values to rewrite with and `fake` asks for them."""
    rw = Rewriter.over(gm, ctx, fake=fake)
    if rw is None:
        return None, [f"{label}: the graph has no fake meta['val'] (propagate it first); unchanged"]
    note = note or (lambda rule, match, reason: f"{rule.name}: left {describe(match)}: {reason}")
    if order is None:
        for rule in rules:
            _zero(rw, (rule,))
            for match in rule.pattern(gm):
                _settle(rw, rule, match, rule.check(rw, match), note)
    else:
        _zero(rw, rules)
        decided = [(rule, match, rule.check(rw, match)) for rule in rules for match in rule.pattern(gm)]
        for rule, match, reason in sorted(decided, key=lambda d: order(d[1])):
            _settle(rw, rule, match, reason, note)
    for key in keys:
        rw.counts.setdefault(key, 0)
    return rw, rw.notes


def _zero(rw: Rewriter, rules: tuple[Rule, ...]) -> None:
    """The rules' count keys, at zero until counted: their names, then their refusal keys."""
    for key in [rule.name for rule in rules] + [rule.refused for rule in rules if rule.refused]:
        rw.counts.setdefault(key, 0)


def _settle(rw: Rewriter, rule: Rule, match, reason: str | None, note: Note) -> None:
    """Rewrite one checked match (reason None) or note why it is left; count it either way and log it."""
    rw.log.append((rule.name, match, reason))
    if reason is None:
        rule.rewrite(rw, match)
        rw.count(rule.name)
        return
    rw.notes.append(note(rule, match, reason))
    if rule.refused:
        rw.count(rule.refused)


def run_rules(gm: fx.GraphModule, ctx: PassContext, rules: tuple[Rule, ...], describe, label: str, **options
              ) -> tuple[PassResult, Rewriter | None]:
    """apply_rules (its keyword options too), then the graph finished if anything changed and the notes in
    ctx.report (shared by the matmul and rope passes); returns the result and the rewriter (None when nothing
    could be rewritten)."""
    rw, notes = apply_rules(gm, ctx, rules, describe, label, **options)
    if rw is None:
        return PassResult(False, notes), None
    changed = any(rw.counts.get(rule.name) for rule in rules)
    if changed:
        finish(gm)
    ctx.report.extend(f"{label}: {note}" for note in rw.notes)
    return PassResult(changed, rw.notes, rw.counts), rw
