"""The QA benchmarks: the official VQA normalisation and accuracy on hand-worked cases, every published
layout read from a tiny folder built here, the scorers on hand-computed predictions, and each task end to
end with the tiny random model."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from morph_lightning.data_modules.transforms import BadImage
from morph_lightning.evaluation.runner import evaluate
from morph_lightning.evaluation.task import Prediction
from morph_lightning.evaluation.tasks import get_task
from morph_lightning.evaluation.tasks.video_qa import FolderFrame, VideoFrame, sample_indices, video_frames
from morph_lightning.evaluation.tasks.vqa import GQA, VSR, HatefulMemes, IconQA, VQAv2
from morph_lightning.evaluation.vqa_normalise import (
    exact_match,
    normalise_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)

FAST = {"num_beams": "2", "max_new_tokens": "3", "min_new_tokens": "1"}  # CLI-style strings


def _image(path, shade=128, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, 255 - shade, 40)).save(path)


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- normalisation and accuracy


@pytest.mark.parametrize(
    "text, out",
    [
        ("yes.", "yes"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.", "3"),
        ("red-white", "red white"),  # a mark with no space beside it becomes a space
        ("red - white", "red  white"),  # one with a space beside it is deleted
        ("1,000", "1000"),
        ("a-b 1,2", "ab 12"),  # a digit-comma-digit anywhere deletes every mark
        ("what?!", "what  "),
        ("don't", "don't"),  # the apostrophe is not in the official list
        ("." * 40 + "x", "." * 8 + "x"),  # at most 32 periods go
    ],
)
def test_process_punctuation(text, out):
    assert process_punctuation(text) == out


@pytest.mark.parametrize(
    "text, out",
    [
        ("None", "0"),
        ("Two Dogs", "2 dogs"),
        ("the cat and a dog", "cat and dog"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("somebody'd", "somebodyd"),  # the official table's backwards entry
        ("  Ten   apples ", "10 apples"),
    ],
)
def test_process_digit_article(text, out):
    assert process_digit_article(text) == out


def test_normalise_and_exact_match():
    assert normalise_answer("The Two dogs!") == "2 dogs"
    assert exact_match("A dog.", "dog") and exact_match("Zero", "0")
    assert not exact_match("dogs", "dog")


@pytest.mark.parametrize("agree, acc", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(agree, acc):
    # k agreeing humans: leaving one of them out leaves k-1 matches (k subsets), another leaves k (10-k).
    assert vqa_accuracy("blue", ["blue"] * agree + ["red"] * (10 - agree)) == pytest.approx(acc)


def test_vqa_accuracy_normalises_both_sides_unless_official():
    assert vqa_accuracy("Two", ["2", "2", "2", "two", "3"] + ["4"] * 5) == pytest.approx(1.0)
    # The official script normalises nothing when every human gave the same answer.
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, official=True) == 0.0
    assert vqa_accuracy("Yes.", ["yes"] * 9 + ["no"], official=True) == 1.0
    assert vqa_accuracy("a\tdog", ["dog"] * 3 + ["cat"] * 7, official=True) == pytest.approx(0.9)


# ---------------------------------------------------------------- tiny folders in the published layouts


def vqav2_dir(root):
    questions, annotations = [], []
    for qid, (image_id, answers, kind) in enumerate(
        [
            (42, ["2"] * 10, "number"),
            (7, ["yes"] * 9 + ["no"], "yes/no"),
            (42, ["red"] * 2 + ["blue"] * 8, "other"),
        ]
    ):
        questions.append({"image_id": image_id, "question": f"Question {qid}?", "question_id": 1000 + qid})
        annotations.append(
            {
                "question_id": 1000 + qid,
                "image_id": image_id,
                "answer_type": kind,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
            }
        )
        _image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", shade=image_id)
    _json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions})
    _json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    return root


def gqa_dir(root, official=True):
    rows = [("n1", "Is it red?", "yes"), ("n2", "What is on the table?", "the cup"), ("n1", "Colour?", "red")]
    if official:
        _json(
            root / "testdev_balanced_questions.json",
            {
                f"q{k}": {"imageId": img, "question": q, "answer": a, "fullAnswer": a}
                for k, (img, q, a) in enumerate(rows)
            },
        )
    else:
        lavis = [
            {"image": f"{img}.jpg", "question": q, "answer": a, "question_id": f"q{k}"}
            for k, (img, q, a) in enumerate(rows)
        ]
        _json(root / "testdev_balanced_questions.json", lavis)
    for img in ("n1", "n2"):
        _image(root / "images" / f"{img}.jpg")
    return root


def vsr_dir(root):
    rows = [
        ("000000000001.jpg", "The cat is on the mat.", 1),
        ("000000000002.jpg", "The dog is under the car.", 0),
    ]
    _jsonl(
        root / "test.jsonl",
        [{"image": i, "caption": c, "label": label, "relation": "on"} for i, c, label in rows],
    )
    for image, _, _ in rows:
        _image(root / "images" / image)
    return root


def iconqa_minigpt_dir(root):
    rows = [
        {"image_id": "101", "question": "Which is bigger?", "choices": ["the cat", "the dog"], "answer": 1},
        {"image_id": "102", "question": "How many?", "choices": ["1", "2", "3"], "answer": 2},
    ]
    _json(root / "choose_text_val.json", rows)
    for row in rows:
        _image(root / "iconvqa_images" / row["image_id"] / "image.png")
    return root


def iconqa_original_dir(root):
    problems = {
        "11": {
            "question": "Which?",
            "choices": ["a", "b"],
            "answer": 0,
            "ques_type": "choose_txt",
            "split": "test",
        },
        "12": {
            "question": "Count?",
            "choices": ["4", "5", "6"],
            "answer": 1,
            "ques_type": "choose_txt",
            "split": "test",
        },
        "13": {"question": "Blank?", "answer": "7", "ques_type": "fill_in_blank", "split": "test"},
    }
    _json(root / "problems.json", problems)
    _json(root / "pid_splits.json", {"choose_txt_test": ["11", "12"], "fill_in_blank_test": ["13"]})
    for pid in ("11", "12"):
        _image(root / "iconqa" / "test" / "choose_txt" / pid / "image.png")
    return root


def hateful_memes_dir(root):
    rows = [(42953, 1, "its their character not their color"), (23058, 0, "don't be afraid to love again")]
    _jsonl(
        root / "dev_seen.jsonl",
        [{"id": i, "img": f"img/{i}.png", "label": label, "text": t} for i, label, t in rows],
    )
    for i, _, _ in rows:
        _image(root / "img" / f"{i}.png")
    return root


def write_video(path, shades, size=32):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for shade in shades:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), shade, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


SHADES = [0, 30, 60, 90, 120, 150, 180, 210]  # frame k is shade 30k


def video_qa_dir(root, suffix=".avi"):
    rows = [
        {"video": f"vid1{suffix}", "question": "what is the man doing?", "answer": "dance", "question_id": 0},
        {"video": f"vid2{suffix}", "question": "who is singing?", "answer": "woman", "question_id": 1},
    ]
    _json(root / "qa_test.json", rows)
    for row in rows:
        write_video(root / "videos" / row["video"], SHADES)
    return root


# ---------------------------------------------------------------- reading and scoring


def _preds(**texts):
    return {k: Prediction(k, text=v) for k, v in texts.items()}


def test_vqav2_reads_the_official_files_and_scores_vqa_accuracy(tmp_path):
    task = VQAv2(vqav2_dir(tmp_path))
    reqs = task.requests()
    assert [r.id for r in reqs] == ["1000", "1001", "1002"]
    assert reqs[0].prompt == "USER: <image> Question: Question 0? Short Answer: ASSISTANT:"
    assert reqs[0].images[0].endswith("val2014/COCO_val2014_000000000042.jpg")
    assert (reqs[0].num_beams, reqs[0].max_new_tokens, reqs[0].min_new_tokens, reqs[0].length_penalty) == (
        5,
        10,
        1,
        -1.0,
    )
    scores = task.score(_preds(**{"1000": "Two", "1001": "yes.###", "1002": "red"}))  # 1, 1, 0.6
    assert scores["accuracy"] == pytest.approx(100 * 2.6 / 3)
    assert scores["per_answer_type"] == pytest.approx({"number": 100.0, "other": 60.0, "yes/no": 100.0})
    # Unanswered items score 0; the official normalisation skips the unanimous "2".
    official = VQAv2(tmp_path, official_scoring=True).score(_preds(**{"1000": "Two", "1001": "yes"}))
    assert official["accuracy"] == pytest.approx(100 / 3) and official["answered"] == 2


@pytest.mark.parametrize("official", [True, False])
def test_gqa_reads_both_layouts_and_scores_normalised_exact_match(tmp_path, official):
    task = GQA(gqa_dir(tmp_path, official))
    assert [r.id for r in task.requests()] == ["q0", "q1", "q2"]
    assert task.requests()[1].images[0].endswith("images/n2.jpg")
    scores = task.score(_preds(q0="Yes", q1="A cup.", q2="blue"))
    assert scores["accuracy"] == pytest.approx(200 / 3)
    assert "| GQA accuracy |" in task.table(scores) and "Morph-Tokens (paper) | 56.8" in task.table(scores)


def test_vsr_ranks_the_verbalisers(tmp_path):
    task = VSR(vsr_dir(tmp_path))
    req = task.requests()[0]
    assert req.choices == ["yes", "true", "no", "false"] and "The cat is on the mat." in req.prompt
    preds = {
        # positive max(-1, -5) = -1 < negative max(-2, -0.5): judged false, the label is true
        "0": Prediction("0", "yes", choice_logprobs=[-1.0, -5.0, -2.0, -0.5], choice_tokens=[1] * 4),
        # positive -0.3 > negative max(-0.4, -0.4): judged true, the label is false
        "1": Prediction("1", "no", choice_logprobs=[-0.3, -9.0, -0.4, -0.4], choice_tokens=[1] * 4),
    }
    assert task.score(preds)["accuracy"] == 0.0
    preds["0"].choice_logprobs = [-0.1, -5.0, -2.0, -0.5]
    preds["1"].choice_logprobs = [-3.0, -9.0, -0.4, -5.0]
    assert task.score(preds)["accuracy"] == 100.0
    assert task.score(_preds(**{"0": "True", "1": "maybe"}))["accuracy"] == 50.0  # text-only predictions


def test_iconqa_reads_minigpt_v2_layout_and_takes_the_most_likely_choice(tmp_path):
    task = IconQA(iconqa_minigpt_dir(tmp_path))
    assert [(i.id, i.choices, i.answer) for i in task.items] == [
        ("101", ["the cat", "the dog"], 1),
        ("102", ["1", "2", "3"], 2),
    ]
    assert task.requests()[0].images == [str(tmp_path / "iconvqa_images" / "101" / "image.png")]
    assert task.requests()[1].choices == ["1", "2", "3"]
    right = {
        "101": Prediction("101", choice_logprobs=[-3.0, -1.0]),
        "102": Prediction("102", choice_logprobs=[-2.0, -4.0, -1.5]),
    }
    assert task.score(right)["accuracy"] == 100.0
    right["102"].choice_logprobs = [-2.0, -1.0, -4.0]
    assert task.score(right)["accuracy"] == 50.0
    assert task.score(_preds(**{"101": "The dog."}))["accuracy"] == 50.0  # text matched to a choice


def test_iconqa_reads_the_original_layout(tmp_path):
    task = IconQA(iconqa_original_dir(tmp_path))
    assert [(i.id, i.choices, i.answer) for i in task.items] == [
        ("11", ["a", "b"], 0),
        ("12", ["4", "5", "6"], 1),
    ]
    assert task.requests()[1].images == [
        str(tmp_path / "iconqa" / "test" / "choose_txt" / "12" / "image.png")
    ]
    with pytest.raises(ValueError, match="choose_txt_val"):
        IconQA(tmp_path, split="val")


def _hm_pred(id, p_yes, tokens=(1, 1)):
    # Mean per-token log-probs whose softmax gives p(yes): logit(p) apart.
    lp = [0.0, math.log(p_yes / (1 - p_yes)) * tokens[1]]
    return Prediction(id, choice_logprobs=lp, choice_tokens=list(tokens))


def test_hateful_memes_auc_on_a_hand_case(tmp_path):
    rows = [(1, 0.9), (0, 0.2), (1, 0.4), (0, 0.6)]
    _jsonl(
        tmp_path / "dev_seen.jsonl",
        [{"id": k, "img": f"img/{k}.png", "label": y, "text": "t"} for k, (y, _) in enumerate(rows)],
    )
    _image(tmp_path / "img" / "0.png")
    task = HatefulMemes(tmp_path)
    assert task.requests()[0].choices == ["no", "yes"]
    preds = {str(k): _hm_pred(str(k), p, tokens=(1, 3)) for k, (_, p) in enumerate(rows)}
    # p(yes) from the mean per-token log-probs (the sums, 3x apart, would give 0.9986)
    assert task.p_yes(task.items[0], preds["0"]) == pytest.approx(0.9)
    # Positive-negative pairs ranked right: (.9,.2) (.9,.6) (.4,.2), wrong: (.4,.6) -> 3/4.
    scores = task.score(preds)
    assert scores["roc_auc"] == pytest.approx(75.0) and scores["accuracy"] == 50.0
    # A missing prediction counts as confidently wrong: p(yes) 0 for the first meme, right only over (.4, .2).
    del preds["0"]
    assert task.score(preds)["roc_auc"] == pytest.approx(25.0)


# ---------------------------------------------------------------- video frames


def test_uniform_frame_indices():
    assert sample_indices(8, 4) == [1, 3, 5, 7]
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(2, 4) == [0, 0, 1, 1]


@pytest.mark.parametrize("suffix", [".avi", ".mp4", ".mkv"])  # .mkv stores no frame count
def test_video_frames_are_sampled_uniformly(tmp_path, suffix):
    path = tmp_path / f"v{suffix}"
    write_video(path, SHADES)
    frames = [VideoFrame(str(path), i, 4)() for i in range(4)]
    shades = [np.asarray(Image.open(io.BytesIO(f)).convert("L")).mean() for f in frames]
    assert shades == pytest.approx([30, 90, 150, 210], abs=12)  # frames 1, 3, 5, 7, after lossy coding


def test_unreadable_videos_and_frame_folders(tmp_path):
    with pytest.raises(BadImage, match="missing"):
        video_frames(str(tmp_path / "none.avi"), 4)
    (tmp_path / "bad.avi").write_bytes(b"not a video")
    with pytest.raises(BadImage, match="corrupt"):
        video_frames(str(tmp_path / "bad.avi"), 4)
    for k in (1, 2, 10, 11):  # natural order: 1 2 10 11
        _image(tmp_path / "frames" / f"frame_{k}.jpg", shade=k)
    assert (
        FolderFrame(str(tmp_path / "frames"), 3, 4)() == (tmp_path / "frames" / "frame_11.jpg").read_bytes()
    )
    assert FolderFrame(str(tmp_path / "frames"), 0, 2)() == (tmp_path / "frames" / "frame_2.jpg").read_bytes()


def test_video_qa_requests(tmp_path):
    task = get_task("msvd-qa")(video_qa_dir(tmp_path))
    req = task.requests()[0]
    assert (
        req.prompt
        == "USER: <image> <image> <image> <image> Question: what is the man doing? Short Answer: ASSISTANT:"
    )
    assert (
        req.images[2] == VideoFrame(str(tmp_path / "videos" / "vid1.avi"), 2, 4) and req.max_new_tokens == 30
    )
    assert get_task("msrvtt-qa")(tmp_path).requests()[0].max_new_tokens == 10
    assert task.score(_preds(**{"0": "Dance.", "1": "a man"}))["accuracy"] == 50.0
    for k in range(3):
        _image(tmp_path / "frames" / "vid1" / f"{k}.png")
    framed = get_task("msvd-qa")(tmp_path, frames="frames", num_frames="2").requests()[0]
    assert framed.images == [FolderFrame(str(tmp_path / "frames" / "vid1"), i, 2) for i in range(2)]


def test_options_are_typed_and_checked(tmp_path):
    vsr_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown options"):
        VSR(tmp_path, num_beams="3")
    with pytest.raises(FileNotFoundError, match="option images"):
        VSR(tmp_path, images="elsewhere/../nowhere")
    with pytest.raises(ValueError, match="expected int"):
        GQA(gqa_dir(tmp_path / "g"), max_new_tokens="many")
    assert len(VSR(tmp_path, limit=1).requests()) == 1


# ---------------------------------------------------------------- end to end with the tiny model

E2E = {
    "vqav2": (vqav2_dir, FAST),
    "gqa": (gqa_dir, FAST),
    "vsr": (vsr_dir, {}),
    "iconqa": (iconqa_minigpt_dir, {}),
    "hateful-memes": (hateful_memes_dir, {}),
    "msvd-qa": (video_qa_dir, FAST),
    "msrvtt-qa": (video_qa_dir, FAST),
}


@pytest.mark.parametrize("name", sorted(E2E))
def test_end_to_end_with_the_tiny_model(tmp_path, tiny_eval_model, name):
    build, options = E2E[name]
    task = get_task(name)(build(tmp_path / "data"), **options)
    scores = evaluate(task, tiny_eval_model, tmp_path / "out", "tiny", batch_size=4)
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    preds = [json.loads(line) for line in lines]
    assert [p["id"] for p in preds] == [r.id for r in task.requests()]
    assert all("error" not in p for p in preds)
    if task.requests()[0].choices:  # ranked: the answer is the most likely choice
        for p, r in zip(preds, task.requests(), strict=True):
            assert p["text"] == r.choices[int(np.argmax(p["choice_logprobs"]))]
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == scores
    assert scores["answered"] == len(preds) and "this run" in (tmp_path / "out" / "table.md").read_text()
