"""Instruction mixtures: each public format written tiny here, read into records with the paper's
templates, drawn by weight, and trained on by Stage 3 with the loss on the answers only."""

import base64
import json
import logging
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from morph_lightning.data_modules.instruct import IMAGE_MARK
from morph_lightning.data_modules.mixture import MixtureDataModule, MixtureSampler
from morph_lightning.data_modules.sources import read_source
from morph_lightning.data_modules.sources.templates import CAPTION, VQA
from morph_lightning.modeling.sequence import IGNORE, ImageRef, Sample, build_sequences
from morph_lightning.stages import Stage3Instruct
from source_files import COLOURS, encoded, hf_rows, save_image


@pytest.fixture
def specs(tmp_path) -> dict[str, dict]:
    """One tiny source per public format; returns its spec (as a mixture config lists it) by name."""
    cache = str(tmp_path / "hf_cache")
    # the project's own jsonl
    (tmp_path / "rel").mkdir()
    save_image(tmp_path / "rel" / "a.png", "red")
    rel = {"input_img": ["a.png"], "output_img": None, "input_text": "USER: <image> Colour? ASSISTANT:"}
    (tmp_path / "rel" / "d.jsonl").write_text(json.dumps({**rel, "output_text": "red"}) + "\n")
    # JourneyDB: annotation lines with `img_path` and `prompt` (test_sources_published has its full layout)
    jdb = tmp_path / "journeydb"
    save_image(jdb / "000" / "a.jpg", "blue")
    lines = [{"img_path": "./000/a.jpg", "prompt": "a blue square ", "Task2": {"Caption": "x"}}]
    (jdb / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # DiffusionDB 2M (poloclub/diffusiondb card): metadata.parquet, images unzipped to images/part-NNNNNN/
    ddb = tmp_path / "diffusiondb"
    save_image(ddb / "images" / "part-000001" / "x.png", "green")
    meta = {"image_name": ["x.png"], "prompt": ["a green field"], "part_id": [1], "seed": [7]}
    ddb.mkdir(exist_ok=True)
    datasets.Dataset.from_dict(meta).to_parquet(str(ddb / "metadata.parquet"))
    # InstructPix2Pix (timbrooks/instructpix2pix-clip-filtered on the Hub): data/train-*.parquet shards
    ip2p = tmp_path / "ip2p" / "data"
    ip2p.mkdir(parents=True)
    cols = {"original_prompt": ["a"], "original_image": ["red"], "edit_prompt": ["make it blue."]}
    rows = hf_rows(
        {**cols, "edited_prompt": ["b"], "edited_image": ["blue"]}, ("original_image", "edited_image")
    )
    rows.to_parquet(str(ip2p / "train-00000-of-00001.parquet"))
    # MagicBrush (osunlp/MagicBrush card's columns): a DatasetDict saved with save_to_disk
    mb = {"img_id": ["1", "1"], "turn_index": ["1", "2"], "source_img": ["red", "green"]}
    mb |= {"mask_img": ["white", "white"], "instruction": ["turn it green", "turn it white"]}
    mb |= {"target_img": ["green", "white"]}
    rows = hf_rows(mb, ("source_img", "mask_img", "target_img"))
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "magicbrush"))
    # COCO captions (captions_*.json) and VQAv2 (v2_OpenEnded_mscoco_*_questions.json with
    # v2_mscoco_*_annotations.json), as the sets' download pages serve them
    coco = tmp_path / "coco"
    save_image(coco / "train2014" / "COCO_train2014_000000000042.jpg", "white")
    images = [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg"}]
    anns = [{"image_id": 42, "id": k, "caption": f"a white picture {k}"} for k in range(6)]
    (coco / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    qs = [{"image_id": 42, "question": f"What colour is it {k}?", "question_id": k} for k in range(6)]
    (coco / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": qs}))
    ans = [{"question_id": k, "multiple_choice_answer": "white", "answers": []} for k in range(6)]
    (coco / "a.json").write_text(json.dumps({"annotations": ans}))
    # LLaVA: a two-turn conversation (mark after the question), and a text-only item
    llava = tmp_path / "llava"
    save_image(llava / "coco" / "train2017" / "1.jpg", "red")
    conv = [
        {"from": "human", "value": "What is shown?\n<image>"},
        {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Is it round?"},
        {"from": "gpt", "value": "No."},
    ]
    text_only = {
        "id": "t",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
    }
    items = [{"id": "1", "image": "coco/train2017/1.jpg", "conversations": conv}, text_only]
    (llava / "llava_v1_5_mix665k.json").write_text(json.dumps(items))
    # MIMIC-IT (GSD is its CGD part): instructions json + base64 image json
    gsd = tmp_path / "CGD"
    gsd.mkdir()
    ins = {
        "CGD_INS_1": {"instruction": "What changed?", "answer": "It turned blue.", "image_ids": ["i0", "i1"]}
    }
    (gsd / "CGD_instructions.json").write_text(json.dumps({"meta": {}, "data": ins}))
    table = {
        "i0": base64.b64encode(encoded("red")).decode(),
        "i1": base64.b64encode(encoded("blue")).decode(),
    }
    (gsd / "CGD.json").write_text(json.dumps(table))
    return {
        "jsonl": {"type": "jsonl", "path": str(tmp_path / "rel" / "d.jsonl")},
        "journeydb": {"type": "journeydb", "path": str(jdb / "train.jsonl")},
        "diffusiondb": {"type": "diffusiondb", "path": str(ddb / "metadata.parquet"), "cache_dir": cache},
        "instructpix2pix": {"type": "instructpix2pix", "path": str(tmp_path / "ip2p"), "cache_dir": cache},
        "magicbrush": {"type": "magicbrush", "path": str(tmp_path / "magicbrush")},
        "coco_captions": {
            "type": "coco_captions",
            "path": str(coco / "captions.json"),
            "image_root": str(coco / "train2014"),
        },
        "vqav2": {
            "type": "vqav2",
            "path": str(coco / "q.json"),
            "annotations": str(coco / "a.json"),
            "image_root": str(coco / "train2014"),
        },
        "llava": {"type": "llava", "path": str(llava / "llava_v1_5_mix665k.json")},
        "mimicit": {
            "type": "mimicit",
            "path": str(gsd / "CGD_instructions.json"),
            "images": str(gsd / "CGD.json"),
        },
    }


def _read(spec: dict, seed: int = 0):
    options = {k: v for k, v in spec.items() if k != "type"}
    records, bad = read_source(spec["type"], spec["type"], seed, **options)
    assert not bad.total
    return records


def _dm(sources: list[dict], **kw) -> MixtureDataModule:
    dm = MixtureDataModule(
        sources, batch_size=kw.pop("batch_size", 4), num_workers=0, vision_size=32, vqgan_size=16, **kw
    )
    dm.setup("fit")
    return dm


def _colours(dm: MixtureDataModule, records) -> list[str]:
    """The colour of every image of each record, read back through the dataset's image loading."""
    part = dm._dataset(records)
    names = {v: k for k, v in COLOURS.items()}
    out = []
    for i in range(len(records)):
        pix = [((p + 1) * 127.5).round().to(torch.uint8)[:, 0, 0] for p in part[i]["vqgan"]]
        out.append([names[tuple(p.tolist())] for p in pix])
    return out


T2I = " Generate an image based on the description. ASSISTANT:"


def test_text_to_image_readers(specs):
    (j,) = _read(specs["journeydb"])
    (d,) = _read(specs["diffusiondb"])
    assert j.sample == Sample(["USER: a blue square" + T2I], [ImageRef(0, target=True)])
    assert d.sample == Sample(["USER: a green field" + T2I], [ImageRef(0, target=True)])
    assert _colours(_dm([specs["jsonl"]]), [j, d]) == [["blue"], ["green"]]


def test_editing_readers_from_parquet_and_save_to_disk(specs):
    (ip2p,) = _read(specs["instructpix2pix"])
    edit = " What will this image be like with the editing instruction: {}. ASSISTANT:"
    assert ip2p.sample == Sample(
        ["USER: ", ImageRef(0), edit.format("make it blue")], [ImageRef(1, target=True)]
    )
    mb = _read(specs["magicbrush"])
    assert [r.sample.prompt[2] for r in mb] == [edit.format("turn it green"), edit.format("turn it white")]
    assert "[1].source_img" in str(mb[1].images[0])  # names the row and column in skip messages
    assert _colours(_dm([specs["jsonl"]]), [ip2p, *mb]) == [
        ["red", "blue"],
        ["red", "green"],
        ["green", "white"],
    ]


def test_caption_and_vqa_use_instructblip_templates_picked_per_sample(specs):
    caps, qas = _read(specs["coco_captions"]), _read(specs["vqav2"])
    for rec in caps:
        assert rec.sample.prompt[1] == ImageRef(0) and rec.sample.answer[0].startswith(" a white picture")
        assert f"USER: {IMAGE_MARK}{rec.sample.prompt[2]}" in CAPTION
    for k, rec in enumerate(qas):
        assert rec.sample.answer == [" white"] and f"it {k}?" in rec.sample.prompt[2]
        assert any(
            f"USER: {IMAGE_MARK}{rec.sample.prompt[2]}" == t.format(question=f"What colour is it {k}?")
            for t in VQA
        )
    assert rec.images[0].endswith("train2014/COCO_train2014_000000000042.jpg")
    again, other = _read(specs["coco_captions"]), _read(specs["coco_captions"], seed=1)
    assert [r.sample for r in again] == [r.sample for r in caps]  # the same seed, the same templates
    assert [r.sample for r in other] != [r.sample for r in caps]


def test_llava_turns_score_each_answer_once_with_the_image_first(specs):
    first, second = _read(specs["llava"])  # the text-only item is left out
    assert first.sample == Sample(["USER: ", ImageRef(0), " What is shown? ASSISTANT:"], [" A red square."])
    history = " What is shown? ASSISTANT: A red square. USER: Is it round? ASSISTANT:"
    assert second.sample == Sample(["USER: ", ImageRef(0), history], [" No."])
    assert first.images == second.images and first.images[0].endswith("coco/train2017/1.jpg")


def test_mimicit_multi_image(specs):
    (rec,) = _read(specs["mimicit"])
    prompt = ["USER: This is the first image. ", ImageRef(0), " This is the second image. ", ImageRef(1)]
    assert rec.sample == Sample([*prompt, " What changed? ASSISTANT:"], [" It turned blue."])
    assert _colours(_dm([specs["jsonl"]]), [rec]) == [["red", "blue"]]


def test_draws_follow_the_weights_and_cover_each_source():
    sampler = MixtureSampler([5, 50, 500], [0.5, 0.3, 0.2], seed=0, epoch_draws=2000)
    idx = np.array(list(sampler))
    share = np.bincount(np.searchsorted([5, 55], idx, side="right"), minlength=3) / len(idx)
    assert np.abs(share - [0.5, 0.3, 0.2]).max() < 0.03, share
    small = idx[idx < 5]
    assert all(sorted(small[k : k + 5].tolist()) == list(range(5)) for k in range(0, len(small) - 4, 5))


def test_draws_are_reproducible_resumable_and_sharded():
    def make(seed=0, **kw):
        return MixtureSampler([3, 7], [1.0, 2.0], seed=seed, epoch_draws=5000, **kw)

    whole = list(make())
    assert whole == list(make()) and whole != list(make(seed=1))
    resumed = make()
    resumed.resume(0, 4100)  # past a block boundary
    assert list(resumed) == whole[4100:]
    ranks = [list(make(rank=r, world_size=2)) for r in (0, 1)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]
    later = make()
    later.set_epoch(1)
    assert list(later) != whole


def test_mixture_batches_resume_where_the_trainer_stopped(specs):
    sources = [
        specs["jsonl"] | {"weight": 1},
        specs["llava"] | {"weight": 3},
        specs["mimicit"] | {"weight": 1},
    ]
    dm, again = _dm(sources, seed=3, epoch_draws=64), _dm(sources, seed=3, epoch_draws=64)
    batches = [b["samples"] for b, _ in zip(dm.train_dataloader(), range(4), strict=False)]
    assert len(batches) == 4 and batches[0] != batches[1]
    assert batches == [b["samples"] for b, _ in zip(again.train_dataloader(), range(4), strict=False)]
    progress = SimpleNamespace(current=SimpleNamespace(processed=2))
    again.trainer = SimpleNamespace(
        global_rank=0,
        world_size=1,
        current_epoch=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    assert next(iter(again.train_dataloader()))["samples"] == batches[2]


def test_bad_images_are_skipped_counted_and_named(specs, tmp_path, caplog):
    bad = tmp_path / "journeydb" / "000" / "bad.jpg"
    bad.write_bytes(b"not an image")
    path = tmp_path / "journeydb" / "train.jsonl"
    path.write_text(json.dumps({"img_path": "000/bad.jpg", "prompt": "x"}) + "\n" + path.read_text())
    dm = _dm([specs["journeydb"]])
    with caplog.at_level(logging.WARNING):
        item = dm.train.parts[0][0]  # falls through to the next record of the same source
    assert item["sample"] == dm.train.parts[0].records[1].sample
    assert dm.skipped == {"corrupt": 1} and "train.jsonl:1" in caplog.text and str(bad) in caplog.text


@pytest.mark.parametrize(
    ("name", "edit", "error", "message"),
    [
        ("llava", {"path": "data/llava/missing.json"}, FileNotFoundError, "'llava'.*data/llava/missing.json"),
        ("vqav2", {"annotations": "nowhere/a.json"}, FileNotFoundError, "nowhere/a.json"),
        ("magicbrush", {"path": "data/magicbrush"}, FileNotFoundError, "data/magicbrush"),
        ("mimicit", {"images": None}, TypeError, "'mimicit'"),
    ],
)
def test_missing_files_fail_at_setup_naming_them(specs, name, edit, error, message):
    spec = {k: v for k, v in (specs[name] | edit).items() if v is not None}
    with pytest.raises(error, match=message):
        _dm([spec])


def test_a_table_missing_a_column_stops_setup_naming_it(specs, tmp_path):
    rows = datasets.Dataset.from_dict({"original_image": ["x"], "edited_image": ["y"]})
    rows.to_parquet(str(tmp_path / "ip2p" / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"'instructpix2pix'.*missing columns \['edit_prompt'\]"):
        _dm([specs["instructpix2pix"]])


def test_a_mixture_batch_trains_stage3_with_labels_on_answers_only(specs, tiny_cfg):
    names = ("journeydb", "instructpix2pix", "coco_captions", "llava", "mimicit", "jsonl")
    dm = _dm([specs[n] for n in names], batch_size=6, seed=1)
    batch = next(iter(dm.train_dataloader()))
    stage = Stage3Instruct(model=tiny_cfg)
    losses = stage.losses(batch)
    assert torch.isfinite(losses["loss"])
    samples = batch["samples"]
    enc = stage.model.encode_images(batch["vision_pixels"])
    seq = stage.sequences(samples, enc)
    tok = stage.model.llm.tokenizer
    for b, sample in enumerate(samples):
        prompt = build_sequences([Sample(sample.prompt)], enc.ids, stage.model.vocab, tok, add_eos=False)
        n_prompt, n = prompt.input_ids.shape[1], int(seq.attention_mask[b].sum())
        assert (seq.labels[b, : n_prompt - 1] == IGNORE).all()  # nothing before the answer is scored
        assert (seq.labels[b, n_prompt - 1 : n - 1] != IGNORE).all()  # the whole answer is
