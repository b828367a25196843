"""Small facts about torch.fx nodes that every layer reads: their fake values, sizes as sympy, op names.

Foundation layer: imports nothing of fxopt, so codegen and the passes share one definition of each.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch import fx

from fxopt.opnames import BOOKKEEPING


def meta_val(x: Any) -> Any:
    """An fx node's meta["val"] (its fake value); anything else is its own value (a constant argument)."""
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def node_val(x: Any) -> Any:
    """An fx node's meta["val"]; None for anything that is not a node."""
    return x.meta.get("val") if isinstance(x, fx.Node) else None


def tensor_val(x: Any) -> torch.Tensor | None:
    """An fx node's meta["val"] when it is a tensor; None for anything else (sizes, tuples, constants)."""
    val = node_val(x)
    return val if isinstance(val, torch.Tensor) else None


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument given by position `index` or keyword `name`, else `default` (export keeps either)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def only_user(node: fx.Node) -> fx.Node | None:
    """The one node reading node's output; None when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    """The attribute of gm a get_attr target names (a dotted path: a buffer, parameter or constant)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def size_expr(size: Any) -> sympy.Expr:
    """A size (int, SymInt, SymFloat, SymBool) as a sympy expression in the export's symbols."""
    if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return sympy.sympify(size.node.expr)
    return sympy.sympify(size)


INT_MAX = 2**63 - 1  # the `end` a traced `x[a:]` slice carries


def same_size(a: Any, b: Any) -> bool:
    """Two sizes (ints or SymInts) are the same expression in the export's symbols."""
    return sympy.expand(size_expr(a) - size_expr(b)) == 0


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same_size(x, y) for x, y in zip(a.shape, b.shape))


def is_full_slice(node: Any) -> bool:
    """node is aten.slice(x, dim, start, end, step) that keeps all of x: start 0, step 1 and an end at or past
    the dim's size (None, INT_MAX, the size itself), or an output of x's shape. Judged by the arguments first:
    how far a fake slice's output size simplifies (Min(INT_MAX, s)) differs between torch releases."""
    if not isinstance(node, fx.Node) or node.target is not torch.ops.aten.slice.Tensor or not node.args:
        return False
    dim, start = node_arg(node, 1, "dim", 0), node_arg(node, 2, "start")
    end, step = node_arg(node, 3, "end"), node_arg(node, 4, "step", 1)
    if start not in (None, 0) or step != 1:
        return False
    if end is None or (isinstance(end, int) and end >= INT_MAX):
        return True
    inp, out = tensor_val(node.args[0]), tensor_val(node)
    if inp is None:
        return False
    end = node_val(end) if isinstance(end, fx.Node) else end
    if isinstance(end, (int, torch.SymInt)) and same_size(end, inp.shape[dim]):
        return True
    return out is not None and same_shape(inp, out)


def op_name(node: fx.Node, *, namespace: bool = True) -> str:
    """'aten.add.Tensor' (or 'add.Tensor' without the aten namespace) for an ATen call; a function's name
    otherwise; the node's op ('placeholder', ...) when it calls nothing."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
        return name if namespace else name.removeprefix("aten.")
    return getattr(target, "__name__", str(target)) if node.op in ("call_function", "call_method") else node.op


def is_bookkeeping(node: fx.Node) -> bool:
    """A node that is graph bookkeeping (fxopt.opnames.BOOKKEEPING), by its op name."""
    return op_name(node, namespace=False) in BOOKKEEPING or str(node.target) in BOOKKEEPING


def aten_ops(*names: str) -> frozenset:
    """The ATen overloads named 'packet.overload' (e.g. fxopt.opnames' sets); names this torch lacks are skipped."""
    found = []
    for name in names:
        packet, overload = name.split(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if op is not None:
            found.append(op)
    return frozenset(found)


def aten_packets(*names: str) -> frozenset:
    """The ATen overload packets (every overload of an op) of 'packet.overload' or 'packet' names this torch has."""
    packets = {name.split(".")[0] for name in names}
    return frozenset(getattr(torch.ops.aten, p) for p in packets if hasattr(torch.ops.aten, p))
