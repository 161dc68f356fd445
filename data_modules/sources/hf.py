"""Sources published as Hugging Face datasets: a folder saved with `save_to_disk`, or parquet files (the
Hub's layout), read with `datasets` so the rows stay memory-mapped and images are decoded only when a
sample is loaded."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

from morph_lightning.data_modules.sources.common import require
from morph_lightning.data_modules.transforms import BadImage

# Split names as the Hub writes them, and what else the same split is called ("dev" is MagicBrush's).
SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test", "testing", "eval")}


def _split_files(folder: str, split: str) -> list[str]:
    """The parquet files of `split` in a folder in the Hub's layout (`data/train-00000-of-00002-*.parquet`,
    `data/dev-*.parquet`, `train/*.parquet`, ...), found with `datasets`' own split patterns; a folder
    whose names carry no split is all "train"."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    found = DataFilesDict.from_patterns(get_data_patterns(folder), folder)
    splits = {str(k): sorted(f for f in v if f.endswith(".parquet")) for k, v in found.items()}
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        raise FileNotFoundError(f"no parquet files in {folder}")
    names = next((names for names in SPLIT_ALIASES.values() if split in names), (split,))
    for name in (split, *names):
        if name in splits:
            return splits[name]
    raise ValueError(f"{folder}: no split {split!r} among its parquet files, only {sorted(splits)}")


def load_rows(
    path: str, split: str = "train", cache_dir: str | None = None, columns: tuple[str, ...] = ()
) -> Any:
    """A `datasets.Dataset` from a `save_to_disk` folder (split `split` of a DatasetDict), a folder of
    parquet files in the Hub's layout (the files of split `split` only), a parquet file or a glob of
    them; ValueError naming `path` if a column is missing.

    Parquet is converted once into arrow files under `cache_dir` (default: the `datasets` cache)."""
    import datasets  # only the sources that are HF datasets need it

    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")
    ):
        rows = datasets.load_from_disk(path)
        if isinstance(rows, datasets.DatasetDict):
            if split not in rows:
                raise ValueError(f"{path}: no split {split!r}, only {sorted(rows)}")
            rows = rows[split]
    else:
        if os.path.isdir(path):
            files = _split_files(path, split)
        else:
            files = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [require(path)]
            if not files:
                raise FileNotFoundError(f"no parquet files: {path}")
        rows = datasets.Dataset.from_parquet(files, cache_dir=cache_dir)
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}, has {rows.column_names}")
    for name, feature in rows.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            rows = rows.cast_column(name, datasets.Image(decode=False))  # bytes; `load_image` decodes safely
    return rows


@dataclass
class ArrowImage:
    """An image in a dataset's row, read when its sample is loaded; `str()` names it for skip messages."""

    rows: Any  # a one-column view of the dataset (`select_columns`), so a read fetches this cell only
    row: int
    column: str
    origin: str

    def __call__(self) -> bytes | str:
        cell = self.rows[self.row][self.column]
        data = (cell.get("bytes") or cell.get("path")) if isinstance(cell, dict) else cell
        if not data:
            raise BadImage("missing", f"empty cell {self}")
        return data

    def __str__(self) -> str:
        return f"{self.origin}[{self.row}].{self.column}"


def image_column(rows: Any, column: str, origin: str) -> list[ArrowImage]:
    view = rows.select_columns([column])
    return [ArrowImage(view, i, column, origin) for i in range(len(rows))]


def plain_rows(rows: Any, columns: list[str]) -> list[dict[str, Any]]:
    """The non-image `columns` of every row as dicts, read column-wise (fast for millions of rows)."""
    data = rows.select_columns(columns).to_dict()
    return [{c: data[c][i] for c in columns} for i in range(len(rows))]
