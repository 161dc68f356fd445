"""Image-text retrieval on Flickr30K (paper Table 6), scored as LAVIS scores it.

Data: the Karpathy test split, 1,000 images x 5 captions, in LAVIS's `flickr30k_test.json` (a list of
`{"image": "flickr30k-images/<id>.jpg", "caption": [5 strings]}`) or Karpathy's `dataset_flickr30k.json`.
Metric: LAVIS `lavis/tasks/retrieval.py::_report_metrics`. An image's rank is the best (0-based) position
of any of its captions among all texts sorted by descending similarity; a text's rank is the position of
its one image. R@K = 100 * the fraction of ranks < K, both ways; R@m (Table 6) is the mean of the six.
Captions are cleaned as LAVIS's `blip_caption` processor does (`pre_caption`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from morph_lightning.data_modules.transforms import BadImage, ImageTransforms, load_image


def pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS `BlipCaptionProcessor.pre_caption`: lowercase, `.!"()*#:;~` to spaces, runs of two or more
    whitespace characters to one space, spaces stripped from the ends, at most `max_words` words (split on
    single spaces). As in LAVIS, a lone tab or newline inside the text is kept."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def _best_ranks(scores: Tensor, positives: list[list[int]]) -> Tensor:
    """Per row of `scores`, the smallest 0-based position of any of its positives in the row sorted by
    descending score, equal scores in index order (lower index first). LAVIS sorts with numpy's default
    (unstable) argsort, reversed, so its order among exactly equal scores is not defined."""
    index = torch.arange(scores.shape[1])
    ranks = []
    for row, pos in zip(scores, positives, strict=True):
        pos = torch.as_tensor(pos)
        own = row[pos].unsqueeze(1)  # [P, 1]
        ahead = (row > own) | ((row == own) & (index < pos.unsqueeze(1)))
        ranks.append(ahead.sum(1).min())
    return torch.stack(ranks)


def recall_at_k(
    similarity: Tensor, txt2img: list[int], img2txt: list[list[int]], ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """LAVIS's retrieval metrics (x100) from an [n_images, n_texts] similarity matrix: `txt_r{k}` (image
    -> text, TR@K), `img_r{k}` (text -> image, IR@K), their means `txt_r_mean`, `img_r_mean`, and
    `r_mean` (R@m), the mean of the two means."""
    sim = similarity.detach().float().cpu()
    if sim.shape != (len(img2txt), len(txt2img)):
        raise ValueError(f"similarity {tuple(sim.shape)}: expected ({len(img2txt)}, {len(txt2img)})")
    i2t = _best_ranks(sim, img2txt)
    t2i = _best_ranks(sim.T, [[i] for i in txt2img])
    out = {f"txt_r{k}": 100.0 * float((i2t < k).float().mean()) for k in ks}
    out |= {f"img_r{k}": 100.0 * float((t2i < k).float().mean()) for k in ks}
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def read_flickr30k_test(
    path: str | os.PathLike, split: str = "test"
) -> tuple[list[str], list[str], list[int], list[list[int]]]:
    """(image paths as the file names them, captions as written, txt2img, img2txt), texts numbered in file
    order as LAVIS's `RetrievalEvalDataset` numbers them. Reads LAVIS's `flickr30k_test.json` (every record)
    or Karpathy's `dataset_flickr30k.json` (the images of `split`, their `sentences[].raw`)."""
    with open(path, encoding="utf-8") as f:
        data: Any = json.load(f)
    if isinstance(data, dict) and "images" in data:  # Karpathy's layout
        records = [
            (im["filename"], [s["raw"] for s in im["sentences"]])
            for im in data["images"]
            if im.get("split") == split
        ]
    elif isinstance(data, list):  # LAVIS's layout
        records = [(r["image"], list(r["caption"])) for r in data]
    else:
        raise ValueError(f"{path}: neither LAVIS's list of records nor Karpathy's {{'images': [...]}}")
    images, captions, txt2img, img2txt = [], [], [], []
    for img_id, (image, caps) in enumerate(records):
        images.append(image)
        img2txt.append(list(range(len(captions), len(captions) + len(caps))))
        captions += caps
        txt2img += [img_id] * len(caps)
    return images, captions, txt2img, img2txt


class _Images(Dataset):
    def __init__(self, paths: list[str], transform: Callable[[Image.Image], Tensor]) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        try:
            return self.transform(load_image(self.paths[i]))
        except BadImage as bad:  # every image is ranked against every caption: none can be left out
            raise ValueError(f"{self.paths[i]}: unreadable image ({bad})") from None


class RetrievalDataModule(L.LightningDataModule):
    """A test set's two streams for `Trainer.predict`: its images, read and transformed by the loader's
    workers (dataloader 0), and its captions, batched as they are (dataloader 1)."""

    def __init__(
        self,
        images: list[str],
        captions: list[str],
        transform: Callable[[Image.Image], Tensor],
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.images, self.captions, self.transform = images, captions, transform
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> list[DataLoader]:
        images = DataLoader(
            _Images(self.images, self.transform), batch_size=self.batch_size, num_workers=self.num_workers
        )
        return [images, DataLoader(self.captions, batch_size=self.batch_size, collate_fn=list)]


class _Embedder(L.LightningModule):
    """Unit-norm embeddings of either stream, from a model's `encode_images` / `encode_texts`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: Tensor | list[str], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        encode = self.model.encode_images if dataloader_idx == 0 else self.model.encode_texts
        return encode(batch).float().cpu()


def retrieval_similarity(
    model: nn.Module,
    images: list[str],
    captions: list[str],
    batch_size: int = 64,
    accelerator: str = "auto",
    num_workers: int = 0,
) -> Tensor:
    """The [n_images, n_texts] cosine similarities of a `RetrievalProjection` (or anything with `vision`,
    `encode_images`, `encode_texts`) on one device: image files and captions embedded through
    `Trainer.predict`, images prepared as the vision tower expects (its size and normalisation, CLIP's
    resize and centre crop)."""
    v = model.vision
    transform = ImageTransforms(v.image_size, v.image_size, v.mean, v.std).vision
    data = RetrievalDataModule(images, captions, transform, batch_size, num_workers)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    img, txt = trainer.predict(_Embedder(model), datamodule=data)
    return torch.cat(img) @ torch.cat(txt).T
