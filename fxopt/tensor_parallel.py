"""Tensor-parallel inference over torch.distributed: each rank runs its shard of the captured forward.

    dist.init_process_group("gloo")                       # or nccl; any initialised group
    model = fxopt.models.build("llama-tiny", device="meta")  # no weights on any rank
    gm = shard_model(model, model.example_inputs(1, 8), weights=load)  # load(name) -> the full tensor of `name`
    logits = gm(input_ids=ids)                            # identical on every rank (all-reduce / all-gather)
    tokens = greedy_generate(gm, ids, max_new_tokens=16)

The sharding itself is passes/tensor_parallel.py (Megatron layout, found by graph patterns). A model on the meta
device is captured without weights; its tensors then come from `weights`: a mapping or a callable name -> tensor
(the model's state_dict names; non-persistent buffers such as RoPE tables too). Each tensor is read once and
only this rank's rows or columns are kept, so with a lazy source (torch.load(..., mmap=True), safetensors) no
rank ever holds the whole model. `gm.tp_report` says what each rank holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import fx

from fxopt.capture import capture
from fxopt.nodes import fetch_attr
from fxopt.passes import tensor_parallel as tp
from fxopt.passes.tensor_parallel import ShardingError  # noqa: F401  (re-exported)

Weights = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


@dataclass
class TPReport:
    """What one rank holds: bytes of its tensors against the unsharded model's, and which are replicated."""

    rank: int
    world_size: int
    local_bytes: int
    full_bytes: int
    sharded: list[str] = field(default_factory=list)
    replicated: list[str] = field(default_factory=list)
    replicated_linears: list[str] = field(default_factory=list)  # linears no pattern claimed (run whole)
    sites: list[str] = field(default_factory=list)  # "attention at `node`", "mlp at `node`", "lm_head at ..."

    def __str__(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: {self.local_bytes} of {self.full_bytes} bytes "
                f"({self.local_bytes / self.full_bytes:.1%}); sharded {len(self.sharded)} tensors at "
                f"{', '.join(self.sites)}; replicated: {', '.join(self.replicated) or 'none'}")


def shard_model(model: torch.nn.Module, inputs: dict, rank: int | None = None, world_size: int | None = None,
                group: dist.ProcessGroup | None = None, *, weights: Weights | None = None) -> fx.GraphModule:
    """This rank's program: `model` captured at `inputs`, sharded over `group` (default: the world), its tensors
    only this rank's shard. rank/world_size default to the group's and must match it when given.

    Sharding errors (a head count not divisible by the world size, ...) are raised after capture and before any
    tensor is read. weights=None reads the model's own tensors (every rank then holds the whole model for the
    duration of the call); give `weights` for a model on the meta device."""
    group = group if group is not None else _world()
    _check_group(group, rank, world_size)
    return shard_graph(capture(model, inputs, source_lines=False).gm, group, weights=weights)


def shard_graph(gm: fx.GraphModule, group: dist.ProcessGroup | None = None, *,
                weights: Weights | None = None) -> fx.GraphModule:
    """shard_model's work on a graph captured already (fxopt.capture; rewritten in place and returned)."""
    group = group if group is not None else _world()
    rank, world_size = _check_group(group, None, None)
    plan = tp.plan_shards(gm, world_size, rank)  # ShardingError here: nothing materialised yet
    tp.apply_plan(gm, plan, group.group_name, _loader(gm, weights), device=_input_device(gm))
    gm.tp_report = _report(plan)
    return gm


def world_size_for(tensor_parallel: int | str) -> int:
    """optimize(tensor_parallel=...): "auto" is the initialised world size; a number must equal it."""
    size = dist.get_world_size(_world())
    if tensor_parallel != "auto" and tensor_parallel != size:
        raise ValueError(f"tensor_parallel={tensor_parallel!r}, but torch.distributed has {size} ranks "
                         "(give the world size, or \"auto\")")
    return size


def _world() -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs torch.distributed initialised (dist.init_process_group)")
    return dist.group.WORLD


def _check_group(group: dist.ProcessGroup, rank: int | None, world_size: int | None) -> tuple[int, int]:
    actual_rank, actual_size = dist.get_rank(group), dist.get_world_size(group)
    if world_size is not None and world_size != actual_size:
        raise ValueError(f"world_size={world_size}, but the process group has {actual_size} ranks")
    if rank is not None and rank != actual_rank:
        raise ValueError(f"rank={rank}, but this process is rank {actual_rank} of its group")
    return actual_rank, actual_size


def _loader(gm: fx.GraphModule, weights: Weights | None) -> Callable[[str], torch.Tensor]:
    """name -> the full tensor: from `weights`, or the captured graph's own attributes."""
    if weights is None:
        def own(name: str) -> torch.Tensor:
            tensor = fetch_attr(gm, name)
            if tensor.is_meta:
                raise ValueError(f"`{name}` is on the meta device: give shard_model(..., weights=...)")
            return tensor
        return own
    if callable(weights):
        return weights

    def lookup(name: str) -> torch.Tensor:
        if name not in weights:
            raise KeyError(f"weights has no tensor `{name}` (the graph reads it; non-persistent buffers such as "
                           "RoPE tables must be given too)")
        return weights[name]
    return lookup


def _input_device(gm: fx.GraphModule) -> torch.device:
    """Where the graph's inputs live: the shards are put there."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if isinstance(node.meta.get("val"), torch.Tensor):
            return node.meta["val"].device
    return torch.device("cpu")


def _report(plan: tp.ShardPlan) -> TPReport:
    sites = [f"{s.kind} at `{s.name}`" for s in plan.sites]
    if plan.lm_head is not None:
        sites.append(f"lm_head at `{plan.lm_head.name}`")
    sites += [f"embedding at `{lookup.name}`" for lookup in plan.embeddings]
    return TPReport(plan.rank, plan.world_size, plan.bytes(local=True), plan.bytes(local=False), plan.sharded(),
                    plan.replicated(), plan.replicated_linears, sites)


def local_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the parameters and buffers `gm` holds (a shared tensor once)."""
    seen = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


@torch.no_grad()
def greedy_generate(gm: fx.GraphModule, input_ids: torch.Tensor, max_new_tokens: int, **inputs) -> torch.Tensor:
    """Greedy tokens by full forwards (no KV cache): argmax of the last position, appended, max_new_tokens times.
    Every rank computes the same logits (they are all-gathered), so every rank picks the same tokens. `inputs`:
    the graph's other keyword inputs (an HF model's capture takes use_cache=False)."""
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = _logits(gm(input_ids=ids, **inputs))  # (b, s, vocab)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def _logits(out) -> torch.Tensor:
    """The logits of a forward's output: a tensor, the first of a tuple, or an HF output's `.logits`."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out[0]
