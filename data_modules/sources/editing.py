"""Image-editing sources (Appendix C.1 (2)), published as Hugging Face datasets, rendered as
"USER: {image1} What will this image be like with the editing instruction: {instruction}.
ASSISTANT: {image2}" (one line)."""

from __future__ import annotations

from morph_lightning.data_modules.instruct import Record, build_record
from morph_lightning.data_modules.sources.common import text
from morph_lightning.data_modules.sources.hf import image_column, load_rows, plain_rows
from morph_lightning.data_modules.sources.templates import EDIT


def _edits(
    path: str, split: str, cache_dir: str | None, source: str, instruction: str, target: str
) -> list[Record]:
    rows = load_rows(path, split, cache_dir, columns=(source, instruction, target))
    sources, targets = image_column(rows, source, path), image_column(rows, target, path)
    records = []
    for i, row in enumerate(plain_rows(rows, [instruction])):
        where = f"{path}[{i}]"
        words = text(row, instruction, where).rstrip(".")  # the template adds the full stop
        records.append(
            build_record(EDIT.format(instruction=words), [sources[i]], where, output_img=targets[i])
        )
    return records


def read_instructpix2pix(
    name: str, seed: int, path: str, split: str = "train", cache_dir: str | None = None
) -> list[Record]:
    """InstructPix2Pix (IPr2Pr): columns `original_image`, `edit_prompt`, `edited_image`."""
    return _edits(path, split, cache_dir, "original_image", "edit_prompt", "edited_image")


def read_magicbrush(
    name: str, seed: int, path: str, split: str = "train", cache_dir: str | None = None
) -> list[Record]:
    """MagicBrush: one row per turn, columns `source_img`, `instruction`, `target_img` (`turn_index`'s
    source image is already the previous turn's target)."""
    return _edits(path, split, cache_dir, "source_img", "instruction", "target_img")
