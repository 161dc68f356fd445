"""abstr-abstr (SD) at paper scale: an unCLIP Stable Diffusion through diffusers, as SEED-LLaMA's generator.

The row regresses one condition vector from M̂ (`MorphModel.decoder_input`). Here that vector lives in the
pipeline's CLIP image-embedding space: the MSE target is the pipeline's own image encoder's embedding of
the target image (`embed`), and drawing hands the regressed vector to the pipeline as `image_embeds`
with an empty prompt (`draw`). The pipeline is frozen and kept out of checkpoints like every frozen tower.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from morph_lightning.modeling.vision import channel_stats


class UnCLIPGenerator(nn.Module):
    # The pipeline's torch modules (its tokenizer, feature extractor and schedulers hold no weights).
    NETWORKS = ("image_encoder", "image_normalizer", "text_encoder", "unet", "vae")

    def __init__(
        self, path: str, num_inference_steps: int = 20, guidance_scale: float = 10.0, noise_level: int = 0
    ) -> None:
        """`path`: a saved `StableUnCLIPImg2ImgPipeline` (e.g. stabilityai/stable-diffusion-2-1-unclip
        downloaded beforehand). The sampling options are the pipeline's own defaults."""
        super().__init__()
        from diffusers import StableUnCLIPImg2ImgPipeline  # here: importing diffusers takes seconds

        if not Path(path).is_dir():
            raise ValueError(
                f"model.generator_pipeline: {path} is not a saved diffusers unCLIP pipeline folder"
            )
        self.pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(path)
        self.pipe.set_progress_bar_config(disable=True)
        # Registered here so that moving or casting the model moves the pipeline's networks with it.
        self.networks = nn.ModuleDict({name: getattr(self.pipe, name) for name in self.NETWORKS})
        self.requires_grad_(False).eval()
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.noise_level = noise_level

    @property
    def condition_dim(self) -> int:
        return self.pipe.image_encoder.config.projection_dim

    def embed(self, pixels: Tensor) -> Tensor:
        """Images [N, 3, S, S] in [0, 1] -> the pipeline's CLIP image embeddings [N, D] (its image encoder on
        its own size and normalisation: the space its UNet was conditioned on)."""
        size = self.pipe.image_encoder.config.image_size
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        processor, encoder = self.pipe.feature_extractor, self.pipe.image_encoder
        mean, std = channel_stats(processor.image_mean, processor.image_std, pixels.device)
        x = ((pixels.float() - mean) / std).to(encoder.dtype)
        return encoder(pixel_values=x).image_embeds

    @torch.no_grad()
    def draw(self, condition: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
        """Condition vectors [K, 1, D] -> images [K, 3, size, size] in [-1, 1], sampled by the pipeline."""
        embeds = condition.squeeze(1).to(self.pipe.unet.dtype)
        images = self.pipe(
            prompt=[""] * len(embeds),
            image_embeds=embeds,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            noise_level=self.noise_level,
            generator=generator,
            output_type="pt",
        ).images
        if images.shape[-1] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
        return (images * 2 - 1).clamp(-1, 1)
