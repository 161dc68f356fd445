"""Exact mid-epoch resume: a data module remembers where training stands in its data and starts there again.

Lightning restores the weights, optimiser, schedule and loop counters, but a fresh DataLoader starts the
epoch over. `ResumableDataModule` records every training batch that reaches the model (in
`on_before_batch_transfer`, so batches the loop prefetched but never used do not count), saves that
position in the checkpoint, and on resume builds its train loader to continue from it:

- map-style datasets: `EpochSampler`, a `DistributedSampler` (so Lightning neither replaces nor wraps
  it) whose order depends on (seed, epoch) only, and which skips the samples already seen;
- streams (webdataset shards): `ShardStream` seeds its shard and sample shuffles by (seed, epoch, rank,
  worker) and tags every item with its place in its worker's stream. On resume each worker skips what
  it had delivered before decoding anything, and worker i takes the part of worker (i + k) mod n,
  where k batches were used this epoch: a DataLoader hands out batches round-robin from worker 0, so
  the first batch asked for is then the one that was next.

Positions are per rank; in a distributed run `state_dict` gathers every rank's, since only rank 0
writes the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclasses.dataclass
class DataPosition:
    """Where one rank stands: the epoch, the batches used in it, and per stream worker the number of
    raw samples (before decoding) it had read when it produced its last used item."""

    epoch: int = 0
    batches: int = 0
    workers: dict[int, int] = dataclasses.field(default_factory=dict)

    def advance(self, positions: list[tuple[int, int, int]] | None, epoch: int) -> None:
        """Count one used batch; `positions`: (epoch, worker, raw index) of its items, for streams."""
        if positions:
            epoch = positions[0][0]
        if epoch != self.epoch:
            self.epoch, self.batches, self.workers = epoch, 0, {}
        self.batches += 1
        for _, worker, raw in positions or ():
            self.workers[worker] = max(self.workers.get(worker, 0), raw + 1)


class EpochSampler(DistributedSampler):
    """A rank's share of a (seed, epoch)-seeded permutation; the first epoch after a resume starts
    `skip` samples in."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, skip: int = 0) -> None:
        rank, world = rank_and_world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0  # later epochs start at their beginning
        return iter(indices)

    def __len__(self) -> int:
        # the whole epoch, also while skipping: Lightning counts the batches used before the resume
        # (its restored progress) towards this length, and keeps it for the later epochs
        return self.num_samples


class ResumableDataModule(L.LightningDataModule):
    """Base of the data modules that resume exactly. Subclasses build their train loader from
    `start_epoch()` and `resume_point()`."""

    def __init__(self) -> None:
        super().__init__()
        self.position = DataPosition()
        self._resume: DataPosition | None = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        positions = batch.pop("positions", None) if isinstance(batch, dict) else None
        trainer = self.trainer
        if trainer is None or trainer.training:
            epoch = trainer.current_epoch if trainer is not None else self.position.epoch
            self.position.advance(positions, epoch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        mine = dataclasses.asdict(self.position)
        rank, world = rank_and_world()
        if world == 1:
            return {"ranks": [mine]}
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        return {"ranks": every}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict["ranks"]
        rank, world = rank_and_world()
        if len(ranks) != world:
            raise ValueError(
                f"data position: the checkpoint was written by {len(ranks)} ranks, this run has {world}; "
                "exact resume needs the same number"
            )
        saved = ranks[rank]
        self._resume = DataPosition(
            saved["epoch"], saved["batches"], {int(k): v for k, v in saved["workers"].items()}
        )

    def epoch_sampler(self, dataset: Dataset, seed: int, batch_size: int) -> EpochSampler:
        """The train sampler of a map-style dataset, starting where a restored checkpoint left off."""
        resume = self.resume_point()
        sampler = EpochSampler(dataset, seed, skip=resume.batches * batch_size if resume is not None else 0)
        sampler.set_epoch(self.start_epoch())
        return sampler

    def start_epoch(self) -> int:
        trainer = self.trainer
        if trainer is not None:
            return trainer.current_epoch
        return self._resume.epoch if self._resume is not None else 0

    def resume_point(self) -> DataPosition | None:
        """The saved position, when training restarts inside its epoch; used once."""
        resume, self._resume = self._resume, None
        if resume is None or resume.epoch != self.start_epoch():
            return None
        self.position = dataclasses.replace(resume, workers=dict(resume.workers))
        return resume
