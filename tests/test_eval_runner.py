"""The evaluation runner: predictions written as they come, resumed after a kill, merged across ranks,
and scored; ranking and beam search; the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from morph_lightning.evaluate import main as evaluate_main
from morph_lightning.evaluation.runner import EvalModule, evaluate
from morph_lightning.evaluation.task import Prediction, Request, Task, markdown_table, read_predictions_jsonl
from morph_lightning.evaluation.text_generation import generate_text
from morph_lightning.generation import generate
from morph_lightning.modeling.sequence import ImageRef, Sample


class Toy(Task):
    """Six generated answers (one with a missing image) and one ranked item, over three images."""

    name = "toy"

    def requests(self) -> list[Request]:
        img = [str(self.data / f"{i}.png") for i in range(3)]
        reqs = [
            Request(f"g{i}", "USER: <image> What is it? ASSISTANT:", [img[i % 3]], max_new_tokens=4)
            for i in range(5)
        ]
        reqs.append(Request("bad", "USER: <image> And this? ASSISTANT:", [str(self.data / "none.png")]))
        reqs.append(Request("rank", "USER: <image> <image> Same? ASSISTANT:", img[:2], choices=["yes", "no"]))
        return reqs[: self.limit]

    def score(self, predictions: dict[str, Prediction]) -> dict:
        return {"answered": sum(1 for r in self.requests() if predictions.get(r.id, Prediction(r.id)).text)}

    def table(self, scores: dict) -> str:
        return markdown_table(["answered"], [[scores["answered"]]])


@pytest.fixture
def toy_data(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_scores_and_table_are_written(toy_data, tiny_eval_model):
    out = toy_data / "out"
    scores = evaluate(Toy(toy_data), tiny_eval_model, out, "tiny", batch_size=3)
    preds = _lines(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == ["g0", "g1", "g2", "g3", "g4", "bad", "rank"]  # the task's order
    assert "missing" in preds[5]["error"] and preds[5]["text"] == ""
    assert preds[6]["text"] in ("yes", "no") and len(preds[6]["choice_logprobs"]) == 2
    best = ["yes", "no"][int(np.argmax(preds[6]["choice_logprobs"]))]
    assert preds[6]["text"] == best
    assert scores == {"answered": 6} == json.loads((out / "scores.json").read_text())
    assert (out / "table.md").read_text().startswith("| answered |")
    assert not list(out.glob("predictions.part*"))  # merged


def test_a_killed_run_resumes_and_keeps_what_it_had(toy_data, tiny_eval_model, monkeypatch):
    out = toy_data / "out"
    out.mkdir()
    (out / "run.json").write_text(
        json.dumps({"task": "toy", "data": str(toy_data.resolve()), "model": "tiny"})
    )
    # what a run killed mid-write leaves: two whole lines and a torn third
    (out / "predictions.part0.jsonl").write_text(
        '{"id": "g0", "text": "kept"}\n{"id": "g3", "text": "also"}\n{"id": "g4", "te'
    )
    asked: list[str] = []
    step = EvalModule.predict_step

    def spy(self, batch, batch_idx):
        asked.extend(item.request.id for item in batch)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(EvalModule, "predict_step", spy)
    evaluate(Toy(toy_data), tiny_eval_model, out, "tiny", batch_size=2)
    assert asked == ["g1", "g2", "g4", "bad", "rank"]
    preds = read_predictions_jsonl(out / "predictions.jsonl")
    assert (preds["g0"].text, preds["g3"].text) == ("kept", "also") and len(preds) == 7
    asked.clear()
    evaluate(Toy(toy_data), tiny_eval_model, out, "tiny")  # everything answered: nothing runs again
    assert asked == []


def test_another_model_sets_the_earlier_run_aside(toy_data, tiny_eval_model):
    out = toy_data / "out"
    evaluate(Toy(toy_data, limit=2), tiny_eval_model, out, "model A")
    first = (out / "predictions.jsonl").read_text()
    evaluate(Toy(toy_data, limit=2), tiny_eval_model, out, "model B")
    (aside,) = out.glob("earlier-*")
    assert (aside / "predictions.jsonl").read_text() == first
    assert json.loads((aside / "run.json").read_text())["model"] == "model A"
    assert json.loads((out / "run.json").read_text())["model"] == "model B"


def test_answers_to_other_prompts_are_not_resumed(toy_data, tiny_eval_model):
    class LongerToy(Toy):  # the same ids, asked with another decoding setting (a task option, say)
        def requests(self) -> list[Request]:
            return [
                Request(r.id, r.prompt, r.images, r.choices, max_new_tokens=6) for r in super().requests()
            ]

    out = toy_data / "out"
    evaluate(Toy(toy_data, limit=3), tiny_eval_model, out, "tiny")
    first = (out / "predictions.jsonl").read_text()
    evaluate(LongerToy(toy_data, limit=3), tiny_eval_model, out, "tiny")
    (aside,) = out.glob("earlier-*")
    assert (aside / "predictions.jsonl").read_text() == first
    fresh = read_predictions_jsonl(out / "predictions.jsonl")
    assert {p.request for p in fresh.values()} == {
        r.fingerprint() for r in LongerToy(toy_data, limit=3).requests()
    }


class Drawing(Task):
    """Two text-to-image requests (one id that is no file name) and one edit of an image."""

    name = "drawing"

    def requests(self) -> list[Request]:
        t2i = "USER: a red square Generate an image based on the description. ASSISTANT:"
        return [
            Request("coco/1", t2i, output="image"),
            Request("2", t2i.replace("red", "blue"), output="image"),
            Request(
                "edit", "USER: <image> Make it green. ASSISTANT:", [str(self.data / "0.png")], output="image"
            ),
        ]

    def score(self, predictions: dict[str, Prediction]) -> dict:
        return {"drawn": sum(p.image is not None for p in predictions.values())}

    def table(self, scores: dict) -> str:
        return markdown_table(["drawn"], [[scores["drawn"]]])


def test_image_requests_are_drawn_as_pngs_and_set_aside_with_their_run(toy_data, tiny_eval_model):
    out = toy_data / "out"
    assert evaluate(Drawing(toy_data), tiny_eval_model, out, "model A", batch_size=2) == {"drawn": 3}
    preds = read_predictions_jsonl(out / "predictions.jsonl")
    files = [preds[i].image for i in ("coco/1", "2", "edit")]
    assert files[1].endswith("images/2.png") and "/" not in files[0].rsplit("images/", 1)[1]
    size = tiny_eval_model.config.vqgan.resolution
    assert all(Image.open(f).size == (size, size) and Image.open(f).format == "PNG" for f in files)
    # greedy: the same prompt draws the same image, alone or in another batch
    again = evaluate(Drawing(toy_data), tiny_eval_model, toy_data / "again", "model A", batch_size=1)
    redrawn = read_predictions_jsonl(toy_data / "again" / "predictions.jsonl")["2"].image
    assert again == {"drawn": 3} and np.array_equal(
        np.asarray(Image.open(redrawn)), np.asarray(Image.open(files[1]))
    )
    evaluate(Drawing(toy_data), tiny_eval_model, out, "model B")  # another model: the images go aside too
    (aside,) = out.glob("earlier-*")
    assert sorted(p.name for p in (aside / "images").iterdir()) == sorted(Path(f).name for f in files)


def test_two_processes_share_the_items_and_their_parts_are_merged(toy_data, tiny_eval_model):
    out = toy_data / "out"
    evaluate(
        Toy(toy_data),
        tiny_eval_model,
        out,
        "tiny",
        batch_size=1,
        devices=2,
        accelerator="cpu",
        strategy="ddp_spawn",
    )
    preds = _lines(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == ["g0", "g1", "g2", "g3", "g4", "bad", "rank"]
    alone = toy_data / "alone"
    evaluate(Toy(toy_data), tiny_eval_model, alone, "tiny", batch_size=1)
    assert preds == _lines(alone / "predictions.jsonl")


def _prompts(n: int) -> tuple[list[Sample], torch.Tensor]:
    prompts = [Sample(["USER: ", ImageRef(i), f" Tell me {i}. ASSISTANT:"]) for i in range(n)]
    return prompts, torch.randn(n, 3, 32, 32)


def test_greedy_text_through_transformers_matches_the_project_generator(tiny_eval_model):
    prompts, pixels = _prompts(3)
    ours = generate(tiny_eval_model, prompts, pixels, max_new_tokens=8, temperature=0.0).texts
    assert [t.strip() for t in generate_text(tiny_eval_model, prompts, pixels, max_new_tokens=8)] == [
        t.strip() for t in ours
    ]


def test_beam_search_respects_the_minimum_length(tiny_eval_model):
    prompts, pixels = _prompts(2)
    tok = tiny_eval_model.llm.tokenizer
    texts = generate_text(tiny_eval_model, prompts, pixels, max_new_tokens=9, min_new_tokens=6, num_beams=3)
    assert all(6 <= len(tok(t, add_special_tokens=False).input_ids) for t in texts)


def test_the_cli_needs_a_known_task_and_well_formed_options(toy_data):
    with pytest.raises(SystemExit):
        evaluate_main(["no-such-task", "--data", str(toy_data), "--predictions", "p", "--out", "o"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        evaluate_main(
            ["world-text", "--data", str(toy_data), "--predictions", "p", "--out", "o", "--option", "x"]
        )
