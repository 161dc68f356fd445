"""The world writer: real webdataset shards and instruction jsonl that read back to their ground truth."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from morph_lightning.data_modules.world import parse
from morph_lightning.data_modules.world.writer import (
    CHAIN_TURNS,
    IMAGE_MARK,
    TASKS,
    allocate,
    scene_from_json,
    write_world,
)

SMALL = dict(num_pairs=50, num_val_pairs=12, num_instruct=70, num_val_instruct=21, shard_size=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, write_world(out, seed=3, **SMALL)


def _records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / "instruct" / f"{split}.jsonl").read_text().splitlines()]


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_pairs_are_webdataset_shards_that_parse_back(world: tuple[Path, dict]) -> None:
    out, counts = world
    assert sorted(p.name for p in (out / "pairs" / "train").iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    for split, n in (("train", 50), ("val", 12)):
        last = len(list((out / "pairs" / split).glob("*.tar"))) - 1
        pattern = str(out / "pairs" / split / f"{{00000..{last:05d}}}.tar")
        samples = list(wds.WebDataset(pattern, shardshuffle=False))
        assert counts["pairs"][split] == len(samples) == n
        exact = 0
        for i, s in enumerate(samples):
            assert s["__key__"] == f"{i:09d}" and {"jpg", "txt", "json"} <= set(s)
            meta = json.loads(s["json"])
            assert meta["key"] == s["__key__"] and meta["caption"] == s["txt"].decode()
            assert meta["status"] == "success" and meta["width"] == meta["height"] == 48
            image = _decode(s["jpg"])
            assert image.shape == (48, 48, 3)
            exact += parse(image) == scene_from_json(meta["scene"])
        assert exact >= 0.98 * n


def test_instruct_records_follow_the_schema(world: tuple[Path, dict]) -> None:
    out, counts = world
    for split in ("train", "val"):
        records = _records(out, split)
        assert {t: sum(r["task"] == t for r in records) for t in TASKS} == counts["instruct"][split]
        assert set(r["task"] for r in records) == set(TASKS)
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert {"input_img", "output_img", "input_text", "output_text"} <= set(r)
            assert r["input_text"].startswith("USER: ") and r["input_text"].endswith(" ASSISTANT:")
            assert r["input_text"].count(IMAGE_MARK) == len(r["input_img"])
            assert (r["output_img"] is None) != (r["output_text"] is None)
            for rel in r["input_img"] + ([r["output_img"]] if r["output_img"] else []):
                assert not Path(rel).is_absolute() and (out / "instruct" / rel).is_file()
            if r["output_img"] and "scene_out" in r:  # generated targets read back to their ground truth
                assert parse(_decode((out / "instruct" / r["output_img"]).read_bytes())) == scene_from_json(
                    r["scene_out"]
                )
    train = _records(out, "train")
    t2i = next(r for r in train if r["task"] == "t2i")
    assert re.fullmatch(
        r"USER: .+ Generate an image based on the description\. ASSISTANT:", t2i["input_text"]
    )
    multi = next(r for r in train if r["task"] == "multi_image")
    assert multi["input_text"].startswith("USER: This is the first image. <image> This is the second image.")
    in_context = next(r for r in train if r["task"] == "in_context")
    assert in_context["input_text"] == "USER: " + " ".join([IMAGE_MARK] * 5) + " ASSISTANT:"


def test_chain_turns_link(world: tuple[Path, dict]) -> None:
    out, _ = world
    chains: dict[str, list[dict]] = {}
    for r in _records(out, "train"):
        if r["task"] == "chain":
            chains.setdefault(r["chain"], []).append(r)
    assert chains
    for turns in chains.values():
        assert [r["turn"] for r in turns] == list(range(CHAIN_TURNS))
        for prev, cur in zip(turns, turns[1:], strict=False):
            assert cur["input_img"] == [prev["output_img"]] and cur["scene_in"] == prev["scene_out"]


def test_allocate_fills_whole_chains() -> None:
    counts = allocate(70, {t: 1.0 for t in TASKS})
    assert sum(counts.values()) == 70 and counts["chain"] % CHAIN_TURNS == 0
    assert allocate(10, {"chain": 1.0}) == {**dict.fromkeys(TASKS, 0), "chain": 12}
    assert allocate(2, {"chain": 1.0, "t2i": 0.01}) == {**dict.fromkeys(TASKS, 0), "t2i": 2}
    assert all(n > 0 for n in allocate(21, {t: 1.0 for t in TASKS}).values())


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_deterministic_resumable_and_seeded(world: tuple[Path, dict], tmp_path: Path) -> None:
    out, counts = world
    again = tmp_path / "again"
    assert write_world(again, seed=3, **SMALL) == counts
    first, second = _snapshot(out), _snapshot(again)
    assert first.keys() == second.keys() and first == second  # byte-identical, tars included

    mtimes = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    assert write_world(again, seed=3, **SMALL) == counts
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == mtimes

    other = tmp_path / "other"
    write_world(other, seed=4, **SMALL)
    assert (other / "instruct" / "train.jsonl").read_text() != (out / "instruct" / "train.jsonl").read_text()


def test_changed_settings_rewrite_and_drop_stale_files(tmp_path: Path) -> None:
    write_world(
        tmp_path, seed=0, num_pairs=30, num_val_pairs=0, num_instruct=14, num_val_instruct=0, shard_size=10
    )
    (tmp_path / "instruct" / ".train.jsonl.tmp123").write_text("half")  # an interrupted run's leftover
    counts = write_world(
        tmp_path, seed=0, num_pairs=30, num_val_pairs=0, num_instruct=14, num_val_instruct=0, shard_size=30
    )
    assert counts["pairs"]["train"] == 30
    assert [p.name for p in (tmp_path / "pairs" / "train").iterdir()] == ["00000.tar"]
    assert not list((tmp_path / "instruct").glob(".*"))
    manifest = json.loads((tmp_path / "world.json").read_text())
    assert manifest["settings"]["shard_size"] == 30 and manifest["counts"] == counts


def test_text_corpus_and_tokenizer(world: tuple[Path, dict]) -> None:
    out, counts = world
    for split in ("train", "val"):
        lines = (out / "text" / f"{split}.txt").read_text().splitlines()
        records = _records(out, split)
        assert len(lines) == counts["pairs"][split] + len(records)
        assert not any("<image>" in line for line in lines)
        assert lines[-1].endswith(records[-1]["output_text"] or "ASSISTANT:")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    caption = (out / "text" / "train.txt").read_text().splitlines()[0]
    assert tok.decode(tok(caption).input_ids) == caption and len(tok(caption).input_ids) < len(caption) / 2
