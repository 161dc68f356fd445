"""`make ablations` in miniature (a small world, two steps a stage, the shipped towers) and its table."""

import json
from pathlib import Path

from morph_lightning import ablations

TOWERS = Path(__file__).resolve().parents[1] / "towers"
# 40 train shards, as the world's stage configs name them; a few of everything else
SMALL_WORLD = {"num_pairs": 80, "shard_size": 2, "num_val_pairs": 16, "num_instruct": 64}
SMALL_WORLD |= {"num_val_instruct": 40, "num_demon": 2, "num_demon_train": 2}


def test_rows_train_evaluate_resume_and_table(tmp_path, monkeypatch, capsys):
    """The method and abstr-abstr (SD), whose own stage 0 (the conditional generator) runs first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ablations, "WORLD_SIZE", SMALL_WORLD)
    Path("towers").symlink_to(TOWERS)
    argv = ["--rows", "method", "abstr_abstr_sd", "--seeds", "0", "--max-steps", "2", "--eval-limit", "2"]
    ablations.main(argv)
    assert Path("runs/ablations/abstr_abstr_sd/generator.safetensors").is_file()
    for row in ("method", "abstr_abstr_sd"):
        for n in (1, 2, 3):
            assert json.loads(Path(f"runs/ablations/{row}/seed0/stage{n}/DONE").read_text())["seconds"] > 0
        assert Path(f"ablations_out/{row}/seed0/demon/scores.json").exists()
        assert Path(f"ablations_out/{row}/seed0/edit/scores.json").exists()
    out = capsys.readouterr().out
    assert "[ablations] row abstr_abstr_sd seed 0 generator:" in out
    assert "[ablations] row abstr_abstr_sd seed 0 stage3:" in out

    ablations.main(argv)  # all done: nothing trains again
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 7 and "resuming" not in out
    assert "[ablations] row" not in out  # no step timed as if it had run

    table = json.loads(Path("ablations_out/table.json").read_text())
    assert table["seeds"] == [0] and table["metrics"][-1] == ablations.EDIT_L1
    rows = table["rows"]
    assert list(rows) == list(ablations.ROWS)  # the tables' order, the method first
    assert rows["method"]["n"][ablations.EDIT_L1] == 1 and rows["abstr_abstr_sd"]["errors"] == {}
    sd = {"MMD": 25.8, "VST": 17.3, "VRI": 11.3, "MMC": 22.7, "KGQA": 38.8, "TRQA": 33.5, "MMR": 45.0}
    assert rows["abstr_abstr_sd"]["paper"] == {**sd, ablations.EDIT_L1: 27.8}
    assert rows["continuous"]["status"] == "not run" == rows["abstr_abstr_vq"]["status"]
    assert set(rows["continuous"]["direction"].values()) == {"not measured"}
    md = Path("ablations_out/table.md").read_text()
    assert "| 2 abstr-abstr (SD) | run |" in md and " / 27.8 |" in md
    assert "- 2 abstr-abstr (SD): VRI:" in md and "- 3 abstr-abstr (VQ): not run" in md


def _run(l1: float, vri: float) -> dict:
    return {"scores": {"VRI": vri, ablations.EDIT_L1: l1}}


def test_table_means_directions_and_missing_rows(tmp_path):
    results = {
        "method": {0: _run(8.0, 40.0), 1: _run(10.0, 44.0)},
        "wo_deconfound": {0: _run(12.0, 30.0), 1: _run(14.0, 50.0), 2: {"error": "evaluation: no"}},
        "continuous": {0: _run(5.0, 42.0)},
        "wo_decoder": {0: {"error": "training: SystemExit: 1"}},
    }
    ablations.write_table(results, tmp_path, [0, 1, 2])
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    row = rows["wo_deconfound"]
    assert row["mean"] == {"VRI": 40.0, ablations.EDIT_L1: 13.0} and row["n"]["VRI"] == 2
    assert round(row["std"][ablations.EDIT_L1], 4) == round(2**0.5, 4)
    assert row["errors"] == {"2": "evaluation: no"}
    assert row["direction"] == {
        "VRI": "worse, as in the paper",  # 40 < 42, as 25.3 < 27.4
        ablations.EDIT_L1: "worse, as in the paper",  # 13 > 9, as 12.2 > 7.6
    }
    assert rows["continuous"]["direction"][ablations.EDIT_L1] == "not worse, the paper: worse"
    assert rows["continuous"]["std"]["VRI"] == 0.0  # one seed
    assert rows["wo_decoder"]["status"] == "run" and rows["wo_decoder"]["mean"] == {}
    assert set(rows["wo_decoder"]["direction"].values()) == {"not measured"}
    assert rows["detail_detail"]["status"] == "not run"
    assert rows["continuous"]["direction"]["VRI"] == "not worse, the paper: worse"  # 42 = 42; 26.1 < 27.4
    md = (tmp_path / "table.md").read_text()
    assert "| 5 w/o deconfound | run | 40.0 ± 14.1 (n=2) / 25.3 | 13.0 ± 1.4 (n=2) / 12.2 |" in md
    assert "- 4 w/o decoder: VRI: not measured; MagicBrush L1: not measured; seed 0 failed (training:" in md
    ablations.write_table({"method": results["method"]}, tmp_path, [0, 1])  # the earlier table is kept aside
    assert len(list(tmp_path.glob("table*.md"))) == 2
