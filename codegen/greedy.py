"""Greedy pick for a CUDA-graphed decode step: each row's next token, fed back and recorded, in one kernel.

    greedy_pick(logits, ids, history, slot)
        logits (rows, vocab) -> ids[r, 0] = argmax(logits[r]) and history[r, slot + 1] = ids[r, 0]
        (history[:, p] holds the token picked for position p; slot is the 0-dim position just fed).

Eagerly this is argmax, a copy into the next step's input and an index_copy_ into the history: PyTorch
runs the argmax of one 32000-logit row as a single-block reduction of about 10 us, and each of the others
as its own launch (H200 profile of llama-1b-like decode, 2026-11-21). One program per row here: it streams
the row (just written by the lm_head, so from L2) in BLOCK_V chunks, keeping the best value and index per
lane, and reduces once.

Ties go to the lowest index, as torch.argmax. NaN logits are never picked (torch.argmax would return the
first NaN); a row of all NaN gives index 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # logits per chunk
NUM_WARPS = 8


@triton.jit
def _greedy_pick_kernel(logits_ptr, ids_ptr, history_ptr, slot_ptr, vocab, stride_lr, stride_ir, stride_hr,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    best = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    best_at = tl.zeros((BLOCK_V,), dtype=tl.int32)
    for start in range(0, vocab, BLOCK_V):
        v = tl.load(logits_ptr + row * stride_lr + start + cols, mask=start + cols < vocab,
                    other=float("-inf")).to(tl.float32)
        better = v > best  # strict: a lane keeps its first occurrence
        best = tl.where(better, v, best)
        best_at = tl.where(better, start + cols, best_at)
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
    rows, vocab = logits.shape
    if logits.stride(1) != 1 or ids.stride(1) != 1 or history.stride(1) != 1:
        greedy_pick_reference(logits, ids, history, slot)
        return
    _greedy_pick_kernel[(rows,)](logits, ids, history, slot, vocab, logits.stride(0), ids.stride(0),
                                 history.stride(0), BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)),
                                 num_warps=NUM_WARPS)
