"""Morph-token encoder, Eq. (1): M = Quantizer(MLP(Qformer(V))) (paper Section 3.1, Appendix B).

The MLP is SEED's `encode_task_layer` (Linear, Tanh, Linear down to the code width), under SEED's name so
its tokenizer's weights load by key; the released Morph-Tokens code uses the same module. Without a
quantizer (the 'continuous' ablation, docs/ablations.md) the MLP's outputs are the tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from morph_lightning.modeling.encoder_weights import load_encoder_weights
from morph_lightning.modeling.qformer import DeconfoundedQFormer
from morph_lightning.modeling.quantizer import MorphQuantizer


@dataclass
class EncoderOutput:
    ids: Tensor  # [B, num_tokens] morph-token ids (long); continuous tokens: 0, their one placeholder id
    z_q: Tensor  # [B, num_tokens, code_dim] codebook vectors, gradient straight through to the encoder;
    # continuous tokens: the MLP's outputs themselves
    quant_loss: Tensor | None = None  # the quantizer's terms; None without a quantizer
    perplexity: Tensor | None = None
    usage: Tensor | None = None
    # [B, D] abstr-abstr (SD)'s regression target, its generator's condition embedding of each image, set
    # by `MorphModel.encode_images` for that row alone: the world's `VisionBackbone.pool` of the tokens the
    # encoder read (no extra pass), or the unCLIP pipeline's CLIP embedding
    image_embedding: Tensor | None = None


class MorphEncoder(nn.Module):
    def __init__(
        self, qformer: DeconfoundedQFormer, quantizer: MorphQuantizer | None, code_dim: int | None = None
    ) -> None:
        """`quantizer`: None for continuous tokens `code_dim` wide (else the quantizer's width)."""
        super().__init__()
        self.qformer = qformer
        dim = quantizer.dim if quantizer is not None else code_dim
        self.encode_task_layer = nn.Sequential(
            nn.Linear(qformer.dim, qformer.dim), nn.Tanh(), nn.Linear(qformer.dim, dim)
        )
        self.quantizer = quantizer

    @property
    def num_tokens(self) -> int:
        return self.qformer.num_queries

    @property
    def code_dim(self) -> int:
        return self.encode_task_layer[-1].out_features

    def forward(self, patch_tokens: Tensor) -> EncoderOutput:
        z = self.encode_task_layer(self.qformer(patch_tokens))
        if self.quantizer is None:
            return EncoderOutput(ids=z.new_zeros(z.shape[:-1], dtype=torch.long), z_q=z)
        q = self.quantizer(z)
        return EncoderOutput(ids=q.ids, z_q=q.z_q, quant_loss=q.loss, perplexity=q.perplexity, usage=q.usage)


def build_encoder(
    qformer: dict[str, Any],
    quantizer: dict[str, Any],
    vision_dim: int,
    vq_codebook: Tensor,
    init: str | None,
    quantize: bool = True,
) -> MorphEncoder:
    """The encoder of a config: the Q-former reads `vision_dim` tokens, its confounder dictionary starts
    as the VQGAN's codebook (Appendix B), and `init` (a BLIP-2 / SEED checkpoint) gives its first weights.
    `quantize=False`: continuous tokens as wide as the quantizer section's `dim`, no quantizer."""
    qf = DeconfoundedQFormer(
        **qformer, vision_dim=vision_dim, dict_size=vq_codebook.shape[0], dict_dim=vq_codebook.shape[1]
    )
    if qf.deconfound:
        qf.init_dictionary(vq_codebook.detach().float())
    encoder = MorphEncoder(qf, MorphQuantizer(**quantizer) if quantize else None, quantizer["dim"])
    if init:
        load_encoder_weights(encoder, init)
    return encoder
