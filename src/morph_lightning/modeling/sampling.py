"""Logit filtering and next-token sampling for autoregressive decoding of VQGAN codes."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set the logits outside the top-k / nucleus (top-p) set to -inf.

    logits: [..., V]. top_k keeps the k largest entries (exactly k, ties broken by ``torch.topk``).
    top_p keeps the smallest set of most likely entries whose probability mass is >= top_p; the top-1
    entry is always kept. When both are given, top-k is applied first and top-p acts on what remains.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)
        # Scatter rather than threshold at the k-th value so that ties cannot keep more than k entries.
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:  # top_p == 1 keeps everything; skipping it avoids rounding dropping tiny tails
            sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.float().softmax(dim=-1)
            # Mass strictly before each entry: an entry is needed while that mass is still below top_p.
            mass_before = probs.cumsum(dim=-1) - probs
            remove_sorted = mass_before >= top_p
            remove_sorted[..., 0] = False
            remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
            logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from logits [B, V]; returns a LongTensor [B].

    temperature == 0 means greedy argmax (top-k / top-p cannot change the argmax, so they are ignored).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Sample in float32: bf16 softmax over a 16k vocabulary loses the tail of the distribution.
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
