"""The jsonl of the authors' released code (DCDmllm/MorphTokens, `NewImgDataset` in
`morph/datasets/datasets/morph_dataset.py`), one record per line:

    {"input_img": null | "a.jpg" | ["a.jpg", "b.jpg"], "output_img": null | "c.jpg" | [...],
     "input_text": "<ImageHere> What will this image be like with ...: make it green. <img>",
     "output_text": "<ImageHere> </img>" | "a text answer", ...}

Image paths are relative to the dataset's image root (`build_info.images.storage` there, `image_root`
here; default the jsonl's folder). `<ImageHere>` marks where each image goes, input images in
`input_text` and output images in `output_text`, in order. `<img>` / `</img>` around an image are
written out in that format; the project's sequence builder adds them itself, so they are dropped here.
The released model wraps the prompt in `USER: {}ASSISTANT:`; it is rendered here as the project's
`USER: {} ASSISTANT:`, and a prompt that already starts with `USER:` is used as written.
"""

from __future__ import annotations

import os
import re
from typing import Any

from morph_lightning.data_modules.bad_records import BadRecord, iter_jsonl
from morph_lightning.data_modules.instruct import IMAGE_MARK, Record, prompt_pieces
from morph_lightning.data_modules.sources.common import Source
from morph_lightning.modeling.sequence import ImageRef, Piece, Sample

RELEASED_MARK = "<ImageHere>"
IMAGE_BRACKETS = re.compile(r"\s*</?img>\s*", re.IGNORECASE)


def _paths(obj: dict, key: str, root: str, where: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p for p in value):
        raise BadRecord(where, f"bad {key!r}", f"needs null, a path or a list of paths, got {value!r}")
    return [os.path.join(root, p) for p in value]


def _text(obj: dict, key: str, marks: int, where: str) -> str:
    """`obj[key]` without its `<img>` brackets, `<ImageHere>` as `<image>`, with exactly `marks` marks."""
    value = obj.get(key)
    if value is None and marks == 0:
        raise BadRecord(where, f"no {key!r}", "a record with no image there needs text there")
    text = " ".join(IMAGE_BRACKETS.sub(" ", str(value or "")).replace(RELEASED_MARK, IMAGE_MARK).split())
    if text.count(IMAGE_MARK) != marks:
        raise BadRecord(
            where, "image marks", f"{key} has {text.count(IMAGE_MARK)} {RELEASED_MARK} for {marks} images"
        )
    if not text:
        raise BadRecord(where, f"empty {key!r}")
    return text


def _answer(text: str, first: int) -> list[Piece]:
    """Answer text with `<image>` marks -> text pieces (each after a space, as `build_record` renders a text
    answer) and target `ImageRef`s numbered from `first`."""
    pieces: list[Piece] = []
    for k, part in enumerate(text.split(IMAGE_MARK)):
        if k:
            pieces.append(ImageRef(first + k - 1, target=True))
        if part.strip():
            pieces.append(" " + part.strip())
    return pieces


def parse_released(obj: Any, root: str, where: str) -> Record:
    """One decoded line of the released jsonl -> a `Record`; a `BadRecord` naming `where` if malformed."""
    if not isinstance(obj, dict) or "input_text" not in obj:
        raise BadRecord(where, "no 'input_text'", f"got {sorted(obj) if isinstance(obj, dict) else obj!r}")
    inputs, outputs = _paths(obj, "input_img", root, where), _paths(obj, "output_img", root, where)
    prompt = _text(obj, "input_text", len(inputs), where)
    answer = _text(obj, "output_text", len(outputs), where)
    if not prompt.startswith("USER:"):
        prompt = f"USER: {prompt} ASSISTANT:"
    return Record(Sample(prompt_pieces(prompt), _answer(answer, len(inputs))), [*inputs, *outputs], where)


def read_released_jsonl(src: Source, path: str, image_root: str | None = None) -> list[Record]:
    """Every record of one released-format jsonl; bad lines are counted and left out."""
    src.image_root = image_root or os.path.dirname(os.path.abspath(path))
    records = []
    for where, obj in iter_jsonl(path, src.bad):
        with src.bad.skipping():
            records.append(parse_released(obj, src.image_root, where))
    return records
