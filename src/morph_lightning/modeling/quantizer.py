"""Morph-token quantizer: nearest-neighbour lookup in a learnable codebook (paper Section 3.1).

VQ-VAE codebook + commitment loss with a straight-through estimator, plus an EMA of code usage that
drives dead-code re-initialisation from the current batch's encoder outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    ids: Tensor  # [B, N] code indices (long)
    z_q: Tensor  # [B, N, dim] codebook vectors in value, gradient straight through to z
    loss: Tensor  # codebook + beta * commitment
    perplexity: Tensor  # exp(entropy) of this batch's code histogram
    usage: Tensor  # fraction of the codebook hit by this batch


def _perplexity(probs: Tensor) -> Tensor:
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class MorphQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int = 8192,
        dim: int = 32,
        beta: float = 0.25,
        dead_code_threshold: float = 1e-3,
        usage_decay: float = 0.99,
        l2_normalize: bool = False,
    ) -> None:
        """`dead_code_threshold` is relative to the uniform share 1/codebook_size, so it does not depend on
        batch or codebook size: a code is dead when its EMA share < threshold / codebook_size. Codes start
        at the uniform share, so with the defaults a never-hit code is re-initialised after ~690 steps.
        """
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.dead_code_threshold = dead_code_threshold
        self.usage_decay = usage_decay
        self.l2_normalize = l2_normalize
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("usage_ema", torch.full((codebook_size,), 1.0 / codebook_size))
        self.register_buffer("num_reinitialized", torch.zeros((), dtype=torch.long))

    @property
    def codebook(self) -> Tensor:
        """The vectors quantisation snaps to, [codebook_size, dim] (unit-normalised if l2_normalize)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def embed(self, ids: Tensor) -> Tensor:
        """Codebook vectors for ids [...] -> [..., dim]."""
        e = self.embedding(ids)
        return F.normalize(e, dim=-1) if self.l2_normalize else e

    def forward(self, z: Tensor) -> QuantizerOutput:
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        z_flat = z.reshape(-1, self.dim)
        if self.training:
            # Before the lookup, so revived codes can be picked in this very step.
            self.reinit_dead_codes(z_flat.detach())
        with torch.no_grad():
            ids = torch.cdist(z_flat.float(), self.codebook.float()).argmin(dim=-1)
        e = self.embed(ids).view_as(z)
        loss = F.mse_loss(e, z.detach()) + self.beta * F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()

        counts = torch.bincount(ids, minlength=self.codebook_size).float()
        if self.training:
            self._update_usage(counts)
        return QuantizerOutput(
            ids=ids.view(z.shape[:-1]),
            z_q=z_q,
            loss=loss,
            perplexity=_perplexity(counts / counts.sum()),
            usage=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _update_usage(self, counts: Tensor) -> None:
        if _distributed():
            counts = counts.clone()
            dist.all_reduce(counts)  # every rank keeps the same EMA, so all agree on which codes are dead
        self.usage_ema.mul_(self.usage_decay).add_(counts / counts.sum(), alpha=1.0 - self.usage_decay)

    @torch.no_grad()
    def reinit_dead_codes(self, z_flat: Tensor) -> Tensor:
        """Replace codes whose EMA share is below threshold with random rows of z_flat [M, dim].

        Sync-free, since it runs every training step: a candidate row is drawn (with torch's RNG) for
        every code and kept only where the code is dead, so the step never waits to learn how many
        died. Revived codes restart at the uniform share, a grace period. Returns how many (a tensor).
        """
        dead = self.usage_ema * self.codebook_size < self.dead_code_threshold
        idx = torch.randint(z_flat.size(0), (self.codebook_size,), device=z_flat.device)
        new = z_flat[idx].to(self.embedding.weight.dtype)
        if _distributed():
            dist.broadcast(new, src=0)  # parameters must stay identical across ranks
        self.embedding.weight.copy_(torch.where(dead.unsqueeze(1), new, self.embedding.weight))
        self.usage_ema.masked_fill_(dead, 1.0 / self.codebook_size)
        n = dead.sum()
        self.num_reinitialized += n
        return n

    def usage_stats(self) -> dict[str, float]:
        """Codebook health from the usage EMA: perplexity and fraction of codes not dead."""
        share = self.usage_ema / self.usage_ema.sum()
        alive = self.usage_ema * self.codebook_size >= self.dead_code_threshold
        return {
            "perplexity": float(_perplexity(share)),
            "usage": float(alive.float().mean()),
            "num_reinitialized": float(self.num_reinitialized),
        }
