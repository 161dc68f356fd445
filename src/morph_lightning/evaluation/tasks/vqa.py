"""Image question answering: VQAv2, and Table 2's GQA, VSR, IconQA and HatefulMemes, as InstructBLIP
evaluated them (LAVIS configs and the protocol notes; each choice the sources leave open is named on its
class).

Open questions (VQAv2, GQA) generate a short answer with LAVIS' InstructBLIP QA settings: the prompt
"Question: {} Short Answer:" after the image, beam search with 5 beams, 1 to 10 new tokens, length penalty
-1 (options `num_beams`, `max_new_tokens`, `min_new_tokens`, `length_penalty`). Classification and
multiple-choice sets (VSR, IconQA, HatefulMemes) rank their candidate answers by log-likelihood, as
InstructBLIP's vocabulary ranking does. Generated answers are cut at "###"/"</s>" and to their first line.
Questions enter the prompt as published: LAVIS lowercases them and drops some punctuation (its
`blip_question` processor), but this model was trained on text as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from morph_lightning.data_modules.instruct import IMAGE_MARK
from morph_lightning.evaluation.task import ImageSource, Prediction, Request, markdown_table
from morph_lightning.evaluation.tasks.common import (
    BenchmarkTask,
    answered,
    choice_logprobs,
    clean_answer,
    decoding,
    need,
    percent,
    read_json,
    read_jsonl,
    softmax,
)
from morph_lightning.evaluation.vqa_normalise import exact_match, normalise_answer, vqa_accuracy

QA_PROMPT = "Question: {} Short Answer:"
QA_DECODING = decoding(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


@dataclass
class QAItem:
    id: str
    images: list[ImageSource]
    text: str  # the user's message, one image mark per image
    answer: Any  # a reference answer, VQAv2's human answers, a 0/1 label or the index of the right choice
    choices: list[str] | None = None  # ranked items
    kind: str | None = None  # VQAv2's answer type


class QATask(BenchmarkTask):
    """A question-answering set: items read once (`load`), then generated or ranked. `table` prints the
    paper's Table 2 numbers for this set (`PAPER`, for direction) above this run's `metric`."""

    column: ClassVar[str]
    metric: ClassVar[str] = "accuracy"  # the score `table` leads with, and its name there
    label: ClassVar[str] = "accuracy"
    PAPER: ClassVar[dict[str, float]] = {}

    def __init__(self, data: str | Path, limit: int | None = None, official_scoring: bool = False, **options):
        super().__init__(data, limit, official_scoring, **options)
        self.items = self.head(self.load())
        if not self.items:
            raise ValueError(f"{self.name}: no questions in {self.data}")
        first = self.items[0].images[0]
        if isinstance(first, str):
            self.check_image(Path(first))

    def load(self) -> list[QAItem]:
        raise NotImplementedError

    def requests(self) -> list[Request]:
        return [
            self.rank(i.id, i.text, i.images, i.choices)
            if i.choices
            else self.generate(i.id, i.text, i.images)
            for i in self.items
        ]

    def counts(self, predictions: dict[str, Prediction]) -> dict[str, int]:
        return {
            "questions": len(self.items),
            "answered": sum(answered(predictions.get(i.id)) for i in self.items),
        }

    def table(self, scores: dict[str, Any]) -> str:
        rows = [[f"{model} (paper)", value] for model, value in self.PAPER.items()]
        head = markdown_table(
            ["Model", f"{self.column} {self.label}"], [*rows, ["this run", scores[self.metric]]]
        )
        flat = {k: v for k, v in scores.items() if not isinstance(v, dict)}
        return f"{head}\n{markdown_table(flat, [flat.values()])}"


def _generated(pred: Prediction | None) -> str | None:
    return clean_answer(pred.text) if answered(pred) else None


class OpenQATask(QATask):
    """Generated answers scored by exact match after the VQA normalisation: LAVIS' GQA task, which its
    InstructBLIP configs also use for the video QA sets."""

    OPTIONS = dict(QA_DECODING)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        hits = []
        for item in self.items:
            text = _generated(predictions.get(item.id))
            hits.append(text is not None and exact_match(text, item.answer))
        return {**self.counts(predictions), "accuracy": percent(hits)}


class VQAv2(QATask):
    """VQAv2 in its official files: `v2_OpenEnded_mscoco_<split>_questions.json` and
    `v2_mscoco_<split>_annotations.json` (options `questions`, `annotations` to name others), images
    `<split>/COCO_<split>_<12-digit id>.jpg` under option `images`. Scored with the official VQA accuracy
    (`vqa_accuracy`), overall and per answer type; `--official-scoring` reproduces the official script's
    normalisation to the letter. Test-dev has no public annotations (it is scored by the EvalAI server), so
    only splits with annotations (val2014 by default) can be scored here."""

    name = "vqav2"
    column = "VQAv2"
    # questions / annotations "": the official names for `split`
    OPTIONS = {**QA_DECODING, "split": "val2014", "questions": "", "annotations": "", "images": "images"}

    def load(self) -> list[QAItem]:
        split = self.options["split"]
        self.options["questions"] = self.options["questions"] or f"v2_OpenEnded_mscoco_{split}_questions.json"
        self.options["annotations"] = self.options["annotations"] or f"v2_mscoco_{split}_annotations.json"
        questions, where = read_json(self.path("questions")), str(self.path("questions"))
        annotations = {a["question_id"]: a for a in read_json(self.path("annotations"))["annotations"]}
        root, items = self.folder("images") / split, []
        for q in questions["questions"]:
            need(q, ("question_id", "image_id", "question"), where)
            ann = annotations.get(q["question_id"])
            if ann is None:
                raise ValueError(f"{self.path('annotations')}: no annotation for question {q['question_id']}")
            image = root / f"COCO_{split}_{q['image_id']:012d}.jpg"
            text = f"{IMAGE_MARK} {QA_PROMPT.format(q['question'])}"
            answers = [a["answer"] for a in ann["answers"]]
            items.append(
                QAItem(str(q["question_id"]), [str(image)], text, answers, kind=ann.get("answer_type"))
            )
        return items

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        by_type: dict[str, list[float]] = {}
        every = []
        for item in self.items:
            text = _generated(predictions.get(item.id))
            acc = 0.0 if text is None else vqa_accuracy(text, item.answer, official=self.official_scoring)
            every.append(acc)
            by_type.setdefault(item.kind or "all", []).append(acc)
        per_type = {kind: percent(accs) for kind, accs in sorted(by_type.items())}
        return {**self.counts(predictions), "accuracy": percent(every), "per_answer_type": per_type}

    def table(self, scores: dict[str, Any]) -> str:
        types = scores["per_answer_type"]
        return (
            markdown_table(
                ["Model", "VQAv2 accuracy", *types], [["this run", scores["accuracy"], *types.values()]]
            )
            + f"\n{scores['answered']} of {scores['questions']} questions answered.\n"
        )


class GQA(OpenQATask):
    """GQA test-dev balanced (12,578 questions). Reads the official `testdev_balanced_questions.json` (a dict
    question id -> {imageId, question, answer, ...}, images `<imageId>.jpg`) or the list LAVIS and
    MiniGPT-v2 publish under the same name (records {image, question, answer, question_id}); images under
    option `images`."""

    name = "gqa"
    column = "GQA"
    PAPER = {"InstructBLIP": 47.9, "Morph-Tokens": 56.8}
    OPTIONS = {**QA_DECODING, "file": "testdev_balanced_questions.json", "images": "images"}

    def load(self) -> list[QAItem]:
        questions, where, root = read_json(self.path("file")), str(self.path("file")), self.folder("images")
        if isinstance(questions, dict):
            rows = [(qid, f"{q.get('imageId')}.jpg", q) for qid, q in questions.items()]
            keys = ("imageId", "question", "answer")
        else:
            rows = [(q.get("question_id", n), q.get("image"), q) for n, q in enumerate(questions)]
            keys = ("image", "question", "answer")
        items = []
        for qid, image, q in rows:
            need(q, keys, where)
            text = f"{IMAGE_MARK} {QA_PROMPT.format(q['question'])}"
            items.append(QAItem(str(qid), [str(root / image)], text, q["answer"]))
        return items


class VSR(QATask):
    """VSR zero-shot split, test (`test.jsonl` as published: {image, caption, label}, label 1 = true; images
    under option `images`). InstructBLIP ranks the verbalisers: the statement is judged true when
    max(LL "yes", LL "true") > max(LL "no", LL "false") (summed log-likelihoods; taking the max of the two
    verbalisers is our choice where the sources leave max or sum open; a tie judges it false). The prompt is
    MiniGPT-v2's VSR question without its task tag. Predictions without log-likelihoods score by their text
    (yes/true or no/false)."""

    name = "vsr"
    column = "VSR"
    PAPER = {"InstructBLIP": 65.6, "Morph-Tokens": 69.8}
    OPTIONS = {"file": "test.jsonl", "images": "images"}
    CHOICES = ("yes", "true", "no", "false")

    def load(self) -> list[QAItem]:
        rows, where, root = read_jsonl(self.path("file")), str(self.path("file")), self.folder("images")
        items = []
        for n, row in enumerate(rows):
            need(row, ("image", "caption", "label"), where)
            text = f"{IMAGE_MARK} Based on the image, is this statement true or false? {row['caption']}"
            items.append(
                QAItem(str(n), [str(root / row["image"])], text, int(row["label"]), list(self.CHOICES))
            )
        return items

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        hits = []
        for item in self.items:
            pred = predictions.get(item.id)
            lps = choice_logprobs(pred, len(self.CHOICES))
            if lps is not None:
                judged = int(max(lps[:2]) > max(lps[2:]))
            else:
                text = normalise_answer(_generated(pred) or "")
                judged = 1 if text in ("yes", "true") else 0 if text in ("no", "false") else None
            hits.append(judged == item.answer)
        return {**self.counts(predictions), "accuracy": percent(hits)}


class IconQA(QATask):
    """IconQA multi-text-choice ("choose_txt"), scored by accuracy of the candidate with the highest summed
    log-likelihood (LAVIS' ranking, not length-normalised). Two published layouts: the original release
    (a folder holding `problems.json`, `pid_splits.json` and `iconqa/<split>/choose_txt/<pid>/image.png`;
    option `split`, default test, the split the protocol names) and MiniGPT-v2's (option `file`, default
    `choose_text_val.json`: [{image_id, question, choices, answer}], images
    `<images>/<image_id>/image.png`). The original layout is used when `problems.json` is present. The
    prompt is the QA prompt without the choices listed (neither InstructBLIP's nor MiniGPT-v2's lists them).
    Predictions without log-likelihoods score by matching their text to a choice."""

    name = "iconqa"
    column = "IconQA"
    PAPER = {"InstructBLIP": 51.2, "Morph-Tokens": 47.6}
    OPTIONS = {"split": "test", "file": "choose_text_val.json", "images": "iconvqa_images"}

    def load(self) -> list[QAItem]:
        if (self.data / "problems.json").is_file():
            return self._original()
        rows, where, root = read_json(self.path("file")), str(self.path("file")), self.folder("images")
        for row in rows:
            need(row, ("image_id", "question", "choices", "answer"), where)
        return [self._item(str(r["image_id"]), root / str(r["image_id"]) / "image.png", r) for r in rows]

    def _original(self) -> list[QAItem]:
        problems, split = read_json(self.data / "problems.json"), self.options["split"]
        key = f"choose_txt_{split}"
        pids = read_json(self.data / "pid_splits.json").get(key)
        if pids is None:
            raise ValueError(f"{self.data / 'pid_splits.json'}: no {key} (set --option split=train|val|test)")
        items = []
        for pid in pids:
            p = problems[pid]
            need(p, ("question", "choices", "answer"), f"{self.data / 'problems.json'} [{pid}]")
            image = self.data / "iconqa" / p.get("split", split) / "choose_txt" / pid / "image.png"
            items.append(self._item(pid, image, p))
        return items

    @staticmethod
    def _item(id: str, image: Path, record: dict[str, Any]) -> QAItem:
        text = f"{IMAGE_MARK} {QA_PROMPT.format(record['question'])}"
        return QAItem(id, [str(image)], text, int(record["answer"]), [str(c) for c in record["choices"]])

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        hits = []
        for item in self.items:
            pred = predictions.get(item.id)
            lps = choice_logprobs(pred, len(item.choices))
            if lps is not None:
                chosen = max(range(len(lps)), key=lps.__getitem__)
            else:
                text = normalise_answer(_generated(pred) or "")
                chosen = next((k for k, c in enumerate(item.choices) if normalise_answer(c) == text), None)
            hits.append(chosen == item.answer)
        return {**self.counts(predictions), "accuracy": percent(hits)}


class HatefulMemes(QATask):
    """HatefulMemes, scored by ROC-AUC as InstructBLIP reports it (and accuracy). Reads the published jsonl
    (option `file`, default `dev_seen.jsonl`, the labelled 500-meme dev set; which split InstructBLIP used
    is not known) of {id, img, label, text}, `img` relative to option `images` (default: the data folder,
    as published). Following OpenFlamingo's reference: "no" and "yes" are ranked by their mean per-token
    log-prob, p(yes) is the softmax over the two, and ROC-AUC = sklearn's `roc_auc_score(labels, p(yes))`;
    the prompt is OpenFlamingo's in this model's chat template. A missing or failed prediction counts as
    confidently wrong (p(yes) = 1 - label); a prediction without log-probs gives p(yes) 1 for "yes", 0
    otherwise, so its AUC is the balanced accuracy."""

    name = "hateful-memes"
    column = "HM"
    metric, label = "roc_auc", "ROC-AUC"
    PAPER = {"InstructBLIP": 54.1, "Morph-Tokens": 62.0}
    OPTIONS = {"file": "dev_seen.jsonl", "images": ""}
    CHOICES = ("no", "yes")

    def load(self) -> list[QAItem]:
        rows, where, root = read_jsonl(self.path("file")), str(self.path("file")), self.folder("images")
        items = []
        for row in rows:
            need(row, ("id", "img", "label", "text"), where)
            text = f"{IMAGE_MARK} This is an image with: '{row['text']}' written on it. Is it hateful?"
            items.append(
                QAItem(str(row["id"]), [str(root / row["img"])], text, int(row["label"]), list(self.CHOICES))
            )
        return items

    def p_yes(self, item: QAItem, pred: Prediction | None) -> float:
        if not answered(pred):
            return float(1 - item.answer)
        lps = choice_logprobs(pred, len(self.CHOICES), per_token=True)
        if lps is None:
            return float(normalise_answer(_generated(pred) or "") == "yes")
        return softmax(lps)[1]

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        from sklearn.metrics import roc_auc_score

        labels = [item.answer for item in self.items]
        p_yes = [self.p_yes(item, predictions.get(item.id)) for item in self.items]
        # ROC-AUC needs both classes among the scored items.
        auc = 100 * float(roc_auc_score(labels, p_yes)) if len(set(labels)) == 2 else None
        hits = [(p > 0.5) == bool(label) for p, label in zip(p_yes, labels, strict=True)]
        return {**self.counts(predictions), "roc_auc": auc, "accuracy": percent(hits)}
