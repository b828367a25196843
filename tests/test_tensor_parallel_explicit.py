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


HF_EAGER = ("hf:llama,hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,"
            "num_key_value_heads=2,vocab_size=256")


def _hf_eager():
    """An HF Llama config with its eager attention (matmul, + mask, softmax, matmul; repeat_kv for GQA)."""
    from fxopt.zoo import load_model

    torch.manual_seed(0)
    model = load_model(HF_EAGER, device="cpu").eval()
    model.config._attn_implementation = "eager"
    return model


def _rank(rank: int, port: int, folder: str, graphs: dict, weights: dict, ids: torch.Tensor) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {}
        for name, graph in graphs.items():
            kinds = [site.kind for site in tp.plan_shards(graph, WORLD, rank).sites]  # analysis only
            gm = shard_graph(graph, weights=weights[name])
            extra = {"use_cache": False} if name == "hf-eager" else {}  # the HF capture's own keyword
            logits = gm(input_ids=ids, **extra)
            out[name] = {"logits": logits.logits if name == "hf-eager" else logits,
                         "tokens": greedy_generate(gm, ids, NEW, **extra), "kinds": kinds, "report": gm.tp_report}
        torch.save(out, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """models/ explicit llama-tiny and (with transformers) an HF Llama config with eager attention, captured on
    the CPU (the explicit causal mask is built on the ids' device); each rank keeps only its shard."""
    folder = tmp_path_factory.mktemp("tp_explicit")
    built = {"explicit": _model()}
    try:
        built["hf-eager"] = _hf_eager()
    except ImportError:
        pass
    ids = torch.randint(0, 256, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))  # in both vocabularies
    weights = {name: {**m.state_dict(), **dict(m.named_buffers())} for name, m in built.items()}
    graphs = {name: capture(m, {"input_ids": ids}, source_lines=False).gm for name, m in built.items()}
    mp.start_processes(_rank, (_free_port(), str(folder), graphs, weights, ids), nprocs=WORLD, start_method="fork")
    return built, ids, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _eager_logits(model, ids):
    return model(input_ids=ids) if isinstance(model, models.Llama) else model(ids, use_cache=False).logits


@pytest.mark.parametrize("name", ["explicit", "hf-eager"])
def test_explicit_attention_is_sharded_by_heads(ranks, name):
    built, _, results = ranks
    if name not in built:
        pytest.skip("transformers is not installed")
    for result in results:
        assert result[name]["kinds"].count("attention") == 2  # both layers' attention, by heads
        assert not result[name]["report"].replicated_linears  # q/k/v/o sharded with the MLPs


@pytest.mark.parametrize("name", ["explicit", "hf-eager"])
def test_sharded_explicit_attention_gives_the_models_logits_and_tokens(ranks, name):
    built, ids, results = ranks
    if name not in built:
        pytest.skip("transformers is not installed")
    model = built[name]
    with torch.no_grad():
        logits = _eager_logits(model, ids)
        tokens = ids
        for _ in range(NEW):
            tokens = torch.cat([tokens, _eager_logits(model, tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    for result in results:
        torch.testing.assert_close(result[name]["logits"], logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(result[name]["tokens"], tokens[:, PROMPT:])  # the new tokens


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
