"""Image editing (the paper's Table 5, and Table 8's L1 ablations): MagicBrush, EVR and MA5k, as the paper
evaluates them "following MGIE", and InstructPix2Pix's own test cut.

Every item is one edit: the source image, an instruction, the ground-truth edited image. The prompt is the
editing template the model was trained with (Appendix C.1 (2), `templates.EDIT`), the instruction stripped
and its trailing full stops dropped as the training sources drop them (the template adds one). The model
is asked for an image (the answer starts with `<img>`) and decodes greedily; the image is written as a PNG
named `<id>.png`, and `--predictions DIR` scores a folder of such images (another model's) the same way.

Scores follow MagicBrush's `evaluation/image_eval.py` (shared EVAL_PROTOCOLS.md section 6; MGIE publishes
no evaluation code), through `ImageScorer`:
- L1 and L2: the generated image resized to the ground truth's size, mean absolute / squared difference in
  [0, 1]; the tables print L1 x100 (the paper's 7.6 is 0.076).
- CVS (MagicBrush's CLIP-I): the cosine of CLIP ViT-B/32 image features, x100 (option `cvs_model`).
- DINO (option `dino_model`, a saved facebook/dino-vits16) and LPIPS (option `lpips`, AlexNet as GILL's
  scorer; the tables print it x100: MA5k's 27.9 is 0.279) when asked for.
Scores are means over the pairs whose generated image exists; the pairs left out are counted, and the
table says how many were scored (MagicBrush's scorer refuses an incomplete folder instead).

Which instruction of EVR's three, which MagicBrush setting, and the image resolutions MGIE scored at are
not published; the options below say what is chosen here.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from morph_lightning.data_modules.sources.editing import IP2P_SPLITS
from morph_lightning.data_modules.sources.templates import EDIT
from morph_lightning.data_modules.transforms import load_image
from morph_lightning.evaluation.image_metrics import embedder_name
from morph_lightning.evaluation.runner import IMAGES, evaluate, image_file
from morph_lightning.evaluation.task import (
    ImageSource,
    Prediction,
    Request,
    drawn_image,
    markdown_table,
    read_predictions_jsonl,
)
from morph_lightning.evaluation.tasks.common import BenchmarkTask, need, read_json

# Table 5 (x100 as printed): EVR L1, CVS; MA5K L1, LPIPS; MagicBrush L1, CVS.
TABLE5: dict[str, tuple[float, ...]] = {
    "InsPix2Pix": (18.9, 81.4, 17.6, 35.9, 10.1, 85.2),
    "LGIE": (15.9, 82.0, 14.4, 32.7, 8.4, 88.9),
    "MGIE": (16.3, 81.7, 13.3, 29.8, 8.2, 91.1),
    "GILL": (31.8, 65.0, 27.4, 44.3, 28.3, 75.2),
    "Emu": (30.7, 69.2, 27.2, 43.2, 27.9, 78.5),
    "Emu2-Gen": (22.8, 80.3, 20.5, 28.4, 19.9, 85.7),
    "SEED-LLaMA": (28.4, 72.3, 24.6, 39.0, 24.5, 80.9),
    "LaVIT": (26.8, 73.8, 25.1, 36.9, 25.3, 81.1),
    "Morph-Tokens": (15.3, 82.6, 14.6, 27.9, 7.6, 87.9),
}
# Table 8 (ablations, L1 x100): EVR, MA5K, MagicBrush.
TABLE8: dict[str, tuple[float, float, float]] = {
    "Morph-token": (15.3, 14.6, 7.6),
    "1 detail-detail": (34.1, 31.2, 32.5),
    "2 abstr-abstr (SD)": (27.7, 26.6, 27.8),
    "3 abstr-abstr (VQ)": (25.2, 24.4, 23.9),
    "4 w/o decoder": (31.7, 28.9, 30.3),
    "5 w/o deconfound": (18.5, 18.2, 12.2),
    "6 continuous": (16.1, 15.8, 9.7),
}
# metric -> (table heading, factor from the stored score to the table's number)
HEADINGS = {
    "l1": ("L1", 100.0),
    "l2": ("L2", 100.0),
    "cvs": ("CVS", 1.0),  # ImageScorer's cosines are x100 already
    "dino": ("DINO", 1.0),
    "lpips": ("LPIPS", 100.0),
}
LOWER_IS_BETTER = {"l1", "l2", "lpips"}


def edit_prompt(instruction: str) -> str:
    """The training template around an instruction, as `data_modules/sources/editing.py` renders it."""
    return EDIT.format(instruction=instruction.strip().rstrip("."))


def _image(src: ImageSource) -> Image.Image:
    """An RGB image from a path or a reader of encoded bytes (a Hugging Face dataset cell)."""
    return load_image(src if isinstance(src, str) else src())


@dataclass
class EditItem:
    id: str
    source: ImageSource  # the image to edit (ignored when `previous` is set)
    target: ImageSource  # the ground-truth edited image
    instruction: str
    previous: str | None = None  # final-turn chains: edit the model's own answer to this request instead


@dataclass(frozen=True)
class PreviousAnswer:
    """The image the model drew for request `id` in this run, read when the request is loaded. Its string
    (which the request's fingerprint holds) names the answered request, not where the run lives."""

    folder: Path
    id: str

    def __call__(self) -> str:
        path = image_file(self.folder, self.id)
        if not path.exists():  # never store an "unreadable image" answer for a chain that broke
            raise FileNotFoundError(
                f"{path}: the answer to {self.id}, which the next turn edits, is gone (was the run set "
                "aside?); run again"
            )
        return str(path)

    def __str__(self) -> str:
        return f"answer:{self.id}"


class EditTask(BenchmarkTask):
    """One editing set; subclasses read their files (`load`) and name their Table 5 columns."""

    column: ClassVar[str]  # the set's name in the tables
    COLUMNS: ClassVar[tuple[str, ...]] = ("l1", "cvs")  # the metrics Table 5 reports for the set
    PAPER_AT: ClassVar[int | None] = None  # where the set's columns start in TABLE5 rows
    ABLATION_AT: ClassVar[int | None] = None  # the set's column in TABLE8 rows
    OPTIONS = {
        "images": "images",
        "cvs_model": "openai/clip-vit-base-patch32",  # "": skip; a stage-0 tower file: the world's
        "dino_model": "",
        "lpips": False,
        "device": "cpu",
        "batch_size": 32,
    }

    def __init__(self, data: str | Path, limit: int | None = None, official_scoring: bool = False, **options):
        super().__init__(data, limit, official_scoring, **options)
        self.items = self.load()
        if not self.items:
            raise ValueError(f"{self.name}: no edits in {self.data}")
        ids = [item.id for item in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: item ids are not unique in {self.data}")
        if isinstance(self.items[0].source, str):
            self.check_image(Path(self.items[0].source))

    def load(self) -> list[EditItem]:
        raise NotImplementedError

    def request(self, item: EditItem, source: ImageSource | None = None) -> Request:
        image = item.source if source is None else source
        return Request(item.id, edit_prompt(item.instruction), [image], output="image")

    def requests(self) -> list[Request]:
        return [self.request(item) for item in self.items]

    def scored(self) -> list[tuple[str, ImageSource]]:
        """(request id, ground truth) of the pairs the scores average over."""
        return [(item.id, item.target) for item in self.items]

    def candidates(self, folder: Path, id: str) -> list[Path]:
        """Where a folder of another model's images may hold the answer to `id`."""
        return [image_file(folder, id)]

    def read_predictions(self, path: Path) -> dict[str, Prediction]:
        """The runner's jsonl, or a folder of generated images named `<id>.png`."""
        if not Path(path).is_dir():
            return read_predictions_jsonl(path)
        found = {}
        for id, _ in self.scored():
            hit = next((f for f in self.candidates(Path(path), id) if f.exists()), None)
            if hit is not None:
                found[id] = Prediction(id, image=str(hit))
        return found

    def metrics(self) -> tuple[str, ...]:
        names = ["l1", "l2"] + (["cvs"] if self.options["cvs_model"] else [])
        names += ["dino"] if self.options["dino_model"] else []
        names += ["lpips"] if self.options["lpips"] else []
        return tuple(names)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        from morph_lightning.evaluation.image_metrics import ImageScorer  # loads its models only to score

        drawn = [(drawn_image(predictions.get(id)), target) for id, target in self.scored()]
        pairs = [(image, target) for image, target in drawn if image is not None]
        metrics = self.metrics()
        scorer = ImageScorer(
            cvs_model=self.options["cvs_model"],
            dino_model=self.options["dino_model"] or None,
            device=self.options["device"],
            batch_size=self.options["batch_size"],
        )
        means = scorer.mean_over_files(pairs, metrics, _image)
        total = len(self.scored())
        return {
            **means,
            "pairs": total,
            "scored": len(pairs),
            "missing": total - len(pairs),
            "cvs_model": self.options["cvs_model"] or None,
            "dino_model": self.options["dino_model"] or None,
            "scale": "l1, l2, lpips raw (in [0, 1]); cvs, dino cosine x100",
        }

    # --- the table ---

    @staticmethod
    def _shown(scores: dict[str, Any], metric: str) -> float | None:
        value = scores.get(metric)
        return None if value is None else value * HEADINGS[metric][1]

    def coverage(self, scores: dict[str, Any]) -> str:
        return f"{scores['scored']} of {scores['pairs']} edits scored"

    def table(self, scores: dict[str, Any]) -> str:
        header = ["Model"] + [
            f"{self.column} {HEADINGS[m][0]} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in self.COLUMNS
        ]
        rows = []
        if self.PAPER_AT is not None:
            cut = slice(self.PAPER_AT, self.PAPER_AT + len(self.COLUMNS))
            rows = [[f"{model} (paper)", *values[cut]] for model, values in TABLE5.items()]
        rows.append(["this run", *(self._shown(scores, m) for m in self.COLUMNS)])
        text = markdown_table(header, rows)
        cvs = embedder_name(scores["cvs_model"], "cvs_model")
        text += (
            f"\n{self.coverage(scores)}. L1 and LPIPS x100, CVS ({cvs}) and DINO "
            "cosine x100, as Table 5 prints them.\n"
        )
        extra = [m for m in self.metrics() if m not in self.COLUMNS]
        if extra:
            shown = {m: self._shown(scores, m) for m in extra}
            parts = [f"{HEADINGS[m][0]} {'-' if v is None else f'{v:.1f}'}" for m, v in shown.items()]
            text += "Also (same scales): " + ", ".join(parts) + ".\n"
        if self.ABLATION_AT is not None:
            rows = [[f"{model} (paper)", values[self.ABLATION_AT]] for model, values in TABLE8.items()]
            rows.append(["this run", self._shown(scores, "l1")])
            text += "\nTable 8 (ablations):\n\n" + markdown_table(["Model", f"{self.column} L1 ↓"], rows)
        return text


def _unique(ids: list[str]) -> list[str]:
    """`ids` with the second and later copies of an id suffixed `-2`, `-3`, ... in order."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for id in ids:
        seen[id] += 1
        out.append(id if seen[id] == 1 else f"{id}-{seen[id]}")
    return out


# ---------------------------------------------------------------- MagicBrush


@dataclass
class Session:
    id: str  # MagicBrush's img_id
    turns: list[
        tuple[ImageSource, ImageSource, str]
    ]  # (ground-truth input, ground-truth output, instruction)


def _digits(name: str) -> int:
    return int("".join(filter(str.isdigit, name)) or 0)


class MagicBrushEdit(EditTask):
    """MagicBrush (Zhang et al. 2023), in either published form:

    - the test release (a zip; the Hub repo holds only train and dev): `edit_sessions.json` maps each
      img_id to its turns, each `{"input", "mask", "output", "instruction"}`, with the images under
      `images/<img_id>/` (`139306-input.png`, `139306-output1.png`, ...). The file, the "input" and
      "instruction" keys and the folders are what MagicBrush's own `edit_cli_single_multi_turn.py` reads
      (OSU-NLP-Group/MagicBrush); the "output" key is what third-party scripts read. A turn without "output"
      takes the t-th of its folder's "output" images in the digit order `evaluation/image_eval.py` uses.
    - the Hub dataset (osunlp/MagicBrush: parquet files or a `save_to_disk` folder; columns img_id,
      turn_index, source_img, mask_img, instruction, target_img; a turn's source_img is the previous turn's
      target): option `split`, "dev" by default (its splits are train and dev).

    Request ids are MagicBrush's output names (`evaluation/README.md`): `<img_id>_1` for a session's first
    turn, `<img_id>_inde_<t>` for turn t edited from its ground-truth input, `<img_id>_iter_<t>` for turn t
    edited from the model's own turn t-1. Option `setting`:
    - "all-turn" (default): every turn from its ground-truth input (`_1`, `_inde_t`), each against its
      ground-truth output.
    - "final-turn": each session's last output against its last ground truth, every turn after the first
      editing the model's previous answer (`_1`, `_iter_t`). A turn can be asked only once the turn before
      is answered, so `evaluate_final_turn` (what the CLI runs for this setting) takes one runner pass per
      turn; a single `runner.evaluate` pass asks first turns only and scores the single-turn sessions (the
      rest are counted as missing).
    `limit` counts sessions. A folder of predictions may be flat (`<id>.png`) or MagicBrush's own layout
    (`<img_id>/<id>.png`)."""

    name = "magicbrush-edit"
    column = "MagicBrush"
    PAPER_AT, ABLATION_AT = 4, 2
    SETTINGS = ("all-turn", "final-turn")
    OPTIONS = {
        **EditTask.OPTIONS,
        "file": "edit_sessions.json",
        "split": "dev",
        "setting": "all-turn",
        "cache_dir": "",  # where `datasets` converts the Hub's parquet files (default: its own cache)
    }

    def __init__(self, data: str | Path, limit: int | None = None, official_scoring: bool = False, **options):
        self.answers: Path | None = None  # final-turn: the folder this run's images are written to
        self.stage = 1  # final-turn: the last turn asked for
        super().__init__(data, limit, official_scoring, **options)

    def load(self) -> list[EditItem]:
        if self.options["setting"] not in self.SETTINGS:
            raise ValueError(
                f"{self.name}: setting must be one of {self.SETTINGS}, got {self.options['setting']!r}"
            )
        file = self.data / self.options["file"]
        self.sessions = self.head(self._folder_sessions(file) if file.is_file() else self._hub_sessions())
        final = self.options["setting"] == "final-turn"
        items: list[EditItem] = []
        self.last: list[EditItem] = []  # each session's last turn, which final-turn scores
        for s in self.sessions:
            for t, (source, target, instruction) in enumerate(s.turns, start=1):
                if t == 1:
                    items.append(EditItem(f"{s.id}_1", source, target, instruction))
                elif final:
                    prev = items[-1].id
                    items.append(EditItem(f"{s.id}_iter_{t}", source, target, instruction, previous=prev))
                else:
                    items.append(EditItem(f"{s.id}_inde_{t}", source, target, instruction))
            self.last.append(items[-1])
        return items

    def _folder_sessions(self, file: Path) -> list[Session]:
        sessions = read_json(file)
        if not isinstance(sessions, dict):
            raise ValueError(f"{file}: needs {{img_id: [turns]}}, got {type(sessions).__name__}")
        images = self.folder("images")
        out = []
        for img_id, turns in sessions.items():
            where = f"{file}[{img_id!r}]"
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"{where}: needs a non-empty list of turns, got {turns!r:.120}")
            folder = images / str(img_id)
            outputs: list[str] | None = None
            session = Session(str(img_id), [])
            for t, turn in enumerate(turns, start=1):
                need(turn, ("input", "instruction"), f"{where} turn {t}")
                output = turn.get("output")
                if output is None:  # image_eval.py's pairing: the folder's outputs in digit order
                    if outputs is None:
                        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
                        outputs = sorted(
                            (
                                n
                                for n in names
                                if "output" in n and "mask" not in n and n.endswith((".png", ".jpg"))
                            ),
                            key=_digits,
                        )
                    if len(outputs) < t:
                        raise ValueError(f"{where} turn {t}: no 'output' and no output image {t} in {folder}")
                    output = outputs[t - 1]
                session.turns.append((str(folder / turn["input"]), str(folder / output), turn["instruction"]))
            out.append(session)
        return out

    def _hub_sessions(self) -> list[Session]:
        from morph_lightning.data_modules.sources.hf import image_column, load_rows, plain_rows

        path, split = str(self.data), self.options["split"]
        columns = ("img_id", "turn_index", "source_img", "instruction", "target_img")
        rows = load_rows(path, split, self.options["cache_dir"] or None, columns=columns)
        sources, targets = image_column(rows, "source_img", path), image_column(rows, "target_img", path)
        grouped: dict[str, list[tuple[int, int]]] = defaultdict(list)  # img_id -> (turn_index, row)
        plain = plain_rows(rows, ["img_id", "turn_index", "instruction"])
        for i, row in enumerate(plain):
            grouped[str(row["img_id"])].append((int(row["turn_index"]), i))
        out = []
        for img_id, turns in grouped.items():  # sessions in the order they first appear
            turns.sort()
            if len({t for t, _ in turns}) != len(turns):
                raise ValueError(
                    f"{path} ({split}): img_id {img_id} repeats a turn_index: {[t for t, _ in turns]}"
                )
            out.append(Session(img_id, [(sources[i], targets[i], plain[i]["instruction"]) for _, i in turns]))
        return out

    def requests(self) -> list[Request]:
        """All-turn: every turn. Final-turn: first turns, then turn t only for t <= `stage` and when the
        model's answer to turn t-1 is in `answers` (which `evaluate_final_turn` sets)."""
        if self.options["setting"] == "all-turn":
            return super().requests()
        out = []
        for item in self.items:
            if item.previous is None:
                out.append(self.request(item))
                continue
            if self.answers is None or _turn(item.id) > self.stage:
                continue
            if image_file(self.answers, item.previous).exists():
                out.append(self.request(item, PreviousAnswer(self.answers, item.previous)))
        return out

    def scored(self) -> list[tuple[str, ImageSource]]:
        if self.options["setting"] == "all-turn":
            return super().scored()
        return [(item.id, item.target) for item in self.last]

    def candidates(self, folder: Path, id: str) -> list[Path]:
        img_id = re.sub(r"_(1|inde_\d+|iter_\d+)$", "", id)
        nested = [folder / img_id / f"{id}{ext}" for ext in (".png", ".jpg")]
        return [*super().candidates(folder, id), *nested]

    def score(self, predictions: dict[str, Prediction]) -> dict[str, Any]:
        turns = [len(s.turns) for s in self.sessions]
        return {
            **super().score(predictions),
            "setting": self.options["setting"],
            "sessions": len(turns),
            "turns": sum(turns),
            "single_turn_sessions": turns.count(1),
        }

    def coverage(self, scores: dict[str, Any]) -> str:
        if scores["setting"] == "all-turn":
            return (
                f"All-turn: {scores['scored']} of {scores['pairs']} turns scored, each edited from its "
                f"ground-truth input ({scores['sessions']} sessions)"
            )
        chained = scores["sessions"] - scores["single_turn_sessions"]
        return (
            f"Final-turn: {scores['scored']} of {scores['pairs']} sessions scored on their last turn, each "
            f"turn editing the model's previous answer ({chained} sessions of more than one turn, "
            f"{scores['turns']} turns)"
        )


def _turn(id: str) -> int:
    return int(id.rsplit("_", 1)[1])


def evaluate_final_turn(
    task: MagicBrushEdit, model: Any, out: str | Path, model_source: str, **kwargs: Any
) -> dict[str, Any] | None:
    """MagicBrush's final-turn setting end to end: one runner pass per turn, turn t's requests editing the
    images the model drew for turn t-1 in `out` (`kwargs` go to `runner.evaluate`). The first pass asks
    first turns only, so an earlier run that the runner sets aside (another model) takes nothing a later
    turn reads. Only the last pass scores (an earlier pass's scores would be set aside as an earlier run's).
    Returns its scores. Runs on one process; a rerun resumes every turn."""
    if not isinstance(task, MagicBrushEdit) or task.options["setting"] != "final-turn":
        raise ValueError("evaluate_final_turn needs the magicbrush-edit task with setting=final-turn")
    task.answers = Path(out) / IMAGES
    longest = max(len(s.turns) for s in task.sessions)
    scores = None
    for stage in range(1, longest + 1):
        task.stage = stage
        scores = evaluate(task, model, out, model_source, score=stage == longest, **kwargs)
    return scores


# ---------------------------------------------------------------- InstructPix2Pix


class InstructPix2PixEdit(EditTask):
    """InstructPix2Pix's generated triples in their original folder (timothybrooks/instruct-pix2pix,
    `edit_dataset.py`): `seeds.json` lists `[name, [seed, ...]]`, `<name>/prompt.json` holds the "edit",
    each seed a pair `<seed>_0.jpg` (before) and `<seed>_1.jpg` (after). Option `split` is `EditDataset`'s
    cut of seeds.json (train / val / test: the first 90 %, the next 5 %, the last 5 %), "test" by default.
    `EditDataset` draws one of a name's seeds at random on each access; here each name's first seed is its
    one edit, so runs compare. Request ids are `<name>_<seed>`. Not in the paper's tables."""

    name = "ip2p-edit"
    column = "IP2P test"
    OPTIONS = {**EditTask.OPTIONS, "split": "test"}

    def load(self) -> list[EditItem]:
        split = self.options["split"]
        if split not in IP2P_SPLITS:
            raise ValueError(f"{self.name}: split must be one of {sorted(IP2P_SPLITS)}, got {split!r}")
        file = self.data / "seeds.json"
        if not file.is_file():
            raise FileNotFoundError(f"{self.name}: no {file} (the folder InstructPix2Pix's release unpacks)")
        seeds = read_json(file)
        if not isinstance(seeds, list):
            raise ValueError(f"{file}: needs a list of [name, [seeds]], got {type(seeds).__name__}")
        lo, hi = (math.floor(f * len(seeds)) for f in IP2P_SPLITS[split])
        items = []
        for k in self.head(range(lo, hi)):
            entry = seeds[k]
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list) and entry[1]):
                raise ValueError(f"{file}[{k}]: needs [name, [seeds]], got {entry!r:.120}")
            name, seed = str(entry[0]), entry[1][0]
            prompt_file = self.data / name / "prompt.json"
            edit = read_json(prompt_file).get("edit") if prompt_file.is_file() else None
            if not isinstance(edit, str) or not edit.strip():
                raise ValueError(f"{prompt_file}: needs a non-empty 'edit'")
            pair = [str(self.data / name / f"{seed}_{side}.jpg") for side in (0, 1)]
            items.append(EditItem(f"{name}_{seed}", pair[0], pair[1], edit))
        return items


# ---------------------------------------------------------------- EVR


class EVREdit(EditTask):
    """EVR (Tan et al. 2019, "Expressing Visual Relationships via Language"; airsplay/VisualRelationships):
    a split file (`dataset/adobe/test.json` there; option `file`) lists `{"img0", "img1", "sents", "uid"}`:
    the image to edit, the edited image (file names, under option `images`, else the data folder; the
    images come from the authors' Google Drive folder, whose layout could not be checked), three editing
    requests per valid/test pair, and an id. Option `sentence` picks the request (0: the first; which one
    MGIE used is not published); request ids are the uids."""

    name = "evr-edit"
    column = "EVR"
    PAPER_AT, ABLATION_AT = 0, 0
    OPTIONS = {**EditTask.OPTIONS, "file": "test.json", "sentence": 0}

    def load(self) -> list[EditItem]:
        file, images = self.path("file"), self.folder("images")
        records = read_json(file)
        if not isinstance(records, list):
            raise ValueError(f"{file}: needs a list of records, got {type(records).__name__}")
        items = []
        for k, rec in enumerate(self.head(records)):
            where = f"{file}[{k}]"
            need(rec, ("img0", "img1", "sents", "uid"), where)
            sents = rec["sents"]
            if not isinstance(sents, list) or not sents:
                raise ValueError(f"{where}: 'sents' needs a non-empty list")
            sent = sents[min(self.options["sentence"], len(sents) - 1)]
            items.append(
                EditItem(str(rec["uid"]), str(images / rec["img0"]), str(images / rec["img1"]), sent)
            )
        return items


# ---------------------------------------------------------------- MA5k


class MA5kEdit(EditTask):
    """MA5k-Req (Shi et al. 2021, "Learning by Planning: Language-Guided Global Image Editing"; the authors'
    jshi31/T2ONet calls it FiveK): the split file `annotations/test_sess_1.json` (option `file`; written by
    its `data/FiveK/FiveK.py`, train/val/test 70/10/20 % of the input images) lists `{"input", "output",
    "request", ...}`, file names under `images/` (option `images`). Request ids are `<input>-<output>` file
    stems (a repeat gets `-2`, ...). Table 5 reports L1 and LPIPS, so LPIPS is on by default. Scored at the
    images' own size: T2ONet's test loader bounds the shorter side to 600 px, and what MGIE did is not
    published."""

    name = "ma5k-edit"
    column = "MA5K"
    COLUMNS = ("l1", "lpips")
    PAPER_AT, ABLATION_AT = 2, 1
    OPTIONS = {**EditTask.OPTIONS, "file": "annotations/test_sess_1.json", "lpips": True}

    def load(self) -> list[EditItem]:
        file, images = self.path("file"), self.folder("images")
        records = read_json(file)
        if not isinstance(records, list):
            raise ValueError(f"{file}: needs a list of records, got {type(records).__name__}")
        records = self.head(records)
        for k, rec in enumerate(records):
            need(rec, ("input", "output", "request"), f"{file}[{k}]")
        ids = _unique([f"{Path(r['input']).stem}-{Path(r['output']).stem}" for r in records])
        return [
            EditItem(id, str(images / r["input"]), str(images / r["output"]), r["request"])
            for id, r in zip(ids, records, strict=True)
        ]
