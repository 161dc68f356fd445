"""Morph-token quantizer: nearest-neighbour lookup in a learnable codebook (paper Section 3.1).

VQ-VAE codebook + commitment loss with a straight-through estimator; `CodeUsage` revives dead codes
from the current batch's encoder outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .code_usage import CodeUsage, perplexity


@dataclass
class QuantizerOutput:
    ids: Tensor  # [B, N] code indices (long)
    z_q: Tensor  # [B, N, dim] codebook vectors in value, gradient straight through to z
    loss: Tensor  # codebook + beta * commitment
    perplexity: Tensor  # exp(entropy) of this batch's code histogram
    usage: Tensor  # fraction of the codebook hit by this batch


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
        """`dead_code_threshold`, `usage_decay`: see `CodeUsage`."""
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.l2_normalize = l2_normalize
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.code_usage = CodeUsage(codebook_size, dead_code_threshold, usage_decay)

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
            self.code_usage.revive(self.embedding.weight, z_flat.detach())
        with torch.no_grad():
            ids = torch.cdist(z_flat.float(), self.codebook.float()).argmin(dim=-1)
        e = self.embed(ids).view_as(z)
        loss = F.mse_loss(e, z.detach()) + self.beta * F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()

        if self.training:
            counts = self.code_usage.update(ids)
        else:
            counts = torch.bincount(ids, minlength=self.codebook_size).float()
        return QuantizerOutput(
            ids=ids.view(z.shape[:-1]),
            z_q=z_q,
            loss=loss,
            perplexity=perplexity(counts / counts.sum()),
            usage=(counts > 0).float().mean(),
        )
