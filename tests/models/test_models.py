"""Tests for the reference model family (fxopt.models), all on CPU.

Independent references used here: closed-form parameter counts computed from the configs,
the other attention spelling (explicit vs sdpa), ``repeat_interleave`` for ``repeat_kv``,
eager execution for exported programs, and the definitions of causality and padding.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

from fxopt.models import (
    PRESETS,
    BertConfig,
    GPTConfig,
    LlamaConfig,
    TransformerConfig,
    build,
    get_config,
    param_count,
)
from fxopt.models.attention import repeat_kv

TINY = ["gpt2-tiny", "llama-tiny", "bert-tiny", "transformer-tiny"]
IMPLS = ["explicit", "sdpa"]


# ---------------------------------------------------------------------------------------------
# helpers


def expected_param_count(cfg) -> int:
    """Parameter count from the config alone, written out per family (tied tensors once)."""
    d = cfg.d_model

    def linear(n_in, n_out, bias=True):
        return n_in * n_out + (n_out if bias else 0)

    layer_norm = 2 * d
    if isinstance(cfg, GPTConfig):
        ff = cfg.mlp_ratio * d
        block = layer_norm + linear(d, 3 * d) + linear(d, d) + layer_norm + linear(d, ff) + linear(ff, d)
        head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
        return cfg.vocab_size * d + cfg.max_positions * d + cfg.n_layers * block + layer_norm + head
    if isinstance(cfg, LlamaConfig):
        kv = cfg.n_kv_heads * (d // cfg.n_heads)
        attn = 2 * d * d + 2 * d * kv
        mlp = 3 * d * cfg.d_ff
        block = attn + mlp + 2 * d
        return 2 * cfg.vocab_size * d + cfg.n_layers * block + d
    if isinstance(cfg, BertConfig):
        emb = (cfg.vocab_size + cfg.max_positions + cfg.type_vocab_size) * d + layer_norm
        block = 4 * linear(d, d) + layer_norm + linear(d, cfg.d_ff) + linear(cfg.d_ff, d) + layer_norm
        return emb + cfg.n_layers * block
    if isinstance(cfg, TransformerConfig):
        ffn = linear(d, cfg.d_ff) + linear(cfg.d_ff, d)
        enc = 4 * linear(d, d) + ffn + 2 * layer_norm
        dec = 8 * linear(d, d) + ffn + 3 * layer_norm
        return cfg.vocab_size * d + cfg.n_encoder_layers * enc + cfg.n_decoder_layers * dec
    raise TypeError(cfg)


def dynamic_shapes(model):
    return {name: {dim: Dim.AUTO for dim in dims} for name, dims in model.dynamic_dims().items()}


def export_model(model, batch=2, seq=16):
    return export(
        model, (), kwargs=model.example_inputs(batch, seq), dynamic_shapes=dynamic_shapes(model), strict=False
    )


def shrink(name: str) -> dict:
    """Overrides that make a big preset cheap: one layer (per stack)."""
    if "tiny" in name:
        return {}
    if isinstance(PRESETS[name], TransformerConfig):
        return {"n_encoder_layers": 1, "n_decoder_layers": 1}
    return {"n_layers": 1}


@torch.no_grad()
def run(model, **kwargs):
    return model(**kwargs)


# ---------------------------------------------------------------------------------------------
# registry, build, init


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_with_closed_form_param_count(name):
    model = build(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert not model.training
    assert model.config == PRESETS[name]
    assert param_count(model) == expected_param_count(model.config)


def test_big_preset_counts_match_known_models():
    assert 68.5e9 < param_count(build("llama-70b-like", device="meta")) < 70.5e9
    assert param_count(build("llama-7b-like", device="meta")) == 6_738_415_616  # Llama-2-7B
    assert param_count(build("gpt2-small", device="meta")) == 124_439_808  # HF gpt2


def test_overrides_and_errors():
    model = build("llama-7b-like", device="meta", n_layers=2, attn_impl="explicit")
    assert model.config.n_layers == 2 and model.config.attn_impl == "explicit"
    assert len(model.layers) == 2
    assert PRESETS["llama-7b-like"].n_layers == 32  # presets are not mutated
    with pytest.raises(KeyError, match="known presets"):
        build("gpt5")
    with pytest.raises(TypeError, match="no field"):
        get_config("gpt2-tiny", n_kv_heads=2)
    with pytest.raises(ValueError, match="attn_impl"):
        build("gpt2-tiny", attn_impl="flash")
    with pytest.raises(ValueError, match="divisible"):
        build("llama-tiny", n_kv_heads=3)
    with pytest.raises(TypeError, match="floating"):
        build("gpt2-tiny", dtype=torch.int64)


@pytest.mark.parametrize("name", TINY)
def test_random_init_is_seeded_and_never_constant(name):
    a, b, c = build(name, seed=0), build(name, seed=0), build(name, seed=1)
    assert not a.training
    for (key, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.isfinite(pa).all(), key
        assert pa.std() > 0.005, f"{key} is (nearly) constant"
        assert torch.equal(pa, pb), key
        assert not torch.equal(pa, pc), key


@pytest.mark.parametrize("name", TINY)
def test_weights_are_the_same_across_dtypes(name):
    """build(dtype=float64) is the float64 copy of build(dtype=float32): a numerics reference."""
    f32, f64 = build(name), build(name, dtype=torch.float64)
    for (key, p32), p64 in zip(f32.named_parameters(), f64.parameters()):
        assert p64.dtype == torch.float64
        assert torch.equal(p64.float(), p32), key
    kwargs = f32.example_inputs(2, 8)
    torch.testing.assert_close(run(f64, **kwargs).float(), run(f32, **kwargs), atol=1e-4, rtol=1e-4)


def test_tied_embeddings_survive_build():
    gpt = build("gpt2-tiny")
    assert gpt.lm_head.weight is gpt.wte.weight
    untied = build("gpt2-tiny", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    t = build("transformer-tiny")
    assert t.lm_head.weight is t.embed.weight


def test_buffers_are_recomputed_after_allocation():
    """build allocates uninitialised memory (to_empty); masks and tables must be rebuilt."""
    gpt = build("gpt2-tiny")
    n = gpt.config.max_positions
    assert torch.equal(gpt.blocks[0].attn.causal, torch.tril(torch.ones(n, n, dtype=torch.bool)))
    llama = build("llama-tiny")
    assert torch.allclose(llama.rope_cos[0], torch.ones(llama.config.head_dim))
    assert torch.allclose(llama.rope_cos**2 + llama.rope_sin**2, torch.ones(()))
    t = build("transformer-tiny")
    assert torch.allclose(t.pos_table[0, 1::2], torch.ones(()))  # cos(0) on odd channels
    assert torch.equal(t.pos_table[0, 0::2], torch.zeros(t.config.d_model // 2))  # sin(0)


# ---------------------------------------------------------------------------------------------
# inputs


@pytest.mark.parametrize("name", TINY)
def test_example_inputs_match_dynamic_dims(name):
    model = build(name)
    kwargs = model.example_inputs(4, 12, seed=3)
    dims = model.dynamic_dims()
    assert set(kwargs) == set(dims)
    for key, t in kwargs.items():
        assert t.shape == (4, 12) and t.dtype == torch.long, key
        assert set(dims[key].values()) <= {"batch", "seq", "src_seq"}
        if key.endswith("mask"):
            assert bool(t[0].all()), "row 0 is fully valid"
            assert bool((t.sum(1) > 0).all()), "no all-padding row"
            assert bool((t[1:] == 0).any()), "later rows are padded"
            # right padding: once 0, stays 0
            assert torch.equal(t, t.cummin(dim=1).values)
        else:
            assert 0 <= int(t.min()) and int(t.max()) < model.config.vocab_size
            assert len(t.unique()) > 1
    again = model.example_inputs(4, 12, seed=3)
    assert all(torch.equal(again[k], kwargs[k]) for k in kwargs), "seeded"
    assert model.is_causal_lm == (name in ("gpt2-tiny", "llama-tiny"))


def test_example_inputs_never_all_equal_even_tiny_vocab():
    model = build("gpt2-tiny", vocab_size=2, device="meta")
    for seed in range(20):
        ids = model.example_inputs(1, 2, seed=seed, device="cpu")["input_ids"]
        assert len(ids.unique()) == 2


# ---------------------------------------------------------------------------------------------
# numerics: the two attention spellings are each other's reference


@pytest.mark.parametrize("name", TINY)
def test_explicit_and_sdpa_agree_fp32(name):
    explicit = build(name, attn_impl="explicit")
    sdpa = build(name, attn_impl="sdpa")
    kwargs = explicit.example_inputs(3, 16)
    out_e, out_s = run(explicit, **kwargs), run(sdpa, **kwargs)
    assert out_e.std() > 0.05  # not degenerate
    assert torch.allclose(out_e, out_s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_explicit_and_sdpa_agree_fp64(name):
    explicit = build(name, attn_impl="explicit", dtype=torch.float64)
    sdpa = build(name, attn_impl="sdpa", dtype=torch.float64)
    kwargs = explicit.example_inputs(2, 16)
    assert torch.allclose(run(explicit, **kwargs), run(sdpa, **kwargs), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_repeat_kv_is_repeat_interleave(n_rep):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=gen)  # (b, h_kv, s, d)
    assert torch.equal(repeat_kv(x, n_rep), x.repeat_interleave(n_rep, dim=1))
    xt = torch.randn(2, 5, 3, 8, generator=gen).transpose(1, 2)  # non-contiguous, as in the model
    assert torch.equal(repeat_kv(xt, n_rep), xt.repeat_interleave(n_rep, dim=1))


def test_gqa_matches_full_multi_head_attention_with_repeated_weights():
    """n_kv_heads < n_heads equals an MHA model whose k/v weights repeat each kv head."""
    gqa = build("llama-tiny")  # 4 heads, 2 kv heads
    mha = build("llama-tiny", n_kv_heads=4)
    hd, n_rep = gqa.config.head_dim, gqa.config.n_heads // gqa.config.n_kv_heads
    with torch.no_grad():
        for name, p in gqa.named_parameters():
            target = mha.get_parameter(name)
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                p = p.view(-1, hd, p.shape[-1]).repeat_interleave(n_rep, dim=0).reshape(target.shape)
            target.copy_(p)
    kwargs = gqa.example_inputs(2, 10)
    assert torch.allclose(run(gqa, **kwargs), run(mha, **kwargs), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# causality and padding


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_causal_lm_ignores_future_tokens(name, impl):
    model = build(name, attn_impl=impl)
    ids = model.example_inputs(2, 12)["input_ids"]
    base = run(model, input_ids=ids)
    for j in (0, 5, 11):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 7) % model.config.vocab_size
        out = run(model, input_ids=changed)
        assert torch.allclose(out[:, :j], base[:, :j], atol=1e-6, rtol=0), j
        assert not torch.allclose(out[:, j], base[:, j]), j


@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_decoder_target_is_causal(impl):
    model = build("transformer-tiny", attn_impl=impl)
    kwargs = model.example_inputs(2, 12)
    base = run(model, **kwargs)
    j = 6
    kwargs["tgt_ids"] = kwargs["tgt_ids"].clone()
    kwargs["tgt_ids"][:, j] = (kwargs["tgt_ids"][:, j] + 7) % model.config.vocab_size
    out = run(model, **kwargs)
    assert torch.allclose(out[:, :j], base[:, :j], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, j:], base[:, j:])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["bert-tiny", "transformer-tiny"])
def test_padded_tokens_do_not_change_valid_outputs(name, impl):
    model = build(name, attn_impl=impl)
    kwargs = model.example_inputs(3, 12)
    ids_key, mask_key = ("input_ids", "attention_mask") if name == "bert-tiny" else ("src_ids", "src_mask")
    mask = kwargs[mask_key]
    base = run(model, **kwargs)
    changed = dict(kwargs, **{ids_key: torch.where(mask == 0, (kwargs[ids_key] + 13) % 512, kwargs[ids_key])})
    assert not torch.equal(changed[ids_key], kwargs[ids_key])
    out = run(model, **changed)
    if name == "bert-tiny":  # outputs at valid positions only
        valid = mask.bool()
        assert torch.allclose(out[valid], base[valid], atol=1e-6, rtol=0)
        assert not torch.allclose(out[~valid], base[~valid])
    else:  # every target position reads only valid source positions
        assert torch.allclose(out, base, atol=1e-6, rtol=0)
    # and the mask matters: unmasking the padding changes valid outputs
    unmasked = run(model, **dict(changed, **{mask_key: torch.ones_like(mask)}))
    assert not torch.allclose(unmasked[1:], out[1:])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_padding_row_stays_finite(impl):
    model = build("bert-tiny", attn_impl=impl)
    kwargs = model.example_inputs(2, 8)
    kwargs["attention_mask"][1] = 0
    assert torch.isfinite(run(model, **kwargs)).all()


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", TINY)
def test_export_keeps_batch_and_seq_symbolic(name, impl):
    model = build(name, attn_impl=impl)
    ep = export_model(model)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    symbols = {}
    for key, dims in model.dynamic_dims().items():
        shape = placeholders[key].meta["val"].shape
        for dim, role in dims.items():
            assert isinstance(shape[dim], torch.SymInt), f"{key}[{dim}] ({role}) was specialised"
            symbols.setdefault(role, set()).add(str(shape[dim]))
    # one symbol per role, distinct roles distinct symbols
    assert all(len(s) == 1 for s in symbols.values()), symbols
    assert len({next(iter(s)) for s in symbols.values()}) == len(symbols)
    kind = "scaled_dot_product_attention" if impl == "sdpa" else "softmax"
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(kind in t for t in targets), targets

    exported = ep.module()
    for batch, seq in ((3, 11), (1, 5)):
        kwargs = model.example_inputs(batch, seq, seed=7)
        assert torch.allclose(exported(**kwargs), run(model, **kwargs), atol=1e-5, rtol=0)


def test_exported_encoder_decoder_takes_different_source_and_target_lengths():
    model = build("transformer-tiny")
    ep = export_model(model)
    kwargs = model.example_inputs(2, 9, seed=1)
    kwargs["tgt_ids"] = model.example_inputs(2, 14, seed=2)["tgt_ids"]
    out = ep.module()(**kwargs)
    assert out.shape == (2, 14, model.config.vocab_size)
    assert torch.allclose(out, run(model, **kwargs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if "tiny" not in n))
def test_big_presets_export_on_meta(name):
    """Big configs (one layer) capture on the meta device without allocating weights."""
    model = build(name, device="meta", **shrink(name))
    ep = export_model(model)
    shape = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in model.dynamic_dims())
    assert all(isinstance(d, torch.SymInt) for d in shape.meta["val"].shape)
