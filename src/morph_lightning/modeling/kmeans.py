"""k-means with k-means++ seeding, to start a codebook from the latents it will quantize.

Written here because torch has no k-means and the usual one (scikit-learn) is not a dependency; a
codebook needs only a few Lloyd iterations on a few thousand vectors, on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def kmeans_plus_plus(
    x: Tensor, k: int, iterations: int = 10, generator: torch.Generator | None = None
) -> Tensor:
    """[N, D] points -> [k, D] centres: k-means++ seeding (each next centre drawn with probability
    proportional to its squared distance from the nearest centre so far), then Lloyd iterations. A centre
    left without points keeps its place. Needs N >= k."""
    if x.ndim != 2 or x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points of shape [N, D], got {tuple(x.shape)}")
    x = x.float()
    first = torch.randint(x.shape[0], (1,), generator=generator, device=x.device)
    centres = [x[first]]
    nearest = torch.cdist(x, centres[0]).squeeze(1).square()
    for _ in range(1, k):
        pick = torch.multinomial(nearest + 1e-12, 1, generator=generator)
        centres.append(x[pick])
        nearest = torch.minimum(nearest, torch.cdist(x, centres[-1]).squeeze(1).square())
    c = torch.cat(centres)
    for _ in range(iterations):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c
