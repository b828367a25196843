"""passes/kv_cache.py: the causal proof, the token-axis analysis and the shape of the two programs.

Refusals must name the node that shows why the model cannot take a KV cache. The programs must be
CUDA-graph friendly: positions by index_select (never a slice with a data-dependent start), causal masks
gone, K/V cached with their own (un-repeated) heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt import models
from fxopt.codegen import attention_op
from fxopt.generate import build_generator
from fxopt.passes import kv_cache
from fxopt.passes.kv_cache import KVCacheError

aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("one_thread")


def build(model, batch=1, seq=8, **kw):
    example = model.example_inputs(batch, seq) if hasattr(model, "example_inputs") else {
        "input_ids": torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))}
    return build_generator(model, example, max_seq_len=kw.pop("max_seq_len", 32), max_batch=kw.pop("max_batch", 2),
                           **kw)


# --------------------------------------------------------------------------------------------------
# Refusals name the node
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("name", ["bert-tiny", "transformer-tiny"])
def test_bidirectional_models_are_refused_naming_the_attention(name, attn_impl):
    if attn_impl == "explicit":
        pytest.importorskip("fxopt.passes.attention")
    model = models.build(name, attn_impl=attn_impl)
    with pytest.raises(KVCacheError) as info:
        build(model)
    message = str(info.value)
    assert "node `attention" in message and "not a causal mask" in message
    assert ".py" in message  # points at the model's source line


class TinyLM(nn.Module):
    """A small causal LM with one deliberately position-mixing construct, chosen by `mix`."""

    def __init__(self, mix: str = "none"):
        super().__init__()
        self.mix = mix
        self.emb = nn.Embedding(64, 32)
        self.qkv = nn.Linear(32, 96)
        self.head = nn.Linear(32, 64)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        b, s, _ = x.shape
        if self.mix == "cumsum":
            x = x.cumsum(dim=1)
        elif self.mix == "mean":
            x = x - x.mean(dim=1, keepdim=True)
        elif self.mix == "length":
            x = x * s
        elif self.mix == "conv":
            x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        elif self.mix == "transposed":  # token axis moved and back: fine
            x = (x.transpose(1, 2) * 2.0).transpose(1, 2).contiguous()
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        i = torch.arange(s, device=x.device)
        if self.mix == "tril":  # a causal mask built in forward: proven causal, then dead
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(s, s, dtype=torch.bool).tril())
        elif self.mix == "quadratic_bias":  # causal, with a bias quadratic in j - i (ALiBi is linear)
            rel = (i[None, :] - i[:, None]).float()
            bias = (0.01 * rel * rel).masked_fill(rel > 0, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.mix != "bidirectional")
        y = y.transpose(1, 2).reshape(b, s, 32)
        if self.mix == "but_last":  # (the last position alone, y[:, -1:], is accepted: test_kv_positions.py)
            y = y[:, :-1]
        return self.head(y)


@pytest.mark.parametrize("mix, node, why", [
    ("cumsum", "cumsum", "mixes values along the token axis"),
    ("mean", "mean", "reduces over the token axis"),
    ("length", "mul", "uses the sequence length"),
    ("conv", "conv", "does not know"),
    ("but_last", "slice", "along the token axis"),
    ("bidirectional", "attention", "bidirectional"),
    ("quadratic_bias", "attention", "position-dependent bias"),
])
def test_position_mixing_is_refused_naming_the_node(mix, node, why):
    with pytest.raises(KVCacheError) as info:
        build(TinyLM(mix).eval())
    message = str(info.value)
    assert f"node `{node}" in message and why in message, message


@pytest.mark.parametrize("mix", ["transposed", "tril"])
def test_accepted_variants_decode_exactly(mix):
    """The token axis moved and back; a causal mask built in forward (proven causal, then dead)."""
    model = TinyLM(mix).eval()
    gen = build(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(gen.prefill(ids[:, :6], all_logits=True), full[:, :6], rtol=1e-5, atol=1e-5)
    for i in range(6, 9):
        torch.testing.assert_close(gen.decode_step(ids[:, i:i + 1]), full[:, i], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The programs
# --------------------------------------------------------------------------------------------------


def _targets(gm):
    found = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for mod in gm.modules():
        if mod is not gm and isinstance(mod, torch.fx.GraphModule):
            found += [n.target for n in mod.graph.nodes if n.op == "call_function"]
    return found


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_llama_programs_are_graph_capturable(attn_impl):
    if attn_impl == "explicit":
        pytest.importorskip("fxopt.passes.attention")
    model = models.build("llama-tiny", attn_impl=attn_impl)
    gen = build(model)
    programs = gen.programs
    cfg = model.config
    decode = programs.decode
    targets = _targets(decode)
    assert targets.count(kv_cache.CACHED_ATTENTION) == cfg.n_layers
    assert targets.count(kv_cache.CACHE_WRITE) == 2 * cfg.n_layers
    assert kv_cache.ATTENTION not in targets
    # RoPE tables looked up by position, never sliced at a data-dependent start; masks are dead
    assert aten.index_select.default in targets
    assert not any(t in (aten.gt.Tensor, aten.tril.default, aten.triu.default, aten.masked_fill.Scalar)
                   for t in targets)
    slices = [n for n in decode.graph.nodes if n.target == aten.slice.Tensor]
    assert all(not isinstance(a, torch.fx.Node) for n in slices for a in n.args[2:])
    # GQA: caches hold the model's KV heads, not the repeated ones
    assert {spec.kv_heads for spec in programs.caches} == {cfg.n_kv_heads}
    assert not any(t == aten.expand.default and n.args[0].target == aten.unsqueeze.default
                   for n in decode.graph.nodes if n.op == "call_function" for t in [n.target])
    # prefill: fresh K/V attention, causal, and the same number of cache writes
    prefill_targets = _targets(programs.prefill)
    assert prefill_targets.count(kv_cache.ATTENTION) == cfg.n_layers
    assert prefill_targets.count(kv_cache.CACHE_WRITE) == 2 * cfg.n_layers
    attn = [n for n in programs.prefill.graph.nodes if n.target == kv_cache.ATTENTION]
    assert all(n.args[5] is True for n in attn)


def test_gpt2_tril_buffer_mask_is_dead_and_positions_come_from_the_table():
    pytest.importorskip("fxopt.passes.attention")
    model = models.build("gpt2-tiny", attn_impl="explicit")
    gen = build(model)
    for program in (gen.programs.decode, gen.programs.prefill):
        attrs = [n.target for n in program.graph.nodes if n.op == "get_attr"]
        assert not any(a.endswith("causal") for a in attrs)
    assert aten.embedding.default in _targets(gen.programs.decode)  # wpe looked up by position
    assert gen.programs.position_limit == model.config.max_positions


def test_prefill_last_slices_before_the_lm_head():
    model = models.build("gpt2-tiny")
    gen = build(model)
    program = gen.programs.prefill_last
    out = next(n for n in program.graph.nodes if n.op == "output").args[0]
    assert out.target == aten.linear.default and out.args[0].target == aten.slice.Tensor
    ids = model.example_inputs(2, 7)["input_ids"]
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(gen.prefill(ids), full[:, -1], rtol=1e-5, atol=1e-5)


def test_run_is_a_pass():
    from fxopt.capture import capture
    from fxopt.pipeline import make_context

    model = models.build("llama-tiny")
    captured = capture(model, model.example_inputs(2, 8))
    ctx = make_context(captured, None, None)
    result = kv_cache.run(captured.gm, ctx)
    assert result.changed and result.counts["attention_cached"] == model.config.n_layers
    assert isinstance(result.kv_programs, kv_cache.KVPrograms)
    assert any("kv_cache" in line for line in ctx.report)
    with torch.no_grad():  # the rewritten full graph still computes the model
        ids = model.example_inputs(2, 8, seed=2)
        torch.testing.assert_close(captured.gm(**ids), model(**ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The ops the programs use
# --------------------------------------------------------------------------------------------------


def test_cached_attention_reference_semantics():
    torch.manual_seed(0)
    b, hq, hkv, d, L = 3, 4, 2, 8, 16
    k_cache, v_cache = torch.randn(b, hkv, L, d), torch.randn(b, hkv, L, d)
    kv_start = torch.tensor([0, 3, 5])
    kv_len = torch.tensor([9, 9, 12])
    q = torch.randn(b, hq, 2, d)
    out = attention_op.cached_attention(q, k_cache, v_cache, kv_start, kv_len, 0.3)
    for i in range(b):
        s0, n = int(kv_start[i]), int(kv_len[i])
        k = k_cache[i:i + 1, :, s0:n].repeat_interleave(2, dim=1)
        v = v_cache[i:i + 1, :, s0:n].repeat_interleave(2, dim=1)
        ref = F.scaled_dot_product_attention(q[i:i + 1], k, v, attn_mask=torch.ones(2, n - s0, dtype=torch.bool)
                                             .tril(n - s0 - 2), scale=0.3)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)


def test_cache_write_in_place_at_device_offset():
    cache = torch.zeros(2, 2, 8, 4)
    new = torch.randn(2, 2, 3, 4)
    attention_op.cache_write(cache, new, torch.tensor(4))
    assert torch.equal(cache[:, :, 4:7], new) and not cache[:, :, :4].any() and not cache[:, :, 7:].any()
    attention_op.cache_write(cache, -new, torch.tensor([0, 1, 2]))  # the slot indices themselves
    assert torch.equal(cache[:, :, :3], -new) and torch.equal(cache[:, :, 4:7], new)


def test_programs_through_the_interpreted_kernels(monkeypatch):
    """FXOPT_INTERPRET_OPS=1 routes the ops through the Triton kernels (interpreted on CPU): FlashAttention in
    prefill, Flash-Decoding with kv_start in decode -- same tokens as the reference path."""
    import inspect

    from fxopt.codegen import flash_attention, flash_decoding

    if not flash_attention._INTERPRET:
        pytest.skip("kernels built without TRITON_INTERPRET=1")
    if "kv_start" not in inspect.signature(flash_decoding.decode_attention).parameters:
        pytest.skip("flash_decoding.decode_attention has no kv_start yet")
    model = models.build("llama-tiny", n_layers=1)
    gen = build(model, max_seq_len=16)
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    ids[0, 2:], mask[0, 2:] = model.example_inputs(1, 4, seed=9)["input_ids"][0], 1
    ids[1], mask[1] = model.example_inputs(1, 6, seed=10)["input_ids"][0], 1
    expected = gen.generate(ids, 4, attention_mask=mask)
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1")
    assert torch.equal(gen.generate(ids, 4, attention_mask=mask), expected)
