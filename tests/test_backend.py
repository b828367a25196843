"""torch.compile(model, backend="fxopt"): registered by entry point, passes run per Dynamo subgraph, falls back
unoptimized (with a warning) when a pass fails, matches eager."""

import copy
import dataclasses
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt import backend, models, pipeline
from fxopt.capture import role_symbol

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    backend.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def references(monkeypatch):
    """Fused regions run their PyTorch references (fast); the graph-break test runs the generated kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def counting(calls: list, **options):
    """The fxopt backend, recording each Dynamo subgraph it is handed."""
    inner = backend.make_backend(**options)

    def compiler(gm, example_inputs, **kwargs):
        calls.append(gm)
        return inner(gm, example_inputs, **kwargs)

    return compiler


def assert_close_to_reference(out, eager, ref64):
    """Within 1e-5 of eager, and no further from the float64 reference than 2x eager's error (+ tiny slack)."""
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    eager_err = (eager.double() - ref64).abs().max().item()
    assert (out.double() - ref64).abs().max().item() <= 2 * eager_err + 1e-6


class Block(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        return x + F.gelu(self.proj(y) * 0.5 + 0.25)


class TwoBlocks(nn.Module):
    """Two attention blocks with a deliberate graph break between them."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block()

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def test_entry_point_is_registered():
    (point,) = [p for p in entry_points(group="torch_dynamo_backends") if p.name == "fxopt"]
    assert point.value == "fxopt.backend:fxopt_backend"
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("fxopt") is backend.fxopt_backend  # how torch.compile(backend="fxopt") resolves it


def test_gpt2_matches_eager_at_two_lengths_without_recompiling(references):
    torch.manual_seed(0)
    model = models.build("gpt2-tiny")
    model64 = copy.deepcopy(model).double()
    calls = []
    compiled = torch.compile(model, backend=counting(calls))
    with torch.no_grad():
        for seq in (16, 24, 32):  # 16: static graph; 24: one recompile with s dynamic; 32 reuses it
            inputs = model.example_inputs(2, seq)
            assert_close_to_reference(compiled(**inputs), model(**inputs), model64(**inputs))
    assert len(calls) == 2
    static, dynamic = backend.last_programs()
    for program in (static, dynamic):  # the passes ran: attention became fxopt's op, regions were fused
        assert program.optimized, program.fallback
        assert program.calls()["fxopt.attention"] == 2 and program.calls()["fused_region"] >= 2
        assert program.program.results["attention"].counts["sdpa"] == 2
        assert any("wte" in name for name in program.frozen)  # weights became constants of the graph
    assert role_symbol("seq") in dynamic.symbols.values()
    assert not static.symbols


def test_graph_break_compiles_each_subgraph_and_runs_the_generated_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # fused regions run their Triton code on the interpreter
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(2, 8, 32)
    calls = []
    compiled = torch.compile(model, backend=counting(calls), dynamic=False)
    with torch.no_grad():
        out, eager = compiled(x), model(x)
        ref64 = copy.deepcopy(model).double()(x.double())
    assert_close_to_reference(out, eager, ref64)
    assert len(calls) >= 2
    programs = backend.last_programs()
    assert len(programs) >= 2 and all(p.optimized for p in programs)
    assert sum(p.calls()["fxopt.attention"] for p in programs) == 2
    assert all(p.calls()["fused_region"] >= 1 for p in programs if p.calls()["fxopt.attention"])


def test_a_failing_pass_falls_back_with_one_warning(monkeypatch, references):
    def broken(gm, ctx):
        raise RuntimeError("deliberately broken")

    passes = tuple(dataclasses.replace(step, run=broken) if step.name == "fusion" else step
                   for step in pipeline.FORWARD)
    monkeypatch.setattr(pipeline, "FORWARD", passes)
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 8, 32)
    compiled = torch.compile(model, backend="fxopt")
    with torch.no_grad(), pytest.warns(UserWarning, match=r"pass `fusion` failed.*deliberately broken") as caught:
        out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert sum("fxopt backend" in str(w.message) for w in caught) == 1
    (program,) = backend.last_programs()
    assert not program.optimized and "fusion" in program.fallback


def test_options_and_training_graphs(references):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 8, 32)
    compiled = torch.compile(model, backend="fxopt", options={"fuse": False, "hw": "a100-80gb"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (program,) = backend.last_programs()
    assert program.calls()["fxopt.attention"] == 1 and not program.calls()["fused_region"]
    assert "A100" in program.program.ctx.hardware.name.upper()

    # with autograd on, the graph runs unoptimized (one warning) and still trains
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxopt")
    with pytest.warns(UserWarning, match="inference graphs only"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.qkv.weight.grad is not None


def test_bench_times_the_backend_beside_optimize():
    from fxopt.bench.forward import bench_model

    result = bench_model("gpt2-tiny", batch=2, seq=32, dtype=torch.float32, device="cpu", compile=False,
                         backend=True, regions=False, min_run_time=0.05)
    whole = result.whole
    assert whole["fxopt_backend_ms"] > 0 and whole["fxopt_ms"] > 0 and whole["eager_ms"] > 0
    assert whole["backend_max_abs_diff"] < 1e-4  # the backend's logits against eager, at the bench's inputs
