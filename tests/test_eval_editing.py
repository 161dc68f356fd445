"""The editing benchmarks' tasks on tiny sets in their published layouts (each fixture says where the layout
comes from): the requests (the training template, the right input image, MagicBrush's output names), runs
end to end with the tiny model and a tiny CLIP, scoring a folder of another model's images (the targets
themselves give L1 0 and CVS 100), missing answers counted, splits kept apart, and MagicBrush's final-turn
chain editing the model's own answers."""

import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from transformers import ViTConfig, ViTModel

from conftest import tiny_model_config
from morph_lightning.data_modules.sources.templates import EDIT
from morph_lightning.evaluate import main as evaluate_main
from morph_lightning.evaluation.perceptual import weights_path
from morph_lightning.evaluation.runner import evaluate
from morph_lightning.evaluation.task import Prediction, read_predictions_jsonl
from morph_lightning.evaluation.tasks import get_task
from morph_lightning.evaluation.tasks.editing import PreviousAnswer, _image, evaluate_final_turn
from morph_lightning.stages.base import MorphStage
from source_files import COLOURS, hf_rows
from tiny_scorers import TINY_VISION, save_tiny_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(ViTConfig(**TINY_VISION, image_size=224, patch_size=16)).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def alexnet_hub(tmp_path):
    """Random AlexNet weights where LPIPS looks for the ImageNet ones (nothing is downloaded)."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    weights_path().parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), weights_path())
    yield
    torch.hub.set_dir(old)


def _png(path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


def _copy_as(src, dst) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)


# ---------------------------------------------------------------- MagicBrush, the test release


@pytest.fixture
def magicbrush_test(tmp_path):
    """The test zip's layout as MagicBrush's `edit_cli_single_multi_turn.py` reads it: `edit_sessions.json`
    maps img_id -> turns {"input", "mask", "output", "instruction"}, images in `images/<img_id>/`
    (`<id>-input.png`, `<id>-output<t>.png`, `<id>-mask<t>.png`). Session 30 has one turn, 139 three (its
    third turn without an "output" key: image_eval.py's digit order finds `139-output3.png`)."""
    root = tmp_path / "test"
    sessions = {"30": 1, "139": 3}
    edits = {}
    for n, (img_id, turns) in enumerate(sessions.items()):
        folder = root / "images" / img_id
        _png(folder / f"{img_id}-input.png", 100 * n)
        edits[img_id] = []
        for t in range(1, turns + 1):
            _png(folder / f"{img_id}-output{t}.png", 100 * n + t)
            _png(folder / f"{img_id}-mask{t}.png", 100 * n + 50 + t)
            turn = {
                "input": f"{img_id}-input.png" if t == 1 else f"{img_id}-output{t - 1}.png",
                "mask": f"{img_id}-mask{t}.png",
                "output": f"{img_id}-output{t}.png",
                "instruction": f"  Make turn {t} of {img_id} blue. ",
            }
            if img_id == "139" and t == 3:
                del turn["output"]
            edits[img_id].append(turn)
    (root / "edit_sessions.json").write_text(json.dumps(edits))
    return root


def test_magicbrush_all_turn_asks_each_turn_from_its_ground_truth_input(
    magicbrush_test, clip, tiny_eval_model
):
    task = get_task("magicbrush-edit")(magicbrush_test, cvs_model=clip)
    requests = task.requests()
    assert [r.id for r in requests] == ["30_1", "139_1", "139_inde_2", "139_inde_3"]
    images = magicbrush_test / "images" / "139"
    assert requests[2].prompt == EDIT.format(instruction="Make turn 2 of 139 blue")  # full stop dropped
    assert requests[2].prompt.endswith("blue. ASSISTANT:") and requests[2].output == "image"
    assert requests[2].images == [str(images / "139-output1.png")]
    assert requests[1].images == [str(images / "139-input.png")]
    assert task.scored()[-1] == ("139_inde_3", str(images / "139-output3.png"))  # found by digit order

    out = magicbrush_test / "out"
    scores = evaluate(task, tiny_eval_model, out, "tiny", batch_size=3)
    assert scores["setting"] == "all-turn" and scores["scored"] == scores["pairs"] == 4
    assert 0 <= scores["l1"] <= 1 and 0 <= scores["l2"] <= 1 and -100 <= scores["cvs"] <= 100
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{r.id}.png" for r in requests)
    table = (out / "table.md").read_text()
    assert "| Morph-Tokens (paper) | 7.6 | 87.9 |" in table and "4 of 4 turns scored" in table
    assert "| 5 w/o deconfound (paper) | 12.2 |" in table  # Table 8's MagicBrush column


def test_magicbrush_folder_of_images_in_its_own_layout_scores_and_counts_the_missing(
    magicbrush_test, clip, dino, tmp_path
):
    """`--predictions DIR` in MagicBrush's generated layout (`<img_id>/<img_id>_inde_2.png`) or flat: the
    ground-truth outputs themselves score L1 0, CVS and DINO 100; a missing image is counted, not scored."""
    theirs, images = tmp_path / "theirs", magicbrush_test / "images"
    _copy_as(images / "30" / "30-output1.png", theirs / "30_1.png")  # flat, as the runner names them
    _copy_as(images / "139" / "139-output1.png", theirs / "139" / "139_1.png")
    _copy_as(images / "139" / "139-output3.png", theirs / "139" / "139_inde_3.png")
    args = ["magicbrush-edit", "--data", str(magicbrush_test), "--predictions", str(theirs)]
    options = ["--option", f"cvs_model={clip}", "--option", f"dino_model={dino}"]
    scores = evaluate_main([*args, "--out", str(tmp_path / "s"), *options])
    assert (scores["scored"], scores["missing"], scores["pairs"]) == (3, 1, 4)
    assert scores["l1"] == 0 and scores["l2"] == 0
    assert scores["cvs"] == pytest.approx(100, abs=1e-3) and scores["dino"] == pytest.approx(100, abs=1e-3)
    table = (tmp_path / "s" / "table.md").read_text()
    assert "| this run | 0.0 | 100.0 |" in table and "Also (same scales): L2 0.0, DINO 100.0" in table

    # a prediction the runner marked as failed is missing too
    task = get_task("magicbrush-edit")(magicbrush_test, cvs_model=clip)
    preds = task.read_predictions(theirs) | {"139_inde_2": Prediction("139_inde_2", error="unreadable image")}
    assert task.score(preds)["scored"] == 3


def test_magicbrush_final_turn_chains_each_turn_on_the_models_own_answer(
    magicbrush_test, clip, tiny_eval_model, tmp_path
):
    make = get_task("magicbrush-edit")
    # through the CLI (one runner pass) only first turns are asked: single-turn sessions alone are scored
    task = make(magicbrush_test, cvs_model=clip, setting="final-turn")
    assert [r.id for r in task.requests()] == ["30_1", "139_1"]
    scores = evaluate(task, tiny_eval_model, tmp_path / "one", "tiny")
    assert (scores["scored"], scores["pairs"], scores["single_turn_sessions"]) == (1, 2, 1)
    assert "1 of 2 sessions scored on their last turn" in (tmp_path / "one" / "table.md").read_text()

    out = tmp_path / "chain"
    task = make(magicbrush_test, cvs_model=clip, setting="final-turn")
    scores = evaluate_final_turn(task, tiny_eval_model, out, "tiny", batch_size=2)
    assert (scores["setting"], scores["scored"], scores["pairs"]) == ("final-turn", 2, 2)
    requests = {r.id: r for r in task.requests()}
    assert list(requests) == ["30_1", "139_1", "139_iter_2", "139_iter_3"]
    source = requests["139_iter_3"].images[0]
    assert isinstance(source, PreviousAnswer) and str(source) == "answer:139_iter_2"
    assert source() == str(out / "images" / "139_iter_2.png")  # what the model drew for turn 2
    assert requests["139_iter_2"].prompt == EDIT.format(instruction="Make turn 2 of 139 blue")
    assert task.scored() == [
        ("30_1", str(magicbrush_test / "images" / "30" / "30-output1.png")),
        ("139_iter_3", str(magicbrush_test / "images" / "139" / "139-output3.png")),
    ]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(requests)

    # a second run resumes every turn; the all-turn setting in the same folder shares the first turns
    before = (out / "images" / "139_iter_3.png").stat().st_mtime_ns
    again = evaluate_final_turn(
        make(magicbrush_test, cvs_model=clip, setting="final-turn"), tiny_eval_model, out, "tiny"
    )
    assert again == scores and (out / "images" / "139_iter_3.png").stat().st_mtime_ns == before
    # another model's run in the same folder: the first pass (first turns only) sets the earlier run aside
    # whole, and the later turns then edit the new model's answers
    other = evaluate_final_turn(
        make(magicbrush_test, cvs_model=clip, setting="final-turn"), tiny_eval_model, out, "b"
    )
    assert other["scored"] == 2 and len(list(out.glob("earlier-*/images/139_iter_3.png"))) == 1
    assert (out / "images" / "139_iter_3.png").exists()
    # a turn whose previous answer has gone stops the run rather than being stored as unanswerable
    with pytest.raises(FileNotFoundError, match="the answer to 139_iter_2"):
        PreviousAnswer(tmp_path / "nowhere", "139_iter_2")()
    with pytest.raises(ValueError, match="setting=final-turn"):
        evaluate_final_turn(make(magicbrush_test, cvs_model=clip), tiny_eval_model, out, "tiny")
    with pytest.raises(ValueError, match="setting must be one of"):
        make(magicbrush_test, setting="last-turn")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A stage checkpoint of a tiny random model, as `--checkpoint` reads it."""
    stage = MorphStage(model=tiny_model_config())
    path = tmp_path_factory.mktemp("model") / "last.ckpt"
    torch.save({"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams)}, path)
    return str(path)


def test_magicbrush_final_turn_from_the_cli_edits_the_answer_and_scores_the_last_turn(
    magicbrush_test, clip, tiny_checkpoint, tmp_path
):
    """`evaluate magicbrush-edit --option setting=final-turn` on a 2-turn session: turn 2 is asked with the
    image the model drew for turn 1, and the session is scored on turn 2 against its ground truth."""
    sessions = json.loads((magicbrush_test / "edit_sessions.json").read_text())
    (magicbrush_test / "two_turns.json").write_text(json.dumps({"139": sessions["139"][:2]}))
    out = tmp_path / "final"
    args = ["magicbrush-edit", "--data", str(magicbrush_test), "--checkpoint", tiny_checkpoint]
    options = [
        "--option",
        "setting=final-turn",
        "--option",
        "file=two_turns.json",
        "--option",
        f"cvs_model={clip}",
    ]
    scores = evaluate_main([*args, "--out", str(out), *options])
    assert (scores["setting"], scores["scored"], scores["pairs"], scores["turns"]) == ("final-turn", 1, 1, 2)
    answers = read_predictions_jsonl(out / "predictions.jsonl")
    assert sorted(answers) == ["139_1", "139_iter_2"]

    task = get_task("magicbrush-edit")(
        magicbrush_test, cvs_model=clip, setting="final-turn", file="two_turns.json"
    )
    second = task.items[1]
    edits_answer = task.request(second, PreviousAnswer(out / "images", "139_1")).fingerprint()
    assert answers["139_iter_2"].request == edits_answer != task.request(second).fingerprint()
    target = str(magicbrush_test / "images" / "139" / "139-output2.png")
    assert task.scored() == [("139_iter_2", target)]
    drawn = {"139_iter_2": Prediction("139_iter_2", image=str(out / "images" / "139_iter_2.png"))}
    assert scores["l1"] == task.score(drawn)["l1"]
    assert "1 of 1 sessions scored on their last turn" in (out / "table.md").read_text()
    files = sorted(p.name for p in out.glob("*.*"))  # only the last pass scores: no scores set aside
    assert files == ["predictions.jsonl", "run.json", "scores.json", "table.md"]
    with pytest.raises(SystemExit, match="final-turn runs on one device"):
        evaluate_main([*args, "--out", str(tmp_path / "ddp"), *options, "--devices", "2"])


# ---------------------------------------------------------------- MagicBrush, the Hub dataset


@pytest.fixture
def magicbrush_hub(tmp_path):
    """osunlp/MagicBrush as the Hub serves it (dataset card): `data/train-*.parquet` and `data/dev-*.parquet`,
    columns img_id (string), turn_index (int32), source_img, mask_img, target_img (images), instruction; a
    turn's source is the previous turn's target. Rows are written out of turn order here."""
    data = tmp_path / "MagicBrush" / "data"
    data.mkdir(parents=True)
    for split, rows in {
        "train": [("7", 2, "green", "make it blue.", "blue"), ("7", 1, "red", "make it green", "green")],
        "dev": [("9", 1, "white", "make it red", "red"), ("8", 1, "blue", "make it white", "white")],
    }.items():
        names = ("img_id", "turn_index", "source_img", "instruction", "target_img")
        cols = {k: list(v) for k, v in zip(names, zip(*rows, strict=True), strict=True)}
        cols["mask_img"] = ["white"] * len(rows)
        rows = hf_rows(cols, ("source_img", "mask_img", "target_img"), {"turn_index": "int32"})
        rows.to_parquet(str(data / f"{split}-00000-of-00001-a1b2.parquet"))
    return tmp_path / "MagicBrush"


def _colour(src) -> str:
    return {v: k for k, v in COLOURS.items()}[_image(src).getpixel((0, 0))]


def test_magicbrush_hub_dataset_dev_by_default_and_splits_stay_apart(magicbrush_hub, clip, tmp_path):
    make = get_task("magicbrush-edit")
    cache = str(tmp_path / "cache")
    dev = make(magicbrush_hub, cvs_model=clip, cache_dir=cache)
    assert [r.id for r in dev.requests()] == ["9_1", "8_1"]
    assert [_colour(r.images[0]) for r in dev.requests()] == ["white", "blue"]
    train = make(magicbrush_hub, cvs_model=clip, cache_dir=cache, split="train")
    requests = train.requests()
    assert [r.id for r in requests] == ["7_1", "7_inde_2"]  # ordered by turn_index
    assert [_colour(r.images[0]) for r in requests] == ["red", "green"]
    assert requests[1].prompt == EDIT.format(instruction="make it blue")
    assert str(requests[1].images[0]) == str(requests[1].images[0])  # a stable name for the fingerprint
    with pytest.raises(ValueError, match="no split 'test'"):
        make(magicbrush_hub, cache_dir=cache, split="test")

    # the targets as another model's images score perfectly; the other split's ids do not count
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for id, target in dev.scored()[:1]:
        _image(target).save(theirs / f"{id}.png")
    _image(train.scored()[0][1]).save(theirs / "7_1.png")
    scores = dev.score(dev.read_predictions(theirs))
    assert (scores["scored"], scores["pairs"], scores["l1"]) == (1, 2, 0)
    assert scores["cvs"] == pytest.approx(100, abs=1e-3)


# ---------------------------------------------------------------- InstructPix2Pix


@pytest.fixture
def ip2p(tmp_path):
    """The original release (timothybrooks/instruct-pix2pix, `edit_dataset.py`): `seeds.json` lists
    [name, [seeds]]; `<name>/prompt.json` has "edit"; each seed a pair `<seed>_0.jpg` / `<seed>_1.jpg`."""
    root = tmp_path / "clip-filtered-dataset"
    seeds = []
    for k in range(40):
        name = f"{k:07d}"
        seeds.append([name, [10 * k + 3, 10 * k + 1]])
        (root / name).mkdir(parents=True)
        (root / name / "prompt.json").write_text(
            json.dumps({"input": "a", "edit": f"edit {k}.", "output": "b"})
        )
        for seed in seeds[-1][1]:
            for side in (0, 1):
                _png(root / name / f"{seed}_{side}.jpg", 1000 * k + 10 * seed + side)
    (root / "seeds.json").write_text(json.dumps(seeds))
    return root


def test_ip2p_test_cut_is_the_last_five_percent_first_seed_each(ip2p, clip, tmp_path):
    make = get_task("ip2p-edit")
    test = make(ip2p, cvs_model=clip)
    requests = test.requests()
    assert [r.id for r in requests] == ["0000038_383", "0000039_393"]  # floor(.95 * 40) = 38 on
    assert requests[0].prompt == EDIT.format(instruction="edit 38")
    assert requests[0].images == [str(ip2p / "0000038" / "383_0.jpg")]
    assert [r.id for r in make(ip2p, split="val").requests()] == ["0000036_363", "0000037_373"]
    assert len(make(ip2p, split="train").requests()) == 36
    assert [r.id for r in make(ip2p, limit=1).requests()] == ["0000038_383"]

    theirs = tmp_path / "theirs"
    _copy_as(ip2p / "0000039" / "393_1.jpg", theirs / "0000039_393.png")
    _copy_as(ip2p / "0000037" / "373_1.jpg", theirs / "0000037_373.png")  # a val item: not scored here
    args = ["ip2p-edit", "--data", str(ip2p), "--predictions", str(theirs), "--out", str(tmp_path / "s")]
    scores = evaluate_main([*args, "--option", f"cvs_model={clip}"])
    assert (scores["scored"], scores["pairs"], scores["l1"]) == (1, 2, 0)
    assert scores["cvs"] == pytest.approx(100, abs=1e-3)
    with pytest.raises(ValueError, match="split must be one of"):
        make(ip2p, split="dev")


# ---------------------------------------------------------------- EVR and MA5k


@pytest.fixture
def evr(tmp_path):
    """airsplay/VisualRelationships `dataset/adobe/test.json`: [{"img0", "img1", "sents" (three for
    valid/test), "uid"}], the images by file name."""
    records = []
    for k in range(3):
        img0, img1 = f"Reddit.com_{k}_{k}.jpg", f"Reddit.com_{k}_edit.png"
        _png(tmp_path / "images" / img0, 2 * k)
        _png(tmp_path / "images" / img1, 2 * k + 1)
        records.append(
            {"img0": img0, "img1": img1, "sents": [f"remove {k} ", f"erase {k}.", "x"], "uid": f"R_{k}"}
        )
    (tmp_path / "test.json").write_text(json.dumps(records))
    return tmp_path


def test_evr_requests_one_of_three_sentences_and_scores_l1_cvs(evr, clip, tiny_eval_model):
    make = get_task("evr-edit")
    task = make(evr, cvs_model=clip, limit=2)
    requests = task.requests()
    assert [r.id for r in requests] == ["R_0", "R_1"]
    assert requests[1].prompt == EDIT.format(instruction="remove 1")
    assert requests[1].images == [str(evr / "images" / "Reddit.com_1_1.jpg")]
    assert make(evr, sentence="1").requests()[1].prompt == EDIT.format(instruction="erase 1")
    scores = evaluate(task, tiny_eval_model, evr / "out", "tiny")
    assert scores["scored"] == 2 and 0 <= scores["l1"] <= 1
    table = (evr / "out" / "table.md").read_text()
    assert "| Model | EVR L1 ↓ | EVR CVS ↑ |" in table and "| Morph-Tokens (paper) | 15.3 | 82.6 |" in table


@pytest.fixture
def ma5k(tmp_path):
    """jshi31/T2ONet `data/FiveK/annotations/test_sess_1.json`: [{"input", "output", "request",
    "request_idx"}], file names under `images/` (`3458_O.jpg` -> `3458_B.jpg`)."""
    pairs = [("3458_O.jpg", "3458_B.jpg"), ("1928_O.jpg", "1928_A.jpg"), ("1928_O.jpg", "1928_A.jpg")]
    records = []
    for k, (src, tgt) in enumerate(pairs):
        _png(tmp_path / "images" / src, 2 * k)
        _png(tmp_path / "images" / tgt, 2 * k + 1)
        records.append({"input": src, "output": tgt, "request": f"brighten {k}.", "request_idx": [1, 2]})
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "test_sess_1.json").write_text(json.dumps(records))
    return tmp_path


def test_ma5k_scores_l1_and_lpips(ma5k, clip, alexnet_hub, tmp_path):
    task = get_task("ma5k-edit")(ma5k, cvs_model=clip)
    requests = task.requests()
    assert [r.id for r in requests] == ["3458_O-3458_B", "1928_O-1928_A", "1928_O-1928_A-2"]
    assert requests[0].prompt == EDIT.format(instruction="brighten 0")
    theirs = tmp_path / "theirs"
    _copy_as(ma5k / "images" / "3458_B.jpg", theirs / "3458_O-3458_B.png")
    scores = task.score(task.read_predictions(theirs))
    assert (scores["scored"], scores["missing"]) == (1, 2)
    assert scores["l1"] == 0 and scores["lpips"] == pytest.approx(0, abs=1e-6)
    table = task.table(scores)
    assert (
        "| Model | MA5K L1 ↓ | MA5K LPIPS ↓ |" in table and "| Morph-Tokens (paper) | 14.6 | 27.9 |" in table
    )
    assert "| this run | 0.0 | 0.0 |" in table and "Also (same scales): L2 0.0, CVS 100.0" in table
