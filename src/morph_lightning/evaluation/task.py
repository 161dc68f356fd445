"""What a benchmark is to the evaluation runner: requests to answer, and a scorer of the answers.

A `Task` reads a benchmark's files as published and turns every item into a `Request`: a prompt in the
model's chat template with one `<image>` mark per image, the images, and how to answer it (generate
text with the given decoding settings, or rank `choices` by their log-likelihood). The runner answers
the requests and writes one `Prediction` per line; the task scores them with the benchmark's official
protocol and lays the scores out as the paper's table does. Scoring reads only the predictions, so
another model's predictions (written in the same jsonl, or a task's own official layout) score the same.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from morph_lightning.data_modules.instruct import IMAGE_MARK

# A path, or a reader of encoded image bytes (a video frame, an image inside an archive).
ImageSource = str | Callable[[], bytes | str]
USER_TEMPLATE = "USER: {} ASSISTANT:"  # the paper's instruction format (Section 3.5); training uses it


@dataclass
class Request:
    id: str  # unique within the task; predictions are matched to items by it
    prompt: str  # the full prompt, one IMAGE_MARK per image in `images`
    images: list[ImageSource] = field(default_factory=list)
    choices: list[str] | None = None  # rank these continuations instead of generating
    max_new_tokens: int = 100  # the released model's generate() defaults: greedy, 100 new tokens
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    output: str = "text"  # "image": the answer is one generated image (text-to-image, editing)

    def __post_init__(self) -> None:
        if self.prompt.count(IMAGE_MARK) != len(self.images):
            raise ValueError(
                f"request {self.id}: {self.prompt.count(IMAGE_MARK)} {IMAGE_MARK} marks but "
                f"{len(self.images)} images"
            )
        if self.output not in ("text", "image"):
            raise ValueError(f"request {self.id}: output must be 'text' or 'image', got {self.output!r}")

    def fingerprint(self) -> str:
        """A digest of what is asked and how (prompt, images, choices, decoding): an answer stored for
        this id is this request's answer only if the digests agree (a task option may change them)."""
        what = [self.prompt, [str(src) for src in self.images], self.choices]
        what += [self.max_new_tokens, self.min_new_tokens, self.num_beams, self.length_penalty]
        if self.output != "text":  # (text requests keep the digests of runs written before images)
            what.append(self.output)
        return hashlib.sha1(json.dumps(what).encode("utf-8")).hexdigest()[:16]


@dataclass
class Prediction:
    id: str
    text: str = ""  # the generated answer (for ranked requests: the best choice)
    # ranked requests: the summed log-likelihood of each choice and its token count, in choice order
    choice_logprobs: list[float] | None = None
    choice_tokens: list[int] | None = None
    error: str | None = None  # why the item could not be answered (an unreadable image); scored as wrong
    image: str | None = None  # image requests: the generated image's file (PNG)
    request: str | None = None  # the answered request's `fingerprint` (the runner's predictions)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> Prediction:
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str | int):
            raise ValueError(f"{where}: a prediction needs an 'id' (and 'text'), got {obj!r:.120}")
        known = {
            k: obj[k]
            for k in ("text", "choice_logprobs", "choice_tokens", "error", "image", "request")
            if k in obj
        }
        return cls(id=str(obj["id"]), **known)


class Task(ABC):
    """One benchmark. Subclasses set `name` and implement `requests`, `score` and `table`."""

    name: ClassVar[str]

    def __init__(
        self, data: str | Path, limit: int | None = None, official_scoring: bool = False, **options: Any
    ) -> None:
        self.data = Path(data)
        if not self.data.exists():
            raise FileNotFoundError(f"{self.name}: no data at {self.data}")
        self.limit = limit  # score only the first `limit` items (a task may apply it per subset)
        self.official_scoring = official_scoring  # reproduce the official scripts' numbers, bugs included
        if options:
            raise ValueError(f"{self.name}: unknown options {sorted(options)}")

    @abstractmethod
    def requests(self) -> list[Request]:
        """Every item (up to `limit`), in a fixed order."""

    @abstractmethod
    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        """The scores (json-able) of the items `requests` gives, from `predictions` keyed by request id;
        an item without a prediction is scored as a wrong answer."""

    @abstractmethod
    def table(self, scores: dict[str, Any]) -> str:
        """`scores` as markdown, laid out like the paper's table."""

    def read_predictions(self, path: Path) -> dict[str, Prediction]:
        """Predictions written by the runner (jsonl); tasks with an official layout also read that."""
        return read_predictions_jsonl(path)


def drawn_image(pred: Prediction | None) -> str | None:
    """The file of the image a prediction drew, when it has one on disk (else the item is unanswered)."""
    if pred is None or pred.error is not None or not pred.image or not Path(pred.image).exists():
        return None
    return pred.image


def read_predictions_jsonl(path: Path) -> dict[str, Prediction]:
    """id -> Prediction from a jsonl file. A last line cut short (a run killed mid-write) is ignored;
    any other bad line stops with its file:line."""
    out: dict[str, Prediction] = {}
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):  # no newline after it: the write was interrupted
                break
            raise ValueError(f"{path}:{n}: not JSON: {err}") from None
        pred = Prediction.from_json(obj, f"{path}:{n}")
        out[pred.id] = pred
    return out


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[Any]], digits: int = 1) -> str:
    """A markdown table; floats with `digits` decimals (one, as the paper prints its x100 scores)."""

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
