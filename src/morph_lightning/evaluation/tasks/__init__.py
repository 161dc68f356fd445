"""The benchmarks, by the name `python -m morph_lightning evaluate TASK` takes.

Each entry names the module and class of one `Task`; a task's module is imported only when it is asked
for, so a benchmark's optional needs (Java for the COCO tokenizer, PyAV for videos) never stop another.
"""

from __future__ import annotations

import importlib

from morph_lightning.evaluation.task import Task

TASKS: dict[str, str] = {
    "demon": "demon:Demon",
    "coco-caption": "captioning:CocoKarpathyCaption",
    "nocaps": "captioning:NoCapsCaption",
    "flickr30k-caption": "captioning:Flickr30kCaption",
    "vqav2": "vqa:VQAv2",
    "gqa": "vqa:GQA",
    "vsr": "vqa:VSR",
    "iconqa": "vqa:IconQA",
    "hateful-memes": "vqa:HatefulMemes",
    "msvd-qa": "video_qa:MSVDQA",
    "msrvtt-qa": "video_qa:MSRVTTQA",
    "mme": "mme:MME",
    "world-text": "world_text:WorldText",
    "coco-t2i": "text_to_image:CocoKarpathyTextToImage",
    "coco-val30k-t2i": "text_to_image:CocoVal30kTextToImage",
    "flickr30k-t2i": "text_to_image:Flickr30kTextToImage",
    "magicbrush-edit": "editing:MagicBrushEdit",
    "evr-edit": "editing:EVREdit",
    "ma5k-edit": "editing:MA5kEdit",
    "ip2p-edit": "editing:InstructPix2PixEdit",
}


def get_task(name: str) -> type[Task]:
    """The Task class registered as `name`; a one-line error listing the names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
