"""`python -m morph_lightning evaluate TASK --data DIR (--checkpoint FILE | --export DIR) --out DIR`.

Answers the benchmark's items with the model and scores them (see `evaluation.runner`); with
`--predictions P` instead of a model, scores predictions made elsewhere (the runner's jsonl, or the
task's official layout where it has one, e.g. DEMON's `<dir>/<dataset>/pred.json`). Writes
`predictions.jsonl`, `scores.json` and `table.md` under `--out`; the same command again resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from morph_lightning.evaluation.runner import evaluate, write_scores
from morph_lightning.evaluation.tasks import TASKS, get_task
from morph_lightning.export import CONFIG_FILE, load_exported, model_from_checkpoint


def model_identity(path: str) -> str:
    """The model's path with its size and time: a checkpoint trained again at the same path is another
    model, whose answers must not be mixed with the earlier one's."""
    p = Path(path).resolve()
    stat = (p / CONFIG_FILE if p.is_dir() else p).stat() if p.exists() else None
    if stat is None:
        raise FileNotFoundError(f"evaluate: no model at {path}")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stat.st_mtime))
    return f"{p} ({stat.st_size} bytes, {stamp})"


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"evaluate: --option takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m morph_lightning evaluate", description=__doc__)
    parser.add_argument("task", choices=sorted(TASKS), metavar="TASK", help=", ".join(sorted(TASKS)))
    parser.add_argument("--data", required=True, help="the benchmark's folder, as published")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a stage checkpoint (.ckpt)")
    source.add_argument("--export", help="a folder written by `python -m morph_lightning export`")
    source.add_argument("--predictions", help="score these predictions instead of running a model")
    parser.add_argument("--out", required=True, help="where predictions, scores and the table go")
    parser.add_argument("--limit", type=int, default=None, help="at most N items (per dataset in DEMON)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--devices", type=int, default=1, help="GPUs to run data-parallel on")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--num-workers", type=int, default=0, help="image-reading workers per device")
    parser.add_argument("--form", choices=("adapter", "merged"), default="adapter", help="with --export")
    parser.add_argument(
        "--official-scoring", action="store_true", help="score as the official scripts do, bugs included"
    )
    parser.add_argument("--option", action="append", default=[], help="a task option KEY=VALUE")
    args = parser.parse_args(argv)

    task = get_task(args.task)(
        args.data, limit=args.limit, official_scoring=args.official_scoring, **_options(args.option)
    )
    if args.predictions:
        scores = write_scores(task, task.read_predictions(Path(args.predictions)), Path(args.out))
    else:
        if args.checkpoint:
            source = model_identity(args.checkpoint)
            model = model_from_checkpoint(args.checkpoint)
        else:
            source = model_identity(args.export)
            model = load_exported(args.export, form=args.form)
        scores = evaluate(
            task, model, args.out, source, args.batch_size, args.devices, args.accelerator, args.num_workers
        )
    if scores is not None:
        print(task.table(scores))
        print(f"[evaluate] {args.task}: scores in {Path(args.out) / 'scores.json'}")
    return scores
