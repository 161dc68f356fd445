"""Image captioning: COCO Karpathy test, NoCaps val and Flickr30K test, scored as InstructBLIP was.

Prompt and decoding follow LAVIS' InstructBLIP captioning configs: "A short image caption." after the
image, beam search with 5 beams, 10 to 80 new tokens, length penalty 1 (options `num_beams`,
`max_new_tokens`, `min_new_tokens`, `length_penalty`). A caption is the first line of the answer, cut at
the stop strings "###" and "</s>".

Scores are pycocoevalcap's (BLEU-1..4, METEOR, ROUGE-L and CIDEr, which is CIDEr-D) after its PTB
tokenizer, x100 as papers print them, over the evaluated images only, as LAVIS restricts COCOEvalCap to
the images it has results for. CIDEr's document frequencies come from the evaluated images' references, so
a `--limit` run does not give the full set's numbers. An image without a prediction, or whose image could
not be read, is scored as the empty caption (pycocoevalcap needs exactly one caption per image). The
tokenizer and METEOR run Java; METEOR takes seconds to start (option `meteor=false` skips it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from morph_lightning.data_modules.instruct import IMAGE_MARK
from morph_lightning.evaluation.task import Prediction, Request, markdown_table
from morph_lightning.evaluation.tasks.common import (
    BenchmarkTask,
    answered,
    clean_answer,
    decoding,
    need,
    read_json,
)

PROMPT = f"{IMAGE_MARK} A short image caption."


def ptb_tokenize(captions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTB tokenizer (Java): lowercased, punctuation tokens dropped, captions in order."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    except FileNotFoundError as err:
        raise RuntimeError(
            f"the COCO caption metrics need Java on PATH for the PTB tokenizer ({err})"
        ) from None
    # The tokenizer pairs its output lines with captions by position; a caption that splits into two lines
    # (a carriage return) would silently shift every later one.
    if any(len(out.get(k, [])) != len(v) for k, v in captions.items()):
        raise RuntimeError("the PTB tokenizer returned a different number of captions than it was given")
    return out


def coco_metrics(
    references: Mapping[str, list[str]], captions: Mapping[str, list[str]], meteor: Any = None
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr and (given a pycocoevalcap `Meteor`) METEOR, x100, of one tokenized caption
    per image against its tokenized references; both keyed by the same image ids."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = dict(references), dict(captions)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"Bleu_{n}": 100 * float(b) for n, b in enumerate(bleu, start=1)}
    if meteor is not None:
        out["METEOR"] = 100 * float(meteor.compute_score(gts, res)[0])
    out["ROUGE_L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    return out


def _meteor() -> Any:
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        return Meteor()
    except FileNotFoundError as err:
        raise RuntimeError(f"METEOR needs Java on PATH ({err}); --option meteor=false skips it") from None


@dataclass
class CaptionItem:
    id: str
    image: Path
    references: list[str]
    domain: str | None = None  # NoCaps: in-domain, near-domain or out-domain


class CaptionTask(BenchmarkTask):
    """One captioning set. Subclasses read their annotation file (`load`) and name their Table 2 column."""

    column: ClassVar[str]
    # The paper's Table 2 CIDEr for this set, for direction (not comparable with a tiny or partial run).
    PAPER: ClassVar[dict[str, float]] = {}
    OPTIONS = {
        **decoding(num_beams=5, max_new_tokens=80, min_new_tokens=10, length_penalty=1.0),
        "file": "",
        "images": "images",
        "meteor": True,
    }

    def __init__(self, data: str | Path, limit: int | None = None, official_scoring: bool = False, **options):
        super().__init__(data, limit, official_scoring, **options)
        self.items = self.head(self.load(read_json(self.path("file"))))
        if not self.items:
            raise ValueError(f"{self.name}: no images in {self.path('file')}")
        self.check_image(self.items[0].image)

    def load(self, annotations: Any) -> list[CaptionItem]:
        raise NotImplementedError

    def requests(self) -> list[Request]:
        return [self.generate(item.id, PROMPT, [str(item.image)]) for item in self.items]

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        refs = ptb_tokenize({item.id: item.references for item in self.items})
        caps = {
            item.id: [clean_answer(predictions[item.id].text) if answered(predictions.get(item.id)) else ""]
            for item in self.items
        }
        caps = ptb_tokenize(caps)
        meteor = _meteor() if self.options["meteor"] else None
        subsets = {"all": [item.id for item in self.items]}
        for item in self.items:
            if item.domain is not None:
                subsets.setdefault(item.domain, []).append(item.id)
        out: dict[str, Any] = {}
        for subset, ids in subsets.items():
            out[subset] = {
                "images": len(ids),
                "answered": sum(answered(predictions.get(i)) for i in ids),
                **coco_metrics({i: refs[i] for i in ids}, {i: caps[i] for i in ids}, meteor),
            }
        return out

    def table(self, scores: dict[str, Any]) -> str:
        rows = [[f"{model} (paper)", cider] for model, cider in self.PAPER.items()]
        head = markdown_table(
            ["Model", f"{self.column} CIDEr"], [*rows, ["this run", scores["all"]["CIDEr"]]]
        )
        detail = markdown_table(
            ["Images", "count", "answered", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"],
            [
                [subset, s["images"], s["answered"], s["Bleu_4"], s.get("METEOR"), s["ROUGE_L"], s["CIDEr"]]
                for subset, s in scores.items()
            ],
        )
        return f"{head}\n{detail}"


class KarpathyCaption(CaptionTask):
    """The Karpathy splits as LAVIS publishes them (`coco_karpathy_test.json`, `flickr30k_test.json`: a list
    of {"image": relative path, "caption": [references]}), or Karpathy's own `dataset_coco.json` /
    `dataset_flickr30k.json` ({"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}),
    whose images of option `split` are taken. Image paths are relative to option `images`."""

    OPTIONS = {**CaptionTask.OPTIONS, "split": "test"}

    def load(self, annotations: Any) -> list[CaptionItem]:
        return karpathy_items(
            annotations, self.folder("images"), self.options["split"], str(self.path("file"))
        )


class CocoKarpathyCaption(KarpathyCaption):
    name = "coco-caption"
    column = "COCO Karpathy test"
    OPTIONS = {**KarpathyCaption.OPTIONS, "file": "coco_karpathy_test.json"}


class Flickr30kCaption(KarpathyCaption):
    name = "flickr30k-caption"
    column = "Flickr30K"
    PAPER = {"InstructBLIP": 83.5, "Morph-Tokens": 87.5}
    OPTIONS = {**KarpathyCaption.OPTIONS, "file": "flickr30k_test.json"}


class NoCapsCaption(CaptionTask):
    """NoCaps val in its official COCO-format file (`nocaps_val_4500_captions.json`: images [{id, file_name,
    domain}], annotations [{image_id, caption}]), images under option `images` by file name. Scores are
    given over all images (the usual reading of "NoCaps val"; whether the paper's is overall or out-domain
    is not known) and per domain, each domain scored on its own images, so with its own CIDEr document
    frequencies, as LAVIS' InstructBLIP out-domain config scores it."""

    name = "nocaps"
    column = "NoCaps"
    PAPER = {"InstructBLIP": 120.0, "Morph-Tokens": 124.0}
    OPTIONS = {**CaptionTask.OPTIONS, "file": "nocaps_val_4500_captions.json"}

    def load(self, annotations: Any) -> list[CaptionItem]:
        return coco_format_items(annotations, self.folder("images"), str(self.path("file")))


def karpathy_items(annotations: Any, root: Path, split: str, where: str) -> list[CaptionItem]:
    """The images of a Karpathy split with their references, from LAVIS' list of {"image", "caption"} or
    Karpathy's own {"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]} (`split`'s)."""
    refs: dict[str, list[str]] = {}
    if isinstance(annotations, dict) and "images" in annotations:
        for record in annotations["images"]:
            need(record, ("filename", "split", "sentences"), where)
            if record["split"] == split:
                path = str(Path(record.get("filepath", "")) / record["filename"])
                refs[path] = [s["raw"] for s in record["sentences"]]
    elif isinstance(annotations, list):
        for record in annotations:
            need(record, ("image", "caption"), where)
            caption = record["caption"]
            refs.setdefault(record["image"], []).extend([caption] if isinstance(caption, str) else caption)
    else:
        raise ValueError(f"{where}: expected LAVIS' list of records or Karpathy's {{'images': [...]}}")
    # The file name without its extension is unique in both sets (COCO_val2014_000000391895, 1007129816).
    return [CaptionItem(Path(path).stem, root / path, r) for path, r in refs.items()]


def coco_format_items(annotations: Any, root: Path, where: str) -> list[CaptionItem]:
    """The images of a COCO-format caption file (images [{id, file_name, (domain)}], annotations [{image_id,
    caption}]) that have references, image files under `root` by file name."""
    if not isinstance(annotations, dict) or not {"images", "annotations"} <= set(annotations):
        raise ValueError(f"{where}: expected a COCO-format file with 'images' and 'annotations'")
    refs: dict[Any, list[str]] = {}
    for ann in annotations["annotations"]:
        need(ann, ("image_id", "caption"), where)
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    items = []
    for image in annotations["images"]:
        need(image, ("id", "file_name"), where)
        if image["id"] in refs:  # images without references cannot be scored
            items.append(
                CaptionItem(
                    str(image["id"]), root / image["file_name"], refs[image["id"]], image.get("domain")
                )
            )
    return items
