"""Registration of fxopt's non-mutating ops (fxopt::attention, fxopt::rope, fxopt::gemv, ...).

`define` registers a Python function as the op's one implementation for every device, through torch.library's
low-level `Library` API (dispatch key CompositeExplicitAutograd), and `register_fake` its shape function for
FakeTensor tracing (torch.export, the passes' shape propagation). A call then costs one dispatcher hop.
`torch.library.custom_op` would add an autograd wrapper, a second redispatch and an output-aliasing check to
every call: measured on an H200 host, 48 µs of an fxopt::attention call's 171 µs (benchmarks/launch_cost.py).
fxopt's ops are inference kernels with no autograd formula either way: the implementation runs under
no_grad, as custom_op runs it.

Ops that mutate an argument (the cache writes) stay `torch.library.custom_op`s: it also registers the
ADInplaceOrView kernel that bumps the mutated tensor's version counter, and they run inside CUDA graphs, where
dispatch costs nothing per replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LIBRARY = torch.library.Library("fxopt", "FRAGMENT")  # shared with the custom_op registrations


def define(name: str, schema: str | None = None) -> Callable:
    """Decorator: `fn` becomes the op fxopt::`name` (its schema inferred from the annotations unless given);
    returns the op, torch.ops.fxopt.`name`, which is called like `fn`."""

    def register(fn: Callable):
        def inference_only(*args, **kwargs):  # as custom_op runs it: no autograd graph inside
            with torch.no_grad():
                return fn(*args, **kwargs)

        LIBRARY.define(name + (schema or torch.library.infer_schema(fn, mutates_args=())))
        LIBRARY.impl(name, inference_only, "CompositeExplicitAutograd")
        return getattr(torch.ops.fxopt, name)

    return register


def register_fake(op) -> Callable:
    """Decorator: the op's shape function (outputs as empty tensors of the right shape, dtype and device)."""
    return torch.library.register_fake(op.default, lib=LIBRARY)
