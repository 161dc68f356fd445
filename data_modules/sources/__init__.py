"""Readers of the instruction data sets of Appendix C.1, each in its published format, each turning its
files into `instruct.Record`s rendered with the paper's templates. `read_source` picks one by `type`.

Every reader is `reader(src, **options) -> list[Record]` for a `common.Source` (the source's name and the
run's seed, which key the rng that picks a template per sample, and where bad records are counted). A
missing file raises FileNotFoundError and a file of the wrong shape ValueError, both naming the file; a
malformed record is a `BadRecord`, counted and left out (`bad_records.py`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from morph_lightning.data_modules.bad_records import MAX_BAD_FRACTION, BadRecords
from morph_lightning.data_modules.instruct import Record, read_jsonl
from morph_lightning.data_modules.sources.caption_qa import read_coco_captions, read_vqav2
from morph_lightning.data_modules.sources.common import Source, check_image_paths, require
from morph_lightning.data_modules.sources.conversation import read_llava
from morph_lightning.data_modules.sources.editing import read_instructpix2pix, read_magicbrush
from morph_lightning.data_modules.sources.multi_image import read_mimicit
from morph_lightning.data_modules.sources.released import read_released_jsonl
from morph_lightning.data_modules.sources.text_to_image import read_diffusiondb, read_journeydb


def read_project_jsonl(src: Source, path: str) -> list[Record]:
    """The project's own jsonl (`instruct.py`; the world writes it), prompts used as written."""
    return read_jsonl(require(path), src.bad)


READERS: dict[str, Callable[..., list[Record]]] = {
    "jsonl": read_project_jsonl,
    "released_jsonl": read_released_jsonl,
    "journeydb": read_journeydb,
    "diffusiondb": read_diffusiondb,
    "instructpix2pix": read_instructpix2pix,
    "magicbrush": read_magicbrush,
    "coco_captions": read_coco_captions,
    "vqav2": read_vqav2,
    "llava": read_llava,
    "mimicit": read_mimicit,
}


def read_source(
    kind: str, name: str, seed: int, max_bad_fraction: float = MAX_BAD_FRACTION, **options: Any
) -> tuple[list[Record], BadRecords]:
    """The records of one source of type `kind` and the ones it left out. Errors name the source: a
    missing file, more than `max_bad_fraction` bad records, or images that are not where they should be
    (checked on a spread of records)."""
    if kind not in READERS:
        raise ValueError(f"source {name!r}: unknown type {kind!r}; known: {sorted(READERS)}")
    reader, src = READERS[kind], Source(name, seed)
    try:
        inspect.signature(reader).bind(src, **options)
    except TypeError as err:  # a missing or unknown option
        raise TypeError(f"source {name!r} ({kind}): {err}") from None
    try:
        records = reader(src, **options)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"source {name!r}: {err}") from err
    src.bad.check(name, len(records), max_bad_fraction)
    if not records:
        raise ValueError(f"source {name!r}: no records")
    check_image_paths(src, records)
    return records, src.bad
