"""`python -m morph_lightning world-towers`: trains the world's stage-0 towers from scratch and scores them.

The world's pretrained towers (VQGAN, CLIP-style image tower, small LM, morph-token encoder) ship in
`towers/world/`, as a user of the paper's recipe downloads EVA-CLIP, the VQGAN and Vicuna. This command
makes them again: it runs the four stage-0 configs in order, each from its seed, writes the towers where
the stage configs read them, and prints their quality and file sizes (`towers/world/quality.json`
records both). An earlier run's folders (stages 1-3 too, which were trained on the old towers) and
the towers it replaces are kept, renamed or moved under `runs/world/` with the time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from morph_lightning.data_modules.world.writer import write_world
from morph_lightning.demo import RUNS, STEPS, TOWER_STEPS, TOWERS, VAL_PAIRS, WORLD_DIR, WORLD_SIZE, run_step
from morph_lightning.evaluation.tower_quality import last_val_metrics, val_batch, vqgan_scene_exact
from morph_lightning.modeling.vqgan import VQGAN
from morph_lightning.stages.contrastive_towers import tower_args_path
from morph_lightning.stages.vqgan_autoencoder import VQGANAutoencoder

# The metric that says how good each tower is, as its run logged it (the VQGAN's is measured here).
LOGGED_QUALITY = {"stage0_clip": "val/i2t_acc", "stage0_lm": "val/loss", "stage0_encoder": "val/code_acc"}
QUALITY_IMAGES = 200  # the world's validation pairs


def unused(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... : the first name nothing has yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def tower_bytes(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def vqgan_quality(step_run_dir: Path, tower: Path) -> float:
    """Scene-exact reconstructions of the world's validation images through the exported VQGAN."""
    arch = VQGANAutoencoder.load_from_checkpoint(step_run_dir / "last.ckpt", weights_only=True).hparams.vqgan
    pixels = val_batch(str(VAL_PAIRS), QUALITY_IMAGES, arch["resolution"], arch["resolution"])["vqgan_pixels"]
    return vqgan_scene_exact(VQGAN.from_taming_checkpoint(tower, **arch), pixels)


def quality(max_steps: int | None) -> dict[str, dict[str, float]]:
    """Each tower's quality metric and its size in bytes."""
    table = {}
    for step in TOWER_STEPS:
        if step.name == "stage0_vqgan":
            metric, value = "val/scene_exact", vqgan_quality(step.run_dir, step.tower)
        else:
            metric = LOGGED_QUALITY[step.name]
            value = last_val_metrics(step.run_dir).get(metric, float("nan"))
        table[step.name] = {metric: round(value, 4), "bytes": tower_bytes(step.tower)}
    return table | {"max_steps": max_steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m morph_lightning world-towers", description=__doc__)
    parser.add_argument("--max-steps", type=int, default=None, help="cap every tower (a quick check)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    args = parser.parse_args(argv)

    write_world(WORLD_DIR, seed=args.seed, **WORLD_SIZE)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = unused(RUNS / f"towers.{stamp}")  # the towers this run replaces: moved here, never deleted
    # An earlier run's folders stay beside the new ones, stages 1-3 too: they were trained on the old
    # towers, and the demo would otherwise take them as done.
    for step in STEPS:
        if step.run_dir.exists():
            step.run_dir.rename(unused(step.run_dir.with_name(f"{step.run_dir.name}.{stamp}")))
    seconds = {}
    for step in TOWER_STEPS:
        for path in (step.tower, tower_args_path(step.tower)):  # a tower and its arguments' sidecar
            if path.exists():
                kept.mkdir(parents=True, exist_ok=True)
                path.rename(kept / path.name)
        seconds[step.name] = round(run_step(step, args.max_steps), 1)
    table = quality(args.max_steps)
    for name, row in table.items():
        if isinstance(row, dict):
            row["seconds"] = seconds[name]
    (TOWERS / "quality.json").write_text(json.dumps(table, indent=1) + "\n")
    for name, row in table.items():
        print(f"[world-towers] {name}: {row}")
