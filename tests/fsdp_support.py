"""Data and a callback for tests/test_fsdp.py (the 2-process run imports them by class path), and
`run_ranks`, which runs a function on 2 ranks of a gloo group for the tests of distributed pieces.

Sharded and single-process runs give the same per-step loss only if each rank's loss averages to the
global batch's: the text CE is a mean over caption tokens, so every caption here has the same length,
and the order is fixed: rank r reads items r, r + 2, ... (Lightning's own distributed sampler always
shuffles training data), so the two ranks' step k together read the single process's batch k.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from morph_lightning.data_modules.toy import Scene, ToyDataModule, all_scenes, render
from morph_lightning.data_modules.transforms import collate

SCENES = [s for s in all_scenes() if len(s.caption()) == len("a red square on the right")]


class _EqualLengthPairs(Dataset):
    def __init__(self, n: int, vision_size: int, vqgan_size: int, mean, std) -> None:
        self.n, self.sizes = n, (vision_size, vqgan_size)
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene: Scene = SCENES[i % len(SCENES)]
        img = render(scene, max(self.sizes)).unsqueeze(0)
        vis, vq = (F.interpolate(img, size=s, mode="bilinear", antialias=True)[0] for s in self.sizes)
        return {
            "vision": [(vis - self.mean) / self.std],
            "vqgan": [vq * 2 - 1],
            "caption": scene.caption(),
            "sample": None,
        }


class EqualLengthPairs(ToyDataModule):
    def _loader(self, n: int, seed: int, shuffle: bool) -> DataLoader:
        h = self.hparams
        ds = _EqualLengthPairs(n, h.vision_size, h.vqgan_size, h.mean, h.std)
        sampler = DistributedSampler(ds, shuffle=False) if dist.is_initialized() else None
        return DataLoader(ds, batch_size=h.batch_size, sampler=sampler, collate_fn=collate)


class GlobalLoss(L.Callback):
    """Logs the step's loss averaged over ranks (rank 0 alone would log only its half of the batch)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, i) -> None:
        pl_module.log("global_loss", outputs["loss"], sync_dist=True, on_step=True, on_epoch=False)


def run_ranks(fn: Callable[..., Any], folder: Path, *args: Any, world: int = 2) -> list[Any]:
    """`fn(rank, world, *args)` on each rank of a gloo group of `world` processes; their return values.

    The processes are forked, so they start with this process's imports at once (spawned ones would
    import torch and Lightning again, seconds each); rendezvous and results go through `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank, args=(world, folder, fn, args), nprocs=world, start_method="fork")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _rank(rank: int, world: int, folder: Path, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP threads do not exist in a forked process
    rendezvous = f"file://{folder}/rendezvous"
    timeout = timedelta(seconds=60)  # a rank left waiting in a collective fails instead of hanging
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=timeout)
    try:
        torch.save(fn(rank, world, *args), folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
