"""Writes what `predict` generates: `predictions.jsonl` and the generated images as PNGs.

The CLI adds it to every `predict` run. Each run gets a fresh folder, `<default_root_dir>/predict/<time>/`,
so an earlier run's predictions (and the training run's own files) are never overwritten. A file is
either complete or absent under its final name: each PNG is written to a temporary name and renamed, and
the jsonl is `predictions.jsonl.partial` until predict ends.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from morph_lightning.inference import save_png


def fresh_folder(parent: Path) -> Path:
    """A new folder under `parent` named by the time; `-2`, `-3`, ... when that name is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free folder name for {stamp} in {parent}")


class PredictionWriter(BasePredictionWriter):
    """Each batch's `GenerationOutput` (the stages' `predict_step`) as one jsonl row per prompt,
    `{"batch", "row", "text", "images"}`, `images` naming its PNGs in the same folder."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.folder: Path | None = None
        self._file: IO[str] | None = None
        self._stem = ""
        self._rows = self._images = 0
        self._warned = False

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = (
            str(fresh_folder(Path(trainer.default_root_dir) / "predict")) if trainer.is_global_zero else ""
        )
        self.folder = Path(trainer.strategy.broadcast(folder))  # every rank writes into rank 0's folder
        self._stem = f"rank{trainer.global_rank}-" if trainer.world_size > 1 else ""
        self._rows = self._images = 0
        partial = self._jsonl()
        self._file = open(partial.with_name(partial.name + ".partial"), "x")  # closed in on_predict_end

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not all(hasattr(prediction, k) for k in ("texts", "images", "pixels")):
            if not self._warned:
                rank_zero_warn(f"PredictionWriter writes GenerationOutput; got {type(prediction).__name__}")
                self._warned = True
            return
        loader = f"d{dataloader_idx}-" if dataloader_idx else ""
        for row, (text, image_ids) in enumerate(zip(prediction.texts, prediction.images, strict=True)):
            names = [f"{self._stem}{loader}{batch_idx:05d}-{row:03d}-{k}.png" for k in range(len(image_ids))]
            for name, i in zip(names, image_ids, strict=True):
                save_png(prediction.pixels[i], self.folder / name)
            record = {"batch": batch_idx, "row": row, "text": text, "images": names}
            if dataloader_idx:
                record["dataloader"] = dataloader_idx
            self._file.write(json.dumps(record) + "\n")
            self._rows += 1
            self._images += len(names)
        self._file.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
        os.replace(self._file.name, self._jsonl())
        if trainer.is_global_zero:
            print(f"predict: {self._rows} rows, {self._images} images -> {self._jsonl()}")

    def _jsonl(self) -> Path:
        return self.folder / f"{self._stem}predictions.jsonl"
