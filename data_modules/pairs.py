"""Image-text pairs from webdataset shards in img2dataset's layout: `{key}.jpg|png|webp`, `{key}.txt`.

Bad samples never stop training: an image that is corrupt, truncated, missing, too small or too large
is skipped, logged with its key and shard, and counted in `ImageTextPairsDataModule.skipped` (a
`Counter` by reason); an unreadable shard (missing, not a tar, cut short) is named in a warning, counted
under `unreadable_shard`, and the other shards go on. Counts are per process: with `num_workers > 0`
each DataLoader worker counts its own skips in its copy of the pipeline, so the module's counter only
sees the skips of `num_workers=0` loading; the log lines are complete either way.
"""

from __future__ import annotations

import io
import logging
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from morph_lightning.data_modules.resume import DataPosition, ResumableDataModule, rank_and_world
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
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CODES_EXT = "codes.npy"  # VQGAN codes beside the sample, from `python -m morph_lightning precompute-codes`


def read_codes(data: bytes) -> torch.Tensor:
    """A `{key}.codes.npy` member -> [n_codes] long codes."""
    return torch.from_numpy(np.load(io.BytesIO(data)).astype(np.int64))


class ShardErrorHandler:
    """A webdataset `handler`: warn naming the shard, count, and go on with the next shard."""

    def __init__(self, skipped: Counter[str]) -> None:
        self.skipped = skipped

    def __call__(self, exn: Exception) -> bool:
        # a local shard that cannot be opened names itself in `filename`; for tar and remote errors
        # webdataset appends the shard's url to `exn.args`
        shard = getattr(exn, "filename", None)
        if shard is None and len(exn.args) > 1 and isinstance(exn.args[-1], str):
            shard = exn.args[-1]
        self.skipped["unreadable_shard"] += 1
        warnings.warn(f"skipping unreadable shard {shard or '(unknown)'}: {exn!r}", stacklevel=2)
        return True


class PairDecoder:
    """A raw webdataset sample -> a pair item, or None when the sample is skipped."""

    def __init__(self, transforms: ImageTransforms, skipped: Counter[str], min_size: int, max_pixels: int):
        self.transforms, self.skipped = transforms, skipped
        self.min_size, self.max_pixels = min_size, max_pixels

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key, shard = sample["__key__"], sample.get("__url__", "?")
        try:
            data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if data is None:
                raise BadImage("missing", f"no {'/'.join(IMAGE_EXTS)} member")
            if "txt" not in sample:
                raise BadImage("no_caption")
            img = load_image(data, self.min_size, self.max_pixels)
        except BadImage as bad:
            self.skipped[bad.reason] += 1
            log.warning("skipping sample %s of shard %s: %s", key, shard, bad)
            return None
        vision, vqgan = self.transforms(img)
        caption = sample["txt"].decode("utf-8", errors="replace").strip()
        item = {"vision": [vision], "vqgan": [vqgan], "caption": caption, "sample": None, "key": key}
        if CODES_EXT in sample:  # written by `precompute-codes`: the stage skips the VQGAN encoder
            item["codes"] = [read_codes(sample[CODES_EXT])]
        return item


def _kept(item: dict[str, Any] | None) -> bool:
    return item is not None


def expand_shards(shards: str | list[str]) -> list[str]:
    """Brace patterns -> the list of shard urls."""
    return [
        u for s in ([shards] if isinstance(shards, str) else shards) for u in wds.shardlists.expand_urls(s)
    ]


class ShardStream(IterableDataset):
    """Training samples from shards, in an order fixed by (seed, epoch, rank, worker): the shards are
    shuffled per epoch and dealt to ranks, then to DataLoader workers; each worker's samples pass a
    shuffle buffer; items carry `position` (epoch, worker, raw index) so the data module can save where
    each worker stands. See `resume.py` for how a resume picks up from there."""

    def __init__(
        self,
        urls: list[str],
        decode: Callable[[dict[str, Any]], dict[str, Any] | None],
        handler: Callable[[Exception], bool],
        seed: int,
        shuffle_buffer: int,
        start_epoch: int = 0,
        resume: DataPosition | None = None,
    ) -> None:
        super().__init__()
        self.urls, self.decode, self.handler = urls, decode, handler
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch = start_epoch - 1  # counts iterations in whichever process iterates (persistent workers)
        self.resume = resume

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        resume, self.resume = self.resume, None  # only the first epoch resumes
        rank, world = rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if resume is not None:
            worker = (worker + resume.batches) % workers
        shards = list(self.urls)
        random.Random(f"shards-{self.seed}-{self.epoch}").shuffle(shards)
        mine = shards[rank::world][worker::workers]
        raw = tarfile_samples(({"url": u} for u in mine), handler=self.handler)
        rng = random.Random(f"samples-{self.seed}-{self.epoch}-{rank}-{worker}")
        stream = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
        skip = resume.workers.get(worker, 0) if resume is not None else 0
        for index, sample in enumerate(stream):
            if index < skip:  # delivered before the interruption: not even decoded
                continue
            item = self.decode(sample)
            if item is not None:
                item["position"] = (self.epoch, worker, index)
                yield item


class ImageTextPairsDataModule(ResumableDataModule):
    """Pair batches: `vision_pixels` [B, 3, S, S], `vqgan_pixels` [B, 3, R, R], `captions`, `keys`.

    `train_shards` / `val_shards`: anything `webdataset.WebDataset` accepts: a brace pattern
    (`data/{00000..00099}.tar`), a path, a list of them, or remote urls (`pipe:curl -s ...`,
    `s3://...` through fsspec). Training shuffles shard order and samples within a `shuffle_buffer`,
    both seeded by (`seed`, epoch), and resumes mid-epoch exactly (`resume.py`); validation reads in
    order. Shards are split across ranks and workers, so give at least `world_size * num_workers`
    shards. The datasets are iterable without a length: set the trainer's `max_steps` (and
    `limit_val_batches` if needed).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        vision_size: int = 224,
        vqgan_size: int = 256,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        seed: int = 0,
        min_size: int = MIN_SIZE,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.transforms = ImageTransforms(vision_size, vqgan_size, mean, std)
        self.skipped: Counter[str] = Counter()

    def dataset(self, shards: str | list[str], train: bool) -> IterableDataset:
        h = self.hparams
        handler = ShardErrorHandler(self.skipped)
        decoder = PairDecoder(self.transforms, self.skipped, h.min_size, h.max_pixels)
        if train:
            urls = expand_shards(shards)
            return ShardStream(
                urls, decoder, handler, h.seed, h.shuffle_buffer, self.start_epoch(), self.resume_point()
            )
        ds = wds.WebDataset(
            shards,
            shardshuffle=False,
            handler=handler,
            nodesplitter=wds.split_by_node,
            empty_check=False,  # a worker may get no shard, or only unreadable ones
        )
        return ds.map(decoder).select(_kept)

    def _loader(self, shards: str | list[str], train: bool) -> DataLoader:
        h = self.hparams
        return DataLoader(
            self.dataset(shards, train),
            batch_size=h.batch_size,
            num_workers=h.num_workers,
            collate_fn=collate,
            drop_last=train,  # fixed batch shapes for training; all samples for validation
            persistent_workers=h.num_workers > 0,  # also keeps each worker's epoch count
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_shards, train=True)

    def val_dataloader(self) -> DataLoader | list:
        # an empty list tells Lightning there is no validation
        return [] if self.hparams.val_shards is None else self._loader(self.hparams.val_shards, train=False)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
