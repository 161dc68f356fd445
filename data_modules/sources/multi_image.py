"""Multi-image understanding (Appendix C.1 (5)) in MIMIC-IT's published layout: an instruction json
`{"meta": ..., "data": {id: {"instruction", "answer", "image_ids": [...], "rel_ins_ids": [...]}}}` and an
image json mapping each image id to its base64-encoded file. The paper's GSD (General Scene Difference)
is MIMIC-IT's `CGD` part (`CGD_instructions.json`, `CGD.json`); its `SD` part is Subtle Difference,
built from Spot-the-Diff. Rendered as "USER: This is
the first image. {image1} This is the second image. {image2} {question} ASSISTANT: {answer}".

The image json is held in memory (and copied into each loader worker), as MIMIC-IT ships it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from morph_lightning.data_modules.bad_records import BadRecord
from morph_lightning.data_modules.instruct import Record, build_record
from morph_lightning.data_modules.sources.common import Source, items, read_json, text
from morph_lightning.data_modules.sources.templates import MULTI_IMAGE, image_intro
from morph_lightning.data_modules.transforms import BadImage


@dataclass
class Base64Image:
    table: dict[str, str]
    key: str
    origin: str

    def __call__(self) -> bytes:
        try:
            return base64.b64decode(self.table[self.key], validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadImage("corrupt", f"not base64: {err}") from None

    def __str__(self) -> str:
        return f"{self.origin}[{self.key!r}]"


def read_mimicit(src: Source, path: str, images: str) -> list[Record]:
    data = read_json(path)
    table = read_json(images)
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise ValueError(f"{path}: needs a 'data' object of instructions")
    if not isinstance(table, dict):
        raise ValueError(f"{images}: needs an object of image id -> base64")
    records = []
    for key, ins in data["data"].items():
        where = f"{path}[{key!r}]"
        with src.bad.skipping():
            ids = items(ins, "image_ids", where)
            missing = [i for i in ids if i not in table]
            if missing:
                raise BadRecord(where, "image ids not in the image json", f"{missing} are not in {images}")
            question = text(ins, "instruction", where)
            prompt = MULTI_IMAGE.format(images=image_intro(len(ids)), question=question)
            refs = [Base64Image(table, i, images) for i in ids]
            records.append(build_record(prompt, refs, where, output_text=text(ins, "answer", where)))
    return records
