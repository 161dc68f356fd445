import contextlib
import json
import random

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from morph_lightning.data_modules.world.edits import sample_edit
from morph_lightning.data_modules.world.language import caption
from morph_lightning.data_modules.world.render import render
from morph_lightning.data_modules.world.scene import sample_scene
from morph_lightning.data_modules.world.writer import write_world
from morph_lightning.evaluation import world_eval
from morph_lightning.evaluation.answer_likelihood import answer_nll
from morph_lightning.evaluation.perceptual import weights_path
from morph_lightning.evaluation.report import image_grid, write_report
from morph_lightning.evaluation.world_eval import (
    evaluate_world,
    parse_image,
    score_edit,
    score_t2i,
    to_uint8,
)
from morph_lightning.evaluation.world_metrics import caption_scores
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import ImageRef, Sample, build_sequences

TASKS = {"caption", "vqa", "multi_image", "t2i", "edit", "in_context", "chain", "drift"}
IMAGE_TASKS = ("t2i", "edit", "in_context", "chain")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(
        root, num_pairs=8, num_val_pairs=4, num_instruct=40, num_val_instruct=24, image_size=64, shard_size=8
    )
    return root


@contextlib.contextmanager
def _hub_dir(path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def alex_hub(tmp_path_factory):
    """A torch hub dir holding AlexNet weights under torchvision's file name (random init: no download)."""
    hub = tmp_path_factory.mktemp("hub")
    with _hub_dir(hub):
        weights_path().parent.mkdir(parents=True)
        torch.save(torchvision.models.alexnet().state_dict(), weights_path())
    return hub


@pytest.fixture
def with_lpips(alex_hub):
    with _hub_dir(alex_hub):
        yield


@pytest.fixture
def without_lpips(tmp_path):
    with _hub_dir(tmp_path / "empty_hub"):
        yield


def _favour(model: MorphModel, token: int) -> None:
    """Make the LLM emit `token` wherever it is allowed (<img> is masked inside images, </s> too)."""
    real = model.llm.head

    def head(hidden, text=True):
        logits = real(hidden, text).clone()
        logits[..., token] += 1e4
        return logits

    model.llm.head = head


def _check_ranges(results) -> None:
    assert set(results.metrics) == TASKS
    for task, metrics in results.metrics.items():
        systems = {k.split("/")[0] for k in metrics}
        assert {"model", "baseline"} <= systems, task
        nll = {k: v for k, v in metrics.items() if k.endswith("/answer_nll")}
        assert all(0.0 < v < float("inf") for v in nll.values()), (task, nll)
        assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k not in nll), (task, metrics)
        assert results.counts[task] >= 1


def test_random_model_never_crashes_and_baselines_behave(world, tiny_cfg, with_lpips, monkeypatch):
    model = MorphModel(tiny_cfg).eval()
    encoded = []  # generation never encodes to VQGAN codes: every call here is the ceiling's
    real_encode = model.vqgan.encode_to_codes

    def spy(pixels):
        encoded.append(pixels)
        return real_encode(pixels)

    monkeypatch.setattr(model.vqgan, "encode_to_codes", spy)
    results = evaluate_world(model, world, max_per_task=3, batch_size=2, max_new_tokens=6)
    _check_ranges(results)
    assert results.counts["vqa"] == 3 and results.counts["drift"] == 1
    assert results.notes == []
    for task in ("edit", "chain"):  # copying the input keeps everything and achieves no edit
        assert results.metrics[task]["baseline/kept"] == 1.0
        assert results.metrics[task]["baseline/success"] == 0.0
    for task in ("edit", "in_context", "chain"):
        for system in ("model", "baseline", "random", "ceiling"):
            assert results.metrics[task][f"{system}/lpips"] >= 0.0, (task, system)
    drift = results.metrics["drift"]
    assert {
        f"{s}/{m}_turn{k}" for s in ("model", "baseline") for m in ("l1", "lpips") for k in range(3)
    } <= set(drift)
    # The ceiling is the VQGAN's reconstruction of each target, in batches: the random VQGAN's is far off
    # (the ground-truth target itself would score L1 0).
    assert all(len(batch) <= 2 for batch in encoded)
    assert sum(map(len, encoded)) == sum(results.counts[t] for t in IMAGE_TASKS)
    np.testing.assert_array_equal(to_uint8(encoded[0][0]), results.examples["t2i"][0].target)
    for task in ("edit", "in_context", "chain"):
        assert results.metrics[task]["ceiling/l1"] > 0.0


def test_answer_nll_tells_a_model_that_ignores_its_images(world, tiny_cfg, without_lpips, monkeypatch):
    model = MorphModel(tiny_cfg).eval()
    real_encode = model.encode_images

    def loud(pixels):  # a random encoder maps the world's near-blank images to the same codes: make the
        out = real_encode(pixels)  # morph vectors carry the pixels, so the answers depend on the image
        grid = torch.nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1)  # [N, 3 * 16]
        out.z_q = out.z_q + 10 * grid[:, : out.z_q.shape[-1]].unsqueeze(1)
        return out

    monkeypatch.setattr(model, "encode_images", loud)
    reads = evaluate_world(model, world, max_per_task=4, batch_size=3, max_new_tokens=2).metrics
    for task in ("caption", "vqa", "multi_image"):
        # a random tiny LLM barely reacts to anything, but it does react to the image
        assert abs(reads[task]["model/answer_nll"] - reads[task]["baseline/answer_nll"]) > 1e-6, task
    with torch.no_grad():  # every morph token now enters the LLM as the same vector, whatever the image
        model.llm.morph_in.weight.zero_()
        model.llm.morph_in.bias.zero_()
    blind = evaluate_world(model, world, max_per_task=4, batch_size=3, max_new_tokens=2).metrics
    for task in ("caption", "vqa", "multi_image"):
        assert blind[task]["model/answer_nll"] == blind[task]["baseline/answer_nll"], task


def test_answer_nll_scores_only_answer_tokens(tiny_cfg):
    """Two rows with different prompts (lengths and images) and the same answer: the mean NLL is that of
    the answer's tokens (and </s>) alone, read here from each row's own forward. Scoring any prompt
    token, or reading the answer one position off, changes it."""
    model = MorphModel(tiny_cfg).eval()
    size = model.vision.image_size
    images = [torch.randn(3, size, size), torch.randn(3, size, size)]
    rows = [
        (Sample([ImageRef(0), "What colour is it?"], ["red"]), images[:1]),
        (Sample(["Look:", ImageRef(0), "and", ImageRef(1), "what colour is the second?"], ["red"]), images),
    ]
    tok = model.llm.tokenizer
    answer = [*tok("red", add_special_tokens=False).input_ids, tok.eos_token_id]
    nll = []
    with torch.no_grad():
        for sample, imgs in rows:
            enc = model.encode_images(torch.stack(imgs))
            seq = build_sequences([sample], enc.ids, model.vocab, tok)
            ids = seq.input_ids[0]
            assert ids[-len(answer) :].tolist() == answer
            logp = model.run_llm(seq, enc).logits[0, -len(answer) - 1 : -1].float().log_softmax(-1)
            nll += (-logp.gather(1, ids[-len(answer) :, None])).flatten().tolist()
    assert answer_nll(model, rows) == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_nll(model, [])


def test_a_model_that_never_draws_scores_misses(world, tiny_cfg, with_lpips):
    model = MorphModel(tiny_cfg).eval()
    _favour(model, model.llm.tokenizer.eos_token_id)
    results = evaluate_world(model, world, max_per_task=3, batch_size=4, max_new_tokens=6)
    _check_ranges(results)
    for task in ("t2i", "edit", "in_context", "chain", "drift"):
        assert results.metrics[task]["model/no_image_rate"] == 1.0
        assert all(ex.prediction is None for ex in results.examples[task])
    assert results.metrics["t2i"]["model/position"] == 0.0
    assert results.metrics["edit"]["model/l1"] == results.metrics["drift"]["model/l1_turn2"] == 1.0
    assert results.metrics["edit"]["model/lpips"] == results.metrics["drift"]["model/lpips_turn2"] == 1.0
    assert results.metrics["edit"]["model/changed"] == 0.0  # no credit for "removing" by drawing nothing


def test_image_paths_and_drift_feed_the_models_own_output(world, tiny_cfg, monkeypatch, without_lpips):
    model = MorphModel(tiny_cfg).eval()
    _favour(model, model.vocab.img_start)
    fed = []
    real_generate = world_eval.generate

    def spy(model, prompts, vision_pixels=None, **kw):
        out = real_generate(model, prompts, vision_pixels, **kw)
        fed.append((vision_pixels, out))
        return out

    monkeypatch.setattr(world_eval, "generate", spy)
    results = evaluate_world(model, world, max_per_task=2, batch_size=4, max_new_tokens=4)
    _check_ranges(results)
    for task in ("t2i", "edit", "in_context", "chain", "drift"):
        assert results.metrics[task]["model/no_image_rate"] == 0.0
        assert all(ex.prediction is not None for ex in results.examples[task])
    assert results.metrics["edit"]["model/l1"] < 1.0
    # Without the AlexNet weights LPIPS is left out, and the results say where the file should be.
    assert not any("lpips" in key for metrics in results.metrics.values() for key in metrics)
    assert len(results.notes) == 1 and str(weights_path()) in results.notes[0]
    assert not weights_path().exists()
    # The last three calls are the drift turns: turn k+1 reads turn k's prediction.
    (_, out0), (pix1, _) = fed[-3], fed[-2]
    vision, resolution = model.vision, model.config.vqgan.resolution
    transforms = world_eval.ImageTransforms(vision.image_size, resolution, vision.mean, vision.std)
    expected = transforms(Image.fromarray(to_uint8(out0.pixels[out0.images[0][0]])))[0]
    torch.testing.assert_close(pix1[0], expected)


def test_scoring_helpers_give_ground_truth_full_marks():
    rng = random.Random(0)
    for _ in range(20):
        scene = sample_scene(rng)
        assert score_t2i(render(scene, 64), scene) == dict.fromkeys(score_t2i(None, scene), 1.0)
        assert caption_scores(caption(scene, rng), scene)["attribute_f1"] == 1.0
        edit = sample_edit(scene, rng)
        target = render(edit.target, 64)
        perfect = score_edit(target, target, edit.source, edit.target)
        assert perfect == {"l1": 0.0, "success": 1.0, "kept": 1.0, "changed": 1.0}
        miss = score_edit(None, target, edit.source, edit.target)
        assert miss == {"l1": 1.0, "success": 0.0, "kept": 0.0, "changed": 0.0}
        assert score_edit(None, target, edit.source, edit.target, lpips=lambda p, t: 0.5)["lpips"] == 1.0
        assert score_edit(target, target, edit.source, edit.target, lpips=lambda p, t: 0.5)["lpips"] == 0.5
    small = render(scene, 24)  # below the parser's 48 px: upscaled, not refused
    assert parse_image(small).objects and min(small.shape[:2]) < 48


def test_image_grid_layout():
    a, b = np.zeros((8, 8, 3), np.uint8), np.full((16, 16, 3), 200, np.uint8)
    grid = image_grid([[a, b], [b]], scale=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 32 + 3 * 4, 2 * 32 + 3 * 4, 3)


def test_write_report(world, tiny_cfg, tmp_path, without_lpips):
    model = MorphModel(tiny_cfg).eval()
    _favour(model, model.vocab.img_start)
    results = evaluate_world(model, world, max_per_task=2, batch_size=4, max_new_tokens=4)
    path = write_report(results, tmp_path / "report", extra={"seconds": 1.5, "loss": np.float32(0.25)})
    out = path.parent
    body = json.loads((out / "report.json").read_text())
    assert body["metrics"] == results.metrics and body["extra"]["loss"] == 0.25
    assert body["notes"] == results.notes and results.notes
    md = path.read_text()
    assert md.index(results.notes[0]) < md.index("## ")  # near the top, before any table
    for task, metrics in results.metrics.items():
        assert f"## {task}" in md
        for name in {k.split("/", 1)[1] for k in metrics}:
            assert f"| {name} |" in md
    for task in ("t2i", "edit", "in_context", "chain", "drift"):
        assert f"(grid_{task}.png)" in md
        with Image.open(out / f"grid_{task}.png") as img:
            assert img.size[0] > 3 * 48
    for task in ("caption", "vqa", "multi_image"):  # every task shows its images: text tasks their inputs
        assert f"(grid_{task}.png)" in md
        with Image.open(out / f"grid_{task}.png") as img:
            assert img.size[0] > 2 * 48 and img.size[1] < 2 * 48 + 3 * 4
    assert not list(out.glob(".*.tmp*"))
