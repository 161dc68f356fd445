"""`precompute-codes`: codes written beside each sample equal what the stage's VQGAN computes, and
training on them gives the same decoder loss as encoding on the fly."""

import io
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from morph_lightning.data_modules.pairs import ImageTextPairsDataModule
from morph_lightning.data_modules.transforms import ImageTransforms
from morph_lightning.modeling.vqgan import VQGAN
from morph_lightning.precompute import main as precompute
from morph_lightning.stages import Stage2AutoEncode

COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (240, 240, 20), (120, 30, 200)]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(colour) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (24, 24), (255, 255, 255))
    img.paste(Image.new("RGB", (10, 10), colour), (4, 8))
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def setup(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    vqgan = VQGAN(**tiny_cfg["vqgan"]).eval()
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": vqgan.state_dict()}, ckpt)
    model = {**tiny_cfg, "vqgan_checkpoint": str(ckpt)}
    config = tmp_path / "stage2.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "morph_lightning.stages.Stage2AutoEncode",
                    "init_args": {"model": model},
                },
                "data": {"init_args": {"vqgan_size": 16}},
            }
        )
    )
    members = []
    for i, colour in enumerate(COLOURS):
        members += [(f"k{i}.png", _png(colour)), (f"k{i}.txt", f"a square number {i}".encode())]
    members += [("bad.jpg", b"not an image"), ("bad.txt", b"broken")]
    _tar(tmp_path / "00000.tar", members)
    return tmp_path, vqgan, model


def _args(root: Path) -> list[str]:
    return [
        "--config",
        str(root / "stage2.yaml"),
        "--shards",
        str(root / "00000.tar"),
        "--out",
        str(root / "out"),
    ]


def _coded_batch(root: Path) -> dict:
    """The precomputed shard, read in order by the pair data module."""
    shard = str(root / "out" / "00000.tar")
    dm = ImageTextPairsDataModule(shard, shard, batch_size=8, num_workers=0, vision_size=32, vqgan_size=16)
    return next(iter(dm.val_dataloader()))


def test_codes_match_the_vqgan_and_reruns_skip_done_shards(setup):
    root, vqgan, _ = setup
    args = _args(root)
    counts = precompute([*args, "--batch-size", "2"])
    assert counts["encoded"] == len(COLOURS) and counts["corrupt"] == 1 and counts["shards"] == 1
    assert precompute(args)["shards_done_before"] == 1

    with tarfile.open(root / "out" / "00000.tar") as tar:
        names = set(tar.getnames())
    assert {f"k{i}.codes.npy" for i in range(len(COLOURS))} <= names and "bad.jpg" in names
    assert "bad.codes.npy" not in names

    transforms = ImageTransforms(vqgan_size=16)
    batch = _coded_batch(root)
    assert batch["keys"] == [f"k{i}" for i in range(len(COLOURS))]
    with torch.no_grad():
        expected = vqgan.encode_to_codes(
            torch.stack([transforms.vqgan(Image.open(io.BytesIO(_png(c)))) for c in COLOURS])
        )
    assert torch.equal(batch["vqgan_codes"], expected)
    assert len(expected.unique()) > 1  # a test on identical codes would prove nothing


def test_stage2_decoder_loss_is_the_same_with_precomputed_codes(setup):
    root, _, model = setup
    precompute(_args(root))
    batch = _coded_batch(root)
    stage = Stage2AutoEncode(model=model).eval()
    with torch.no_grad():
        with_codes = stage.losses(batch)["decoder_ce"]
        on_the_fly = stage.losses({k: v for k, v in batch.items() if k != "vqgan_codes"})["decoder_ce"]
        torch.testing.assert_close(with_codes, on_the_fly)
        wrong = {**batch, "vqgan_codes": batch["vqgan_codes"][:, :3]}
        with pytest.raises(ValueError, match="codes per image"):
            stage.losses(wrong)


def test_a_config_without_a_vqgan_checkpoint_is_refused(setup, tiny_cfg):
    root, _, _ = setup
    config = root / "random.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"model": tiny_cfg}}}))
    with pytest.raises(ValueError, match="vqgan_checkpoint"):
        precompute(["--config", str(config), "--shards", str(root / "00000.tar"), "--out", str(root / "o")])
