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
from fxopt import models, zoo
from fxopt.capture import capture
from fxopt.generate import GenerationError, build_generator
from fxopt.passes import tensor_parallel as tp
from fxopt.tensor_parallel import ShardingError, greedy_generate, local_bytes, shard_graph, shard_model

MODELS = ("llama-tiny", "gpt2-tiny")
BATCH, PROMPT, NEW_TOKENS = 2, 8, 4
MAX_SEQ = PROMPT + NEW_TOKENS
FP32 = 4
# An HF architecture at a tiny size (random weights): GQA with 2 KV heads, tied embeddings, HF's repeat_kv
HF_SPEC = ("hf:llama-3.2-1b,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
           "num_key_value_heads=2,head_dim=16,vocab_size=256")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checkpoint(name: str) -> dict[str, torch.Tensor]:
    """Every tensor the model's graph may read, by name: parameters and (non-persistent too) buffers."""
    model = models.build(name)
    return {**model.state_dict(), **dict(model.named_buffers())}


def _generated(gen) -> dict:
    """What a rank's KV-cache generator is checked on: its tokens, cache heads and bytes."""
    return {"kv_heads": [c.kv_heads for c in gen.programs.caches], "weight_bytes": gen.weight_bytes,
            "report": gen.tp_report}


def _rank_main(rank: int, world_size: int, port: int, folder: str, graphs: dict, hf_model) -> None:
    """One rank: shard each model's graph (captured on the meta device by the parent, inherited by fork) from
    the mmap'd checkpoint, run forward + greedy, record the results; build each model's KV-cache generator on
    its shard (meta model + checkpoint; the HF model through optimize); then shard_model on a bad head count."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    out = {}
    try:
        for name in MODELS:
            weights = torch.load(os.path.join(folder, f"{name}.pt"), mmap=True, weights_only=True)
            meta = models.build(name, device="meta")
            ids = meta.example_inputs(BATCH, PROMPT, device="cpu", seed=1)["input_ids"]
            gm = shard_graph(graphs[name], weights=weights)
            out[name] = {"logits": gm(input_ids=ids), "tokens": greedy_generate(gm, ids, NEW_TOKENS),
                         "report": gm.tp_report, "held": local_bytes(gm)}
            # the generator on this rank's shard, from the meta model and the checkpoint (no rank reads it whole);
            # fuse_decode: the decode program's passes (rope, one-row GEMVs, fusion) run on the shard too
            gen = build_generator(meta, {"input_ids": ids}, max_seq_len=MAX_SEQ, max_batch=BATCH, fuse_decode=True,
                                  tensor_parallel=dist.group.WORLD, weights=weights)
            out[name]["kv"] = {"tokens": gen.generate(ids, NEW_TOKENS)[:, PROMPT:], **_generated(gen)}
        ids = torch.randint(0, hf_model.config.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
        gen = fxopt.optimize(hf_model, {"input_ids": ids}, kv_cache=True, tensor_parallel="auto", max_seq_len=MAX_SEQ)
        out["hf"] = {"tokens": gen.generate(ids, NEW_TOKENS)[:, PROMPT:], **_generated(gen)}
        try:  # unseeded sampling: each rank would draw its own tokens
            gen.generate(ids, 2, do_sample=True)
            out["unseeded"] = "no error"
        except GenerationError as exc:
            out["unseeded"] = str(exc)
        try:  # an id past the vocabulary: refused, not looked up as zeros by every rank's shard
            gen.generate(torch.full_like(ids, hf_model.config.vocab_size), 1)
            out["past_vocab"] = "no error"
        except GenerationError as exc:
            out["past_vocab"] = str(exc)
        out["seeded"] = gen.generate(ids, NEW_TOKENS, do_sample=True, top_k=8, seed=7)[:, PROMPT:]
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


def _run_ranks(world_size: int, folder, graphs: dict, hf_model) -> list[dict]:
    """Fork the ranks (spawn would import torch and capture anew in each: most of the time on 2 cores)."""
    for name in MODELS:
        torch.save(_checkpoint(name), folder / f"{name}.pt")
    mp.start_processes(_rank_main, (world_size, _free_port(), str(folder), graphs, hf_model), nprocs=world_size,
                       start_method="fork")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def hf_model():
    """HF_SPEC with seeded random weights (decisive logits: larger than the default init), fp32 on the CPU."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = zoo.load_model(HF_SPEC, device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, meta_graphs, hf_model):
    return _run_ranks(2, tmp_path_factory.mktemp("tp2"), meta_graphs, hf_model)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, meta_graphs, hf_model):
    return _run_ranks(4, tmp_path_factory.mktemp("tp4"), meta_graphs, hf_model)


@torch.no_grad()
def _recompute(model, ids: torch.Tensor) -> torch.Tensor:
    """Greedy tokens by full forwards of the unsharded model (no cache)."""
    seq = ids
    for _ in range(NEW_TOKENS):
        logits = model(seq)
        logits = logits.logits if hasattr(logits, "logits") else logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, PROMPT:]


@pytest.fixture(scope="module")
def reference(hf_model):
    """Single-process logits and greedy tokens of each model (full recompute), and the single-process fxopt
    generator's tokens (name -> tokens under "generator")."""
    out, generator = {}, {}
    for name in MODELS:
        model = models.build(name)
        ids = model.example_inputs(BATCH, PROMPT, device="cpu", seed=1)["input_ids"]
        with torch.no_grad():
            out[name] = (model(ids), _recompute(model, ids))
        gen = build_generator(model, {"input_ids": ids}, max_seq_len=MAX_SEQ, max_batch=BATCH)
        generator[name] = gen.generate(ids, NEW_TOKENS)[:, PROMPT:]
    ids = torch.randint(0, hf_model.config.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    out["hf"] = (None, _recompute(hf_model, ids))
    gen = fxopt.optimize(hf_model, {"input_ids": ids}, kv_cache=True, max_seq_len=MAX_SEQ)
    generator["hf"] = gen.generate(ids, NEW_TOKENS)[:, PROMPT:]
    out["generator"] = generator
    return out


def expected_bytes(name: str, n: int) -> tuple[int, int]:
    """(per-rank, full) bytes from the config alone: attention, MLP, lm_head and token embedding 1/N (a KV head
    whole when n_kv < N; a tied table one shard for both), norms, position tables and row-parallel biases whole."""
    c = models.get_config(name)
    d, v = c.d_model, c.vocab_size
    if name.startswith("llama"):
        hd, kv = c.head_dim, c.n_kv_heads
        kv_local = kv // n if kv % n == 0 else 1
        attn_full, attn_local = 2 * d * d + 2 * d * kv * hd, 2 * d * d // n + 2 * d * kv_local * hd
        mlp = 3 * d * c.d_ff
        whole = c.n_layers * 2 * d + d + 2 * c.max_positions * hd
        full = whole + c.n_layers * (attn_full + mlp) + 2 * v * d  # untied: embedding and lm_head
        local = whole + c.n_layers * (attn_local + mlp // n) + 2 * v * d // n
    else:
        f = c.mlp_ratio * d
        split = 3 * d * d + 3 * d + d * d + 2 * d * f + f  # c_attn W+b, c_proj W, c_fc W+b, c_proj W
        whole = c.n_layers * (2 * d + 4 * d) + c.max_positions * d + 2 * d  # 2 biases, 2 LayerNorms; wpe; ln_f
        full = whole + c.n_layers * split + v * d  # tied: wte is lm_head
        local = whole + c.n_layers * split // n + v * d // n  # one shard of wte: the lookup's and the head's
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


def _check_generators(results: list[dict], reference, n: int) -> None:
    """Each rank's KV-cache generator: the single-process generator's tokens and full recompute's; caches of this
    rank's KV heads only; the bytes it streams are its shard's."""
    for name in (*MODELS, "hf"):
        recomputed, single = reference[name][1], reference["generator"][name]
        assert torch.equal(single, recomputed), (name, single, recomputed)  # the single-process generator itself
        for rank, got in enumerate(results):
            kv = got[name]["kv"] if name in MODELS else got[name]
            assert torch.equal(kv["tokens"], recomputed), (name, rank, kv["tokens"], recomputed)
            assert kv["weight_bytes"] == kv["report"].local_bytes < kv["report"].full_bytes, (name, rank)
    for name, c in ((n_, models.get_config(n_)) for n_ in MODELS):
        heads = c.n_kv_heads if name.startswith("llama") else c.n_heads
        local = heads // n if heads % n == 0 else 1
        assert all(r[name]["kv"]["kv_heads"] == [local] * c.n_layers for r in results), name


def test_sampling_needs_a_seed_and_ids_past_the_vocabulary_are_refused_on_shards(two_ranks):
    for got in two_ranks:
        assert got["unseeded"].startswith("generate: sampling on a tensor-parallel shard needs a seed")
    assert torch.equal(two_ranks[0]["seeded"], two_ranks[1]["seeded"])
    assert all(got["past_vocab"] == "generate: input_ids outside the vocabulary [0, 256)" for got in two_ranks)


def test_two_ranks_match_single_process(two_ranks, reference):
    _check(two_ranks, reference, 2)


def test_two_ranks_generate_with_kv_caches_on_their_shards(two_ranks, reference, hf_model):
    _check_generators(two_ranks, reference, 2)
    config = hf_model.config
    assert all(r["hf"]["kv_heads"] == [config.num_key_value_heads // 2] * config.num_hidden_layers
               for r in two_ranks)


def test_two_ranks_hold_about_half_of_the_sharded_layers(two_ranks):
    report = two_ranks[0]["llama-tiny"]["report"]
    assert {"embed_tokens.weight", "layers.0.self_attn.q_proj.weight"} <= set(report.sharded)
    assert not any("embed" in name for name in report.replicated)
    assert sum(s.startswith("attention") for s in report.sites) == 2 and any("lm_head" in s for s in report.sites)
    assert sum(s.startswith("embedding") for s in report.sites) == 1


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
    _check_generators(four_ranks, reference, 4)


def test_plan_refuses_without_a_process_group(meta_graphs):
    """The analysis alone, in this process: 4 heads over 3 ranks names the projection; nothing is changed."""
    gm = meta_graphs["gpt2-tiny"]
    before = gm.code
    with pytest.raises(ShardingError, match=r"head count 4 not divisible by 3 at `blocks.0.attn.c_attn`"):
        tp.plan_shards(gm, 3, 0)
    assert gm.code == before
