"""passes/kv_cache.py: position forms the token-axis analysis accepts, on real model code.

- last-position selection (nanoGPT's `lm_head(x[:, [-1], :])`, and `x[:, -1]`, `x[:, -1:]`),
- the cumulative sum of the (all-ones) attention mask as positions (HF OPT),
- a position table gathered by position ids (HF GPT-J `embed_positions[position_ids]`),
- indexing over non-token axes (HF multi-query Falcon before transformers 5.25: `fused_qkv[..., [-2], :]`),

each checked end to end: greedy tokens of `fxopt.optimize(..., kv_cache=True)` equal HF `generate` (or, for
nanoGPT, a full-recompute argmax loop), batch 1 and a left-padded batch 2; prefill and decode logits equal the
full forward's. Mixing along the token axis stays refused, naming the node and the model's line.
Tiny models from configs, random weights, fp32 CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.kv_cache import KVCacheError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from nanogpt import GPT, GPTConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
PROMPT, NEW = 9, 8
TOL = dict(rtol=1e-4, atol=1e-4)


def _ids(batch, seed=1, vocab=256):
    return torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def _left_padded():
    ids = _ids(2, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0: 3 pads, then 6 tokens
    ids[0, :3] = 0
    return ids, mask


def _optimize(model, name="input_ids"):
    return fxopt.optimize(model, {name: _ids(1)}, kv_cache=True, max_seq_len=64, max_batch=2)


# --------------------------------------------------------------------------------------------------
# HF models
# --------------------------------------------------------------------------------------------------

HF_CONFIGS = {
    "opt": dict(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=256,
                max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.2),
    "gptj": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=256, n_positions=128,
                 initializer_range=0.2, bos_token_id=0, eos_token_id=0),
    "falcon": dict(multi_query=True, new_decoder_architecture=False, alibi=False, num_hidden_layers=2,
                   hidden_size=64, num_attention_heads=4, vocab_size=256, initializer_range=0.2),
}


@pytest.fixture(scope="module", params=["opt-sdpa", "opt-eager", "gptj-sdpa", "falcon-sdpa"])
def hf(request):
    transformers = pytest.importorskip("transformers")
    kind, impl = request.param.split("-")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(kind, **HF_CONFIGS[kind])
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    except ValueError as exc:  # older transformers: e.g. GPT-J without sdpa
        pytest.skip(f"transformers {transformers.__version__} offers no {impl} for {kind}: {exc}"[:200])
    model.generation_config.eos_token_id = None  # run all NEW steps on both sides
    model.generation_config.pad_token_id = 0
    return kind, model, _optimize(model)


def test_hf_greedy_batch1_matches_generate_and_logits(hf):
    _, model, gen = hf
    ids = _ids(1, seed=3)
    with torch.no_grad():  # (an explicit mask: HF would read the pad id 0 in the prompt as padding)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
        full = model(ref).logits
    assert torch.equal(gen.generate(ids, max_new_tokens=NEW), ref)
    # every position's logits, from the prefill and one decode step at a time, equal the full forward's
    torch.testing.assert_close(gen.prefill(ref[:, :PROMPT], all_logits=True), full[:, :PROMPT], **TOL)
    for i in range(PROMPT, PROMPT + 3):
        torch.testing.assert_close(gen.decode_step(ref[:, i:i + 1]), full[:, i], **TOL)


def test_hf_left_padded_batch2_matches_generate(hf):
    _, model, gen = hf
    ids, mask = _left_padded()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(gen.generate(ids, max_new_tokens=NEW, attention_mask=mask), ref)


def _position_targets(program):
    fn = program.get_submodule("positions").fn
    return [n.target for n in fn.graph.nodes if n.op == "call_function"]


def test_hf_position_forms(hf):
    """OPT: `cumsum(ones(b, s), 1) * mask - 1` a position source (no cumsum left); GPT-J: `embed_positions[
    position_ids]` looked up by per-row positions; Falcon multi-query: one cached KV head."""
    kind, model, gen = hf
    programs = gen.programs
    assert not programs.last_only
    decode_targets = [n.target for n in programs.decode.graph.nodes if n.op == "call_function"]
    if kind == "opt":
        assert any("cumsum" in note for note in programs.notes), programs.notes
        assert aten.cumsum.default not in decode_targets + _position_targets(programs.decode)
        assert programs.position_limit is not None  # the learned table bounds the positions
    elif kind == "gptj":
        assert aten.index.Tensor in _position_targets(programs.decode)  # the sin/cos table, by position
        assert programs.position_limit == model.config.n_positions
    else:  # multi-query: however this transformers version takes K and V out of the fused projection
        # (`[:, :, [-2]]` indexing or a split over heads), each layer caches the one shared KV head
        assert len(programs.caches) == model.config.num_hidden_layers
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert all((c.kv_heads, c.k_dim, c.v_dim) == (1, head_dim, head_dim) for c in programs.caches)


# --------------------------------------------------------------------------------------------------
# nanoGPT: logits of the last position only
# --------------------------------------------------------------------------------------------------


def _nanogpt(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kw)).eval()
    with torch.no_grad():  # larger weights than nanoGPT's init: greedy tokens that vary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("flash, last", [(True, "index"), (False, "index"), (True, "select"), (True, "slice")])
def test_nanogpt_last_position_logits(flash, last):
    model = _nanogpt(flash=flash, last=last, n_layer=2 if last == "index" else 1)
    gen = _optimize(model, "idx")
    assert gen.programs.last_only
    ids = _ids(1, seed=3)
    ref = model.generate(ids, NEW, greedy=True)  # full recompute, argmax
    assert torch.equal(gen.generate(ids, max_new_tokens=NEW), ref)
    with torch.no_grad():
        torch.testing.assert_close(gen.prefill(ref[:, :PROMPT]), model(ref[:, :PROMPT])[0].reshape(1, -1), **TOL)
        assert gen.prefill(ref[:, :PROMPT], all_logits=True).shape == (1, 1, 256)
        for i in range(PROMPT, PROMPT + 3):
            want = model(ref[:, :i + 1])[0].reshape(1, -1)
            torch.testing.assert_close(gen.decode_step(ref[:, i:i + 1]), want, **TOL)
        # n > 1 new tokens in one decode call: still the last one's logits
        gen.prefill(ref[:, :PROMPT])
        got = gen.decode_step(ref[:, PROMPT:PROMPT + 3], all_logits=True)
        assert got.shape == (1, 1, 256)
        torch.testing.assert_close(got[:, -1], model(ref[:, :PROMPT + 3])[0].reshape(1, -1), **TOL)
    if last == "index":  # left padding: each row as if alone (nanoGPT has no attention mask of its own)
        ids2, mask = _left_padded()
        out = gen.generate(ids2, max_new_tokens=NEW, attention_mask=mask)
        for row in range(2):
            prompt = ids2[row:row + 1, mask[row].bool()]
            assert torch.equal(out[row, PROMPT:], model.generate(prompt, NEW, greedy=True)[0, prompt.shape[1]:])


@pytest.mark.parametrize("last", ["index", "select"])
def test_verify_of_a_last_position_model_compares_every_prefix_and_can_fail(last, monkeypatch):
    model = _nanogpt(last=last, n_layer=1)
    ids = _ids(2, seed=4)[:, :PROMPT]
    gen = fxopt.optimize(model, (ids,), kv_cache=True, max_seq_len=64, verify=True)
    assert f"decode to {2 * PROMPT}" in gen.verification  # twice the example's length
    decode_step = type(gen).decode_step

    def off_by_a_bit(self, input_ids, **kw):  # a planted fault in the decode program's logits
        return decode_step(self, input_ids, **kw) + 1e-2

    monkeypatch.setattr(type(gen), "decode_step", off_by_a_bit)
    with pytest.raises(fxopt.numerics.VerificationError, match="decode step"):
        fxopt.optimize(model, (ids,), kv_cache=True, max_seq_len=64, verify=True)


# --------------------------------------------------------------------------------------------------
# What stays refused, naming the node and the model's line
# --------------------------------------------------------------------------------------------------


class Mixer(nn.Module):
    """One causal attention layer and one token-mixing construct, chosen by `mix`."""

    def __init__(self, mix: str):
        super().__init__()
        self.mix = mix
        self.emb = nn.Embedding(64, 32)
        self.pos = nn.Embedding(64, 32)
        self.qkv = nn.Linear(32, 96)
        self.head = nn.Linear(32, 64)

    def forward(self, input_ids):
        b, s = input_ids.shape
        x = self.emb(input_ids)
        if self.mix == "cumsum_positions":  # not the cumsum of a mask: arange(s).cumsum() is no position
            x = x + self.pos(torch.arange(s, device=x.device).cumsum(0) % 64)
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, 32)
        if self.mix == "first":
            y = y[:, [0], :]
        elif self.mix == "second_last":
            y = y[:, -2]
        elif self.mix == "broadcast_last":
            y = y + y[:, -1:]
        return self.head(y)


@pytest.mark.parametrize("mix, node, why", [
    ("first", "index", "gathers along the token axis"),
    ("second_last", "select", "other than the last"),
    ("broadcast_last", "add", "computed from the last position only"),
    ("cumsum_positions", "cumsum", "mixes values along the token axis"),
])
def test_token_mixing_is_refused_naming_node_and_line(mix, node, why):
    with pytest.raises(KVCacheError) as info:
        _optimize(Mixer(mix).eval())
    message = str(info.value)
    assert f"node `{node}" in message and why in message, message
    assert "test_kv_positions.py" in message and "in forward" in message, message  # the model's own line
