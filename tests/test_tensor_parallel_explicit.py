"""Tensor parallelism of attention written out (softmax(q kᵀ) v, models/ with attn_impl="explicit"; HF's eager
attention has the same form) on 2 gloo ranks: each rank's shard against the single-process model in fp32."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_tensor_parallel import _free_port

from fxopt import models
from fxopt.capture import capture
from fxopt.passes import tensor_parallel as tp
from fxopt.tensor_parallel import greedy_generate, shard_graph

WORLD, BATCH, PROMPT, NEW = 2, 2, 8, 4


def _model(device="cpu"):
    torch.manual_seed(0)
    return models.build("llama-tiny", attn_impl="explicit", device=device).eval()


def _rank(rank: int, port: int, folder: str, graph, weights: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ids = _model("meta").example_inputs(BATCH, PROMPT, device="cpu", seed=1)["input_ids"]
        kinds = [site.kind for site in tp.plan_shards(graph, WORLD, rank).sites]  # analysis only: graph unchanged
        gm = shard_graph(graph, weights=weights)
        torch.save({"logits": gm(input_ids=ids), "tokens": greedy_generate(gm, ids, NEW), "kinds": kinds,
                    "report": gm.tp_report}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp_explicit")
    model = _model()
    weights = {**model.state_dict(), **dict(model.named_buffers())}
    # captured from the CPU model (the explicit causal mask is built on the ids' device); each rank keeps only its
    # shard of `weights`
    graph = capture(model, model.example_inputs(BATCH, PROMPT, device="cpu"), source_lines=False).gm
    mp.start_processes(_rank, (_free_port(), str(folder), graph, weights), nprocs=WORLD, start_method="fork")
    return model, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_explicit_attention_is_sharded_by_heads(ranks):
    _, results = ranks
    for result in results:
        assert result["kinds"].count("attention") == _model("meta").config.n_layers
        assert not result["report"].replicated_linears  # q/k/v/o sharded with the MLPs


def test_sharded_explicit_attention_gives_the_models_logits_and_tokens(ranks):
    model, results = ranks
    ids = model.example_inputs(BATCH, PROMPT, device="cpu", seed=1)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids)
        tokens = ids
        for _ in range(NEW):
            tokens = torch.cat([tokens, model(input_ids=tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    for result in results:
        torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(result["tokens"], tokens[:, PROMPT:])  # greedy_generate returns the new tokens


def test_a_per_head_score_bias_is_refused_naming_the_node():
    """ALiBi written out: a bias that differs by head mixes other ranks' heads into the scores."""
    class Alibi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96, bias=False)
            self.out = torch.nn.Linear(32, 32, bias=False)
            self.register_buffer("slopes", torch.linspace(0.1, 0.4, 4).view(1, 4, 1, 1))

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (t.view(b, s, 4, 8).transpose(1, 2) for t in self.qkv(x).split(32, -1))
            pos = torch.arange(s, dtype=x.dtype)
            scores = q @ k.transpose(-2, -1) + self.slopes * (pos[None, :] - pos[:, None])
            return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, 32))

    gm = capture(Alibi().eval(), {"x": torch.randn(1, 5, 32)}, dynamic_dims={}).gm
    with pytest.raises(tp.ShardingError, match="per-head"):
        tp.plan_shards(gm, 2, 0)
