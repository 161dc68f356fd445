"""DEMON (Table 3 of the paper): Cheetah's benchmark of demonstrative instructions, 7 categories of
interleaved image-text tasks.

Data, as published (DEMON-Core): `<root>/<Dataset>/core/core.json` with the images in
`<root>/<Dataset>/core/images/`; a root that nests the datasets one level deeper, under category folders
(`<root>/<Category>/<Dataset>/core/...`, as the benchmark's README tree does), is read too. `core.json` is
`{"metadata": {"task_instruction": [10 templates], "question_type": ...}, "data": [{"sample_id",
"task_instruction_id", "task_instance": {"context", "images_path", ["choice_list"]}, "response"}]}`.
DEMON-Full's layout could not be established (its READMEs say `"split": "full"`), so the option
`split` (default "core") reads `<Dataset>/<split>/<split>.json` and `<Dataset>/<split>/images/`.
Options: `datasets` (a comma list of folder names, any case) restricts the datasets; `max_new_tokens`
(default 100); `limit` applies per dataset.

Prompts are the official runner's (`Cheetah/i4_cheetah_llama2.py`): `task_instruction[task_instruction_id]
+ context`, then `Choice list:['a', 'b']. Your answer is:` when the sample has a `choice_list` (joined
with `', '` and no escaping, as that runner writes it; not Python's repr), then every `{image#k}` /
`{table#k}` (1-based) becomes an `<image>` mark, in the `USER: {} ASSISTANT:` template. Each mark gets the
image it names, so a placeholder out of order or used twice still shows the right image.

Scoring is the official `DEMON Benchmark/scripts/evaluate.py`: ROUGE-L F of `rouge==1.0.1` for
open-ended datasets, the TF-IDF nearest choice for multi-choice, a first-7-characters rule for the
image-choice datasets, all after its `process` normalisation (the VQA punctuation rules, quotes stripped,
lowercase). A category is the unweighted mean of its datasets' scores x100, which `scripts/i4_score.py`
intends but cannot compute (it exits when a dataset has no `eval.json`, opens a tuple, reads one stale
file for every dataset, writes no newlines). Its bugs are fixed by default; `official_scoring=True`
reproduces them (the rows marked *):

| what                    | official scripts                             | here by default                 |
|-------------------------|----------------------------------------------|---------------------------------|
| decoding                | sampled: top_p 0.9, T 1, 300 tokens, no seed | greedy, `max_new_tokens` 100    |
| RecipeQA_VisualCloze *  | TF-IDF (listed as recipeqa-RecipeQA_...)     | the image-choice rule           |
| folder-name case *      | exact (`nuscenes`; README: `nuScenes`)       | any case (categories: always)   |
| ALFRED (type "")        | "not supported": no score; i4_score stops    | ROUGE-L F (free-text actions)   |
| period regex (vacuous)  | drops every period not before a digit        | the same                        |
| UNICODE as count *      | drops only the first 32 periods              | drops them all                  |
| TF-IDF no overlap/tie * | argmax: the first choice                     | exact match                     |
| "image a".."image d" *  | substrings ("image about" is "image a")      | whole words                     |
| response not a choice * | assert: the run stops                        | exact match                     |
| empty response *        | assert: the run stops                        | right only if the answer is too |
| missing prediction *    | ROUGE, image: mean of present; TF-IDF: stop  | 0, counted in `n`, `missing`    |
| the reference           | pred.json gt_response (TF-IDF: core.json)    | core.json's `response`          |
| category means          | round(mean, 5) x100, had i4_score run        | mean x100, unrounded            |

Why: greedy is the released Morph `generate()` default and reproducible. The VisualCloze name matches no
folder, and TF-IDF sees its choices ("Image A".."Image D", with or without their image placeholder) as one
vector, so the first always won. ALFRED's answers are free-text actions and the README reports an MMD
score, so it was scored somehow (nothing official to reproduce: both modes). The vacuous regex (meant as
a look-behind, `(?!<=\\d)` is a look-ahead) is in every published VQA number, and a kept "1992." would
split rouge's sentences, so it stays; the 32-period cap leaves periods in long texts, where rouge 1.0.1
splits sentences. An argmax over all-zero or tied similarities is no match at all (free accuracy
whenever the first choice was right). A missing or unusable answer must not make a partial run look
better. The reference texts agree for files the official runner wrote (it writes str(response)).

In both modes an answer is first cut at the model's end strings ("###", "</s>"), an item our runner
could not answer (an unreadable image, where the official runner stops) scores 0, and a sample whose
placeholders do not name each of its images 1..n is an error here (the official runner leaves an unknown
placeholder as text and passes every image).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from rouge import Rouge
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from morph_lightning.data_modules.sources.demon import build_prompt
from morph_lightning.evaluation.runner import PREDICTIONS
from morph_lightning.evaluation.task import (
    USER_TEMPLATE,
    Prediction,
    Request,
    Task,
    markdown_table,
    read_predictions_jsonl,
)
from morph_lightning.evaluation.tasks.common import STOPS
from morph_lightning.evaluation.vqa_normalise import process_punctuation

log = logging.getLogger(__name__)

# Table 3's columns and the dataset folders of each (`scripts/i4_scripts.sh`), in the paper's order.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "MMD": ("MMCoQA", "ALFRED"),
    "VST": ("AESOP", "DiDeMoSV", "FlintstonesSV", "PororoSV", "VIST"),
    "VRI": ("IEdit", "Spot-the-Diff", "Birds-to-Words", "CLEVR-Change"),
    "MMC": ("COMICS_Dialogue", "COMICS_Panel", "RecipeQA_VisualCloze", "RecipeQA_TextCloze"),
    "KGQA": ("WebQA", "TQA", "MultiModalQA"),
    "TRQA": ("SlideVQA", "OCR-VQA", "DocVQA"),
    "MMR": (
        "Fashion200K",
        "NLVR2",
        "nuScenes",
        "VizWiz",
        "MIT-States_StateCoherence",
        "MIT-States_PropertyCoherence",
        "VISION",
        "RecipeQA_ImageCoherence",
    ),
}
OTHER = "other"  # a dataset folder not in Table 3: scored on its own, in no category
# The category keys of the official scripts (`i4_score.py`), which a dataset's metadata may name.
CATEGORY_KEYS = {
    "multi_modal_dialogue": "MMD",
    "visual_story_telling_list": "VST",
    "visual_relation_inference": "VRI",
    "multi_modal_cloze": "MMC",
    "knowledge_grounded_qa": "KGQA",
    "text_rich_images_qa": "TRQA",
    "multi_image_reasoning": "MMR",
}
_ORDER = [d.lower() for datasets in CATEGORIES.values() for d in datasets]
_CATEGORY_OF = {d.lower(): c for c, datasets in CATEGORIES.items() for d in datasets}
PAPER_ROWS = {
    "Morph-Tokens (paper)": (32.2, 27.4, 27.4, 28.0, 56.4, 47.7, 54.9),
    "VPG-C (paper)": (37.5, 25.2, 25.9, 22.2, 48.6, 44.9, 50.3),
}
# Table 7 (ablations, category means x100), in CATEGORIES' order: MMD, VST, VRI, MMC, KGQA, TRQA, MMR.
TABLE7: dict[str, tuple[float, ...]] = {
    "Morph-token": (32.2, 27.4, 27.4, 28.0, 56.4, 47.7, 54.9),
    "1 detail-detail": (7.3, 8.6, 8.2, 16.6, 30.2, 24.8, 34.8),
    "2 abstr-abstr (SD)": (25.8, 17.3, 11.3, 22.7, 38.8, 33.5, 45.0),
    "3 abstr-abstr (VQ)": (25.2, 20.4, 13.2, 19.8, 37.9, 32.7, 46.1),
    "4 w/o decoder": (20.9, 16.4, 12.8, 18.0, 35.6, 30.4, 41.3),
    "5 w/o deconfound": (31.8, 25.7, 25.3, 26.2, 54.7, 44.8, 50.9),
    "6 continuous": (31.7, 26.3, 26.1, 27.0, 54.3, 45.2, 52.5),
}
# The official scorer's image-choice list, its wrong VisualCloze name included, and the intended one.
OFFICIAL_IMAGE_CHOICE = ("recipeqa-RecipeQA_VisualCloze", "RecipeQA_ImageCoherence", "COMICS_Panel")
IMAGE_CHOICE = ("recipeqa_visualcloze", "recipeqa_imagecoherence", "comics_panel")
QUESTION_TYPES = ("open-ended", "multi-choice", "")  # "" is ALFRED's, scored as open-ended

_IMAGE_OPTION = re.compile(r"Image ([A-D]):")  # an image choice as DEMON's contexts list it
_OPTIONS = ("image a", "image b", "image c", "image d")
_OPTION_WORD = re.compile(r"\bimage [a-d]\b")
_ROUGE = Rouge()


def category_of(dataset: str) -> str:
    """The Table 3 category of a dataset folder (any case), or "other"."""
    return _CATEGORY_OF.get(dataset.lower(), OTHER)


def process(text: str, official: bool = False) -> str:
    """The official scorer's normalisation: the VQA punctuation rules (`process_punctuation`; periods
    not before a digit go, the first 32 with `official` (the flags passed as `count`), all otherwise),
    quotes stripped, lowercase."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = process_punctuation(text, max_periods=32 if official else 0)
    return out.strip("'").strip('"').strip().lower()


def rouge_l_f(pred: str, ref: str) -> float:
    """ROUGE-L F of `rouge` 1.0.1: summary-level union LCS over "."-split sentences, unique words."""
    return _ROUGE.get_scores(pred, ref)[0]["rouge-l"]["f"]


def choice_correct(pred: str, gt: str, choices: list[str], official: bool = False) -> bool:
    """Whether the choice nearest to `pred` by TF-IDF cosine (sklearn defaults, fitted on the answer and
    the choices) is `gt`; exact match when no text has a token of two word characters. Without
    `official`, exact match too when no single choice is nearest (no shared token, or a tie between
    different choices), where the official argmax takes the first choice. Inputs are `process`ed."""
    try:
        tfidf = TfidfVectorizer().fit_transform([pred, *choices])
    except ValueError:  # empty vocabulary, e.g. choices "a".."d"
        return pred == gt
    sims = cosine_similarity(tfidf[:1], tfidf[1:]).ravel()
    best = int(sims.argmax())
    if not official:
        nearest = {choices[i] for i in np.flatnonzero(np.isclose(sims, sims[best]))}
        if sims[best] <= 0 or len(nearest) > 1:
            return pred == gt
    return choices[best] == gt


def image_choice_correct(pred: str, gt: str, official: bool = False) -> bool:
    """The image-choice rule: the first 7 characters ("image b") agree and at most one of "image a".."image
    d" is named. `official` counts substrings ("image about" names "image a"); otherwise whole words, and
    the answer's first 7 characters must end a word. Inputs are `process`ed."""
    if official:
        named = {o for o in _OPTIONS if o in pred}
        return pred[:7] == gt[:7] and len(named) <= 1
    named = set(_OPTION_WORD.findall(pred))
    return pred[:7] == gt[:7] and not pred[7:8].isalnum() and len(named) <= 1


@dataclass(frozen=True)
class _Item:
    id: str
    prompt: str
    images: list[str]
    response: str
    choices: list[str] | None


@dataclass(frozen=True)
class _Dataset:
    name: str
    question_type: str
    items: list[_Item]
    category: str  # Table 3's column, or OTHER
    image_choice: bool  # scored by the image-choice rule, whatever the official name list says


def _item(dataset: str, sample: Any, instructions: list[str], images: Path, path: Path) -> _Item:
    sid = sample.get("sample_id", "?") if isinstance(sample, dict) else "?"
    try:
        instance = sample["task_instance"]
        choices = instance.get("choice_list")
        choices = None if choices is None else [str(c) for c in choices]
        files = instance["images_path"]
        text, order = build_prompt(
            instructions[sample["task_instruction_id"]], instance["context"], choices, len(files)
        )
        return _Item(
            f"{dataset}/{sample['sample_id']}",
            USER_TEMPLATE.format(text),
            [str(images / files[k]) for k in order],
            str(sample["response"]),
            choices,
        )
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: sample {sid}: malformed ({type(err).__name__}: {err})") from None
    except ValueError as err:
        raise ValueError(f"{path}: sample {sid}: {err}") from None


class Demon(Task):
    """DEMON-Core (or a `split` of DEMON-Full) scored as Table 3; see the module docstring."""

    name = "demon"

    def __init__(
        self,
        data: str | Path,
        limit: int | None = None,
        official_scoring: bool = False,
        split: str = "core",
        datasets: str | list[str] | None = None,
        max_new_tokens: int | str = 100,
        **options: Any,
    ) -> None:
        super().__init__(data, limit, official_scoring, **options)
        self.split = split
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"demon: max_new_tokens must be positive, got {max_new_tokens}")
        if version("rouge") != "1.0.1":
            log.warning("demon: rouge %s installed; the official scorer pins 1.0.1", version("rouge"))
        folders = self._find(datasets)
        self.datasets = [self._load(name, folder) for name, folder in folders.items()]

    def _find(self, wanted: str | list[str] | None) -> dict[str, Path]:
        """Dataset name -> its split folder, in Table 3's order; the `wanted` ones only."""
        found: dict[str, Path] = {}
        for pattern in (f"*/{self.split}/{self.split}.json", f"*/*/{self.split}/{self.split}.json"):
            for path in self.data.glob(pattern):
                name = path.parent.parent.name
                if name in found:
                    raise ValueError(f"demon: dataset {name} twice: {found[name]} and {path.parent}")
                found[name] = path.parent
        if not found:
            raise FileNotFoundError(f"demon: no <dataset>/{self.split}/{self.split}.json under {self.data}")
        if wanted is not None:
            names = [w.strip() for w in wanted.split(",")] if isinstance(wanted, str) else list(wanted)
            by_lower = {n.lower(): n for n in found}
            unknown = [n for n in names if n and n.lower() not in by_lower]
            if unknown:
                raise ValueError(
                    f"demon: no dataset {', '.join(unknown)} under {self.data}; has {sorted(found)}"
                )
            found = {by_lower[n.lower()]: found[by_lower[n.lower()]] for n in names if n}

        def order(name: str) -> tuple[int, str]:
            lower = name.lower()
            return (_ORDER.index(lower) if lower in _ORDER else len(_ORDER), lower)

        return {name: found[name] for name in sorted(found, key=order)}

    def _load(self, name: str, folder: Path) -> _Dataset:
        path = folder / f"{self.split}.json"
        images = folder / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"demon: {name} has no images folder {images}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            instructions, question_type = (
                raw["metadata"]["task_instruction"],
                raw["metadata"]["question_type"],
            )
            samples = raw["data"]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON: {err}") from None
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a DEMON annotation file ({type(err).__name__}: {err})") from None
        if question_type not in QUESTION_TYPES:
            raise ValueError(f"{path}: unknown question_type {question_type!r}; known: {QUESTION_TYPES}")
        items = [_item(name, s, instructions, images, path) for s in samples[: self.limit]]
        ids = [item.id for item in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: sample_id repeats")
        # A dataset outside Table 3 (the world's, say) may give its category and image-choice scoring in
        # its metadata, as names do for DEMON's own: `category` (a key of i4_score.py or a column name).
        meta = raw["metadata"]
        category = category_of(name)
        if category == OTHER and meta.get("category") is not None:
            category = CATEGORY_KEYS.get(meta["category"], meta["category"])
            if category not in CATEGORIES:
                raise ValueError(
                    f"{path}: unknown category {meta['category']!r}; known: {sorted(CATEGORY_KEYS)}"
                )
        image_choice = name.lower() in IMAGE_CHOICE or bool(meta.get("image_choice", False))
        return _Dataset(name, question_type, items, category, image_choice)

    def _kind(self, dataset: _Dataset) -> str:
        """How a dataset is scored: "open-ended", "multi-choice" (TF-IDF) or "image-choice"."""
        if dataset.question_type != "multi-choice":
            return "open-ended"
        if self.official_scoring and dataset.name.lower() in IMAGE_CHOICE:  # DEMON's own: by official name
            return "image-choice" if dataset.name in OFFICIAL_IMAGE_CHOICE else "multi-choice"
        return "image-choice" if dataset.image_choice else "multi-choice"

    def requests(self) -> list[Request]:
        return [
            Request(item.id, item.prompt, list(item.images), max_new_tokens=self.max_new_tokens)
            for dataset in self.datasets
            for item in dataset.items
        ]

    def _item_score(self, kind: str, answer: str, item: _Item) -> float:
        official = self.official_scoring
        for stop in STOPS:  # the model's end string ends the answer, as its generate() cuts it
            answer = answer.split(stop)[0]
        gt, pred = process(item.response, official), process(answer, official)
        if kind == "image-choice":
            return float(image_choice_correct(pred, gt, official))
        if kind == "multi-choice":
            choices = [process(c, official) for c in item.choices or []]
            if gt in choices:
                return float(choice_correct(pred, gt, choices, official))
            if official:
                raise ValueError(
                    f"demon {item.id}: response {gt!r} is not among the choices {choices} "
                    "(the official scorer's assert stops here)"
                )
            return float(pred == gt)
        if not gt:
            if official:
                raise ValueError(f"demon {item.id}: empty response (the official scorer's assert stops here)")
            return float(not pred)
        return rouge_l_f(pred, gt) if pred else 0.0

    def _score_dataset(self, dataset: _Dataset, predictions: dict[str, Prediction]) -> dict[str, Any]:
        kind = self._kind(dataset)
        answers = [(item, predictions.get(item.id)) for item in dataset.items]
        missing = sum(pred is None for _, pred in answers)
        if missing:
            log.warning("demon %s: %d of %d items have no prediction", dataset.name, missing, len(answers))
            if self.official_scoring:
                if kind == "multi-choice":
                    raise ValueError(
                        f"demon {dataset.name}: {missing} items have no prediction (the official scorer "
                        "asserts one per item); score without --official-scoring"
                    )
                # the official ROUGE and image-choice means are over the predictions present
                answers = [(item, pred) for item, pred in answers if pred is not None]
        scores = [
            0.0 if pred is None or pred.error is not None else self._item_score(kind, pred.text, item)
            for item, pred in answers
        ]
        return {
            "category": dataset.category,
            "metric": "rouge_l_f" if kind == "open-ended" else "accuracy",
            "score": sum(scores) / len(scores) if scores else 0.0,
            "n": len(scores),
            "missing": missing,
        }

    def _chance(self, dataset: _Dataset) -> float:
        """What a system that ignores the images scores: a uniform pick among the choices (for image
        choices, the `Image X:` options the prompt lists), for open-ended data another sample's
        response (the next one's)."""
        items, kind = dataset.items, self._kind(dataset)
        if not items:
            return 0.0
        if kind == "open-ended":
            scores = [
                self._item_score(kind, items[(i + 1) % len(items)].response, it) for i, it in enumerate(items)
            ]
            return sum(scores) / len(scores) if len(items) > 1 else 0.0
        if kind == "image-choice":
            counts = [len(set(_IMAGE_OPTION.findall(it.prompt))) for it in items]
        else:
            counts = [len(it.choices or []) for it in items]
        return sum(1 / c if c else 0.0 for c in counts) / len(counts)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        datasets = {
            d.name: self._score_dataset(d, predictions) | {"chance": self._chance(d)} for d in self.datasets
        }

        def means(key: str) -> dict[str, float]:
            out = {}
            for category in CATEGORIES:
                values = [s[key] for s in datasets.values() if s["category"] == category]
                if values:
                    out[category] = 100 * sum(values) / len(values)
            return out

        return {
            "datasets": datasets,
            "categories": means("score"),
            "chance_categories": means("chance"),
            "official_scoring": self.official_scoring,
        }

    def table(self, scores: dict[str, Any]) -> str:
        cats = scores["categories"]
        chance = scores["chance_categories"]
        rows = [["this model", *(cats.get(c) for c in CATEGORIES)]]
        rows.append(["chance (these items)", *(chance.get(c) for c in CATEGORIES)])
        rows += [[model, *values] for model, values in PAPER_ROWS.items()]
        per_dataset = [
            [name, s["category"], s["metric"], s["n"], 100 * s["score"], 100 * s["chance"]]
            for name, s in scores["datasets"].items()
        ]
        how = "the official scripts' rules, bugs included" if scores["official_scoring"] else "fixed rules"
        text = f"DEMON, category means x100, scored with {how}. Chance: a uniform pick among the choices, or "
        text += "another sample's response for open-ended data.\n\n"
        text += markdown_table(["Models", *CATEGORIES], rows)
        text += "\n" + markdown_table(["Dataset", "Category", "Metric", "n", "Score", "Chance"], per_dataset)
        missing = sum(s["missing"] for s in scores["datasets"].values())
        if missing:
            text += f"\nItems without a prediction: {missing}.\n"
        return text

    def read_predictions(self, path: Path) -> dict[str, Prediction]:
        """The runner's `predictions.jsonl` (or a folder holding it), or the official runner's folder of
        `<Dataset>/pred.json` (a list of {"sample_id", "pred_response", "gt_response"}; `gt_response` is not
        read, core.json's `response` is the reference)."""
        path = Path(path)
        if path.is_dir() and (path / PREDICTIONS).is_file():
            path = path / PREDICTIONS
        if not path.is_dir():
            return read_predictions_jsonl(path)
        files = sorted(path.glob("*/pred.json"))
        if not files:
            raise FileNotFoundError(f"demon: no <dataset>/pred.json under {path}")
        names = {d.name.lower(): d.name for d in self.datasets}  # the official scripts write "nuscenes"
        out: dict[str, Prediction] = {}
        for file in files:
            dataset = names.get(file.parent.name.lower(), file.parent.name)
            try:
                for row in json.loads(file.read_text(encoding="utf-8")):
                    pid = f"{dataset}/{row['sample_id']}"
                    out[pid] = Prediction(pid, text=str(row["pred_response"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{file}: not an official pred.json (a list of sample_id, pred_response): {err!r}"
                ) from None
        return out
