"""Scores a `MorphModel` on the embedded world's instruction split, every metric beside a trivial baseline.

`evaluate_world` groups `instruct/{split}.jsonl` by task, generates a batch of answers per task and
scores them against the scenes the writer recorded:

* caption: caption_scores of the text vs the scene; baseline: another record's caption.
* vqa / multi_image: exact match; baseline: the majority training answer of the same task.
  (These two are `tasks.world_text.text_metrics`, which the `world-text` evaluation task scores with.)
* every text task also gets `answer_nll`, the reference answer's NLL per token with the record's own
  images (model) and with another record's (baseline): the two agree when the model ignores its images,
  however well its answers score on the language prior (`answer_likelihood`).
* t2i: scene_accuracy of the parsed image vs the intended scene; baseline: another record's target image.
* edit / in_context / chain (each turn from the ground-truth input): pixel L1 and LPIPS to the target
  and edit_scores of the parsed image; baseline: copy the input; random: another record's target image.
* drift: chains edited turn after turn from the model's own previous output; L1, LPIPS and exactness per
  turn; baseline: copy the chain's first image every turn (an editor that does nothing).

LPIPS needs torchvision's ImageNet AlexNet weights in the torch hub cache and never downloads them;
without them there are no `lpips` metrics and `WorldResults.notes` says why (see `perceptual`).

Images are compared at the VQGAN's resolution (what the model can produce). `ceiling` rows score the
target encoded to VQGAN codes and decoded back by the frozen VQGAN: the best a generator that predicts
codes perfectly can draw (the parser needs ~48 px; smaller images are upscaled with nearest but lose
detail).

Generation is greedy for text and images alike (`temperature=0`, `image_temperature=0`: argmax morph
tokens and argmax VQGAN codes), so a score is a deterministic function of the weights; sampling would
add noise that pixel metrics punish. A row that emits no image where one is expected is a miss: L1 1.0,
LPIPS 1.0, every scene score 0, counted in `model/no_image_rate`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from morph_lightning.data_modules.instruct import IMAGE_MARK, parse_record
from morph_lightning.data_modules.transforms import BadImage, ImageTransforms, load_image
from morph_lightning.data_modules.world.parser import parse, scene_accuracy
from morph_lightning.data_modules.world.scene import BACKGROUND, Scene
from morph_lightning.data_modules.world.writer import scene_from_json
from morph_lightning.evaluation.answer_likelihood import answer_nll
from morph_lightning.evaluation.perceptual import LPIPSDistance, load_lpips
from morph_lightning.evaluation.tasks.world_text import text_metrics
from morph_lightning.evaluation.tasks.world_text import train_answers as read_train_answers
from morph_lightning.evaluation.world_metrics import edit_scores, pixel_l1
from morph_lightning.generation import generate, image_length
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import ImageRef, Piece, Sample, shift_refs

log = logging.getLogger(__name__)

TASK_ORDER = ("caption", "vqa", "multi_image", "t2i", "edit", "in_context", "chain", "drift")
PARSE_MIN_SIZE = 48  # the parser reads renders exactly from 48 px up
SCENE_KEYS = ("exact", "count", "position", "shape", "colour", "size")
EDIT_KEYS = ("success", "kept", "changed")


@dataclass
class Example:
    """One evaluated record for grids: uint8 HWC images (None where there is none) and texts."""

    prompt: str
    prediction_text: str
    reference_text: str
    input: np.ndarray | None  # the image being described or edited (the last input image)
    prediction: np.ndarray | None
    target: np.ndarray | None


@dataclass
class WorldResults:
    # task -> "system/metric" -> value; systems: model, baseline, random (a second baseline), ceiling.
    metrics: dict[str, dict[str, float]]
    examples: dict[str, list[Example]] = field(default_factory=dict)  # drift: one chain's turns in order
    counts: dict[str, int] = field(default_factory=dict)  # records scored per task (drift: chains)
    notes: list[str] = field(default_factory=list)  # what was not measured and why (e.g. no LPIPS weights)


@dataclass
class _Item:
    meta: dict[str, Any]  # the jsonl line: task, scene_in, scene_out, output_text, chain, turn, ...
    prompt: list[Piece]
    inputs: list[str]  # input image paths, indexed by the prompt's ImageRefs
    target: str | None  # output image path
    answer: list[Piece]  # the reference answer as training renders it (a text answer: [" red"])


# ---------------------------------------------------------------- images


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8."""
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def parse_image(image: np.ndarray) -> Scene:
    """Parse an image of any size, upscaling small ones with nearest so the cells keep their pixels."""
    factor = math.ceil(PARSE_MIN_SIZE / min(image.shape[:2]))
    if factor > 1:
        image = image.repeat(factor, axis=0).repeat(factor, axis=1)
    return parse(image)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def _blank(size: int) -> np.ndarray:
    return np.full((size, size, 3), BACKGROUND, dtype=np.uint8)


class Encoded(NamedTuple):
    vision: torch.Tensor  # the vision tower's input
    image: np.ndarray  # uint8 at the VQGAN resolution, what predictions are compared with
    vqgan: torch.Tensor  # the VQGAN's input, [-1, 1]


class _Images:
    """Path -> `Encoded`, each file decoded once."""

    def __init__(self, transforms: ImageTransforms) -> None:
        self.transforms = transforms
        self.cache: dict[str, Encoded] = {}

    def __call__(self, path: str) -> Encoded:
        if path not in self.cache:
            self.cache[path] = self.encode(load_image(path))
        return self.cache[path]

    def encode(self, image: Image.Image) -> Encoded:
        vision, vqgan = self.transforms(image)
        return Encoded(vision, to_uint8(vqgan), vqgan)


# ---------------------------------------------------------------- scoring one record


def score_t2i(prediction: np.ndarray | None, scene_out: Scene) -> dict[str, float]:
    """scene_accuracy of the parsed image; a missing image scores 0 everywhere."""
    if prediction is None:
        return dict.fromkeys(SCENE_KEYS, 0.0)
    return scene_accuracy(parse_image(prediction), scene_out)


def image_distances(
    prediction: np.ndarray | None, target: np.ndarray, lpips: LPIPSDistance | None = None
) -> dict[str, float]:
    """Pixel L1 and, given `lpips`, LPIPS to the target (at the target's resolution); a missing image
    is the worst case: L1 1.0 and LPIPS 1.0 (about the distance between unrelated images)."""
    if prediction is None:
        return {"l1": 1.0} | ({"lpips": 1.0} if lpips is not None else {})
    prediction = _resize(prediction, target.shape[0])
    distances = {"l1": pixel_l1(prediction, target)}
    return distances | ({"lpips": lpips(prediction, target)} if lpips is not None else {})


def score_edit(
    prediction: np.ndarray | None,
    target: np.ndarray,
    scene_in: Scene,
    scene_out: Scene,
    lpips: LPIPSDistance | None = None,
) -> dict[str, float]:
    """`image_distances` and edit_scores of the parsed image; a missing image is the worst case (scores
    0 too) so that emitting nothing never looks like keeping things."""
    distances = image_distances(prediction, target, lpips)
    if prediction is None:
        return distances | dict.fromkeys(EDIT_KEYS, 0.0)
    return distances | edit_scores(parse_image(prediction), scene_in, scene_out)


def _prefixed(system: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{system}/{k}": v for k, v in scores.items()}


def _mean(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for row in rows:
        for k, v in row.items():
            sums[k] += v
    return {k: s / len(rows) for k, s in sums.items()}


def _other(rng: random.Random, items: list[_Item], i: int) -> int | None:
    """A random record other than items[i], never a turn of the same chain (those share most of the
    scene, so they would not be a random image); None when there is none."""

    def group(it: _Item) -> str:
        return it.meta.get("chain") or it.meta.get("id") or str(id(it))

    others = [j for j, it in enumerate(items) if group(it) != group(items[i])]
    return rng.choice(others) if others else None


# ---------------------------------------------------------------- generation


@dataclass
class _Settings:
    max_new_tokens: int
    image_tokens: int
    batch_size: int
    image_temperature: float
    generator: torch.Generator
    lpips: LPIPSDistance | None  # None: weights not cached, LPIPS is left out


def _generate(
    model: MorphModel, rows: list[tuple[list[Piece], list[torch.Tensor]]], image: bool, s: _Settings
) -> list[tuple[str, np.ndarray | None]]:
    """(prompt, its input images) per row -> (text, first generated image or None) per row."""
    results: list[tuple[str, np.ndarray | None]] = []
    for start in range(0, len(rows), s.batch_size):
        prompts, vision = [], []
        for pieces, images in rows[start : start + s.batch_size]:
            base = len(vision)  # each row's ImageRefs index its own images; shift them into the batch
            prompts.append(Sample(shift_refs(pieces, base)))
            vision += images
        out = generate(
            model,
            prompts,
            torch.stack(vision) if vision else None,
            max_new_tokens=s.image_tokens if image else s.max_new_tokens,
            temperature=0.0,
            image_temperature=s.image_temperature,
            generator=s.generator,
        )
        for text, idx in zip(out.texts, out.images, strict=True):
            results.append((text, to_uint8(out.pixels[idx[0]]) if idx else None))
    return results


@torch.no_grad()
def vqgan_reconstruct(model: MorphModel, pixels: list[torch.Tensor], batch_size: int) -> list[np.ndarray]:
    """VQGAN inputs [3, R, R] encoded to codes and decoded back by the frozen VQGAN, as uint8 images."""
    param = next(model.vqgan.parameters())
    out: list[np.ndarray] = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.stack(pixels[start : start + batch_size]).to(param.device, param.dtype)
        out += [to_uint8(x) for x in model.vqgan.decode_codes(model.vqgan.encode_to_codes(batch))]
    return out


def _prompt_text(pieces: list[Piece]) -> str:
    return "".join(IMAGE_MARK if isinstance(p, ImageRef) else p for p in pieces)


# ---------------------------------------------------------------- tasks


def _read(path: Path) -> list[_Item]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                meta = json.loads(line)
                rec = parse_record(meta, str(path.parent), f"{path}:{n}")
                has_target = meta["output_img"] is not None
                inputs = rec.images[:-1] if has_target else rec.images
                target = rec.images[-1] if has_target else None
                items.append(_Item(meta, rec.sample.prompt, inputs, target, rec.sample.answer))
    return items


def _readable(item: _Item, images: _Images) -> bool:
    """Whether every image of `item` decodes; a bad one is skipped with a warning, as in training."""
    try:
        for path in item.inputs + ([item.target] if item.target else []):
            images(path)
    except BadImage as bad:
        log.warning("skipping %s (%s): %s", item.meta.get("id"), item.meta["task"], bad)
        return False
    return True


def _text_task(
    task: str,
    items: list[_Item],
    captions: list[str],
    train_answers: list[str],
    model: MorphModel,
    images: _Images,
    s: _Settings,
    rng: random.Random,
) -> tuple[dict[str, float], list[Example]]:
    outputs = _generate(model, [(it.prompt, [images(p).vision for p in it.inputs]) for it in items], False, s)
    texts = [t for t, _ in outputs]
    answers = [it.meta["output_text"] for it in items]
    if task != "caption" and not train_answers:
        log.warning("no training answers for %s: the majority baseline uses the evaluated ones", task)
    metrics = text_metrics(task, texts, [it.meta for it in items], captions, train_answers, rng)
    metrics |= _image_reliance(items, model, images, s)
    examples = [
        Example(_prompt_text(it.prompt), t, a, images(it.inputs[-1]).image if it.inputs else None, None, None)
        for it, t, a in zip(items, texts, answers, strict=True)
    ]
    return metrics, examples


def _image_reliance(items: list[_Item], model: MorphModel, images: _Images, s: _Settings) -> dict[str, float]:
    """answer_nll with each record's own images and with the next record's (same number of images)."""
    own, other = [], []
    for i, it in enumerate(items):
        others = items[i + 1 :] + items[:i]
        swap = next((o for o in others if len(o.inputs) == len(it.inputs) and o.inputs != it.inputs), None)
        if not it.inputs or swap is None:
            continue
        sample = Sample(it.prompt, it.answer)
        own.append((sample, [images(p).vision for p in it.inputs]))
        other.append((sample, [images(p).vision for p in swap.inputs]))
    if not own:
        return {}
    return {
        "model/answer_nll": answer_nll(model, own, s.batch_size),
        "baseline/answer_nll": answer_nll(model, other, s.batch_size),
    }


def _image_task(
    task: str, items: list[_Item], model: MorphModel, images: _Images, s: _Settings, rng: random.Random
) -> tuple[dict[str, float], list[Example]]:
    outputs = _generate(model, [(it.prompt, [images(p).vision for p in it.inputs]) for it in items], True, s)
    targets = [images(it.target).image for it in items]
    ceilings = vqgan_reconstruct(model, [images(it.target).vqgan for it in items], s.batch_size)
    rows, examples = [], []
    for i, (it, (text, pred), target, ceiling) in enumerate(
        zip(items, outputs, targets, ceilings, strict=True)
    ):
        scene_out = scene_from_json(it.meta["scene_out"])
        j = _other(rng, items, i)  # with no other record, an empty canvas stands in for a random image
        other = images(items[j].target).image if j is not None else _blank(target.shape[0])
        row = {"model/no_image_rate": float(pred is None)}
        if not it.inputs:  # text to image: only the scene can be checked, there is no source
            row |= _prefixed("model", score_t2i(pred, scene_out))
            row |= _prefixed("baseline", score_t2i(other, scene_out))
            row |= _prefixed("ceiling", score_t2i(ceiling, scene_out))
        else:
            scene_in = scene_from_json(it.meta["scene_in"])
            source = images(it.inputs[-1]).image
            copy = image_distances(source, target, s.lpips) | edit_scores(scene_in, scene_in, scene_out)
            row |= _prefixed("model", score_edit(pred, target, scene_in, scene_out, s.lpips))
            row |= _prefixed("baseline", copy)
            row |= _prefixed("random", score_edit(other, target, scene_in, scene_out, s.lpips))
            row |= _prefixed("ceiling", score_edit(ceiling, target, scene_in, scene_out, s.lpips))
        rows.append(row)
        source_img = images(it.inputs[-1]).image if it.inputs else None
        examples.append(Example(_prompt_text(it.prompt), text, "", source_img, pred, target))
    return _mean(rows), examples


def _turn(system: str, turn: int, scores: dict[str, float]) -> dict[str, float]:
    return {f"{system}/{k}_turn{turn}": v for k, v in scores.items()}


def _drift(
    chains: list[list[_Item]], model: MorphModel, images: _Images, s: _Settings
) -> tuple[dict[str, float], list[Example]]:
    """Edit each chain turn after turn, feeding the model its own previous output (a miss carries the
    image in hand forward), and score every turn against the ground truth."""
    current = [images(chain[0].inputs[0]) for chain in chains]  # the image fed to the next turn
    first = [enc.image for enc in current]
    first_scene = [scene_from_json(chain[0].meta["scene_in"]) for chain in chains]
    metrics: dict[str, float] = {}
    misses: list[float] = []
    examples: list[Example] = []
    for turn in range(max(len(c) for c in chains)):
        active = [c for c, chain in enumerate(chains) if len(chain) > turn]
        outputs = _generate(model, [(chains[c][turn].prompt, [current[c].vision]) for c in active], True, s)
        rows = []
        for c, (text, pred) in zip(active, outputs, strict=True):
            it = chains[c][turn]
            target, scene_out = images(it.target).image, scene_from_json(it.meta["scene_out"])
            ours = image_distances(pred, target, s.lpips)
            ours["exact"] = float(pred is not None and parse_image(pred) == scene_out)
            copy = image_distances(first[c], target, s.lpips)
            copy["exact"] = float(first_scene[c] == scene_out)
            rows.append(_turn("model", turn, ours) | _turn("baseline", turn, copy))
            misses.append(float(pred is None))
            if c == 0:
                examples.append(Example(_prompt_text(it.prompt), text, "", current[c].image, pred, target))
            if pred is not None:
                current[c] = images.encode(Image.fromarray(pred))
        metrics |= _mean(rows)
    return {"model/no_image_rate": float(np.mean(misses)), **metrics}, examples


def _chains(items: list[_Item], images: _Images, limit: int) -> list[list[_Item]]:
    """Up to `limit` readable chains, each its turns 0, 1, ... in order (a gap ends the chain)."""
    by_chain: dict[str, list[_Item]] = defaultdict(list)
    for it in items:
        by_chain[it.meta["chain"]].append(it)
    chains = []
    for turns in by_chain.values():
        turns.sort(key=lambda it: it.meta["turn"])
        run = [it for k, it in enumerate(turns) if it.meta["turn"] == k]
        run = run[: next((k for k, it in enumerate(run) if not _readable(it, images)), len(run))]
        if run:
            chains.append(run)
        if len(chains) == limit:
            break
    return chains


def evaluate_world(
    model: MorphModel,
    world_dir: str | Path,
    split: str = "val",
    max_per_task: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    max_new_tokens: int = 32,
    image_temperature: float = 0.0,
    image_slack: int = 4,
    num_examples: int = 4,
) -> WorldResults:
    """Score `model` on `world_dir/instruct/{split}.jsonl`, the first `max_per_task` readable records of
    each task (and as many chains for drift). Text answers get `max_new_tokens`; image answers get room
    for <img>, the morph tokens, </img> and `image_slack` stray tokens before <img>. `seed` draws the
    random baselines (and samples, should `image_temperature` be > 0)."""
    root = Path(world_dir) / "instruct"
    by_task: dict[str, list[_Item]] = defaultdict(list)
    for item in _read(root / f"{split}.jsonl"):
        by_task[item.meta["task"]].append(item)
    train_answers = read_train_answers(root / "train.jsonl")
    distance, reason = load_lpips()
    if reason:
        log.warning("%s", reason)
    vision = model.vision
    images = _Images(
        ImageTransforms(vision.image_size, model.config.vqgan.resolution, vision.mean, vision.std)
    )
    settings = _Settings(
        max_new_tokens=max_new_tokens,
        image_tokens=image_length(model) + 2 + image_slack,
        batch_size=batch_size,
        image_temperature=image_temperature,
        generator=torch.Generator(device=next(model.parameters()).device).manual_seed(seed),
        lpips=distance,
    )
    rng = random.Random(seed)
    results = WorldResults(metrics={}, notes=[reason] if reason else [])
    was_training = model.training
    model.eval()
    try:
        for task in sorted(
            by_task, key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER)
        ):
            records, items = by_task[task], []
            for it in records:  # decode only as many records as are scored
                if len(items) == max_per_task:
                    break
                if _readable(it, images):
                    items.append(it)
            if not items:
                continue
            if items[0].target is None:
                captions = [it.meta["output_text"] for it in records]
                metrics, examples = _text_task(
                    task, items, captions, train_answers[task], model, images, settings, rng
                )
            else:
                metrics, examples = _image_task(task, items, model, images, settings, rng)
            results.metrics[task] = metrics
            results.examples[task] = examples[:num_examples]
            results.counts[task] = len(items)
        chains = _chains(by_task.get("chain", []), images, max_per_task)
        if chains:
            metrics, examples = _drift(chains, model, images, settings)
            results.metrics["drift"], results.examples["drift"] = metrics, examples
            results.counts["drift"] = len(chains)
    finally:
        model.train(was_training)
    return results
