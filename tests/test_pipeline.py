"""fxopt/pipeline.py: every program's passes run by one run_passes, with the caller's context everywhere."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import models, pipeline
from fxopt.capture import capture
from fxopt.passes.infra import PassResult


def _captured():
    model = models.build("llama-tiny")
    return model, capture(model, model.example_inputs(2, 8))


def test_an_error_inside_a_pass_names_the_pass_and_the_program():
    def broken(gm, ctx):
        raise ValueError("deliberately broken")

    _, captured = _captured()
    steps = (pipeline.Step("cost", pipeline.cost.run), pipeline.Step("broken_pass", broken))
    with pytest.raises(pipeline.PassError, match=r"forward program: pass broken_pass failed: ValueError: "
                                                 r"deliberately broken") as info:
        pipeline.run_passes(captured, pipeline.make_context(captured, None, None), steps)
    assert info.value.pass_name == "broken_pass" and isinstance(info.value.__cause__, ValueError)


def test_a_pass_run_before_what_it_needs_is_refused():
    _, captured = _captured()
    fusion_first = tuple(step for step in pipeline.FORWARD if step.name != "cost")
    with pytest.raises(pipeline.PassError, match="pass fusion needs cost"):
        pipeline.run_passes(captured, pipeline.make_context(captured, None, None, {"fuse": True}), fusion_first)


def test_every_program_lists_its_passes_in_the_order_they_depend_on():
    for steps in (pipeline.FORWARD, pipeline.ANALYSIS, pipeline.EXPLAIN, pipeline.GENERATOR, pipeline.DECODE):
        names = [step.name for step in steps]
        for i, step in enumerate(steps):
            assert set(step.needs) <= set(names[:i]), (names, step)
    assert [step.name for step in pipeline.GENERATOR][-1] == "kv_cache"


def test_decode_buckets_run_with_the_callers_hardware_and_options(monkeypatch):
    seen = []

    def spy(gm, ctx):
        seen.append((ctx.hardware.name, dict(ctx.options)))
        return PassResult(changed=False)

    monkeypatch.setattr(pipeline, "DECODE", pipeline.DECODE + (pipeline.Step("spy", spy),))
    model = models.build("llama-tiny")
    gen = fxopt.optimize(model, model.example_inputs(2, 8), kv_cache=True, max_seq_len=32, hw="a10",
                         fuse=False, fuse_decode=True)
    gen.decode_program(1)
    ((hardware, options),) = seen
    assert "A10" in hardware
    assert options["fuse"] is False and options["rope"] is False and options["matmul"] is True
    ids = model.example_inputs(1, 8)["input_ids"]
    with torch.no_grad():  # the decode program the unfused DECODE leaves still generates the model's tokens
        ref = ids
        for _ in range(4):
            ref = torch.cat([ref, model(input_ids=ref)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(gen.generate(ids, max_new_tokens=4), ref)
