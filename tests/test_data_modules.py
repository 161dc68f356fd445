"""The real data modules on tiny files written here: webdataset pair shards and instruction jsonl.

Policy checked here: images whose shorter side is below `min_size` (default 8 px; 1x1 here) are skipped,
not upscaled; grayscale and CMYK are converted to RGB.
"""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import fit_fixed_batch
from morph_lightning.data_modules.instruct import InstructionDataModule
from morph_lightning.data_modules.pairs import ImageTextPairsDataModule
from morph_lightning.data_modules.transforms import CLIP_MEAN, CLIP_STD, ImageTransforms, collate
from morph_lightning.modeling.sequence import ImageRef, Sample
from morph_lightning.stages import Stage1AR, Stage3Instruct

VISION, VQGAN = 32, 16  # the tiny model's sizes
rng = np.random.default_rng(0)


def _image(w: int, h: int, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_shard(path, samples: list[tuple[str, dict]]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members, "json": {"key": key}})


def _pair(key: str, ext: str, data: bytes) -> tuple[str, dict]:
    return key, {ext: data, "txt": f"caption of {key}"}


GOOD = {"rgb_jpg", "rgb_png", "gray_png", "cmyk_jpg", "rgba_png", "wide_jpg"}
BAD = {"corrupt_jpg": "corrupt", "cut_jpg": "truncated", "tiny_png": "too_small", "huge_png": "too_large"}


@pytest.fixture
def shards(tmp_path):
    good = tmp_path / "good-000.tar"
    _write_shard(
        good,
        [
            _pair("rgb_jpg", "jpg", _encode(_image(40, 48), "JPEG")),
            _pair("rgb_png", "png", _encode(_image(33, 33), "PNG")),
            _pair("gray_png", "png", _encode(_image(36, 40, "L"), "PNG")),
            _pair("cmyk_jpg", "jpg", _encode(_image(40, 36, "CMYK"), "JPEG")),
            _pair("rgba_png", "png", _encode(_image(32, 32, "RGBA"), "PNG")),
        ],
    )
    bad = tmp_path / "bad-001.tar"
    jpeg = _encode(_image(64, 64), "JPEG")
    _write_shard(
        bad,
        [
            _pair("corrupt_jpg", "jpg", rng.integers(0, 256, 500, dtype=np.uint8).tobytes()),
            _pair("cut_jpg", "jpg", jpeg[: len(jpeg) // 2]),
            _pair("tiny_png", "png", _encode(_image(1, 1), "PNG")),
            _pair("huge_png", "png", _encode(_image(100, 100), "PNG")),  # > max_pixels below
            ("no_image", {"txt": "a caption without its image"}),
            _pair("wide_jpg", "jpg", _encode(_image(64, 20), "JPEG")),
        ],
    )
    not_tar = tmp_path / "broken-002.tar"
    not_tar.write_bytes(b"this is not a tar file" * 50)
    return [str(good), str(not_tar), str(bad)]


def _pairs_dm(train, val=None, batch_size=4) -> ImageTextPairsDataModule:
    return ImageTextPairsDataModule(
        train, val, batch_size=batch_size, num_workers=0, shuffle_buffer=8, vision_size=VISION,
        vqgan_size=VQGAN, max_pixels=5000,
    )  # fmt: skip


def _unnormalise(vision: torch.Tensor) -> torch.Tensor:
    return vision * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


def test_pair_batches_skip_bad_images_and_unreadable_shards(shards):
    dm = _pairs_dm(shards[0], val=shards)
    with pytest.warns(UserWarning, match="broken-002.tar"):
        batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(GOOD)  # the shard after the broken one was still read
    for b in batches:
        n = len(b["keys"])
        assert b["vision_pixels"].shape == (n, 3, VISION, VISION)
        assert b["vqgan_pixels"].shape == (n, 3, VQGAN, VQGAN)
        assert b["captions"] == [f"caption of {k}" for k in b["keys"]]
        assert b["vqgan_pixels"].min() >= -1 and b["vqgan_pixels"].max() <= 1
        pixels = _unnormalise(b["vision_pixels"])
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    expected = {reason: 1 for reason in BAD.values()} | {"missing": 1, "unreadable_shard": 1}
    assert dm.skipped == expected


def test_gray_and_cmyk_become_three_channels(shards):
    batch = collate_all(_pairs_dm([shards[0]], [shards[0]]))
    gray = batch["vqgan_pixels"][batch["keys"].index("gray_png")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    cmyk = batch["vqgan_pixels"][batch["keys"].index("cmyk_jpg")]
    assert cmyk.shape == (3, VQGAN, VQGAN) and not torch.equal(cmyk[0], cmyk[1])


def collate_all(dm: ImageTextPairsDataModule) -> dict:
    batches = list(dm.val_dataloader())
    return {
        "vqgan_pixels": torch.cat([b["vqgan_pixels"] for b in batches]),
        "keys": [k for b in batches for k in b["keys"]],
    }


def test_train_loader_drops_last_and_warns_on_a_missing_shard(shards, tmp_path):
    missing = str(tmp_path / "missing-003.tar")
    dm = _pairs_dm([shards[0], missing], batch_size=2)
    with pytest.warns(UserWarning, match="missing-003.tar"):
        batches = list(dm.train_dataloader())
    assert [len(b["keys"]) for b in batches] == [2, 2]  # 5 good samples, the odd one dropped
    assert set(k for b in batches for k in b["keys"]) <= GOOD


def test_stage1_trains_on_pair_shards(shards, tiny_cfg):
    """A few steps of stage 1 on a batch read from webdataset shards: the loss falls."""
    batch = next(iter(_pairs_dm([shards[0]], [shards[0]]).val_dataloader()))
    history = fit_fixed_batch(Stage1AR(model=tiny_cfg), batch, steps=5)
    for term in ("loss", "text_ce"):
        assert history[-1][term] < 0.9 * history[0][term], (term, history[0][term], history[-1][term])


# ---- instructions ----------------------------------------------------------------------------------
def _record(inputs, text, out_img=None, out_text=None, **extra) -> dict:
    return {"input_img": inputs, "output_img": out_img, "input_text": text, "output_text": out_text, **extra}


@pytest.fixture
def jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    for name, size in [("a.png", (40, 40)), ("b.jpg", (48, 36)), ("c.png", (36, 36))]:
        _image(*size).save(tmp_path / "img" / name)
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not an image")
    records = [
        _record(["img/a.png"], "USER: <image> What colour is it? ASSISTANT:", out_text="red", id=7),
        _record(
            ["img/a.png"],
            "USER: <image> What will this image be like with the editing instruction: make it green. "
            "ASSISTANT: ",
            out_img="img/b.jpg",
        ),
        _record(
            [], "USER: a cat. Generate an image based on the description. ASSISTANT:", out_img="img/c.png"
        ),
        _record(["img/b.jpg", "img/c.png"], "USER: <image> and <image>: same? ASSISTANT:", out_text="no"),
        _record(["img/missing.png"], "USER: <image> ASSISTANT:", out_text="?"),
        _record(["img/broken.jpg"], "USER: <image> ASSISTANT:", out_text="?"),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def _instruct_dm(path, batch_size=4) -> InstructionDataModule:
    dm = InstructionDataModule(
        str(path), str(path), batch_size=batch_size, num_workers=0, vision_size=VISION, vqgan_size=VQGAN
    )
    dm.setup("fit")
    return dm


def test_jsonl_records_become_samples(jsonl):
    samples = [r.sample for r in _instruct_dm(jsonl).val.records]
    # the space after "ASSISTANT:" moves to the text answer, whatever the record had
    assert samples[0] == Sample(["USER: ", ImageRef(0), " What colour is it? ASSISTANT:"], [" red"])
    assert samples[1].prompt[-1].endswith("make it green. ASSISTANT:")
    assert samples[1].answer == [ImageRef(1, target=True)]
    assert samples[2] == Sample(
        ["USER: a cat. Generate an image based on the description. ASSISTANT:"], [ImageRef(0, target=True)]
    )
    assert samples[3].prompt == ["USER: ", ImageRef(0), " and ", ImageRef(1), ": same? ASSISTANT:"]
    assert samples[3].answer == [" no"]


def test_instruction_batches_point_at_the_right_pixels(jsonl):
    dm = _instruct_dm(jsonl, batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    folder = jsonl.parent / "img"
    files = [["a.png"], ["a.png", "b.jpg"], ["c.png"], ["b.jpg", "c.png"]]  # each record's images
    transforms = ImageTransforms(VISION, VQGAN)
    assert batch["vision_pixels"].shape == (6, 3, VISION, VISION)
    assert batch["vqgan_pixels"].shape == (6, 3, VQGAN, VQGAN)
    for sample, names in zip(batch["samples"], files, strict=True):
        refs = [p for p in sample.prompt + sample.answer if isinstance(p, ImageRef)]
        assert len(refs) == len(names)
        for ref, name in zip(refs, names, strict=True):
            vision, vqgan = transforms(Image.open(folder / name))
            assert torch.equal(batch["vision_pixels"][ref.index], vision)
            assert torch.equal(batch["vqgan_pixels"][ref.index], vqgan)


def test_unreadable_instruction_images_are_skipped(jsonl, caplog):
    dm = _instruct_dm(jsonl, batch_size=2)
    items = [dm.val[i] for i in (4, 5)]  # both fall through to the next readable record
    assert [it["sample"] for it in items] == [dm.val.records[0].sample] * 2
    assert dm.skipped == {"missing": 1, "corrupt": 2}  # record 5 twice: its own and 4's fall-through
    assert "data.jsonl:5" in caplog.text and "data.jsonl:6" in caplog.text


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"input_img": [], "input_text": "USER: hi ASSISTANT:", "output_text": "x"}, "keys"),
        (_record(["x.png"], "USER: no mark ASSISTANT:", out_text="x"), "0 <image> marks but 1"),
        (_record([], "USER: hi ASSISTANT:"), "exactly one"),
        (_record([], "USER: hi ASSISTANT:", out_img="x.png", out_text="x"), "exactly one"),
        ("{not json", "not JSON"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_record([], "USER: hi ASSISTANT:", out_text="x"))
    line = record if isinstance(record, str) else json.dumps(record)
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        InstructionDataModule(str(path), num_workers=0).setup("fit")


def test_stage3_accepts_instruction_batches(jsonl, tiny_cfg):
    batch = next(iter(_instruct_dm(jsonl).val_dataloader()))  # records 0-3: text and image answers
    losses = Stage3Instruct(model=tiny_cfg).losses(batch)
    assert torch.isfinite(losses["loss"]) and losses["decoder_ce"] > 0 and losses["text_ce"] > 0


def test_collate_keeps_toy_behaviour():
    pix = torch.zeros(3, 4, 4)
    items = [
        {"vision": [pix], "vqgan": [pix], "caption": None, "sample": Sample([ImageRef(0)], ["a"])},
        {
            "vision": [pix, pix],
            "vqgan": [pix, pix],
            "caption": None,
            "sample": Sample([ImageRef(0)], [ImageRef(1, True)]),
        },
    ]
    batch = collate(items)
    assert set(batch) == {"vision_pixels", "vqgan_pixels", "samples"}
    assert batch["samples"][1] == Sample([ImageRef(1)], [ImageRef(2, True)])
    with pytest.raises(ValueError, match="mixes"):
        collate([items[0], {"vision": [pix], "vqgan": [pix], "caption": "c", "sample": None}])


def test_instruction_training_resumes_mid_epoch(jsonl):
    def prompts(dm, stop_after=None):
        out = []
        for batch in dm.train_dataloader():
            out.append([str(s.prompt[-1]) for s in dm.on_before_batch_transfer(batch, 0)["samples"]])
            if len(out) == stop_after:
                break
        return out

    full = prompts(_instruct_dm(jsonl, batch_size=2))
    assert len(full) == 3
    first = _instruct_dm(jsonl, batch_size=2)
    assert prompts(first, stop_after=1) == full[:1]
    second = _instruct_dm(jsonl, batch_size=2)
    second.load_state_dict(first.state_dict())
    assert prompts(second) == full[1:]
