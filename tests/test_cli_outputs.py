"""Where `fit` and `predict` write: the run folder given by `--trainer.default_root_dir`, and for predict
a fresh folder of predictions that leaves the training run's logs alone. Tiny stage 1, two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from morph_lightning.cli import main

FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Tiny stage 1 fitted for 2 steps (a metrics row each) into a folder given on the command line,
    from a working folder that must stay empty."""
    cwd, root = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("run") / "stage1"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        main(
            ["fit", "--config", "tiny/stage1.yaml", "--trainer.default_root_dir", str(root)]
            + FAST
            + ["--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"]
        )
        assert list(cwd.iterdir()) == []  # nothing under ./runs/tiny/stage1, the config's own folder
    return root


def test_fit_writes_into_default_root_dir(run_dir):
    assert (run_dir / "last.ckpt").is_file()
    assert (run_dir / "logs" / "metrics.csv").is_file()
    assert (run_dir / "logs" / "config.yaml").is_file()


def test_predict_writes_predictions_and_leaves_the_run_alone(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run_dir / "logs" / "metrics.csv" in before
    args = ["predict", "--config", "tiny/stage1.yaml", "--ckpt_path", str(run_dir / "last.ckpt")]
    args += ["--trainer.default_root_dir", str(run_dir), "--trainer.limit_predict_batches", "2"] + FAST
    args += ["--model.init_args.generation", "{max_new_tokens: 4}"]
    main(args)
    main(args)  # a second run: a second folder, the first one kept

    assert {p: p.read_bytes() for p in before} == before  # metrics.csv, config.yaml, last.ckpt unchanged
    folders = sorted((run_dir / "predict").iterdir())
    assert len(folders) == 2
    for folder in folders:
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 16  # 2 batches of 8
        assert [(r["batch"], r["row"]) for r in rows[:9]] == [(0, i) for i in range(8)] + [(1, 0)]
        assert all(isinstance(r["text"], str) for r in rows)
        assert all((folder / name).is_file() for r in rows for name in r["images"])
        assert not list(folder.glob("*.partial")) and not list(folder.glob("*.tmp"))
    assert f"{folders[0]}/predictions.jsonl" in capsys.readouterr().out  # says where it wrote
    assert list(tmp_path.iterdir()) == []


def test_validate_logs_beside_the_run_and_keeps_its_metrics(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = run_dir / "logs" / "metrics.csv"
    before = metrics.read_bytes()
    args = ["validate", "--config", "tiny/stage1.yaml", "--ckpt_path", str(run_dir / "last.ckpt")]
    main(args + ["--trainer.default_root_dir", str(run_dir), "--trainer.limit_val_batches", "1"] + FAST)

    assert metrics.read_bytes() == before
    (own,) = (run_dir / "logs").glob("validate-*/metrics.csv")
    assert "val/loss" in own.read_text().splitlines()[0]


def test_a_resumed_fit_keeps_the_earlier_metrics(run_dir, tmp_path, monkeypatch):
    """Lightning's CSVLogger deletes the metrics.csv of a folder it opens again; the CLI moves it aside."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "stage1"
    fit = ["fit", "--config", "tiny/stage1.yaml", "--trainer.default_root_dir", str(run)] + FAST
    main(fit + ["--trainer.max_steps", "1", "--trainer.log_every_n_steps", "1"])
    first = (run / "logs" / "metrics.csv").read_bytes()
    main(fit + ["--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--ckpt_path", "last"])

    (aside,) = (run / "logs").glob("metrics.*.csv")
    assert aside.read_bytes() == first
    resumed = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert len(resumed) == 2 and resumed[1].split(",")[resumed[0].split(",").index("step")] == "1"
