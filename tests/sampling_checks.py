"""The reference filter of codegen/greedy.py's sample_top_k, shared by its interpreter and GPU tests."""

import torch


def top_k_reference(logits, top_k, top_p, inv_temperature):
    """HF's top-k warper (logits >= the k-th largest, ties kept) then the nucleus among those, best first and
    ties by index: the filtered fp32 logits sample_top_k should draw from, computed with torch.sort."""
    v = logits.float() * inv_temperature
    v = v.masked_fill(v.isnan(), float("-inf"))
    kth = torch.sort(v, dim=-1, descending=True).values[:, top_k - 1:top_k]
    keep = (v >= kth) & (v > float("-inf"))
    if top_p is not None:
        ranked, order = torch.sort(v.masked_fill(~keep, float("-inf")), dim=-1, descending=True, stable=True)
        probs = torch.softmax(ranked, dim=-1)
        in_nucleus = (torch.cumsum(probs, dim=-1) - probs < top_p) & (ranked > float("-inf"))
        keep = torch.zeros_like(keep).scatter(-1, order, in_nucleus)
    return v.masked_fill(~keep, float("-inf"))
