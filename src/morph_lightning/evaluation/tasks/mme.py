"""MME (Fu et al., 2023): 2,374 yes/no questions in 14 subtasks, scored as the official `calculation.py`.

Data: the official release `MME_Benchmark_release_version.zip`, unpacked. Every image has a `<stem>.txt` of
two lines `question<TAB>answer` (one answered Yes, one No; each question ends in " Please answer yes or
no."). A subtask folder holds them in one of two ways, told apart by the folder's contents:
- `images/<stem>.jpg` and `questions_answers_YN/<stem>.txt` (artwork, celebrity, landmark, posters, scene);
- `<stem>.jpg|png` beside `<stem>.txt` (the other nine).
The subtask folders sit in `MME_Benchmark_release_version/`, or one level down in `MME_Benchmark/` as the zip
on the Hugging Face hub unpacks; `--data` may name either folder or the one above. An image not beside its
name is looked for under `images/` (one release keeps artwork's in `images/toy_dataset/`).

Prompt: "USER: <image> {question} ASSISTANT:", the question as published; greedy, up to 16 new tokens (the
option `max_new_tokens`; lmms-eval's MME setting, and the parser reads only 4 characters).

Scoring, as the official tool: a response is lowercased; exactly "yes" or "no" is that answer, otherwise its
first 4 characters decide ("yes" in them: yes; else "no" in them: no; else "other", which is wrong). Per
subtask, acc = the questions right, acc+ = the images with both questions right, score = 100 acc + 100 acc+
(at most 200); perception sums the 10 perception subtasks (at most 2000), cognition the 4 others (800).
`official_scoring` changes nothing: this is the official scoring.

The official results layout: `MME.write_official_results` writes `<subtask>.txt` with lines
`image_name<TAB>question<TAB>gt_answer<TAB>response`, an image's two questions on adjacent lines, which the
official tool scores (`python calculation.py --results_dir DIR`); `read_predictions` (so `--predictions
DIR`) reads such a folder back, so answers made elsewhere in that layout score here the same.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from morph_lightning.data_modules.instruct import IMAGE_MARK
from morph_lightning.evaluation.task import USER_TEMPLATE, Prediction, Request, Task, markdown_table

log = logging.getLogger(__name__)

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
# Where the subtask folders may sit below `--data`: the release folder and the hub zip's extra level.
NESTINGS = (
    "",
    "MME_Benchmark",
    "MME_Benchmark_release_version",
    "MME_Benchmark_release_version/MME_Benchmark",
)
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
# Table 2's MME columns (Perception, Cognition)
PAPER_ROWS = [("Morph-Tokens (paper)", 1477.7, 389.3), ("InstructBLIP (paper)", 1212.8, 291.8)]


@dataclass(frozen=True)
class Question:
    subtask: str
    image_name: str  # the image's file name, as the official results name it
    image: Path
    question: str  # as published
    answer: str  # "Yes" or "No", as published
    line: int  # 0 or 1: its line in the image's file

    @property
    def id(self) -> str:
        return f"{self.subtask}/{self.image_name}#{self.line}"


def parse_response(response: str) -> str:
    """ "yes", "no" or "other": a model's response as the official tool reads it."""
    text = response.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def read_subtask(folder: Path) -> list[Question]:
    """A subtask folder's questions: images in file-name order, an image's two questions together."""
    split = folder / "questions_answers_YN"
    texts, images = (split, folder / "images") if split.is_dir() else (folder, folder)
    out: list[Question] = []
    for path in sorted(texts.glob("*.txt")):
        lines = [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
        if len(lines) != 2:
            raise ValueError(f"{path}: {len(lines)} questions; MME has two per image")
        image = _find_image(images, path.stem)
        for i, line in enumerate(lines):
            question, tab, answer = line.rpartition("\t")
            answer = answer.strip()
            if not tab or answer.lower() not in ("yes", "no"):
                raise ValueError(f"{path}:{i + 1}: expected 'question<TAB>Yes|No', got {line!r:.120}")
            out.append(Question(folder.name, image.name, image, question.strip(), answer, i))
    return out


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    found = sorted(p for p in folder.rglob(f"{stem}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"mme: no image {stem}.jpg|png under {folder}")
    return found[0]


def _subtask_root(data: Path) -> Path:
    for nesting in NESTINGS:
        root = data / nesting
        if any((root / name).is_dir() for name in SUBTASKS):
            return root
    raise FileNotFoundError(
        f"mme: no subtask folders ({', '.join(SUBTASKS[:3])}, ...) in {data} or its "
        f"{', '.join(n for n in NESTINGS if n)}"
    )


def _by_subtask(questions: list[Question]) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        out[q.subtask].append(q)
    return out


def _squash(text: str) -> str:
    # Some published questions hold two spaces before "Please answer"; tools that rewrite them differ.
    return " ".join(text.split())


class MME(Task):
    """Options: `max_new_tokens` (16). `limit`: per subtask, its first `limit` questions in whole images."""

    name = "mme"

    def __init__(
        self,
        data: str | Path,
        limit: int | None = None,
        official_scoring: bool = False,
        max_new_tokens: int | str = 16,
        **options: Any,
    ) -> None:
        super().__init__(data, limit, official_scoring, **options)
        self.max_new_tokens = int(max_new_tokens)
        self.root = _subtask_root(self.data)

    @cached_property
    def all_questions(self) -> list[Question]:
        """Every question of the subtasks present, subtasks in the official order."""
        present = [name for name in SUBTASKS if (self.root / name).is_dir()]
        if len(present) < len(SUBTASKS):
            log.warning(
                "mme: %d of %d subtasks in %s; the sums cover those", len(present), len(SUBTASKS), self.root
            )
        return [q for name in present for q in read_subtask(self.root / name)]

    @cached_property
    def questions(self) -> list[Question]:
        """The questions asked: all, or each subtask's first ⌈limit/2⌉ images."""
        if self.limit is None:
            return self.all_questions
        keep = 2 * math.ceil(self.limit / 2)
        return [q for qs in _by_subtask(self.all_questions).values() for q in qs[:keep]]

    def requests(self) -> list[Request]:
        return [
            Request(
                q.id,
                USER_TEMPLATE.format(f"{IMAGE_MARK} {q.question}"),
                [str(q.image)],
                max_new_tokens=self.max_new_tokens,
            )
            for q in self.questions
        ]

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        subtasks: dict[str, dict[str, float | int]] = {}
        for name, qs in _by_subtask(self.questions).items():
            per_image: dict[str, list[bool]] = defaultdict(list)
            for q in qs:
                pred = predictions.get(q.id)
                per_image[q.image_name].append(parse_response(pred.text if pred else "") == q.answer.lower())
            acc = sum(sum(r) for r in per_image.values()) / len(qs)
            acc_plus = sum(all(r) for r in per_image.values()) / len(per_image)
            subtasks[name] = {
                "acc": acc,
                "acc_plus": acc_plus,
                "score": 100 * acc + 100 * acc_plus,
                "n": len(qs),
            }
        return {
            "perception": sum(s["score"] for name, s in subtasks.items() if name in PERCEPTION),
            "cognition": sum(s["score"] for name, s in subtasks.items() if name in COGNITION),
            "subtasks": subtasks,
        }

    def table(self, scores: dict[str, Any]) -> str:
        subtasks = scores["subtasks"]
        rows = [*PAPER_ROWS, ("this model", scores["perception"], scores["cognition"])]
        out = "MME (Table 2)\n\n" + markdown_table(["Model", "Perception", "Cognition"], rows)
        for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
            have = sum(name in subtasks for name in names)
            if have < len(names):
                out += f"\nThis model's {group} sums {have} of its {len(names)} subtasks.\n"
        per_subtask = []
        for name in SUBTASKS:
            group = "perception" if name in PERCEPTION else "cognition"
            s = subtasks.get(name)
            cells = (100 * s["acc"], 100 * s["acc_plus"], s["score"], s["n"]) if s else (None,) * 4
            per_subtask.append((name, group, *cells))
        return (
            out
            + "\n"
            + markdown_table(["Subtask", "Group", "Acc", "Acc+", "Score", "Questions"], per_subtask)
        )

    def read_predictions(self, path: Path) -> dict[str, Prediction]:
        """The runner's jsonl, or a folder of official results (`<subtask>.txt`)."""
        path = Path(path)
        return self.read_official_results(path) if path.is_dir() else super().read_predictions(path)

    def read_official_results(self, folder: Path) -> dict[str, Prediction]:
        """Predictions from `<subtask>.txt` files in the official results format; each line is matched to its
        question by subtask, image name and question (whitespace aside)."""
        ids = {(q.subtask, q.image_name, _squash(q.question)): q.id for q in self.all_questions}
        files = [folder / f"{name}.txt" for name in SUBTASKS if (folder / f"{name}.txt").is_file()]
        if not files:
            raise FileNotFoundError(f"mme: no official results (<subtask>.txt) in {folder}")
        out: dict[str, Prediction] = {}
        for path in files:
            # split on newlines only, as the official tool's readlines(); the response keeps its spaces
            for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != 4:
                    raise ValueError(
                        f"{path}:{n}: expected image_name, question, gt_answer and response separated by "
                        f"tabs; got {len(fields)} fields"
                    )
                image_name, question, _, response = fields
                qid = ids.get((path.stem, image_name, _squash(question)))
                if qid is None:
                    raise ValueError(f"{path}:{n}: no question {image_name} {question!r:.80} in {self.root}")
                out[qid] = Prediction(qid, text=response)
        return out

    def write_official_results(self, predictions: dict[str, Prediction], folder: str | Path) -> list[Path]:
        """The asked questions' predictions as official results, one `<subtask>.txt` per subtask, for the
        official tool. A response is put on one line (its tabs and line breaks become spaces, which does not
        change how it parses); a question without a prediction gets an empty response (wrong)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        one_line = str.maketrans("\t\r\n", "   ")
        written = []
        for name, qs in _by_subtask(self.questions).items():
            lines = []
            for q in qs:
                pred = predictions.get(q.id)
                response = (pred.text if pred else "").translate(one_line)
                lines.append("\t".join([q.image_name, q.question, q.answer, response]) + "\n")
            path = folder / f"{name}.txt"
            path.write_text("".join(lines), encoding="utf-8")
            written.append(path)
        return written
