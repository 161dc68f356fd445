"""Text about scenes: captions, questions with canonical answers, and ways to refer to an object.

Wording is drawn from templates and synonyms with the caller's rng, so a seed fixes the text while the
data as a whole reads like language rather than codes. Captions name every object's size, colour, shape
and cell, so a caption fully determines its scene (what text-to-image scoring needs).
"""

from __future__ import annotations

import random

from .scene import CELL_NAMES, COLOURS, RELATIONS, SHAPES, Obj, Scene, holds, relation

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The answers a two-image question (`compare`) can have, by the kind of question.
COMPARE_CHOICES = {
    "both_colour": ("yes", "no"),
    "more_objects": ("the first", "the second", "neither"),
    "same_count": ("yes", "no"),
    "which_has": ("the first", "the second", "both", "neither"),
}
QUESTION_KINDS = ("colour", "shape", "size", "count", "relation_yes_no", "relation_where", "exists")


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(obj: Obj, rng: random.Random) -> str:
    """ "small red circle", with a synonym for the size word."""
    return f"{rng.choice(SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"


def location(cell: tuple[int, int], rng: random.Random) -> str:
    """ "in the top left corner", "at the top", "in the middle" ..."""
    name = CELL_NAMES[cell]
    if name == "centre":
        return rng.choice(("in the centre", "in the middle"))
    if " " in name:
        return rng.choice((f"in the {name}", f"in the {name} corner"))
    return {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}[
        name
    ]


def refer(obj: Obj, scene: Scene, rng: random.Random, by: str = "shape") -> str:
    """The shortest "the ..." phrase naming `obj` uniquely in `scene`.

    `by="shape"` avoids the colour (for asking about colour), `by="colour"` avoids the shape; "any"
    allows both. Falls back to the cell, which is always unique.
    """
    others = [o for o in scene.objects if o != obj]
    if by == "colour":
        tries = [("colour",), ("size", "colour")]
    elif by == "shape":
        tries = [("shape",), ("size", "shape")]
    else:
        tries = [("shape",), ("colour", "shape"), ("size", "colour", "shape")]
    for attrs in tries:
        if all(any(getattr(o, a) != getattr(obj, a) for a in attrs) for o in others):
            words = [getattr(obj, a) for a in attrs]
            return "the " + " ".join(words) + (" object" if "shape" not in attrs else "")
    head = obj.colour + " object" if by == "colour" else obj.shape
    return f"the {head} {location(obj.cell, rng)}"


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: random.Random) -> str:
    """A one or two sentence description naming every object's attributes and place."""
    if not scene.objects:
        return rng.choice(("An empty picture.", "A blank image with nothing in it."))
    objs = list(scene.objects)
    rng.shuffle(objs)
    parts = [f"{article(noun_phrase(o, rng))} {location(o.cell, rng)}" for o in objs]
    body = _listing(parts)
    frame = rng.choice(("{}", "There is {}", "A picture showing {}", "An image of {}", "This image shows {}"))
    text = frame.format(body)
    text = text[0].upper() + text[1:] + "."
    if len(objs) > 1 and rng.random() < 0.6:  # a relation sentence, true by construction
        a, b = rng.sample(objs, 2)
        rel = str(relation(a, b))
        if rel.endswith(" of"):
            rel = rng.choice((rel, "to the " + rel))
        text += rng.choice((" The {} is {} the {}.", " The {} sits {} the {}."))
        text = text.format(f"{a.colour} {a.shape}", rel, f"{b.colour} {b.shape}")
    return text


def question(scene: Scene, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """(question, answer) with a short canonical answer for exact-match scoring.

    Kinds that need objects fall back to "count" on an empty scene, those that need two objects to
    "colour" on a one-object scene.
    """
    objs = scene.objects
    kind = kind or rng.choice(QUESTION_KINDS)
    if kind.startswith("relation") and len(objs) < 2:
        kind = "colour"
    if not objs and kind not in ("count", "exists"):
        kind = "count"
    if kind == "count":
        q = rng.choice(
            ("How many objects are there?", "How many shapes are in the image?", "Count the objects.")
        )
        return q, NUMBER_WORDS[len(objs)]
    if kind == "exists":
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if objs and rng.random() < 0.5:  # half the time a present object, else mostly absent ones
            shape, colour = rng.choice([(o.shape, o.colour) for o in objs])
        present = any((o.shape, o.colour) == (shape, colour) for o in objs)
        q = rng.choice(("Is there {}?", "Does the image contain {}?")).format(article(f"{colour} {shape}"))
        return q, "yes" if present else "no"
    obj = rng.choice(objs)
    if kind == "colour":
        ref = refer(obj, scene, rng, by="shape")
        q = rng.choice(("What colour is {}?", "What is the colour of {}?", "Which colour does {} have?"))
        return q.format(ref), obj.colour
    if kind == "shape":
        ref = refer(obj, scene, rng, by="colour")
        q = rng.choice(("What shape is {}?", "What is the shape of {}?", "Which shape is {}?"))
        return q.format(ref), obj.shape
    if kind == "size":
        ref = refer(obj, scene, rng, by="any")
        q = rng.choice(("Is {} small or large?", "What size is {}?", "How big is {}, small or large?"))
        return q.format(ref), obj.size
    other = rng.choice([o for o in objs if o != obj])
    a, b = f"the {obj.colour} {obj.shape}", f"the {other.colour} {other.shape}"
    if kind == "relation_where":
        q = rng.choice(("Where is {} relative to {}?", "Where is {} with respect to {}?"))
        return q.format(a, b), str(relation(obj, other))
    if kind == "relation_yes_no":
        rel = rng.choice(RELATIONS)
        q = rng.choice(("Is {} {} {}?", "Is it true that {} is {} {}?"))
        return q.format(a, rel, b), "yes" if holds(obj, other, rel) else "no"
    raise ValueError(f"unknown question kind {kind}")


def compare(first: Scene, second: Scene, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """A question about two scenes together, its short canonical answer, and the answers it admits."""
    kind = rng.choice(tuple(COMPARE_CHOICES))
    choices = COMPARE_CHOICES[kind]
    if kind == "both_colour":
        colour = rng.choice(list(COLOURS))
        both = all(any(o.colour == colour for o in s.objects) for s in (first, second))
        return f"Do both images contain {article(colour)} object?", "yes" if both else "no", choices
    if kind == "more_objects":
        n1, n2 = len(first.objects), len(second.objects)
        q = rng.choice(("Which image has more objects?", "Which image contains more shapes?"))
        return q, "the first" if n1 > n2 else "the second" if n2 > n1 else "neither", choices
    if kind == "same_count":
        same = len(first.objects) == len(second.objects)
        return "Do the two images show the same number of objects?", "yes" if same else "no", choices
    # Half the time ask about an object that is present, otherwise about a random kind (mostly absent).
    pool = [(o.shape, o.colour) for o in first.objects + second.objects]
    shape, colour = (
        rng.choice(pool) if rng.random() < 0.5 else (rng.choice(SHAPES), rng.choice(list(COLOURS)))
    )
    has = [any((o.shape, o.colour) == (shape, colour) for o in s.objects) for s in (first, second)]
    answer = {(True, True): "both", (True, False): "the first", (False, True): "the second"}.get(
        (has[0], has[1]), "neither"
    )
    return f"Which image contains {article(f'{colour} {shape}')}?", answer, choices
