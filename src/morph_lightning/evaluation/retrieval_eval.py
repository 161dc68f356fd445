"""`python -m morph_lightning evaluate flickr30k-retrieval`: paper Table 6 from a `RetrievalProjection`
checkpoint (written by `python -m morph_lightning fit --config configs/retrieval_flickr.yaml`), or from a
similarity matrix saved elsewhere (`--predictions`, [n_images, n_texts] as `.npy` or `.pt`), scored by the
same code (`retrieval.recall_at_k`).

Options: `file`, the annotation file in the data folder (LAVIS' `flickr30k_test.json`, or Karpathy's
`dataset_flickr30k.json`, whose `split` images are read, "test" by default); `image_root`, the folder the
file's image paths start from (the data folder by default; a relative one is taken under it). `--limit N`
scores the first N images and their captions.

Writes under `--out`, each file whole, an earlier file with other content moved aside with its time
(`runner.write_atomic`): `similarity.npy` (the model's [n_images, n_texts] float32 cosines, model runs
only), `scores.json` (LAVIS' `txt_r1` ... `r_mean`, x100, with the set's size, its file and what was
scored) and `table.md` (Table 6's layout).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from morph_lightning.evaluation.retrieval import read_flickr30k_test, recall_at_k, retrieval_similarity
from morph_lightning.evaluation.runner import write_atomic
from morph_lightning.evaluation.task import markdown_table
from morph_lightning.stages.retrieval_projection import RetrievalProjection

RETRIEVAL = "flickr30k-retrieval"
SIMILARITY = "similarity.npy"
OPTIONS = {"file": "flickr30k_test.json", "image_root": "", "split": "test"}
# Table 6 (x100): image -> text R@1, R@5, R@10; text -> image R@1, R@5, R@10; R@m.
TABLE6: dict[str, tuple[float, ...]] = {
    "BLIP-2": (81.9, 98.4, 99.7, 82.4, 96.5, 98.4, 92.9),
    "SEED": (91.0, 99.5, 100.0, 79.3, 94.8, 97.1, 93.6),
    "LaViT": (83.0, 99.2, 99.7, 78.3, 96.2, 97.5, 92.3),
    "Morph-Tokens": (88.8, 99.7, 100.0, 85.2, 97.1, 98.7, 95.0),
}
COLUMNS = {
    "txt_r1": "TR@1",
    "txt_r5": "TR@5",
    "txt_r10": "TR@10",
    "img_r1": "IR@1",
    "img_r5": "IR@5",
    "img_r10": "IR@10",
    "r_mean": "R@m",
}


@dataclass
class RetrievalSet:
    annotation: Path
    images: list[str]  # the image files, their root joined on
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]


def read_set(data: str | Path, options: dict[str, str], limit: int | None = None) -> RetrievalSet:
    """The test set named by `options` (see the module's docstring) in the data folder `data`."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{RETRIEVAL}: unknown options {unknown}; known: {sorted(OPTIONS)}")
    opts = OPTIONS | options
    file = Path(data) / opts["file"]
    if not file.is_file():
        raise FileNotFoundError(f"{RETRIEVAL}: no {file} (set it with --option file=NAME)")
    images, captions, txt2img, img2txt = read_flickr30k_test(file, opts["split"])
    if limit is not None:  # texts are numbered in file order: the first images' captions come first
        images, img2txt = images[:limit], img2txt[:limit]
        captions, txt2img = captions[: sum(map(len, img2txt))], txt2img[: sum(map(len, img2txt))]
    if not images:
        raise ValueError(f"{file}: no images (split {opts['split']!r})")
    root = Path(data) / opts["image_root"]
    return RetrievalSet(file, [str(root / p) for p in images], captions, txt2img, img2txt)


def load_projection(path: str | os.PathLike) -> RetrievalProjection:
    """A `RetrievalProjection` from its checkpoint, in eval mode; a one-line ValueError for another file
    (a stage checkpoint, say)."""
    try:  # mmap: only the hyper-parameters and the weights' names are looked at here
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: cannot read the checkpoint ({first})") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    weights = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(hparams, dict) or "text_encoder" not in hparams or "image_proj.weight" not in weights:
        kind = hparams.get("_class_path") if isinstance(hparams, dict) else None
        raise ValueError(
            f"{path} is not a RetrievalProjection checkpoint{f' ({kind})' if kind else ''}: train one with "
            "`python -m morph_lightning fit --config configs/retrieval_flickr.yaml`"
        )
    return RetrievalProjection.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()


def read_similarity(path: str | os.PathLike, test: RetrievalSet) -> Tensor:
    """A saved [n_images, n_texts] similarity matrix (`.npy`, or a tensor saved with `torch.save`)."""
    path = Path(path)
    if path.suffix == ".npy":
        sim = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix in (".pt", ".pth"):
        sim = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: a similarity matrix is read from .npy, .pt or .pth")
    shape = (len(test.images), len(test.captions))
    if not isinstance(sim, Tensor) or tuple(sim.shape) != shape:
        got = tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise ValueError(f"{path}: needs a [n_images, n_texts] = {list(shape)} matrix, got {got}")
    return sim.float()


def table(scores: dict[str, Any]) -> str:
    """Table 6: the paper's rows and this run's."""
    rows = [[f"{model} (paper)", *values] for model, values in TABLE6.items()]
    rows.append(["this run", *(scores[k] for k in COLUMNS)])
    return markdown_table(["Model", *COLUMNS.values()], rows) + (
        f"\n{scores['images']} images, {scores['texts']} captions ({scores['annotation']}). TR: image -> "
        "text, IR: text -> image; recalls x100 as LAVIS computes them, R@m their mean.\n"
    )


def write_scores(similarity: Tensor, test: RetrievalSet, out: str | Path, source: str) -> dict[str, Any]:
    """Score `similarity` on `test`; write `scores.json` and `table.md` under `out`; return the scores."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = recall_at_k(similarity, test.txt2img, test.img2txt)
    scores |= {"images": len(test.images), "texts": len(test.captions), "annotation": str(test.annotation)}
    scores["source"] = source  # the checkpoint or the similarity file scored
    write_atomic(out / "scores.json", json.dumps(scores, indent=2) + "\n")
    write_atomic(out / "table.md", table(scores))
    return scores


def evaluate_model(
    model: nn.Module,
    test: RetrievalSet,
    out: str | Path,
    source: str,
    batch_size: int = 64,
    accelerator: str = "auto",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Embed `test` with `model` (`retrieval_similarity`), keep the similarity matrix as `similarity.npy`
    under `out`, and score it."""
    if not Path(test.images[0]).exists():
        raise FileNotFoundError(f"{RETRIEVAL}: no image {test.images[0]} (set --option image_root=DIR)")
    sim = retrieval_similarity(model, test.images, test.captions, batch_size, accelerator, num_workers)
    Path(out).mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, sim.numpy().astype(np.float32))
    write_atomic(Path(out) / SIMILARITY, buf.getvalue())
    return write_scores(sim, test, out, source)
