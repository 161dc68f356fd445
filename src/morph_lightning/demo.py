"""`python -m morph_lightning demo`: the whole method on the embedded world, on one CPU.

Generates the world, takes the world's pretrained stage-0 towers (VQGAN, CLIP-style image tower, small
LM, the morph-token encoder) as shipped in `towers/world/` (training any that is missing, as
`make world-towers` does), then trains stages 1 -> 2 -> 3 through the same CLI and configs a user runs,
evaluates every task beside its trivial baseline and writes `demo_out/report.md` (+ `report.json`, PNG
grids). Each step leaves a marker when it finishes, and a step that was interrupted resumes from its last
checkpoint, so running the demo again picks up where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

from morph_lightning.cli import main as cli_main
from morph_lightning.data_modules.world.writer import write_world
from morph_lightning.evaluation.codebook import codebook_health
from morph_lightning.evaluation.report import write_report
from morph_lightning.evaluation.tower_quality import val_batch
from morph_lightning.evaluation.world_eval import evaluate_world
from morph_lightning.modeling.encoder_weights import load_encoder_weights
from morph_lightning.modeling.model import MorphModel
from morph_lightning.stages import Stage3Instruct
from morph_lightning.stages.base import load_model_weights

WORLD_DIR = Path("data/world")
VAL_PAIRS = WORLD_DIR / "pairs" / "val" / "00000.tar"
# The world's size. 20,000 image-text pairs (40 shards) and 8,000 instruction records keep stage 0's
# long runs and the decoder from memorising their images (with 2,000 pairs a decoder trained on frozen
# post-MLLM tokens overfit within 500 steps of 64); 2,000 validation records give every task at least
# 200 items (the smallest tasks draw 10% of them), chains (and the drift after them) 200. The split is
# fixed by the world's seed. 200 samples of each DEMON-layout dataset are what `make eval-demon` scores;
# 500 others of each, in DEMON's prompt format, join stage 3's data (without them the model, tuned on the
# world's own prompts only, answered DEMON's below chance: docs/evaluation.md).
WORLD_SIZE = {
    "num_pairs": 20000,
    "num_instruct": 8000,
    "num_val_instruct": 2000,
    "num_demon": 200,
    "num_demon_train": 500,
}
RUNS = Path("runs/world")
# The world's pretrained towers, shipped with the project as the paper's are downloaded; the stage-0
# configs write them here and the stage configs read them from here.
TOWERS = Path("towers/world")


@dataclass(frozen=True)
class Step:
    name: str
    config: str
    run_dir: Path
    tower: Path | None = None  # what a stage-0 step exports; the step is skipped when it exists
    args: tuple[str, ...] = ()  # more CLI arguments (an ablation's fragment, run folder, init_from, seed)


TOWER_STEPS = (
    Step("stage0_vqgan", "world/stage0_vqgan.yaml", RUNS / "stage0_vqgan", TOWERS / "vqgan.ckpt"),
    Step("stage0_clip", "world/stage0_clip.yaml", RUNS / "stage0_clip", TOWERS / "vision.safetensors"),
    Step("stage0_lm", "world/stage0_lm.yaml", RUNS / "stage0_lm", TOWERS / "lm"),
    Step(
        "stage0_encoder", "world/stage0_encoder.yaml", RUNS / "stage0_encoder", TOWERS / "encoder.safetensors"
    ),
)
STEPS = TOWER_STEPS + (
    Step("stage1", "world/stage1.yaml", RUNS / "stage1"),
    Step("stage2", "world/stage2.yaml", RUNS / "stage2"),
    Step("stage3", "world/stage3.yaml", RUNS / "stage3"),
)


def run_step(step: Step, max_steps: int | None, tag: str = "demo") -> float | None:
    """Fit one step unless its tower or its marker exists; resume from its last checkpoint if one is
    there. Returns the seconds the step took, read back from its marker when it finished in an earlier
    run (None for a shipped tower, or a marker that holds no time, e.g. one made by hand)."""
    if step.tower is not None and step.tower.exists():
        print(f"[{tag}] {step.name}: using the pretrained {step.tower}")
        return None
    done = step.run_dir / "DONE"
    if done.exists():
        print(f"[{tag}] {step.name}: done before, skipped")
        try:
            return float(json.loads(done.read_text())["seconds"])
        except (ValueError, KeyError, TypeError):
            return None
    args = ["fit", "--config", step.config, *step.args]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps)]
    last = step.run_dir / "last.ckpt"
    if last.exists():
        print(f"[{tag}] {step.name}: resuming from {last}")
        args += ["--ckpt_path", str(last)]
    start = time.perf_counter()
    cli_main(args)
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"seconds": seconds}))
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m morph_lightning demo", description=__doc__)
    parser.add_argument("--out", default="demo_out", help="where the report goes")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every stage (a quick look)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-per-task", type=int, default=200, help="validation records scored per task")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    counts = write_world(WORLD_DIR, seed=args.seed, **WORLD_SIZE)
    print(f"[demo] world: {counts['pairs']} pairs, {counts['images']} images in {WORLD_DIR}")
    timings = {step.name: run_step(step, args.max_steps) for step in STEPS}
    timings["this_run"] = time.perf_counter() - start  # the steps above that ran now, and the world

    model = Stage3Instruct.load_from_checkpoint(STEPS[-1].run_dir / "last.ckpt", weights_only=True).model
    codebook = codebook_by_stage(model)
    results = evaluate_world(model, WORLD_DIR, max_per_task=args.eval_per_task)
    timings["this_run_with_eval"] = time.perf_counter() - start
    seconds = {k: None if v is None else round(v, 1) for k, v in timings.items()}
    extra = {"seconds": seconds, "final_train_losses": final_losses(), "codebook": codebook}
    report = write_report(results, args.out, extra=extra)
    print(f"[demo] {timings['this_run_with_eval']:.0f} s this run; report: {report}")


def codebook_by_stage(model: MorphModel, num_images: int = 128) -> dict[str, dict[str, float]]:
    """Codebook health on the first `num_images` val images after stage 0 (the pretrained encoder) and
    after each of stages 1-3, each encoder read into `model` in turn (stage 3's last, as loaded)."""
    vision = model.vision
    resolution = model.config.vqgan.resolution
    batch = val_batch(str(VAL_PAIRS), num_images, vision.image_size, resolution, vision.mean, vision.std)
    pixels = batch["vision_pixels"]
    health = {}
    model.eval()  # no code-usage updates while counting
    load_encoder_weights(model.encoder, TOWERS / "encoder.safetensors")
    health["stage0_encoder"] = codebook_health(model, pixels)
    for step in STEPS[-3:]:
        weights = load_model_weights(str(step.run_dir / "last.ckpt"))
        prefix = "encoder."
        model.encoder.load_state_dict(
            {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        )
        health[step.name] = codebook_health(model, pixels)
    return health


def final_losses() -> dict[str, float]:
    """The last logged training loss of every step (from its CSV log)."""
    losses = {}
    for step in STEPS:
        log = step.run_dir / "logs" / "metrics.csv"
        if log.exists():
            rows = [r for r in csv.DictReader(log.open()) if r.get("train/loss")]
            if rows:
                losses[step.name] = round(float(rows[-1]["train/loss"]), 4)
    return losses
