"""fxopt.generate on CUDA: the decode step replayed from a CUDA graph, with the Flash-Decoding kernel.

  * fp32 greedy tokens identical to full recompute (batch 1 and a left-padded batch) for GPT-2 and Llama
    spellings, and identical to the same generator decoding eagerly (no graph);
  * one capture per batch bucket: nothing re-captures as the sequence grows;
  * bf16: per-step logits (teacher forcing) within 3x eager bf16's error against an fp32 reference;
  * the decode step reaches decode_attention (Flash-Decoding) with kv_start.

Skipped without a GPU (tests/gpu/conftest.py). Run alone: python -m pytest tests/gpu/test_generate_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from fxopt import models
from fxopt.codegen import flash_decoding
from fxopt.generate import Generator, build_generator

DEVICE = "cuda"
NEW = 64


def left_pad(rows, pad_id=0):
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=DEVICE)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=DEVICE)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1]:] = r[0]
        mask[i, width - r.shape[1]:] = 1
    return ids, mask


@torch.no_grad()
def recompute(model, ids, new):
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1)[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_cuda_graph_greedy_matches_full_recompute(name, attn_impl):
    model = models.build(name, attn_impl=attn_impl, device=DEVICE)
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=24 + NEW, max_batch=4)
    assert gen.use_cuda_graph
    a = model.example_inputs(1, 24, seed=1)["input_ids"]
    b = model.example_inputs(1, 13, seed=2)["input_ids"]
    ref_a, ref_b = recompute(model, a, NEW), recompute(model, b, NEW)
    assert torch.equal(gen.generate(a, NEW), ref_a)
    assert gen.captures == 1
    ids, mask = left_pad([b, a, b])  # batch 3 -> bucket 4
    out = gen.generate(ids, NEW, attention_mask=mask)
    assert torch.equal(out[0, 11:], ref_b[0]) and torch.equal(out[2, 11:], ref_b[0])
    assert torch.equal(out[1], ref_a[0])
    assert gen.captures == 2  # buckets 1 and 4, each captured once, whatever the length
    gen.generate(a, NEW)
    gen.generate(ids, NEW, attention_mask=mask)
    assert gen.captures == 2


def test_graph_replay_equals_eager_decode():
    """Same (unfused) program, replayed from a CUDA graph or run eagerly: bitwise the same."""
    model = models.build("llama-tiny", device=DEVICE)
    graphed = build_generator(model, model.example_inputs(1, 8), max_seq_len=128, max_batch=2, fuse_decode=False)
    eager = Generator(graphed.programs, max_seq_len=128, max_batch=2, device=torch.device(DEVICE),
                      use_cuda_graph=False, fuse_decode=False)
    ids = model.example_inputs(2, 17, seed=3)["input_ids"]
    assert torch.equal(graphed.generate(ids, 100), eager.generate(ids, 100))
    g0, e0 = graphed.prefill(ids), eager.prefill(ids)
    assert torch.equal(g0, e0)
    nxt = g0.argmax(-1)[:, None]
    for _ in range(10):
        g, e = graphed.decode_step(nxt), eager.decode_step(nxt)
        assert torch.equal(g, e)
        nxt = g.argmax(-1)[:, None]


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_replays_equal_the_host_loop(batch):
    """Greedy generate() without a stop token runs replays that feed themselves (argmax, slot and history in
    the graph); with a stop token that never comes (-1) it picks on the host each step: same tokens. Then
    decode_step continues from where the replays left the device-side slot."""
    model = models.build("llama-tiny", device=DEVICE)
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=96, max_batch=4)
    ids = model.example_inputs(batch, 11, seed=9)["input_ids"]
    host = gen.generate(ids, 40, eos_token_id=-1)
    fast = gen.generate(ids, 40)
    assert gen.stats.decode_steps == 39
    assert torch.equal(fast, host)
    assert torch.equal(fast, recompute(model, ids, 40))
    nxt = gen.decode_step(fast[:, -1:]).argmax(-1)  # position 51, after the 40 generated
    assert torch.equal(nxt, model(fast)[:, -1].argmax(-1))


def test_fused_decode_matches_unfused():
    model = models.build("llama-tiny", device=DEVICE)
    fused = build_generator(model, model.example_inputs(1, 8), max_seq_len=128, max_batch=2)
    plain = Generator(fused.programs, max_seq_len=128, max_batch=2, device=torch.device(DEVICE), fuse_decode=False)
    ids = model.example_inputs(2, 17, seed=3)["input_ids"]
    assert torch.equal(fused.generate(ids, 100), plain.generate(ids, 100))
    assert any("fused regions" in note for note in fused.notes), fused.notes
    first = plain.prefill(ids)
    torch.testing.assert_close(fused.prefill(ids), first)
    nxt = first.argmax(-1)[:, None]
    for _ in range(10):
        f, p = fused.decode_step(nxt), plain.decode_step(nxt)
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-5)
        nxt = p.argmax(-1)[:, None]


def test_bf16_decode_logits_within_tolerance():
    # llama-1b-like shape per layer (32 heads, 8 KV heads, head_dim 64), 2 layers, 4096-token vocabulary.
    overrides = dict(n_layers=2, vocab_size=4096)
    ref_model = models.build("llama-1b-like", device=DEVICE, dtype=torch.float32, **overrides)
    model = models.build("llama-1b-like", device=DEVICE, dtype=torch.bfloat16, **overrides)
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=320, max_batch=2)
    ids = model.example_inputs(2, 300, seed=4)["input_ids"]
    with torch.no_grad():
        ref = ref_model(ids).double()
        eager = model(ids).double()
    got = [gen.prefill(ids[:, :260], all_logits=True).double()]
    got += [gen.decode_step(ids[:, i:i + 1], all_logits=True).double() for i in range(260, 300)]
    got = torch.cat(got, dim=1)
    eager_err = (eager - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 3 * eager_err + 1e-2, f"fxopt bf16 error {err:.4f} vs eager bf16 {eager_err:.4f}"


def test_decode_step_uses_flash_decoding_with_kv_start(monkeypatch):
    calls = []
    real = flash_decoding.decode_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("kv_start"))
        return real(*args, **kwargs)

    monkeypatch.setattr(flash_decoding, "decode_attention", spy)
    model = models.build("llama-tiny", device=DEVICE)
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=64, max_batch=2, use_cuda_graph=False)
    ids, mask = left_pad([model.example_inputs(1, 5, seed=5)["input_ids"],
                          model.example_inputs(1, 9, seed=6)["input_ids"]])
    gen.prefill(ids, attention_mask=mask)
    gen.decode_step(ids[:, :1])
    assert len(calls) == model.config.n_layers
    assert all(c is not None and c.tolist() == [4, 0] for c in calls)


@torch.no_grad()
@pytest.mark.parametrize("settings", [dict(temperature=0.8), dict(temperature=0.9, top_k=20, top_p=0.9)])
def test_sampling_in_the_replayed_graph_equals_the_host_loop(settings):
    """Sampled generate() without a stop token draws in the replayed graph (Philox keyed by seed, position and
    row); with a stop token that never comes (-1) it draws on the host each step: the same tokens for a seed,
    other tokens for another seed; top-k 1 is greedy."""
    model = models.build("llama-tiny", device=DEVICE)
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=96, max_batch=4)
    ids = model.example_inputs(3, 11, seed=4)["input_ids"]
    graphed = gen.generate(ids, 40, seed=7, **settings)
    assert torch.equal(graphed, gen.generate(ids, 40, seed=7, eos_token_id=-1, **settings))  # the greedy graph's
    captures = gen.captures  # logits, picked on the host: a second capture
    assert torch.equal(graphed, gen.generate(ids, 40, seed=7, **settings))
    assert not torch.equal(graphed, gen.generate(ids, 40, seed=8, **settings))
    assert gen.captures == captures  # one graph per (bucket, settings): the seed is a device tensor it reads
    assert torch.equal(gen.generate(ids, 40, seed=3, top_k=1), gen.generate(ids, 40))


@torch.no_grad()
@pytest.mark.parametrize("top_k, top_p", [(50, 0.95), (128, None), (1, None)])
def test_top_k_kernels_draw_what_sample_pick_draws_over_the_filtered_logits(top_k, top_p):
    """codegen/greedy.py's sample_top_k at a Llama-3 vocabulary, bf16 logits (many ties at the k-th), 64 rows:
    token for token what sample_pick draws over the filtered fp32 logits of tests/sampling_checks.py."""
    from sampling_checks import top_k_reference

    from fxopt.codegen import greedy

    logits = (4 * torch.randn(64, 128256, device=DEVICE)).to(torch.bfloat16)
    slot, seed = torch.tensor(300, device=DEVICE), torch.tensor(5, device=DEVICE)
    got_ids, got_history = (torch.zeros(64, 1, dtype=torch.long, device=DEVICE),
                            torch.zeros(64, 302, dtype=torch.long, device=DEVICE))
    greedy.sample_top_k(logits, got_ids, got_history, slot, seed, top_k=top_k, top_p=top_p, inv_temperature=1.25)
    want_ids, want_history = torch.zeros_like(got_ids), torch.zeros_like(got_history)
    greedy.sample_pick(top_k_reference(logits, top_k, top_p, 1.25), want_ids, want_history, slot, seed, 1.0)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_history, want_history)
    at_max = logits.gather(1, got_ids) == logits.max(dim=1, keepdim=True).values  # (64, 1)
    assert bool(at_max.all()) == (top_k == 1)  # k = 1 draws a (possibly tied) argmax, larger k not always
