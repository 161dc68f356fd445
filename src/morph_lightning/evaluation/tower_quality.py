"""How good the world's stage-0 towers are: what `make world-towers` prints after training them.

The VQGAN is scored the way the world's report scores its ceiling: held-out images encoded to codes,
decoded back and parsed; a reconstruction counts when it parses to the original's exact scene. The other
towers are scored by the last validation metrics their runs logged.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import Tensor

from morph_lightning.data_modules.pairs import ImageTextPairsDataModule
from morph_lightning.data_modules.transforms import CLIP_MEAN, CLIP_STD
from morph_lightning.evaluation.world_eval import parse_image, to_uint8
from morph_lightning.modeling.vqgan import VQGAN


def val_batch(
    shards: str,
    num_images: int,
    vision_size: int,
    vqgan_size: int,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> dict[str, Tensor]:
    """The first `num_images` validation pairs of `shards` as one batch (fewer when the shards hold fewer)."""
    data = ImageTextPairsDataModule(
        train_shards=shards,
        val_shards=shards,
        batch_size=num_images,
        num_workers=0,
        vision_size=vision_size,
        vqgan_size=vqgan_size,
        mean=mean,
        std=std,
    )
    data.setup("validate")
    return next(iter(data.val_dataloader()))


@torch.no_grad()
def vqgan_scene_exact(vqgan: VQGAN, pixels: Tensor, batch_size: int = 64) -> float:
    """Fraction of VQGAN inputs [N, 3, R, R] whose reconstruction parses to the input's scene."""
    vqgan.eval()
    hits = 0
    for batch in pixels.split(batch_size):
        recon = vqgan.decode_codes(vqgan.encode_to_codes(batch))
        hits += sum(
            parse_image(to_uint8(r)) == parse_image(to_uint8(x)) for r, x in zip(recon, batch, strict=True)
        )
    return hits / len(pixels)


def last_val_metrics(run_dir: str | Path) -> dict[str, float]:
    """The last logged value of every `val/...` metric in the run's CSV log (empty when there is none)."""
    log = Path(run_dir) / "logs" / "metrics.csv"
    found: dict[str, float] = {}
    if not log.exists():
        return found
    for row in csv.DictReader(log.open()):
        found |= {k: round(float(v), 4) for k, v in row.items() if k.startswith("val/") and v}
    return found
