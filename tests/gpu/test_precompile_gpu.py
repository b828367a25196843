"""optimize() compiles a program's Triton kernels in one parallel dry call (codegen/precompile.py): after it,
the first real call compiles and loads nothing, and its outputs still match eager within DESIGN.md's tolerance
(skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import models
from fxopt.codegen import loader, precompile
from fxopt.numerics import float64_copy, within_tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_first_call_after_optimize_compiles_nothing(monkeypatch, name):
    for variable in precompile.AUTOTUNE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("FXOPT_PRECOMPILE", raising=False)
    if not precompile.available():
        pytest.skip("this Triton has no AsyncCompileMode")
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    # fresh generated modules: kernels an earlier test compiled in this process (regions of the same code
    # share one module) would otherwise leave the dry call nothing to compile
    monkeypatch.setattr(loader, "_MODULES", {})
    torch.manual_seed(0)
    model = models.build(name, device="cuda", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), device="cuda")
    compiles = []
    original = JITFunction._do_compile

    def counting(self, *args, **kwargs):
        compiles.append(self.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", counting)
    loads = []
    init_handles = CompiledKernel._init_handles

    def counting_loads(self):
        if self.module is None:  # not loaded yet: builds the launcher and loads the module now
            loads.append(self.name)
        return init_handles(self)

    monkeypatch.setattr(CompiledKernel, "_init_handles", counting_loads)
    optimized = fxopt.optimize(model, {"input_ids": ids})
    assert "precompile" in optimized.program.seconds
    assert compiles, "the dry call compiled no Triton kernel"  # fused regions and attention: several
    assert loads, "the kernels were not loaded after the dry call"
    compiles.clear()
    loads.clear()
    with torch.no_grad():
        out = optimized(input_ids=ids)
        eager = model(input_ids=ids)
        reference = float64_copy(model)(input_ids=ids)
    assert compiles == []
    assert loads == []  # launchers built and modules loaded on the pool, not one by one here
    ok, error, allowed = within_tolerance(out, eager, reference)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
