"""What every data module shares: reading an image safely, the two image transforms, and `collate`.

An item (one record of any dataset) is `{"vision": [tensors], "vqgan": [tensors], "caption": str | None,
"sample": Sample | None}` plus an optional `"key"`; `collate` stacks a list of items into the batch layout
the stages consume (see `collate`).
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from morph_lightning.modeling.sequence import Sample, shift_refs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_SIZE = 8  # a smaller side is no image worth upscaling (1x1 tracking pixels, icons)
MAX_PIXELS = 50_000_000  # larger ones are decompression bombs or scans that would stall a worker


class BadImage(Exception):
    """An image that is skipped; `reason` is the counter it is booked under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels become white (not black, which `convert` would give)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(
    src: bytes | str | os.PathLike, min_size: int = MIN_SIZE, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode `src` (encoded bytes or a path) to a fully loaded RGB image, or raise `BadImage`.

    Reasons: `missing` (no such file), `corrupt` (not an image / decoder error), `truncated`,
    `too_small` (shorter side < `min_size`), `too_large` (> `max_pixels`, checked before decoding).
    """
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    except FileNotFoundError as err:
        raise BadImage("missing", str(err)) from None
    except Image.DecompressionBombError as err:
        raise BadImage("too_large", str(err)) from None
    except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError from broken headers
        raise BadImage("corrupt", f"{type(err).__name__}: {err}") from None
    with img:
        w, h = img.size  # known from the header, so huge images are refused before decoding
        if w * h > max_pixels:
            raise BadImage("too_large", f"{w}x{h}")
        if min(w, h) < min_size:
            raise BadImage("too_small", f"{w}x{h}")
        try:
            img.load()
        except OSError as err:
            reason = "truncated" if "truncated" in str(err) else "corrupt"
            raise BadImage(reason, str(err)) from None
        except Exception as err:
            raise BadImage("corrupt", f"{type(err).__name__}: {err}") from None
        return to_rgb(img)


class ImageTransforms:
    """PIL image -> (vision tower input [3, vision_size, vision_size], VQGAN input [3, vqgan_size, ...]).

    Vision: shorter side to `vision_size` (bicubic), center crop, [0, 1], normalised with `mean`/`std`
    (CLIP's preprocessing). VQGAN: the same crop at `vqgan_size`, scaled to [-1, 1]. Both resize the
    uint8 image so bicubic overshoot is clamped like PIL's.
    """

    def __init__(
        self,
        vision_size: int = 224,
        vqgan_size: int = 256,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        def pipeline(size: int, mean: list[float], std: list[float]) -> v2.Compose:
            return v2.Compose(
                [
                    v2.ToImage(),
                    v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                    v2.CenterCrop(size),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(mean, std),
                ]
            )

        self.vision = pipeline(vision_size, list(mean), list(std))
        self.vqgan = pipeline(vqgan_size, [0.5] * 3, [0.5] * 3)  # [0, 1] -> [-1, 1]

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img = to_rgb(img)
        return self.vision(img), self.vqgan(img)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack every item's images into one tensor and re-index each sample's `ImageRef`s into it.

    Returns `vision_pixels` [N, 3, S, S], `vqgan_pixels` [N, 3, R, R] (N = all images of all items) and
    either `captions` (pair items, one image each) or `samples` (instruction items); `keys` too when
    every item has a `"key"`.
    """
    vision, vqgan, captions, samples = [], [], [], []
    for item in items:
        base = len(vision)
        vision += item["vision"]
        vqgan += item["vqgan"]
        if item["sample"] is None:
            captions.append(item["caption"])
        else:
            sample = item["sample"]
            samples.append(Sample(shift_refs(sample.prompt, base), shift_refs(sample.answer, base)))
    if captions and samples:
        raise ValueError("a batch mixes image-text pairs and instruction samples")
    batch = {"vision_pixels": torch.stack(vision), "vqgan_pixels": torch.stack(vqgan)}
    batch["captions" if captions else "samples"] = captions or samples
    if all("key" in item for item in items):
        batch["keys"] = [item["key"] for item in items]
    if items and all("codes" in item for item in items):  # precomputed VQGAN codes, one row per image
        batch["vqgan_codes"] = torch.stack([c for item in items for c in item["codes"]])
    if all("position" in item for item in items):  # where a stream stands; see data_modules/resume.py
        batch["positions"] = [item["position"] for item in items]
    return batch
