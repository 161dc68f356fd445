"""Exact mid-epoch resume: the data continues where it stopped, and a killed run resumed gives the same
later losses as one that never stopped."""

import io
import json
import tarfile
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from fsdp_support import run_ranks
from morph_lightning.data_modules.hf_pairs import HFImageTextPairsDataModule
from morph_lightning.data_modules.instruct import InstructionDataModule
from morph_lightning.data_modules.pairs import ImageTextPairsDataModule
from morph_lightning.data_modules.resume import EpochSampler
from morph_lightning.stages import Stage1AR

NUM_SHARDS, PER_SHARD = 4, 12


@pytest.fixture
def shard_pattern(tmp_path: Path) -> str:
    for s in range(NUM_SHARDS):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s:02d}{i:03d}"
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (20 * s, 10 * i, 128)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"sample {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(tmp_path / "{00000..00003}.tar")


def _dm(pattern: str, num_workers: int) -> ImageTextPairsDataModule:
    return ImageTextPairsDataModule(
        pattern, batch_size=4, num_workers=num_workers, shuffle_buffer=8, vision_size=32, vqgan_size=16
    )


def _keys(dm: ImageTextPairsDataModule, epochs: int = 1, stop_after: int | None = None) -> list[list[str]]:
    """Batches' keys as the training loop would use them (each batch goes through the transfer hook)."""
    out = []
    loader = dm.train_dataloader()
    for _ in range(epochs):
        for batch in loader:
            out.append(dm.on_before_batch_transfer(batch, 0)["keys"])
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resumes_mid_epoch_at_the_next_batch(shard_pattern, num_workers):
    full = _keys(_dm(shard_pattern, num_workers))
    assert len(full) == NUM_SHARDS * PER_SHARD // 4 and len({k for b in full for k in b}) == 48
    assert full == _keys(_dm(shard_pattern, num_workers))  # same seed, same order

    for used in (3, 5):  # 5: an odd count, so worker 1's part must come first after the resume
        first = _dm(shard_pattern, num_workers)
        assert _keys(first, stop_after=used) == full[:used]
        state = first.state_dict()
        second = _dm(shard_pattern, num_workers)
        second.load_state_dict(state)
        assert _keys(second) == full[used:]


def test_epochs_differ_and_the_positions_never_reach_the_model(shard_pattern):
    dm = _dm(shard_pattern, 0)
    two = _keys(dm, epochs=2)
    assert len(two) == 24 and two[:12] != two[12:]
    assert sorted(k for b in two[:12] for k in b) == sorted(k for b in two[12:] for k in b)
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert "positions" not in batch


def test_a_checkpoint_from_another_world_size_is_refused(shard_pattern):
    dm = _dm(shard_pattern, 0)
    with pytest.raises(ValueError, match="2 ranks"):
        dm.load_state_dict({"ranks": [{"epoch": 0, "batches": 1, "workers": {}}] * 2})


def _positions_on_rank(rank: int, world: int, pattern: str) -> dict:
    full = _keys(_dm(pattern, 0))
    first = _dm(pattern, 0)
    _keys(first, stop_after=2 + rank)  # the ranks stop at different places, so a mix-up shows
    saved = [first.state_dict()]  # every rank's position, gathered (a collective)
    dist.broadcast_object_list(saved, src=0)  # only rank 0 writes the checkpoint; every rank loads it
    second = _dm(pattern, 0)
    second.load_state_dict(saved[0])
    return {"full": full, "rest": _keys(second), "indices": list(EpochSampler(range(10), seed=0))}


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_two_ranks_read_their_own_shards_and_resume_from_their_own_positions(shard_pattern, tmp_path):
    """2 gloo processes: each rank reads its own half of the shards (and of a map-style sampler's
    indices), and after a checkpoint that rank 0 alone writes, each continues where it stood. Catches a
    split that ignores the rank, a saved position that is rank 0's only, and a restore that reads
    another rank's."""
    ranks = run_ranks(_positions_on_rank, tmp_path / "ranks", shard_pattern)
    keys = [{k for batch in r["full"] for k in batch} for r in ranks]
    assert len(keys[0]) == len(keys[1]) == NUM_SHARDS * PER_SHARD // 2 and not keys[0] & keys[1]
    for rank, r in enumerate(ranks):
        assert r["rest"] == r["full"][2 + rank :], rank
    indices = [r["indices"] for r in ranks]
    assert len(indices[0]) == len(indices[1]) == 5 and sorted(indices[0] + indices[1]) == list(range(10))


class Killed(Exception):
    pass


class _Kill(L.Callback):
    """Stops the run the hard way when the step after `at_step` starts (its checkpoint written)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            raise Killed


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _fit(tiny_cfg, pattern, root: Path, kill_at=None, ckpt_path=None, record=None) -> dict[int, float]:
    L.seed_everything(0)
    losses = _Losses()
    if record is not None:
        losses.losses = record
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_last=True)
    callbacks = [losses, ckpt] + ([_Kill(kill_at)] if kill_at else [])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=16,  # two epochs of 12 batches... of 4 samples: the resume lands mid-epoch 0 and 1
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
    )
    stage = Stage1AR(model=tiny_cfg, warmup_steps=2, lr=3e-3)
    trainer.fit(stage, datamodule=_dm(pattern, 2), ckpt_path=ckpt_path, weights_only=True)
    return losses.losses


def test_killed_run_resumed_matches_an_uninterrupted_one(shard_pattern, tiny_cfg, tmp_path):
    straight = _fit(tiny_cfg, shard_pattern, tmp_path / "straight")
    assert sorted(straight) == list(range(1, 17))
    killed: dict[int, float] = {}
    with pytest.raises(Killed):
        _fit(tiny_cfg, shard_pattern, tmp_path / "killed", kill_at=6, record=killed)
    assert max(killed) == 6
    resumed = _fit(
        tiny_cfg, shard_pattern, tmp_path / "killed", ckpt_path=str(tmp_path / "killed" / "last.ckpt")
    )
    assert sorted(resumed) == list(range(7, 17))
    for step in range(1, 7):
        assert killed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    for step in range(7, 17):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    # the checkpoint is plain data: it loads without unpickling code
    torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)


MAP_ITEMS, MAP_BATCH = 12, 2  # 6 batches an epoch


@pytest.fixture(params=["hf_pairs", "instruct"])
def map_style(request, tmp_path):
    """A factory of one of the map-style modules (their train sampler is `EpochSampler`), on 12 items."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(png, format="PNG")
    sizes = {"batch_size": MAP_BATCH, "num_workers": 0, "vision_size": 16, "vqgan_size": 16}
    if request.param == "hf_pairs":
        image = {"bytes": png.getvalue(), "path": None}
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        data = {"image": [image] * MAP_ITEMS, "caption": [f"picture {i}" for i in range(MAP_ITEMS)]}
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "pairs.parquet"))
        return lambda: HFImageTextPairsDataModule(
            str(tmp_path / "pairs.parquet"), cache_dir=str(tmp_path / "cache"), **sizes
        )
    (tmp_path / "a.png").write_bytes(png.getvalue())
    records = [
        {"input_img": ["a.png"], "input_text": f"USER: <image> {i}? ASSISTANT:", "output_text": "x"}
        for i in range(MAP_ITEMS)
    ]
    lines = [json.dumps({**r, "output_img": None}) for r in records]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    return lambda: InstructionDataModule(str(tmp_path / "data.jsonl"), **sizes)


class _Seen(L.LightningModule):
    """Records, by epoch, the items each training step reads."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[list[str]]] = {}

    def training_step(self, batch, batch_idx):
        items = batch.get("captions") or [str(s.prompt) for s in batch["samples"]]
        self.seen.setdefault(self.current_epoch, []).append(items)
        return self.weight**2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _seen(make_dm, root: Path, kill_at=None, ckpt_path=None) -> dict[int, list[list[str]]]:
    module = _Seen()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt] + ([_Kill(kill_at)] if kill_at else []),
        default_root_dir=root,
    )
    try:
        trainer.fit(module, datamodule=make_dm(), ckpt_path=ckpt_path, weights_only=True)
    except Killed:
        pass
    return module.seen


def test_map_style_resume_finishes_its_epoch_and_later_epochs_start_at_their_first_item(map_style, tmp_path):
    """Killed 2 batches into epoch 1 and resumed, training reads what an uninterrupted run reads: the rest
    of epoch 1, then all of epoch 2 from its first item. Catches a sampler that keeps skipping after the
    resumed epoch, and one whose length leaves out the skipped items (Lightning counts the batches used
    before the kill towards the length it keeps for every epoch, so each epoch after would end early)."""
    straight = _seen(map_style, tmp_path / "straight")
    assert sorted(straight) == [0, 1, 2] and straight[1] != straight[2]
    for batches in straight.values():
        assert len(batches) == MAP_ITEMS // MAP_BATCH and len({i for b in batches for i in b}) == MAP_ITEMS
    killed = _seen(map_style, tmp_path / "killed", kill_at=8)
    assert killed == {0: straight[0], 1: straight[1][:2]}
    resumed = _seen(map_style, tmp_path / "killed", ckpt_path=str(tmp_path / "killed" / "last.ckpt"))
    assert resumed == {1: straight[1][2:], 2: straight[2]}
