"""Codebook health for vector quantizers: an EMA of how often each code is picked, and dead-code revival.

Shared by the morph-token quantizer and VQGAN training. Both start from a tiny random codebook, where a
few codes win every lookup early on and the rest never move again (codebook collapse); replacing a code
that has gone unused with an encoder output from the current batch is the usual cure (Dhariwal et al.
2020, Jukebox; Zeghidour et al. 2021, SoundStream). Kept outside the quantizers' own modules so the
VQGAN's state dict stays in taming's layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def perplexity(probs: Tensor) -> Tensor:
    """exp(entropy) of a distribution over codes: 1 when one code takes everything, K when uniform."""
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class CodeUsage(nn.Module):
    def __init__(
        self, codebook_size: int, dead_code_threshold: float = 1e-3, usage_decay: float = 0.99
    ) -> None:
        """`dead_code_threshold` is relative to the uniform share 1/codebook_size, so it does not depend on
        batch or codebook size: a code is dead when its EMA share < threshold / codebook_size. Codes start
        at the uniform share, so with the defaults a never-hit code is revived after ~690 steps.
        """
        super().__init__()
        self.codebook_size = codebook_size
        self.dead_code_threshold = dead_code_threshold
        self.usage_decay = usage_decay
        self.register_buffer("usage_ema", torch.full((codebook_size,), 1.0 / codebook_size))
        self.register_buffer("num_reinitialized", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, ids: Tensor) -> Tensor:
        """Adds one batch of picked code ids (any shape) to the EMA; returns this batch's counts [K]."""
        counts = torch.bincount(ids.flatten(), minlength=self.codebook_size).float()
        summed = counts
        if _distributed():
            summed = counts.clone()
            dist.all_reduce(summed)  # every rank keeps the same EMA, so all agree on which codes are dead
        self.usage_ema.mul_(self.usage_decay).add_(summed / summed.sum(), alpha=1.0 - self.usage_decay)
        return counts

    @torch.no_grad()
    def revive(self, codebook: Tensor, z_flat: Tensor) -> Tensor:
        """Overwrite the rows of `codebook` [K, dim] whose EMA share is below threshold with random rows
        of z_flat [M, dim]; returns how many (a tensor).

        Sync-free, since it runs every training step: a candidate row is drawn (with torch's RNG) for
        every code and kept only where the code is dead, so the step never waits to learn how many
        died. Revived codes restart at the uniform share, a grace period.
        """
        dead = self.usage_ema * self.codebook_size < self.dead_code_threshold
        idx = torch.randint(z_flat.size(0), (self.codebook_size,), device=z_flat.device)
        new = z_flat[idx].to(codebook.dtype)
        if _distributed():
            dist.broadcast(new, src=0)  # parameters must stay identical across ranks
        codebook.copy_(torch.where(dead.unsqueeze(1), new, codebook))
        self.usage_ema.masked_fill_(dead, 1.0 / self.codebook_size)
        n = dead.sum()
        self.num_reinitialized += n
        return n

    def stats(self) -> dict[str, float]:
        """Perplexity of the EMA shares, fraction of codes not dead, and revivals so far."""
        share = self.usage_ema / self.usage_ema.sum()
        alive = self.usage_ema * self.codebook_size >= self.dead_code_threshold
        return {
            "perplexity": float(perplexity(share)),
            "usage": float(alive.float().mean()),
            "num_reinitialized": float(self.num_reinitialized),
        }
