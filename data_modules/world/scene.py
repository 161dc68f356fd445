"""The embedded world's scene model: up to nine shapes on a 3×3 grid, sampled deterministically.

Objects sit in grid cells so spatial relations are exact and objects never overlap; a scene stores its
objects sorted by cell so two scenes with the same content compare equal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "cross")
# Far apart in RGB so the parser can classify by nearest colour even after JPEG compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 180),
    "orange": (250, 135, 10),
}
BACKGROUND = (240, 240, 240)
SIZES = ("small", "large")
GRID = 3
CELLS = tuple((col, row) for row in range(GRID) for col in range(GRID))
# Names of cells for absolute locations ("in the top left"); edges use one word.
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "centre",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}
MAX_OBJECTS = 3  # sampled scenes and edits stay within 1..MAX_OBJECTS


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (col, row), (0, 0) is the top left

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.size not in SIZES:
            raise ValueError(f"unknown attribute in {self}")
        if self.cell not in CELLS:
            raise ValueError(f"cell {self.cell} is off the {GRID}x{GRID} grid")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...] = ()

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=lambda o: (o.cell[1], o.cell[0])))
        if len({o.cell for o in objs}) != len(objs):
            raise ValueError("two objects share a cell")
        object.__setattr__(self, "objects", objs)

    def at(self, cell: tuple[int, int]) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def free_cells(self) -> list[tuple[int, int]]:
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]

    def replace(self, old: Obj, new: Obj | None) -> Scene:
        """The scene with `old` swapped for `new` (or dropped when `new` is None)."""
        rest = [o for o in self.objects if o != old]
        return Scene(tuple(rest + ([new] if new is not None else [])))


def is_unambiguous(scene: Scene) -> bool:
    """Every (shape, colour) pair occurs once, so "the red circle" names exactly one object."""
    kinds = [(o.shape, o.colour) for o in scene.objects]
    return len(set(kinds)) == len(kinds)


def sample_obj(rng: random.Random, cell: tuple[int, int], taken: set[tuple[str, str]]) -> Obj:
    """A random object in `cell` whose (shape, colour) is not in `taken`."""
    kinds = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in taken]
    shape, colour = rng.choice(kinds)
    return Obj(shape, colour, rng.choice(SIZES), cell)


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = MAX_OBJECTS) -> Scene:
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(CELLS, n)
    objs: list[Obj] = []
    for cell in cells:
        objs.append(sample_obj(rng, cell, {(o.shape, o.colour) for o in objs}))
    return Scene(tuple(objs))


def relation(a: Obj, b: Obj) -> str | None:
    """Where `a` is relative to `b`; the axis with the larger offset wins, the horizontal on a tie."""
    dx, dy = a.cell[0] - b.cell[0], a.cell[1] - b.cell[1]
    if dx == dy == 0:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def holds(a: Obj, b: Obj, rel: str) -> bool:
    """Whether `a` is `rel` `b` in the loose sense ("left of" = any column further left)."""
    dx, dy = a.cell[0] - b.cell[0], a.cell[1] - b.cell[1]
    return {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]


RELATIONS = ("left of", "right of", "above", "below")


def describe_obj(obj: Obj) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}"
