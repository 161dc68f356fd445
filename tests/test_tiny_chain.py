"""The README's CLI path: tiny stages 1 -> 2 -> 3, each starting from the previous one's checkpoint."""

import csv
from pathlib import Path

import pytest

from morph_lightning.cli import main


def _logged(stage: int, key: str) -> list[float]:
    rows = csv.DictReader(open(Path(f"runs/tiny/stage{stage}/logs/metrics.csv")))
    return [float(r[key]) for r in rows if r.get(key)]


def test_tiny_stages_chain_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write under runs/tiny/ relative to here
    for stage in (1, 2, 3):
        args = ["fit", "--config", f"tiny/stage{stage}.yaml", "--trainer.max_steps", "16"]
        args += ["--trainer.val_check_interval", "8", "--trainer.enable_progress_bar", "false"]
        main(args)
        assert Path(f"runs/tiny/stage{stage}/last.ckpt").exists()
        losses = _logged(stage, "train/loss")
        assert len(losses) >= 3 and losses[-1] < losses[0], (stage, losses)
        assert _logged(stage, "val/loss")
    # the other subcommands, on the stage-3 checkpoint
    ckpt = ["--config", "tiny/stage3.yaml", "--ckpt_path", "runs/tiny/stage3/last.ckpt"]
    main(["validate", *ckpt, "--trainer.limit_val_batches", "1"])
    main(["test", *ckpt, "--trainer.limit_test_batches", "1"])
    cli = main(
        [
            "predict",
            *ckpt,
            "--trainer.limit_predict_batches",
            "1",
            "--model.init_args.generation",
            "{max_new_tokens: 4}",
        ]
    )
    (out,) = cli.trainer.predict_loop.predictions
    assert len(out.texts) == 8 and all(isinstance(t, str) for t in out.texts)
    with pytest.raises(ValueError, match="init_from"):
        main(["fit", "--config", "tiny/stage2.yaml", "--model.init_args.init_from", "missing.ckpt"])
