"""Stage-3 instruction mixtures: several sources, each read in its published format (`sources/`), drawn
by weight into batches of the same layout as `InstructionDataModule`'s, so `Stage3Instruct` trains on
either unchanged.

Draw k of the training stream is a pure function of (seed, k): its source comes from a block of weighted
choices seeded by (seed, k // BLOCK), and the j-th draw of a source is element j % n of that source's
permutation number j // n (seeded by (seed, source, j // n)), so every source is gone through without
repeats before any record comes back. An epoch is `epoch_draws` consecutive draws; resuming mid-epoch
starts at the draw where the checkpointed run stopped, so a restart sees the same batches.

Ranks: the sampler shards the stream itself (draw k goes to rank k % world_size), so the trainer must
run with `use_distributed_sampler: false`.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from morph_lightning.data_modules.bad_records import MAX_BAD_FRACTION, BadRecords
from morph_lightning.data_modules.instruct import InstructionDataset, Record
from morph_lightning.data_modules.sources import read_source
from morph_lightning.data_modules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_PIXELS,
    MIN_SIZE,
    ImageTransforms,
    collate,
)

log = logging.getLogger(__name__)
BLOCK = 4096  # source choices drawn per rng call


class MixtureSampler(Sampler[int]):
    """Indices into the concatenated sources; `sizes` records per source, `weights` their shares."""

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        seed: int,
        epoch_draws: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(sizes) != len(weights) or not sizes or min(sizes) < 1:
            raise ValueError(f"need one weight per non-empty source, got sizes {sizes}, weights {weights}")
        if min(weights) <= 0:
            raise ValueError(f"weights must be positive, got {weights}")
        self.sizes, self.seed, self.epoch_draws = sizes, seed, epoch_draws
        self.p = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (cycle, permutation)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, draws_done: int) -> None:
        """Start the next iteration at draw `draws_done` of epoch `epoch` (once; later epochs start at 0)."""
        self.epoch, self.skip = epoch, draws_done

    def __len__(self) -> int:
        return len(range(self.rank, self.epoch_draws, self.world_size))

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.epoch_draws
        mine = self.draws(start, self.epoch_draws)[self.rank :: self.world_size]
        skip, self.skip = self.skip, 0
        return iter(mine[len(range(self.rank, skip, self.world_size)) :].tolist())

    def _choices(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0, block])
        return rng.choice(len(self.sizes), size=BLOCK, p=self.p)

    def _perm(self, source: int, cycle: int) -> np.ndarray:
        if self._perms.get(source, (None,))[0] != cycle:
            rng = np.random.default_rng([self.seed, 1, source, cycle])
            self._perms[source] = (cycle, rng.permutation(self.sizes[source]))
        return self._perms[source][1]

    def draws(self, start: int, count: int) -> np.ndarray:
        """Global indices of draws `start .. start + count - 1`."""
        used = np.zeros(len(self.sizes), dtype=np.int64)  # draws of each source before the current block
        for block in range(start // BLOCK):
            used += np.bincount(self._choices(block), minlength=len(self.sizes))
        out = []
        for block in range(start // BLOCK, (start + count - 1) // BLOCK + 1):
            choices = self._choices(block)
            index = np.empty(BLOCK, dtype=np.int64)
            for s in range(len(self.sizes)):
                where = np.flatnonzero(choices == s)
                j = used[s] + np.arange(len(where))
                n = self.sizes[s]
                for cycle in np.unique(j // n):
                    sel = j // n == cycle
                    index[where[sel]] = self.offsets[s] + self._perm(s, int(cycle))[j[sel] % n]
                used[s] += len(where)
            out.append(index)
        first = start - (start // BLOCK) * BLOCK
        return np.concatenate(out)[first : first + count] if count else np.empty(0, dtype=np.int64)


class MixtureDataset(Dataset):
    """The sources' datasets end to end; a bad record falls through to the next one of its own source."""

    def __init__(self, parts: list[InstructionDataset]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = bisect.bisect_right(self.starts, i) - 1
        return self.parts[s][i - self.starts[s]]


class MixtureDataModule(L.LightningDataModule):
    """`sources`: one dict per source, `{"type": <reader, see sources.READERS>, "weight": float (default 1),
    "name": str (default the type), "max_bad_fraction": float (default the module's), **reader options
    such as "path"}`. `val_sources` (same keys, weights unused) are served in order. `epoch_draws`: draws
    per training epoch (default: all sources' records). `max_bad_fraction`: the share of a source's
    records that may be malformed (skipped, counted in `bad_records`) before setup stops."""

    def __init__(
        self,
        sources: list[dict[str, Any]],
        val_sources: list[dict[str, Any]] | None = None,
        batch_size: int = 16,
        num_workers: int = 4,
        vision_size: int = 224,
        vqgan_size: int = 256,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        seed: int = 0,
        epoch_draws: int | None = None,
        min_size: int = MIN_SIZE,
        max_pixels: int = MAX_PIXELS,
        max_bad_fraction: float = MAX_BAD_FRACTION,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.transforms = ImageTransforms(vision_size, vqgan_size, mean, std)
        self.skipped: Counter[str] = Counter()  # bad images by reason, this process
        self.bad_records: dict[str, BadRecords] = {}  # malformed records left out at setup, by source
        self.train: MixtureDataset | None = None
        self.val: InstructionDataset | None = None
        self.weights: list[float] = []

    def _read(self, specs: list[dict[str, Any]]) -> tuple[list[list[Record]], list[float]]:
        names = [spec.get("name", spec.get("type")) for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (set 'name'), got {names}")
        parts, weights = [], []
        for name, spec in zip(names, specs, strict=True):
            options = {k: v for k, v in spec.items() if k not in ("type", "name", "weight")}
            options.setdefault("max_bad_fraction", self.hparams.max_bad_fraction)
            if "type" not in spec:
                raise ValueError(f"source {name!r}: needs a 'type'")
            records, self.bad_records[name] = read_source(spec["type"], name, self.hparams.seed, **options)
            log.info("source %s: %d records, weight %s", name, len(records), spec.get("weight", 1.0))
            parts.append(records)
            weights.append(float(spec.get("weight", 1.0)))
        return parts, weights

    def _dataset(self, records: list[Record]) -> InstructionDataset:
        h = self.hparams
        return InstructionDataset(records, self.transforms, self.skipped, h.min_size, h.max_pixels)

    def setup(self, stage: str | None = None) -> None:
        if self.train is None and stage in (None, "fit"):
            parts, self.weights = self._read(self.hparams.sources)
            self.train = MixtureDataset([self._dataset(p) for p in parts])
        if self.val is None and self.hparams.val_sources:
            parts, _ = self._read(self.hparams.val_sources)
            self.val = self._dataset([r for p in parts for r in p])

    def sampler(self) -> MixtureSampler:
        """The training sampler, placed where a restored trainer left off."""
        h, trainer = self.hparams, self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sizes = [len(p) for p in self.train.parts]
        sampler = MixtureSampler(sizes, self.weights, h.seed, h.epoch_draws or sum(sizes), rank, world)
        if trainer is not None:
            # `processed`, not `completed`: a checkpoint saved in on_train_batch_end has not yet counted its
            # batch as completed. A finished epoch's count is stale: the next epoch starts from its beginning.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed * h.batch_size * world
            sampler.resume(trainer.current_epoch, done if done < sampler.epoch_draws else 0)
        return sampler

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(
            self.train,
            batch_size=h.batch_size,
            sampler=self.sampler(),
            num_workers=h.num_workers,
            collate_fn=collate,
            persistent_workers=h.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        h = self.hparams
        return DataLoader(self.val, batch_size=h.batch_size, num_workers=h.num_workers, collate_fn=collate)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
