"""Attention pass: every attention site becomes one fxopt attention call, and the model still agrees.

Independent references: the number of attention sites counted from each config (layers × attentions
per layer), the float64 eager model (DESIGN.md numerics: the rewritten graph's error may be at most
2× eager fp32's error against it, plus a tiny floor), the definitions of causal and padding masks,
and the scale 1/sqrt(head_dim) written out per model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

from fxopt import models, zoo
from fxopt.capture import capture, role_symbol
from fxopt.explain import add_cli, explain, format_explanation
from fxopt.models import BertConfig, GPTConfig, LlamaConfig, TransformerConfig
from fxopt.passes import attention, cost
from fxopt.pipeline import make_context

aten = torch.ops.aten
ATTN = torch.ops.fxopt.attention.default
IMPLS = ["explicit", "sdpa"]
HF_GPT2 = "hf:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=512"
HF_LLAMA = ("hf:llama,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
            "num_key_value_heads=2,vocab_size=512")


# --------------------------------------------------------------------------------------------- helpers
def small_overrides(name: str) -> dict:
    """The preset's head layout (heads, KV heads) with 2 layers and head_dim 8: runs in milliseconds."""
    cfg = models.PRESETS[name]
    common = {"vocab_size": 512, "max_positions": 128, "d_model": cfg.n_heads * 8}
    if isinstance(cfg, GPTConfig):
        return {**common, "n_layers": 2}
    if isinstance(cfg, LlamaConfig):
        return {**common, "n_layers": 2, "d_ff": 64}
    if isinstance(cfg, BertConfig):
        return {**common, "n_layers": 2, "d_ff": 64}
    return {**common, "n_encoder_layers": 2, "n_decoder_layers": 2, "d_ff": 64}


def layer_overrides(name: str) -> dict:
    """Full widths, two layers (for analysis on the meta device)."""
    if isinstance(models.PRESETS[name], TransformerConfig):
        return {"n_encoder_layers": 2, "n_decoder_layers": 2}
    return {"n_layers": 2}


def expected_sites(cfg) -> int:
    """Attention calls per forward, from the config: one per layer; enc-dec: self + (self, cross)."""
    if isinstance(cfg, TransformerConfig):
        return cfg.n_encoder_layers + 2 * cfg.n_decoder_layers
    return cfg.n_layers


def expected_kinds(cfg) -> list[tuple[bool, str]]:
    """(causal, mask kind) of each attention in graph order."""
    if isinstance(cfg, (GPTConfig, LlamaConfig)):
        return [(True, "causal")] * cfg.n_layers
    if isinstance(cfg, BertConfig):
        return [(False, "padding")] * cfg.n_layers
    return [(False, "padding")] * cfg.n_encoder_layers + [(True, "causal"), (False, "padding")] * cfg.n_decoder_layers


def rewrite(model, kwargs, dynamic_dims=None, sizes=None):
    captured = capture(model, kwargs, dynamic_dims)
    ctx = make_context(captured, "h100", sizes)
    cost.run(captured.gm, ctx)
    result = attention.run(captured.gm, ctx)
    return captured, ctx, result


def attention_nodes(gm):
    return [n for n in gm.graph.nodes if n.target == ATTN]


def assert_no_attention_left(gm):
    left = [n.format_node() for n in gm.graph.nodes
            if n.target in (aten.softmax.int, aten._softmax.default, aten.scaled_dot_product_attention.default)
            or (n.target == aten.matmul.default and n.meta["val"].dim() == 4)]
    assert not left, left


def as_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return as_tensor(out[0])
    raise TypeError(type(out))


def to64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def assert_matches_eager(model, captured, kwargs, rows=None):
    """|rewritten - fp64| <= 2 |eager fp32 - fp64| + floor, on the rows that matter (`rows` bool mask)."""
    with torch.no_grad():
        got = as_tensor(captured.gm(**captured.example_kwargs))
        eager = as_tensor(model(**captured.example_kwargs))
        ref = as_tensor(copy.deepcopy(model).double()(**{k: to64(v) for k, v in captured.example_kwargs.items()}))
    if rows is not None:
        got, eager, ref = got[rows], eager[rows], ref[rows]
    err = (got.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    floor = 1e-6 * max(1.0, ref.abs().max().item())
    assert err <= 2 * eager_err + floor, (err, eager_err)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- models/ presets
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_every_preset_has_one_attention_node_per_site_and_matches_eager(name, impl):
    overrides = small_overrides(name)
    model = models.build(name, attn_impl=impl, **overrides)
    cfg = model.config
    captured, ctx, result = rewrite(model, model.example_inputs(2, 16))
    nodes = attention_nodes(captured.gm)
    assert len(nodes) == expected_sites(cfg)
    assert result.counts[impl] == expected_sites(cfg) and result.counts["unmatched"] == 0
    assert_no_attention_left(captured.gm)
    infos = [n.meta[attention.ATTENTION_KEY] for n in nodes]
    assert [(i.causal, i.mask_kind) for i in infos] == expected_kinds(cfg)
    head_dim = cfg.d_model // cfg.n_heads
    assert all(i.scale == pytest.approx(1 / math.sqrt(head_dim), rel=1e-12) for i in infos)
    groups = cfg.n_heads // cfg.n_kv_heads if isinstance(cfg, LlamaConfig) else 1
    assert all(i.gqa_groups == groups for i in infos)
    for node in nodes:  # GQA never materialised: the op reads the original KV heads
        assert node.args[1].meta["val"].shape[1] == cfg.n_heads // groups
    assert all(i.kernel != "sdpa" for i in infos), [i.fallback_reason for i in infos]
    assert_matches_eager(model, captured, captured.example_kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["gpt2-large", "llama-70b-like", "bert-base", "transformer-base"])
def test_full_width_presets_on_meta_device(name, impl):
    """Analysis without weights: counts, causal flags, the real 1/sqrt(head_dim) and GQA groups."""
    model = models.build(name, attn_impl=impl, device="meta", **layer_overrides(name))
    cfg = model.config
    captured, ctx, result = rewrite(model, model.example_inputs(2, 16))
    nodes = attention_nodes(captured.gm)
    assert len(nodes) == expected_sites(cfg)
    assert_no_attention_left(captured.gm)
    infos = [n.meta[attention.ATTENTION_KEY] for n in nodes]
    assert [(i.causal, i.mask_kind) for i in infos] == expected_kinds(cfg)
    assert all(i.scale == pytest.approx(1 / math.sqrt(cfg.head_dim), rel=1e-12) for i in infos)
    if isinstance(cfg, LlamaConfig):
        assert {i.gqa_groups for i in infos} == {cfg.n_heads // cfg.n_kv_heads}
    if name == "gpt2-large" and impl == "explicit":  # tril buffer without values: recognised by its idiom
        assert all("assumed" in i.evidence for i in infos)


def test_causal_scale_and_gqa_are_recorded_for_llama_tiny():
    model = models.build("llama-tiny", attn_impl="explicit")
    captured, ctx, result = rewrite(model, model.example_inputs(2, 16))
    infos = [n.meta[attention.ATTENTION_KEY] for n in attention_nodes(captured.gm)]
    assert [i.gqa_groups for i in infos] == [2, 2]
    assert all(i.causal and i.mask_kind == "causal" and i.pattern == "explicit" for i in infos)
    assert all(i.scale == pytest.approx(16**-0.5) for i in infos)
    report = result.attention_rewrites
    assert [r["gqa_groups"] for r in report] == [2, 2] and all(r["causal"] for r in report)
    assert set(report[0]) == {"node", "module", "pattern", "causal", "mask", "gqa_groups", "kernel", "reason",
                              "bytes_before", "bytes_after"}


def test_padding_becomes_a_key_padding_mask_of_the_input():
    model = models.build("bert-tiny", attn_impl="explicit")
    captured, _, _ = rewrite(model, model.example_inputs(3, 16))
    for node in attention_nodes(captured.gm):
        kpm, bias, causal = node.args[3], node.args[4], node.args[5]
        assert bias is None and causal is False
        assert kpm.meta["val"].dtype == torch.bool and tuple(kpm.meta["val"].shape) == tuple(
            captured.gm.graph.find_nodes(op="placeholder", target="attention_mask")[0].meta["val"].shape)
    assert_matches_eager(model, captured, captured.example_kwargs)


def test_prefill_bytes_are_no_longer_quadratic():
    """At seq 1024 the fused call moves Q, K, V, O once: fewer bytes than the unfused chain, linear in s."""
    model = models.build("gpt2-tiny", attn_impl="explicit")
    captured, ctx, result = rewrite(model, model.example_inputs(2, 16), sizes={"seq": 1024, "batch": 1})
    report = result.attention_rewrites
    assert report and all(r["bytes_after"] < r["bytes_before"] for r in report)
    s = role_symbol("seq")
    for node in attention_nodes(captured.gm):
        c = node.meta[cost.COST_KEY]
        assert sympy.degree(sympy.expand(c.bytes), s) == 1
        assert c.kind == "attention" and sympy.degree(sympy.expand(c.flops), s) == 2
    assert all(r["kernel"] == "flash_prefill" for r in report)


# --------------------------------------------------------------------------------------------- HF transformers
def hf_model(spec: str, impl: str):
    pytest.importorskip("transformers")
    model = zoo.load_model(spec)
    model.config._attn_implementation = impl
    return model


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", [HF_GPT2, HF_LLAMA], ids=["gpt2", "llama-gqa"])
def test_hf_models(spec, impl):
    model = hf_model(spec, impl)
    captured, ctx, result = rewrite(model, zoo.example_inputs(model, 2, 16))
    nodes = attention_nodes(captured.gm)
    assert len(nodes) == model.config.num_hidden_layers == 2
    assert result.counts["explicit" if impl == "eager" else "sdpa"] == 2
    assert_no_attention_left(captured.gm)
    infos = [n.meta[attention.ATTENTION_KEY] for n in nodes]
    assert all(i.causal and i.mask_kind == "causal" for i in infos)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert all(i.scale == pytest.approx(head_dim**-0.5) for i in infos)
    kv_heads = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
    assert all(i.gqa_groups == model.config.num_attention_heads // kv_heads for i in infos)
    assert_matches_eager(model, captured, captured.example_kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gptj_eager_upcast_of_q_and_k_is_one_attention(dtype):
    """GPT-J's eager attention widens q and k to fp32 before the scores (v stays in the model's dtype): the
    casts are exact, so the attention reads the narrow q and k; the logits stay within fxopt.numerics' rule of
    eager against float64."""
    from fxopt.numerics import within_tolerance

    model = hf_model("hf:gptj,n_layer=2,n_embd=64,n_head=4,rotary_dim=8,vocab_size=256,n_positions=128", "eager")
    exact = copy.deepcopy(model).double()
    model = model.to(dtype)
    captured, _, result = rewrite(model, zoo.example_inputs(model, 2, 16))
    nodes = attention_nodes(captured.gm)
    assert result.counts["explicit"] == len(nodes) == 2
    assert all(n.args[0].meta["val"].dtype == n.args[1].meta["val"].dtype == dtype for n in nodes)
    assert_no_attention_left(captured.gm)
    kwargs = captured.example_kwargs
    with torch.no_grad():
        got, eager, ref = (as_tensor(m(**kwargs)) for m in (captured.gm, model, exact))
    ok, error, allowed = within_tolerance(got, eager, ref)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


def test_upcasts_from_another_dtype_than_v_are_not_stripped():
    """q widened from fp16 and k from bf16 with v in bf16: reading the narrow q would change the kernel's input
    dtype, so the site is left, with the dtype note."""
    gen = torch.Generator().manual_seed(0)

    class Mixed(nn.Module):
        def forward(self, q, k, v):  # (b, h, s, d): q fp16, k and v bf16
            scores = q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2) * 0.25
            return scores.softmax(-1).to(v.dtype) @ v

    q = torch.randn(1, 2, 5, 16, generator=gen).half()
    k, v = (torch.randn(1, 2, 5, 16, generator=gen).bfloat16() for _ in range(2))
    static = {name: {} for name in ("q", "k", "v")}  # fixed shapes: the head counts are plain ints
    captured, _, result = rewrite(Mixed(), {"q": q, "k": k, "v": v}, static)
    assert attention_nodes(captured.gm) == []
    assert any("dtypes differ" in note for note in result.notes), result.notes


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_llama_with_padding_mask(impl):
    model = hf_model(HF_LLAMA, impl)
    kwargs = zoo.example_inputs(model, 2, 16)
    kwargs["attention_mask"] = torch.ones(2, 16, dtype=torch.long)
    kwargs["attention_mask"][1, -5:] = 0
    captured, _, _ = rewrite(model, kwargs)
    infos = [n.meta[attention.ATTENTION_KEY] for n in attention_nodes(captured.gm)]
    assert [i.mask_kind for i in infos] == ["causal+padding"] * 2
    assert_matches_eager(model, captured, kwargs, rows=kwargs["attention_mask"].bool())


# --------------------------------------------------------------------------------------------- odd spellings
class Projected(nn.Module):
    """x (b, s, dm) -> q (b, hq, s, d), k, v (b, hkv, s, d) -> core -> (b, s, dm)."""

    def __init__(self, dm=32, hq=4, hkv=4):
        super().__init__()
        self.hq, self.hkv, self.d = hq, hkv, dm // hq
        self.q = nn.Linear(dm, hq * self.d)
        self.kv = nn.Linear(dm, 2 * hkv * self.d)
        self.o = nn.Linear(hq * self.d, dm)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.hq, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        y = self.core(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class OddSpelling(Projected):
    """div by torch.sqrt(torch.tensor(d)), a where-mask from an in-graph tril, fp32-upcast softmax,
    GQA through repeat_interleave."""

    def __init__(self):
        super().__init__(dm=32, hq=4, hkv=2)

    def core(self, q, k, v):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = q @ k.transpose(2, 3) / torch.sqrt(torch.tensor(q.shape[-1], dtype=torch.float32))
        s = q.shape[-2]
        keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        scores = torch.where(keep, scores, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v


class CustomScale(Projected):
    """scale 0.05 (not 1/sqrt(d)) applied to q before q·kᵀ, no mask."""

    def core(self, q, k, v):
        return torch.softmax((q * 0.05) @ k.transpose(-1, -2), dim=-1) @ v


class RuntimeScale(Projected):
    """A learned temperature: the scale is a tensor known only at run time."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(0.3))

    def core(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * self.temperature, dim=-1) @ v


class Banded(Projected):
    """Causal local attention over a window of 4 keys: a sliding window, proved from the comparisons."""

    def core(self, q, k, v):
        s = q.shape[-2]
        i = torch.arange(s, device=q.device)
        hidden = (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 4)
        scores = (q @ k.transpose(-1, -2)) * self.d**-0.5
        return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ v


class PrefixLM(Projected):
    """Causal, except that the first 3 keys are visible to every query: no causal/window/padding form."""

    def core(self, q, k, v):
        s = q.shape[-2]
        i = torch.arange(s, device=q.device)
        hidden = (i[None, :] > i[:, None]) & (i[None, :] >= 3)
        scores = (q @ k.transpose(-1, -2)) * self.d**-0.5
        return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ v


class SoftmaxOverQueries(Projected):
    def core(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * self.d**-0.5, dim=-2) @ v


class NoValueMatmul(Projected):
    def core(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.d**-0.5, dim=-1)
        return v * probs.sum(-1, keepdim=True)


class ReturnsProbabilities(Projected):
    """The probabilities are an output too (like output_attentions=True): nothing to gain by fusing."""

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.hq, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.d**-0.5, dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, -1)), probs


class MaskBeforeScale(Projected):
    def core(self, q, k, v):
        s = q.shape[-2]
        hidden = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        return torch.softmax((q @ k.transpose(-1, -2)).masked_fill(hidden, -1e9) * self.d**-0.5, dim=-1) @ v


class PadFromIds(nn.Module):
    """Builds its own padding mask from the token ids: keys whose id is `pad_id` are hidden."""

    def __init__(self, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(64, 32)
        self.qkv = nn.Linear(32, 3 * 32)

    def forward(self, input_ids):
        b, s = input_ids.shape
        q, k, v = self.qkv(self.embed(input_ids)).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        hidden = (input_ids == self.pad_id)[:, None, None, :]
        scores = (q @ k.transpose(-1, -2)) * 8**-0.5
        return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize(("pad_id", "kind"), [(0, "padding"), (1, "general")])
def test_padding_from_token_ids_only_when_it_hides_exactly_the_zeros(pad_id, kind):
    """key_padding_mask = ids != 0 is right for pad id 0; for pad id 1 it would be wrong: keep the bias."""
    model = PadFromIds(pad_id).eval()
    ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[1, -4:] = pad_id
    captured, _, _ = rewrite(model, {"input_ids": ids}, {"input_ids": {0: "batch", 1: "seq"}})
    (node,) = attention_nodes(captured.gm)
    assert node.meta[attention.ATTENTION_KEY].mask_kind == kind
    assert_matches_eager(model, captured, {"input_ids": ids})


def x_inputs(seq=16):
    return {"x": rand(2, seq, 32)}, {"x": {0: "batch", 1: "seq"}}


def test_odd_spelling_is_one_attention_with_causal_gqa_and_scale():
    model = OddSpelling().eval()
    kwargs, dims = x_inputs()
    captured, _, result = rewrite(model, kwargs, dims)
    (node,) = attention_nodes(captured.gm)
    info = node.meta[attention.ATTENTION_KEY]
    assert (info.causal, info.mask_kind, info.gqa_groups) == (True, "causal", 2)
    assert info.scale == pytest.approx(8**-0.5)
    assert node.args[1].meta["val"].shape[1] == 2  # repeat_interleave undone
    assert not any(n.target == aten.repeat_interleave.self_int for n in captured.gm.graph.nodes)
    assert_no_attention_left(captured.gm)
    assert_matches_eager(model, captured, kwargs)


def test_scale_other_than_inverse_sqrt_d_is_passed():
    model = CustomScale().eval()
    kwargs, dims = x_inputs()
    captured, _, _ = rewrite(model, kwargs, dims)
    (node,) = attention_nodes(captured.gm)
    assert node.args[6] == pytest.approx(0.05) and node.meta[attention.ATTENTION_KEY].mask_kind == "none"
    assert_matches_eager(model, captured, kwargs)


def test_banded_mask_is_a_sliding_window():
    model = Banded().eval()
    kwargs, dims = x_inputs()
    captured, _, result = rewrite(model, kwargs, dims)
    (node,) = attention_nodes(captured.gm)
    info = node.meta[attention.ATTENTION_KEY]
    assert info.mask_kind == "window" and info.causal and info.window == 4
    assert node.args[3] is None and node.args[4] is None and result.counts["fallback"] == 0
    assert_matches_eager(model, captured, kwargs)


def test_prefix_mask_is_kept_as_a_general_bias():
    model = PrefixLM().eval()
    kwargs, dims = x_inputs()
    captured, _, result = rewrite(model, kwargs, dims)
    (node,) = attention_nodes(captured.gm)
    info = node.meta[attention.ATTENTION_KEY]
    assert info.mask_kind == "general" and not info.causal and info.kernel == "sdpa"
    assert node.args[4] is not None and result.counts["fallback"] == 1
    assert any("SDPA fallback" in note for note in result.notes)
    assert_matches_eager(model, captured, kwargs)


def test_a_mask_applied_before_the_scale_is_scaled_with_the_scores():
    model = MaskBeforeScale().eval()
    kwargs, dims = x_inputs()
    captured, _, result = rewrite(model, kwargs, dims)
    (node,) = attention_nodes(captured.gm)
    info = node.meta[attention.ATTENTION_KEY]
    assert (info.mask_kind, info.scale) == ("causal", pytest.approx(model.d**-0.5)), info
    assert_matches_eager(model, captured, kwargs)


def test_runtime_scale_is_not_matched():
    model = RuntimeScale().eval()
    kwargs, dims = x_inputs()
    captured, _, result = rewrite(model, kwargs, dims)
    assert not attention_nodes(captured.gm) and result.counts["unmatched"] == 1


@pytest.mark.parametrize(("module", "reason", "matched"), [
    (RuntimeScale, "scale is a runtime tensor", False),
    (PrefixLM, "not a provable causal/window/padding form", True),
    (SoftmaxOverQueries, "softmax not over the last dim", False),
    (NoValueMatmul, "no matmul with v after softmax", False),
    (ReturnsProbabilities, "also used outside the attention", False),
])
def test_explain_gives_the_reason(module, reason, matched):
    kwargs, dims = x_inputs()
    candidates = explain(module().eval(), kwargs, dynamic_dims=dims)
    (cand,) = candidates
    assert cand.matched is matched and reason in cand.reason, cand
    assert reason in format_explanation(candidates)


def test_explain_lists_matched_sites_without_reasons():
    model = models.build("llama-tiny", attn_impl="explicit")
    candidates = explain(model, model.example_inputs(2, 16))
    assert len(candidates) == 2 and all(c.matched and c.reason == "" for c in candidates)
    assert all(c.info.gqa_groups == 2 for c in candidates)


def test_explain_cli_subcommand():
    parser = argparse.ArgumentParser(prog="fxopt")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["explain", "gpt2-tiny", "--seq", "1024"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    text = out.getvalue()
    assert "2 attention-like site(s): 2 rewritten" in text and "FLASH_PREFILL" in text


class FillThenShrink(Projected):
    """masked_fill(-1e4) then a scale of 1e-3: the filled scores end at -10, which eager does not hide."""

    def core(self, q, k, v):
        s = q.shape[-2]
        hidden = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        return torch.softmax((q @ k.transpose(-1, -2)).masked_fill(hidden, -1e4) * 1e-3, dim=-1) @ v


def test_a_fill_value_the_scale_makes_visible_is_not_rewritten():
    model = FillThenShrink().eval()
    kwargs, dims = x_inputs()
    captured, _, result = rewrite(model, kwargs, dims)
    assert not attention_nodes(captured.gm) and result.counts["unmatched"] == 1
    assert any("no longer hides" in note for note in result.notes)
    assert_matches_eager(model, captured, kwargs)
