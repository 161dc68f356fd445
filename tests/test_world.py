"""The embedded world: determinism, render/parse agreement, and text and edits matching the scenes."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from morph_lightning.data_modules.world import (
    COLOURS,
    OPS,
    QUESTION_KINDS,
    RELATIONS,
    SHAPES,
    Obj,
    Scene,
    caption,
    holds,
    is_unambiguous,
    parse,
    question,
    relation,
    render,
    sample_chain,
    sample_edit,
    sample_scene,
    scene_accuracy,
)


def _scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def _jpeg(img: np.ndarray, quality: int = 90) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(buf).convert("RGB"))


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for scene in [sample_scene(rng) for _ in range(20)]:
        out.append(caption(scene, rng))
        out.extend(question(scene, rng))
        out.extend(e.instruction for e in sample_chain(scene, rng))
    return out


def test_sampling_is_deterministic_and_seed_dependent():
    assert _scenes(0, 50) == _scenes(0, 50)
    assert _scenes(0, 50) != _scenes(1, 50)
    assert _texts(0) == _texts(0)
    assert _texts(0) != _texts(1)
    assert np.array_equal(render(_scenes(0, 1)[0]), render(_scenes(0, 1)[0]))


def test_sampled_scenes_are_valid():
    for scene in _scenes(2, 300):
        assert 1 <= len(scene.objects) <= 3
        assert is_unambiguous(scene)
        assert len({o.cell for o in scene.objects}) == len(scene.objects)


def test_parse_reads_renders_back_exactly():
    scenes = _scenes(3, 300)
    for scene in scenes:
        img = render(scene, 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert parse(img) == scene
    # every (shape, colour, size) in every cell, on its own
    for shape in SHAPES:
        for colour in COLOURS:
            for size in ("small", "large"):
                for cell in ((0, 0), (1, 1), (2, 2)):
                    scene = Scene((Obj(shape, colour, size, cell),))
                    assert parse(render(scene)) == scene


def test_parse_survives_jpeg():
    scenes = _scenes(4, 300)
    exact = sum(parse(_jpeg(render(s))) == s for s in scenes)
    assert exact / len(scenes) >= 0.98


def test_parse_never_raises_on_noise_or_odd_input():
    gen = np.random.default_rng(0)
    for _ in range(20):
        scene = parse(gen.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        assert isinstance(scene, Scene) and len(scene.objects) <= 9
    assert parse(np.zeros((64, 64), dtype=np.uint8)) == Scene()
    assert parse(np.full((64, 64, 3), 240, dtype=np.uint8)) == Scene()


def test_scene_accuracy():
    a, b = _scenes(5, 2)
    assert scene_accuracy(a, a) == {"exact": 1.0, "count": 1.0, "position": 1.0} | dict.fromkeys(
        ("shape", "colour", "size"), 1.0
    )
    obj = a.objects[0]
    other = next(c for c in COLOURS if c != obj.colour)
    acc = scene_accuracy(a.replace(obj, Obj(obj.shape, other, obj.size, obj.cell)), a)
    assert (
        acc["exact"] == 0.0 and acc["shape"] == 1.0 and acc["colour"] == pytest.approx(1 - 1 / len(a.objects))
    )
    assert scene_accuracy(Scene(), b)["position"] == 0.0


def test_captions_mention_every_object():
    rng = random.Random(6)
    for scene in _scenes(6, 200):
        text = caption(scene, rng).lower()
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in text


def test_relations_agree_with_the_grid():
    a, b = Obj("circle", "red", "small", (0, 1)), Obj("square", "blue", "large", (2, 2))
    assert relation(a, b) == "left of" and relation(b, a) == "right of"
    assert relation(Obj("circle", "red", "small", (1, 0)), b) == "above"
    assert holds(a, b, "above") and not holds(a, b, "below")
    rng = random.Random(7)
    for scene in _scenes(7, 200):
        if len(scene.objects) < 2:
            continue
        q, ans = question(scene, rng, "relation_yes_no")
        x, y = _mentioned(scene, q)
        rel = next(r for r in RELATIONS if f" {r} " in q)
        assert ans == ("yes" if holds(x, y, rel) else "no")
        q, ans = question(scene, rng, "relation_where")
        assert ans == relation(*_mentioned(scene, q))


def _mentioned(scene: Scene, text: str) -> list[Obj]:
    """The objects named in `text` ("the red circle"), in order of mention."""
    named = [o for o in scene.objects if f"the {o.colour} {o.shape}" in text]
    return sorted(named, key=lambda o: text.index(f"the {o.colour} {o.shape}"))


def test_questions_have_canonical_answers():
    rng = random.Random(8)
    for scene in _scenes(8, 200):
        for kind in QUESTION_KINDS:
            q, ans = question(scene, rng, kind)
            assert q.endswith(("?", ".")) and ans and ans == ans.strip().lower()
        q, ans = question(scene, rng, "count")
        assert ans == ("one", "two", "three")[len(scene.objects) - 1]


def _changed(edit) -> tuple[set[Obj], set[Obj]]:
    src, tgt = set(edit.source.objects), set(edit.target.objects)
    return src - tgt, tgt - src


@pytest.mark.parametrize("op", OPS)
def test_each_edit_changes_exactly_what_it_says(op):
    rng = random.Random(9)
    for scene in _scenes(9, 200):
        edit = sample_edit(scene, rng, ops=(op,)) if _applies(op, scene) else None
        if edit is None:
            continue
        assert edit.op == op and edit.source == scene and is_unambiguous(edit.target)
        gone, new = _changed(edit)
        if op == "remove":
            assert len(gone) == 1 and not new
            continue
        if op == "add":
            assert not gone and len(new) == 1
            (o,) = new
            assert f"{o.colour} {o.shape}" in edit.instruction
            continue
        (a,), (b,) = gone, new
        same = {f: getattr(a, f) == getattr(b, f) for f in ("shape", "colour", "size", "cell")}
        field = {"recolour": "colour", "move": "cell", "resize": "size"}[op]
        assert same == {f: f != field for f in same}
        if op == "recolour":
            assert edit.instruction.endswith(b.colour)


def _applies(op: str, scene: Scene) -> bool:
    return {"remove": len(scene.objects) > 1, "add": len(scene.objects) < 3}.get(op, True)


def test_chains_apply_in_turn():
    rng = random.Random(10)
    for scene in _scenes(10, 50):
        chain = sample_chain(scene, rng, turns=3)
        assert len(chain) == 3 and chain[0].source == scene
        for prev, nxt in zip(chain, chain[1:], strict=False):
            assert nxt.source == prev.target and prev.target != prev.source
