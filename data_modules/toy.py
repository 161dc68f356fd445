"""Data generated in code for the tiny configs: one coloured shape on a plain background.

A stand-in until the embedded world and the real data modules exist; the batches have the layout the
real ones will have: `vision_pixels` (normalised for the vision tower), `vqgan_pixels` ([-1, 1]),
`captions` for image-text pairs, and `samples` (prompt/answer with `ImageRef`s) for instructions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from morph_lightning.data_modules.transforms import collate
from morph_lightning.modeling.sequence import ImageRef, Sample

COLOURS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES = ("square", "circle")
PLACES = ("left", "right")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    place: str

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on the {self.place}"


def render(scene: Scene, size: int) -> torch.Tensor:
    """[3, size, size] in [0, 1]."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cx = size * (0.3 if scene.place == "left" else 0.7)
    cy, r = size * 0.5, size * 0.22
    if scene.shape == "square":
        inside = ((xs - cx).abs() <= r) & ((ys - cy).abs() <= r)
    else:
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    img = torch.full((3, size, size), 0.9)
    colour = torch.tensor(COLOURS[scene.colour]).view(3, 1, 1)
    return torch.where(inside.unsqueeze(0), colour.expand(3, size, size), img)


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES]


def _pixels(scene: Scene, vision_size: int, vqgan_size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    img = render(scene, max(vision_size, vqgan_size)).unsqueeze(0)
    vis = F.interpolate(img, size=vision_size, mode="bilinear", antialias=True)[0]
    vq = F.interpolate(img, size=vqgan_size, mode="bilinear", antialias=True)[0]
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (vis - mean) / std, vq * 2 - 1


class _ToyDataset(Dataset):
    def __init__(self, n: int, seed: int, instruct: bool, vision_size: int, vqgan_size: int, mean, std):
        rng = random.Random(seed)
        scenes = all_scenes()
        self.items = [(rng.choice(scenes), rng.choice(list(COLOURS)), rng.randrange(3)) for _ in range(n)]
        self.instruct, self.sizes, self.norm = instruct, (vision_size, vqgan_size), (mean, std)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        scene, colour, task = self.items[i]
        if not self.instruct:
            vis, vq = _pixels(scene, *self.sizes, *self.norm)
            return {"vision": [vis], "vqgan": [vq], "caption": scene.caption(), "sample": None}
        if task == 0:  # an image question
            images = [scene]
            sample = Sample(["USER: ", ImageRef(0), " What colour is the shape? ASSISTANT: "], [scene.colour])
        elif task == 1:  # text to image
            images = [scene]
            sample = Sample(
                [f"USER: {scene.caption()} Generate an image based on the description. ASSISTANT: "],
                [ImageRef(0, target=True)],
            )
        else:  # editing
            target = Scene(colour, scene.shape, scene.place)
            images = [scene, target]
            sample = Sample(
                [
                    "USER: ",
                    ImageRef(0),
                    " What will this image be like with the editing instruction: "
                    f"make it {colour}. ASSISTANT: ",
                ],
                [ImageRef(1, target=True)],
            )
        pix = [_pixels(s, *self.sizes, *self.norm) for s in images]
        return {
            "vision": [p[0] for p in pix],
            "vqgan": [p[1] for p in pix],
            "caption": None,
            "sample": sample,
        }


class ToyDataModule(L.LightningDataModule):
    def __init__(
        self,
        instruct: bool = False,
        num_train: int = 64,
        num_val: int = 16,
        batch_size: int = 8,
        vision_size: int = 32,
        vqgan_size: int = 16,
        mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073),
        std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, n: int, seed: int, shuffle: bool) -> DataLoader:
        h = self.hparams
        ds = _ToyDataset(n, seed, h.instruct, h.vision_size, h.vqgan_size, h.mean, h.std)
        return DataLoader(ds, batch_size=h.batch_size, shuffle=shuffle, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.num_train, self.hparams.seed, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.num_val, self.hparams.seed + 1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.num_val, self.hparams.seed + 2, shuffle=False)

    predict_dataloader = test_dataloader
