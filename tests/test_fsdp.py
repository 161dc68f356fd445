"""FSDP2 (ModelParallelStrategy) on 2 CPU processes: tiny stage 2, save, resume, same losses as 1 process.

The sharded run goes through the CLI in a subprocess (Lightning launches the second rank itself); the
single-process reference runs in this process with the same global batch of 8 (4 per rank).
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from morph_lightning.cli import CONFIG_DIR, main

TESTS = Path(__file__).resolve().parent
STEPS, MORE_STEPS = 3, 3  # 24 samples: one epoch of 3 global batches, then a second one after resuming
STRATEGY = (
    "{class_path: lightning.pytorch.strategies.ModelParallelStrategy, init_args: "
    "{data_parallel_size: 2, tensor_parallel_size: 1, save_distributed_checkpoint: false}}"
)


SAVE_AT_STEP = (
    "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
    f"{{dirpath: steps, filename: '{{step}}', every_n_train_steps: {STEPS}, save_top_k: -1}}}}"
)


def _stage2_args(stage1: Path, per_rank_batch: int, max_steps: int) -> list[str]:
    return [
        "fit",
        "--config",
        "tiny/stage2.yaml",
        "--model.init_args.init_from",
        str(stage1),
        # LoRA in place: frozen and trainable weights in the same shard unit, as at paper scale
        "--model.init_args.model.llm.train_base",
        "false",
        # revival draws rows from rank 0's half batch, so the runs would differ by design
        "--model.init_args.model.quantizer.dead_code_threshold",
        "0",
        "--data.class_path",
        "fsdp_support.EqualLengthPairs",
        "--data.init_args.num_train",
        "24",
        "--data.init_args.batch_size",
        str(per_rank_batch),
        "--trainer.callbacks+=fsdp_support.GlobalLoss",
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "runs/tiny/stage2/logs/metrics.csv"))
    return {int(r["step"]): float(r["global_loss"]) for r in rows if r.get("global_loss")}


def _sharded(run_dir: Path, args: list[str]) -> None:
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CONFIG_DIR.parent / "src"), str(TESTS)])}
    cmd = [sys.executable, "-m", "morph_lightning", *args, "--trainer.devices", "2"]
    cmd += ["--trainer.strategy", STRATEGY, "--trainer.use_distributed_sampler", "false"]
    cmd += ["--model.init_args.activation_checkpointing", "true"]
    done = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_sharded_stage2_saves_resumes_and_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            "tiny/stage1.yaml",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
        ]
    )
    stage1 = tmp_path / "runs/tiny/stage1/last.ckpt"

    single = tmp_path / "single"
    single.mkdir()
    monkeypatch.chdir(single)
    main(_stage2_args(stage1, per_rank_batch=8, max_steps=STEPS + MORE_STEPS))
    reference = _losses(single)

    # the sharded run keeps its step-3 checkpoint; a second one resumes from it with the same schedule
    first, resumed = tmp_path / "sharded", tmp_path / "resumed"
    # Sharded with the chunked loss (llm.loss_chunk; the resumed run takes it from the checkpoint's
    # hyperparameters): its head runs inside the sharded LLM's forward and again in backward.
    chunked = ["--model.init_args.model.llm.loss_chunk", "5", f"--trainer.callbacks+={SAVE_AT_STEP}"]
    _sharded(first, [*_stage2_args(stage1, 4, STEPS + MORE_STEPS), *chunked])
    checkpoint = first / f"steps/step={STEPS}.ckpt"
    assert checkpoint.is_file()  # one file assembled on rank 0 (save_distributed_checkpoint: false)
    _sharded(resumed, [*_stage2_args(stage1, 4, STEPS + MORE_STEPS), "--ckpt_path", str(checkpoint)])
    uninterrupted = _losses(first)
    sharded = {**{k: v for k, v in uninterrupted.items() if k < STEPS}, **_losses(resumed)}

    print("step  1 process  2 processes  2 processes, resumed at step 3")
    for step in sorted(reference):
        print(f"{step:4d}  {reference[step]:.6f}  {uninterrupted[step]:.6f}  {sharded[step]:.6f}")
    assert sorted(sharded) == sorted(uninterrupted) == sorted(reference)
    assert len(reference) == STEPS + MORE_STEPS
    for step, loss in reference.items():
        # the uninterrupted run goes on past its step-3 checkpoint and into the second epoch in-process
        assert uninterrupted[step] == pytest.approx(loss, abs=1e-4), step
        assert sharded[step] == pytest.approx(loss, abs=1e-4), step


@pytest.mark.parametrize(
    ("fragment", "nodes"), [("strategy/fsdp_1node.yaml", 1), ("strategy/fsdp_16gpu.yaml", 2)]
)
def test_strategy_fragments_parse_on_a_stage_config(fragment, nodes, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "stage2.yaml", "--config", fragment, "--print_config"])
    assert done.value.code in (None, 0)
    config = yaml.safe_load(capsys.readouterr().out)
    trainer, strategy = config["trainer"], config["trainer"]["strategy"]
    assert (trainer["devices"], trainer["num_nodes"], trainer["precision"]) == (8, nodes, "bf16-mixed")
    assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert strategy["init_args"]["data_parallel_size"] == 8 * nodes
    assert strategy["init_args"]["tensor_parallel_size"] == 1
    assert config["model"]["init_args"]["activation_checkpointing"] is True
    assert config["model"]["init_args"]["model"]["llm"]["lora_r"] == 64  # the stage config is kept
