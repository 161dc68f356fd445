"""Readers of the instruction data sets of Appendix C.1, each in its published format, each turning its
files into `instruct.Record`s rendered with the paper's templates. `read_source` picks one by `type`.

Every reader is `reader(name, seed, path, **options) -> list[Record]`: `name` and `seed` key the rng
that picks a template per sample; a missing file raises FileNotFoundError and a malformed record
ValueError, both naming the file (and the record).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from morph_lightning.data_modules.instruct import Record, read_jsonl
from morph_lightning.data_modules.sources.caption_qa import read_coco_captions, read_vqav2
from morph_lightning.data_modules.sources.common import require
from morph_lightning.data_modules.sources.conversation import read_llava
from morph_lightning.data_modules.sources.editing import read_instructpix2pix, read_magicbrush
from morph_lightning.data_modules.sources.multi_image import read_mimicit
from morph_lightning.data_modules.sources.text_to_image import read_diffusiondb, read_journeydb


def read_released_jsonl(name: str, seed: int, path: str) -> list[Record]:
    """The released code's jsonl (see `instruct.py`), prompts used as written."""
    return read_jsonl(require(path))


READERS: dict[str, Callable[..., list[Record]]] = {
    "jsonl": read_released_jsonl,
    "journeydb": read_journeydb,
    "diffusiondb": read_diffusiondb,
    "instructpix2pix": read_instructpix2pix,
    "magicbrush": read_magicbrush,
    "coco_captions": read_coco_captions,
    "vqav2": read_vqav2,
    "llava": read_llava,
    "mimicit": read_mimicit,
}


def read_source(kind: str, name: str, seed: int, **options: Any) -> list[Record]:
    """The records of one source of type `kind`; errors name the source."""
    if kind not in READERS:
        raise ValueError(f"source {name!r}: unknown type {kind!r}; known: {sorted(READERS)}")
    reader = READERS[kind]
    try:
        inspect.signature(reader).bind(name, seed, **options)
    except TypeError as err:  # a missing or unknown option
        raise TypeError(f"source {name!r} ({kind}): {err}") from None
    try:
        return reader(name, seed, **options)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"source {name!r}: {err}") from err
