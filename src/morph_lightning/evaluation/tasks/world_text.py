"""The world's text-answer tasks (caption, vqa, multi_image) as an evaluation task, scored exactly.

Reads `<world>/instruct/<split>.jsonl` as the world writer wrote it. Captions are scored by what they
say about the recorded scene (`caption_scores`), answers by exact match; each metric has its trivial
baseline beside it (another record's caption; the majority training answer of the same task).
`text_metrics` is also what the demo's `evaluate_world` scores its text tasks with.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from morph_lightning.data_modules.world.writer import scene_from_json
from morph_lightning.evaluation.task import Prediction, Request, Task, markdown_table
from morph_lightning.evaluation.world_metrics import caption_scores, majority_answer_baseline, vqa_exact_match

TEXT_TASKS = ("caption", "vqa", "multi_image")


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


def text_metrics(
    task: str,
    texts: list[str],
    records: list[dict[str, Any]],
    captions: list[str],
    train_answers: list[str],
    rng: random.Random,
) -> dict[str, float]:
    """ "model/..." and "baseline/..." metrics of `texts`, the answers to `records` (the jsonl lines).

    caption: `caption_scores` against each record's scene; baseline: another record's caption (fluent,
    in the world's words, about a different image) drawn from `captions` with `rng`. Other tasks: exact
    match; baseline: the majority of `train_answers` (the evaluated answers when there are none)."""
    answers = [r["output_text"] for r in records]
    if task == "caption":
        rows = []
        for text, answer, record in zip(texts, answers, records, strict=True):
            scene = scene_from_json(record["scene_in"])
            others = [c for c in captions if c != answer]
            other = rng.choice(others) if others else ""
            model = {f"model/{k}": v for k, v in caption_scores(text, scene).items()}
            rows.append(model | {f"baseline/{k}": v for k, v in caption_scores(other, scene).items()})
        return _mean(rows)
    return {
        "model/exact_match": vqa_exact_match(texts, answers),
        "baseline/exact_match": majority_answer_baseline(train_answers or answers, answers),
    }


def train_answers(path: Path) -> dict[str, list[str]]:
    """The text answers of a jsonl split, by task (what the majority baseline answers with)."""
    answers: dict[str, list[str]] = defaultdict(list)
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip() and (meta := json.loads(line)).get("output_text") is not None:
                    answers[meta["task"]].append(meta["output_text"])
    return answers


class WorldText(Task):
    """`--data` is the world's folder (data/world); options: `split` (val), `seed` (the baselines'
    draws), `max_new_tokens` (32). Generation is greedy, as in the demo's report."""

    name = "world-text"

    def __init__(
        self,
        data: str | Path,
        limit: int | None = None,
        official_scoring: bool = False,
        split: str = "val",
        seed: int | str = 0,
        max_new_tokens: int | str = 32,
    ) -> None:
        super().__init__(data, limit, official_scoring)
        self.path = self.data / "instruct" / f"{split}.jsonl"
        if not self.path.exists():
            raise FileNotFoundError(f"world-text: no {self.path} (write the world with `make demo`)")
        self.seed, self.max_new_tokens = int(seed), int(max_new_tokens)
        self.records: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.captions: list[str] = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip() or (record := json.loads(line))["task"] not in TEXT_TASKS:
                    continue
                if record["task"] == "caption":
                    self.captions.append(record["output_text"])
                if limit is None or len(self.records[record["task"]]) < limit:
                    self.records[record["task"]].append(record)

    def requests(self) -> list[Request]:
        folder = self.path.parent
        return [
            Request(
                r["id"],
                r["input_text"],
                [os.path.join(folder, p) for p in r["input_img"]],
                max_new_tokens=self.max_new_tokens,
            )
            for task in TEXT_TASKS
            for r in self.records[task]
        ]

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        answers = train_answers(self.path.parent / "train.jsonl")
        rng = random.Random(self.seed)
        scores: dict[str, Any] = {}
        for task in TEXT_TASKS:
            records = self.records[task]
            if records:
                # an item without a prediction is scored as an empty answer
                texts = [predictions[r["id"]].text if r["id"] in predictions else "" for r in records]
                scores[task] = {"n": len(records)} | text_metrics(
                    task, texts, records, self.captions, answers[task], rng
                )
        return scores

    def table(self, scores: dict[str, Any]) -> str:
        rows = []
        for task, metrics in scores.items():
            for key in metrics:
                if key.startswith("model/"):
                    name = key.removeprefix("model/")
                    rows.append([task, name, metrics["n"], metrics[key], metrics.get(f"baseline/{name}")])
        return markdown_table(["task", "metric", "n", "model", "baseline"], rows, digits=3)
