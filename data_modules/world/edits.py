"""Edit operations: a scene and an rng give an instruction and the scene it asks for.

Each op changes exactly one thing (one object's colour, cell or size, or one object added or removed),
and the instruction names the object uniquely and the change exactly, so the target is ground truth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .language import article, location, noun_phrase, refer
from .scene import CELL_NAMES, COLOURS, GRID, MAX_OBJECTS, SIZES, Obj, Scene, sample_obj

OPS = ("recolour", "move", "remove", "add", "resize")
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Edit:
    op: str
    instruction: str
    source: Scene
    target: Scene


def _kinds(scene: Scene) -> set[tuple[str, str]]:
    return {(o.shape, o.colour) for o in scene.objects}


def recolour(scene: Scene, rng: random.Random) -> Edit | None:
    obj = rng.choice(scene.objects)
    colours = [c for c in COLOURS if (obj.shape, c) not in _kinds(scene)]  # keeps references unique
    if not colours:
        return None
    colour = rng.choice(colours)
    ref = refer(obj, scene, rng, by="any")
    text = rng.choice(
        ("make {} {}", "change the colour of {} to {}", "paint {} {}", "turn {} {}", "recolour {} to {}")
    )
    new = Obj(obj.shape, colour, obj.size, obj.cell)
    return Edit("recolour", text.format(ref, colour), scene, scene.replace(obj, new))


def move(scene: Scene, rng: random.Random) -> Edit | None:
    obj = rng.choice(scene.objects)
    free = scene.free_cells()
    if not free:
        return None
    ref = refer(obj, scene, rng, by="any")
    steps = [(d, (obj.cell[0] + dx, obj.cell[1] + dy)) for d, (dx, dy) in STEPS.items()]
    steps = [(d, c) for d, c in steps if c in free]
    if steps and rng.random() < 0.5:  # a relative move by one cell
        direction, cell = rng.choice(steps)
        text = rng.choice(("move {} one cell {}", "shift {} one step {}", "nudge {} one place {}"))
        text = text.format(ref, direction)
    else:  # an absolute move to a named cell
        cell = rng.choice(free)
        if rng.random() < 0.5:
            text = rng.choice(("move {} to the {}", "take {} to the {}")).format(ref, CELL_NAMES[cell])
        else:
            text = rng.choice(("put {} {}", "place {} {}")).format(ref, location(cell, rng))
    return Edit("move", text, scene, scene.replace(obj, Obj(obj.shape, obj.colour, obj.size, cell)))


def remove(scene: Scene, rng: random.Random) -> Edit | None:
    if len(scene.objects) < 2:  # an empty scene is not a useful target
        return None
    obj = rng.choice(scene.objects)
    ref = refer(obj, scene, rng, by="any")
    text = rng.choice(("remove {}", "delete {}", "take away {}", "get rid of {}", "erase {}"))
    return Edit("remove", text.format(ref), scene, scene.replace(obj, None))


def add(scene: Scene, rng: random.Random) -> Edit | None:
    if len(scene.objects) >= MAX_OBJECTS:  # stays in the sampled distribution; a free cell remains
        return None
    obj = sample_obj(rng, rng.choice(scene.free_cells()), _kinds(scene))
    text = rng.choice(("add {} {}", "put {} {}", "draw {} {}", "place {} {}"))
    text = text.format(article(noun_phrase(obj, rng)), location(obj.cell, rng))
    return Edit("add", text, scene, Scene(scene.objects + (obj,)))


def resize(scene: Scene, rng: random.Random) -> Edit | None:
    obj = rng.choice(scene.objects)
    ref = refer(obj, scene, rng, by="any")
    if obj.size == "small":
        text = rng.choice(("make {} bigger", "make {} larger", "enlarge {}", "scale {} up"))
    else:
        text = rng.choice(("make {} smaller", "shrink {}", "scale {} down", "make {} small"))
    size = SIZES[1 - SIZES.index(obj.size)]
    return Edit(
        "resize", text.format(ref), scene, scene.replace(obj, Obj(obj.shape, obj.colour, size, obj.cell))
    )


_OPS = {"recolour": recolour, "move": move, "remove": remove, "add": add, "resize": resize}


def sample_edit(scene: Scene, rng: random.Random, ops: tuple[str, ...] = OPS) -> Edit:
    """One edit of a non-empty scene with an op drawn from `ops` among those that apply."""
    if not scene.objects:
        raise ValueError("cannot edit an empty scene")
    choices = list(ops)
    rng.shuffle(choices)
    for op in choices:
        edit = _OPS[op](scene, rng)
        if edit is not None:
            return edit
    raise ValueError(f"none of {ops} applies to {scene}")


def sample_chain(scene: Scene, rng: random.Random, turns: int = 3, ops: tuple[str, ...] = OPS) -> list[Edit]:
    """Multi-turn editing: each edit applies to the previous edit's target."""
    chain: list[Edit] = []
    for _ in range(turns):
        chain.append(sample_edit(chain[-1].target if chain else scene, rng, ops))
    return chain


def apply_rule(scene: Scene, op: str, arg: str) -> Scene | None:
    """The same whole-scene edit for every scene (so it can be inferred from examples), or None when it
    would leave the scene unchanged or push an object off the grid."""
    objs = []
    for o in scene.objects:
        if op == "recolour":
            objs.append(Obj(o.shape, arg, o.size, o.cell))
        elif op == "resize":
            objs.append(Obj(o.shape, o.colour, arg, o.cell))
        else:  # move one cell in direction `arg`
            col, row = o.cell[0] + STEPS[arg][0], o.cell[1] + STEPS[arg][1]
            if not (0 <= col < GRID and 0 <= row < GRID):
                return None
            objs.append(Obj(o.shape, o.colour, o.size, (col, row)))
    target = Scene(tuple(objs))
    return None if target == scene else target


# Whole-scene rules for in-context edits: recolour everything, resize everything, move everything.
IN_CONTEXT_RULES = (
    [("recolour", c) for c in COLOURS] + [("resize", s) for s in SIZES] + [("move", d) for d in STEPS]
)
