"""Scene -> image: filled shapes on a flat background, pure numpy and deterministic.

Masks are evaluated at pixel centres with no antialiasing, so a render has exactly the palette colours
and the parser can read it back exactly.
"""

from __future__ import annotations

import numpy as np

from .scene import BACKGROUND, COLOURS, GRID, Obj, Scene

# Side of an object's bounding box as a fraction of the cell side.
EXTENT = {"small": 0.45, "large": 0.85}
CROSS_ARM = 1 / 3  # arm width of the cross as a fraction of its side


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Inside-test for a shape centred at 0 with half side `half`; dy grows downwards."""
    in_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "square":
        return in_box
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "triangle":  # apex up, base along the bottom of the box
        return in_box & (np.abs(dx) <= (dy + half) / 2)
    if shape == "cross":
        arm = half * CROSS_ARM
        return in_box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {shape}")


def _draw(img: np.ndarray, obj: Obj) -> None:
    h, w = img.shape[:2]
    cw, ch = w / GRID, h / GRID
    cx, cy = (obj.cell[0] + 0.5) * cw, (obj.cell[1] + 0.5) * ch
    half = EXTENT[obj.size] * min(cw, ch) / 2
    ys, xs = np.mgrid[0:h, 0:w]
    mask = shape_mask(obj.shape, xs + 0.5 - cx, ys + 0.5 - cy, half)
    img[mask] = COLOURS[obj.colour]


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """[size, size, 3] uint8 RGB."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj in scene.objects:
        _draw(img, obj)
    return img
