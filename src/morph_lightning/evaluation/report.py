"""Writes `WorldResults` as `report.json` (numbers), `report.md` (tables) and PNG grids of examples.

Every file is written under a temporary name and renamed into place, so a reader (or a run that is
killed halfway) never leaves half a report.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from morph_lightning.evaluation.world_eval import Example, WorldResults

SYSTEMS = ("model", "baseline", "random", "ceiling")  # table columns, in this order when present
SYSTEM_NOTES = {
    "baseline": "the trivial baseline (another record's caption, the majority answer, another record's "
    "image for t2i, copying the input image for edits and drift); for answer_nll (the reference answer's "
    "NLL per token, lower is better), the same model given another record's images: equal to the model's "
    "when it ignores its images",
    "random": "another record's target image",
    "ceiling": "the target encoded to VQGAN codes and decoded back, scored like a prediction: the best the "
    "frozen VQGAN can draw it",
}
GRID_CELL = 96  # grids upscale every image (nearest) to at least this many pixels
GAP = 4  # white pixels between grid cells
PLACEHOLDER = (160, 160, 160)  # where an example has no image (a miss, or no input for t2i)


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def image_grid(rows: list[list[np.ndarray]], scale: int) -> np.ndarray:
    """uint8 HWC images laid out in rows, each upscaled `scale`x with nearest; cells of different sizes
    are first brought to the largest one (nearest too, so pixels stay visible as blocks)."""
    side = max(max(img.shape[:2]) for row in rows for img in row)
    cell = side * scale
    width = max(len(row) for row in rows)
    grid = np.full((len(rows) * (cell + GAP) + GAP, width * (cell + GAP) + GAP, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            big = np.asarray(Image.fromarray(img[..., :3]).resize((cell, cell), Image.Resampling.NEAREST))
            y, x = GAP + r * (cell + GAP), GAP + c * (cell + GAP)
            grid[y : y + cell, x : x + cell] = big
    return grid


def _cells(ex: Example) -> list[np.ndarray]:
    shown = [ex.input, ex.prediction, ex.target]
    side = max((img.shape[0] for img in shown if img is not None), default=16)
    return [img if img is not None else np.full((side, side, 3), PLACEHOLDER, np.uint8) for img in shown]


def _png(path: Path, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    _atomic_bytes(path, buf.getvalue())


def _cell_text(text: str, limit: int = 120) -> str:
    """Safe inside a markdown table cell: printable, no pipes or newlines, short."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text.replace("\n", " "))
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|") or " "


def _split_metrics(metrics: dict[str, float]) -> tuple[list[str], list[str]]:
    """The systems (columns) and metric names (rows) of one task, in a stable order."""
    systems = {key.split("/", 1)[0] for key in metrics}
    names: dict[str, None] = {}
    for key in metrics:
        names.setdefault(key.split("/", 1)[1], None)
    columns = [s for s in SYSTEMS if s in systems] + sorted(systems - set(SYSTEMS))
    return columns, list(names)


def _table(metrics: dict[str, float]) -> list[str]:
    columns, names = _split_metrics(metrics)
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        values = [metrics.get(f"{c}/{name}") for c in columns]
        cells = ["" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _jsonable(obj: Any) -> Any:
    return obj.item() if hasattr(obj, "item") else str(obj)  # numpy / torch scalars, paths


def write_report(results: WorldResults, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write report.json, report.md and grid_{task}.png under `out_dir`; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {
        "metrics": results.metrics,
        "counts": results.counts,
        "notes": results.notes,
        "extra": extra or {},
    }
    _atomic_bytes(out / "report.json", (json.dumps(body, indent=2, default=_jsonable) + "\n").encode())

    md = ["# World evaluation", ""]
    if results.notes:  # first, so a missing metric is not mistaken for a forgotten one
        md += ["**Notes**", "", *[f"- {note}" for note in results.notes], ""]
    md += [f"- **{s}**: {note}" for s, note in SYSTEM_NOTES.items()]
    md.append("")
    if extra:
        md += ["## Run", "", "| key | value |", "|---|---|"]
        for key, value in extra.items():
            shown = value if isinstance(value, str) else json.dumps(value, default=_jsonable)
            md.append(f"| {_cell_text(str(key))} | {_cell_text(shown, 200)} |")
        md.append("")
    for task, metrics in results.metrics.items():
        md += [f"## {task} (n = {results.counts.get(task, 0)})", "", *_table(metrics), ""]
        examples = results.examples.get(task, [])
        if any(ex.prediction is not None or ex.target is not None for ex in examples):
            rows = [_cells(ex) for ex in examples]
            side = max(img.shape[0] for row in rows for img in row)
            _png(out / f"grid_{task}.png", image_grid(rows, scale=max(1, math.ceil(GRID_CELL / side))))
            what = "one chain, a turn per row, each fed the previous prediction" if task == "drift" else ""
            md += [f"![{task}: input | prediction | target](grid_{task}.png)", ""]
            md += [f"Rows: input | prediction | target{'; ' + what if what else ''}.", ""]
        elif any(ex.input is not None for ex in examples):  # a text task: the images it was asked about
            row = [ex.input for ex in examples if ex.input is not None]
            side = max(img.shape[0] for img in row)
            _png(out / f"grid_{task}.png", image_grid([row], scale=max(1, math.ceil(GRID_CELL / side))))
            md += [f"![{task}: input images](grid_{task}.png)", ""]
            md += ["The (last) input image of each example below, left to right.", ""]
        if examples:
            md += ["| prompt | prediction | reference |", "|---|---|---|"]
            for ex in examples:
                texts = (ex.prompt, ex.prediction_text, ex.reference_text)
                md.append("| " + " | ".join(_cell_text(t) for t in texts) + " |")
            md.append("")
    path = out / "report.md"
    _atomic_bytes(path, "\n".join(md).encode())
    return path
