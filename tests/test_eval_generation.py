"""The generation benchmarks' tasks end to end on tiny sets in their published layouts: text-to-image on
COCO Karpathy test / Flickr30K test (LAVIS' json) and COCO val 30k (the COCO caption file), scored by
pair-wise CLIP similarity with a tiny CLIP, from the runner's predictions or a folder of images."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from morph_lightning.data_modules.sources.templates import TEXT_TO_IMAGE
from morph_lightning.evaluate import main as evaluate_main
from morph_lightning.evaluation.runner import evaluate
from morph_lightning.evaluation.tasks import get_task
from tiny_scorers import save_random_inception, save_tiny_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


def _image(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def karpathy(tmp_path):
    """LAVIS' `coco_karpathy_test.json`: [{"image": "val2014/<file>", "caption": [5 references]}]."""
    records = []
    for k in range(3):
        name = f"val2014/COCO_val2014_{k:012d}.jpg"
        _image(tmp_path / "images" / name, k)
        records.append({"image": name, "caption": [f"picture {k} number {j}" for j in range(5)]})
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(records))
    return tmp_path


def test_coco_text_to_image_asks_for_images_and_scores_them_against_the_references(
    karpathy, clip, tiny_eval_model
):
    task = get_task("coco-t2i")(karpathy, clip_model=clip, caption="1")
    requests = task.requests()
    assert [r.id for r in requests] == [f"COCO_val2014_{k:012d}" for k in range(3)]
    assert (
        requests[2].prompt == TEXT_TO_IMAGE.format(caption="picture 2 number 1")
        and requests[2].output == "image"
    )
    scores = evaluate(task, tiny_eval_model, karpathy / "out", "tiny", batch_size=2)
    assert scores["scored"] == scores["images"] == 3 and -100 <= scores["clip_similarity"] < 100
    assert "Morph-Tokens (paper) | 70.6" in (karpathy / "out" / "table.md").read_text()


def test_a_folder_of_images_scores_alone(karpathy, clip):
    """`--predictions DIR`: another model's images named <id>.png; the references themselves score 100,
    and a missing image is left out of the mean (as GILL's scorer does) and counted."""
    folder = karpathy / "theirs"
    folder.mkdir()
    for k in range(2):
        shutil.copy(
            karpathy / "images" / "val2014" / f"COCO_val2014_{k:012d}.jpg",
            folder / f"COCO_val2014_{k:012d}.png",
        )
    args = ["coco-t2i", "--data", str(karpathy), "--predictions", str(folder), "--out", str(karpathy / "s")]
    scores = evaluate_main([*args, "--option", f"clip_model={clip}"])
    assert scores["scored"] == 2 and scores["images"] == 3
    assert scores["clip_similarity"] == pytest.approx(100, abs=1e-3)
    assert "fid" not in scores  # an option

    inception = save_random_inception(karpathy / "inception.pth")
    fid = ["--option", "fid=true", "--option", f"fid_weights={inception}", "--option", "clip_model="]
    scores = evaluate_main([*args, *fid])
    assert scores["fid"] == pytest.approx(0, abs=1e-2)  # the references themselves
    assert f"FID {scores['fid']:.2f}" in (karpathy / "s" / "table.md").read_text()


def test_coco_val30k_draws_a_fixed_seeded_sample(tmp_path, clip):
    images = [{"id": k, "file_name": f"COCO_val2014_{k:012d}.jpg"} for k in range(10)]
    anns = [
        {"image_id": k, "id": 100 + k * 2 + j, "caption": f"image {k} caption {j}"}
        for k in range(10)
        for j in range(2)
    ]
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    for img in images:
        _image(tmp_path / "images" / img["file_name"], img["id"])
    task = get_task("coco-val30k-t2i")
    first = [(r.id, r.prompt) for r in task(tmp_path, count="4", clip_model=clip).requests()]
    assert first == [(r.id, r.prompt) for r in task(tmp_path, count="4", clip_model=clip).requests()]
    assert len({i for i, _ in first}) == 4
    assert first != [
        (r.id, r.prompt) for r in task(tmp_path, count="4", seed="1", clip_model=clip).requests()
    ]
    for image_id, prompt in first:
        assert f"image {image_id} caption" in prompt


def test_a_missing_clip_model_says_what_to_put_where(karpathy, tiny_eval_model, tmp_path):
    task = get_task("coco-t2i")
    with pytest.raises(FileNotFoundError, match="clip_model=DIR"):
        evaluate(
            task(karpathy, clip_model=str(tmp_path / "nowhere"), limit=1),
            tiny_eval_model,
            karpathy / "o",
            "tiny",
        )
