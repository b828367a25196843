"""fxopt/bench/decode_tp.py (`fxopt bench MODEL --decode --tp N`) on 2 gloo ranks on the CPU: each rank builds its
shard of the name-seeded random weights, and the tokens it generates equal a single-process generator's on the
same weights (the full model, materialised here from the same weight function); each rank streams about half
of the sharded weights. Timings on the CPU are a smoke run only."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fxopt import zoo
from fxopt.bench import decode_tp
from fxopt.errors import UserError
from fxopt.generate import build_generator

# a preset, and an HF architecture (its RoPE inv_freq buffer comes from the one-layer copy)
SPECS = ("llama-tiny", "hf:llama-3.2-1b,num_hidden_layers=2,hidden_size=64,intermediate_size=128,"
                       "num_attention_heads=4,num_key_value_heads=2,head_dim=16,vocab_size=256")
CONFIGS = ((2, 9, 6),)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, folder: str, spec: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    results = decode_tp.run(spec, world_size, configs=CONFIGS, dtype=torch.float32, repeat=1,
                            json_path=os.path.join(folder, "report.json"))
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


@pytest.fixture(scope="module", params=SPECS, ids=["preset", "hf"])
def spec(request):
    if request.param.startswith("hf:"):
        pytest.importorskip("transformers")
    return request.param


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, spec):
    folder = tmp_path_factory.mktemp("bench_tp")
    mp.start_processes(_rank_main, (2, _free_port(), str(folder), spec), nprocs=2, start_method="fork")
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def single_process(spec):
    """(tokens, weight bytes a decode step streams) of the unsharded generator on the same weights."""
    meta = zoo.load_model(spec, device="meta", dtype=torch.float32)
    weights = decode_tp.random_weights(spec, meta, torch.float32)
    model = zoo.load_model(spec, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights(name))
    batch, prompt, new = CONFIGS[0]
    vocab = model.config.vocab_size
    from fxopt.models.inputs import random_token_ids

    ids = random_token_ids(batch, prompt, vocab, seed=0)
    gen = build_generator(model, {"input_ids": ids[:, :8]}, max_seq_len=prompt + new, max_batch=batch)
    return gen.generate(ids, new), gen.weight_stream_bytes(batch)


def test_ranks_generate_the_single_process_tokens(two_ranks, single_process):
    for rank in two_ranks[0]:
        assert torch.equal(rank[0]["tokens"], single_process[0])


def test_rank_zero_writes_the_report(two_ranks):
    ranks, report = two_ranks
    assert report["tp"] == 2 and len(report["rows"]) == len(CONFIGS)
    assert report["rows"][0]["local_weight_bytes"] == ranks[0][0]["local_weight_bytes"]


def test_hf_tensor_parallel_peer_runs_the_same_weights(two_ranks, spec):
    """An hf: model is timed against HF's own tensor parallelism on the same weights: fp32, so the same tokens."""
    if not spec.startswith("hf:"):
        assert "hf_ms_per_token" not in two_ranks[0][0][0]
        return
    pytest.importorskip("accelerate")
    for rank in two_ranks[0]:
        assert rank[0]["hf_match"] == 1.0 and rank[0]["hf_ms_per_token"] > 0


def test_each_rank_streams_about_half_the_weights(two_ranks, single_process):
    full = single_process[1]
    for rank in two_ranks[0]:
        held = rank[0]["local_weight_bytes"]
        assert 0.5 * full <= held < 0.6 * full  # half of every sharded matrix, the norms replicated


def test_a_world_size_that_does_not_match_is_a_clear_error():
    with pytest.raises(UserError, match="needs 2 processes"):
        decode_tp.run(SPECS[0], 2, configs=CONFIGS)  # no torchrun: nothing to rendezvous with
