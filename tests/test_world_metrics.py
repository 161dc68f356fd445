import random

import numpy as np
import pytest

from morph_lightning.data_modules.world.edits import OPS, sample_edit
from morph_lightning.data_modules.world.language import caption, question
from morph_lightning.data_modules.world.scene import Obj, Scene, sample_scene
from morph_lightning.evaluation.world_metrics import (
    caption_scores,
    edit_scores,
    majority_answer_baseline,
    normalise_answer,
    pixel_l1,
    read_caption,
    vqa_exact_match,
)


def test_the_worlds_own_captions_score_perfectly():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        scores = caption_scores(caption(scene, rng), scene)
        assert scores == {"attribute_f1": 1.0, "placement_f1": 1.0, "relation_accuracy": 1.0}


def test_a_wrong_caption_loses_exactly_what_it_gets_wrong():
    scene = Scene((Obj("circle", "red", "small", (0, 0)), Obj("square", "blue", "large", (2, 2))))
    right = "A small red circle in the top left corner and a large blue square in the bottom right."
    assert caption_scores(right, scene)["attribute_f1"] == 1.0
    wrong_colour = right.replace("blue square", "green square")
    assert caption_scores(wrong_colour, scene)["attribute_f1"] == pytest.approx(0.5)
    wrong_place = right.replace("bottom right", "top right")
    s = caption_scores(wrong_place, scene)
    assert s["attribute_f1"] == 1.0 and s["placement_f1"] == pytest.approx(0.5)
    lie = right + " The red circle is right of the blue square."
    assert caption_scores(lie, scene)["relation_accuracy"] == 0.0
    assert caption_scores("", scene)["attribute_f1"] == 0.0
    assert read_caption("nothing here").objects == frozenset()


def test_vqa_exact_match_and_the_majority_baseline():
    rng = random.Random(1)
    qa = [question(sample_scene(rng), rng) for _ in range(200)]
    answers = [a for _, a in qa]
    assert vqa_exact_match(answers, answers) == 1.0
    assert normalise_answer("The Red.") == "red"
    base = majority_answer_baseline(answers, answers)
    assert 0.0 < base < 0.5  # varied answers: guessing the commonest one is weak


def test_edit_scores():
    rng = random.Random(2)
    for op in OPS:
        for _ in range(20):
            scene = sample_scene(rng, min_objects=2, max_objects=2)  # every op applies to two objects
            edit = sample_edit(scene, rng, ops=(op,))
            assert edit_scores(edit.target, edit.source, edit.target) == {
                "success": 1.0,
                "kept": 1.0,
                "changed": 1.0,
            }
            copy = edit_scores(edit.source, edit.source, edit.target)  # the copy-the-input baseline
            assert copy["success"] == 0.0 and copy["changed"] == 0.0 and copy["kept"] == 1.0
    assert edit_scores(Scene(()), scene, scene)["kept"] == 0.0


def test_pixel_l1():
    a = np.zeros((4, 4, 3), np.uint8)
    assert pixel_l1(a, a) == 0.0
    assert pixel_l1(a, a + 255) == 1.0
