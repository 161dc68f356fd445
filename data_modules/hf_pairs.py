"""Image-text pairs from a Hugging Face dataset: a `save_to_disk` folder or parquet files (the Hub's
layout) with an image column and a caption column, for corpora published that way rather than as
webdataset shards. Batches have `ImageTextPairsDataModule`'s layout, bad images are skipped, counted
and logged the same way, and training resumes mid-epoch exactly (`resume.EpochSampler`).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from torch.utils.data import DataLoader, Dataset

from morph_lightning.data_modules.resume import EpochSampler, ResumableDataModule
from morph_lightning.data_modules.sources.hf import ArrowImage, load_rows, plain_rows
from morph_lightning.data_modules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_PIXELS,
    MIN_SIZE,
    BadImage,
    ImageTransforms,
    collate,
    load_image,
)

log = logging.getLogger(__name__)


class HFPairs(Dataset):
    """Row i -> a pair item; an unreadable image is skipped for the next row (a map-style dataset must
    return something), logged with its row and counted in `skipped`."""

    def __init__(
        self,
        path: str,
        split: str,
        image_column: str,
        caption_column: str,
        transforms: ImageTransforms,
        skipped: Counter[str],
        min_size: int,
        max_pixels: int,
        cache_dir: str | None = None,
    ) -> None:
        rows = load_rows(path, split, cache_dir, columns=(image_column, caption_column))
        self.images = rows.select_columns([image_column])
        self.captions = [r[caption_column] for r in plain_rows(rows, [caption_column])]
        self.path, self.image_column = path, image_column
        self.transforms, self.skipped = transforms, skipped
        self.min_size, self.max_pixels = min_size, max_pixels

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        for j in range(i, i + len(self)):
            row = j % len(self)
            image = ArrowImage(self.images, row, self.image_column, self.path)
            try:
                img = load_image(image(), self.min_size, self.max_pixels)
            except BadImage as bad:
                self.skipped[bad.reason] += 1
                log.warning("skipping %s: %s", image, bad)
                continue
            vision, vqgan = self.transforms(img)
            caption = str(self.captions[row] or "").strip()
            return {
                "vision": [vision],
                "vqgan": [vqgan],
                "caption": caption,
                "sample": None,
                "key": str(image),
            }
        raise RuntimeError(f"{self.path}: no row has a readable image")


class HFImageTextPairsDataModule(ResumableDataModule):
    """Pair batches (`vision_pixels`, `vqgan_pixels`, `captions`, `keys`) from Hugging Face datasets.

    `train_path` / `val_path`: a `save_to_disk` folder or a folder of parquet files in the Hub's layout
    (`split` / `val_split` pick a split of either), or parquet files (a file or a glob, read whole).
    Images are decoded by the project's `load_image`, so corrupt, truncated, tiny or huge ones are
    skipped like in the webdataset module. Parquet is converted once into arrow files under `cache_dir`
    (default: the `datasets` cache, in the home folder unless HF_DATASETS_CACHE says otherwise).
    """

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        split: str = "train",
        val_split: str = "validation",
        image_column: str = "image",
        caption_column: str = "caption",
        batch_size: int = 64,
        num_workers: int = 4,
        vision_size: int = 224,
        vqgan_size: int = 256,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        seed: int = 0,
        min_size: int = MIN_SIZE,
        max_pixels: int = MAX_PIXELS,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.transforms = ImageTransforms(vision_size, vqgan_size, mean, std)
        self.skipped: Counter[str] = Counter()
        self.train: HFPairs | None = None
        self.val: HFPairs | None = None

    def _dataset(self, path: str, split: str) -> HFPairs:
        h = self.hparams
        return HFPairs(
            path,
            split,
            h.image_column,
            h.caption_column,
            self.transforms,
            self.skipped,
            h.min_size,
            h.max_pixels,
            h.cache_dir,
        )

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train is None and stage in (None, "fit"):
            self.train = self._dataset(h.train_path, h.split)
        if self.val is None and h.val_path is not None:
            self.val = self._dataset(h.val_path, h.val_split)

    def _loader(self, ds: HFPairs, sampler: EpochSampler | None) -> DataLoader:
        h = self.hparams
        return DataLoader(
            ds,
            batch_size=h.batch_size,
            sampler=sampler,
            drop_last=sampler is not None,
            num_workers=h.num_workers,
            collate_fn=collate,
            persistent_workers=h.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train is None:
            self.setup("fit")
        h = self.hparams
        return self._loader(self.train, self.epoch_sampler(self.train, h.seed, h.batch_size))

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self._loader(self.val, None)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
