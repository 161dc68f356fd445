"""The captioning benchmarks: their published annotation layouts read from tiny folders built here,
pycocoevalcap's CIDEr(-D) against a hand computation, the caption clean-up, and each task end to end with
the tiny random model. METEOR is off throughout: its Java start-up alone takes 5 to 10 seconds."""

import json
import math

import pytest
from PIL import Image

from morph_lightning.evaluation.runner import evaluate
from morph_lightning.evaluation.task import Prediction
from morph_lightning.evaluation.tasks import get_task
from morph_lightning.evaluation.tasks.captioning import CocoKarpathyCaption, Flickr30kCaption, NoCapsCaption
from morph_lightning.evaluation.tasks.common import clean_answer

FAST = {"num_beams": "2", "max_new_tokens": "4", "min_new_tokens": "2", "meteor": "false"}


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), (200, 30, 90)).save(path)


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def coco_lavis_dir(root):
    """LAVIS' layout: annotations/coco_karpathy_test.json, images/val2014/..."""
    records = [
        {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["A b c.", "a b", "a b c d"]},
        {"image": "val2014/COCO_val2014_000000000002.jpg", "caption": ["d e", "D e f!"]},
    ]
    _json(root / "coco_karpathy_test.json", records)
    for r in records:
        _image(root / "images" / r["image"])
    return root


def coco_karpathy_dir(root):
    """Karpathy's dataset_coco.json: every split in one file."""
    images = [
        {"filepath": "val2014", "filename": f"COCO_val2014_00000000000{k}.jpg", "split": split, "cocoid": k,
         "sentences": [{"raw": f"caption {k} {n}", "tokens": []} for n in range(5)]}
        for k, split in [(1, "test"), (2, "train"), (3, "restval"), (4, "test")]
    ]  # fmt: skip
    _json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    for image in images:
        _image(root / image["filepath"] / image["filename"])
    return root


def flickr_dir(root):
    """LAVIS' flickr30k_test.json, the image folder beside it."""
    records = [
        {"image": f"flickr30k-images/{k}.jpg", "caption": [f"a dog number {k}", "a dog"]} for k in (10, 11)
    ]
    _json(root / "flickr30k_test.json", records)
    for r in records:
        _image(root / r["image"])
    return root


def nocaps_dir(root):
    """The official COCO-format nocaps_val_4500_captions.json, images by file name."""
    domains = ["in-domain", "out-domain", "near-domain", "out-domain"]
    images = [
        {"id": k, "file_name": f"{k:04x}beef.jpg", "domain": d, "open_images_id": "x"}
        for k, d in enumerate(domains)
    ]
    annotations = [
        {"image_id": k, "id": 10 * k + n, "caption": f"a photo of thing {k} {'big' if n else 'small'}"}
        for k in range(4)
        for n in range(2)
    ]
    _json(root / "nocaps_val_4500_captions.json", {"images": images, "annotations": annotations, "info": {}})
    for image in images:
        _image(root / "images" / image["file_name"])
    return root


def test_clean_answer():
    assert clean_answer("  a dog on a mat.\nUSER: more") == "a dog on a mat."
    assert clean_answer("a cat###USER: hi") == "a cat"
    assert clean_answer("\n\n a bird </s> junk") == "a bird"
    assert clean_answer("###") == ""


def test_coco_reads_lavis_layout_with_instructblip_settings(tmp_path):
    task = CocoKarpathyCaption(coco_lavis_dir(tmp_path))
    reqs = task.requests()
    assert [r.id for r in reqs] == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    assert reqs[0].prompt == "USER: <image> A short image caption. ASSISTANT:"
    assert reqs[0].images == [str(tmp_path / "images" / "val2014" / "COCO_val2014_000000000001.jpg")]
    assert (reqs[0].num_beams, reqs[0].max_new_tokens, reqs[0].min_new_tokens, reqs[0].length_penalty) == (
        5,
        80,
        10,
        1.0,
    )
    assert task.items[1].references == ["d e", "D e f!"]
    assert CocoKarpathyCaption(tmp_path, num_beams="3", meteor="no").requests()[0].num_beams == 3


def test_coco_reads_karpathys_file_by_split(tmp_path):
    coco_karpathy_dir(tmp_path)
    task = CocoKarpathyCaption(tmp_path, file="dataset_coco.json", images=".")
    assert [i.id for i in task.items] == ["COCO_val2014_000000000001", "COCO_val2014_000000000004"]
    assert task.items[0].references == [f"caption 1 {n}" for n in range(5)]
    restval = CocoKarpathyCaption(tmp_path, file="dataset_coco.json", split="restval")
    assert [i.id for i in restval.items] == ["COCO_val2014_000000000003"]


def test_missing_files_name_the_option(tmp_path):
    flickr_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="option file"):
        CocoKarpathyCaption(tmp_path)
    (tmp_path / "flickr30k-images" / "10.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="option images"):
        Flickr30kCaption(tmp_path)


def _cider_d_by_hand():
    """CIDEr-D (EVAL_PROTOCOLS §8.2) of two images, each n-gram in one image's references only, so every
    idf is log(N) - log(1) = log 2 and cancels in the cosines.

    Image 1: reference "a dog runs", caption "a dog" (after the PTB tokenizer). 1-grams: caption {a, dog},
    reference {a, dog, runs}: cosine 2 / (sqrt 2 sqrt 3); 2-grams: {a dog} against {a dog, dog runs}:
    1 / sqrt 2; no 3- or 4-grams in the caption: 0. The length penalty exp(-(2 - 3)^2 / (2 * 6^2))
    multiplies each. Image 2: caption = its one reference "two cats": cosines 1, 1, 0, 0. Per image
    10 * mean over n / number of references; corpus = the mean."""
    image1 = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    image2 = 10 * (1 + 1) / 4
    return 100 * (image1 + image2) / 2


def test_cider_matches_the_hand_computation(tmp_path):
    root = tmp_path
    _json(
        root / "flickr30k_test.json",
        [{"image": "1.jpg", "caption": ["A dog runs."]}, {"image": "2.jpg", "caption": ["two cats"]}],
    )
    _image(root / "1.jpg")
    task = Flickr30kCaption(root, meteor="false")
    scores = task.score({"1": Prediction("1", text="a Dog!"), "2": Prediction("2", text="Two cats.\nmore")})
    assert scores["all"]["CIDEr"] == pytest.approx(_cider_d_by_hand(), rel=1e-9)
    assert scores["all"]["Bleu_1"] == pytest.approx(100 * 4 / 4 * math.exp(1 - 5 / 4), rel=1e-6)
    assert "METEOR" not in scores["all"]
    # A missing caption scores as the empty caption: image 2 adds 0.
    missing = task.score({"1": Prediction("1", text="a dog")})["all"]
    assert missing["CIDEr"] == pytest.approx(_cider_d_by_hand() - 100 * 10 * 2 / 4 / 2)
    assert missing["answered"] == 1


def test_nocaps_scores_overall_and_per_domain(tmp_path):
    task = NoCapsCaption(nocaps_dir(tmp_path), meteor="false")
    assert [(i.id, i.domain) for i in task.items][:2] == [("0", "in-domain"), ("1", "out-domain")]
    assert task.requests()[3].images == [str(tmp_path / "images" / "0003beef.jpg")]
    preds = {str(k): Prediction(str(k), text=f"a photo of thing {k} big") for k in range(4)}
    scores = task.score(preds)
    assert set(scores) == {"all", "in-domain", "near-domain", "out-domain"}
    assert scores["out-domain"]["images"] == 2 and scores["all"]["images"] == 4
    # Each domain is scored on its own: its document frequencies come from its own images.
    assert scores["in-domain"]["CIDEr"] != scores["all"]["CIDEr"]
    table = task.table(scores)
    assert "| Morph-Tokens (paper) | 124.0 |" in table and "| InstructBLIP (paper) | 120.0 |" in table


E2E = {
    "coco-caption": coco_lavis_dir,
    "flickr30k-caption": flickr_dir,
    "nocaps": nocaps_dir,
}


@pytest.mark.parametrize("name", sorted(E2E))
def test_end_to_end_with_the_tiny_model(tmp_path, tiny_eval_model, name):
    task = get_task(name)(E2E[name](tmp_path / "data"), **FAST)
    scores = evaluate(task, tiny_eval_model, tmp_path / "out", "tiny", batch_size=4)
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [r.id for r in task.requests()]
    assert all("error" not in p and p["text"] for p in preds)
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == scores
    assert scores["all"]["answered"] == len(preds) and scores["all"]["CIDEr"] >= 0
    assert "| this run |" in (tmp_path / "out" / "table.md").read_text()
