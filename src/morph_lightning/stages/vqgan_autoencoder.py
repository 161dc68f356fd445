"""Training the VQGAN tokenizer as an autoencoder (L1 reconstruction plus codebook loss)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from morph_lightning.modeling.code_usage import CodeUsage
from morph_lightning.modeling.kmeans import kmeans_plus_plus
from morph_lightning.modeling.vqgan import VQGAN
from morph_lightning.stages.schedule import warmup_cosine


# No discriminator (and no perceptual loss) yet: only the autoencoder part of taming's objective.
class VQGANAutoencoder(L.LightningModule):
    """Trains a :class:`VQGAN` on batches whose ``"vqgan_pixels"`` hold [-1, 1] images."""

    def __init__(
        self,
        vqgan: dict[str, Any] | None = None,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        export_path: str | None = None,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
        l2_weight: float = 0.0,
        autoencoder_steps: int = 0,
        kmeans_batches: int = 20,
        foreground_weight: float = 1.0,
    ) -> None:
        """`export_path`: where to write the trained VQGAN in taming's layout when training ends, for
        `model.vqgan_checkpoint` of the stage configs. The lr warms up over `warmup_steps`, then follows
        a cosine down to `min_lr_ratio` of itself (1.0: constant, as taming). `dead_code_threshold` > 0
        revives codes that went unused (see `CodeUsage`); 0 keeps taming's plain codebook. `l2_weight`
        adds MSE to the L1 reconstruction loss: on images that are mostly flat background, L1 alone
        settles on the background's colour for a long while before it draws the objects.

        A recipe for small codebooks that would otherwise spend their codes on the background:
        `autoencoder_steps` > 0 first trains without the quantizer (a plain autoencoder), gathering the
        latents of its last `kmeans_batches` batches, and starts the codebook from their k-means++
        centres, so every code begins where latents are; `foreground_weight` > 1 weighs the error on the
        latent cells that hold foreground (`foreground_cells`) that much more than on the background."""
        super().__init__()
        self.save_hyperparameters()
        self.vqgan = VQGAN(**(vqgan or {}))
        self.code_usage = CodeUsage(
            self.vqgan.quantize.embedding.num_embeddings, dead_code_threshold, usage_decay
        )
        # The k-means sample; not saved: a run resumed mid-collection clusters what it gathered since.
        self._kmeans_sample: list[Tensor] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        h = self.hparams
        pixels = batch["vqgan_pixels"]
        quantize = self.global_step >= h.autoencoder_steps
        if not quantize and self.global_step >= h.autoencoder_steps - h.kmeans_batches:
            with torch.no_grad():
                self._kmeans_sample.append(self.vqgan.latents(pixels).permute(0, 2, 3, 1).flatten(0, 2))
        if quantize and self._kmeans_sample:
            self._init_codebook(torch.cat(self._kmeans_sample))
        weight = None
        if h.foreground_weight != 1.0:
            cells = foreground_cells(pixels, pixels.shape[-1] // self.vqgan.latent_size)
            weight = 1.0 + (h.foreground_weight - 1.0) * cells
        losses = self.vqgan.reconstruction_loss(pixels, self.code_usage, h.l2_weight, weight, quantize)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(pixels))
        if batch_idx % self.trainer.log_every_n_steps == 0:  # stats() reads the EMA back to the host
            for name, value in self.code_usage.stats().items():
                self.log(f"train/code_{name}", value, batch_size=len(pixels))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        pixels = batch["vqgan_pixels"]
        self.log(
            "val/rec", self.vqgan.reconstruction_loss(pixels)["rec"], prog_bar=True, batch_size=len(pixels)
        )

    @torch.no_grad()
    def _init_codebook(self, latents: Tensor) -> None:
        codebook = self.vqgan.codebook
        if latents.shape[0] < codebook.shape[0]:  # a run resumed just before the switch: keep the codebook
            self._kmeans_sample.clear()
            return
        codebook.copy_(kmeans_plus_plus(latents, codebook.shape[0]).to(codebook.dtype))
        self.code_usage.usage_ema.fill_(1.0 / codebook.shape[0])
        self._kmeans_sample.clear()

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        opt = torch.optim.Adam(self.vqgan.parameters(), lr=h.lr, betas=tuple(h.betas))
        return warmup_cosine(opt, self.trainer, h.warmup_steps, h.min_lr_ratio)

    def export(self, path: str | Path) -> None:
        """The weights under taming's keys (no `vqgan.` prefix), as taming's `last.ckpt` holds them."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in self.vqgan.state_dict().items()}}, path)

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.export(self.hparams.export_path)


def foreground_cells(images: Tensor, cell: int, threshold: float = 0.25) -> Tensor:
    """[B, 3, R, R] images in [-1, 1] -> [B, 1, R, R] mask, 1 on every `cell` x `cell` block (a latent's
    footprint) holding a pixel further than `threshold` (any channel) from the image's median colour:
    the background, on images that are mostly background."""
    background = images.flatten(2).median(dim=2).values[:, :, None, None]
    far = (images - background).abs().amax(dim=1, keepdim=True) > threshold
    blocks = F.max_pool2d(far.float(), cell)
    return F.interpolate(blocks, scale_factor=cell, mode="nearest")
