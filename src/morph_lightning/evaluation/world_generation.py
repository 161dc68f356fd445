"""The world's generation splits in the layouts the public benchmarks are read in, so the same tasks score
them (`make eval-generation` without paths):

    python -m morph_lightning.evaluation.world_generation data/world data/world/generation

- text-to-image: the world's held-out text-to-image records as LAVIS' `coco_karpathy_test.json` (a list of
  {"image", "caption": [one caption]}, image paths relative to the output folder), for `coco-t2i`;
- editing: the held-out single edits and edit chains as MagicBrush's Hub dataset (`save_to_disk`, split
  "dev": `img_id`, `turn_index`, `source_img`, `mask_img`, `instruction`, `target_img`; a chain is one
  session, its turns in order), for `magicbrush-edit`. The world has no edit masks; `mask_img` is white;
- retrieval: the images of the held-out text-to-image records (their target image and caption) and
  captioning records (their image and reference caption) as LAVIS' `flickr30k_test.json` (a list of
  {"image", "caption": [...]}), for `flickr30k-retrieval`. Records showing the same scene hold the same
  picture (the world draws a scene one way), so each scene is one image, with the captions of every record
  that shows it (one to three; in the world `make demo` writes, 557 images and 600 captions). A world
  caption names every object's size, colour, shape and cell, so a caption fits its own image only; no
  caption is given to two images. The records are held out from training, their scenes are not: the world
  draws the training pairs' scenes from the same small space, and some are the same.

All are read from `instruct/val.jsonl`, which the world writer writes; nothing in the world is changed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

from PIL import Image

from morph_lightning.data_modules.sources.templates import TEXT_TO_IMAGE
from morph_lightning.evaluation.runner import write_atomic

T2I_FILE = "coco_karpathy_test.json"
RETRIEVAL_FILE = "flickr30k_test.json"
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


def _retrieval_test(records: list[dict], images: Path, out: Path) -> list[dict]:
    """One LAVIS record per scene shown by a text-to-image or captioning record, in file order."""
    by_scene: dict[str, dict] = {}
    for r in records:
        if r["task"] == "t2i":
            image, scene, text = r["output_img"], r["scene_out"], _caption(r)
        elif r["task"] == "caption":
            image, scene, text = r["input_img"][0], r["scene_in"], r["output_text"]
        else:
            continue
        key = json.dumps(sorted(json.dumps(obj, sort_keys=True) for obj in scene))  # objects in any order
        entry = by_scene.setdefault(key, {"image": os.path.relpath(images / image, out), "caption": []})
        entry["caption"].append(text)
    return list(by_scene.values())


def _white_png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


def write_generation_splits(world: Path, out: Path) -> dict[str, int]:
    """Write the splits under `out` (a split already there is left as it is); returns their sizes."""
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

    retrieval = _retrieval_test(records, images, out)
    if not (out / RETRIEVAL_FILE).exists():
        write_atomic(out / RETRIEVAL_FILE, json.dumps(retrieval, indent=1) + "\n")
    return {
        "text-to-image": len(t2i),
        "edits": len(edits),
        "sessions": len(set(rows["img_id"])),
        "retrieval images": len(retrieval),
        "retrieval captions": sum(len(r["caption"]) for r in retrieval),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("world", type=Path, help="the world's folder (data/world)")
    parser.add_argument("out", type=Path, help="where the splits go (data/world/generation)")
    args = parser.parse_args(argv)
    sizes = write_generation_splits(args.world, args.out)
    print(f"[world-generation] {args.out}: " + ", ".join(f"{n} {k}" for k, n in sizes.items()))


if __name__ == "__main__":
    main()
