"""codegen/pdl.py: programmatic dependent launch only on CUDA devices of sm_90+, never in the interpreter,
never with FXOPT_PDL=0 (pdl.ENABLED)."""

import torch

from fxopt.codegen import pdl


def test_off_on_cpu_and_in_the_interpreter(monkeypatch):
    assert not pdl.use_pdl(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    assert not pdl.use_pdl(torch.device("cuda", 0))


def test_switch_and_capability(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(pdl, "_capable", lambda index: index == 1)  # device 1 is a Hopper, device 0 is not
    assert pdl.use_pdl(torch.device("cuda", 1)) and not pdl.use_pdl(torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.use_pdl(torch.device("cuda", 1))
    assert pdl.launch_options(True) == {"launch_pdl": True} and pdl.launch_options(False) == {}
