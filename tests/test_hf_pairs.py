"""Image-text pairs from Hugging Face datasets (save_to_disk folders and parquet)."""

import io
from pathlib import Path

import datasets
import pytest
from PIL import Image

from conftest import fit_fixed_batch
from morph_lightning.data_modules.hf_pairs import HFImageTextPairsDataModule
from morph_lightning.stages import Stage1AR

N = 21


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10 * i, 255 - 10 * i, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def rows() -> datasets.Dataset:
    images = [{"bytes": _png(i), "path": None} for i in range(N)]
    images[4] = {"bytes": b"broken bytes", "path": None}
    data = {"image": images, "caption": [f"picture {i}" for i in range(N)]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict(data, features=features)


@pytest.fixture(autouse=True)
def _user_cache_stays_empty(tmp_path, monkeypatch):
    """Fails a test whose data module writes into the `datasets` cache (the user's home folder): the
    cache is pointed into tmp_path for the test and must still not exist afterwards."""
    user_cache = tmp_path / "user_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(user_cache))
    yield
    assert not user_cache.exists(), "written into the user's datasets cache"


def _dm(path, **kw) -> HFImageTextPairsDataModule:
    # parquet's arrow copy goes beside the data, in the test's tmp_path, not in the user's datasets cache
    cache = str(Path(path).parent / "datasets_cache")
    kw = {"batch_size": 4, "num_workers": 0, "vision_size": 32, "vqgan_size": 16, "cache_dir": cache, **kw}
    dm = HFImageTextPairsDataModule(str(path), **kw)
    dm.setup("fit")
    return dm


def _captions(dm, stop_after=None) -> list[list[str]]:
    out = []
    for batch in dm.train_dataloader():
        out.append(dm.on_before_batch_transfer(batch, 0)["captions"])
        if len(out) == stop_after:
            break
    return out


def test_save_to_disk_and_parquet_give_the_same_pairs_and_skip_bad_images(rows, tmp_path, caplog):
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "disk"))
    rows.to_parquet(str(tmp_path / "pairs.parquet"))
    disk, parquet = _dm(tmp_path / "disk"), _dm(tmp_path / "pairs.parquet")
    a, b = _captions(disk), _captions(parquet)
    assert a == b and len(a) == N // 4
    seen = [c for batch in a for c in batch]
    # the broken image's row is skipped (its place taken by the next row), every other row is read
    assert "picture 4" not in seen and len(set(seen)) >= len(seen) - 1
    assert disk.skipped == {"corrupt": 1} and "[4].image" in caplog.text
    batch = next(iter(disk.train_dataloader()))
    assert batch["vision_pixels"].shape == (4, 3, 32, 32) and batch["vqgan_pixels"].shape == (4, 3, 16, 16)
    assert -1.0 <= batch["vqgan_pixels"].min() and batch["vqgan_pixels"].max() <= 1.0


def test_resume_continues_the_epoch_and_epochs_reshuffle(rows, tmp_path):
    rows.to_parquet(str(tmp_path / "pairs.parquet"))
    full = _captions(_dm(tmp_path / "pairs.parquet"))
    first = _dm(tmp_path / "pairs.parquet")
    assert _captions(first, stop_after=2) == full[:2]
    second = _dm(tmp_path / "pairs.parquet")
    second.load_state_dict(first.state_dict())
    assert _captions(second) == full[2:]
    later = _dm(tmp_path / "pairs.parquet")
    loader = later.train_dataloader()
    loader.sampler.set_epoch(1)  # what Lightning does at each epoch
    assert [b["captions"] for b in loader] != full


def test_missing_column_is_named(rows, tmp_path):
    rows.rename_column("caption", "text").to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match="caption"):
        _dm(tmp_path / "p.parquet")
    assert _dm(tmp_path / "p.parquet", caption_column="text").train is not None


def test_stage1_trains_on_hf_pairs(rows, tmp_path, tiny_cfg):
    """A few steps of stage 1 on a batch read from parquet: the loss falls."""
    rows.to_parquet(str(tmp_path / "pairs.parquet"))
    batch = next(iter(_dm(tmp_path / "pairs.parquet").train_dataloader()))
    history = fit_fixed_batch(Stage1AR(model=tiny_cfg), batch, steps=5)
    for term in ("loss", "text_ce"):
        assert history[-1][term] < 0.9 * history[0][term], (term, history[0][term], history[-1][term])
