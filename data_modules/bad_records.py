"""Bad records: a published set of millions of lines has a few broken ones (an empty prompt, a
conversation whose roles are swapped). Each is skipped, counted by reason and the first few named; a
source whose bad share passes `max_bad_fraction` stops at setup, since that is a broken download or
the wrong file, not a stray line."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)
MAX_BAD_FRACTION = 0.01
NAMED = 5  # bad records named in messages


class BadRecord(ValueError):
    """One record that cannot be used; `reason` is its count's key ("empty 'prompt'")."""

    def __init__(self, where: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{where}: {reason}" + (f": {detail}" if detail else ""))
        self.reason = reason


class BadRecords:
    """The records one source left out: counts by reason and the first `NAMED` messages."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, bad: BadRecord) -> None:
        self.counts[bad.reason] += 1
        if len(self.first) < NAMED:
            self.first.append(str(bad))

    @contextmanager
    def skipping(self) -> Iterator[None]:
        """Run one record's parsing; a `BadRecord` it raises is counted and the record left out."""
        try:
            yield
        except BadRecord as bad:
            self.add(bad)

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())
        return f"{reasons}; first: " + "; ".join(self.first)

    def check(self, source: str, kept: int, max_fraction: float = MAX_BAD_FRACTION) -> None:
        """Log what was skipped; ValueError if more than `max_fraction` of the records were bad."""
        if not self.total:
            return
        seen = kept + self.total
        share = f"{self.total} of {seen} records ({self.total / seen:.2%})"
        if self.total > max_fraction * seen:
            raise ValueError(
                f"source {source!r}: {share} are bad, over max_bad_fraction {max_fraction}: {self.summary()}"
            )
        log.warning("source %s: skipped %s: %s", source, share, self.summary())


def iter_jsonl(path: str, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    """("file:line", object) for every non-blank line; a line that is not JSON is counted in `bad`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                where = f"{path}:{n}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as err:
                    bad.add(BadRecord(where, "not JSON", str(err)))
