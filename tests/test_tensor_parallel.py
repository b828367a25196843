"""Tensor parallelism over torch.distributed (gloo, CPU): N ranks run their shards of llama-tiny and gpt2-tiny.

One spawn per world size runs every check of both models in the ranks (starting processes dominates the time)
and writes what it saw to a file per rank; the tests compare that with the single-process model here:
logits (rtol 1e-5), greedy tokens (identical), and each rank's bytes against a count made from the config.
The ranks build their models on the meta device and read their shards from a memory-mapped checkpoint.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxopt
from fxopt import models
from fxopt.capture import capture
from fxopt.passes import tensor_parallel as tp
from fxopt.tensor_parallel import ShardingError, greedy_generate, local_bytes, shard_graph, shard_model

MODELS = ("llama-tiny", "gpt2-tiny")
BATCH, PROMPT, NEW_TOKENS = 2, 8, 4
FP32 = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checkpoint(name: str) -> dict[str, torch.Tensor]:
    """Every tensor the model's graph may read, by name: parameters and (non-persistent too) buffers."""
    model = models.build(name)
    return {**model.state_dict(), **dict(model.named_buffers())}


def _rank_main(rank: int, world_size: int, port: int, folder: str, graphs: dict) -> None:
    """One rank: shard each model's graph (captured on the meta device by the parent, inherited by fork) from
    the mmap'd checkpoint, run forward + greedy, record the results; then shard_model on a bad head count."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    out = {}
    try:
        for name in MODELS:
            weights = torch.load(os.path.join(folder, f"{name}.pt"), mmap=True, weights_only=True)
            ids = models.build(name, device="meta").example_inputs(BATCH, PROMPT, device="cpu", seed=1)["input_ids"]
            gm = shard_graph(graphs[name], weights=weights)
            out[name] = {"logits": gm(input_ids=ids), "tokens": greedy_generate(gm, ids, NEW_TOKENS),
                         "report": gm.tp_report, "held": local_bytes(gm)}
        # optimize's dispatch, on a model with its own weights (each rank reads the whole model, keeps its shard)
        model = models.build("llama-tiny")
        ids = model.example_inputs(BATCH, PROMPT, device="cpu", seed=1)["input_ids"]
        out["optimize"] = fxopt.optimize(model, {"input_ids": ids}, tensor_parallel="auto")(input_ids=ids)
        try:
            fxopt.optimize(model, {"input_ids": ids}, tensor_parallel=world_size + 1)
        except ValueError as exc:
            out["optimize_mismatch"] = str(exc)
        # a head count the world size does not divide: refused before a single tensor is read
        read = []
        bad = models.build("llama-tiny", device="meta", n_heads=3 * world_size - 1, n_kv_heads=1,
                           d_model=16 * (3 * world_size - 1), n_layers=1)
        try:
            shard_model(bad, bad.example_inputs(2, 4, device="cpu"), rank, world_size,
                        weights=lambda n: read.append(n))
            out["bad"] = ("no error", read)
        except ShardingError as exc:
            out["bad"] = (str(exc), read)
    finally:
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def meta_graphs():
    """Each model captured once on the meta device (no weights); the forked ranks shard their own copies."""
    graphs = {}
    for name in MODELS:
        meta = models.build(name, device="meta")
        graphs[name] = capture(meta, meta.example_inputs(BATCH, PROMPT, device="cpu"), source_lines=False).gm
    return graphs


def _run_ranks(world_size: int, folder, graphs: dict) -> list[dict]:
    """Fork the ranks (spawn would import torch and capture anew in each: most of the time on 2 cores)."""
    for name in MODELS:
        torch.save(_checkpoint(name), folder / f"{name}.pt")
    mp.start_processes(_rank_main, (world_size, _free_port(), str(folder), graphs), nprocs=world_size,
                       start_method="fork")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, meta_graphs):
    return _run_ranks(2, tmp_path_factory.mktemp("tp2"), meta_graphs)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, meta_graphs):
    return _run_ranks(4, tmp_path_factory.mktemp("tp4"), meta_graphs)


@pytest.fixture(scope="module")
def reference():
    """Single-process logits and greedy tokens of each model."""
    out = {}
    for name in MODELS:
        model = models.build(name)
        ids = model.example_inputs(BATCH, PROMPT, device="cpu", seed=1)["input_ids"]
        with torch.no_grad():
            logits, seq = model(ids), ids
            for _ in range(NEW_TOKENS):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        out[name] = (logits, seq[:, PROMPT:])
    return out


def expected_bytes(name: str, n: int) -> tuple[int, int]:
    """(per-rank, full) bytes from the config alone: attention, MLP and lm_head 1/N (a KV head whole when
    n_kv < N), embeddings, norms, position tables and row-parallel biases whole (a tied lm_head: both)."""
    c = models.get_config(name)
    d, v = c.d_model, c.vocab_size
    if name.startswith("llama"):
        hd, kv = c.head_dim, c.n_kv_heads
        kv_local = kv // n if kv % n == 0 else 1
        attn_full, attn_local = 2 * d * d + 2 * d * kv * hd, 2 * d * d // n + 2 * d * kv_local * hd
        mlp = 3 * d * c.d_ff
        whole = v * d + c.n_layers * 2 * d + d + 2 * c.max_positions * hd
        full = whole + c.n_layers * (attn_full + mlp) + v * d
        local = whole + c.n_layers * (attn_local + mlp // n) + v * d // n
    else:
        f = c.mlp_ratio * d
        split = 3 * d * d + 3 * d + d * d + 2 * d * f + f  # c_attn W+b, c_proj W, c_fc W+b, c_proj W
        whole = c.n_layers * (2 * d + 4 * d) + c.max_positions * d + 2 * d  # 2 biases, 2 LayerNorms; wpe; ln_f
        full = whole + c.n_layers * split + v * d  # tied: wte is lm_head
        local = whole + c.n_layers * split // n + v * d + v * d // n  # the lookup's whole table + the head's shard
    return local * FP32, full * FP32


def _check(results: list[dict], reference, n: int) -> None:
    for name in MODELS:
        logits, tokens = reference[name]
        local, full = expected_bytes(name, n)
        for rank, got in enumerate(results):
            r = got[name]
            torch.testing.assert_close(r["logits"], logits, rtol=1e-5, atol=1e-6, msg=f"{name} rank {rank}")
            assert torch.equal(r["tokens"], tokens), (name, rank, r["tokens"], tokens)
            assert (r["report"].local_bytes, r["report"].full_bytes) == (local, full), (name, rank, str(r["report"]))
            assert r["held"] == local, (name, rank, r["held"], local)
            assert r["report"].replicated_linears == []


def test_two_ranks_match_single_process(two_ranks, reference):
    _check(two_ranks, reference, 2)


def test_two_ranks_hold_about_half_of_the_sharded_layers(two_ranks):
    report = two_ranks[0]["llama-tiny"]["report"]
    assert "embed_tokens.weight" in report.replicated and "layers.0.self_attn.q_proj.weight" in report.sharded
    assert sum(s.startswith("attention") for s in report.sites) == 2 and any("lm_head" in s for s in report.sites)


def test_optimize_dispatches_to_the_world(two_ranks, reference):
    for got in two_ranks:
        torch.testing.assert_close(got["optimize"], reference["llama-tiny"][0], rtol=1e-5, atol=1e-6)
        assert got["optimize_mismatch"].startswith("tensor_parallel=3, but torch.distributed has 2 ranks")


def test_bad_head_count_is_refused_before_weights(two_ranks):
    for got in two_ranks:
        message, read = got["bad"]
        assert message == "head count 5 not divisible by 2 at `layers.0.self_attn.q_proj`"
        assert read == []


@pytest.mark.slow
def test_four_ranks_match_single_process(four_ranks, reference):
    """n_kv_heads=2 < 4 ranks for llama-tiny: each rank keeps the KV head its q head reads."""
    _check(four_ranks, reference, 4)


def test_plan_refuses_without_a_process_group(meta_graphs):
    """The analysis alone, in this process: 4 heads over 3 ranks names the projection; nothing is changed."""
    gm = meta_graphs["gpt2-tiny"]
    before = gm.code
    with pytest.raises(ShardingError, match=r"head count 4 not divisible by 3 at `blocks.0.attn.c_attn`"):
        tp.plan_shards(gm, 3, 0)
    assert gm.code == before
