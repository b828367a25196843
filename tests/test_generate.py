"""fxopt.generate on CPU (fp32): automatic KV cache vs full recompute, HF generate, padding, sampling, errors.

Greedy tokens must be identical to running the cache-less model on the whole sequence at every step
(and, for HF models, to HF's own generate with its own cache). A left-padded row's reference is that
row's prompt run alone.
"""

from __future__ import annotations

import os

import pytest
import torch

from fxopt import models
from fxopt.generate import GenerationError, Generator, Sampler, add_cli, batch_buckets, build_generator

NEW = 64  # new tokens per greedy comparison
PROMPT_A, PROMPT_B = 8, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def prompts(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, vocab, (1, PROMPT_A), generator=gen)
    b = torch.randint(0, vocab, (1, PROMPT_B), generator=gen)
    return a, b


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1]:] = r[0]
        mask[i, width - r.shape[1]:] = 1
    return ids, mask


@torch.no_grad()
def recompute(logits_fn, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by running the cache-less model over the whole sequence at every step."""
    for _ in range(new):
        nxt = logits_fn(ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def check_greedy(gen: Generator, logits_fn, vocab: int, pad_id: int = 0):
    """Batch 1 and a left-padded batch of two against full recompute. Returns the outputs for more checks."""
    a, b = prompts(vocab)
    ref_a, ref_b = recompute(logits_fn, a, NEW), recompute(logits_fn, b, NEW)
    out_a = gen.generate(a, NEW)
    assert torch.equal(out_a, ref_a), "batch 1 differs from full recompute"
    ids, mask = left_pad([b, a], pad_id)
    out = gen.generate(ids, NEW, attention_mask=mask)
    assert torch.equal(out[0, PROMPT_A - PROMPT_B:], ref_b[0]), "left-padded row differs from its prompt run alone"
    assert torch.equal(out[1], ref_a[0]), "unpadded row of a padded batch differs"
    return a, ids, mask, out_a, out


# Big presets at reduced size to fit CPU time: one layer, head_dim 8 (4 for 70b's 64 heads) at the preset's
# head counts (so the GQA ratios stay), a small MLP and a 2048-token vocabulary; positions (tables, RoPE
# theta) and everything else as in the preset. The tiny presets run at their full config.
SMALL = dict(n_layers=1, vocab_size=2048)
REDUCED = {
    "gpt2-tiny": {},
    "gpt2-small": dict(SMALL, d_model=12 * 8),
    "gpt2-medium": dict(SMALL, d_model=16 * 8),
    "gpt2-large": dict(SMALL, d_model=20 * 8),
    "llama-tiny": {},
    "llama-1b-like": dict(SMALL, d_model=32 * 8, d_ff=256),
    "llama-7b-like": dict(SMALL, d_model=32 * 8, d_ff=256),
    "llama-70b-like": dict(SMALL, d_model=64 * 4, d_ff=256),
}


def test_every_causal_preset_is_covered():
    causal = {name for name, cfg in models.PRESETS.items() if models.MODEL_CLASSES[type(cfg)].is_causal_lm}
    assert causal == set(REDUCED)


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("name", list(REDUCED))
def test_greedy_matches_full_recompute(name, attn_impl):
    if attn_impl == "explicit":
        pytest.importorskip("fxopt.passes.attention")
    model = models.build(name, attn_impl=attn_impl, **REDUCED[name])
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=PROMPT_A + NEW, max_batch=2)
    check_greedy(gen, model, model.config.vocab_size)


HF_SPECS = {
    "gpt2": "hf:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=512",
    "llama": "hf:llama,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
             "num_key_value_heads=2,vocab_size=512",
}


@pytest.mark.parametrize("kind", list(HF_SPECS))
def test_hf_greedy_matches_recompute_and_hf_generate(kind):
    pytest.importorskip("transformers")
    from fxopt.zoo import load_model

    model = load_model(HF_SPECS[kind])
    model.generation_config.eos_token_id = None  # eos disabled: every row runs NEW tokens
    model.generation_config.pad_token_id = 0
    vocab = model.config.vocab_size
    a, _ = prompts(vocab)
    gen = build_generator(model, {"input_ids": a}, max_seq_len=PROMPT_A + NEW, max_batch=2)
    a, ids, mask, out_a, out = check_greedy(gen, lambda x: model(x, use_cache=False).logits, vocab)
    with torch.no_grad():
        hf_a = model.generate(a, max_new_tokens=NEW, do_sample=False)
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out_a, hf_a), "batch 1 differs from HF generate with its own cache"
    assert torch.equal(out, hf), "padded batch differs from HF generate with its own cache"


# --------------------------------------------------------------------------------------------------
# Runtime behaviour on one small model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    model = models.build("llama-tiny")
    gen = build_generator(model, model.example_inputs(1, 8), max_seq_len=32, max_batch=3)
    return model, gen


def test_prefill_logits_match_forward_and_decode_steps(llama):
    model, gen = llama
    ids = model.example_inputs(3, 12, seed=3)["input_ids"]
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(gen.prefill(ids[:, :9], all_logits=True), full[:, :9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gen.decode_step(ids[:, 9:10]), full[:, 9], rtol=1e-5, atol=1e-5)
    # several new tokens in one step (the verify / speculative shape)
    torch.testing.assert_close(gen.decode_step(ids[:, 10:12], all_logits=True), full[:, 10:12],
                               rtol=1e-5, atol=1e-5)
    assert gen.length == 12
    torch.testing.assert_close(gen.prefill(ids[:2, :5]), full[:2, 4], rtol=1e-5, atol=1e-5)


def test_verify(llama):
    model, gen = llama
    ids = model.example_inputs(2, 12, seed=8)["input_ids"]
    assert gen.verify(model, ids) < 1e-4
    with pytest.raises(GenerationError, match="position 3"):
        gen.verify(lambda x: model(x).index_add(1, torch.tensor([3]), torch.ones(2, 1, 512)), ids)


def test_cache_memory_formula(llama):
    model, gen = llama
    cfg = model.config
    expected = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * gen.max_seq_len * gen.max_batch * 4
    assert gen.cache_bytes == expected
    assert gen.kv_bytes_per_token() == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    assert "MiB" in gen.describe()
    assert [tuple(c.shape) for c in gen.caches[:2]] == [(3, cfg.n_kv_heads, 32, cfg.head_dim)] * 2


def test_too_many_tokens_raises_before_writing(llama):
    model, gen = llama
    ids = model.example_inputs(2, 10, seed=4)["input_ids"]
    gen.prefill(ids)
    before = [c.clone() for c in gen.caches]
    with pytest.raises(GenerationError, match="max_seq_len=32"):
        gen.generate(ids, 23)  # 10 + 23 > 32
    with pytest.raises(GenerationError, match="max_seq_len"):
        gen.prefill(model.example_inputs(1, 33)["input_ids"])
    assert all(torch.equal(b, c) for b, c in zip(before, gen.caches)), "a refused request wrote to the cache"
    assert gen.length == 10
    gen.decode_step(ids[:, :1])
    for _ in range(21):
        gen.decode_step(ids[:, :1])
    assert gen.length == 32
    before = [c.clone() for c in gen.caches]
    with pytest.raises(GenerationError, match="exceeds the cache"):
        gen.decode_step(ids[:, :1])
    assert all(torch.equal(b, c) for b, c in zip(before, gen.caches))
    out = gen.generate(ids, 22)  # exactly fills the cache
    assert out.shape == (2, 32)


def test_bad_inputs_are_refused(llama):
    model, gen = llama
    ids = model.example_inputs(2, 6)["input_ids"]
    with pytest.raises(GenerationError, match="2-d"):
        gen.prefill(ids[0])
    with pytest.raises(GenerationError, match="int64"):
        gen.prefill(ids.float())
    with pytest.raises(GenerationError, match="max_batch"):
        gen.prefill(model.example_inputs(4, 6)["input_ids"])
    right = torch.ones_like(ids)
    right[0, -2:] = 0
    with pytest.raises(GenerationError, match="left padding"):
        gen.prefill(ids, attention_mask=right)
    gen.prefill(ids)
    with pytest.raises(GenerationError, match="batch"):
        gen.decode_step(ids[:1, :1])
    with pytest.raises(GenerationError, match="max_seq_len"):
        build_generator(model, model.example_inputs(1, 8), max_seq_len=10_000, max_batch=1)


def test_sampling_is_seeded_and_filters(llama):
    model, gen = llama
    ids = model.example_inputs(2, 6, seed=5)["input_ids"]
    kwargs = dict(temperature=0.9, top_k=50, top_p=0.9)
    first = gen.generate(ids, 16, seed=123, **kwargs)
    assert torch.equal(first, gen.generate(ids, 16, seed=123, **kwargs)), "same seed, different tokens"
    others = [gen.generate(ids, 16, seed=s, **kwargs) for s in (1, 2, 3)]
    assert any(not torch.equal(first, o) for o in others), "the seed does not change the samples"
    greedy = gen.generate(ids, 16)
    assert torch.equal(gen.generate(ids, 16, top_k=1, seed=0), greedy)  # top-k 1 is greedy
    assert torch.equal(gen.generate(ids, 16, top_p=1e-6, seed=0), greedy)  # top-p -> the top token only
    with pytest.raises(GenerationError):
        gen.generate(ids, 4, temperature=0.0, do_sample=True)


def test_sampler_filters_exactly():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda s: torch.isfinite(s.filtered_logits(logits))[0].tolist()  # noqa: E731
    assert kept(Sampler(True, 1.0, top_k=2)) == [True, True, False, False]
    assert kept(Sampler(True, 1.0, top_p=0.45)) == [True, False, False, False]
    assert kept(Sampler(True, 1.0, top_p=0.6)) == [True, True, False, False]
    assert kept(Sampler(True, 1.0, top_p=0.9)) == [True, True, True, False]
    assert kept(Sampler(True, 2.0, top_k=3, top_p=0.99)) == [True, True, True, False]
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(True, 1.0, generator=gen)
    draws = torch.stack([sampler(logits.expand(4000, 4)) for _ in range(1)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def _after_eos(tokens: list[int], eos: int, pad: int) -> list[int]:
    out, done = [], False
    for t in tokens:
        out.append(pad if done else t)
        done = done or t == eos
    return out


def test_eos_stops_rows_independently(llama):
    model, gen = llama
    ids = model.example_inputs(2, 6, seed=6)["input_ids"]
    greedy = gen.generate(ids, 12)
    new0, new1 = greedy[0, 6:].tolist(), greedy[1, 6:].tolist()
    first = lambda row, t: row.index(t) if t in row else len(row)  # noqa: E731
    # an eos id the two rows emit at different steps
    eos = next(t for t in new0 + new1 if first(new0, t) != first(new1, t))
    out = gen.generate(ids, 12, eos_token_id=eos, pad_token_id=-1)
    steps = max(first(new0, eos), first(new1, eos)) + 1
    assert out.shape[1] == 6 + min(steps, 12)
    assert out[0, 6:].tolist() == _after_eos(new0, eos, -1)[: out.shape[1] - 6]
    assert out[1, 6:].tolist() == _after_eos(new1, eos, -1)[: out.shape[1] - 6]
    # a list of eos ids, default pad (the first eos id)
    out = gen.generate(ids, 12, eos_token_id=[eos, 10**6])
    assert out[0, 6:].tolist() == _after_eos(new0, eos, eos)[: out.shape[1] - 6]


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]


def test_cli_generate_runs_on_cpu(capsys, tmp_path):
    import argparse
    import json

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_cli(sub)
    out = tmp_path / "gen.json"
    args = parser.parse_args(["generate", "gpt2-tiny", "--batch", "2", "--prompt-len", "8", "--new-tokens", "8",
                              "--dtype", "fp32", "--device", "cpu", "--repeat", "1", "--warmup", "0",
                              "--json", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "ms/token" in printed and "GB/s" in printed
    data = json.loads(out.read_text())
    assert data["tokens_per_s"] > 0 and data["cache_bytes"] > 0


def test_fused_decode_program_matches(llama):
    """The per-bucket decode program after the cost and fusion passes (generated Triton kernels, run by the
    interpreter on CPU) gives the unfused program's tokens."""
    pytest.importorskip("fxopt.passes.fusion")
    model = models.build("llama-tiny", n_layers=1)
    plain = build_generator(model, model.example_inputs(1, 8), max_seq_len=24, max_batch=2)
    fused = Generator(plain.programs, max_seq_len=24, max_batch=2, device=torch.device("cpu"), fuse_decode=True)
    ids = model.example_inputs(2, 6, seed=7)["input_ids"]
    assert torch.equal(fused.generate(ids, 6), plain.generate(ids, 6))
    assert any("fused regions" in note for note in fused.notes), fused.notes



def test_bench_decode_smoke_on_cpu(capsys):
    """The benchmark's plumbing at toy size: every row runs on the same weights (HF twin included), and in
    fp32 all rows generate the same greedy tokens."""
    pytest.importorskip("transformers")
    from fxopt.bench import decode as bench_decode

    model = models.build("llama-tiny")
    hf = bench_decode.hf_llama_from(model)
    ids = model.example_inputs(2, 10)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, model(ids), rtol=1e-5, atol=1e-5)
    report = bench_decode.run("llama-tiny", dtype="fp32", configs=((2, 8, 5),), repeat=1, device="cpu")
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == set(bench_decode.ROWS)
    assert all(not r["error"] for r in rows.values()), [r["error"] for r in rows.values()]
    assert all(r["tokens_per_s"] > 0 and r["match"] == 1.0 and r["agree"] == 5 for r in rows.values())
    assert rows["hf-static-compile"]["ratio_vs_ref"] == 1.0
    assert "fxopt" in capsys.readouterr().out



@pytest.mark.parametrize("spec", [
    "hf:qwen2,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
    "num_key_value_heads=2,vocab_size=256",
    "hf:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=256",
])
def test_bench_decode_takes_an_hf_spec_and_its_model_is_its_own_hf_peer(spec):
    """bench --decode on an hf: spec: the HF model is the peer row (no twin), fp32 greedy tokens of every row
    equal eager recompute's (HF eager cache's too), and the eos of the random config does not stop a row."""
    pytest.importorskip("transformers")
    from fxopt.bench import decode as bench_decode

    rows = ("eager-recompute", "hf-eager-cache", "fxopt", "fxopt-unfused")
    report = bench_decode.run(spec, dtype="fp32", configs=((2, 8, 6),), rows=rows, repeat=1, device="cpu",
                              recompute_steps=0)
    got = {r["row"]: r for r in report["rows"]}
    assert all(not r["error"] for r in got.values()), [r["error"] for r in got.values()]
    assert all(r["match"] == 1.0 and r["timed_new"] == 6 for r in got.values())


def test_leading_agreement_counts_the_steps_before_any_sequence_differs():
    from fxopt.bench.decode import leading_agreement

    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = a.clone()
    assert leading_agreement(a, b) == 4
    b[1, 2] = 0  # the second sequence flips at step 2; later steps may agree again by chance
    b[1, 3] = a[1, 3]
    assert leading_agreement(a, b) == 2
    b[0, 0] = 9
    assert leading_agreement(a, b) == 0


def test_bench_decode_refuses_a_model_that_is_not_a_causal_lm():
    from fxopt.bench import decode as bench_decode
    from fxopt.errors import UserError

    with pytest.raises(UserError, match="not a causal LM"):
        bench_decode.run("bert-tiny", dtype="fp32", configs=((1, 8, 2),), rows=("fxopt",), device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_one_decode_program_runs_its_linears_as_gemvs(llama, dtype):
    """At batch 1 every linear of the decode program (q/k/v and gate/up already fused, o, down, lm_head)
    becomes one GEMV, which also takes in the RMSNorms before it, the SwiGLU product and the residual adds
    after it; the q/k/v one (fxopt::gemv_qkv) also splits heads, applies RoPE and writes K and V into the
    caches. At batch 2 none does. Tokens are unchanged (on CPU the ops run the same eager ops)."""
    model = models.build("llama-tiny", n_layers=2, dtype=dtype)  # bf16: the residual adds are not casts
    plain = build_generator(model, model.example_inputs(1, 8), max_seq_len=24, max_batch=2)
    fused = Generator(plain.programs, max_seq_len=24, max_batch=2, device=torch.device("cpu"), fuse_decode=True)

    def count(program, target):
        return sum(n.op == "call_function" and n.target == target for n in program.graph.nodes)

    linears = count(plain.programs.decode, torch.ops.aten.linear.default)
    assert linears == 2 * 4 + 1  # per layer: qkv, o, gate+up, down; then the lm_head
    one = fused.decode_program(1)
    assert count(one, torch.ops.fxopt.gemv_qkv.default) == 2
    assert count(one, torch.ops.fxopt.gemv.default) == linears - 2
    assert count(one, torch.ops.aten.linear.default) == 0
    for op in (torch.ops.fxopt.rope.default, torch.ops.fxopt.rope_cache_write.default,
               torch.ops.fxopt.cache_write.default):
        assert count(one, op) == 0
    qkv = [n for n in one.graph.nodes if n.target == torch.ops.fxopt.gemv_qkv.default]
    assert all(n.args[3] is not None and n.args[5] is not None for n in qkv)  # RMSNorm and RoPE folded in
    gemvs = [n for n in one.graph.nodes if n.target == torch.ops.fxopt.gemv.default]
    assert sum(n.args[4] is not None for n in gemvs) == 2 + 1  # norms: before gate/up, lm_head
    assert sum(n.args[6] for n in gemvs) == 2  # SwiGLU into gate/up
    assert sum(n.args[3] is not None for n in gemvs) == 2 * 2  # residual adds after o and down
    for op in (torch.ops.aten.silu.default, torch.ops.aten.rsqrt.default, torch.ops.aten.pow.Tensor_Scalar):
        assert count(one, op) == 0
    regions = [n for n in one.graph.nodes if n.op == "call_module"]
    assert not [r for r in regions if any(a in gemvs + qkv for a in r.args)], "no fused region after a GEMV"
    assert count(fused.decode_program(2), torch.ops.fxopt.gemv.default) == 0
    ids = model.example_inputs(1, 6, seed=3)["input_ids"]
    assert torch.equal(fused.generate(ids, 8), plain.generate(ids, 8))
    assert not any("fusion failed" in note for note in fused.notes), fused.notes


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_decode_kernels_interpreted_match_full_recompute(monkeypatch, name):
    """The batch-1 decode step run through the interpreted kernels themselves (FXOPT_INTERPRET_OPS=1: the
    GEMVs with their folded norm / SwiGLU / residual, the q/k/v GEMV with its head split, RoPE and cache writes,
    and Flash-Decoding) gives full recompute's greedy tokens."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter test (tests/gpu runs the kernels on the GPU)")
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1")
    model = models.build(name, n_layers=1)
    plain = build_generator(model, model.example_inputs(1, 8), max_seq_len=32, max_batch=1)
    fused = Generator(plain.programs, max_seq_len=32, max_batch=1, device=torch.device("cpu"), fuse_decode=True)
    targets = [n.target for n in fused.decode_program(1).graph.nodes]
    assert targets.count(torch.ops.fxopt.gemv.default) == 4 and targets.count(torch.ops.fxopt.gemv_qkv.default) == 1
    ids = model.example_inputs(1, 7, seed=11)["input_ids"]
    logits_fn = lambda x: model(input_ids=x)  # noqa: E731
    assert torch.equal(fused.generate(ids, 12), recompute(logits_fn, ids, 12))


def _warped_reference(logits, temperature, top_k, top_p):
    """HF's order of warpers with a full sort: temperature, top-k (ties kept), then top-p over the vocabulary."""
    logits = logits.double() / temperature
    kth = torch.sort(logits, dim=-1, descending=True).values[..., top_k - 1:top_k]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, torch.cumsum(probs, -1) - probs >= top_p)
    return logits.masked_fill(drop, float("-inf"))


@pytest.mark.parametrize("top_k, top_p", [(50, 0.9), (5, 0.3), (200, 0.99), (3, 1e-6)])
def test_top_p_among_the_top_k_equals_the_full_sort(top_k, top_p):
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(top_k)) * 3  # no ties
    got = Sampler(True, 0.7, top_k=top_k, top_p=top_p).filtered_logits(logits)
    want = _warped_reference(logits, 0.7, top_k, top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got[torch.isfinite(got)].double(), want[torch.isfinite(want)])
