"""Each instruction source read from a few records built in its published layout (field names, dtypes and
folders as the set's own card, loader or code gives them; the comment on each test says where from):
what comes out, that splits stay apart, that bad records are skipped and counted, and that a wrong
image folder stops setup with a line naming it."""

import json
import logging

import datasets
import pytest
import yaml

from morph_lightning.data_modules.bad_records import BadRecords
from morph_lightning.data_modules.instruct import InstructionDataModule
from morph_lightning.data_modules.mixture import MixtureDataModule
from morph_lightning.data_modules.sources import read_source
from morph_lightning.modeling.sequence import ImageRef, Sample
from source_files import COLOURS, hf_rows, save_image

T2I = " Generate an image based on the description. ASSISTANT:"
EDIT = " What will this image be like with the editing instruction: {}. ASSISTANT:"


def _read(kind: str, **options) -> tuple[list, BadRecords]:
    return read_source(kind, kind, 0, **options)


def _colour(dm: MixtureDataModule, record, k: int = 0) -> str:
    """The colour of a record's k-th image, read back through the data module's image loading."""
    pix = dm._dataset([record])[0]["vqgan"][k]
    rgb = tuple(((pix[:, 0, 0] + 1) * 127.5).round().int().tolist())
    return {v: c for c, v in COLOURS.items()}[rgb]


def _dm(sources: list[dict], **kw) -> MixtureDataModule:
    dm = MixtureDataModule(sources, batch_size=2, num_workers=0, vision_size=32, vqgan_size=16, **kw)
    dm.setup("fit")
    return dm


def _magicbrush(root) -> str:
    """MagicBrush as its Hub repository serves it (osunlp/MagicBrush, dataset card): `data/` holds
    `train-000NN-of-000MM-<hash>.parquet` and `dev-...parquet` side by side; columns `img_id` (string),
    `turn_index` (int32), `source_img`, `mask_img`, `target_img` (images) and `instruction` (string)."""
    data = root / "MagicBrush" / "data"
    data.mkdir(parents=True)
    dtypes = {"turn_index": "int32"}
    images = ("source_img", "mask_img", "target_img")
    for split, rows in {
        "train": [("1", 1, "red", "make it green", "green"), ("1", 2, "green", "make it blue", "blue")],
        "dev": [("9", 1, "white", "make it red", "red")],
    }.items():
        names = ("img_id", "turn_index", "source_img", "instruction", "target_img")
        cols = {k: list(v) for k, v in zip(names, zip(*rows, strict=True), strict=True)}
        cols["mask_img"] = ["white"] * len(rows)
        n = 2 if split == "train" else 1
        for k in range(n):  # several shards per split, as the Hub writes them
            part = {c: v[k::n] for c, v in cols.items()}
            hf_rows(part, images, dtypes).to_parquet(str(data / f"{split}-{k:05d}-of-{n:05d}-a1b2.parquet"))
    return str(data)


def test_magicbrush_splits_stay_apart_in_the_published_folder(tmp_path):
    data = _magicbrush(tmp_path)
    cache = str(tmp_path / "cache")
    train, _ = _read("magicbrush", path=data, cache_dir=cache)
    dev, _ = _read("magicbrush", path=data, split="dev", cache_dir=cache)
    assert sorted(r.sample.prompt[2] for r in train) == [
        EDIT.format("make it blue"),
        EDIT.format("make it green"),
    ]
    assert [r.sample.prompt[2] for r in dev] == [EDIT.format("make it red")]
    # the repository root works too ("data/train-..." at the top level is the Hub's pattern), and the dev
    # split is also found by the name `datasets` gives it
    again, _ = _read("magicbrush", path=str(tmp_path / "MagicBrush"), split="validation", cache_dir=cache)
    assert [r.sample for r in again] == [r.sample for r in dev]
    with pytest.raises(ValueError, match="no split 'test'.*'train'"):
        _read("magicbrush", path=data, split="test", cache_dir=cache)
    dm = _dm([{"type": "magicbrush", "path": data, "split": "dev", "cache_dir": cache}])
    assert [_colour(dm, dev[0], k) for k in (0, 1)] == ["white", "red"]


def test_the_mixture_config_reads_general_scene_difference_from_mimicit_cgd():
    # MIMIC-IT (Li et al., 2023; its README's data table): `CGD` is General Scene Difference (COCO image
    # pairs); `SD` is Subtle Difference from Spot-the-Diff. The paper's GSD is the first.
    config = yaml.safe_load(open("configs/stage3_mixture.yaml"))
    (gsd,) = [s for s in config["data"]["init_args"]["sources"] if s["name"] == "gsd"]
    assert gsd["path"].endswith("CGD/CGD_instructions.json") and gsd["images"].endswith("CGD/CGD.json")


def _released(tmp_path) -> dict:
    """The released code's jsonl (DCDmllm/MorphTokens, `NewImgDataset.__getitem__` and `Morph.forward`):
    `input_img` / `output_img` are None, a path or a list, joined to the dataset's image root; the model
    splits `text_input` and `text_output` at `<ImageHere>`; the text-to-image records of its LAION loader
    end the prompt with " <img>" and answer "<ImageHere> </img>"."""
    root = tmp_path / "images"
    for name, colour in (("a.jpg", "red"), ("b.jpg", "green"), ("c.jpg", "blue")):
        save_image(root / "sub" / name, colour)
    lines = [
        {"input_img": None, "output_img": "sub/c.jpg", "input_text": "a blue square <img>",
         "output_text": "<ImageHere> </img>"},
        {"input_img": "sub/a.jpg", "output_img": None, "input_text": "<ImageHere> What colour is it?",
         "output_text": "Red."},
        {"input_img": ["sub/a.jpg", "sub/b.jpg"], "output_img": ["sub/c.jpg"], "task": "edit",
         "input_text": "<img><ImageHere></img> and <img><ImageHere></img> Blend them. <img>",
         "output_text": "Here: <ImageHere> </img>"},
        {"input_img": "sub/a.jpg", "output_img": None, "input_text": "No mark here.", "output_text": "x"},
        {"input_img": None, "output_img": "sub/c.jpg", "input_text": "x <img>", "output_text": None},
    ]  # fmt: skip
    path = tmp_path / "ann" / "released.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n")
    return {"type": "released_jsonl", "path": str(path), "image_root": str(root)}


def test_the_released_codes_jsonl_loads_by_name(tmp_path):
    spec = _released(tmp_path)
    records, bad = _read(spec["type"], path=spec["path"], image_root=spec["image_root"], max_bad_fraction=0.5)
    t2i, vqa, blend = records
    assert t2i.sample == Sample(["USER: a blue square ASSISTANT:"], [ImageRef(0, target=True)])
    assert vqa.sample == Sample(["USER: ", ImageRef(0), " What colour is it? ASSISTANT:"], [" Red."])
    prompt = ["USER: ", ImageRef(0), " and ", ImageRef(1), " Blend them. ASSISTANT:"]
    assert blend.sample == Sample(prompt, [" Here:", ImageRef(2, target=True)])
    assert [p.rsplit("/", 2)[1:] for p in blend.images] == [["sub", n] for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert bad.counts == {"image marks": 2, "not JSON": 1}
    assert "released.jsonl:4" in bad.first[0] and "released.jsonl:6" in bad.first[2]
    dm = _dm([spec | {"max_bad_fraction": 0.5}])
    assert [_colour(dm, blend, k) for k in range(3)] == ["red", "green", "blue"]


def _journeydb(root, lines: list[dict], unpacked_in: str = "imgs") -> str:
    """JourneyDB (JourneyDB/JourneyDB on the Hub; its card and download scripts): the annotation
    `data/train/train_anno_realease_repath.jsonl` (unpacked from its .tgz) has one json per line with
    `img_path` "./000/<id>.jpg" and `prompt`; images come as `data/train/imgs/000.tgz`, each holding
    `000/<id>.jpg`, unpacked into `imgs/` (in place) or into the train folder."""
    train = root / "JourneyDB" / "data" / "train"
    for line in lines:
        save_image(train / unpacked_in / line["img_path"], "blue")
    path = train / "train_anno_realease_repath.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _jdb_line(k: int, prompt: str = "a blue square") -> dict:
    return {"img_path": f"./{k // 100:03d}/{k:08x}.jpg", "prompt": prompt, "Task2": {"Caption": "x"}}


@pytest.mark.parametrize("unpacked_in", ["imgs", "."])
def test_journeydb_finds_its_images_where_the_archives_unpack(tmp_path, unpacked_in):
    path = _journeydb(tmp_path, [_jdb_line(k) for k in (0, 150)], unpacked_in)
    records, _ = _read("journeydb", path=path)
    assert records[0].sample == Sample(["USER: a blue square" + T2I], [ImageRef(0, target=True)])
    assert records[1].images[0].endswith(f"train/{unpacked_in}/001/00000096.jpg".replace("/./", "/"))


def test_a_wrong_image_root_stops_setup_naming_source_root_and_an_example(tmp_path):
    path = _journeydb(tmp_path, [_jdb_line(0)])
    wrong = str(tmp_path / "elsewhere")
    with pytest.raises(
        FileNotFoundError, match=rf"'journeydb': 0 of 1 images.*{wrong}, e\.g\. .*000/00000000\.jpg"
    ):
        _dm([{"type": "journeydb", "path": path, "image_root": wrong}])


def test_bad_records_are_skipped_and_counted_until_the_threshold(tmp_path, caplog):
    lines = [_jdb_line(k) for k in range(200)]
    lines[7]["prompt"] = ""
    del lines[9]["prompt"]
    path = _journeydb(tmp_path, lines)
    with caplog.at_level(logging.WARNING):
        dm = _dm([{"type": "journeydb", "path": path}])
    assert len(dm.train) == 198 and dm.bad_records["journeydb"].counts == {
        "empty 'prompt'": 1,
        "no 'prompt'": 1,
    }
    assert "skipped 2 of 200 records" in caplog.text and "train_anno_realease_repath.jsonl:8" in caplog.text
    lines[11]["prompt"] = "   "
    path = _journeydb(tmp_path, lines)
    with pytest.raises(
        ValueError, match=r"'journeydb': 3 of 200 records \(1\.50%\) are bad, over max_bad_fraction 0\.01"
    ):
        _dm([{"type": "journeydb", "path": path}])
    dm = _dm([{"type": "journeydb", "path": path}], max_bad_fraction=0.02)  # the module's setting
    assert len(dm.train) == 197
    dm = _dm([{"type": "journeydb", "path": path, "max_bad_fraction": 0.05}])  # or the source's own
    assert dm.bad_records["journeydb"].total == 3


def test_llava_conversations_that_break_the_format_are_counted_by_reason(tmp_path):
    # LLaVA's `llava_v1_5_mix665k.json` (its README): a list of {"id", "image", "conversations": [{"from":
    # "human" | "gpt", "value"}]}, the human turns carrying one "<image>".
    save_image(tmp_path / "coco" / "train2017" / "1.jpg", "red")

    def item(k, turns):
        return {"id": str(k), "image": "coco/train2017/1.jpg", "conversations": turns}

    good = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]
    items = [item(k, good) for k in range(6)]
    items[1]["conversations"] = good[:1]  # odd length
    items[2]["conversations"] = good[::-1]  # roles swapped
    items[3]["conversations"] = [good[0], {"from": "gpt", "value": ""}]  # an empty answer
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(items))
    records, bad = _read("llava", path=str(path), max_bad_fraction=0.5)
    assert len(records) == 3
    assert bad.counts == {"odd message count": 1, "roles out of order": 1, "empty 'value'": 1}
    assert bad.first[0].startswith(f"{path}[1] id=1: odd message count")


def _large_parts(tmp_path) -> str:
    """DiffusionDB Large (poloclub/diffusiondb, dataset card): `metadata-large.parquet` with `image_name`,
    `prompt`, `part_id` (uint16), ...; parts 1-10000 unzip under `diffusiondb-large-part-1/`, the rest
    under `diffusiondb-large-part-2/`, one `part-NNNNNN/` folder of lossless webp images each."""
    root = tmp_path / "diffusiondb"
    save_image(root / "diffusiondb-large-part-1" / "part-000001" / "a.webp", "red", "WEBP")
    save_image(root / "diffusiondb-large-part-2" / "part-010001" / "b.webp", "green", "WEBP")
    meta = {"image_name": ["a.webp", "b.webp"], "prompt": ["a red sky", "a green sea"], "part_id": [1, 10001]}
    features = datasets.Features(
        {
            "image_name": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "part_id": datasets.Value("uint16"),
        }
    )
    datasets.Dataset.from_dict(meta, features=features).to_parquet(str(root / "metadata-large.parquet"))
    return str(root / "metadata-large.parquet")


def test_diffusiondb_large_finds_each_part_in_its_own_folder(tmp_path):
    path = _large_parts(tmp_path)
    records, _ = _read("diffusiondb", path=path, cache_dir=str(tmp_path / "cache"))
    assert [r.sample.prompt[0] for r in records] == ["USER: a red sky" + T2I, "USER: a green sea" + T2I]
    assert "diffusiondb-large-part-2/part-010001/b.webp" in records[1].images[0]
    dm = _dm([{"type": "diffusiondb", "path": path, "cache_dir": str(tmp_path / "cache")}])
    assert [_colour(dm, r) for r in records] == ["red", "green"]


def test_diffusiondb_as_saved_from_its_loader(tmp_path):
    # The loader's features (poloclub/diffusiondb card, `dataset_info`): image, prompt, seed (uint32),
    # step, cfg, sampler, width, height, user_name, timestamp, image_nsfw, prompt_nsfw.
    cols = {"image": ["red", "blue"], "prompt": ["a red room", ""], "seed": [1, 2], "sampler": ["k_lms"] * 2}
    rows = hf_rows(cols, ("image",), {"seed": "uint32"})
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "ddb"))
    records, bad = _read("diffusiondb", path=str(tmp_path / "ddb"), max_bad_fraction=0.5)
    assert [r.sample.prompt[0] for r in records] == ["USER: a red room" + T2I]
    assert bad.counts == {"empty 'prompt'": 1}
    assert (
        _colour(
            _dm([{"type": "diffusiondb", "path": str(tmp_path / "ddb"), "max_bad_fraction": 0.5}]), records[0]
        )
        == "red"
    )


def test_instructpix2pix_original_folder_with_its_own_split(tmp_path):
    # The original release (timothybrooks/instruct-pix2pix, `edit_dataset.py`): `seeds.json` is a list of
    # [name, [seeds]]; `<name>/prompt.json` has "input", "edit" and "output"; each seed has
    # `<seed>_0.jpg` (before) and `<seed>_1.jpg` (after); train/val/test are the first 90/5/5 % of it.
    root = tmp_path / "clip-filtered-dataset"
    seeds = []
    for k in range(20):
        name = f"{k:07d}_caption"
        seeds.append([name, [11 * k, 11 * k + 1] if k == 19 else [11 * k]])
        (root / name).mkdir(parents=True)
        edit = f"make it blue {k}" if k != 3 else ""
        (root / name / "prompt.json").write_text(json.dumps({"input": "a", "edit": edit, "output": "b"}))
        for seed in seeds[-1][1]:
            save_image(root / name / f"{seed}_0.jpg", "red")
            save_image(root / name / f"{seed}_1.jpg", "blue")
    (root / "seeds.json").write_text(json.dumps(seeds))
    train, bad = _read("instructpix2pix", path=str(root), max_bad_fraction=0.1)
    val, _ = _read("instructpix2pix", path=str(root), split="val")
    test, _ = _read("instructpix2pix", path=str(root), split="test")
    assert len(train) == 17 and bad.counts == {"empty 'edit'": 1}
    assert [r.sample.prompt[2] for r in val] == [EDIT.format("make it blue 18")]
    assert [r.images[0].rsplit("/", 1)[1] for r in test] == ["209_0.jpg", "210_0.jpg"]  # every seed a record
    dm = _dm([{"type": "instructpix2pix", "path": str(root), "split": "test"}])
    assert [_colour(dm, test[1], k) for k in (0, 1)] == ["red", "blue"]


def test_the_projects_own_jsonl_skips_and_counts_bad_lines(tmp_path):
    save_image(tmp_path / "a.png", "red")
    good = {"input_img": ["a.png"], "output_img": None, "input_text": "USER: <image> Colour? ASSISTANT:"}
    lines = [json.dumps(good | {"output_text": "red"})] * 3 + [json.dumps(good | {"output_text": None})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    dm = InstructionDataModule(str(tmp_path / "d.jsonl"), batch_size=1, num_workers=0, max_bad_fraction=0.3)
    dm.setup("fit")
    assert len(dm.train) == 3 and dm.bad_records[str(tmp_path / "d.jsonl")].counts == {"bad output": 1}
    with pytest.raises(ValueError, match=r"d\.jsonl': 1 of 4 records \(25\.00%\) are bad"):
        InstructionDataModule(str(tmp_path / "d.jsonl"), batch_size=1, num_workers=0).setup("fit")
