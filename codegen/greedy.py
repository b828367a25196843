"""Greedy pick for a CUDA-graphed decode step: each row's next token, fed back and recorded, in two kernels.

    greedy_pick(logits, ids, history, slot)
        logits (rows, vocab) -> ids[r, 0] = argmax(logits[r]) and history[r, slot + 1] = ids[r, 0]
        (history[:, p] holds the token picked for position p; slot is the 0-dim position just fed).

Eagerly this is argmax, a copy into the next step's input and an index_copy_ into the history: PyTorch
runs the argmax of one 32000-logit row as a single-block reduction of about 10 us, and each of the others
as its own launch (H200 profile of llama-1b-like decode, 2026-11-21). Here a row's vocabulary is split
into chunks, one program each (the row was just written by the lm_head, so it comes from L2): each keeps
the best value and index per lane and reduces once; then one small program per row reduces the chunks'
results and writes the pick.

Ties go to the lowest index, as torch.argmax. NaN logits are never picked (torch.argmax would return the
first NaN); a row of all NaN gives index 0.

    sample_pick(logits, ids, history, slot, seed, inv_temperature)
        the same with a sampled token: the argmax of logits * inv_temperature + Gumbel noise (the Gumbel-max
        trick: a draw from softmax(logits * inv_temperature); -inf logits, e.g. outside top-k / top-p, are never
        drawn). The noise is Philox (tl.rand) keyed by the 0-dim device `seed`, the position and the row, so
        the draw needs no generator state: a CUDA graph replays it, and a seed gives the same tokens on every
        run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # logits a program reads per loop step
CHUNK_BLOCKS = 1  # loop steps per program: a row's vocabulary is split over ceil(vocab / (BLOCK_V * CHUNK_BLOCKS))
MAX_CHUNKS = 256  # programs per row at most (then each program takes more blocks)
NUM_WARPS = 8

SEED_STRIDE = tl.constexpr(1_000_003)  # Philox keys: seed * SEED_STRIDE + position * MAX_ROWS + row
MAX_ROWS = tl.constexpr(4096)


@triton.jit
def _pick_chunks_kernel(logits_ptr, slot_ptr, seed_ptr, best_ptr, best_at_ptr, vocab, stride_lr, chunk, n_chunks,
                        inv_temperature, BLOCK_V: tl.constexpr, SAMPLE: tl.constexpr):
    """Program (row, c): the max of the row's logits (plus Gumbel noise when SAMPLE) over columns
    [c * chunk, (c + 1) * chunk) and the lowest index holding it (vocab when nothing is above -inf)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    best = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    best_at = tl.full((BLOCK_V,), vocab, dtype=tl.int32)
    if SAMPLE:
        position = tl.load(slot_ptr).to(tl.int64) + 1  # the position whose token this draw picks
        key = tl.load(seed_ptr).to(tl.int64) * SEED_STRIDE + position * MAX_ROWS + row
    lo = c * chunk
    for start in range(lo, lo + chunk, BLOCK_V):
        v = tl.load(logits_ptr + row * stride_lr + start + cols, mask=start + cols < vocab,
                    other=float("-inf")).to(tl.float32)
        if SAMPLE:
            u = tl.rand(key, start + cols)  # uniform [0, 1)
            v = v * inv_temperature - tl.log(-tl.log(u))  # + Gumbel noise; -inf stays -inf
        better = v > best  # strict: a lane keeps its first occurrence; NaN is never better
        best = tl.where(better, v, best)
        best_at = tl.where(better, start + cols, best_at)
    top = tl.max(best, axis=0)
    tl.store(best_ptr + row * n_chunks + c, top)
    tl.store(best_at_ptr + row * n_chunks + c, tl.min(tl.where(best == top, best_at, vocab), axis=0))


@triton.jit
def _pick_rows_kernel(best_ptr, best_at_ptr, ids_ptr, history_ptr, slot_ptr, vocab, n_chunks, stride_ir, stride_hr,
                      BLOCK_C: tl.constexpr):
    """One program per row: the chunk maxima's max, its lowest index (0 when no logit is above -inf), written
    to ids[row] and history[row, slot + 1]."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    best = tl.load(best_ptr + row * n_chunks + c, mask=c < n_chunks, other=float("-inf"))
    best_at = tl.load(best_at_ptr + row * n_chunks + c, mask=c < n_chunks, other=vocab)
    top = tl.max(best, axis=0)
    pick = tl.min(tl.where(best == top, best_at, vocab), axis=0)  # the lowest index holding the max
    pick = tl.where(pick == vocab, 0, pick)  # nothing above -inf (all NaN or -inf): index 0
    tl.store(ids_ptr + row * stride_ir, pick.to(ids_ptr.dtype.element_ty))
    slot = tl.load(slot_ptr).to(tl.int64)
    tl.store(history_ptr + row * stride_hr + slot + 1, pick.to(history_ptr.dtype.element_ty))


def greedy_pick_reference(logits: torch.Tensor, ids: torch.Tensor, history: torch.Tensor, slot: torch.Tensor
                          ) -> None:
    """The eager ops: argmax, the copy into ids, the index_copy_ into history."""
    picked = logits.argmax(dim=-1)  # (rows,)
    ids.copy_(picked[:, None])
    history.index_copy_(1, (slot + 1).reshape(1), picked[:, None])


def greedy_pick(logits: torch.Tensor, ids: torch.Tensor, history: torch.Tensor, slot: torch.Tensor) -> None:
    """One launch of the kernel (logits (rows, vocab) with unit stride along the vocabulary)."""
    if logits.stride(1) != 1 or ids.stride(1) != 1 or history.stride(1) != 1:
        greedy_pick_reference(logits, ids, history, slot)
        return
    _launch(logits, ids, history, slot, slot, 1.0, sample=False)


def sample_pick(logits: torch.Tensor, ids: torch.Tensor, history: torch.Tensor, slot: torch.Tensor,
                seed: torch.Tensor, inv_temperature: float = 1.0) -> None:
    """A token drawn from softmax(logits * inv_temperature) per row, fed back and recorded as greedy_pick's;
    `seed` a 0-dim int64 device tensor. Logits of any row stride; the vocabulary contiguous."""
    if logits.shape[0] > MAX_ROWS.value:
        raise ValueError(f"sample_pick: {logits.shape[0]} rows > {MAX_ROWS.value}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    _launch(logits, ids, history, slot, seed, float(inv_temperature), sample=True)


def _launch(logits, ids, history, slot, seed, inv_temperature, *, sample):
    """The chunk kernel over (rows, chunks) programs, so that a row's vocabulary streams through many SMs (one
    program per row left most of the GPU idle at batch 1), then the row kernel."""
    rows, vocab = logits.shape
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    chunk = block * max(CHUNK_BLOCKS, triton.cdiv(triton.cdiv(vocab, block), MAX_CHUNKS))
    n_chunks = triton.cdiv(vocab, chunk)
    best = torch.empty(rows, n_chunks, dtype=torch.float32, device=logits.device)
    best_at = torch.empty(rows, n_chunks, dtype=torch.int32, device=logits.device)
    _pick_chunks_kernel[(rows, n_chunks)](logits, slot, seed, best, best_at, vocab, logits.stride(0), chunk,
                                          n_chunks, inv_temperature, BLOCK_V=block, SAMPLE=sample,
                                          num_warps=NUM_WARPS)
    _pick_rows_kernel[(rows,)](best, best_at, ids, history, slot, vocab, n_chunks, ids.stride(0),
                               history.stride(0), BLOCK_C=max(16, triton.next_power_of_2(n_chunks)), num_warps=1)
