"""Real architectures: tiny HuggingFace decoders (random weights, built from configs, nothing downloaded)
through fxopt, each with HF's "eager" and "sdpa" attention, plus the nanoGPT-style model of
tests/models/nanogpt.py with `flash` off and on.

Per case, three tests:

* test_logits               fxopt.optimize(model, {"input_ids": (2, 16)}) at lengths 16, 24 and 40 (past the
                            sliding windows of 16) against the eager model: max |diff| <= 1e-4 * max |eager|;
* test_attention_rewritten  every layer's attention became an fxopt attention node (SDPA fallbacks are
                            recorded, printed in the -rA report, not failures);
* test_kv_greedy            the KV-cached generator (max_seq_len 64, max_batch 2), greedy, 24 new tokens after
                            a prompt of 8 (past the window): batch 1 identical to HF generate and to a
                            full-recompute argmax loop; batch 2 with row 0 left-padded by 3 identical to HF
                            generate with that attention_mask.

The only skips are combinations HF does not offer (no sdpa attention for Bloom or Gemma2) and the nanoGPT
cases while its file is absent. Each case is built once (model, optimized module, generator) and all three
checks run on it; the cases run in min(2, cores) spawned worker processes (FXOPT_GRID_WORKERS=0: in this
process), since capture is single-threaded Python. Weights are redrawn at std 0.15 so greedy decoding is not
degenerate (see hf_grid.WEIGHT_STD). On CPU, fused regions run as their PyTorch reference, not in the Triton
interpreter (FXOPT_GRID_INTERPRET=1 keeps it; far too slow for the whole grid). The cases, their config
quirks and the checks are in hf_grid.py; benchmarks/hf_grid_table.py prints the same grid as a table.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("transformers")

import hf_grid as grid  # noqa: E402  (tests/models is on sys.path: pytest's rootdir-relative import)

pytestmark = pytest.mark.usefixtures("one_thread")

#: Known defects, each expected to fail until fixed (strict: a case that starts passing must leave this table).
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}

CASES = [pytest.param(name, impl, id=f"{name}-{impl}") for name, impl in grid.case_ids()]


@pytest.fixture(scope="module")
def results(request):
    """The selected cases, run once each (all three checks) in worker processes; tests look their part up."""
    mine = [item for item in request.session.items if item.module is request.module and hasattr(item, "callspec")]
    cases = [(item.callspec.params["name"], item.callspec.params["impl"]) for item in mine]
    # torch.export's structured-trace logger emits empty DEBUG records by the hundred; keep them out of -rA
    trace_log = logging.getLogger("torch.__trace")
    level = trace_log.level
    trace_log.setLevel(logging.INFO)
    with grid.cpu_reference_kernels():  # also what the spawned workers inherit
        runner = grid.Grid(cases)
        try:
            yield runner
        finally:
            runner.close()
            trace_log.setLevel(level)


def _check(results, name, impl, test):
    case = results.result(name, impl)
    outcome = case.outcomes[test]
    if outcome.status == "skip":
        pytest.skip(outcome.message)
    known = KNOWN_FAILURES.get((name, impl, test))
    if known is not None:
        if outcome.status == "fail":
            pytest.xfail(f"{known} ({outcome.message})")
        pytest.fail(f"known failure now passes, remove it from KNOWN_FAILURES: {known}", pytrace=False)
    if outcome.status == "fail":
        if outcome.detail:  # the traceback: shown with the test's captured output
            print(outcome.detail)
        pytest.fail(outcome.message, pytrace=False)
    return case, outcome


@pytest.mark.parametrize("name, impl", CASES)
def test_logits(results, name, impl):
    case, _ = _check(results, name, impl, "logits")
    print(f"{name}-{impl}: worst max|diff| / max|eager| over lengths {grid.LENGTHS}: {case.logits_error:.1e}")


@pytest.mark.parametrize("name, impl", CASES)
def test_attention_rewritten(results, name, impl, record_property):
    case, _ = _check(results, name, impl, "attention")
    record_property("attention", case.attention)
    print(f"{name}-{impl}: {case.attention}")
    for note in case.fallbacks:  # recorded, not failed
        print(f"  fallback: {note}")
        record_property("fallback", note)


@pytest.mark.parametrize("name, impl", CASES)
def test_kv_greedy(results, name, impl):
    case, _ = _check(results, name, impl, "kv_greedy")
    print(f"{name}-{impl}: KV cache {case.kv}; greedy identical (case built and checked in {case.seconds:.1f} s)")
