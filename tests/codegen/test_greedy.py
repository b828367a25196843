"""codegen/greedy.py: the greedy pick (argmax -> next input and token history) against torch.argmax, run by the
Triton interpreter on CPU: several rows, a vocabulary not a multiple of the chunk, ties across chunks, bf16."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from sampling_checks import top_k_reference  # noqa: E402

from fxopt.codegen import greedy  # noqa: E402

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test (the decode graph runs it on the GPU: tests/gpu/test_generate_gpu.py)")


def _run(pick, logits, slot):
    rows = logits.shape[0]
    ids = torch.full((rows, 1), -7, dtype=torch.long)
    history = torch.full((rows, 20), -7, dtype=torch.long)
    pick(logits, ids, history, torch.tensor(slot))
    return ids, history


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, block", [(1000, 256), (4099, 4096), (37, 4096)])
def test_pick_matches_torch_argmax(monkeypatch, dtype, vocab, block):
    monkeypatch.setattr(greedy, "BLOCK_V", block)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    ids, history = _run(greedy.greedy_pick, logits, slot=6)
    expected = logits.argmax(-1)
    assert torch.equal(ids[:, 0], expected)
    assert torch.equal(history[:, 7], expected)
    assert (history[:, :7] == -7).all() and (history[:, 8:] == -7).all()  # only column slot + 1 written


@interpreted
def test_ties_go_to_the_lowest_index_across_chunks(monkeypatch):
    """Row 0's max sits at 300 (lane 44 of chunk 1) and at 100 (lane 100 of chunk 0): torch.argmax says 100,
    where picking the lowest lane would say 300. Row 1: both copies in lane 44, the first one wins."""
    monkeypatch.setattr(greedy, "BLOCK_V", 256)
    logits = torch.zeros(2, 1000)
    logits[0, [300, 100, 900]] = 5.0
    logits[1, [300, 44]] = 2.0
    ids, _ = _run(greedy.greedy_pick, logits, slot=0)
    assert ids[:, 0].tolist() == logits.argmax(-1).tolist() == [100, 44]


@interpreted
def test_pick_reads_rows_of_a_strided_view(monkeypatch):
    """logits[:, -1] of a (rows, tokens, vocab) buffer, as the decode graph passes it: rows 3 * vocab apart."""
    monkeypatch.setattr(greedy, "BLOCK_V", 128)
    full = torch.randn(4, 3, 300, generator=torch.Generator().manual_seed(1))
    logits = full[:, -1]
    assert logits.stride() == (900, 1)
    ids, history = _run(greedy.greedy_pick, logits, slot=2)
    assert torch.equal(ids[:, 0], logits.argmax(-1)) and torch.equal(history[:, 3], logits.argmax(-1))


def test_reference_is_argmax_copy_and_index_copy():
    logits = torch.randn(2, 50)
    ids, history = _run(greedy.greedy_pick_reference, logits, slot=3)
    assert torch.equal(ids[:, 0], logits.argmax(-1)) and torch.equal(history[:, 4], logits.argmax(-1))


_AOT_SCRIPT = r"""
from fxopt.codegen import greedy as G

scalars = {"vocab": "i32", "stride_lr": "i32", "stride_ir": "i32", "stride_hr": "i32", "inv_temperature": "fp32",
           "chunk": "i32", "n_chunks": "i32", "best_ptr": "*fp32", "best_at_ptr": "*i32"}
for ptr in ("*bf16", "*fp32"):
    for sample in (False, True):
        signature = {p.name: scalars.get(p.name, ptr if p.name == "logits_ptr" else "*i64")
                     for p in G._pick_chunks_kernel.params if not p.is_constexpr}
        compile_sm90(G._pick_chunks_kernel, signature, dict(BLOCK_V=G.BLOCK_V, SAMPLE=sample),
                     num_warps=G.NUM_WARPS)
        print("compiled greedy", ptr, sample)
signature = {p.name: scalars.get(p.name, "*i64") for p in G._pick_rows_kernel.params if not p.is_constexpr}
compile_sm90(G._pick_rows_kernel, signature, dict(BLOCK_C=64), num_warps=1)
print("compiled greedy rows")
top_k_scalars = {**scalars, "keys_ptr": "*i64", "n_keys": "i32", "top_k": "i32", "top_p": "fp32"}
for ptr in ("*bf16", "*fp32"):
    signature = {p.name: top_k_scalars.get(p.name, ptr) for p in G._top_k_chunks_kernel.params if not p.is_constexpr}
    compile_sm90(G._top_k_chunks_kernel, signature, dict(BLOCK_V=G.TOP_K_BLOCK_V, K_PAD=64),
                 num_warps=G.TOP_K_CHUNK_WARPS)
    print("compiled greedy top-k chunks", ptr)
for nucleus in (False, True):
    signature = {p.name: top_k_scalars.get(p.name, "*i64") for p in G._top_k_rows_kernel.params
                 if not p.is_constexpr}
    compile_sm90(G._top_k_rows_kernel, signature, dict(BLOCK_K=2048, ROW_K=128, NUCLEUS=nucleus), num_warps=4)
    print("compiled greedy top-k rows", nucleus)
signature = {p.name: top_k_scalars.get(p.name, "*i64") for p in G._top_k_merge_kernel.params if not p.is_constexpr}
compile_sm90(G._top_k_merge_kernel, {**signature, "n_in": "i32", "n_groups": "i32"},
             dict(GROUP=G.TOP_K_MERGE, K_PAD=64), num_warps=4)
print("compiled greedy top-k merge")
"""


def test_greedy_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """The interpreter tests above never lower the kernel: compile it for sm_90 as the decode graph launches it."""
    from aot_sm90 import run_script

    assert run_script(tmp_path, "aot_greedy", _AOT_SCRIPT).count("compiled greedy") == 10


def _sample(logits, slot, seed, inv_temperature=1.0):
    rows = logits.shape[0]
    ids = torch.full((rows, 1), -7, dtype=torch.long)
    history = torch.full((rows, 20), -7, dtype=torch.long)
    greedy.sample_pick(logits, ids, history, torch.tensor(slot), torch.tensor(seed), inv_temperature)
    return ids, history


@interpreted
@pytest.mark.parametrize("inv_temperature", [1.0, 0.5])
def test_sampled_tokens_follow_softmax(monkeypatch, inv_temperature):
    monkeypatch.setattr(greedy, "BLOCK_V", 4)  # the 6-token vocabulary spans two chunks
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    logits = torch.log(probs).expand(1000, 6).contiguous()
    logits[:, 5] = float("-inf")  # filtered out (top-k / top-p): never drawn
    ids, history = _sample(logits, slot=3, seed=11, inv_temperature=inv_temperature)
    assert torch.equal(history[:, 4], ids[:, 0]) and (history[:, :4] == -7).all()
    freq = torch.bincount(ids[:, 0], minlength=6).float() / ids.numel()
    want = torch.softmax(torch.log(probs[:5]) * inv_temperature, dim=0)
    torch.testing.assert_close(freq, torch.cat([want, torch.zeros(1)]), atol=0.047, rtol=0)  # 3 sigma at 1000


@interpreted
def test_a_seed_and_position_fix_the_draw():
    logits = torch.randn(64, 50)
    first, _ = _sample(logits, slot=5, seed=3)
    again, _ = _sample(logits, slot=5, seed=3)
    other_seed, _ = _sample(logits, slot=5, seed=4)
    other_position, _ = _sample(logits, slot=6, seed=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(first, other_position)
    picked_by_row = [int(first[r]) for r in range(64)]
    assert len(set(picked_by_row)) > 5  # rows draw independently


def _sample_top_k(logits, slot, seed, **kw):
    rows = logits.shape[0]
    ids = torch.full((rows, 1), -7, dtype=torch.long)
    history = torch.full((rows, 20), -7, dtype=torch.long)
    greedy.sample_top_k(logits, ids, history, torch.tensor(slot), torch.tensor(seed), **kw)
    return ids, history


@interpreted
@pytest.mark.parametrize("top_k, top_p, inv_temperature", [(5, None, 1.0), (7, 0.6, 1.3), (3, 0.95, 0.5)])
@pytest.mark.parametrize("values", ["distinct", "tied"])
def test_top_k_draw_equals_sample_pick_over_the_filtered_logits(monkeypatch, top_k, top_p, inv_temperature, values):
    """The same token as sample_pick over the reference-filtered logits, row by row, with the vocabulary over
    four chunks and a merge level; "tied" logits are small integers, so the k-th value is shared by several
    tokens (fewer than the 32 candidates the row keeps)."""
    monkeypatch.setattr(greedy, "TOP_K_BLOCK_V", 32)
    monkeypatch.setattr(greedy, "TOP_K_MERGE", 32)  # four chunks of 16 keys -> one merge level -> 32 keys
    g = torch.Generator().manual_seed(top_k)
    if values == "tied":
        logits = torch.randint(0, 16, (16, 100), generator=g).float()
    else:
        logits = torch.randn(16, 100, generator=g)
    ids, history = _sample_top_k(logits, slot=4, seed=9, top_k=top_k, top_p=top_p, inv_temperature=inv_temperature)
    want, _ = _sample(top_k_reference(logits, top_k, top_p, inv_temperature), slot=4, seed=9)
    assert torch.equal(ids, want)
    assert torch.equal(history[:, 5], ids[:, 0]) and (history[:, :5] == -7).all() and (history[:, 6:] == -7).all()
    assert len(set(ids[:, 0].tolist())) > 3  # a draw, not the argmax of every row


@interpreted
def test_top_k_reads_rows_of_a_strided_view(monkeypatch):
    """logits[:, -1] of a (rows, tokens, vocab) buffer, rows 3 * vocab apart, as the decode graph may pass it."""
    monkeypatch.setattr(greedy, "TOP_K_BLOCK_V", 64)
    full = torch.randn(6, 3, 150, generator=torch.Generator().manual_seed(3))
    logits = full[:, -1]
    assert logits.stride() == (450, 1)
    ids, _ = _sample_top_k(logits, slot=2, seed=4, top_k=6, top_p=0.8)
    want, _ = _sample(top_k_reference(logits, 6, 0.8, 1.0), slot=2, seed=4)
    assert torch.equal(ids, want)


@interpreted
def test_top_k_rows_with_few_finite_logits(monkeypatch):
    """Row 0: two finite logits and k = 5 (only those two drawn); row 1: all -inf (index 0); row 2: NaN beside
    finite logits (never drawn); row 3: k = 1 is the argmax."""
    monkeypatch.setattr(greedy, "TOP_K_BLOCK_V", 32)
    logits = torch.full((4, 70), float("-inf"))
    logits[0, [3, 66]] = torch.tensor([0.5, 0.2])
    logits[2] = torch.randn(70)
    logits[2, ::2] = float("nan")
    logits[3] = torch.randn(70)
    picks = {r: set() for r in range(4)}
    for seed in range(8):
        ids, _ = _sample_top_k(logits, slot=0, seed=seed, top_k=5)
        for r in range(3):
            picks[r].add(int(ids[r]))
        if seed < 3:
            argmax, _ = _sample_top_k(logits[3:], slot=0, seed=seed, top_k=1)
            picks[3].add(int(argmax[0]))
    assert picks[0] == {3, 66} and picks[1] == {0}
    assert all(i % 2 == 1 for i in picks[2]) and len(picks[2]) > 1
    assert picks[3] == {int(logits[3].argmax())}


@interpreted
def test_sampler_pick_routes_top_k_through_the_kernels(monkeypatch):
    """Sampler.pick with top-k and top-p (no ties: randn) draws what sample_pick draws over filtered_logits."""
    from fxopt.generate import Sampler

    monkeypatch.setattr(greedy, "TOP_K_BLOCK_V", 32)
    calls = []
    counted = lambda *a, **kw: calls.append(1) or greedy.sample_top_k(*a, **kw)  # noqa: E731
    monkeypatch.setattr("fxopt.generate.sample_top_k", counted)
    sampler = Sampler(True, temperature=0.8, top_k=6, top_p=0.7, seed=5)
    logits = torch.randn(8, 90, generator=torch.Generator().manual_seed(2))
    ids, history = torch.zeros(8, 1, dtype=torch.long), torch.zeros(8, 4, dtype=torch.long)
    sampler.pick(logits, ids, history, torch.tensor(1), torch.tensor(5))
    want, _ = _sample(sampler.filtered_logits(logits), slot=1, seed=5)
    assert calls and torch.equal(ids, want)


def test_top_k_out_of_range_is_refused():
    logits = torch.randn(2, 300)
    for bad in (0, greedy.TOP_K_MAX + 1):
        with pytest.raises(ValueError, match="top_k"):
            _sample_top_k(logits, slot=0, seed=0, top_k=bad)
