"""What the stage-0 modules that pretrain one part over the frozen towers share (the morph encoder, the
abstr-abstr (SD) generator): `losses(batch)` logged per step, AdamW with weight decay on matrices only,
the warm-up and cosine schedule, and a VQGAN that stays in eval mode."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from morph_lightning.stages.schedule import warmup_cosine


class PretrainOverTowers(L.LightningModule):
    """Subclasses set `self.vqgan` and give `losses(batch)` ({"loss": ..., other terms}); their
    hyperparameters hold `lr`, `weight_decay`, `warmup_steps` and `min_lr_ratio`."""

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> PretrainOverTowers:
        super().train(mode)
        self.vqgan.eval()  # frozen towers never leave eval mode
        return self

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        bs = len(batch["vision_pixels"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["vision_pixels"]))

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": h.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return warmup_cosine(torch.optim.AdamW(groups, lr=h.lr), self.trainer, h.warmup_steps, h.min_lr_ratio)
