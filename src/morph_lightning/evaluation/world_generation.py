"""The world's generation splits in the layouts the public benchmarks are read in, so the same tasks score
them (`make eval-generation` without paths):

    python -m morph_lightning.evaluation.world_generation data/world data/world/generation

- text-to-image: the world's held-out text-to-image records as LAVIS' `coco_karpathy_test.json` (a list of
  {"image", "caption": [one caption]}, image paths relative to the output folder), for `coco-t2i`;
- editing: the held-out single edits and edit chains as MagicBrush's Hub dataset (`save_to_disk`, split
  "dev": `img_id`, `turn_index`, `source_img`, `mask_img`, `instruction`, `target_img`; a chain is one
  session, its turns in order), for `magicbrush-edit`. The world has no edit masks; `mask_img` is white.

Both are read from `instruct/val.jsonl`, which the world writer writes; nothing in the world is changed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

from PIL import Image

from morph_lightning.data_modules.sources.templates import TEXT_TO_IMAGE

T2I_FILE = "coco_karpathy_test.json"
MAGICBRUSH_DIR = "magicbrush"
PREFIX, SUFFIX = TEXT_TO_IMAGE.split("{caption}")


def _records(world: Path) -> list[dict]:
    path = world / "instruct" / "val.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no {path}: write the world first (make demo)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _caption(record: dict) -> str:
    text = record["input_text"]
    if not (text.startswith(PREFIX) and text.endswith(SUFFIX)):
        raise ValueError(f"{record['id']}: not in the text-to-image template: {text!r}")
    return text[len(PREFIX) : -len(SUFFIX)]


def _white_png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


def write_generation_splits(world: Path, out: Path) -> dict[str, int]:
    """Write both splits under `out` (a split already there is left as it is); returns their sizes."""
    import datasets  # only this writer needs it

    records = _records(world)
    images = world / "instruct"
    out.mkdir(parents=True, exist_ok=True)
    t2i = [
        {"image": os.path.relpath(images / r["output_img"], out), "caption": [_caption(r)]}
        for r in records
        if r["task"] == "t2i"
    ]
    if not (out / T2I_FILE).exists():
        (out / T2I_FILE).write_text(json.dumps(t2i, indent=1) + "\n", encoding="utf-8")

    edits = [r for r in records if r["task"] in ("edit", "chain")]
    rows: dict[str, list] = {k: [] for k in ("img_id", "turn_index", "source_img", "mask_img")}
    rows |= {"instruction": [], "target_img": []}
    for r in edits:
        source, target = images / r["input_img"][0], images / r["output_img"]
        rows["img_id"].append(r.get("chain", r["id"]))
        rows["turn_index"].append(r.get("turn", 0) + 1)
        rows["source_img"].append({"bytes": source.read_bytes(), "path": None})
        rows["mask_img"].append({"bytes": _white_png(Image.open(source).size), "path": None})
        rows["instruction"].append(r["instruction"])
        rows["target_img"].append({"bytes": target.read_bytes(), "path": None})
    features = datasets.Features(
        {
            "img_id": datasets.Value("string"),
            "turn_index": datasets.Value("int32"),
            "source_img": datasets.Image(),
            "mask_img": datasets.Image(),
            "instruction": datasets.Value("string"),
            "target_img": datasets.Image(),
        }
    )
    if not (out / MAGICBRUSH_DIR).exists():
        dev = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict({"dev": dev}).save_to_disk(str(out / MAGICBRUSH_DIR))
    return {"text-to-image": len(t2i), "edits": len(edits), "sessions": len(set(rows["img_id"]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("world", type=Path, help="the world's folder (data/world)")
    parser.add_argument("out", type=Path, help="where the splits go (data/world/generation)")
    args = parser.parse_args(argv)
    sizes = write_generation_splits(args.world, args.out)
    print(f"[world-generation] {args.out}: " + ", ".join(f"{n} {k}" for k, n in sizes.items()))


if __name__ == "__main__":
    main()
