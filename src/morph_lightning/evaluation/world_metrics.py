"""Metrics on the embedded world, exact because the generator knows every scene.

Text is read back with the world's own vocabulary (`read_caption`), images with the scene parser,
so captioning, VQA, text-to-image and editing are all scored against ground truth. Each metric has a
trivial baseline beside it (majority answer, copying the input, a random world image) so that a
report shows what was learned.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from morph_lightning.data_modules.world.language import SIZE_WORDS
from morph_lightning.data_modules.world.scene import CELL_NAMES, COLOURS, SHAPES, Scene, holds

_SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}
_WORD = r"[a-z]+"
_OBJECT = re.compile(
    rf"\b({'|'.join(_SIZE_OF)})\s+({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b"
    rf"(?:\s+(?:in|at|on)\s+the\s+((?:{_WORD})(?:\s+(?:left|right))?))?"
)
_RELATION = re.compile(
    rf"\bthe\s+({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\s+(?:is|sits)\s+(?:to the\s+)?"
    rf"(left of|right of|above|below)\s+the\s+({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b"
)


def _cell(words: str | None) -> tuple[int, int] | None:
    if not words:
        return None
    words = "centre" if words == "middle" else words
    return next((cell for cell, name in CELL_NAMES.items() if name == words), None)


@dataclass(frozen=True)
class CaptionFacts:
    objects: frozenset[tuple[str, str, str]]  # (size, colour, shape)
    placed: frozenset[tuple[str, str, str, tuple[int, int]]]  # ... and the cell it names
    relations: tuple[tuple[str, str, str, str, str], ...]  # (colour, shape, relation, colour, shape)


def read_caption(text: str) -> CaptionFacts:
    """The objects, places and relations a caption states, in the world's vocabulary."""
    text = text.lower()
    objects, placed = set(), set()
    for size_word, colour, shape, where in _OBJECT.findall(text):
        obj = (_SIZE_OF[size_word], colour, shape)
        objects.add(obj)
        if (cell := _cell(where)) is not None:
            placed.add((*obj, cell))
    return CaptionFacts(frozenset(objects), frozenset(placed), tuple(_RELATION.findall(text)))


def _f1(pred: frozenset, true: frozenset) -> float:
    if not pred and not true:
        return 1.0
    hit = len(pred & true)
    return 2 * hit / (len(pred) + len(true)) if hit else 0.0


def caption_scores(text: str, scene: Scene) -> dict[str, float]:
    """Attribute F1 (size, colour, shape), placement F1 (+ cell), and the share of stated relations
    that hold in the scene (1 when none is stated: nothing false was said)."""
    facts = read_caption(text)
    objects = frozenset((o.size, o.colour, o.shape) for o in scene.objects)
    placed = frozenset((o.size, o.colour, o.shape, o.cell) for o in scene.objects)
    by_name = {(o.colour, o.shape): o for o in scene.objects}
    true_relations = [
        (a := by_name.get((ca, sa))) is not None
        and (b := by_name.get((cb, sb))) is not None
        and holds(a, b, rel)
        for ca, sa, rel, cb, sb in facts.relations
    ]
    return {
        "attribute_f1": _f1(facts.objects, objects),
        "placement_f1": _f1(facts.placed, placed),
        "relation_accuracy": sum(true_relations) / len(true_relations) if true_relations else 1.0,
    }


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no leading article: "The Red." -> "red"."""
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def vqa_exact_match(predictions: list[str], answers: list[str]) -> float:
    pairs = list(zip(predictions, answers, strict=True))
    return sum(normalise_answer(p) == normalise_answer(a) for p, a in pairs) / max(1, len(pairs))


def majority_answer_baseline(train_answers: list[str], answers: list[str]) -> float:
    """Accuracy of always giving the most common training answer."""
    majority = Counter(normalise_answer(a) for a in train_answers).most_common(1)[0][0]
    return vqa_exact_match([majority] * len(answers), answers)


def pixel_l1(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 HWC images, in [0, 1]."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255.0)


def edit_scores(pred: Scene, source: Scene, target: Scene) -> dict[str, float]:
    """success: the edited scene is exactly the target. kept: of the objects the edit leaves alone,
    the share still there unchanged. changed: the instructed change was made (the objects that differ
    between source and target are as in the target)."""
    got, before, after = set(pred.objects), set(source.objects), set(target.objects)
    untouched = before & after
    made = (after - before) <= got and not (before - after) & got
    return {
        "success": float(pred == target),
        "kept": sum(o in got for o in untouched) / len(untouched) if untouched else 1.0,
        "changed": float(made),
    }
