"""codegen/precompile.py: the dry-call compile mode swaps Triton's launch for a compile-only one and always
puts it back; autotuning switches the dry call off (its timing runs would time launches that do nothing)."""

import pytest

from fxopt.codegen import precompile

jit = pytest.importorskip("triton.runtime.jit")


def test_launch_is_restored_even_when_the_block_raises():
    launch = jit.JITFunction.run
    with pytest.raises(RuntimeError, match="inside"):
        with precompile.compile_in_parallel(max_workers=2) as active:
            assert active == (precompile._async_compile_mode()[0] is not None)
            if active:
                assert jit.JITFunction.run is not launch  # launches only compile inside the block
            raise RuntimeError("inside")
    assert jit.JITFunction.run is launch


@pytest.mark.parametrize("variable", precompile.AUTOTUNE_VARIABLES)
def test_any_autotune_variable_turns_the_dry_call_off(monkeypatch, variable):
    for name in precompile.AUTOTUNE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not precompile.autotuning()
    monkeypatch.setenv(variable, "1")
    assert precompile.autotuning()


def test_fxopt_precompile_0_disables(monkeypatch):
    monkeypatch.setenv("FXOPT_PRECOMPILE", "0")
    assert not precompile.available()


def test_a_family_switched_off_overrides_the_global_switch(monkeypatch):
    for name in precompile.AUTOTUNE_VARIABLES:
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("FXOPT_AUTOTUNE", "1")
    assert not precompile.autotuning()  # every family's own variable says 0
    monkeypatch.setenv("FXOPT_ROPE_AUTOTUNE", "1")
    assert precompile.autotuning()
