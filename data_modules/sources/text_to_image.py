"""Text-to-image sources (Appendix C.1 (1)): a prompt in, its image out, rendered as
"USER: {caption} Generate an image based on the description. ASSISTANT: {image}"."""

from __future__ import annotations

import os

from morph_lightning.data_modules.instruct import Record, build_record
from morph_lightning.data_modules.sources.common import iter_jsonl, text
from morph_lightning.data_modules.sources.hf import load_rows, plain_rows
from morph_lightning.data_modules.sources.templates import TEXT_TO_IMAGE


def _t2i(prompt: str, image: str, where: str) -> Record:
    return build_record(TEXT_TO_IMAGE.format(caption=prompt), [], where, output_img=image)


def read_journeydb(name: str, seed: int, path: str, image_root: str | None = None) -> list[Record]:
    """JourneyDB's annotation json lines, `{"img_path": "./000/x.jpg", "prompt": "...", ...}`; image paths
    are relative to `image_root` (default: the jsonl's folder)."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    return [
        _t2i(text(obj, "prompt", where), os.path.join(root, text(obj, "img_path", where)), where)
        for where, obj in iter_jsonl(path)
    ]


def read_diffusiondb(
    name: str, seed: int, path: str, image_root: str | None = None, cache_dir: str | None = None
) -> list[Record]:
    """DiffusionDB's `metadata.parquet` (`image_name`, `prompt`, `part_id`, ...); images as unzipped from
    its parts, `{image_root}/part-{part_id:06d}/{image_name}` (default root: `images/` beside the parquet)."""
    root = image_root or os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    columns = ["image_name", "prompt", "part_id"]
    records = []
    for i, row in enumerate(
        plain_rows(load_rows(path, cache_dir=cache_dir, columns=tuple(columns)), columns)
    ):
        where = f"{path}[{i}]"
        if not isinstance(row["part_id"], int):
            raise ValueError(f"{where}: needs an integer 'part_id', got {row['part_id']!r}")
        image = os.path.join(root, f"part-{row['part_id']:06d}", text(row, "image_name", where))
        records.append(_t2i(text(row, "prompt", where), image, where))
    return records
