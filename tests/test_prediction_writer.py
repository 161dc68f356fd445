"""PredictionWriter on hand-made GenerationOutputs: jsonl rows, PNGs, a fresh folder per run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from morph_lightning.callbacks.prediction_writer import PredictionWriter
from morph_lightning.modeling.model import GenerationOutput


def fake_trainer(root) -> SimpleNamespace:
    strategy = SimpleNamespace(broadcast=lambda obj: obj)
    return SimpleNamespace(
        default_root_dir=str(root), is_global_zero=True, world_size=1, global_rank=0, strategy=strategy
    )


def predict(writer: PredictionWriter, trainer, outputs: list[GenerationOutput]) -> None:
    writer.on_predict_start(trainer, None)
    for batch_idx, out in enumerate(outputs):
        writer.write_on_batch_end(trainer, None, out, None, None, batch_idx, 0)
    writer.on_predict_end(trainer, None)


def test_rows_and_pngs(tmp_path, capsys):
    pixels = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0), torch.zeros(3, 4, 4)])
    first = GenerationOutput(
        texts=["a <image>", "b", "c <image><image>"], images=[[0], [], [1, 2]], pixels=pixels
    )
    second = GenerationOutput(texts=["d"], images=[[]], pixels=None)
    writer, trainer = PredictionWriter(), fake_trainer(tmp_path)
    predict(writer, trainer, [first, second])

    (folder,) = (tmp_path / "predict").iterdir()
    assert writer.folder == folder
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [(r["batch"], r["row"], r["text"]) for r in rows] == [
        (0, 0, "a <image>"),
        (0, 1, "b"),
        (0, 2, "c <image><image>"),
        (1, 0, "d"),
    ]
    assert [len(r["images"]) for r in rows] == [1, 0, 2, 0]
    values = [np.asarray(Image.open(folder / name)) for r in rows for name in r["images"]]
    assert [v.shape for v in values] == [(4, 4, 3)] * 3
    assert [int(v[0, 0, 0]) for v in values] == [0, 255, 128]  # [-1, 1] -> [0, 255]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["predictions.jsonl", *rows[0]["images"], *rows[2]["images"]]
    )
    assert str(folder / "predictions.jsonl") in capsys.readouterr().out

    predict(PredictionWriter(), trainer, [second])  # a second run: its own folder, the first untouched
    assert len(list((tmp_path / "predict").iterdir())) == 2
    assert len((folder / "predictions.jsonl").read_text().splitlines()) == 4


def test_other_outputs_are_skipped_with_a_warning(tmp_path):
    writer, trainer = PredictionWriter(), fake_trainer(tmp_path)
    with pytest.warns(UserWarning, match="GenerationOutput"):
        predict(writer, trainer, [torch.zeros(2), torch.zeros(2)])
    assert (writer.folder / "predictions.jsonl").read_text() == ""
