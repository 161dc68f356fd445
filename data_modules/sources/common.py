"""What the readers share: the source a reader fills, opening its files with an error that names them,
reading fields of a published record, where a bad field makes a `BadRecord` that names the record."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from morph_lightning.data_modules.bad_records import BadRecord, BadRecords
from morph_lightning.data_modules.instruct import Record

log = logging.getLogger(__name__)
CHECKED_IMAGES = 16  # image paths checked at setup, spread over a source's records


@dataclass
class Source:
    """What a reader gets besides its options: the source's name and the run's seed (which key its
    template choices), where it counts the records it leaves out, and the image root it settled on."""

    name: str
    seed: int
    bad: BadRecords = field(default_factory=BadRecords)
    image_root: str | None = None


def require(path: str, what: str = "file") -> str:
    """`path` if it exists, else FileNotFoundError naming it (at setup, not at the first batch)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such {what}: {path}")
    return path


def read_json(path: str) -> Any:
    with open(require(path), encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON: {err}") from None


def text(obj: Any, key: str, where: str) -> str:
    """`obj[key]` as a non-empty string, else a BadRecord naming the record and the key."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str) or not value.strip():
        reason = f"no {key!r}" if value is None else f"empty {key!r}" if value == "" else f"bad {key!r}"
        raise BadRecord(where, reason, f"needs a non-empty string, got {value!r}")
    return value.strip()


def items(obj: Any, key: str, where: str) -> list[Any]:
    """`obj[key]` as a non-empty list, else a BadRecord naming the record and the key."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, list) or not value:
        reason = f"no {key!r}" if value is None else f"empty {key!r}" if value == [] else f"bad {key!r}"
        raise BadRecord(where, reason, f"needs a non-empty list, got {value!r}")
    return value


def first_root(candidates: list[str], relative: list[str]) -> str:
    """The first of `candidates` under which one of the `relative` image paths exists (else the first):
    where a set's images end up depends on where its archives were unpacked."""
    for root in candidates:
        if any(os.path.exists(os.path.join(root, p)) for p in relative):
            return root
    return candidates[0]


def check_image_paths(src: Source, records: list[Record]) -> None:
    """Check that images exist for a spread of `records` at setup: none found is a wrong root
    (FileNotFoundError naming the source, the root and an example); some missing is logged."""
    step = max(1, len(records) // CHECKED_IMAGES)
    paths = [im for r in records[::step][:CHECKED_IMAGES] for im in r.images if isinstance(im, str)]
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return
    root = f"image root {src.image_root}" if src.image_root else "its image paths"
    found = f"{len(paths) - len(missing)} of {len(paths)} images checked exist"
    if len(missing) == len(paths):
        raise FileNotFoundError(f"source {src.name!r}: {found} under {root}, e.g. {missing[0]}")
    log.warning("source %s: %s under %s; missing e.g. %s", src.name, found, root, missing[0])
