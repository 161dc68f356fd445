"""DEMON (Table 3): prompts as the official runner builds them, the official scorer's rules (and our fixes
of its bugs), category means, the official prediction layout, and a run end to end on a tiny DEMON-Core
written here in the published layout."""

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from morph_lightning.evaluate import main
from morph_lightning.evaluation.runner import evaluate
from morph_lightning.evaluation.task import Prediction
from morph_lightning.evaluation.tasks import get_task
from morph_lightning.evaluation.tasks.demon import (
    Demon,
    build_prompt,
    category_of,
    choice_correct,
    image_choice_correct,
    process,
    rouge_l_f,
)


def _sample(sid, context, images, response, instruction=0, choices=None):
    instance = {"context": context, "images_path": images}
    if choices is not None:
        instance["choice_list"] = choices
    return {
        "sample_id": sid,
        "task_instruction_id": instruction,
        "task_instance": instance,
        "response": response,
    }


# dataset -> (question_type, task instructions, samples)
DEMON = {
    "Spot-the-Diff": (
        "open-ended",
        ["What's the difference? ", "Spot it. "],
        [
            _sample(0, "{image#1}{image#2}Difference:", ["0.png", "1.png"], "the car is gone."),
            # placeholders out of order and repeated: each mark gets the image it names
            _sample(1, "After {image#2}, before {image#1}, again {image#2}:", ["2.png", "3.png"], "same", 1),
        ],
    ),
    "TQA": (
        "multi-choice",
        ["Answer the question. "],
        [
            _sample(
                0,
                "{image#1}Question: what eats plants?",
                ["0.png"],
                "herbivore",
                0,
                ["herbivore", "carnivore"],
            ),
            _sample(1, "{table#1} Is it true?", ["1.png"], "false", 0, ["false", "it's true"]),
        ],
    ),
    "COMICS_Panel": (
        "multi-choice",
        ["Pick the panel. "],
        [
            _sample(
                i,
                "{image#1}{image#2} Choice List:['Image A: {image#3}', 'Image B: {image#4}']",
                [f"{i}{k}.png" for k in range(4)],
                "Image B",
            )
            for i in range(2)
        ],
    ),
    "RecipeQA_VisualCloze": (
        "multi-choice",
        ["Fill the blank. "],
        [
            _sample(
                0,
                "{image#1} UNKNOWN Image A: {image#2} Image B: {image#3}",
                ["0.png", "1.png", "2.png"],
                "Image B",
                0,
                ["Image A", "Image B"],
            )
        ],
    ),
    "ALFRED": (
        "",
        ["Decide your next step. "],
        [_sample(0, "Goal: wash. {image#1} Current Step: ", ["0.png"], "Turn left and walk to the sink.")],
    ),
    "MyTask": ("open-ended", ["Describe. "], [_sample(0, "{image#1}", ["0.png"], "a red square")]),
}
ORDER = ["ALFRED", "Spot-the-Diff", "COMICS_Panel", "RecipeQA_VisualCloze", "TQA", "MyTask"]  # Table 3's


def write_demon(root: Path, datasets=DEMON, split="core") -> Path:
    for name, (question_type, instructions, samples) in datasets.items():
        folder = root / name / split
        (folder / "images").mkdir(parents=True)
        meta = {
            "dataset": name,
            "split": split,
            "num_sample": len(samples),
            "task_instruction": instructions,
            "question_type": question_type,
        }
        (folder / f"{split}.json").write_text(json.dumps({"metadata": meta, "data": samples}))
        for sample in samples:
            for k, file in enumerate(sample["task_instance"]["images_path"]):
                Image.new("RGB", (16, 16), (40 * k, 0, 200)).save(folder / "images" / file)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_demon(tmp_path_factory.mktemp("DEMON-Core"))


# Answers with hand-computed scores. Fixed rules: Spot-the-Diff 0.5 (exact, missing), ALFRED 1, COMICS_Panel
# 0.5, VisualCloze 1 (image-choice), TQA 0.5 (no shared token is no credit), MyTask 0.
ANSWERS = {
    "Spot-the-Diff/0": "The car is gone!",
    "TQA/0": "It is a herbivore",
    "TQA/1": "no idea",  # shares no token with a choice: official argmax gives the first ("false", right)
    "COMICS_Panel/0": "Image C",
    "COMICS_Panel/1": "Image B: an image about a dog",  # official: "image about" also names "image a"
    "RecipeQA_VisualCloze/0": "Image B",  # official: TF-IDF, "image a" and "image b" are one vector
    "ALFRED/0": "turn left and walk to the sink###Human: thanks",  # cut at the model's end string
    "MyTask/0": "blue",
}


def _predictions(answers=ANSWERS) -> dict[str, Prediction]:
    return {i: Prediction(i, text=t) for i, t in answers.items()}


# ---------------------------------------------------------------- prompts


def test_prompts_as_the_official_runner_builds_them(root):
    task = Demon(root)
    requests = {r.id: r for r in task.requests()}
    assert [d.name for d in task.datasets] == ORDER
    spot = root / "Spot-the-Diff" / "core" / "images"
    r = requests["Spot-the-Diff/0"]
    assert r.prompt == "USER: What's the difference? <image><image>Difference: ASSISTANT:"
    assert r.images == [str(spot / "0.png"), str(spot / "1.png")]
    assert (r.max_new_tokens, r.num_beams, r.choices) == (100, 1, None)  # greedy generation
    r = requests["Spot-the-Diff/1"]
    assert r.prompt == "USER: Spot it. After <image>, before <image>, again <image>: ASSISTANT:"
    assert r.images == [str(spot / "3.png"), str(spot / "2.png"), str(spot / "3.png")]
    # the choice list joined as the runner writes it: no escaping of the quote in "it's true"
    assert requests["TQA/1"].prompt == (
        "USER: Answer the question. <image> Is it true?"
        "Choice list:['false', 'it's true']. Your answer is: ASSISTANT:"
    )
    assert requests["COMICS_Panel/1"].prompt.count("<image>") == 4
    assert (
        requests["ALFRED/0"].prompt
        == "USER: Decide your next step. Goal: wash. <image> Current Step:  ASSISTANT:"
    )


def test_placeholders_inside_the_choice_list_become_marks():
    text, order = build_prompt("Pick. ", "{image#1} Which?", ["Image A: {image#3}", "Image B: {image#2}"], 3)
    assert text == "Pick. <image> Which?Choice list:['Image A: <image>', 'Image B: <image>']. Your answer is:"
    assert order == [0, 2, 1]
    with pytest.raises(ValueError, match=r"name images \[1\] but images_path has 2"):
        build_prompt("", "{image#1}", None, 2)
    with pytest.raises(ValueError, match=r"name images \[1, 3\]"):
        build_prompt("", "{image#1}{image#3}", None, 2)


def test_options_limit_datasets_split_and_tokens(root, tmp_path):
    task = Demon(root, limit=1, datasets="tqa, spot-the-diff", max_new_tokens="7")
    assert [r.id for r in task.requests()] == ["Spot-the-Diff/0", "TQA/0"]
    assert {r.max_new_tokens for r in task.requests()} == {7}
    with pytest.raises(ValueError, match="no dataset Nope"):
        Demon(root, datasets="TQA,Nope")
    with pytest.raises(ValueError, match="unknown options"):
        Demon(root, colour="red")
    full = write_demon(tmp_path / "full", {"TQA": DEMON["TQA"]}, split="full")
    assert [r.id for r in Demon(full, split="full").requests()] == ["TQA/0", "TQA/1"]
    nested = tmp_path / "nested"
    write_demon(nested / "Knowledge Grounded QA", {"TQA": DEMON["TQA"]})  # the README's category folders
    assert len(Demon(nested).requests()) == 2
    assert get_task("demon") is Demon


def test_malformed_data_is_named(tmp_path):
    bad = _sample(3, "{image#1}", ["0.png"], "x")
    del bad["response"]
    write_demon(tmp_path / "a", {"TQA": ("open-ended", ["q "], [bad])})
    with pytest.raises(ValueError, match=r"TQA/core/core.json: sample 3: malformed \(KeyError: 'response'\)"):
        Demon(tmp_path / "a")
    write_demon(
        tmp_path / "b", {"TQA": ("open-ended", ["q "], [_sample(0, "{image#1}", ["0.png", "1.png"], "x")])}
    )
    with pytest.raises(ValueError, match="core.json: sample 0: its placeholders name images"):
        Demon(tmp_path / "b")
    write_demon(tmp_path / "c", {"TQA": ("yes-no", ["q "], [])})
    with pytest.raises(ValueError, match="unknown question_type 'yes-no'"):
        Demon(tmp_path / "c")
    write_demon(tmp_path / "d", {"TQA": ("open-ended", ["q "], [])})
    (tmp_path / "d" / "TQA" / "core" / "images").rmdir()
    with pytest.raises(FileNotFoundError, match="TQA has no images folder .*TQA/core/images"):
        Demon(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no <dataset>/core/core.json"):
        Demon(tmp_path / "e")


# ---------------------------------------------------------------- the scorer's rules


def test_process_is_the_vqa_punctuation_then_quotes_and_case():
    assert process("Hello, World!") == "hello world"  # ", " deleted; "!" with no space beside it: a space
    assert process("1,000 apples; (yes)") == "1000 apples yes"  # a digit-comma-digit deletes every mark
    assert process("In 1992. Then 3.5") == "in 1992 then 3.5"  # the period after a digit goes too
    assert process(" 'Image B.'\n") == "image b"
    text = "x. " * 40
    assert process(text, official=True).count(".") == 8  # the official count=32 quirk
    assert process(text).count(".") == 0


def test_rouge_l_is_rouge_1_0_1():
    assert rouge_l_f("the cat the cat the cat", "the cat sat on the mat") == pytest.approx(0.5714, abs=1e-4)
    assert rouge_l_f("a b c", "a c") == pytest.approx(0.8, abs=1e-6)  # LCS 2: R 1, P 2/3
    assert rouge_l_f("x y", "y x") == pytest.approx(0.5, abs=1e-6)
    # rouge 1.0.1 splits sentences at ".": a union LCS over "3" and "5"
    assert rouge_l_f("5 3", "3.5") == pytest.approx(1.0, abs=1e-6)


def test_tfidf_choices_official_and_fixed():
    animals = ["herbivore", "carnivore", "omnivore"]
    for official in (True, False):
        assert choice_correct("it is a herbivore", "herbivore", animals, official)
        assert not choice_correct("a carnivore", "herbivore", animals, official)
        # one-letter choices have no TF-IDF vocabulary: exact match
        assert choice_correct("b", "b", ["a", "b", "c", "d"], official)
        assert not choice_correct("c", "b", ["a", "b", "c", "d"], official)
    # no shared token: the official argmax takes the first choice, free accuracy when it is the answer
    assert choice_correct("no idea", "herbivore", animals, official=True)
    assert not choice_correct("no idea", "herbivore", animals)
    # "image a".."image d" are one vector ("a" is too short a token): officially the first always wins
    images = ["image a", "image b", "image c", "image d"]
    assert not choice_correct("image b", "image b", images, official=True)
    assert choice_correct("image c", "image a", images, official=True)
    assert choice_correct("image b", "image b", images)
    assert not choice_correct("image c", "image a", images)
    assert choice_correct("yes", "yes", ["yes", "yes", "no"])  # a tie of equal texts is one choice


def test_image_choice_rule():
    for official in (True, False):
        assert image_choice_correct("image b", "image b", official)
        assert image_choice_correct("image b is the one", "image b", official)
        assert not image_choice_correct("image b not image a", "image b", official)  # two options named
        assert not image_choice_correct("the answer is image b", "image b", official)  # first 7 characters
    assert not image_choice_correct("image b: an image about a dog", "image b", official=True)
    assert image_choice_correct("image b: an image about a dog", "image b")
    assert image_choice_correct("image bb", "image b", official=True)
    assert not image_choice_correct("image bb", "image b")


def test_categories():
    assert category_of("nuscenes") == category_of("nuScenes") == "MMR"
    assert category_of("ALFRED") == "MMD" and category_of("RecipeQA_VisualCloze") == "MMC"
    assert category_of("ManyModalQA") == "other"


# ---------------------------------------------------------------- scores


def _scored(dataset_scores: dict) -> dict:
    """A dataset's scores without its chance level (checked on its own)."""
    return {k: v for k, v in dataset_scores.items() if k != "chance"}


def test_scores_fixed(root):
    task = Demon(root)
    assert task._kind(task.datasets[3]) == "image-choice"  # RecipeQA_VisualCloze, by its real name
    scores = task.score(_predictions())
    assert (
        set(scores) == {"datasets", "categories", "chance_categories", "official_scoring"}
        and not scores["official_scoring"]
    )
    ds = scores["datasets"]
    assert list(ds) == ORDER
    assert all(set(s) == {"category", "metric", "score", "n", "missing", "chance"} for s in ds.values())
    assert _scored(ds["Spot-the-Diff"]) == {
        "category": "VRI",
        "metric": "rouge_l_f",
        "score": pytest.approx(0.5),
        "n": 2,
        "missing": 1,
    }
    assert _scored(ds["ALFRED"]) == {
        "category": "MMD",
        "metric": "rouge_l_f",
        "score": pytest.approx(1.0),
        "n": 1,
        "missing": 0,
    }
    assert _scored(ds["COMICS_Panel"]) == {
        "category": "MMC",
        "metric": "accuracy",
        "score": 0.5,
        "n": 2,
        "missing": 0,
    }
    assert ds["RecipeQA_VisualCloze"]["score"] == 1.0
    assert _scored(ds["TQA"]) == {
        "category": "KGQA",
        "metric": "accuracy",
        "score": 0.5,
        "n": 2,
        "missing": 0,
    }
    assert ds["MyTask"]["score"] == 0.0
    # chance: a uniform pick among 2 choices, 2 listed image options; another sample's response
    assert (ds["TQA"]["chance"], ds["COMICS_Panel"]["chance"], ds["Spot-the-Diff"]["chance"]) == (
        0.5,
        0.5,
        0.0,
    )
    cats = scores["categories"]
    assert list(cats) == ["MMD", "VRI", "MMC", "KGQA"]  # Table 3's order; "other" is no column
    assert cats == pytest.approx({"MMD": 100.0, "VRI": 50.0, "MMC": 75.0, "KGQA": 50.0})
    table = task.table(scores)
    assert "| Models | MMD | VST | VRI | MMC | KGQA | TRQA | MMR |" in table
    assert "| this model | 100.0 | - | 50.0 | 75.0 | 50.0 | - | - |" in table
    assert "| Morph-Tokens (paper) | 32.2 | 27.4 | 27.4 | 28.0 | 56.4 | 47.7 | 54.9 |" in table
    assert "| VPG-C (paper) | 37.5 | 25.2 | 25.9 | 22.2 | 48.6 | 44.9 | 50.3 |" in table
    assert "| Spot-the-Diff | VRI | rouge_l_f | 2 | 50.0 |" in table
    assert "| MyTask | other | rouge_l_f | 1 | 0.0 |" in table
    assert "Items without a prediction: 1." in table


def test_scores_official(root):
    task = Demon(root, official_scoring=True)
    assert task._kind(task.datasets[3]) == "multi-choice"  # "recipeqa-RecipeQA_VisualCloze" is no folder
    scores = task.score(_predictions())
    ds = scores["datasets"]
    assert _scored(ds["Spot-the-Diff"]) == {
        "category": "VRI",
        "metric": "rouge_l_f",
        "score": pytest.approx(1.0),
        "n": 1,
        "missing": 1,
    }
    assert ds["ALFRED"]["score"] == pytest.approx(1.0)  # ROUGE-L in both modes
    assert ds["COMICS_Panel"]["score"] == 0.0
    assert _scored(ds["RecipeQA_VisualCloze"]) == {
        "category": "MMC",
        "metric": "accuracy",
        "score": 0.0,
        "n": 1,
        "missing": 0,
    }
    assert ds["TQA"]["score"] == 1.0
    assert scores["official_scoring"] is True
    assert scores["categories"] == pytest.approx({"MMD": 100.0, "VRI": 100.0, "MMC": 0.0, "KGQA": 100.0})


def test_where_the_official_scorer_stops_we_score(root, tmp_path, caplog):
    answers = {k: v for k, v in ANSWERS.items() if k != "TQA/1"}
    with caplog.at_level(logging.WARNING):
        assert Demon(root, datasets="TQA").score(_predictions(answers))["datasets"]["TQA"]["missing"] == 1
    assert "TQA: 1 of 2 items have no prediction" in caplog.text
    with pytest.raises(ValueError, match="TQA: 1 items have no prediction"):
        Demon(root, datasets="TQA", official_scoring=True).score(_predictions(answers))
    errored = _predictions() | {"TQA/0": Prediction("TQA/0", error="unreadable image: missing")}
    assert _scored(Demon(root, datasets="TQA").score(errored)["datasets"]["TQA"]) == {
        "category": "KGQA",
        "metric": "accuracy",
        "score": 0.0,
        "n": 2,
        "missing": 0,
    }
    # the response is not among the choices; an empty response
    odd = {
        "TQA": ("multi-choice", ["q "], [_sample(0, "{image#1}", ["0.png"], "maybe", 0, ["yes", "no"])]),
        "MyTask": ("open-ended", ["q "], [_sample(0, "{image#1}", ["0.png"], "?")]),
    }
    write_demon(tmp_path, odd)
    scores = Demon(tmp_path).score(_predictions({"TQA/0": "Maybe.", "MyTask/0": ""}))["datasets"]
    assert (scores["TQA"]["score"], scores["MyTask"]["score"]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="TQA/0: response 'maybe' is not among the choices"):
        Demon(tmp_path, datasets="TQA", official_scoring=True).score(_predictions({"TQA/0": "maybe"}))
    with pytest.raises(ValueError, match="MyTask/0: empty response"):
        Demon(tmp_path, datasets="MyTask", official_scoring=True).score(_predictions({"MyTask/0": "x"}))


# ---------------------------------------------------------------- predictions and runs


def _write_official(out: Path, answers=ANSWERS) -> Path:
    by_dataset: dict[str, list] = {}
    for pid, text in answers.items():
        dataset, sid = pid.split("/")
        # the official scripts write lowercase folders for some ("nuscenes"); gt_response is not read
        folder = dataset.lower() if dataset == "TQA" else dataset
        by_dataset.setdefault(folder, []).append(
            {"sample_id": int(sid), "pred_response": text, "gt_response": "-"}
        )
    for folder, rows in by_dataset.items():
        (out / folder).mkdir(parents=True)
        (out / folder / "pred.json").write_text(json.dumps(rows))
    return out


def test_reads_the_official_prediction_layout(root, tmp_path):
    task = Demon(root)
    preds = task.read_predictions(_write_official(tmp_path / "official"))
    assert {i: p.text for i, p in preds.items()} == ANSWERS
    assert task.score(preds) == task.score(_predictions())
    (tmp_path / "official" / "MyTask" / "pred.json").write_text(json.dumps([{"id": 0}]))
    with pytest.raises(ValueError, match="MyTask/pred.json: not an official pred.json"):
        task.read_predictions(tmp_path / "official")
    jsonl = tmp_path / "predictions.jsonl"
    jsonl.write_text("".join(json.dumps(p.to_json()) + "\n" for p in _predictions().values()))
    assert task.read_predictions(jsonl) == task.read_predictions(tmp_path) == _predictions()


def test_evaluate_end_to_end(root, tmp_path, tiny_eval_model):
    task = Demon(root, limit=1, max_new_tokens=4)
    scores = evaluate(task, tiny_eval_model, tmp_path / "out", "tiny")
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r.id for r in task.requests()]
    assert len(lines) == len(ORDER)
    assert all("error" not in json.loads(line) for line in lines)
    written = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert written == json.loads(json.dumps(scores))
    assert {s["n"] for s in written["datasets"].values()} == {1}
    assert list(written["categories"]) == ["MMD", "VRI", "MMC", "KGQA"]
    assert all(0 <= v <= 100 for v in written["categories"].values())
    assert "| Models | MMD |" in (tmp_path / "out" / "table.md").read_text()


def test_cli_scores_official_predictions(root, tmp_path):
    preds = _write_official(tmp_path / "official")
    scores = main(["demon", "--data", str(root), "--predictions", str(preds), "--out", str(tmp_path / "a")])
    assert scores["categories"] == pytest.approx({"MMD": 100.0, "VRI": 50.0, "MMC": 75.0, "KGQA": 50.0})
    assert json.loads((tmp_path / "a" / "scores.json").read_text())["categories"]["MMC"] == 75.0
    assert (
        "| this model | 100.0 | - | 50.0 | 75.0 | 50.0 | - | - |" in (tmp_path / "a" / "table.md").read_text()
    )
    argv = ["demon", "--data", str(root), "--predictions", str(preds), "--out", str(tmp_path / "b")]
    scores = main([*argv, "--official-scoring", "--option", "datasets=RecipeQA_VisualCloze,COMICS_Panel"])
    assert scores["official_scoring"] and scores["categories"] == {"MMC": 0.0}
