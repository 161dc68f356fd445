"""No command deletes what an earlier run made: a file in the way is moved aside, named with its time."""

from __future__ import annotations

import time
from pathlib import Path


def free_name(path: Path) -> Path:
    """`path`, or with `+` added before its suffix until no file or folder has the name (two set asides
    within one second)."""
    while path.exists():
        path = path.with_name(f"{path.stem}+{path.suffix}")
    return path


def aside_name(path: Path) -> Path:
    """A free name beside `path` stamped with its modification time: `metrics.csv` ->
    `metrics.20261201-060102.csv`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    return free_name(path.with_name(f"{path.stem}.{stamp}{path.suffix}"))
