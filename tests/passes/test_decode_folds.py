"""passes/matmul.DECODE_RULES on GPT-2-style decode programs (CPU, fp32): LayerNorm folded into the GEMV as its
prologue, bias + GELU (aten.gelu or HF's spelled-out tanh form) and the residual add as its epilogues, HF's
Conv1D (addmm over a (K, N) weight) as a GEMV, identity dropouts dropped; and the near-misses each rule refuses,
with the reason it gives.

Greedy tokens and each step's logits are compared with an independent eager loop over the whole sequence
(the cache-less model, argmax at every step), never with another fxopt program.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt import models
from fxopt.capture import capture
from fxopt.generate import Generator, build_generator
from fxopt.passes import matmul
from fxopt.passes.infra import PassContext

aten = torch.ops.aten
GEMV, QKV = torch.ops.fxopt.gemv.default, torch.ops.fxopt.gemv_qkv.default
HF_GPT2 = "hf:gpt2,n_layer=2,n_embd=64,n_head=4,vocab_size=256"
LAYERS = 2
NEW = 12
# what must be gone from a GPT-2 decode step at batch 1 once every fold applies
FOLDED_AWAY = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.layer_norm.default,
               aten.native_layer_norm.default, aten.gelu.default, aten.tanh.default, aten.dropout.default,
               torch.ops.fxopt.cache_write.default)

pytestmark = pytest.mark.usefixtures("one_thread")


def spread(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights of a larger spread than the default init (whose logits are near-uniform and whose greedy tokens
    repeat one id): matrices ~ 1.5 / sqrt(fan), norm weights ~ 1 +- 0.3, biases ~ 0.3, all random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / min(p.shape) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.0 if "bias" in name else 1.0))
    return model


def gpt2(kind: str) -> tuple[nn.Module, callable, int]:
    """(model, logits of ids by the eager model, vocab) for the preset gpt2-tiny or HF's GPT-2 (Conv1D)."""
    if kind == "gpt2-tiny":
        model = spread(models.build("gpt2-tiny", n_layers=LAYERS)).eval()
        return model, lambda ids: model(input_ids=ids), model.config.vocab_size
    pytest.importorskip("transformers")
    from fxopt.zoo import load_model

    model = spread(load_model(HF_GPT2)).eval()
    return model, lambda ids: model(ids, use_cache=False).logits, model.config.vocab_size


def fused_generator(model: nn.Module, vocab: int) -> Generator:
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    plain = build_generator(model, {"input_ids": ids}, max_seq_len=32, max_batch=1)
    return Generator(plain.programs, max_seq_len=32, max_batch=1, device=torch.device("cpu"), fuse_decode=True)


def count(program, target) -> int:
    return sum(n.op == "call_function" and n.target == target for n in program.graph.nodes)


@torch.no_grad()
def recompute(logits_fn, ids: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):
        ids = torch.cat([ids, logits_fn(ids)[:, -1].argmax(-1)[:, None]], dim=1)
    return ids


def prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 7), generator=torch.Generator().manual_seed(3))


def assert_greedy_and_step_logits(gen: Generator, logits_fn, ids: torch.Tensor, new: int) -> torch.Tensor:
    """gen's greedy tokens equal an eager loop's over the whole sequence, and each decode step's logits the
    eager forward's at that position (fp32); returns the tokens."""
    expected = recompute(logits_fn, ids, new)
    assert torch.equal(gen.generate(ids, new), expected)
    with torch.no_grad():
        full = logits_fn(expected)  # (1, prompt + new, vocab)
        gen.prefill(ids)
        for i in range(ids.shape[1], expected.shape[1] - 1):
            step = gen.decode_step(expected[:, i:i + 1])  # (1, vocab), through the folded program
            torch.testing.assert_close(step, full[:, i], rtol=1e-4, atol=1e-4)
    return expected


@pytest.mark.parametrize("kind", ["gpt2-tiny", "hf-gpt2"])
def test_gpt2_decode_step_is_four_gemvs_a_layer(kind):
    """Every linear (HF: every Conv1D addmm) of the batch-1 decode step is a GEMV; each LayerNorm is the prologue
    of the one GEMV it feeds (c_attn's inside gemv_qkv, c_fc's, ln_f's in the lm_head), each GELU the epilogue of
    c_fc's, each residual add that of c_proj's: no LayerNorm, GELU, tanh or dropout node is left, and no fused
    region reads a GEMV's output."""
    model, _, vocab = gpt2(kind)
    gen = fused_generator(model, vocab)
    linears = sum(count(gen.programs.decode, t) for t in (aten.linear.default, aten.addmm.default))
    assert linears == 4 * LAYERS + 1  # c_attn, c_proj, c_fc, c_proj a layer, then the lm_head
    program = gen.decode_program(1)
    assert count(program, QKV) == LAYERS and count(program, GEMV) == linears - LAYERS
    assert {t: count(program, t) for t in FOLDED_AWAY} == dict.fromkeys(FOLDED_AWAY, 0)
    gemvs = [n for n in program.graph.nodes if n.target == GEMV]
    qkv = [n for n in program.graph.nodes if n.target == QKV]
    args = [list(n.args) for n in gemvs]
    assert sum(a[matmul.G_LAYER] for a in args) == LAYERS + 1  # c_fc's and ln_f's norms
    assert all(a[matmul.G_NORM_B] is not None for a in args if a[matmul.G_LAYER])
    assert all(n.kwargs.get("layer_norm") and n.kwargs["norm_bias"] is not None for n in qkv)  # ln_1
    assert [a[matmul.G_ACT] for a in args].count("gelu_tanh") == LAYERS
    assert sum(a[matmul.G_RES] is not None for a in args) == 2 * LAYERS
    assert all(a[matmul.G_BIAS] is not None for a in args[:-1])  # every projection's bias, not the lm_head's
    regions = [n for n in program.graph.nodes if n.op == "call_module"]
    assert not [r for r in regions if any(a in gemvs + qkv for a in r.args)], "a fused region after a GEMV"
    assert not any("fusion failed" in note or "running it unfused" in note for note in gen.notes), gen.notes


@pytest.mark.parametrize("kind", ["gpt2-tiny", "hf-gpt2"])
def test_gpt2_folds_keep_greedy_tokens_and_logits(kind):
    """fp32: the folded decode step's greedy tokens equal an eager loop's over the whole sequence, and each
    step's logits the eager forward's at that position."""
    model, logits_fn, vocab = gpt2(kind)
    gen = fused_generator(model, vocab)
    assert_greedy_and_step_logits(gen, logits_fn, prompt(vocab), NEW)
    assert count(gen.decode_program(1), aten.layer_norm.default) == 0  # the folded program is what ran


def test_hf_gpt2_folds_when_size_nodes_carry_no_fake_value(monkeypatch):
    """torch 2.11 leaves the decode program's sym_size nodes without meta["val"] (seen on the H200's stack): the
    lm_head's LayerNorm, viewed through `reshape(-1, sym_size, n)`, still folds, with the same tokens."""
    import fxopt.generate as generate_module

    propagate = generate_module.kv.propagate_meta

    def propagate_without_size_vals(program, *args):
        propagate(program, *args)
        for node in program.graph.nodes:
            if node.op == "call_function" and node.target == aten.sym_size.int:
                node.meta.pop("val", None)

    monkeypatch.setattr(generate_module.kv, "propagate_meta", propagate_without_size_vals)
    model, logits_fn, vocab = gpt2("hf-gpt2")
    gen = fused_generator(model, vocab)
    program = gen.decode_program(1)
    assert not any(n.meta.get("val") is not None for n in program.graph.nodes if n.target == aten.sym_size.int)
    assert count(program, aten.layer_norm.default) == 0, [n for n in gen.notes if "layer_norm" in n]
    ids = prompt(vocab)
    assert torch.equal(gen.generate(ids, 6), recompute(logits_fn, ids, 6))


def test_hf_gpt2_decode_through_interpreted_kernels(monkeypatch):
    """The same through the Triton kernels themselves (FXOPT_INTERPRET_OPS=1): the GEMV with its LayerNorm
    prologue and bias / GELU / residual epilogues over Conv1D's transposed weights, gemv_qkv with LayerNorm,
    Flash-Decoding (tests/test_generate.py runs gpt2-tiny so)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter test (tests/gpu runs the kernels on the GPU)")
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1")
    model, logits_fn, vocab = gpt2("hf-gpt2")
    gen = fused_generator(model, vocab)
    ids = prompt(vocab)
    assert torch.equal(gen.generate(ids, 8), recompute(logits_fn, ids, 8))


# ------------------------------------------------------------------------------------------ one-row modules
def decode_rules(module: nn.Module, k: int = 32) -> tuple[torch.fx.GraphModule, list[str], torch.Tensor]:
    """module captured at one static row (1, 1, K), then DECODE_RULES: (graph, notes, the example input)."""
    x = torch.randn(1, 1, k, generator=torch.Generator().manual_seed(k)) * 2 + 1
    gm = capture(module.eval(), {"x": x}, dynamic_dims={}).gm
    notes = matmul.run_decode(gm, PassContext()).notes
    return gm, notes, x


def assert_same_outputs(gm, module, x):
    with torch.no_grad():
        got, want = gm(x=x), module(x)
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    """x + c_proj(gelu(c_fc(ln(x)))): GPT-2's MLP half-block, one row."""

    def __init__(self, k=32, affine=True):
        super().__init__()
        self.ln = nn.LayerNorm(k, elementwise_affine=affine)
        self.fc, self.proj = nn.Linear(k, 4 * k), nn.Linear(4 * k, k)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh"))


class InPlaceResidual(nn.Module):
    """Falcon's parallel block, one row: mlp_output += attention_output, then + x; or (`into_residual`) the
    projection added in place into a copy of x that the block also returns."""

    def __init__(self, into_residual: bool = False, k: int = 32):
        super().__init__()
        self.attn, self.mlp, self.into_residual = nn.Linear(k, k), nn.Linear(k, k), into_residual

    def forward(self, x):
        if self.into_residual:
            kept = x * 2
            total = kept.clone()
            total += self.mlp(x)  # mutates the clone, not the GEMV's output
            return total, kept
        attention = self.attn(x)  # computed first, as in Falcon's layer
        out = self.mlp(x)
        out += attention
        return out + x


def test_in_place_residual_adds_fold_into_the_gemv():
    """mlp += attn, then + x: both adds become the MLP GEMV's residual epilogues (gemv_residual and
    gemv_residual2); no add is left, and the outputs are eager's."""
    module = spread(InPlaceResidual())
    gm, notes, x = decode_rules(module)
    assert count(gm, aten.add_.Tensor) == count(gm, aten.add.Tensor) == 0, notes
    gemvs = [n for n in gm.graph.nodes if n.target == GEMV]
    assert sum(len(n.args) > matmul.G_RES2 and n.args[matmul.G_RES2] is not None for n in gemvs) == 1
    assert_same_outputs(gm, module, x)


HF_FALCON = ("hf:falcon,num_hidden_layers=2,hidden_size=64,num_attention_heads=4,num_kv_heads=2,vocab_size=256,"
             "new_decoder_architecture=true,alibi=false,parallel_attn=true,bias=false,ffn_hidden_size=128")


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "interpreted-kernels"])
def test_hf_falcon_parallel_block_keeps_greedy_tokens_and_logits(kernels, monkeypatch):
    """HF Falcon (new decoder architecture, parallel attention): q/k/v rows grouped per KV head ([q, q; k; v])
    are one gemv_qkv with RoPE and both cache writes; `mlp_output += attention_output` and `+ x` fold into the
    MLP's down-projection GEMV; tokens (and step logits) equal the eager model's, with the ops' references or
    through the Triton kernels (FXOPT_INTERPRET_OPS=1)."""
    pytest.importorskip("transformers")
    from fxopt.zoo import load_model

    if kernels and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter test (tests/gpu runs the kernels on the GPU)")
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1" if kernels else "0")
    model = spread(load_model(HF_FALCON)).eval()
    gen = fused_generator(model, 256)
    program = gen.decode_program(1)
    qkv = [n for n in program.graph.nodes if n.target == torch.ops.fxopt.gemv_qkv.default]
    assert len(qkv) == 2 and all(n.kwargs.get("interleaved") for n in qkv)
    assert count(program, aten.add_.Tensor) == count(program, torch.ops.fxopt.rope.default) == 0
    assert sum(len(n.args) > matmul.G_RES2 and n.args[matmul.G_RES2] is not None for n in program.graph.nodes
               if n.target == GEMV) == 2  # one per layer
    logits_fn = lambda ids: model(ids, use_cache=False).logits  # noqa: E731
    if kernels:
        ids = prompt(256)
        assert torch.equal(gen.generate(ids, 6), recompute(logits_fn, ids, 6))
    else:
        assert_greedy_and_step_logits(gen, logits_fn, prompt(256), NEW)


def test_in_place_add_into_another_tensor_is_not_a_residual_fold():
    module = spread(InPlaceResidual(into_residual=True))
    gm, notes, x = decode_rules(module)
    assert not any(n.args[matmul.G_RES] is not None for n in gm.graph.nodes if n.target == GEMV)
    assert_same_outputs(gm, module, x)


def test_gelu_folds_before_the_residual_of_the_same_gemv():
    """x + gelu(linear(x)): the GELU fold runs before the residual fold, so both land in one GEMV, in the
    kernel's order bias -> GELU -> + residual."""
    class ActThenResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return x + F.gelu(self.fc(x))

    module = spread(ActThenResidual())
    gm, notes, x = decode_rules(module)
    (g,) = [n for n in gm.graph.nodes if n.target == GEMV]
    assert g.args[matmul.G_ACT] == "gelu" and g.args[matmul.G_RES] is not None, notes
    assert count(gm, aten.gelu.default) == count(gm, aten.add.Tensor) == 0
    assert_same_outputs(gm, module, x)


def test_mlp_block_folds_into_two_gemvs():
    module = spread(Block())
    gm, notes, x = decode_rules(module)
    fc, proj = [n for n in gm.graph.nodes if n.target == GEMV]
    assert fc.args[matmul.G_LAYER] and fc.args[matmul.G_ACT] == "gelu_tanh" and fc.args[matmul.G_RES] is None
    assert proj.args[matmul.G_RES] is not None and not proj.args[matmul.G_LAYER]
    assert count(gm, aten.layer_norm.default) == 0 and not notes, notes
    assert_same_outputs(gm, module, x)


class Shared(nn.Module):
    """A LayerNorm whose output feeds two linears that fuse_siblings cannot merge (one has a bias), or is also
    read by a mean, or is also the residual."""

    def __init__(self, use: str):
        super().__init__()
        self.ln, self.a, self.b = nn.LayerNorm(32), nn.Linear(32, 16), nn.Linear(32, 8, bias=False)
        self.c = nn.Linear(32, 32)
        self.use = use

    def forward(self, x):
        h = self.ln(x)
        if self.use == "two linears":
            return self.a(h), self.b(h)
        if self.use == "a mean":
            return self.a(h) * h.mean()
        return h + self.c(h)


def test_layer_norm_read_by_two_gemvs_is_both_prologues():
    """Two GEMVs of one normalised row (Phi's q/k/v and fc1 after the split): each takes the LayerNorm as its
    prologue (every GEMV program computes the row's statistics anyway) and the norm node goes."""
    module = spread(Shared("two linears"))
    gm, notes, x = decode_rules(module)
    assert count(gm, aten.layer_norm.default) == 0
    assert sum(bool(n.args[matmul.G_LAYER]) for n in gm.graph.nodes if n.target == GEMV) == 2
    assert_same_outputs(gm, module, x)


@pytest.mark.parametrize("use, reason", [
    ("a mean", "the LayerNorm's output is also read by mean"),
    ("the residual", "the LayerNorm's output is also the GEMV's residual")])
def test_layer_norm_read_elsewhere_is_refused_with_its_reason(use, reason):
    """The norm is not folded when something else reads its output (it would be computed twice); the note
    names the other reader. Outputs are unchanged."""
    module = spread(Shared(use))
    gm, notes, x = decode_rules(module)
    assert count(gm, aten.layer_norm.default) == 1
    assert not any(n.args[matmul.G_LAYER] for n in gm.graph.nodes if n.target == GEMV)
    assert any(note.startswith("gemv_layer_norm: left") and reason in note for note in notes), notes
    assert_same_outputs(gm, module, x)


def test_layer_norm_without_weight_is_refused():
    module = Block(affine=False)
    gm, notes, x = decode_rules(module)
    assert count(gm, aten.layer_norm.default) == 1
    assert any(note.endswith("the LayerNorm has no constant weight") for note in notes), notes
    assert_same_outputs(gm, module, x)


class Conv1D(nn.Module):
    """HF's Conv1D: y = addmm(b, x.view(-1, K), W) with W stored (K, N), viewed back to (..., N)."""

    def __init__(self, k, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(k, n) / k**0.5), nn.Parameter(torch.randn(n))

    def forward(self, x):
        y = torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight)
        return y.view(*x.shape[:-1], -1)


class SpelledGelu(nn.Module):
    """ln -> Conv1D -> HF's NewGELU written out in ops (c: the constant in front of the cubic term's sum)."""

    def __init__(self, c=0.7978845608028654):
        super().__init__()
        self.ln, self.fc, self.c = nn.LayerNorm(32), Conv1D(32, 48), c

    def forward(self, x):
        y = self.fc(self.ln(x))
        return 0.5 * y * (1.0 + torch.tanh(self.c * (y + 0.044715 * torch.pow(y, 3.0))))


def test_conv1d_and_spelled_gelu_fold():
    """addmm over a (K, N) weight becomes a GEMV over a (N, K) copy registered once; the LayerNorm folds through
    the views around it, and the spelled-out tanh GELU into its epilogue."""
    module = spread(SpelledGelu())
    gm, notes, x = decode_rules(module)
    (g,) = [n for n in gm.graph.nodes if n.target == GEMV]
    assert g.args[matmul.G_LAYER] and g.args[matmul.G_ACT] == "gelu_tanh", notes
    weight = matmul.fetch(gm, g.args[matmul.G_W].target)
    assert weight.shape == (48, 32) and weight.is_contiguous() and torch.equal(weight, module.fc.weight.t())
    for target in (aten.addmm.default, aten.tanh.default, aten.pow.Tensor_Scalar, aten.layer_norm.default):
        assert count(gm, target) == 0
    assert_same_outputs(gm, module, x)


def test_gelu_spelled_with_another_constant_is_not_folded():
    """The spelled-out GELU is matched by its constants: 0.8 instead of sqrt(2/pi) is some other function."""
    module = spread(SpelledGelu(c=0.8))
    gm, notes, x = decode_rules(module)
    (g,) = [n for n in gm.graph.nodes if n.target == GEMV]
    assert g.args[matmul.G_ACT] == "none" and count(gm, aten.tanh.default) == 1
    assert g.args[matmul.G_LAYER]  # the prologue still folds
    assert_same_outputs(gm, module, x)


def test_decode_rules_table_order():
    """GELU before the residual add (an epilogue order), both norms before gemv_qkv (which takes the GEMV's
    prologue with it), identity dropouts dropped before any of them looks for its pattern."""
    names = [rule.name for rule in matmul.DECODE_RULES]
    assert names.index("identity_dropout") < names.index("gemv") < names.index("gemv_gelu") \
        < names.index("gemv_residual") < names.index("gemv_layer_norm") < names.index("gemv_qkv")


def test_native_layer_norm_and_default_eps_fold():
    """getitem(native_layer_norm(...), 0) (a decomposed graph's spelling) folds like aten.layer_norm, and a
    layer_norm call without eps takes the schema's 1e-5."""
    class Native(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc, self.out = nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 8)

        def forward(self, x):
            h = torch.native_layer_norm(x, [32], self.ln.weight, self.ln.bias, 1e-3)[0]
            return self.out(torch.layer_norm(self.fc(h), [32], self.ln.weight))

    module = spread(Native())
    gm, notes, x = decode_rules(module)
    fc, out = [n for n in gm.graph.nodes if n.target == GEMV]
    assert fc.args[matmul.G_LAYER] and fc.args[matmul.G_EPS] == 1e-3 and fc.args[matmul.G_NORM_B] is not None
    assert out.args[matmul.G_LAYER] and out.args[matmul.G_EPS] == 1e-5 and out.args[matmul.G_NORM_B] is None
    assert count(gm, aten.native_layer_norm.default) == count(gm, aten.layer_norm.default) == 0, notes
    assert_same_outputs(gm, module, x)
