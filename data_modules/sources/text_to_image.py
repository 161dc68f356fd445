"""Text-to-image sources (Appendix C.1 (1)): a prompt in, its image out, rendered as
"USER: {caption} Generate an image based on the description. ASSISTANT: {image}"."""

from __future__ import annotations

import os

from morph_lightning.data_modules.bad_records import BadRecord, iter_jsonl
from morph_lightning.data_modules.instruct import Record, build_record
from morph_lightning.data_modules.sources.common import CHECKED_IMAGES, Source, first_root, text
from morph_lightning.data_modules.sources.hf import image_column, load_rows, plain_rows
from morph_lightning.data_modules.sources.templates import TEXT_TO_IMAGE


def _t2i(prompt: str, image: object, where: str) -> Record:
    return build_record(TEXT_TO_IMAGE.format(caption=prompt), [], where, output_img=image)


def read_journeydb(src: Source, path: str, image_root: str | None = None) -> list[Record]:
    """JourneyDB's annotation json lines (`data/train/train_anno_realease_repath.jsonl`), each
    `{"img_path": "./000/<id>.jpg", "prompt": ..., "Task1": ..., ...}`. Its images come as
    `data/train/imgs/000.tgz` ... `199.tgz`, each holding `000/<id>.jpg`, so `img_path` is relative to
    the folder they were unpacked in: `imgs/` beside the jsonl (unpacked in place) or the jsonl's own
    folder, whichever holds them; `image_root` names another."""
    rows = []
    for where, obj in iter_jsonl(path, src.bad):
        with src.bad.skipping():
            rows.append((where, text(obj, "prompt", where), text(obj, "img_path", where)))
    folder = os.path.dirname(os.path.abspath(path))
    candidates = [image_root] if image_root else [os.path.join(folder, "imgs"), folder]
    src.image_root = first_root(candidates, [rel for *_, rel in rows[:CHECKED_IMAGES]])
    return [_t2i(prompt, os.path.normpath(os.path.join(src.image_root, rel)), w) for w, prompt, rel in rows]


def _part_folders(path: str, image_root: str | list[str] | None) -> list[str]:
    if image_root:
        return [image_root] if isinstance(image_root, str) else list(image_root)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path).startswith("metadata-large"):  # DiffusionDB Large splits its parts in two
        return [os.path.join(folder, f"diffusiondb-large-part-{k}") for k in (1, 2)]
    return [os.path.join(folder, "images")]


def read_diffusiondb(
    src: Source,
    path: str,
    image_root: str | list[str] | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> list[Record]:
    """DiffusionDB in either published form:

    - the metadata table (`metadata.parquet` for 2M, `metadata-large.parquet` for Large; columns
      `image_name`, `prompt`, `part_id`, ...) with the image zips unpacked to
      `{root}/part-{part_id:06d}/{image_name}`. The roots default to `images/` (2M) or
      `diffusiondb-large-part-1/` and `-part-2/` (Large) beside the table; each part is looked up in
      the roots in order. `image_root` (a folder or a list) names others;
    - rows as its Hugging Face loader gives them (`image`, `prompt`, `seed`, ...), saved with
      `save_to_disk` or as parquet: the images are in the rows."""
    rows = load_rows(path, split, cache_dir, columns=("prompt",))
    if "image" in rows.column_names:
        images = image_column(rows, "image", path)
        records = []
        for i, row in enumerate(plain_rows(rows, ["prompt"])):
            with src.bad.skipping():
                records.append(_t2i(text(row, "prompt", f"{path}[{i}]"), images[i], f"{path}[{i}]"))
        return records
    missing = [c for c in ("image_name", "part_id") if c not in rows.column_names]
    if missing:
        raise ValueError(f"{path}: has neither an 'image' column nor {missing}: {rows.column_names}")
    roots = _part_folders(path, image_root)
    src.image_root = " or ".join(roots)
    part_folder: dict[int, str] = {}
    records = []
    for i, row in enumerate(plain_rows(rows, ["image_name", "prompt", "part_id"])):
        where = f"{path}[{i}]"
        with src.bad.skipping():
            part = row["part_id"]
            if not isinstance(part, int):
                raise BadRecord(where, "bad 'part_id'", f"needs an integer, got {part!r}")
            if part not in part_folder:
                name = f"part-{part:06d}"
                found = [r for r in roots if os.path.isdir(os.path.join(r, name))]
                part_folder[part] = os.path.join(found[0] if found else roots[0], name)
            image = os.path.join(part_folder[part], text(row, "image_name", where))
            records.append(_t2i(text(row, "prompt", where), image, where))
    return records
