"""What the readers share: opening a source's files with an error that names them, and reading fields of a
published record with an error that names the record."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


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


def iter_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", object) for every non-blank line."""
    with open(require(path), encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                where = f"{path}:{n}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not JSON: {err}") from None


def text(obj: Any, key: str, where: str) -> str:
    """`obj[key]` as a non-empty string, else ValueError naming the record and the key."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: needs a non-empty string {key!r}, got {value!r}")
    return value.strip()


def items(obj: Any, key: str, where: str) -> list[Any]:
    """`obj[key]` as a non-empty list, else ValueError naming the record and the key."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: needs a non-empty list {key!r}, got {value!r}")
    return value
