"""Image-editing sources (Appendix C.1 (2)), rendered as "USER: {image1} What will this image be like
with the editing instruction: {instruction}. ASSISTANT: {image2}" (one line)."""

from __future__ import annotations

import math
import os

from morph_lightning.data_modules.bad_records import BadRecord
from morph_lightning.data_modules.instruct import Record, build_record
from morph_lightning.data_modules.sources.common import Source, read_json, text
from morph_lightning.data_modules.sources.hf import image_column, load_rows, plain_rows
from morph_lightning.data_modules.sources.templates import EDIT

# InstructPix2Pix's own `EditDataset` cuts `seeds.json` into train / val / test by these shares, in order.
IP2P_SPLITS = {"train": (0.0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1.0)}


def _edit(instruction: str, source: object, target: object, where: str) -> Record:
    words = instruction.rstrip(".")  # the template adds the full stop
    return build_record(EDIT.format(instruction=words), [source], where, output_img=target)


def _hf_edits(
    src: Source, path: str, split: str, cache_dir: str | None, source: str, instruction: str, target: str
) -> list[Record]:
    rows = load_rows(path, split, cache_dir, columns=(source, instruction, target))
    sources, targets = image_column(rows, source, path), image_column(rows, target, path)
    records = []
    for i, row in enumerate(plain_rows(rows, [instruction])):
        where = f"{path}[{i}]"
        with src.bad.skipping():
            records.append(_edit(text(row, instruction, where), sources[i], targets[i], where))
    return records


def _ip2p_folder(src: Source, path: str, split: str) -> list[Record]:
    """The original release (`clip-filtered-dataset/`): `seeds.json` lists `[name, [seed, ...]]`; each
    `<name>/prompt.json` holds `{"input", "edit", "output"}` and each seed a pair `<seed>_0.jpg` (before)
    and `<seed>_1.jpg` (after). Every seed's pair is one record; `split` is `EditDataset`'s cut."""
    if split not in IP2P_SPLITS:
        raise ValueError(
            f"{path}: split must be one of {sorted(IP2P_SPLITS)} (InstructPix2Pix's), got {split!r}"
        )
    seeds = read_json(os.path.join(path, "seeds.json"))
    if not isinstance(seeds, list):
        raise ValueError(f"{path}/seeds.json: needs a list of [name, [seeds]], got {type(seeds).__name__}")
    lo, hi = (math.floor(f * len(seeds)) for f in IP2P_SPLITS[split])
    src.image_root = path
    records = []
    for k in range(lo, hi):
        where = f"{path}/seeds.json[{k}]"
        with src.bad.skipping():
            entry = seeds[k]
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list) and entry[1]):
                raise BadRecord(where, "bad seeds entry", f"needs [name, [seeds]], got {entry!r}")
            folder = os.path.join(path, str(entry[0]))
            prompt_file = os.path.join(folder, "prompt.json")
            if not os.path.exists(prompt_file):
                raise BadRecord(where, "no prompt.json", prompt_file)
            try:
                prompt = read_json(prompt_file)
            except ValueError as err:  # not JSON
                raise BadRecord(where, "bad prompt.json", str(err)) from None
            edit = text(prompt, "edit", prompt_file)
            for seed in entry[1]:
                pair = [os.path.join(folder, f"{seed}_{side}.jpg") for side in (0, 1)]
                records.append(_edit(edit, pair[0], pair[1], f"{where} seed {seed}"))
    return records


def read_instructpix2pix(
    src: Source, path: str, split: str = "train", cache_dir: str | None = None
) -> list[Record]:
    """InstructPix2Pix (IPr2Pr) in either published form: the original folder with `seeds.json`, or the
    Hugging Face dataset (columns `original_image`, `edit_prompt`, `edited_image`)."""
    if os.path.exists(os.path.join(path, "seeds.json")):
        return _ip2p_folder(src, path, split)
    return _hf_edits(src, path, split, cache_dir, "original_image", "edit_prompt", "edited_image")


def read_magicbrush(
    src: Source, path: str, split: str = "train", cache_dir: str | None = None
) -> list[Record]:
    """MagicBrush, the Hugging Face dataset (`data/train-*.parquet`, `data/dev-*.parquet`): one row per
    turn, columns `img_id`, `turn_index`, `source_img`, `mask_img`, `instruction`, `target_img` (a turn's
    source image is already the previous turn's target). `split: dev` reads its dev files alone."""
    return _hf_edits(src, path, split, cache_dir, "source_img", "instruction", "target_img")
