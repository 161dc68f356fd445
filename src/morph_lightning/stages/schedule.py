"""The learning-rate schedule every stage uses: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, trainer: L.Trainer, warmup_steps: int, min_lr_ratio: float = 0.1
) -> dict[str, Any]:
    """`configure_optimizers`' return value: `optimizer` with its lr scaled per step, up over
    `warmup_steps`, then down a cosine to `min_lr_ratio` at the trainer's last step."""
    total = max(1, int(trainer.estimated_stepping_batches))
    warmup = min(warmup_steps, total)

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
