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

    sample_top_k(logits, ids, history, slot, seed, top_k=k, top_p=p, inv_temperature=t)
        the same draw restricted to each row's top-k logits (and the nucleus among them) without a sort of the
        vocabulary or a filtered copy of it: chunk programs keep their k best (value, index) keys, merge
        programs narrow a large vocabulary's candidates, one program per row takes the row's k best, the
        nucleus, and the Gumbel-max draw with sample_pick's noise, so the token equals sample_pick's over the
        filtered logits.
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


# ---------------------------------------------------------------------------------------------------
# Top-k (and top-p among the k) sampling
# ---------------------------------------------------------------------------------------------------
# Eagerly a top-k / top-p draw is torch.topk over the vocabulary, a softmax and cumsum of the k values, a
# full-vocabulary -inf tensor the kept values are scattered into, and sample_pick over it: six launches and two
# vocabulary-sized passes. Here each chunk program keeps the best keys of one chunk of a row (a logit and its
# index packed in an int64 key, tl.topk); where the chunks leave more candidates than one program should take
# (a 128k vocabulary), merge programs narrow them, a tree of tl.topk; one program per row keeps the row's k
# best (and of those the nucleus) and draws among them with sample_pick's noise: for the same seed, position
# and row the same token as sample_pick over the filtered logits.

TOP_K_MAX = 128  # largest top_k drawn by these kernels (a chunk keeps next_power_of_2(k) keys)
TOP_K_BLOCK_V = 4096  # logits one chunk program takes
TOP_K_CHUNK_WARPS = 8
TOP_K_MERGE = 512  # candidate keys one merge program (and the final per-row program) takes at most

_NEG_INF_KEY = tl.constexpr(-2139095041 * 2**32)  # the key of (-inf, index 0x7FFFFFFF): below every real key


@triton.jit
def _pack_key(v, index):
    """int64 keys that order as (v, -index): the float's bits made order-preserving as an int32 (negative
    floats' magnitude bits flipped) in the high word, 0x7FFFFFFF - index in the low word, so that a descending
    sort puts the largest value first and, among equal values, the lowest index."""
    bits = v.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def _unpack_key(key):
    """(value fp32, index int32) of _pack_key's keys."""
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _top_k_chunks_kernel(logits_ptr, keys_ptr, vocab, stride_lr, inv_temperature, n_chunks, BLOCK_V: tl.constexpr,
                         K_PAD: tl.constexpr):
    """Program (row, c): the K_PAD best keys of logits[row, c * BLOCK_V : (c + 1) * BLOCK_V] * inv_temperature,
    descending (NaN and columns past the vocabulary count as -inf). tl.topk sorts blocks of K_PAD and merges
    them keeping the best K_PAD: about a third of the compare stages of sorting the chunk."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lane = tl.arange(0, BLOCK_V)
    cols = c * BLOCK_V + lane  # (BLOCK_V,)
    v = tl.load(logits_ptr + row * stride_lr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    v = v * inv_temperature
    v = tl.where(v == v, v, float("-inf"))
    keys = tl.topk(_pack_key(v, cols), K_PAD)  # (K_PAD,) descending
    tl.store(keys_ptr + (row * n_chunks + c) * K_PAD + tl.arange(0, K_PAD), keys)


@triton.jit
def _top_k_merge_kernel(keys_in_ptr, keys_out_ptr, n_in, n_groups, GROUP: tl.constexpr, K_PAD: tl.constexpr):
    """Program (row, g): the K_PAD best of keys_in[row, g * GROUP : (g + 1) * GROUP], descending: one level of
    the tree that narrows a row's candidates until one program can take them all."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    lane = g * GROUP + tl.arange(0, GROUP)
    keys = tl.load(keys_in_ptr + row * n_in + lane, mask=lane < n_in, other=_NEG_INF_KEY)
    tl.store(keys_out_ptr + (row * n_groups + g) * K_PAD + tl.arange(0, K_PAD), tl.topk(keys, K_PAD))


@triton.jit
def _top_k_rows_kernel(keys_ptr, ids_ptr, history_ptr, slot_ptr, seed_ptr, vocab, n_keys, top_k, top_p, stride_ir,
                       stride_hr, BLOCK_K: tl.constexpr, ROW_K: tl.constexpr, NUCLEUS: tl.constexpr):
    """One program per row: the row's logits >= its top_k-th largest among its chunks' keys; with NUCLEUS of those
    (best first, ties by index) the smallest prefix whose softmax mass reaches top_p (a token is kept while the
    mass before it is < top_p); then the Gumbel-max draw among the kept with sample_pick's noise, written to
    ids[row] and history[row, slot + 1] (index 0 when nothing is above -inf)."""
    row = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK_K)
    keys = tl.load(keys_ptr + row * n_keys + lane, mask=lane < n_keys, other=_NEG_INF_KEY)
    v, index = _unpack_key(tl.topk(keys, ROW_K))  # (ROW_K,) each, best first: room for ties at the k-th
    rank = tl.arange(0, ROW_K)
    kth = tl.max(tl.where(rank == top_k - 1, v, float("-inf")), axis=0)  # -inf when fewer than top_k are finite
    kept = (v >= kth) & (v > float("-inf"))  # ties at the k-th kept, as HF's top-k warper
    if NUCLEUS:
        top = tl.max(tl.where(kept, v, float("-inf")), axis=0)
        p = tl.where(kept, tl.exp(v - top), 0.0)
        p = p / tl.sum(p, axis=0)
        kept = kept & (tl.cumsum(p, axis=0) - p < top_p)
    slot = tl.load(slot_ptr).to(tl.int64)
    key = tl.load(seed_ptr).to(tl.int64) * SEED_STRIDE + (slot + 1) * MAX_ROWS + row  # sample_pick's Philox key
    g = tl.where(kept, v - tl.log(-tl.log(tl.rand(key, index))), float("-inf"))
    best = tl.max(g, axis=0)
    pick = tl.min(tl.where(kept & (g == best), index, vocab), axis=0)
    pick = tl.where(pick == vocab, 0, pick)
    tl.store(ids_ptr + row * stride_ir, pick.to(ids_ptr.dtype.element_ty))
    tl.store(history_ptr + row * stride_hr + slot + 1, pick.to(history_ptr.dtype.element_ty))


def sample_top_k(logits: torch.Tensor, ids: torch.Tensor, history: torch.Tensor, slot: torch.Tensor,
                 seed: torch.Tensor, *, top_k: int, top_p: float | None = None, inv_temperature: float = 1.0) -> None:
    """sample_pick restricted to each row's logits * inv_temperature that are >= its top_k-th largest, and with
    top_p < 1 to the nucleus among them (taken best first, ties by index); 1 <= top_k <= TOP_K_MAX. Ties at the
    k-th are kept, as HF's top-k warper, while those tokens number at most 2 * K_PAD in the row and K_PAD in a
    chunk or merge group, K_PAD = max(16, next_power_of_2(top_k)); past that the lowest indices among the tied.
    Rows with nothing above -inf draw 0."""
    rows, vocab = logits.shape
    if not 1 <= top_k <= TOP_K_MAX:
        raise ValueError(f"sample_top_k: top_k must be in [1, {TOP_K_MAX}], got {top_k}")
    if rows > MAX_ROWS.value:
        raise ValueError(f"sample_top_k: {rows} rows > {MAX_ROWS.value}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = min(TOP_K_BLOCK_V, triton.next_power_of_2(vocab))
    k_pad = min(block, max(16, triton.next_power_of_2(top_k)))
    n_chunks = triton.cdiv(vocab, block)
    n_keys = n_chunks * k_pad
    keys = torch.empty(rows, n_keys, dtype=torch.int64, device=logits.device)
    _top_k_chunks_kernel[(rows, n_chunks)](logits, keys, vocab, logits.stride(0), float(inv_temperature), n_chunks,
                                           BLOCK_V=block, K_PAD=k_pad, num_warps=TOP_K_CHUNK_WARPS)
    group = max(TOP_K_MERGE, 2 * k_pad)
    while n_keys > group:  # e.g. 128256 logits, k 50: 32 chunks x 64 keys -> 4 groups x 64 -> the row's 256
        n_groups = triton.cdiv(n_keys, group)
        merged = torch.empty(rows, n_groups * k_pad, dtype=torch.int64, device=logits.device)
        _top_k_merge_kernel[(rows, n_groups)](keys, merged, n_keys, n_groups, GROUP=group, K_PAD=k_pad,
                                              num_warps=4)
        keys, n_keys = merged, n_groups * k_pad
    block_k = max(16, triton.next_power_of_2(n_keys))
    nucleus = top_p is not None and top_p < 1.0
    _top_k_rows_kernel[(rows,)](keys, ids, history, slot, seed, vocab, n_keys, top_k,
                                float(top_p) if nucleus else 1.0, ids.stride(0), history.stride(0), BLOCK_K=block_k,
                                ROW_K=min(block_k, 2 * k_pad), NUCLEUS=nucleus,
                                num_warps=min(16, max(1, block_k // 512)))
