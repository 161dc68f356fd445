"""Image conversations (Appendix C.1 (4)) in LLaVA's published json (`llava_v1_5_mix665k.json`; SVIT is
released in the same layout): a list of `{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`.

Every gpt turn becomes one record: "USER: {image} {question} ASSISTANT: {answer}" for the first turn,
later turns with the earlier ones as prompt (no loss), so each answer is scored exactly once and only
answers are scored. The image goes first, as in the paper's template, wherever LLaVA put its mark.
Items without an image (LLaVA's text-only ShareGPT part) are left out: a batch needs an image.
"""

from __future__ import annotations

import logging
import os

from morph_lightning.data_modules.bad_records import BadRecord
from morph_lightning.data_modules.instruct import IMAGE_MARK, Record, build_record
from morph_lightning.data_modules.sources.common import Source, items, read_json, text
from morph_lightning.data_modules.sources.templates import CONVERSATION

log = logging.getLogger(__name__)
ROLES = ("human", "gpt")


def _turns(item: dict, where: str) -> list[tuple[str, str]]:
    """(question, answer) pairs; a BadRecord if roles do not alternate human, gpt or the mark is not once."""
    messages = items(item, "conversations", where)
    if len(messages) % 2:
        raise BadRecord(where, "odd message count", f"{len(messages)} messages; need human/gpt pairs")
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("from") != ROLES[k % 2]:
            got = msg.get("from") if isinstance(msg, dict) else msg
            raise BadRecord(
                where, "roles out of order", f"message {k} should be from {ROLES[k % 2]!r}, got {got!r}"
            )
    values = [text(msg, "value", f"{where} message {k}") for k, msg in enumerate(messages)]
    marks = sum(v.count(IMAGE_MARK) for v in values[::2])
    if marks != 1 or any(IMAGE_MARK in v for v in values[1::2]):
        raise BadRecord(
            where, "image marks", f"needs exactly one {IMAGE_MARK} in the human messages, got {marks}"
        )
    questions = [" ".join(v.replace(IMAGE_MARK, " ").split()) for v in values[::2]]
    return list(zip(questions, values[1::2], strict=True))


def read_llava(src: Source, path: str, image_root: str | None = None) -> list[Record]:
    """Image paths are relative to `image_root` (default: the json's folder)."""
    src.image_root = image_root or os.path.dirname(os.path.abspath(path))
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: needs a list of conversations, got {type(data).__name__}")
    records, text_only = [], 0
    for k, item in enumerate(data):
        where = f"{path}[{k}]" + (f" id={item['id']}" if isinstance(item, dict) and "id" in item else "")
        if isinstance(item, dict) and "image" not in item:
            text_only += 1
            continue
        with src.bad.skipping():
            image = os.path.join(src.image_root, text(item, "image", where))
            history, turns = "", []
            for t, (question, answer) in enumerate(_turns(item, where)):
                turn = CONVERSATION.format(question=question) if t == 0 else f"USER: {question} ASSISTANT:"
                prompt = f"{history} {turn}".lstrip()
                turns.append(build_record(prompt, [image], f"{where} turn {t}", output_text=answer))
                history = f"{prompt} {answer}"
            records += turns
    if text_only:
        log.info("%s: left out %d items without an image", path, text_only)
    return records
