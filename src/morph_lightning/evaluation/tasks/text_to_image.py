"""Text-to-image (the paper's Table 4): COCO Karpathy test (5k), COCO val 30k and Flickr30K test (1k),
scored by pair-wise CLIP similarity between each generated image and the ground-truth image of its caption.

The prompt is the paper's text-to-image instruction (Appendix C.1) around one reference caption (option
`caption`, its index among the image's references: 0, the first, by default; which caption the paper
used is not published). The model is asked for an image (the answer starts with `<img>`) and decodes
greedily; the image is written as a PNG.

The score follows GILL's scorer, which SEED-LLaMA and this paper cite: CLIP ViT-L/14 image features
(`get_image_features` after CLIP's own preprocessing) of the generated and the ground-truth image, their
cosine, averaged over the pairs, x100 as the paper prints it. Like GILL, a pair whose generated image is
missing is left out of the mean; the table says how many were scored. CLIP comes from a local folder or
the Hugging Face cache (option `clip_model`), never from the network.

COCO val 30k: 30,000 images drawn from `captions_val2014.json` with a seeded rng (option `seed`), one of
their captions each; the drawn ids are the request ids, listed in `predictions.jsonl`. `--predictions
DIR` scores a folder of images named `<id>.png` (as the runner names them), so another model's images
score the same.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ClassVar

from morph_lightning.data_modules.sources.templates import TEXT_TO_IMAGE
from morph_lightning.data_modules.transforms import load_image
from morph_lightning.evaluation.image_metrics import embedder_name
from morph_lightning.evaluation.runner import image_file
from morph_lightning.evaluation.task import (
    Prediction,
    Request,
    drawn_image,
    markdown_table,
    read_predictions_jsonl,
)
from morph_lightning.evaluation.tasks.captioning import CaptionItem, coco_format_items, karpathy_items
from morph_lightning.evaluation.tasks.common import BenchmarkTask, read_json


class TextToImageTask(BenchmarkTask):
    """One text-to-image set; subclasses read their annotation file (`load`) and name their Table 4 column."""

    column: ClassVar[str]
    PAPER: ClassVar[dict[str, float]] = {}  # Table 4, for direction
    OPTIONS = {
        "file": "",
        "images": "images",
        "caption": 0,
        "clip_model": "openai/clip-vit-large-patch14",  # "": skip; a stage-0 tower file: the world's
        "l1": False,  # also L1 to the ground truth (meaningful where images are exact renders: the world)
        "fid": False,  # also FID against the ground-truth images (torch-fidelity's Inception, local weights)
        "fid_weights": "",  # its weights file; "" looks in the torch hub cache
        "device": "cpu",
        "batch_size": 32,
    }

    def __init__(self, data: str | Path, limit: int | None = None, official_scoring: bool = False, **options):
        super().__init__(data, limit, official_scoring, **options)
        self.items = self.head(self.load(read_json(self.path("file"))))
        if not self.items:
            raise ValueError(f"{self.name}: no images in {self.path('file')}")
        self.check_image(self.items[0].image)

    def load(self, annotations: Any) -> list[CaptionItem]:
        raise NotImplementedError

    def caption(self, item: CaptionItem) -> str:
        refs = item.references
        return " ".join(refs[min(self.options["caption"], len(refs) - 1)].split())

    def requests(self) -> list[Request]:
        return [
            Request(item.id, TEXT_TO_IMAGE.format(caption=self.caption(item)), output="image")
            for item in self.items
        ]

    def read_predictions(self, path: Path) -> dict[str, Prediction]:
        """The runner's jsonl, or a folder of generated images named `<id>.png`."""
        if not Path(path).is_dir():
            return read_predictions_jsonl(path)
        found = {item.id: image_file(Path(path), item.id) for item in self.items}
        return {i: Prediction(i, image=str(f)) for i, f in found.items() if f.exists()}

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        from morph_lightning.evaluation.image_metrics import ImageScorer  # loads CLIP only to score

        drawn = [(drawn_image(predictions.get(item.id)), item.image) for item in self.items]
        pairs = [(image, reference) for image, reference in drawn if image is not None]
        scorer = ImageScorer(
            clip_model=self.options["clip_model"],
            device=self.options["device"],
            batch_size=self.options["batch_size"],
            fid_weights=self.options["fid_weights"] or None,
        )
        metrics = tuple(
            m for m, on in (("clip", self.options["clip_model"]), ("l1", self.options["l1"])) if on
        )
        means = scorer.mean_over_files(pairs, metrics, load_image)
        return {
            "clip_similarity": means.get("clip"),
            **({"l1": means["l1"]} if "l1" in means else {}),
            **({"fid": scorer.fid_over_files(pairs, load_image)} if self.options["fid"] else {}),
            "images": len(self.items),
            "scored": len(pairs),
            "clip_model": self.options["clip_model"] or None,
        }

    def table(self, scores: dict[str, Any]) -> str:
        rows = [[f"{model} (paper)", value] for model, value in self.PAPER.items()]
        head = markdown_table(
            ["Model", f"{self.column} CLIP similarity"], [*rows, ["this run", scores["clip_similarity"]]]
        )
        clip = embedder_name(scores["clip_model"], "clip_model")
        l1 = (
            f"; L1 to the ground truth x100: {100 * scores['l1']:.1f}" if scores.get("l1") is not None else ""
        )
        fid = f"; FID {scores['fid']:.2f}" if scores.get("fid") is not None else ""
        return head + f"\n{scores['scored']} of {scores['images']} images scored, {clip}{l1}{fid}.\n"


class CocoKarpathyTextToImage(TextToImageTask):
    """COCO Karpathy test as LAVIS publishes it (`coco_karpathy_test.json`) or as Karpathy does
    (`dataset_coco.json`)."""

    name = "coco-t2i"
    column = "MS-COCO Karpathy test"
    PAPER = {"GILL": 68.4, "SEED-LLaMA": 68.2, "Morph-Tokens": 70.6}
    OPTIONS = {**TextToImageTask.OPTIONS, "file": "coco_karpathy_test.json", "split": "test"}

    def load(self, annotations: Any) -> list[CaptionItem]:
        return karpathy_items(
            annotations, self.folder("images"), self.options["split"], str(self.path("file"))
        )


class Flickr30kTextToImage(CocoKarpathyTextToImage):
    """Flickr30K test as LAVIS publishes it (`flickr30k_test.json`) or Karpathy's `dataset_flickr30k.json`."""

    name = "flickr30k-t2i"
    column = "Flickr30K test"
    PAPER = {"GILL": 65.2, "SEED-LLaMA": 65.6, "Morph-Tokens": 68.8}
    OPTIONS = {**CocoKarpathyTextToImage.OPTIONS, "file": "flickr30k_test.json"}


class CocoVal30kTextToImage(TextToImageTask):
    """COCO val2014 (`captions_val2014.json`, images under option `images`): `count` images drawn with
    `random.Random(seed)`, one of their captions each (drawn with the same rng)."""

    name = "coco-val30k-t2i"
    column = "MS-COCO val30k"
    PAPER = {"GILL": 67.5, "SEED-LLaMA": 70.7, "Morph-Tokens": 72.2}
    OPTIONS = {**TextToImageTask.OPTIONS, "file": "captions_val2014.json", "count": 30000, "seed": 0}

    def load(self, annotations: Any) -> list[CaptionItem]:
        items = coco_format_items(annotations, self.folder("images"), str(self.path("file")))
        rng = random.Random(self.options["seed"])
        drawn = rng.sample(items, min(self.options["count"], len(items)))
        return [CaptionItem(i.id, i.image, [rng.choice(i.references)]) for i in drawn]
