"""Training the VQGAN tokenizer as an autoencoder (L1 reconstruction plus codebook loss)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from morph_lightning.modeling.code_usage import CodeUsage
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
    ) -> None:
        """`export_path`: where to write the trained VQGAN in taming's layout when training ends, for
        `model.vqgan_checkpoint` of the stage configs. The lr warms up over `warmup_steps`, then follows
        a cosine down to `min_lr_ratio` of itself (1.0: constant, as taming). `dead_code_threshold` > 0
        revives codes that went unused (see `CodeUsage`); 0 keeps taming's plain codebook. `l2_weight`
        adds MSE to the L1 reconstruction loss: on images that are mostly flat background, L1 alone
        settles on the background's colour for a long while before it draws the objects."""
        super().__init__()
        self.save_hyperparameters()
        self.vqgan = VQGAN(**(vqgan or {}))
        self.code_usage = CodeUsage(
            self.vqgan.quantize.embedding.num_embeddings, dead_code_threshold, usage_decay
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        pixels = batch["vqgan_pixels"]
        losses = self.vqgan.reconstruction_loss(pixels, self.code_usage, self.hparams.l2_weight)
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
