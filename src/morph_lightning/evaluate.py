"""`python -m morph_lightning evaluate TASK --data DIR (--checkpoint FILE | --export DIR) --out DIR`.

Answers the benchmark's items with the model and scores them (see `evaluation.runner`); with
`--predictions P` instead of a model, scores predictions made elsewhere (the runner's jsonl, or the
task's official layout where it has one, e.g. DEMON's `<dir>/<dataset>/pred.json`). Writes
`predictions.jsonl`, `scores.json` and `table.md` under `--out`; the same command again resumes.
MagicBrush's final-turn setting (`--option setting=final-turn`) runs one pass per turn, each turn editing
the model's answer to the one before. `flickr30k-retrieval` (Table 6) scores a `RetrievalProjection`
checkpoint or a saved similarity matrix instead (see `evaluation.retrieval_eval`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from morph_lightning.evaluation import retrieval_eval
from morph_lightning.evaluation.runner import evaluate, write_scores
from morph_lightning.evaluation.task import Task
from morph_lightning.evaluation.tasks import TASKS, get_task
from morph_lightning.export import CONFIG_FILE, load_exported, model_from_checkpoint
from morph_lightning.modeling.model import MorphModel


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


def _retrieval(args: argparse.Namespace, options: dict[str, str]) -> dict:
    """Flickr30K retrieval. Not a `Task`: its score needs every image against every caption (one matrix),
    not an answer per request, and its model is a `RetrievalProjection`, not a MorphModel."""
    if args.export or args.devices != 1:
        raise SystemExit(
            f"evaluate: {retrieval_eval.RETRIEVAL} takes --checkpoint (a RetrievalProjection's) or "
            "--predictions, on one device"
        )
    test = retrieval_eval.read_set(args.data, options, args.limit)
    if args.predictions:
        sim = retrieval_eval.read_similarity(args.predictions, test)
        scores = retrieval_eval.write_scores(sim, test, args.out, model_identity(args.predictions))
    else:
        try:
            model = retrieval_eval.load_projection(args.checkpoint)
        except ValueError as err:  # another kind of checkpoint: one line, no traceback
            raise SystemExit(f"evaluate: {err}") from None
        source = model_identity(args.checkpoint)
        scores = retrieval_eval.evaluate_model(
            model, test, args.out, source, args.batch_size, args.accelerator, args.num_workers
        )
    print(retrieval_eval.table(scores))
    return scores


def _answer(task: Task, model: MorphModel, source: str, args: argparse.Namespace) -> dict | None:
    """Answer the task's requests with the runner and score them. MagicBrush's final-turn setting takes
    one pass per turn: turn t edits the model's answer to turn t-1, which the pass before drew."""
    run = {"batch_size": args.batch_size, "accelerator": args.accelerator, "num_workers": args.num_workers}
    if args.task == "magicbrush-edit" and task.options["setting"] == "final-turn":
        if args.devices != 1:
            raise SystemExit("evaluate: magicbrush-edit setting=final-turn runs on one device")
        from morph_lightning.evaluation.tasks.editing import evaluate_final_turn

        return evaluate_final_turn(task, model, args.out, source, **run)
    return evaluate(task, model, args.out, source, devices=args.devices, **run)


def _task(args: argparse.Namespace, options: dict[str, str]) -> dict | None:
    """A benchmark's `Task`: answered by the runner, or predictions made elsewhere scored."""
    task = get_task(args.task)(args.data, limit=args.limit, official_scoring=args.official_scoring, **options)
    if args.predictions:
        scores = write_scores(task, task.read_predictions(Path(args.predictions)), Path(args.out))
    elif args.checkpoint:
        source = model_identity(args.checkpoint)
        scores = _answer(task, model_from_checkpoint(args.checkpoint), source, args)
    else:
        source = model_identity(args.export)
        scores = _answer(task, load_exported(args.export, form=args.form), source, args)
    if scores is not None:
        print(task.table(scores))
    return scores


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m morph_lightning evaluate", description=__doc__)
    names = sorted([*TASKS, retrieval_eval.RETRIEVAL])
    parser.add_argument("task", choices=names, metavar="TASK", help=", ".join(names))
    parser.add_argument("--data", required=True, help="the benchmark's folder, as published")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="a stage checkpoint (.ckpt); a RetrievalProjection's for retrieval"
    )
    source.add_argument("--export", help="a folder written by `python -m morph_lightning export`")
    source.add_argument(
        "--predictions", help="score these predictions (retrieval: a similarity matrix) instead of a model"
    )
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

    options = _options(args.option)
    scores = _retrieval(args, options) if args.task == retrieval_eval.RETRIEVAL else _task(args, options)
    if scores is not None:
        print(f"[evaluate] {args.task}: scores in {Path(args.out) / 'scores.json'}")
    return scores
