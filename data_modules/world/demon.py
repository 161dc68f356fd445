"""The world's demonstrative-instruction tasks in the DEMON benchmark's layout (Li et al., 2023).

Three datasets, each `OUT/demon/<Dataset>/core/core.json` with its images in `core/images/`, in the
layout the DEMON scripts read: `{"metadata": {dataset, split, num_sample, task_instruction (templates),
question_type}, "data": [{sample_id, task_instruction_id, task_instance: {context, images_path,
[choice_list]}, response}]}`, `{image#k}` marking the k-th image of `images_path` in the context.

* World_MultiImage: multi-image reasoning (MMR), multi-choice: a question about two images (`compare`);
* World_ImageDiff: visual relation inference (VRI), open-ended: the editing instruction that turns the
  first image into the second;
* World_InContext: multi-modal cloze (MMC), multi-choice with images as the choices: two before/after
  examples of one whole-scene rule and a query image; which of four images is the query after the rule.

DEMON keys a dataset's category and its image-choice scoring by the dataset's name; these names are the
world's own, so their metadata also carries `category` (the category's key in DEMON's scripts) and
`image_choice`, which the `demon` evaluation task reads for datasets outside DEMON's list.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from .edits import IN_CONTEXT_RULES, apply_rule, sample_edit
from .language import compare
from .scene import Scene, sample_scene

# (image id, scene) -> the image's file name under core/images/
WriteImage = Callable[[str, Scene], str]

INSTRUCTIONS = {
    "World_MultiImage": [
        "Look at the images and answer the question with one of the choices.",
        "Answer the question about the two images.",
        "Compare the images and answer the question.",
        "Read both images, then answer the question below.",
        "Here are two images and a question about them. Answer it.",
    ],
    "World_ImageDiff": [
        "Tell the editing instruction that turns the first image into the second.",
        "What edit was made to the first image to get the second? Give the instruction.",
        "Describe the change between the two images as an editing instruction.",
        "The second image is an edited version of the first. Write the editing instruction.",
        "Give the instruction that edits the first image into the second one.",
    ],
    "World_InContext": [
        "Each example shows an image before and after the same edit. Pick the image that the last "
        "image becomes after that edit.",
        "Learn the edit from the examples and choose the right result for the last image.",
        "The examples apply one rule. Which image is the query after the rule?",
        "Infer the transformation from the image pairs and pick the query's result.",
        "Apply the edit shown by the examples to the last image: which choice is the result?",
    ],
}
CATEGORIES = {
    "World_MultiImage": "multi_image_reasoning",
    "World_ImageDiff": "visual_relation_inference",
    "World_InContext": "multi_modal_cloze",
}
LETTERS = "ABCD"


def _multi_image(sid: str, rng: random.Random, img: WriteImage) -> dict[str, Any]:
    first, second = sample_scene(rng), sample_scene(rng)
    q, answer, choices = compare(first, second, rng)
    return {
        "task_instance": {
            "context": f"The first image: {{image#1}} The second image: {{image#2}} Question: {q}",
            "images_path": [img(f"{sid}-0", first), img(f"{sid}-1", second)],
            "choice_list": list(choices),
        },
        "response": answer,
    }


def _image_diff(sid: str, rng: random.Random, img: WriteImage) -> dict[str, Any]:
    edit = sample_edit(sample_scene(rng), rng)
    return {
        "task_instance": {
            "context": "The first image: {image#1} The second image: {image#2} ",
            "images_path": [img(f"{sid}-0", edit.source), img(f"{sid}-1", edit.target)],
        },
        "response": edit.instruction,
    }


def _in_context(sid: str, rng: random.Random, img: WriteImage) -> dict[str, Any]:
    op, arg = rng.choice(IN_CONTEXT_RULES)
    pairs: list[tuple[Scene, Scene]] = []
    while len(pairs) < 3:  # scenes the rule changes; every rule changes some
        scene = sample_scene(rng)
        if (target := apply_rule(scene, op, arg)) is not None:
            pairs.append((scene, target))
    (s0, t0), (s1, t1), (query, answer) = pairs
    # Distractors: the query left as it is, and the query under two other rules.
    candidates = [answer, query]
    for other in rng.sample([r for r in IN_CONTEXT_RULES if r != (op, arg)], len(IN_CONTEXT_RULES) - 1):
        result = apply_rule(query, *other)
        if result is not None and result not in candidates:
            candidates.append(result)
        if len(candidates) == len(LETTERS):
            break
    order = rng.sample(range(len(candidates)), len(candidates))
    scenes = [s0, t0, s1, t1, query] + [candidates[k] for k in order]
    options = ", ".join(f"'Image {LETTERS[i]}: {{image#{6 + i}}}'" for i in range(len(order)))
    return {
        "task_instance": {
            "context": "{image#1} becomes {image#2}. {image#3} becomes {image#4}. "
            f"What does {{image#5}} become? Choice List:[{options}]Answer: ",
            "images_path": [img(f"{sid}-{k}", s) for k, s in enumerate(scenes)],
        },
        "response": f"Image {LETTERS[order.index(0)]}",
    }


MAKERS: dict[str, Callable[[str, random.Random, WriteImage], dict[str, Any]]] = {
    "World_MultiImage": _multi_image,
    "World_ImageDiff": _image_diff,
    "World_InContext": _in_context,
}


def demon_dataset(
    name: str, count: int, rng_for: Callable[[int], random.Random], img: WriteImage
) -> dict[str, Any]:
    """`core.json`'s content for dataset `name`: `count` samples, sample i drawn from `rng_for(i)`."""
    data = []
    for i in range(count):
        rng = rng_for(i)
        item = MAKERS[name](f"{i:05d}", rng, img)
        data.append({"sample_id": i, "task_instruction_id": rng.randrange(len(INSTRUCTIONS[name])), **item})
    metadata = {
        "dataset": name,
        "split": "core",
        "num_sample": count,
        "task_instruction": INSTRUCTIONS[name],
        "question_type": "open-ended" if name == "World_ImageDiff" else "multi-choice",
        "category": CATEGORIES[name],
        "image_choice": name == "World_InContext",
    }
    return {"metadata": metadata, "data": data}
