"""`fxopt.optimize`: a faster module with the model's call signature, built by the pipeline."""

from __future__ import annotations

import inspect
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from fxopt import numerics
from fxopt.capture import capture, pinned_message
from fxopt.codegen import precompile
from fxopt.cuda_graphs import GraphedForward
from fxopt.generate import build_generator
from fxopt.nodes import is_bookkeeping
from fxopt.passes.cost import COST_KEY
from fxopt.pipeline import Program, make_context, run_passes
from fxopt.tensor_parallel import shard_model, world_size_for


class OptimizedModule(torch.nn.Module):
    """The optimized graph, called like the original model; `program` holds what the passes did."""

    def __init__(self, program: Program, signature: inspect.Signature | None = None, positional: bool = False,
                 cuda_graphs: bool = False):
        super().__init__()
        self.gm = program.gm
        self.program = program
        self.fixed_kwargs = program.captured.fixed_kwargs  # e.g. use_cache=False for HF models
        self.signature = signature  # the model's: positional calls bind to the captured keyword names
        self.positional = positional  # captured through forward(*args)
        self.verification = ""  # what verify=True compared (empty when it did not run)
        # CUDA inputs: one CUDA graph per input-shape bucket, replayed (fxopt/cuda_graphs.py); None: plain calls
        self.graphs = GraphedForward(self.gm, name="optimized forward") if cuda_graphs else None
        self._positional_names = _positional_names(signature)
        self._checked: set = set()  # input signatures export's input checks have passed

    def forward(self, *args, **kwargs):
        if args and not self.positional and self.signature is not None:
            args, kwargs = (), self._bind(args, kwargs)
        self._check_pinned(args, kwargs)
        kwargs = {**self.fixed_kwargs, **kwargs}
        if self.graphs is not None:
            return self.graphs(*args, **kwargs)
        return self._call_graph(args, kwargs)

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        """Positional arguments by the model's parameter names (what Signature.bind gives, without its cost)."""
        names = self._positional_names
        if names is None or len(args) > len(names) or any(name in kwargs for name in names[:len(args)]):
            return dict(self.signature.bind(*args, **kwargs).arguments)  # its errors for a wrong call
        return {**dict(zip(names, args)), **kwargs}

    def _call_graph(self, args: tuple, kwargs: dict):
        """The graph module's call: the first call with an input signature (shapes, dtypes, devices, other
        values) runs torch.export's input checks and hooks; a repeated signature calls its code directly."""
        signature = _input_signature(args, kwargs)
        if signature is not None and signature in self._checked:
            return self.gm.forward(*args, **kwargs)
        out = self.gm(*args, **kwargs)
        if signature is not None:
            if len(self._checked) >= MAX_CHECKED_SIGNATURES:
                self._checked.clear()
            self._checked.add(signature)
        return out

    def _check_pinned(self, args: tuple, kwargs: dict) -> None:
        """A clear error, before any work, for a call at a size the capture made static."""
        pinned = self.program.captured.pinned
        if not pinned:
            return
        given = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
        wrong = [(name, axis, role, size) for name, axis, role, size in pinned
                 if isinstance(given.get(name), torch.Tensor) and given[name].shape[axis] != size]
        if wrong:

            got = ", ".join(f"`{n}` dim {a} is {given[n].shape[a]}" for n, a, _, _ in wrong)
            raise ValueError(f"{got}, but " + pinned_message(wrong, "was captured static"))

    def report(self) -> str:
        """What was fused, what attention became, and what stayed a PyTorch op."""
        lines = []
        for name, result in self.program.results.items():
            counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
            lines.append(
                f"{name}: {'changed' if result.changed else 'unchanged'}{' (' + counts + ')' if counts else ''}"
            )
            lines.extend(f"  {note}" for note in result.notes)
        lines.extend(stayed_pytorch(self.gm))
        if self.verification:
            lines.append(f"verify: {self.verification}")
        return "\n".join(lines)


MAX_CHECKED_SIGNATURES = 1024


def _positional_names(signature: inspect.Signature | None) -> list[str] | None:
    """The names positional arguments bind to, when every parameter is positional-or-keyword (else None)."""
    if signature is None:
        return None
    params = list(signature.parameters.values())
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return None
    return [p.name for p in params]


def _input_signature(args: tuple, kwargs: dict) -> tuple | None:
    """What export's input checks depend on: each tensor's shape, dtype and device, the other values; None
    when an input is neither a tensor nor a plain scalar (the checks then run at every call)."""
    parts = []
    for name, value in (*enumerate(args), *kwargs.items()):
        if isinstance(value, torch.Tensor):
            parts.append((name, value.shape, value.dtype, value.device))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((name, type(value), value))
        else:
            return None
    return tuple(parts)


#: Why an op left in the optimized graph was not rewritten, by its cost kind.
STAYED_REASON = {
    "matmul": "compute-bound: a cuBLAS GEMM",
    "attention": "attention the flash kernels do not cover (see explain)",
    "pointwise": "memory-bound, but its region would not remove bytes (or touches a value fusion cannot index)",
    "reduction": "memory-bound, but its region would not remove bytes (or is not a last-dim reduction)",
    "other": "no fusion rule for this op",
    "unknown": "no cost or fusion rule for this op",
}


def stayed_pytorch(gm: torch.fx.GraphModule) -> list[str]:
    """The ops left as PyTorch calls in the optimized graph, by op and count, with why (views are free)."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function" or is_bookkeeping(node):
            continue
        name = str(node.target).removeprefix("aten.")
        if name.startswith("fxopt."):
            continue
        cost = node.meta.get(COST_KEY)
        kind = cost.kind if cost is not None else "unknown"
        if kind == "layout":
            continue
        counts[(name, kind)] += 1
    if not counts:
        return ["stayed PyTorch ops: none (besides free views)"]
    lines = ["stayed PyTorch ops (op x count: why):"]
    for (name, kind), n in sorted(counts.items(), key=lambda item: -item[1]):
        lines.append(f"  {name} x{n}: {STAYED_REASON.get(kind, kind)}")
    return lines


def split_inputs(model: torch.nn.Module, example_inputs) -> tuple[tuple, dict[str, Any]]:
    """Example inputs as (positional, keyword): a tuple binds to forward's named parameters where it can."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return tuple(example_inputs), {}
    return (), dict(inspect.signature(model.forward).bind(*example_inputs).arguments)


def _on_cuda(args: tuple, kwargs: dict) -> bool:
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.is_cuda for t in tensors)


def _precompile(optimized: OptimizedModule, args: tuple, kwargs: dict) -> bool:
    """Compile all of the program's Triton kernels at once (a dry call, see codegen/precompile.py) so the
    first real call does not compile them one by one. Only on CUDA inputs and without autotuning."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors or not all(t.is_cuda for t in tensors) or precompile.autotuning() or not precompile.available():
        return False
    graphs, optimized.graphs = optimized.graphs, None  # a dry call launches nothing: never capture it
    try:
        with torch.no_grad(), precompile.compile_in_parallel():
            optimized(*args, **kwargs)
    finally:
        optimized.graphs = graphs
    return True


#: Keyword options `optimize` takes beyond its named parameters: passes to turn off, generator settings.
PASS_OPTIONS = ("rope", "epilogues")
GENERATOR_OPTIONS = ("dtype", "device", "use_cuda_graph", "fuse_decode")
TP_OPTIONS = ("weights",)  # tensor_parallel: name -> tensor for a model built on the meta device


def _check_options(options: dict[str, Any], kv_cache: bool, tensor_parallel) -> None:
    accepted = PASS_OPTIONS + (GENERATOR_OPTIONS if kv_cache else ()) + (TP_OPTIONS if tensor_parallel else ())
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        named = ("hw, fuse, attention, matmul, verify, dump_dir, dynamic_dims, kv_cache, max_seq_len, max_batch, "
                 "cuda_graphs, tensor_parallel, "
                 + ", ".join(accepted))
        raise TypeError(f"optimize: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                        f"accepted: {named}" + ("" if kv_cache else f" (with kv_cache=True also "
                                                                    f"{', '.join(GENERATOR_OPTIONS)})")
                        + ("" if tensor_parallel else f" (with tensor_parallel also {', '.join(TP_OPTIONS)})"))


def optimize(
    model: torch.nn.Module,
    example_inputs,
    *,
    hw=None,
    fuse: bool = True,
    attention: bool = True,
    matmul: bool = True,
    verify: bool = False,
    dump_dir=None,
    dynamic_dims=None,
    kv_cache: bool = False,
    max_seq_len: int | None = None,
    max_batch: int | None = None,
    cuda_graphs: bool | None = None,
    tensor_parallel: int | str | None = None,
    **options,
):
    """Capture `model`, rewrite attention, fuse memory-bound regions into generated Triton kernels.

    Returns an nn.Module called like `model` (or, with kv_cache=True, a generator with prefill,
    decode_step and generate; max_batch defaults to the example's batch, max_seq_len to the model's
    position table). The user's model is never mutated. With verify=True the optimized module is run
    against the original and a disagreement beyond the numerical contract raises, naming the worst region:
    at the example shape and at a longer sequence past every window the analysis found (with kv_cache=True,
    prefill + step-by-step decode against the full forward). `.verification` says what was compared.
    cuda_graphs (default: on when the example's tensors are on a GPU): the forward is captured in a CUDA graph
    per input-shape bucket and replayed (fxopt/cuda_graphs.py: outputs are copies, at most MAX_GRAPHS
    buckets, a shape measured faster uncaptured keeps none, autograd calls run uncaptured); the generator has
    its own decode graphs.
    Further options: rope=False keeps RoPE as PyTorch ops; epilogues=False keeps a linear's bias + GELU(tanh)
    out of its GEMM (default: as `matmul`).
    tensor_parallel=N (or "auto": the world size; torch.distributed initialised, N its world size): this rank's
    Megatron shard (fxopt/tensor_parallel.py). With kv_cache=True the generator's programs and caches are the
    shard's (every rank gets the same tokens); without, the sharded forward, no other pass run on it yet.
    weights=name -> tensor supplies a model built on the meta device, each rank reading only its slices.
    """
    _check_options(options, kv_cache, tensor_parallel)
    args, kwargs = split_inputs(model, example_inputs)
    group = None
    if tensor_parallel is not None:
        world_size_for(tensor_parallel)  # refuses a mismatch with the initialised group
        group = dist.group.WORLD
        if args:
            raise TypeError("optimize(tensor_parallel=...): give the inputs as keywords")
        if not kv_cache:
            return shard_model(model, kwargs, weights=options.pop("weights", None))
    if kv_cache:

        ids = numerics.token_ids(kwargs)
        max_batch = max_batch or (int(ids.shape[0]) if ids is not None else 1)
        max_seq_len = max_seq_len or numerics.position_limit(model)
        if max_seq_len is None:
            raise TypeError("optimize(kv_cache=True): give max_seq_len (the model has no position table to "
                            "take it from)")
        if cuda_graphs is not None:  # the generator's own decode graphs
            options.setdefault("use_cuda_graph", cuda_graphs)
        if dynamic_dims is not None:
            raise TypeError("optimize(kv_cache=True): dynamic_dims does not apply (the generator captures with "
                            "dynamic batch and sequence itself)")
        gen = build_generator(model, kwargs, max_seq_len=max_seq_len, max_batch=max_batch, hw=hw, matmul=matmul,
                              attention=attention, fuse=fuse, dump_dir=dump_dir, tensor_parallel=group, **options)
        if verify:
            gen.verification = numerics.verify_generator(model, gen, kwargs)
        return gen
    start = time.perf_counter()
    captured = capture(model, kwargs, dynamic_dims, args=args, source_lines=False)  # errors here name nodes
    capture_seconds = time.perf_counter() - start
    ctx = make_context(
        captured, hw, None, {"fuse": fuse, "rope": fuse, "attention": attention, "matmul": matmul,
                             "epilogues": matmul, "dump_dir": dump_dir, **options}
    )
    if cuda_graphs is None:
        cuda_graphs = _on_cuda(args, kwargs)
    optimized = OptimizedModule(run_passes(captured, ctx), inspect.signature(model.forward), positional=bool(args),
                                cuda_graphs=cuda_graphs and torch.cuda.is_available())
    optimized.program.seconds = {"capture": capture_seconds, **optimized.program.seconds}
    start = time.perf_counter()
    if _precompile(optimized, args, kwargs):
        optimized.program.seconds["precompile"] = time.perf_counter() - start
    if verify:
        optimized.verification = numerics.verify_forward(model, optimized, args, {**kwargs, **captured.fixed_kwargs})
    return optimized
