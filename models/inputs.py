"""Random example inputs shared by the model families' ``example_inputs`` methods.

Inputs are drawn on the CPU from a private, seeded generator (the global RNG is untouched)
and then moved, so the same seed gives the same tokens on every device, the meta device
included.
"""

from __future__ import annotations

import torch


def random_token_ids(
    batch: int, seq: int, vocab_size: int, *, seed: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """(batch, seq) int64 token ids drawn uniformly from [0, vocab_size), never all equal."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)  # (b, s)
    if ids.numel() > 1 and bool((ids == ids.flatten()[0]).all()):
        ids[..., -1] = (ids[..., -1] + 1) % vocab_size
    return ids.to(device)


def padding_mask(batch: int, seq: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, seq) int64 attention mask of 1 (token) / 0 (padding), right-padded.

    Row 0 is fully valid; row i > 0 ends in ``min(2 * i, seq // 2)`` padding positions, so
    every row keeps at least half its tokens and no row is all padding.
    """
    mask = torch.ones(batch, seq, dtype=torch.long)  # (b, s)
    for i in range(1, batch):
        n_pad = min(2 * i, seq // 2)
        if n_pad:
            mask[i, seq - n_pad :] = 0
    return mask.to(device)
