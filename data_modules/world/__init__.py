"""The embedded world: shapes on a 3×3 grid with exact ground truth for captions, QA and edits.

A scene renders to an image (`render`), reads back from one (`parse`), and is described (`caption`,
`question`) and edited (`sample_edit`, `sample_chain`) in varied wording, all deterministic given a
`random.Random`, so the whole method can be trained and scored on a CPU.
"""

from .edits import OPS, Edit, sample_chain, sample_edit
from .language import QUESTION_KINDS, caption, question, refer
from .parser import parse, scene_accuracy
from .render import render
from .scene import (
    CELLS,
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    describe_obj,
    holds,
    is_unambiguous,
    relation,
    sample_scene,
)

__all__ = [
    "CELLS",
    "COLOURS",
    "OPS",
    "QUESTION_KINDS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Edit",
    "Obj",
    "Scene",
    "caption",
    "describe_obj",
    "holds",
    "is_unambiguous",
    "parse",
    "question",
    "refer",
    "relation",
    "render",
    "sample_chain",
    "sample_edit",
    "sample_scene",
    "scene_accuracy",
]
