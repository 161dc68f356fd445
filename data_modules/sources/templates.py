"""The instruction templates of Appendix C.1, and the per-sample rng that picks among several.

The paper gives one template each for text-to-image, editing, conversation and multi-image, and refers to
InstructBLIP's held-in templates for captioning and QA, of which several are listed here. A template is
picked by an rng seeded with (seed, source, sample key), so a sample reads the same in every epoch and
every run with the same seed, whatever else the mixture holds.
"""

from __future__ import annotations

import random

from morph_lightning.data_modules.instruct import IMAGE_MARK

TEXT_TO_IMAGE = "USER: {caption} Generate an image based on the description. ASSISTANT:"
EDIT = (
    f"USER: {IMAGE_MARK} What will this image be like with the editing instruction: "
    "{instruction}. ASSISTANT:"
)
CONVERSATION = f"USER: {IMAGE_MARK} {{question}} ASSISTANT:"
MULTI_IMAGE = "USER: {images} {question} ASSISTANT:"

# InstructBLIP's captioning templates (Dai et al., 2023, appendix), the image first as in this paper's
# other templates.
CAPTION = tuple(
    f"USER: {IMAGE_MARK} {t} ASSISTANT:"
    for t in (
        "A short image caption:",
        "A short image description:",
        "A photo of",
        "An image that shows",
        "Write a short description for the image.",
        "Write a description for the photo.",
        "Provide a description of what is presented in the photo.",
        "Briefly describe the content of the image.",
        "Can you briefly explain what you see in the image?",
        "Could you use a few words to describe what you perceive in the photo?",
        "Please provide a short depiction of the picture.",
        "Using language, provide a short account of the image.",
        "Use a few words to illustrate what is happening in the picture.",
    )
)
# InstructBLIP's short-answer VQA templates.
VQA = tuple(
    f"USER: {IMAGE_MARK} {t} ASSISTANT:"
    for t in (
        "{question}",
        "Question: {question}",
        "{question} A short answer to the question is",
        "Q: {question} A:",
        "Question: {question} Short answer:",
        "Given the image, answer the following question with no more than three words. {question}",
        "Based on the image, respond to this question with a short answer: {question} Answer:",
        "Use the provided image to answer the question: {question} Provide your answer as short as possible:",
        'What is the answer to the following question? "{question}"',
        'The question "{question}" can be answered using the image. A short answer is',
    )
)
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def sample_rng(seed: int, source: str, key: object) -> random.Random:
    # String seeds go through sha512 in `random`, so they are stable across processes and platforms.
    return random.Random(f"{seed}:{source}:{key}")


def image_intro(count: int) -> str:
    """ "This is the first image. <image> This is the second image. <image>" for `count` images."""
    if count > len(ORDINALS):
        raise ValueError(f"at most {len(ORDINALS)} images per multi-image sample, got {count}")
    return " ".join(f"This is the {ORDINALS[k]} image. {IMAGE_MARK}" for k in range(count))
