"""`make demo` in miniature: the world, stage 0 and stages 1-3 through the real configs, two steps each."""

import json
from pathlib import Path

from morph_lightning.demo import STEPS, Step, run_step
from morph_lightning.demo import main as demo


def test_demo_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo(["--max-steps", "2", "--eval-per-task", "2"])
    for step in STEPS:
        assert json.loads((step.run_dir / "DONE").read_text())["seconds"] > 0
    for export in ("vqgan.ckpt", "vision.safetensors", "lm/config.json", "encoder.safetensors"):
        assert (Path("towers/world") / export).exists()
    marker = STEPS[-1].run_dir / "DONE"
    marker.unlink()  # as if stage 3 had been interrupted: only it runs again, from its last checkpoint
    before = {s.name: (s.run_dir / "DONE").stat().st_mtime for s in STEPS[:-1]}
    demo(["--max-steps", "3", "--eval-per-task", "2"])
    assert marker.exists()
    assert before == {s.name: (s.run_dir / "DONE").stat().st_mtime for s in STEPS[:-1]}
    report = json.loads(Path("demo_out/report.json").read_text())
    seconds = report["extra"]["seconds"]  # a skipped step reports the time it took when it ran
    stage1 = next(s for s in STEPS if s.name == "stage1")
    assert seconds["stage1"] == round(json.loads((stage1.run_dir / "DONE").read_text())["seconds"], 1) > 0
    assert seconds["this_run"] < sum(seconds[s.name] for s in STEPS if s.tower is None)
    assert all(seconds[s.name] is None for s in STEPS if s.tower is not None)  # the towers now exist
    (stage1.run_dir / "DONE").write_text("")  # a marker made by hand: the step is skipped, its time unknown
    demo(["--max-steps", "3", "--eval-per-task", "2"])
    assert json.loads(Path("demo_out/report.json").read_text())["extra"]["seconds"]["stage1"] is None
    assert {"caption", "vqa", "t2i", "edit", "drift"} <= set(report["metrics"])
    codebook = report["extra"]["codebook"]  # the encoder's codebook after stage 0 and each of stages 1-3
    assert list(codebook) == ["stage0_encoder", "stage1", "stage2", "stage3"]
    assert all(0 < c["codes_used"] <= 1 and c["perplexity"] >= 1 for c in codebook.values())
    assert "model/l1" in report["metrics"]["edit"] and "baseline/l1" in report["metrics"]["edit"]
    assert Path("demo_out/report.md").read_text().count("|") > 20


def test_a_pretrained_tower_is_used_not_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tower = Path("towers/world/vqgan.ckpt")
    tower.parent.mkdir(parents=True)
    tower.write_bytes(b"shipped")
    step = Step("stage0_vqgan", "no/such/config.yaml", Path("runs/world/stage0_vqgan"), tower)
    assert run_step(step, max_steps=1) is None  # nothing ran (the config does not even exist)
    assert "using the pretrained towers/world/vqgan.ckpt" in capsys.readouterr().out
    assert tower.read_bytes() == b"shipped" and not step.run_dir.exists()
