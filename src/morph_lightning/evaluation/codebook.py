"""Codebook health: how much of the morph codebook an encoder uses on a set of images.

A collapsed codebook (a few codes for every image) is how a failing encoder shows first: the LLM then
receives nearly the same tokens for every image. The fraction of codes in use and the perplexity of
the code histogram over a fixed set of images make that visible per stage.
"""

from __future__ import annotations

import torch
from torch import Tensor

from morph_lightning.modeling.code_usage import perplexity
from morph_lightning.modeling.model import MorphModel


@torch.no_grad()
def codebook_health(model: MorphModel, vision_pixels: Tensor, batch_size: int = 64) -> dict[str, float]:
    """Over `vision_pixels` [N, 3, S, S] (normalised for the vision tower): the fraction of the codebook's
    codes that any image's morph tokens use, and the perplexity of their histogram (1: one code for
    everything; the codebook size: all codes equally often)."""
    if len(vision_pixels) == 0:
        raise ValueError("codebook_health: no images")
    if getattr(model.encoder, "quantizer", None) is None:
        raise ValueError(f"codebook_health: pre_mllm: {model.pre_mllm} has no morph codebook to measure")
    device = next(model.parameters()).device
    ids = [
        model.encode_images(vision_pixels[i : i + batch_size].to(device)).ids.flatten()
        for i in range(0, len(vision_pixels), batch_size)
    ]
    counts = torch.bincount(torch.cat(ids), minlength=model.encoder.quantizer.codebook_size).float()
    return {
        "codes_used": round(float((counts > 0).float().mean()), 4),
        "perplexity": round(float(perplexity(counts / counts.sum())), 2),
    }
