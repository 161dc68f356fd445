"""What `generate` and `chat` share: the model from a checkpoint or an export, prompts in the chat
template with their images read for the vision tower, answers as text and images, and new files written
whole (a temporary name renamed into place) and never over an existing one."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from morph_lightning.data_modules.instruct import IMAGE_MARK, prompt_pieces
from morph_lightning.data_modules.transforms import BadImage, load_image
from morph_lightning.evaluation.runner import image_transforms
from morph_lightning.evaluation.world_eval import to_uint8
from morph_lightning.export import load_exported, model_from_checkpoint
from morph_lightning.generation import generate
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import Sample, shift_refs

USER, ASSISTANT = "USER:", "ASSISTANT:"


class InferenceError(Exception):
    """A mistake in what was asked (a missing file, marks that do not fit the images): one line for the
    user, not a traceback."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's source and device, and the decoding settings."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a stage checkpoint (.ckpt)")
    source.add_argument("--export", help="a folder written by `python -m morph_lightning export`")
    parser.add_argument("--form", choices=("adapter", "merged"), default="adapter", help="with --export")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="per answer (an image takes the model's morph tokens + 2)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="for text; 0: greedy")
    parser.add_argument("--top-k", type=int, default=None, help="for text, with --temperature")
    parser.add_argument("--top-p", type=float, default=None, help="for text, with --temperature")
    parser.add_argument(
        "--image-temperature", type=float, default=0.0, help="for morph tokens and VQGAN codes; 0: greedy"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the sampling generator")


def load_model(args: argparse.Namespace) -> MorphModel:
    """The model that `--checkpoint` or `--export` names, in eval mode on `--device`."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {args.device}: CUDA is not available")
    try:
        if args.checkpoint:
            model = model_from_checkpoint(args.checkpoint)
        else:
            model = load_exported(args.export, form=args.form)
    except (OSError, ValueError) as err:
        raise InferenceError(str(err)) from None
    return model.requires_grad_(False).eval().to(device)


def chat_prompt(text: str, num_images: int) -> str:
    """`text` in the chat template `USER: {text} ASSISTANT:` (unless it starts with "USER:"), with an
    `<image>` mark put at its start for each of its `num_images` images it does not mark itself."""
    text = text.strip()
    marks = text.count(IMAGE_MARK)
    if marks > num_images:
        raise InferenceError(f"the prompt has {marks} {IMAGE_MARK} marks but {num_images} images")
    templated = text.startswith(USER)
    body = text.removeprefix(USER).strip() if templated else text
    body = " ".join([IMAGE_MARK] * (num_images - marks) + ([body] if body else []))
    return f"{USER} {body}" if templated else f"{USER} {body} {ASSISTANT}"


@dataclass
class Answer:
    text: str  # each generated image shown as "<image>"
    images: list[torch.Tensor]  # [3, R, R] in [-1, 1], in the order generated


class Answerer:
    """A loaded model with its image preprocessing and decoding settings: prompts in, answers out."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model = load_model(args)
        self.transforms = image_transforms(self.model)
        device = self.model.llm.new_head.weight.device
        self.settings = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            image_temperature=args.image_temperature,
            generator=torch.Generator(device).manual_seed(args.seed),
        )

    def read_image(self, path: str | os.PathLike) -> torch.Tensor:
        """The image at `path` as the vision tower's input."""
        try:
            return self.transforms(load_image(path))[0]
        except BadImage as bad:
            raise InferenceError(f"cannot read image {path}: {bad.reason}") from None

    def answer(self, rows: list[tuple[str, list[torch.Tensor]]]) -> list[Answer]:
        """One answer per (chat prompt with `<image>` marks, its images read by `read_image`)."""
        prompts, pixels = [], []
        for text, images in rows:
            # Each row's ImageRefs index its own images: shift them to where they sit in the batch.
            prompts.append(Sample(shift_refs(prompt_pieces(text), len(pixels))))
            pixels += images
        out = generate(self.model, prompts, torch.stack(pixels) if pixels else None, **self.settings)
        return [
            Answer(text.strip(), [out.pixels[k] for k in indices])
            for text, indices in zip(out.texts, out.images, strict=True)
        ]


def write_new(path: Path, write: Callable[[Path], object]) -> None:
    """Make `path` with `write(temporary path)`, then rename it into place; an existing file is kept."""
    if path.exists():
        raise InferenceError(f"{path} exists: not overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(pixels: torch.Tensor, path: Path) -> None:
    """An image [3, H, W] in [-1, 1] as a new PNG file."""
    image = Image.fromarray(to_uint8(pixels))
    write_new(path, lambda tmp: image.save(tmp, format="PNG"))
