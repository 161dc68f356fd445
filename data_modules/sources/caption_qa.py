"""Captioning and short-answer QA (Appendix C.1 (3)) in COCO's published json, with InstructBLIP's
held-in templates, one picked per sample."""

from __future__ import annotations

import os

from morph_lightning.data_modules.bad_records import BadRecord
from morph_lightning.data_modules.instruct import Record, build_record
from morph_lightning.data_modules.sources.common import Source, items, read_json, text
from morph_lightning.data_modules.sources.templates import CAPTION, VQA, sample_rng


def _image_id(obj: dict, where: str) -> int:
    if not isinstance(obj.get("image_id"), int):
        raise BadRecord(where, "bad 'image_id'", f"needs an integer, got {obj.get('image_id')!r}")
    return obj["image_id"]


def read_coco_captions(src: Source, path: str, image_root: str | None = None) -> list[Record]:
    """COCO-style captions (`captions_train2017.json`; Flickr30k / NoCaps in the same layout):
    `images: [{id, file_name}]`, `annotations: [{image_id, caption}]`, one record per caption; image files
    under `image_root` (default: the json's folder)."""
    src.image_root = image_root or os.path.dirname(os.path.abspath(path))
    data = read_json(path)
    files = {}
    for k, img in enumerate(items(data, "images", path)):
        where = f"{path}:images[{k}]"
        with src.bad.skipping():
            if not isinstance(img, dict) or not isinstance(img.get("id"), int):
                raise BadRecord(where, "bad image id", f"needs an integer 'id', got {img!r}")
            files[img["id"]] = os.path.join(src.image_root, text(img, "file_name", where))
    records = []
    for k, ann in enumerate(items(data, "annotations", path)):
        where = f"{path}:annotations[{k}]"
        with src.bad.skipping():
            image_id = _image_id(ann, where)
            if image_id not in files:
                raise BadRecord(where, "image_id not in 'images'", str(image_id))
            template = sample_rng(src.seed, src.name, k).choice(CAPTION)
            caption = text(ann, "caption", where)
            records.append(build_record(template, [files[image_id]], where, output_text=caption))
    return records


def read_vqav2(
    src: Source, path: str, annotations: str, image_root: str, image_pattern: str | None = None
) -> list[Record]:
    """VQAv2 (and OK-VQA, same layout): `path` the questions json (`questions: [{image_id, question,
    question_id}]`), `annotations` its answers (`annotations: [{question_id, multiple_choice_answer}]`).
    Image files: `image_pattern` under `image_root`, default `COCO_{data_subtype}_{image_id:012d}.jpg`."""
    src.image_root = image_root
    questions = read_json(path)
    subtype = questions.get("data_subtype") if isinstance(questions, dict) else None
    if image_pattern is None and not isinstance(subtype, str):
        raise ValueError(f"{path}: needs 'data_subtype' (or set image_pattern), got {subtype!r}")
    pattern = image_pattern or f"COCO_{subtype}_{{image_id:012d}}.jpg"
    answers = {}
    for k, ann in enumerate(items(read_json(annotations), "annotations", annotations)):
        where = f"{annotations}:annotations[{k}]"
        with src.bad.skipping():
            answers[ann.get("question_id")] = text(ann, "multiple_choice_answer", where)
    records = []
    for k, q in enumerate(items(questions, "questions", path)):
        where = f"{path}:questions[{k}]"
        with src.bad.skipping():
            if q.get("question_id") not in answers:
                raise BadRecord(
                    where, "no answer", f"question_id {q.get('question_id')!r} not in {annotations}"
                )
            image = os.path.join(image_root, pattern.format(image_id=_image_id(q, where)))
            template = sample_rng(src.seed, src.name, k).choice(VQA)
            prompt = template.format(question=text(q, "question", where))
            records.append(build_record(prompt, [image], where, output_text=answers[q["question_id"]]))
    return records
