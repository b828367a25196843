"""Programmatic dependent launch (PDL, Hopper sm_90 and later).

A kernel launched with PDL may start while the kernel before it in the stream is still running. It must call
`griddepcontrol.wait` (tl.extra.cuda.gdc_wait) before it reads what that kernel wrote; it may do work that
needs none of it before (a GEMV requests its weights). A kernel that calls `griddepcontrol.launch_dependents`
lets the next PDL kernel launch before it ends. Each kernel of the chain waits before finishing, so waiting for
the previous kernel also means every earlier one has finished.

fxopt's decode-step kernels form such a chain: the GEMVs, RoPE and the cache writes, Flash-Decoding's split
and merge kernels. FXOPT_PDL=0 turns it off.
"""

from __future__ import annotations

import functools

import torch

from fxopt import config

ENABLED = config.get("pdl")


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def hopper_or_later(device: torch.device) -> bool:
    """A CUDA GPU of compute capability 9.0 or later: PDL here, TMA loads in the attention kernels."""
    if device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def use_pdl(device: torch.device) -> bool:
    """Launch with PDL on this device: a CUDA GPU of sm_90 or later, not the interpreter, FXOPT_PDL != 0."""
    if not ENABLED or config.get("interpret"):
        return False
    return hopper_or_later(device)


def launch_options(pdl: bool) -> dict:
    """The Triton launch keyword for a PDL launch (none otherwise)."""
    return {"launch_pdl": True} if pdl else {}
