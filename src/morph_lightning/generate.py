"""`python -m morph_lightning generate (--checkpoint FILE | --export DIR) --out DIR
(--prompt TEXT [--image PATH]... | --prompts FILE)`: ask a trained model for text and images.

A prompt is wrapped in the chat template `USER: {prompt} ASSISTANT:` unless it starts with "USER:"; its
images go where its `<image>` marks are, and images without a mark get one at the prompt's start.
Text-to-image ("A large red circle in the centre. Generate an image based on the description."), editing
(an image and an instruction) and in-context editing (several images) are all prompts: the model answers
with `<img> ... </img>`, which is decoded to pixels. Decoding is greedy for text and images unless
`--temperature` / `--image-temperature` say otherwise.

`--prompts FILE` reads a jsonl file, one `{"id": ..., "prompt": ..., "images": [paths]}` per line (paths
relative to the file's folder; `images` may be left out); a bad line (or one whose image cannot be read)
is skipped with a warning naming file:line, and counted.

Writes `OUT/outputs.jsonl` (per prompt: id, prompt as sent, images, text, output_images) and each
generated image as `OUT/<id>-<k>.png`. An earlier run's outputs are never overwritten: if OUT already
holds `outputs.jsonl` or PNG files, the command stops before loading the model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from morph_lightning.inference import (
    Answerer,
    InferenceError,
    add_model_arguments,
    chat_prompt,
    save_png,
    write_new,
)

OUTPUTS = "outputs.jsonl"
# An id names its PNG files: nothing that could leave OUT or hide a file.
SAFE_ID = re.compile(r"\w[\w.-]*")


@dataclass
class Item:
    id: str
    prompt: str  # in the chat template, one `<image>` mark per image
    images: list[str]
    where: str  # "file:line" (or "--prompt"), for messages


def read_prompts(path: str) -> tuple[list[Item], int]:
    """The prompts of a jsonl file, and how many lines were skipped (each with a warning)."""
    folder = os.path.dirname(path)
    items: list[Item] = []
    skipped = 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InferenceError(f"cannot read {path}: {err.strerror}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            items.append(_parse_line(line, folder, f"{path}:{n}", {it.id for it in items}))
        except InferenceError as err:
            _warn(f"{path}:{n}: skipped: {err}")
            skipped += 1
    return items, skipped


def _parse_line(line: str, folder: str, where: str, seen: set[str]) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InferenceError(f"not JSON ({err})") from None
    if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("prompt"), str):
        raise InferenceError('need an object with "id" and "prompt" (a string)')
    rid, images = str(obj["id"]), obj.get("images", [])
    if not SAFE_ID.fullmatch(rid):
        raise InferenceError(f"id {rid!r} must be letters, digits, '_', '-' or '.' (it names files)")
    if rid in seen:
        raise InferenceError(f"id {rid!r} used before")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise InferenceError('"images" must be a list of paths')
    return Item(
        rid, chat_prompt(obj["prompt"], len(images)), [os.path.join(folder, p) for p in images], where
    )


def _warn(message: str) -> None:
    tqdm.write(f"[generate] {message}", file=sys.stderr)


def check_out(out: Path) -> None:
    """Refuse an OUT where an earlier run wrote its outputs."""
    if (out / OUTPUTS).exists() or any(out.glob("*.png")):
        raise InferenceError(f"{out} holds an earlier run's outputs: not overwritten (choose another --out)")


def answer_all(
    answerer: Answerer, items: list[Item], out: Path, batch_size: int, single: bool
) -> tuple[list[dict], int]:
    """Answer `items` in batches, writing each generated image; returns the output records and how many
    items were skipped for an unreadable image. `single`: the one prompt of `--prompt`, answered without
    a progress bar, printed alone, and an unreadable image of it is an error."""
    records: list[dict] = []
    skipped = 0
    with tqdm(total=len(items), desc="generate", unit="prompt", disable=single) as bar:
        for start in range(0, len(items), batch_size):
            chunk, batch, rows = items[start : start + batch_size], [], []
            for item in chunk:
                try:
                    rows.append((item.prompt, [answerer.read_image(p) for p in item.images]))
                    batch.append(item)
                except InferenceError as err:
                    if single:
                        raise
                    _warn(f"{item.where}: skipped: {err}")
                    skipped += 1
            for item, answer in zip(batch, answerer.answer(rows) if rows else [], strict=True):
                names = [f"{item.id}-{k}.png" for k in range(len(answer.images))]
                for name, pixels in zip(names, answer.images, strict=True):
                    save_png(pixels, out / name)
                records.append(
                    {
                        "id": item.id,
                        "prompt": item.prompt,
                        "images": item.images,
                        "text": answer.text,
                        "output_images": names,
                    }
                )
                tqdm.write(answer.text if single else f"{item.id}: {answer.text}", file=sys.stdout)
            bar.update(len(chunk))
    return records, skipped


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m morph_lightning generate", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(parser)
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt; `<image>` marks where its images go")
    prompts.add_argument("--prompts", metavar="FILE", help='a jsonl file of {"id", "prompt", "images"}')
    parser.add_argument("--image", action="append", default=[], help="an image of --prompt (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts answered together")
    parser.add_argument("--out", required=True, help="where outputs.jsonl and the PNG files go")
    args = parser.parse_args(argv)
    if args.image and args.prompts:
        parser.error("--image goes with --prompt; a --prompts file names each prompt's images")
    try:
        return _run(args)
    except InferenceError as err:
        raise SystemExit(f"generate: {err}") from None


def _run(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    check_out(out)
    if args.prompt is not None:
        items, skipped = (
            [Item("prompt", chat_prompt(args.prompt, len(args.image)), args.image, "--prompt")],
            0,
        )
    else:
        items, skipped = read_prompts(args.prompts)
    answerer = Answerer(args)
    records, unreadable = answer_all(answerer, items, out, args.batch_size, single=args.prompt is not None)
    skipped += unreadable
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_new(out / OUTPUTS, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    images = sum(len(r["output_images"]) for r in records)
    print(
        f"[generate] {len(records)} answered, {skipped} skipped, {images} images: {out / OUTPUTS}",
        file=sys.stderr,
    )
    return records
