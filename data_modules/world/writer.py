"""Writes the embedded world to disk in the formats the real data modules read.

Two datasets, both deterministic given a seed:

* image-text pairs as webdataset shards in img2dataset's layout, ``OUT/pairs/{train,val}/{shard:05d}.tar``
  with ``{key}.jpg``, ``{key}.txt`` and ``{key}.json`` per sample (9-digit keys);
* instruction data as jsonl in the project's own format (``instruct.py``),
  ``OUT/instruct/{train,val}.jsonl``, images in ``OUT/instruct/images/`` and referenced relative to the
  jsonl's folder, with the paper's Appendix C.1 templates (one literal ``<image>`` mark per input image);
* with ``num_demon``, the world's multi-image, image-difference and in-context tasks as evaluation
  datasets in the DEMON benchmark's layout, ``OUT/demon/<Dataset>/core/core.json`` (see ``demon.py``),
  and with ``num_demon_train`` other samples of them as instruction records in DEMON's prompt format,
  ``OUT/instruct/demon_train.jsonl``;
* the world's text as a plain corpus, ``OUT/text/{train,val}.txt`` (every caption and every instruction
  conversation without its image marks, one per line), and ``OUT/tokenizer/``, a byte-level BPE learnt
  on the train corpus: the vocabulary a stage-0 LM for the world is pretrained with.

Every record draws from its own ``random.Random`` keyed by (seed, split, task, index), so one record's
content does not depend on how many others were written before it. Every file is written under a
temporary name and renamed into place, and ``OUT/world.json`` is written last: a finished world with the
same settings is returned as is, an interrupted one is rewritten from scratch.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from morph_lightning.data_modules.sources.demon import build_prompt
from morph_lightning.modeling.text_tokenizer import train_bpe_tokenizer

from .demon import MAKERS as DEMON_MAKERS
from .demon import demon_dataset
from .edits import IN_CONTEXT_RULES, apply_rule, sample_chain, sample_edit
from .language import caption, compare, question
from .render import render
from .scene import Obj, Scene, sample_scene

FORMAT_VERSION = 2
IMAGE_MARK = "<image>"
JPEG_QUALITY = 95
TASKS = ("t2i", "edit", "caption", "vqa", "multi_image", "in_context", "chain")
DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "t2i": 0.2,
    "edit": 0.2,
    "caption": 0.1,
    "vqa": 0.2,
    "multi_image": 0.1,
    "in_context": 0.1,
    "chain": 0.1,
}
CHAIN_TURNS = 3
SPLITS = ("train", "val")

# InstructBLIP-style prompts (held-in caption / short-answer VQA templates), kept short.
CAPTION_PROMPTS = (
    "A short image caption:",
    "A short image description:",
    "Briefly describe the image.",
    "Write a short description for the image.",
    "Describe the image concisely.",
)
VQA_PROMPTS = (
    "{} Short answer:",
    "Question: {} Short answer:",
    "{} Answer the question using a single word.",
)


def _user(text: str) -> str:
    return f"USER: {text} ASSISTANT:"


def scene_to_json(scene: Scene) -> list[dict[str, Any]]:
    """The ground-truth scene as plain JSON: one {shape, colour, size, cell: [col, row]} per object."""
    return [
        {"shape": o.shape, "colour": o.colour, "size": o.size, "cell": list(o.cell)} for o in scene.objects
    ]


def scene_from_json(objs: list[dict[str, Any]]) -> Scene:
    return Scene(tuple(Obj(o["shape"], o["colour"], o["size"], tuple(o["cell"])) for o in objs))


def _jpeg(scene: Scene, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render(scene, size), "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _dumps(obj: Any) -> str:
    # Sorted keys and fixed separators make the text a pure function of the content.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write` to a temporary sibling, then rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _atomic_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def _rng(seed: int, *parts: object) -> random.Random:
    # String seeds go through sha512 in `random`, so they are stable across processes and platforms.
    return random.Random(":".join(str(p) for p in (seed, *parts)))


# ---------------------------------------------------------------- image-text pairs


def _pair(seed: int, split: str, i: int) -> tuple[Scene, str]:
    rng = _rng(seed, "pairs", split, i)
    scene = sample_scene(rng)
    return scene, caption(scene, rng)


def _write_pairs(root: Path, split: str, seed: int, count: int, size: int, shard_size: int) -> set[Path]:
    out = root / "pairs" / split
    out.mkdir(parents=True, exist_ok=True)
    written: set[Path] = set()
    for shard, start in enumerate(range(0, count, shard_size)):
        path = out / f"{shard:05d}.tar"

        def write(f: io.BufferedWriter, start: int = start) -> None:
            # mtime fixed so equal content gives byte-equal tars; we encode ourselves, hence encoder=False.
            with wds.TarWriter(f, encoder=False, mtime=0.0) as sink:
                for i in range(start, min(start + shard_size, count)):
                    scene, text = _pair(seed, split, i)
                    key = f"{i:09d}"
                    meta = {
                        "key": key,
                        "caption": text,
                        "width": size,
                        "height": size,
                        "status": "success",
                        "scene": scene_to_json(scene),
                    }
                    sink.write(
                        {
                            "__key__": key,
                            "jpg": _jpeg(scene, size),
                            "txt": text.encode("utf-8"),
                            "json": _dumps(meta).encode("utf-8"),
                        }
                    )

        _atomic_write(path, write)
        written.add(path)
    return written


# ---------------------------------------------------------------- instruction records


class _Images:
    """Writes instruction images once each under ``images/`` and hands back their relative paths."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        self.size = size
        self.written: set[Path] = set()

    def __call__(self, image_id: str, scene: Scene) -> str:
        path = self.folder / "images" / f"{image_id}.jpg"
        if path not in self.written:
            _atomic_bytes(path, _jpeg(scene, self.size))
            self.written.add(path)
        return path.relative_to(self.folder).as_posix()


def _record(
    rid: str,
    task: str,
    input_img: list[str],
    input_text: str,
    output_img: str | None = None,
    output_text: str | None = None,
    **extras: Any,
) -> dict[str, Any]:
    assert input_text.count(IMAGE_MARK) == len(input_img) and (output_img is None) != (output_text is None)
    return {
        "id": rid,
        "task": task,
        "input_img": input_img,
        "input_text": input_text,
        "output_img": output_img,
        "output_text": output_text,
        **extras,
    }


def _t2i(rid: str, rng: random.Random, img: _Images) -> list[dict[str, Any]]:
    scene = sample_scene(rng)
    text = _user(f"{caption(scene, rng)} Generate an image based on the description.")
    return [
        _record(rid, "t2i", [], text, output_img=img(f"{rid}-out", scene), scene_out=scene_to_json(scene))
    ]


def _edit(rid: str, rng: random.Random, img: _Images) -> list[dict[str, Any]]:
    edit = sample_edit(sample_scene(rng), rng)
    text = _user(
        f"{IMAGE_MARK} What will this image be like with the editing instruction: {edit.instruction}."
    )
    return [
        _record(
            rid,
            "edit",
            [img(f"{rid}-in", edit.source)],
            text,
            output_img=img(f"{rid}-out", edit.target),
            op=edit.op,
            instruction=edit.instruction,
            scene_in=scene_to_json(edit.source),
            scene_out=scene_to_json(edit.target),
        )
    ]


def _caption(rid: str, rng: random.Random, img: _Images) -> list[dict[str, Any]]:
    scene = sample_scene(rng)
    text = _user(f"{IMAGE_MARK} {rng.choice(CAPTION_PROMPTS)}")
    answer = caption(scene, rng)
    return [
        _record(
            rid, "caption", [img(f"{rid}-in", scene)], text, output_text=answer, scene_in=scene_to_json(scene)
        )
    ]


def _vqa(rid: str, rng: random.Random, img: _Images) -> list[dict[str, Any]]:
    scene = sample_scene(rng)
    q, a = question(scene, rng)
    text = _user(f"{IMAGE_MARK} {rng.choice(VQA_PROMPTS).format(q)}")
    return [
        _record(
            rid,
            "vqa",
            [img(f"{rid}-in", scene)],
            text,
            output_text=a,
            question=q,
            scene_in=scene_to_json(scene),
        )
    ]


def _multi_image(rid: str, rng: random.Random, img: _Images) -> list[dict[str, Any]]:
    first, second = sample_scene(rng), sample_scene(rng)
    q, a, _ = compare(first, second, rng)
    text = _user(f"This is the first image. {IMAGE_MARK} This is the second image. {IMAGE_MARK} {q}")
    paths = [img(f"{rid}-in0", first), img(f"{rid}-in1", second)]
    return [
        _record(
            rid,
            "multi_image",
            paths,
            text,
            output_text=a,
            question=q,
            scenes_in=[scene_to_json(first), scene_to_json(second)],
        )
    ]


def _in_context(rid: str, rng: random.Random, img: _Images) -> list[dict[str, Any]]:
    op, arg = rng.choice(IN_CONTEXT_RULES)
    scenes: list[tuple[Scene, Scene]] = []
    while len(scenes) < 3:  # resample scenes the rule does not change; every rule applies to some scenes
        scene = sample_scene(rng)
        target = apply_rule(scene, op, arg)
        if target is not None:
            scenes.append((scene, target))
    (s0, t0), (s1, t1), (query, answer) = scenes
    order = [s0, t0, s1, t1, query]
    paths = [img(f"{rid}-in{k}", s) for k, s in enumerate(order)]
    text = _user(" ".join([IMAGE_MARK] * len(paths)))
    return [
        _record(
            rid,
            "in_context",
            paths,
            text,
            output_img=img(f"{rid}-out", answer),
            op=op,
            argument=arg,
            scene_in=scene_to_json(query),
            scene_out=scene_to_json(answer),
            scenes_in=[scene_to_json(s) for s in order],
        )
    ]


def _chain(rid: str, rng: random.Random, img: _Images) -> list[dict[str, Any]]:
    edits = sample_chain(sample_scene(rng), rng, turns=CHAIN_TURNS)
    # Image k is the state before turn k, so turn k reads image k and writes image k + 1.
    paths = [img(f"{rid}-{k}", s) for k, s in enumerate([edits[0].source] + [e.target for e in edits])]
    return [
        _record(
            f"{rid}-t{k}",
            "chain",
            [paths[k]],
            _user(
                f"{IMAGE_MARK} What will this image be like with the editing instruction: {e.instruction}."
            ),
            output_img=paths[k + 1],
            chain=rid,
            turn=k,
            op=e.op,
            instruction=e.instruction,
            scene_in=scene_to_json(e.source),
            scene_out=scene_to_json(e.target),
        )
        for k, e in enumerate(edits)
    ]


_MAKERS: dict[str, Callable[[str, random.Random, _Images], list[dict[str, Any]]]] = {
    "t2i": _t2i,
    "edit": _edit,
    "caption": _caption,
    "vqa": _vqa,
    "multi_image": _multi_image,
    "in_context": _in_context,
    "chain": _chain,
}


def _largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    norm = sum(weights.values())
    exact = {t: total * w / norm for t, w in weights.items()}
    counts = {t: math.floor(v) for t, v in exact.items()}
    order = sorted(weights, key=lambda t: (counts[t] - exact[t], TASKS.index(t)))
    for t in order[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


def allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Records per task summing to `total` (rounded up to a whole chain only when chains are all there is).

    Chains come in whole chains of CHAIN_TURNS records, at least one when chains are weighted and `total`
    has room; the other tasks share the rest by largest remainder, so none with weight is left out."""
    chain_w = weights.get("chain", 0.0)
    others = {t: w for t in TASKS if t != "chain" and (w := weights.get(t, 0.0)) > 0}
    if not others:
        return {**dict.fromkeys(TASKS, 0), "chain": CHAIN_TURNS * math.ceil(total / CHAIN_TURNS)}
    chains = round(total * chain_w / (chain_w + sum(others.values())) / CHAIN_TURNS)
    if chain_w > 0 and total >= CHAIN_TURNS + len(others):
        chains = max(chains, 1)
    chains = min(chains, total // CHAIN_TURNS)
    counts = {**dict.fromkeys(TASKS, 0), "chain": CHAIN_TURNS * chains}
    counts.update(_largest_remainder(total - counts["chain"], others))
    return counts


def _records(seed: int, split: str, counts: dict[str, int], img: _Images) -> Iterator[dict[str, Any]]:
    units = [(t, j) for t in TASKS for j in range(counts[t] // CHAIN_TURNS if t == "chain" else counts[t])]
    _rng(seed, "instruct", split, "order").shuffle(units)  # tasks interleaved, as in a mixed dataset
    for task, j in units:
        yield from _MAKERS[task](f"{split}-{task}-{j:06d}", _rng(seed, "instruct", split, task, j), img)


def _write_instruct(
    root: Path, split: str, seed: int, count: int, size: int, weights: dict[str, float]
) -> tuple[dict[str, int], set[Path]]:
    folder = root / "instruct"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    img = _Images(folder, size)
    per_task = dict.fromkeys(TASKS, 0)
    lines = []
    for rec in _records(seed, split, allocate(count, weights), img):
        per_task[rec["task"]] += 1
        lines.append(_dumps(rec) + "\n")
    path = folder / f"{split}.jsonl"
    _atomic_bytes(path, "".join(lines).encode("utf-8"))
    return per_task, img.written | {path}


def _write_demon(root: Path, seed: int, count: int, size: int) -> set[Path]:
    """`count` samples of each of the world's DEMON-layout datasets (`demon.py`) under ``demon/``."""
    written: set[Path] = set()
    for name in DEMON_MAKERS:
        folder = root / "demon" / name / "core"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        img = _Images(folder, size)

        def rng_for(i: int, name: str = name) -> random.Random:
            return _rng(seed, "demon", name, i)

        def image(image_id: str, scene: Scene, img: _Images = img) -> str:
            return img(image_id, scene).removeprefix("images/")  # DEMON paths are relative to images/

        body = demon_dataset(name, count, rng_for, image)
        path = folder / "core.json"
        _atomic_bytes(path, (json.dumps(body, indent=1) + "\n").encode("utf-8"))
        written |= img.written | {path}
    return written


def _write_demon_train(root: Path, seed: int, count: int, size: int) -> set[Path]:
    """`count` other samples of each DEMON-layout dataset as instruction records,
    ``instruct/demon_train.jsonl``, each prompt as DEMON's runner writes it (`build_prompt`): the world's
    stage 3 learns DEMON's formats from them. They stay out of the text corpus the stage-0 LM and the
    tokenizer learnt from, so the shipped towers fit the world either way."""
    folder = root / "instruct"
    img = _Images(folder, size)
    lines = []
    for name in DEMON_MAKERS:

        def rng_for(i: int, name: str = name) -> random.Random:
            return _rng(seed, "demon_train", name, i)

        def image(image_id: str, scene: Scene, name: str = name) -> str:
            return img(f"demon-{name}-{image_id}", scene)

        body = demon_dataset(name, count, rng_for, image)
        instructions = body["metadata"]["task_instruction"]
        for sample in body["data"]:
            instance = sample["task_instance"]
            paths = instance["images_path"]
            instruction = instructions[sample["task_instruction_id"]]
            text, order = build_prompt(
                instruction, instance["context"], instance.get("choice_list"), len(paths)
            )
            rid = f"train-demon-{name}-{sample['sample_id']:05d}"
            record = _record(
                rid, "demon", [paths[k] for k in order], _user(text), output_text=sample["response"]
            )
            lines.append(_dumps(record | {"dataset": name}) + "\n")
    path = folder / "demon_train.jsonl"
    _atomic_bytes(path, "".join(lines).encode("utf-8"))
    return img.written | {path}


# ---------------------------------------------------------------- text corpus and tokenizer


def conversation_text(record: dict[str, Any]) -> str:
    """An instruction record as plain text: the prompt without its image marks, then a text answer."""
    text = record["input_text"].replace(IMAGE_MARK, " ")
    if record["output_text"] is not None:
        text += " " + record["output_text"]
    return " ".join(text.split())


def _write_text(root: Path, split: str, seed: int, num_pairs: int) -> Path:
    records = (root / "instruct" / f"{split}.jsonl").read_text().splitlines()
    lines = [_pair(seed, split, i)[1] for i in range(num_pairs)]
    lines += [conversation_text(json.loads(line)) for line in records]
    path = root / "text" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))
    return path


def _write_tokenizer(root: Path, corpus: Path, vocab_size: int) -> set[Path]:
    """`save_pretrained` into a temporary folder, then rename it over ``tokenizer/``."""
    final, tmp = root / "tokenizer", root / f".tokenizer.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    train_bpe_tokenizer(corpus.read_text().splitlines(), vocab_size).save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return set(final.iterdir())


# ---------------------------------------------------------------- entry point


def write_world(
    out_dir: str | Path,
    seed: int = 0,
    num_pairs: int = 2000,
    num_val_pairs: int = 200,
    num_instruct: int = 2000,
    num_val_instruct: int = 200,
    image_size: int = 48,
    shard_size: int = 500,
    task_weights: dict[str, float] | None = None,
    tokenizer_vocab_size: int = 1024,
    num_demon: int = 0,
    num_demon_train: int = 0,
) -> dict[str, Any]:
    """Write pairs and instruction data under `out_dir` and return the counts per split and task.

    Returns ``{"pairs": {"train": n, "val": n}, "instruct": {"train": {task: n}, "val": {task: n}},
    "images": n}`` (and ``"demon": {dataset: n}`` with `num_demon` samples per DEMON-layout dataset,
    ``"demon_train"`` with `num_demon_train` more of each as instruction records).
    If ``world.json`` there already records the same settings, its counts are returned
    and nothing is touched.
    """
    weights = dict(DEFAULT_TASK_WEIGHTS if task_weights is None else task_weights)
    unknown = set(weights) - set(TASKS)
    if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"task_weights must be non-negative over {TASKS} with a positive sum, got {weights}")
    if shard_size < 1:
        raise ValueError("shard_size must be positive")
    settings = {
        "seed": seed,
        "num_pairs": num_pairs,
        "num_val_pairs": num_val_pairs,
        "num_instruct": num_instruct,
        "num_val_instruct": num_val_instruct,
        "image_size": image_size,
        "shard_size": shard_size,
        "task_weights": {t: float(weights.get(t, 0.0)) for t in TASKS},
        "jpeg_quality": JPEG_QUALITY,
        "tokenizer_vocab_size": tokenizer_vocab_size,
        "num_demon": num_demon,
        "num_demon_train": num_demon_train,
    }
    root = Path(out_dir)
    manifest = root / "world.json"
    if manifest.exists():
        done = json.loads(manifest.read_text())
        if done.get("format_version") == FORMAT_VERSION and done.get("settings") == settings:
            return done["counts"]
        manifest.unlink()  # about to rewrite: the old manifest must not vouch for a half-new world

    written: set[Path] = set()
    counts: dict[str, Any] = {"pairs": {}, "instruct": {}}
    for split, n_pairs, n_instruct in (
        ("train", num_pairs, num_instruct),
        ("val", num_val_pairs, num_val_instruct),
    ):
        written |= _write_pairs(root, split, seed, n_pairs, image_size, shard_size)
        counts["pairs"][split] = n_pairs
        per_task, files = _write_instruct(root, split, seed, n_instruct, image_size, settings["task_weights"])
        counts["instruct"][split] = per_task
        written |= files | {_write_text(root, split, seed, n_pairs)}
    written |= _write_tokenizer(root, root / "text" / "train.txt", tokenizer_vocab_size)
    demon_images = []
    if num_demon:
        written |= _write_demon(root, seed, num_demon, image_size)
        counts["demon"] = {name: num_demon for name in DEMON_MAKERS}
        demon_images = [root / "demon" / name / "core" / "images" for name in DEMON_MAKERS]
    if num_demon_train:
        written |= _write_demon_train(root, seed, num_demon_train, image_size)
        counts["demon_train"] = {name: num_demon_train for name in DEMON_MAKERS}
    counts["images"] = sum(1 for p in written if p.suffix == ".jpg")
    # Files a previous run with other settings (or an interrupted one's temporaries) left behind.
    kept = [root / "pairs" / s for s in SPLITS] + [root / "instruct" / "images", root / "text"] + demon_images
    for folder in kept:
        for path in folder.iterdir():
            if path not in written:
                path.unlink()
    for path in [
        *root.glob(".*.tmp*"),
        *(root / "instruct").glob(".*.tmp*"),
        *(root / "text").glob(".*.tmp*"),
    ]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    body = {"format_version": FORMAT_VERSION, "settings": settings, "counts": counts}
    _atomic_bytes(manifest, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return counts
