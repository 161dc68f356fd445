"""MME: the release's two folder layouts, the official scoring on hand-computed cases, the official results
format both ways, and a run of the tiny model through the evaluation runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from morph_lightning.evaluate import main as evaluate_main
from morph_lightning.evaluation.runner import evaluate
from morph_lightning.evaluation.task import Prediction
from morph_lightning.evaluation.tasks import get_task
from morph_lightning.evaluation.tasks.mme import MME, parse_response

ASK = " Please answer yes or no."
# subtask -> layout, {image file: ((question, answer), (question, answer))}
DATA = {
    "existence": (
        "flat",
        {
            "000000006040.jpg": (
                ("Is there a train in this image?", "Yes"),
                ("Is there a bed in this image?", "No"),
            ),
            "000000044279.jpg": (
                ("Is there a dog in this image?", "Yes"),
                ("Is there a cat in this image?", "No"),
            ),
        },
    ),
    "count": (
        "flat",
        {"000000067213.jpg": (("Are there two dogs?", "Yes"), ("Are there three dogs?", "No"))},
    ),
    "artwork": (
        "split",
        {
            "10002.jpg": (("Is this artwork by Gozzoli?", "Yes"), ("Is this artwork by Monet?", "No")),
            "10049.jpg": (("Is this a portrait?", "Yes"), ("Is this a landscape?", "No")),
        },
    ),
    "code_reasoning": (
        "flat",
        {"0020.png": (("Does the code print 6?", "Yes"), ("Does the code print 7?", "No"))},
    ),
}


def make_mme(base: Path) -> Path:
    """A tiny MME as the hub's zip unpacks it (subtasks under MME_Benchmark_release_version/MME_Benchmark),
    with both folder styles; returns the folder to pass as --data."""
    root = base / "MME_Benchmark_release_version" / "MME_Benchmark"
    for n, (subtask, (layout, images)) in enumerate(DATA.items()):
        folder = root / subtask
        image_dir, text_dir = (
            (folder / "images", folder / "questions_answers_YN") if layout == "split" else (folder, folder)
        )
        image_dir.mkdir(parents=True, exist_ok=True)
        text_dir.mkdir(parents=True, exist_ok=True)
        for k, (name, qa) in enumerate(images.items()):
            Image.new("RGB", (40, 30), (40 * n, 90 * k, 200)).save(image_dir / name)
            lines = [f"{q}{ASK}\t{a}" for q, a in qa]
            (text_dir / Path(name).with_suffix(".txt").name).write_text("\n".join(lines) + "\n")
    return base


@pytest.fixture
def mme_dir(tmp_path: Path) -> Path:
    return make_mme(tmp_path / "data")


def qid(subtask: str, image: str, line: int) -> str:
    return f"{subtask}/{image}#{line}"


@pytest.mark.parametrize(
    "response, label",
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("NO", "no"),
        (" yes", "yes"),  # " yes" is within the first 4 characters
        ("  yes", "other"),  # "  ye" is not
        ("not sure", "no"),
        ("nope", "no"),
        ("none", "no"),
        ("know", "no"),
        ("noyes", "no"),  # "noye": no "yes", but "no"
        ("Yesterday", "yes"),
        ("I don't know", "other"),
        ("The answer is yes", "other"),
        ("y", "other"),
        ("", "other"),
    ],
)
def test_parse_response_follows_the_official_four_character_rule(response, label):
    assert parse_response(response) == label


def test_reads_both_layouts_in_the_official_order(mme_dir):
    task = MME(mme_dir)
    assert task.name == "mme" and get_task("mme") is MME
    requests = task.requests()
    assert [r.id for r in requests][:4] == [
        qid("existence", "000000006040.jpg", 0),
        qid("existence", "000000006040.jpg", 1),
        qid("existence", "000000044279.jpg", 0),
        qid("existence", "000000044279.jpg", 1),
    ]
    # perception subtasks (existence, count, artwork) before cognition (code_reasoning)
    assert [q.subtask for q in task.questions[::2]] == ["existence"] * 2 + ["count", "artwork", "artwork"] + [
        "code_reasoning"
    ]
    art = next(r for r in requests if r.id == qid("artwork", "10002.jpg", 1))
    assert art.prompt == "USER: <image> Is this artwork by Monet? Please answer yes or no. ASSISTANT:"
    assert (
        Path(art.images[0])
        == mme_dir / "MME_Benchmark_release_version/MME_Benchmark/artwork/images/10002.jpg"
    )
    code = next(r for r in requests if r.id.startswith("code_reasoning"))
    assert Path(code.images[0]).name == "0020.png" and Path(code.images[0]).parent.name == "code_reasoning"
    assert all(r.max_new_tokens == 16 and r.num_beams == 1 for r in requests)
    assert [q.answer for q in task.questions[:2]] == ["Yes", "No"]


def test_data_may_name_any_level_of_the_release(mme_dir):
    for data in (
        mme_dir,
        mme_dir / "MME_Benchmark_release_version",
        mme_dir / "MME_Benchmark_release_version/MME_Benchmark",
    ):
        assert len(MME(data).requests()) == 12
    with pytest.raises(FileNotFoundError, match="no subtask folders"):
        MME(mme_dir / "MME_Benchmark_release_version/MME_Benchmark/existence")


def test_limit_keeps_whole_images_per_subtask_and_options_apply(mme_dir):
    task = MME(mme_dir, limit=1, max_new_tokens="8")
    ids = [r.id for r in task.requests()]
    assert len(ids) == 8  # the first image of each of the 4 subtasks, both its questions
    assert (
        qid("existence", "000000006040.jpg", 1) in ids and qid("existence", "000000044279.jpg", 0) not in ids
    )
    assert {r.max_new_tokens for r in task.requests()} == {8}
    with pytest.raises(ValueError, match="unknown options"):
        MME(mme_dir, temperature="0")


def test_an_image_needs_two_questions(mme_dir):
    path = mme_dir / "MME_Benchmark_release_version/MME_Benchmark/count/000000067213.txt"
    path.write_text(path.read_text() + "Are there four dogs? Please answer yes or no.\tNo\n")
    with pytest.raises(ValueError, match="3 questions"):
        MME(mme_dir).requests()


# Responses and what they score (hand-computed):
# existence   img1 "Yes." (Yes) ok, "not sure" (No) ok; img2 "nope" (Yes) wrong, "I don't know" (No) other
#             -> acc 2/4, acc+ 1/2 -> 50 + 50 = 100
# count       " yes" (Yes) ok, "yes" (No) wrong -> acc 1/2, acc+ 0 -> 50
# artwork     "Yes" ok, "No" ok; "The answer is yes" (Yes) other, "no" ok -> acc 3/4, acc+ 1/2 -> 125
# code        (no prediction) wrong, "No, it prints 6" (No) ok -> acc 1/2, acc+ 0 -> 50
RESPONSES = {
    qid("existence", "000000006040.jpg", 0): "Yes.",
    qid("existence", "000000006040.jpg", 1): "not sure",
    qid("existence", "000000044279.jpg", 0): "nope",
    qid("existence", "000000044279.jpg", 1): "I don't know",
    qid("count", "000000067213.jpg", 0): " yes",
    qid("count", "000000067213.jpg", 1): "yes",
    qid("artwork", "10002.jpg", 0): "Yes",
    qid("artwork", "10002.jpg", 1): "No",
    qid("artwork", "10049.jpg", 0): "The answer is yes",
    qid("artwork", "10049.jpg", 1): "no",
    qid("code_reasoning", "0020.png", 1): "No, it prints 6",
}


def predictions(responses: dict[str, str]) -> dict[str, Prediction]:
    return {i: Prediction(i, text=t) for i, t in responses.items()}


def test_scores_match_hand_computed_acc_acc_plus_and_sums(mme_dir):
    task = MME(mme_dir)
    scores = task.score(predictions(RESPONSES))
    sub = scores["subtasks"]
    assert sub["existence"] == {"acc": 0.5, "acc_plus": 0.5, "score": 100.0, "n": 4}
    assert sub["count"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0, "n": 2}
    assert sub["artwork"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "n": 4}
    assert sub["code_reasoning"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0, "n": 2}
    assert scores["perception"] == 275.0 and scores["cognition"] == 50.0
    # an unreadable image is answered by an error and scores as wrong
    errored = predictions(RESPONSES) | {
        qid("count", "000000067213.jpg", 0): Prediction("x", error="bad image")
    }
    assert task.score(errored)["subtasks"]["count"]["acc"] == 0.0


def test_score_bounds(mme_dir):
    task = MME(mme_dir)
    right = task.score(predictions({q.id: q.answer for q in task.questions}))
    assert all(s["score"] == 200.0 for s in right["subtasks"].values())
    assert right["perception"] == 600.0 and right["cognition"] == 200.0
    always_yes = task.score(predictions({q.id: "yes" for q in task.questions}))
    assert all(s["acc"] == 0.5 and s["acc_plus"] == 0.0 for s in always_yes["subtasks"].values())
    assert task.score({})["perception"] == 0.0


def test_table_has_the_paper_rows_and_every_subtask(mme_dir):
    task = MME(mme_dir)
    table = task.table(task.score(predictions(RESPONSES)))
    assert "| Morph-Tokens (paper) | 1477.7 | 389.3 |" in table
    assert "| InstructBLIP (paper) | 1212.8 | 291.8 |" in table
    assert "| this model | 275.0 | 50.0 |" in table
    assert "| artwork | perception | 75.0 | 50.0 | 125.0 | 4 |" in table
    assert "| OCR | perception | - | - | - | - |" in table  # absent from the tiny data
    assert "perception sums 3 of its 10 subtasks" in table


def test_official_results_round_trip(mme_dir, tmp_path):
    task = MME(mme_dir)
    responses = RESPONSES | {qid("count", "000000067213.jpg", 1): "yes\tand\nmore"}
    paths = task.write_official_results(predictions(responses), tmp_path / "official")
    assert sorted(p.name for p in paths) == [
        "artwork.txt",
        "code_reasoning.txt",
        "count.txt",
        "existence.txt",
    ]
    lines = (tmp_path / "official/count.txt").read_text().splitlines()
    assert lines == [
        f"000000067213.jpg\tAre there two dogs?{ASK}\tYes\t yes",
        f"000000067213.jpg\tAre there three dogs?{ASK}\tNo\tyes and more",  # one line, four fields
    ]
    code = (tmp_path / "official/code_reasoning.txt").read_text().splitlines()
    assert code[0] == f"0020.png\tDoes the code print 6?{ASK}\tYes\t"  # unanswered: empty response
    art = (tmp_path / "official/artwork.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in art] == ["10002.jpg", "10002.jpg", "10049.jpg", "10049.jpg"]
    back = task.read_predictions(tmp_path / "official")
    assert task.score(back) == task.score(predictions(responses))


def test_reads_official_results_written_elsewhere(mme_dir, tmp_path):
    official = tmp_path / "official"
    official.mkdir()
    # CRLF line ends and a question with its spaces changed, as other conversion scripts write them
    (official / "count.txt").write_bytes(
        b"000000067213.jpg\tAre there  two dogs?  Please answer yes or no.\tYes\tYes\r\n"
        b"000000067213.jpg\tAre there three dogs? Please answer yes or no.\tNo\tNo\r\n"
    )
    task = MME(mme_dir)
    preds = task.read_predictions(official)
    assert {i: p.text for i, p in preds.items()} == {
        qid("count", "000000067213.jpg", 0): "Yes",
        qid("count", "000000067213.jpg", 1): "No",
    }
    assert task.score(preds)["subtasks"]["count"]["score"] == 200.0
    (official / "count.txt").write_text(
        "000000067213.jpg\tAre there two dogs? Please answer yes or no.\tYes\n"
    )
    with pytest.raises(ValueError, match="count.txt:1: expected"):
        task.read_predictions(official)
    (official / "count.txt").write_text("000000067213.jpg\tAre there seven dogs?\tYes\tyes\n")
    with pytest.raises(ValueError, match="no question"):
        task.read_predictions(official)
    with pytest.raises(FileNotFoundError, match="no official results"):
        task.read_predictions(tmp_path)


def test_runs_end_to_end_and_scores_the_official_folder_through_the_cli(mme_dir, tiny_eval_model, tmp_path):
    task = MME(mme_dir)
    out = tmp_path / "out"
    scores = evaluate(task, tiny_eval_model, out, "tiny", batch_size=4)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r.id for r in task.requests()]
    assert json.loads((out / "scores.json").read_text()) == scores
    assert set(scores) == {"perception", "cognition", "subtasks"}
    assert set(scores["subtasks"]) == {"existence", "count", "artwork", "code_reasoning"}
    assert "| Morph-Tokens (paper) | 1477.7 | 389.3 |" in (out / "table.md").read_text()

    task.write_official_results(task.read_predictions(out / "predictions.jsonl"), tmp_path / "official")
    again = evaluate_main(
        [
            "mme",
            "--data",
            str(mme_dir),
            "--predictions",
            str(tmp_path / "official"),
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    assert again == scores
