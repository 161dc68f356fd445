"""Training the VQGAN tokenizer as an autoencoder (L1 reconstruction plus codebook loss)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from morph_lightning.modeling.vqgan import VQGAN


# No discriminator (and no perceptual loss) yet: only the autoencoder part of taming's objective.
class VQGANAutoencoder(L.LightningModule):
    """Trains a :class:`VQGAN` on batches whose ``"vqgan_pixels"`` hold [-1, 1] images."""

    def __init__(
        self,
        vqgan: dict[str, Any] | None = None,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        export_path: str | None = None,
    ) -> None:
        """`export_path`: where to write the trained VQGAN in taming's layout when training ends, for
        `model.vqgan_checkpoint` of the stage configs."""
        super().__init__()
        self.save_hyperparameters()
        self.vqgan = VQGAN(**(vqgan or {}))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.vqgan.reconstruction_loss(batch["vqgan_pixels"])
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss")
        return losses["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses = self.vqgan.reconstruction_loss(batch["vqgan_pixels"])
        self.log("val/rec", losses["rec"], prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.vqgan.parameters(), lr=self.hparams.lr, betas=self.hparams.betas)

    def export(self, path: str | Path) -> None:
        """The weights under taming's keys (no `vqgan.` prefix), as taming's `last.ckpt` holds them."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in self.vqgan.state_dict().items()}}, path)

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.export(self.hparams.export_path)
