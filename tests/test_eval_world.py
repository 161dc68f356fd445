"""The world as evaluation data: its text tasks as the `world-text` task, and its DEMON-layout split."""

import json
import shutil

import pytest

from morph_lightning.data_modules.bad_records import BadRecords
from morph_lightning.data_modules.instruct import read_jsonl
from morph_lightning.data_modules.world.demon import MAKERS
from morph_lightning.data_modules.world.writer import write_world
from morph_lightning.evaluate import main as evaluate_main
from morph_lightning.evaluation.runner import evaluate
from morph_lightning.evaluation.tasks import get_task
from morph_lightning.evaluation.tasks.demon import Demon
from morph_lightning.evaluation.tasks.world_text import WorldText
from morph_lightning.evaluation.world_generation import write_generation_splits

SMALL = {"num_pairs": 8, "num_val_pairs": 4, "num_instruct": 30, "num_val_instruct": 60}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, num_demon=12, num_demon_train=4, **SMALL)
    return root


def test_the_demon_split_is_in_demons_layout(world):
    for name in MAKERS:
        body = json.loads((world / "demon" / name / "core" / "core.json").read_text())
        meta, data = body["metadata"], body["data"]
        assert meta["dataset"] == name and meta["split"] == "core" and meta["num_sample"] == len(data) == 12
        assert meta["question_type"] in ("open-ended", "multi-choice") and meta["task_instruction"]
        for item in data:
            instance = item["task_instance"]
            assert 0 <= item["task_instruction_id"] < len(meta["task_instruction"])
            marks = [f"{{image#{k}}}" for k in range(1, len(instance["images_path"]) + 1)]
            assert all(mark in instance["context"] for mark in marks)
            assert all(
                (world / "demon" / name / "core" / "images" / p).exists() for p in instance["images_path"]
            )
            if "choice_list" in instance:
                assert item["response"] in instance["choice_list"]
    in_context = json.loads((world / "demon" / "World_InContext" / "core" / "core.json").read_text())["data"]
    assert {item["response"] for item in in_context} <= {"Image A", "Image B", "Image C", "Image D"}


def test_the_demon_split_leaves_the_training_data_as_it_was(world, tmp_path):
    write_world(tmp_path, **SMALL)
    for path in ("instruct/train.jsonl", "instruct/val.jsonl", "text/train.txt"):
        assert (tmp_path / path).read_text() == (world / path).read_text()


def test_the_demon_training_records_ask_as_the_demon_task_does(world):
    bad = BadRecords()
    records = read_jsonl(str(world / "instruct" / "demon_train.jsonl"), bad)  # the stage-3 reader takes them
    assert len(records) == 4 * len(MAKERS) and not bad.total
    lines = [json.loads(line) for line in (world / "instruct" / "demon_train.jsonl").read_text().splitlines()]
    asked = {r.prompt for r in Demon(world / "demon").requests()}
    for line in lines:
        body = json.loads((world / "demon" / line["dataset"] / "core" / "core.json").read_text())
        instructions = body["metadata"]["task_instruction"]
        assert line["input_text"].startswith("USER: ") and any(i in line["input_text"] for i in instructions)
        if line["dataset"] == "World_MultiImage":
            assert "Choice list:['" in line["input_text"] and line["input_text"].endswith(
                "Your answer is: ASSISTANT:"
            )
    # the same prompt format: a training record rebuilt through the evaluation task reads the same
    demon_text = next(line for line in lines if line["dataset"] == "World_MultiImage")["input_text"]
    assert any(p.split("Question:")[0] == demon_text.split("Question:")[0] for p in asked)


def test_world_text_scores_exactly(world, tmp_path):
    task = WorldText(world)
    vqa = task.records["vqa"]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": r["id"], "text": r["output_text"]}) + "\n" for r in vqa))
    scores = evaluate_main(
        ["world-text", "--data", str(world), "--predictions", str(preds), "--out", str(tmp_path / "o")]
    )
    assert scores["vqa"]["model/exact_match"] == 1.0 and scores["vqa"]["n"] == len(vqa)
    assert scores["multi_image"]["model/exact_match"] == 0.0  # no predictions: empty answers
    assert json.loads((tmp_path / "o" / "scores.json").read_text()) == scores


def test_world_text_runs_a_model_end_to_end(world, tmp_path, tiny_eval_model):
    scores = evaluate(WorldText(world, limit=2), tiny_eval_model, tmp_path / "o", "tiny")
    assert set(scores) == {"caption", "vqa", "multi_image"}
    assert all(s["n"] == 2 for s in scores.values())
    assert len((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()) == 6


def test_demon_reads_the_worlds_categories_and_image_choices(world, tmp_path, tiny_eval_model):
    task = Demon(world / "demon")
    kinds = {d.name: (d.category, task._kind(d)) for d in task.datasets}
    assert kinds == {
        "World_MultiImage": ("MMR", "multi-choice"),
        "World_ImageDiff": ("VRI", "open-ended"),
        "World_InContext": ("MMC", "image-choice"),
    }
    scores = evaluate(Demon(world / "demon", limit=2), tiny_eval_model, tmp_path / "o", "tiny")
    assert list(scores["categories"]) == ["VRI", "MMC", "MMR"]  # Table 3's order
    assert "| this model | - | - |" in (tmp_path / "o" / "table.md").read_text()


def test_an_unknown_category_in_the_metadata_is_named(world, tmp_path):
    shutil.copytree(world / "demon" / "World_ImageDiff", tmp_path / "Mine")
    path = tmp_path / "Mine" / "core" / "core.json"
    body = json.loads(path.read_text())
    body["metadata"]["category"] = "poetry"
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="unknown category 'poetry'"):
        Demon(tmp_path)


def test_the_generation_splits_are_read_by_the_public_benchmarks_tasks(world, tmp_path, tiny_eval_model):
    """`make eval-generation` without paths: the world's text-to-image records in LAVIS' COCO layout and its
    edits and chains as MagicBrush's Hub dataset, scored by L1 (the world ships no CLIP)."""
    records = [json.loads(line) for line in (world / "instruct" / "val.jsonl").read_text().splitlines()]
    sizes = write_generation_splits(world, tmp_path / "gen")
    t2i = [r for r in records if r["task"] == "t2i"]
    chains = {r["chain"] for r in records if r["task"] == "chain"}
    assert sizes["text-to-image"] == len(t2i) > 0 and sizes["sessions"] == sum(
        r["task"] == "edit" for r in records
    ) + len(chains)
    task = get_task("coco-t2i")(tmp_path / "gen", clip_model="", l1="true")
    assert [r.prompt for r in task.requests()] == [
        r["input_text"] for r in t2i
    ]  # the training template, unchanged
    assert evaluate(task, tiny_eval_model, tmp_path / "t2i", "tiny")["l1"] > 0
    edit = get_task("magicbrush-edit")(tmp_path / "gen" / "magicbrush", cvs_model="")
    asked = {r.id: r for r in edit.requests()}
    for r in records:
        if r["task"] == "edit":
            assert asked[f"{r['id']}_1"].prompt == r["input_text"]
    scores = evaluate(edit, tiny_eval_model, tmp_path / "edit", "tiny")
    assert scores["scored"] == scores["pairs"] > 0 and scores["l1"] > 0 and scores["cvs_model"] is None
    before = (tmp_path / "gen" / "coco_karpathy_test.json").stat().st_mtime_ns
    write_generation_splits(world, tmp_path / "gen")  # a second run leaves the splits as they are
    assert (tmp_path / "gen" / "coco_karpathy_test.json").stat().st_mtime_ns == before
