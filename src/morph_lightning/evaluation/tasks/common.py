"""What the captioning and QA benchmarks share: options with typed defaults, reading their files as
published, building requests in the chat template, and reading ranked answers back."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from morph_lightning.evaluation.task import USER_TEMPLATE, ImageSource, Prediction, Request, Task

DECODING = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty")
STOPS = ("###", "</s>")  # the released model's end string, and the LM's end token should it be spelled out
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def decoding(
    num_beams: int, max_new_tokens: int, min_new_tokens: int, length_penalty: float
) -> dict[str, Any]:
    """A task's default decoding settings, as `OPTIONS` entries."""
    return {
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "length_penalty": float(length_penalty),
    }


def _convert(where: str, value: Any, default: Any) -> Any:
    """`value` (a string from the command line, or already typed) as the type of `default`."""
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in _TRUE | _FALSE:
                raise ValueError(value)
            return value.lower() in _TRUE
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{where}: expected {type(default).__name__}, got {value!r}") from None


class BenchmarkTask(Task):
    """A task whose options are declared in `OPTIONS` (name -> default). Values given as strings (the CLI's
    `--option KEY=VALUE`) are converted to the default's type; unknown names are refused."""

    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, data: str | Path, limit: int | None = None, official_scoring: bool = False, **options: Any
    ) -> None:
        unknown = {k: v for k, v in options.items() if k not in self.OPTIONS}
        super().__init__(data, limit, official_scoring, **unknown)  # refuses unknown options
        self.options = {
            k: _convert(f"{self.name} option {k}", options.get(k, default), default)
            for k, default in self.OPTIONS.items()
        }

    def path(self, option: str) -> Path:
        """The file named by option `option`, relative to the data folder; it must exist."""
        path = self.data / self.options[option]
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: no {path} (set it with --option {option}=FILE)")
        return path

    def folder(self, option: str) -> Path:
        """The folder named by option `option` under the data folder, or the data folder itself when it
        has no such folder (images unpacked next to the annotation file)."""
        folder = self.data / self.options[option]
        return folder if folder.is_dir() else self.data

    def check_image(self, path: Path, option: str = "images") -> None:
        """Stop early, naming the option to fix, when the first item's image is not where it should be."""
        if not path.exists():
            raise FileNotFoundError(
                f"{self.name}: no image {path} (set the image folder with --option {option}=DIR)"
            )

    def head(self, items: list) -> list:
        return items if self.limit is None else items[: self.limit]

    def generate(self, id: str, text: str, images: Sequence[ImageSource]) -> Request:
        """Generate the answer to the user's message `text` (with one image mark per image) with the task's
        decoding options."""
        return Request(id, USER_TEMPLATE.format(text), list(images), **{k: self.options[k] for k in DECODING})

    def rank(self, id: str, text: str, images: Sequence[ImageSource], choices: Sequence[str]) -> Request:
        """Rank `choices` as answers to the user's message `text` by their log-likelihood."""
        return Request(id, USER_TEMPLATE.format(text), list(images), choices=list(choices))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON: {err}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON: {err}") from None
    return rows


def need(record: dict[str, Any], keys: Sequence[str], where: str) -> None:
    """One line naming the record and the field, rather than a KeyError deep in a task."""
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: a record needs {', '.join(missing)}; got fields {sorted(record)}")


def choice_logprobs(pred: Prediction | None, n: int, per_token: bool = False) -> list[float] | None:
    """The log-likelihood of each of the `n` choices of a ranked prediction, summed over tokens or (with
    `per_token`) their mean; None when the prediction carries none (missing, failed, or made elsewhere)."""
    if pred is None or pred.error is not None or pred.choice_logprobs is None:
        return None
    if len(pred.choice_logprobs) != n:
        raise ValueError(
            f"prediction {pred.id}: {len(pred.choice_logprobs)} choice log-probs for {n} choices"
        )
    if not per_token:
        return list(pred.choice_logprobs)
    return [lp / max(t, 1) for lp, t in zip(pred.choice_logprobs, pred.choice_tokens or [1] * n, strict=True)]


def clean_answer(text: str) -> str:
    """A generated answer as scored: cut at a stop string, its first non-empty line, stripped."""
    for stop in STOPS:
        text = text.split(stop)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def answered(pred: Prediction | None) -> bool:
    return pred is not None and pred.error is None


def percent(hits: Sequence[float]) -> float | None:
    """The mean of per-item scores in [0, 1], x100 as the papers print it; None for no items."""
    return 100.0 * sum(hits) / len(hits) if hits else None
