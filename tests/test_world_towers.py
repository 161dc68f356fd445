"""The world's pretrained towers: `world-towers` makes them (deterministically, keeping what it replaces),
and the ones shipped in `towers/world/` are small and as good as their recorded quality."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from morph_lightning.data_modules.world.writer import write_world
from morph_lightning.demo import TOWER_STEPS
from morph_lightning.evaluation.tower_quality import val_batch, vqgan_scene_exact
from morph_lightning.modeling.vqgan import VQGAN
from morph_lightning.world_towers import QUALITY_IMAGES
from morph_lightning.world_towers import main as world_towers

SHIPPED = Path(__file__).resolve().parents[1] / "towers" / "world"
MAX_TOWER_BYTES = 2 * 2**20


def tower_tensors(root: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(root.rglob("*")):
        if file.suffix == ".safetensors":
            tensors |= {f"{file.name}:{k}": v for k, v in load_file(file).items()}
        elif file.suffix == ".ckpt":
            state = torch.load(file, weights_only=True)["state_dict"]
            tensors |= {f"{file.name}:{k}": v for k, v in state.items()}
    return tensors


def test_world_towers_are_reproducible_and_keep_what_they_replace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    world_towers(["--max-steps", "2"])
    towers = Path("towers/world")
    first = tower_tensors(towers)
    assert {k.split(":")[0] for k in first} == {
        "vqgan.ckpt",
        "vision.safetensors",
        "model.safetensors",
        "encoder.safetensors",
    }
    quality = json.loads((towers / "quality.json").read_text())
    assert list(quality) == [s.name for s in TOWER_STEPS] + ["max_steps"]
    assert 0 <= quality["stage0_vqgan"]["val/scene_exact"] <= 1
    assert all(0 < quality[s.name]["bytes"] < MAX_TOWER_BYTES for s in TOWER_STEPS)

    Path("runs/world/stage1").mkdir()  # a stage trained on the first towers: set aside with them
    world_towers(["--max-steps", "2"])  # again from scratch: the same towers, the first ones kept aside
    second = tower_tensors(towers)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    kept = [p for p in Path("runs/world").iterdir() if p.name.startswith("towers.")]
    assert len(kept) == 1 and {p.name for p in kept[0].iterdir()} == {
        "vqgan.ckpt",
        "vision.safetensors",
        "vision.json",
        "lm",
        "encoder.safetensors",
    }
    assert len(list(Path("runs/world").glob("stage0_vqgan.*"))) == 1  # the first run's folder
    assert not Path("runs/world/stage1").exists() and len(list(Path("runs/world").glob("stage1.*"))) == 1


@pytest.mark.parametrize("name", ["vqgan.ckpt", "vision.safetensors", "lm", "encoder.safetensors"])
def test_shipped_towers_are_small(name):
    path = SHIPPED / name
    size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
    assert 0 < size < MAX_TOWER_BYTES, (name, size)


def test_shipped_vqgan_reproduces_its_recorded_quality(tmp_path):
    """The world's val pairs (the same images whatever the world's size) come back to the exact scene
    as often as `quality.json` says, and that is at least 97%."""
    quality = json.loads((SHIPPED / "quality.json").read_text())["stage0_vqgan"]["val/scene_exact"]
    assert quality >= 0.97
    write_world(tmp_path, seed=0, num_pairs=4, num_instruct=4, num_val_instruct=4)
    config = yaml.safe_load((SHIPPED.parents[1] / "configs/world/stage0_vqgan.yaml").read_text())
    arch = config["model"]["init_args"]["vqgan"]
    vqgan = VQGAN.from_taming_checkpoint(SHIPPED / "vqgan.ckpt", **arch)
    pixels = val_batch(str(tmp_path / "pairs/val/00000.tar"), QUALITY_IMAGES, 48, 48)["vqgan_pixels"]
    assert len(pixels) == QUALITY_IMAGES
    assert vqgan_scene_exact(vqgan, pixels) == pytest.approx(quality, abs=1e-4)
