"""Shared oracles for the attention-kernel tests (CPU interpreter and tests/gpu): which keys each query may
see, unfused attention in the input dtype (the 'eager' error yardstick) and DESIGN.md's error rule."""

import torch

ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}


def allowed_mask(b, sq, skv, *, causal, key_padding_mask=None, q_offset=0, kv_len=None, device="cpu"):
    """(b, sq, skv) bool: which keys each query may see (built independently of the reference)."""
    allowed = torch.ones((b, sq, skv), dtype=torch.bool, device=device)
    cols = torch.arange(skv, device=device)
    if key_padding_mask is not None:
        allowed &= key_padding_mask.to(device)[:, None, :]
    if kv_len is not None:
        allowed &= (cols[None, :] < kv_len.to(device).reshape(-1, 1))[:, None, :]
    if causal:
        offs = q_offset if isinstance(q_offset, torch.Tensor) else torch.full((b,), q_offset)
        pos = offs.to(device).reshape(-1, 1) + torch.arange(sq, device=device)[None, :]
        allowed &= cols[None, None, :] <= pos[:, :, None]
    return allowed


def eager_attention(q, k, v, allowed, scale=None):
    """Unfused attention computed in the input dtype: the 'eager' error yardstick."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return p @ v


def assert_close_to_reference(out, ref64, eager, dtype, what=""):
    """out's max error vs the float64 reference <= 2x (3x for fp16/bf16) eager's error + a small floor."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), f"NaN in output {what}"
    err = (out.double() - ref64).abs().max().item()
    eager_err = (eager.double() - ref64).abs().max().item()
    factor = 2.0 if dtype == torch.float32 else 3.0
    bound = factor * eager_err + ATOL[dtype]
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (eager error {eager_err:.3g})"
