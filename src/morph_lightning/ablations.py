"""`python -m morph_lightning ablations`: the ablation rows of Tables 7-8 on the embedded world, per seed.

For the method and each row with a config fragment (`configs/world/ablations/<row>.yaml`), for each seed,
trains stages 1 -> 2 -> 3 from the shipped stage-0 towers in `runs/ablations/<row>/seed<k>/stageN` (the
demo's step runner: a finished stage is skipped, an interrupted one resumes from its last.ckpt), then
scores stage 3 with the world's DEMON-layout split (Table 7) and MagicBrush-layout editing, all-turn, L1
(Table 8) through `evaluate`, under `<out>/<row>/seed<k>/`. Writes `<out>/table.md` and `table.json`:
each metric's mean ± std over the seeds that finished, the paper's numbers beside them, and whether the
world reproduces the paper's direction against the method. A row or seed that fails is recorded with a
one-line reason and the others go on. docs/ablations.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from morph_lightning import evaluate
from morph_lightning.data_modules.world.writer import write_world
from morph_lightning.demo import WORLD_DIR, WORLD_SIZE, Step, run_step
from morph_lightning.evaluation.runner import write_atomic
from morph_lightning.evaluation.tasks.demon import CATEGORIES, TABLE7
from morph_lightning.evaluation.tasks.editing import TABLE8, MagicBrushEdit
from morph_lightning.evaluation.world_generation import write_generation_splits

RUNS = Path("runs/ablations")
METHOD = "method"
# Row name -> its label in Tables 7-8, in the tables' order (the method first, without a fragment; every
# other row is configs/world/ablations/<row>.yaml).
ROWS = {
    METHOD: "Morph-token",
    "detail_detail": "1 detail-detail",
    "abstr_abstr_sd": "2 abstr-abstr (SD)",
    "abstr_abstr_vq": "3 abstr-abstr (VQ)",
    "wo_decoder": "4 w/o decoder",
    "wo_deconfound": "5 w/o deconfound",
    "continuous": "6 continuous",
}
# A row's own stage-0 model, trained once for all its seeds (its fragment reads what the step exports).
STAGE0 = {
    "abstr_abstr_sd": Step(
        "abstr_abstr_sd/generator", "world/stage0_generator.yaml", RUNS / "abstr_abstr_sd" / "generator"
    )
}
EDIT_L1 = "MagicBrush L1"  # Table 8's MagicBrush column, x100, lower is better
DEMON_DIR = WORLD_DIR / "demon"
GENERATION_DIR = WORLD_DIR / "generation"
# The paper's numbers per row: Table 7's DEMON categories (tasks/demon.py) and Table 8's MagicBrush L1.
PAPER = {
    row: {
        **dict(zip(CATEGORIES, TABLE7[label], strict=True)),
        EDIT_L1: TABLE8[label][MagicBrushEdit.ABLATION_AT],
    }
    for row, label in ROWS.items()
}


def stages(row: str, seed: int) -> list[Step]:
    """The row's own stage 0 if it has one, then stages 1-3 of one seed, each from the row's previous
    stage (stage 1 from the towers)."""
    fragment = () if row == METHOD else ("--config", f"world/ablations/{row}.yaml")
    steps: list[Step] = []
    for n in (1, 2, 3):
        run_dir = RUNS / row / f"seed{seed}" / f"stage{n}"
        args = [*fragment, "--trainer.default_root_dir", str(run_dir), "--seed_everything", str(seed)]
        if steps:
            args += ["--model.init_args.init_from", str(steps[-1].run_dir / "last.ckpt")]
        steps.append(Step(f"{row}/seed{seed}/stage{n}", f"world/stage{n}.yaml", run_dir, args=tuple(args)))
    return [STAGE0[row], *steps] if row in STAGE0 else steps


def reason(err: BaseException) -> str:
    """One line for the table: the exception's first line, or its type."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def scores_of(checkpoint: Path, out: Path, limit: int) -> dict[str, float]:
    """DEMON's category means and MagicBrush's all-turn L1 (both x100) of one trained model, by the CLI's
    `evaluate` (which resumes from what `out` holds)."""
    common = ["--checkpoint", str(checkpoint), "--limit", str(limit)]
    demon = evaluate.main(["demon", "--data", str(DEMON_DIR), "--out", str(out / "demon"), *common])
    edit = evaluate.main(
        ["magicbrush-edit", "--data", str(GENERATION_DIR / "magicbrush"), "--out", str(out / "edit")]
        + [*common, "--option", "cvs_model=", "--option", "setting=all-turn"]
    )
    return {**demon["categories"], EDIT_L1: 100 * edit["l1"]}


def run_one(row: str, seed: int, out: Path, max_steps: int | None, limit: int) -> dict[str, Any]:
    """Train and score one row and seed: {"scores": {metric: value}} or {"error": one line}."""
    steps = stages(row, seed)
    try:
        for step in steps:
            trained_before = (step.run_dir / "DONE").exists()  # run_step says "done before, skipped"
            seconds = run_step(step, max_steps, tag="ablations")
            if not trained_before:
                shown = "time unknown" if seconds is None else f"{seconds:.0f} s"
                print(f"[ablations] row {row} seed {seed} {step.run_dir.name}: {shown}")
    except (Exception, SystemExit) as err:  # the CLI ends a failed fit with SystemExit
        return {"error": f"training: {reason(err)}"}
    try:
        return {"scores": scores_of(steps[-1].run_dir / "last.ckpt", out / row / f"seed{seed}", limit)}
    except (Exception, SystemExit) as err:
        return {"error": f"evaluation: {reason(err)}"}


def lower_is_better(metric: str) -> bool:
    return metric == EDIT_L1


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± std over the seeds that finished, the paper's numbers and the direction verdicts, per row of
    Tables 7-8 (`results`: row -> seed -> run_one's answer; a row absent from it is not measured)."""
    found = {m for seeds in results.values() for r in seeds.values() for m in r.get("scores", {})}
    metrics = [c for c in CATEGORIES if c in found] + [m for m in sorted(found) if m not in CATEGORIES]
    rows: dict[str, Any] = {}
    for row, label in ROWS.items():
        seeds = results.get(row, {})
        values = {m: [r["scores"][m] for r in seeds.values() if m in r.get("scores", {})] for m in metrics}
        rows[row] = {
            "label": label,
            "status": "run" if seeds else "not run",
            "mean": {m: statistics.fmean(v) for m, v in values.items() if v},
            "std": {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in values.items() if v},
            "n": {m: len(v) for m, v in values.items()},
            "paper": PAPER[row],
            "errors": {str(s): r["error"] for s, r in seeds.items() if "error" in r},
        }
    for row, entry in rows.items():
        if row != METHOD:
            entry["direction"] = {m: verdict(entry, rows[METHOD], m) for m in metrics}
    return {"metrics": metrics, "rows": rows}


def verdict(row: dict[str, Any], method: dict[str, Any], metric: str) -> str:
    """Whether the world's row is worse than its method on `metric`, beside what the paper's numbers say."""
    if metric not in row["mean"] or metric not in method["mean"]:
        return "not measured"
    sign = 1 if lower_is_better(metric) else -1
    worse = sign * (row["mean"][metric] - method["mean"][metric]) > 0
    paper_worse = sign * (row["paper"][metric] - method["paper"][metric]) > 0
    if worse == paper_worse:
        return ("worse" if worse else "not worse") + ", as in the paper"
    return ("worse" if worse else "not worse") + f", the paper: {'worse' if paper_worse else 'not worse'}"


def _cell(entry: dict[str, Any], metric: str) -> str:
    """The world's mean ± std (n), then the paper's number."""
    world = "-"
    if metric in entry["mean"]:
        world = f"{entry['mean'][metric]:.1f} ± {entry['std'][metric]:.1f} (n={entry['n'][metric]})"
    paper = entry["paper"].get(metric)
    return world if paper is None else f"{world} / {paper:.1f}"


def markdown(summary: dict[str, Any], seeds: list[int]) -> str:
    metrics, rows = summary["metrics"], summary["rows"]
    arrows = [f"{m} {'↓' if lower_is_better(m) else '↑'}" for m in metrics]
    head = ["Row", "status", *arrows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in rows.values():
        cells = [entry["label"], entry["status"], *(_cell(entry, m) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    text = f"# Ablations on the world (Tables 7-8), seeds {' '.join(map(str, seeds))}\n\n"
    text += "Each cell: the world's mean ± std over the seeds that finished (n) / the paper's number. DEMON: "
    text += "the world's DEMON-layout split, category means x100 (Table 7's columns that the split has). "
    text += f"{EDIT_L1}: all-turn, x100 (Table 8). The world's scale is not the paper's: compare directions, "
    text += "not values.\n\n" + "\n".join(lines) + "\n\n"
    text += "Direction against the world's morph-tokens (per metric):\n\n"
    for row, entry in rows.items():
        if row == METHOD:
            continue
        verdicts = "; ".join(f"{m}: {v}" for m, v in entry["direction"].items()) or "not measured"
        errors = "".join(f"; seed {s} failed ({e})" for s, e in entry["errors"].items())
        text += f"- {entry['label']}: {verdicts if entry['status'] == 'run' else entry['status']}{errors}\n"
    return text


def write_table(results: dict[str, dict[int, dict[str, Any]]], out: Path, seeds: list[int]) -> Path:
    """`out/table.md` and `out/table.json`, each written whole; an earlier one is moved aside."""
    summary = summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table.json", json.dumps({"seeds": seeds, **summary}, indent=1) + "\n")
    write_atomic(out / "table.md", markdown(summary, seeds))
    return out / "table.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m morph_lightning ablations", description=__doc__)
    parser.add_argument(
        "--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="`method`: no fragment"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=None, help="cap every stage (a quick look)")
    parser.add_argument("--eval-limit", type=int, default=200, help="items per DEMON dataset; edit sessions")
    parser.add_argument("--out", default="ablations_out", help="where scores and the table go")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    write_world(WORLD_DIR, seed=0, **WORLD_SIZE)  # the demo's world; nothing is written if it is there
    write_generation_splits(WORLD_DIR, GENERATION_DIR)
    out = Path(args.out)
    results = {
        row: {s: run_one(row, s, out, args.max_steps, args.eval_limit) for s in args.seeds}
        for row in args.rows
    }
    table = write_table(results, out, args.seeds)
    print(f"[ablations] {time.perf_counter() - start:.0f} s this run; table: {table}")
