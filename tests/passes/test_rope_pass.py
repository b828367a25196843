"""RoPE pass: x*cos + rotate_half(x)*sin -> one fxopt::rope node; K's rope + cache write -> one
fxopt::rope_cache_write in the decode program (CPU, the ops run their references unless told otherwise).

Expected node counts come from the model configs (two ropes per attention layer: q and k), never from the pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fxopt import models
from fxopt.capture import capture
from fxopt.generate import Generator, build_generator
from fxopt.numerics import within_tolerance
from fxopt.optimize import optimize
from fxopt.passes import cost, rope
from fxopt.pipeline import DECODE, FORWARD, make_context

aten = torch.ops.aten
ROPE, ROPE_CACHE_WRITE = torch.ops.fxopt.rope.default, torch.ops.fxopt.rope_cache_write.default
HF_LLAMA = ("hf:llama,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
            "num_key_value_heads=2,vocab_size=512")


pytestmark = pytest.mark.usefixtures("one_thread")


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def rotate_half_leftovers(gm: fx.GraphModule) -> list[str]:
    """Nodes of a traced rotate_half still in the graph: negations, and cats reading a negation or slice."""
    left = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.neg.default:
            left.append(node.name)
        elif node.target is aten.cat.default and any(
                p.target in (aten.neg.default, aten.slice.Tensor, aten.mul.Tensor) for p in node.args[0]):
            left.append(node.name)
    return left


def assert_fake_vals_exact(gm: fx.GraphModule) -> None:
    """Every fxopt::rope node's meta['val'] equals a fresh fake run (shape, strides, dtype)."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ROPE:
            args = fx.node.map_arg(node.args, lambda n: n.meta["val"])
            with fake_mode:
                fresh = ROPE(*args)
            val = node.meta["val"]
            assert (fresh.shape, fresh.stride(), fresh.dtype) == (val.shape, val.stride(), val.dtype), node.name


def assert_matches_eager(model, optimized, kwargs, logits=lambda out: out) -> None:
    """The optimized output within fxopt.numerics' rule of eager, both against a float64 copy."""
    import copy

    with torch.no_grad():
        got, eager = logits(optimized(**kwargs)), logits(model(**kwargs))
        reference = logits(copy.deepcopy(model).double()(**kwargs))
    ok, error, allowed = within_tolerance(got, eager, reference)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


# --------------------------------------------------------------------------------------------- models
def test_pipeline_runs_rope_between_matmul_and_fusion():
    names = [step.name for step in FORWARD]
    assert names.index("matmul") < names.index("rope") == names.index("fusion") - 1
    assert {step.name: step.option for step in FORWARD}["rope"] == "rope"
    decode = [step.name for step in DECODE]  # the decode program: RoPE before the GEMVs that fold it in
    assert decode.index("rope") < decode.index("matmul_decode") < decode.index("fusion")


def test_optimize_and_analyze_both_run_rope_when_fusing():
    """optimize(fuse=...) and analyze(fuse=...) switch the rope pass with fusion, so `fxopt annotate` shows
    the graph optimize runs (analyze compiles nothing: it runs on the meta device)."""
    from fxopt.analyze import analyze

    model = models.build("llama-tiny")
    kwargs = model.example_inputs(2, 9)
    assert optimize(model, kwargs, fuse=False).program.results.get("rope") is None
    assert optimize(model, kwargs).program.results["rope"].counts["rope"] == 2 * model.config.n_layers
    for fuse in (True, False):
        program = analyze("llama-tiny", batch=2, seq=16, fuse=fuse).program
        ropes = [n for n in program.gm.graph.nodes if n.target == torch.ops.fxopt.rope.default]
        assert len(ropes) == (2 * model.config.n_layers if fuse else 0)


@pytest.mark.parametrize("attn_impl, dtype", [("sdpa", torch.float32), ("explicit", torch.float32),
                                              ("sdpa", torch.bfloat16)])
def test_llama_tiny_two_ropes_per_layer(attn_impl, dtype):
    torch.manual_seed(0)
    model = models.build("llama-tiny", attn_impl=attn_impl, dtype=dtype).eval()
    kwargs = model.example_inputs(2, 9)
    optimized = optimize(model, kwargs)
    expected = 2 * model.config.n_layers
    assert optimized.program.results["rope"].counts["rope"] == expected
    assert count(optimized.gm, ROPE) == expected
    assert rotate_half_leftovers(optimized.gm) == []
    assert all(n.meta["val"].dtype == dtype for n in optimized.gm.graph.nodes if n.target is ROPE)  # tables too
    assert_fake_vals_exact(optimized.gm)
    assert_matches_eager(model, optimized, kwargs)


def test_llama_rope_node_cost():
    """One pass: x, the (s, d) tables and the output once each; 3 FLOPs per element."""
    model = models.build("llama-tiny").eval()
    optimized = optimize(model, model.example_inputs(2, 9), fuse=True)
    ctx, cfg = optimized.program.ctx, model.config
    b, s, d = 2, 9, cfg.head_dim
    nodes = [n for n in optimized.gm.graph.nodes if n.target is ROPE]
    heads = sorted(n.meta["val"].shape[1] for n in nodes)
    assert heads == sorted([cfg.n_heads, cfg.n_kv_heads] * cfg.n_layers)
    for node in nodes:
        c = node.meta[cost.COST_KEY]
        h = node.meta["val"].shape[1]
        assert ctx.evaluate(c.flops) == 3 * b * h * s * d
        assert ctx.evaluate(c.bytes_read) == 4 * (b * h * s * d + 2 * s * d)
        assert ctx.evaluate(c.bytes_written) == 4 * b * h * s * d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_llama_two_ropes_per_layer(dtype):
    pytest.importorskip("transformers")
    from fxopt.zoo import example_inputs, load_model

    model = load_model(HF_LLAMA, dtype=dtype)
    kwargs = example_inputs(model, 2, 9)
    optimized = optimize(model, kwargs)
    expected = 2 * model.config.num_hidden_layers
    assert optimized.program.results["rope"].counts["rope"] == expected
    assert count(optimized.gm, ROPE) == expected
    assert rotate_half_leftovers(optimized.gm) == []  # the cat of the frequency table stays: not a rotation
    for node in optimized.gm.graph.nodes:
        if node.target is ROPE:
            assert node.meta["val"].dtype == dtype  # HF casts cos/sin to x's dtype: no promotion
    assert_fake_vals_exact(optimized.gm)
    assert_matches_eager(model, optimized, {**kwargs, "use_cache": False}, logits=lambda out: out.logits)


HF_PARTIAL = {  # partial rotary (the tables cover r < d columns of each head), as each architecture spells it
    "gpt_neox": "hf:gpt_neox,num_hidden_layers=2,hidden_size=64,num_attention_heads=4,intermediate_size=128,"
                "vocab_size=256,rotary_pct=0.25",
    "stablelm": "hf:stablelm,num_hidden_layers=2,hidden_size=64,num_attention_heads=4,num_key_value_heads=2,"
                "intermediate_size=128,vocab_size=256,partial_rotary_factor=0.25",
    "phi": "hf:phi,num_hidden_layers=2,hidden_size=64,num_attention_heads=4,intermediate_size=128,"
           "vocab_size=256,partial_rotary_factor=0.5",
    "gptj": "hf:gptj,n_layer=2,n_embd=64,n_head=4,rotary_dim=8,vocab_size=256,n_positions=128",  # adjacent pairs
}


def partial_cats(gm: fx.GraphModule) -> list[str]:
    """cats that join a rotated part with the passed-through columns: what rope_partial removes."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.cat.default
            and any(isinstance(p, fx.Node) and p.target is ROPE for p in n.args[0])]


@pytest.mark.parametrize("arch", list(HF_PARTIAL))
def test_hf_partial_rotary_is_one_rope_per_q_and_k(arch):
    """HF's cat(rope(x[..., :r]), x[..., r:]) -> one fxopt::rope over the whole head, forward and decode."""
    pytest.importorskip("transformers")
    from fxopt.zoo import example_inputs, load_model

    model = load_model(HF_PARTIAL[arch])
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kwargs = example_inputs(model, 2, 9)
    optimized = optimize(model, kwargs)
    expected = 2 * config.num_hidden_layers
    assert optimized.program.results["rope"].counts["rope_partial"] == expected
    assert count(optimized.gm, ROPE) == expected and partial_cats(optimized.gm) == []
    ropes = [n for n in optimized.gm.graph.nodes if n.target is ROPE]
    assert all(n.args[0].meta["val"].shape[-1] == head_dim for n in ropes)  # the whole head
    assert all(n.args[1].meta["val"].shape[-1] < head_dim for n in ropes)  # partial tables
    assert all(bool(n.args[3:4] and n.args[3]) == (arch == "gptj") for n in ropes)  # rotate_every_two's pairs
    assert count(optimized.gm, aten.stack.default) == count(optimized.gm, aten.neg.default) == 0
    assert_fake_vals_exact(optimized.gm)
    assert_matches_eager(model, optimized, {**kwargs, "use_cache": False}, logits=lambda out: out.logits)

    ids = kwargs["input_ids"][:1]
    plain = build_generator(model, {"input_ids": ids}, max_seq_len=32, max_batch=1)
    gen = Generator(plain.programs, max_seq_len=32, max_batch=1, device=torch.device("cpu"), fuse_decode=True,
                    use_cuda_graph=False)
    assert torch.equal(gen.generate(ids, 10), recompute(lambda t: model(t, use_cache=False).logits, ids, 10))
    assert partial_cats(gen.decode_program(1)) == []


class PartialRotary(nn.Module):
    """One head tensor rotated over its first r columns (tables of r), the rest passed: HF's spelling, or
    one whose passed part starts at the wrong column."""

    def __init__(self, split: int, d: int = 16, r: int = 8, positions: int = 32):
        super().__init__()
        self.d, self.r, self.split = d, r, split
        self.proj = nn.Linear(d, 2 * d, bias=False)
        angles = torch.randn(positions, r)
        self.register_buffer("cos_table", angles.cos())
        self.register_buffer("sin_table", angles.sin())

    def forward(self, x):
        b, s, _ = x.shape
        q = self.proj(x).view(b, s, 2, self.d).transpose(1, 2)  # (b, 2, s, d)
        cos, sin, h = self.cos_table[:s], self.sin_table[:s], self.r // 2
        q_rot, q_pass = q[..., :self.r], q[..., self.split:]
        rotated = q_rot * cos + torch.cat((-q_rot[..., h:], q_rot[..., :h]), dim=-1) * sin
        return torch.cat((rotated, q_pass), dim=-1)


@pytest.mark.parametrize("split, rewritten", [(8, True), (6, False)])
def test_partial_rotary_needs_the_passed_part_to_start_where_the_rotation_ends(split, rewritten):
    torch.manual_seed(0)
    gm, result = run_rope_pass(PartialRotary(split).eval(), torch.randn(2, 5, 16))
    assert result.counts["rope_partial"] == int(rewritten)
    assert (partial_cats(gm) == []) == rewritten
    if not rewritten:
        assert any("do not split the last dim" in note for note in result.notes), result.notes


# --------------------------------------------------------------------------------------------- spellings
class Rotary(nn.Module):
    """q and k projections with one hand-written rotary embedding each, in the spelling `variant` names."""

    def __init__(self, variant: str, d: int = 16, heads: int = 2, positions: int = 32):
        super().__init__()
        self.variant, self.d, self.heads = variant, d, heads
        self.proj = nn.Linear(heads * d, 2 * heads * d, bias=False)
        angles = torch.randn(positions, d)
        self.register_buffer("cos_table", angles.cos())
        self.register_buffer("sin_table", angles.sin())

    def rotate(self, x, cos, sin):
        d, h = self.d, self.d // 2
        x1, x2 = x[..., :h], x[..., h:]
        v = self.variant
        if v == "hf":
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin
        if v == "commuted":  # operands of the add and of both muls swapped
            return sin * torch.cat((-x2, x1), dim=-1) + cos * x
        if v == "mul_minus_one":
            return x * cos + torch.cat((x[..., h:d] * -1, x[..., 0:h]), dim=x.dim() - 1) * sin
        if v == "no_negation":  # swaps the halves but does not negate: not rotate_half
            return x * cos + torch.cat((x2, x1), dim=-1) * sin
        if v == "wrong_halves":
            return x * cos + torch.cat((-x[..., 2:], x[..., :2]), dim=-1) * sin
        if v == "other_tensor":  # the direct term multiplies a different tensor
            return (x + 1) * cos + torch.cat((-x2, x1), dim=-1) * sin
        if v == "every_two":  # GPT-J's rotate_every_two
            return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin
        if v == "every_two_swapped":  # negates the even columns: not rotate_every_two
            return x * cos + torch.stack((-x[..., ::2], x[..., 1::2]), dim=-1).flatten(-2) * sin
        raise ValueError(v)

    def forward(self, x):
        b, s, _ = x.shape
        q, k = self.proj(x).view(b, s, 2 * self.heads, self.d).transpose(1, 2).chunk(2, dim=1)  # (b, h, s, d)
        cos, sin = self.cos_table[:s], self.sin_table[:s]
        if self.variant == "growing_tables":  # cos/sin of (b, h, s, d) against a (b, 1, s, d) x
            q = q[:, :1]
            cos = cos.expand(b, self.heads, s, self.d)
            return q * cos + torch.cat((-q[..., self.d // 2:], q[..., :self.d // 2]), dim=-1) * sin
        return self.rotate(q, cos, sin) + 2 * self.rotate(k, cos, sin)


def run_rope_pass(model: nn.Module, x: torch.Tensor):
    captured = capture(model, {"x": x}, {"x": {0: "batch", 1: "seq"}})
    ctx = make_context(captured, None, None)
    result = rope.run(captured.gm, ctx)
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(x=x), model(x), rtol=1e-5, atol=1e-5)
    return captured.gm, result


@pytest.mark.parametrize("variant", ["hf", "commuted", "mul_minus_one", "every_two"])
def test_spellings_are_rewritten(variant):
    torch.manual_seed(0)
    model = Rotary(variant).eval()
    gm, result = run_rope_pass(model, torch.randn(2, 5, 32))
    assert result.counts["rope"] == count(gm, ROPE) == 2
    assert rotate_half_leftovers(gm) == []
    assert_fake_vals_exact(gm)


def test_bf16_x_with_fp32_tables_gives_fp32_as_eager():
    """x * cos promotes: bf16 q with fp32 tables is fp32 in eager, and so is the rope node."""
    torch.manual_seed(0)
    model = Rotary("hf").eval()
    model.proj.to(torch.bfloat16)  # the tables stay fp32
    x = torch.randn(2, 5, 32).bfloat16()
    gm, result = run_rope_pass(model, x)
    nodes = [n for n in gm.graph.nodes if n.target is ROPE]
    assert result.counts["rope"] == len(nodes) == 2
    assert all(n.meta["val"].dtype == torch.float32 for n in nodes)
    assert model(x).dtype == gm(x=x).dtype == torch.float32
    assert_fake_vals_exact(gm)


@pytest.mark.parametrize("variant, reason", [
    ("no_negation", "without negating"),
    ("wrong_halves", "not the halves"),
    ("other_tensor", "does not multiply the rotated tensor"),
    ("growing_tables", "not broadcastable"),
    ("every_two_swapped", "not -x[..., 1::2] and x[..., ::2]"),
])
def test_near_misses_are_left_with_a_note(variant, reason):
    torch.manual_seed(0)
    model = Rotary(variant).eval()
    gm, result = run_rope_pass(model, torch.randn(2, 5, 32))
    assert count(gm, ROPE) == 0 and not result.changed
    assert result.counts["rope"] == 0
    assert any(reason in note for note in result.notes), result.notes


def test_shared_intermediate_is_left():
    """x * cos also read elsewhere: rewriting would save nothing, so the match is left."""

    class Shared(Rotary):
        def forward(self, x):
            b, s, _ = x.shape
            q = self.proj(x)[..., : self.heads * self.d].view(b, s, self.heads, self.d).transpose(1, 2)
            cos, sin = self.cos_table[:s], self.sin_table[:s]
            direct = q * cos
            return direct + torch.cat((-q[..., 8:], q[..., :8]), dim=-1) * sin, direct

    gm, result = run_rope_pass(Shared("hf").eval(), torch.randn(2, 5, 32))
    assert count(gm, ROPE) == 0
    assert any("also used outside" in note for note in result.notes), result.notes


# --------------------------------------------------------------------------------------------- decode program
@torch.no_grad()
def recompute(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1)[:, None]], dim=1)
    return ids


def test_fused_decode_program_ropes_and_writes_k_in_one_node():
    """fuse_decode=True on CPU (no CUDA graph): q's rope is one fxopt::rope, k's rope and its cache write
    one fxopt::rope_cache_write per layer, and greedy tokens equal full recompute (batch 1 and a
    left-padded batch)."""
    torch.manual_seed(0)
    model = models.build("llama-tiny").eval()
    n_layers, new = model.config.n_layers, 12
    plain = build_generator(model, model.example_inputs(1, 8), max_seq_len=32, max_batch=2)
    gen = Generator(plain.programs, max_seq_len=32, max_batch=2, device=torch.device("cpu"), fuse_decode=True,
                    use_cuda_graph=False)
    ids = model.example_inputs(1, 7, seed=3)["input_ids"]
    assert torch.equal(gen.generate(ids, new), recompute(model, ids, new))
    short = model.example_inputs(1, 4, seed=4)["input_ids"]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    out = gen.generate(torch.cat([padded, ids]), new, attention_mask=torch.cat([mask, torch.ones_like(mask)]))
    assert torch.equal(out[0, 3:], recompute(model, short, new)[0])
    assert torch.equal(out[1], recompute(model, ids, new)[0])

    program = gen.decode_program(2)
    assert count(program, ROPE) == n_layers  # q
    assert count(program, ROPE_CACHE_WRITE) == n_layers  # k, written straight into its cache
    assert count(program, torch.ops.fxopt.cache_write.default) == n_layers  # v
    assert rotate_half_leftovers(program) == []
    writes = [n for n in program.graph.nodes if n.target is ROPE_CACHE_WRITE]
    assert all(cost.COST_KEY in n.meta and n.meta[cost.COST_KEY].kind != "unknown" for n in writes)
    # batch 1: both ropes and both cache writes go into the q/k/v GEMV's epilogue (passes/matmul.py)
    program = gen.decode_program(1)
    assert count(program, torch.ops.fxopt.gemv_qkv.default) == n_layers
    assert count(program, ROPE) == count(program, ROPE_CACHE_WRITE) == 0
    assert rotate_half_leftovers(program) == []
    folded = [n for n in program.graph.nodes if n.target is torch.ops.fxopt.gemv_qkv.default]
    assert all(n.meta[cost.COST_KEY].kind == "matmul" for n in folded)
    assert any("rope kernels" in note for note in gen.notes), gen.notes


def test_fused_decode_through_interpreted_kernels(monkeypatch):
    """The batch-2 decode program (batch 1 folds RoPE into the q/k/v GEMV) with the ops routed through the
    Triton kernels (interpreted): same tokens as full recompute."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1")
    torch.manual_seed(0)
    model = models.build("llama-tiny", n_layers=1).eval()
    plain = build_generator(model, model.example_inputs(1, 8), max_seq_len=16, max_batch=2)
    gen = Generator(plain.programs, max_seq_len=16, max_batch=2, device=torch.device("cpu"), fuse_decode=True,
                    use_cuda_graph=False)
    ids = model.example_inputs(2, 5, seed=5)["input_ids"]
    assert torch.equal(gen.generate(ids, 4), recompute(model, ids, 4))
    assert count(gen.decode_program(2), ROPE_CACHE_WRITE) == 1
