"""`generate` and `chat` end to end on a tiny random model saved as a stage checkpoint (and an export):
answers printed and written, bad prompt lines skipped and counted, generated images as PNG files of the
model's image size, earlier outputs kept, and a scripted chat whose edits chain."""

import io
import json
import sys

import pytest
import torch
from PIL import Image

from conftest import tiny_model_config
from morph_lightning import chat, generate, inference
from morph_lightning.export import export_model, model_from_checkpoint
from morph_lightning.modeling.llm import MorphLLM
from morph_lightning.stages.base import MorphStage

IMAGE_TOKENS = 8 + 2  # <img>, the tiny model's 8 morph tokens, </img>
EDIT = "USER: <image> What will this image be like with the editing instruction: {}. ASSISTANT:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    stage = MorphStage(model=tiny_model_config())
    path = tmp_path_factory.mktemp("model") / "last.ckpt"
    torch.save({"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams)}, path)
    return str(path)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()).save(path)
    return str(path)


@pytest.fixture
def draws_images(monkeypatch):
    """Puts <img> on top in text and keeps </img> from closing an image early, so that with
    `--max-new-tokens IMAGE_TOKENS` every answer is exactly one image."""
    real = MorphLLM.head

    def head(self, hidden, text=True):
        logits = real(self, hidden, text)
        logits[..., self.vocab.img_start] += 100.0
        logits[..., self.vocab.img_end] -= 100.0
        return logits

    monkeypatch.setattr(MorphLLM, "head", head)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- generate


def test_a_prompt_with_an_image_prints_and_writes_its_answer(checkpoint, image, tmp_path, capsys):
    model, out = ["--checkpoint", checkpoint, "--max-new-tokens", "4"], tmp_path / "out"
    records = generate.main([*model, "--out", str(out), "--prompt", "Describe the image.", "--image", image])
    (record,) = _lines(out / "outputs.jsonl")
    assert record == records[0]
    assert record["prompt"] == "USER: <image> Describe the image. ASSISTANT:"
    assert record["images"] == [image] and record["id"] == "prompt"
    assert capsys.readouterr().out == record["text"] + "\n"

    with pytest.raises(SystemExit, match=r"^generate: the prompt has 2 <image> marks but 1 images$"):
        generate.main([*model, "--out", str(tmp_path / "x"), "--prompt", "<image> <image>", "--image", image])
    with pytest.raises(SystemExit, match=r"^generate: cannot read image nowhere\.png: missing$"):
        generate.main([*model, "--out", str(tmp_path / "y"), "--prompt", "hi", "--image", "nowhere.png"])
    assert not (tmp_path / "y" / "outputs.jsonl").exists()


def test_a_prompts_file_answers_each_line_and_skips_bad_ones(checkpoint, image, tmp_path, capsys):
    folder = tmp_path / "prompts"
    folder.mkdir()
    Image.open(image).save(folder / "a.png")
    lines = [
        {"id": "t2i", "prompt": "A large red circle. Generate an image based on the description."},
        "not json",
        {"id": "caption", "prompt": "Describe the image.", "images": ["a.png"]},
        {"id": "marks", "prompt": "<image> and <image>", "images": ["a.png"]},  # 2 marks, 1 image
        {"id": "pair", "prompt": "USER: first <image>, second <image> ASSISTANT:", "images": ["a.png"] * 2},
        {"id": "gone", "prompt": "Describe it.", "images": ["missing.png"]},
        {"id": "../up", "prompt": "hi"},
        {"id": 7, "prompt": "hi"},
    ]
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    generate.main(
        ["--checkpoint", checkpoint, "--prompts", str(path), "--out", str(out), "--max-new-tokens", "3"]
        + ["--batch-size", "2"]
    )
    records = _lines(out / "outputs.jsonl")
    assert [r["id"] for r in records] == ["t2i", "caption", "pair", "7"]
    assert records[1]["images"] == [str(folder / "a.png")]
    assert records[2]["prompt"] == "USER: first <image>, second <image> ASSISTANT:"
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{r['id']}: {r['text']}" for r in records]
    for n in (2, 4, 6, 7):
        assert f"{path}:{n}: skipped: " in captured.err
    assert "cannot read image" in captured.err and "missing.png: missing" in captured.err
    assert "4 answered, 4 skipped" in captured.err


def test_generated_images_are_pngs_and_earlier_outputs_are_kept(checkpoint, draws_images, tmp_path, capsys):
    export = export_model(model_from_checkpoint(checkpoint), tmp_path / "export")
    out = tmp_path / "out"
    args = ["--export", str(export), "--out", str(out), "--max-new-tokens", str(IMAGE_TOKENS)]
    prompt = "A large red circle in the centre. Generate an image based on the description."
    (record,) = generate.main([*args, "--prompt", prompt])
    assert record["text"] == "<image>" and record["output_images"] == ["prompt-0.png"]
    png = out / "prompt-0.png"
    resolution = tiny_model_config()["vqgan"]["resolution"]
    assert Image.open(png).size == (resolution, resolution)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(SystemExit, match="holds an earlier run's outputs: not overwritten"):
        generate.main([*args, "--prompt", "Draw a blue square. Generate an image based on the description."])
    (out / "outputs.jsonl").unlink()  # an interrupted run left only its images: still kept
    del before["outputs.jsonl"]
    with pytest.raises(SystemExit, match="holds an earlier run's outputs"):
        generate.main([*args, "--prompt", prompt])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------- chat


def _chat(monkeypatch, args, script):
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    chat.main(args)


def test_chat_edits_chain_and_save_copies_the_current_image(
    checkpoint, image, draws_images, tmp_path, monkeypatch, capsys
):
    read, asked = [], []
    real_load, real_answer = inference.load_image, inference.Answerer.answer
    monkeypatch.setattr(inference, "load_image", lambda path: read.append(str(path)) or real_load(path))
    monkeypatch.setattr(
        inference.Answerer,
        "answer",
        lambda self, rows: asked.extend(p for p, _ in rows) or real_answer(self, rows),
    )
    out, saved = tmp_path / "session", tmp_path / "kept" / "final.png"
    edits = ["delete the square", "make the circle blue.", "move the cross to the left"]
    script = "".join(
        [
            f"/image {image}\n",
            *(f"/edit {e}\n" for e in edits),
            f"/save {saved}\n",
            "/image nowhere.png\n",
            "/quit\n",
        ]
    )
    _chat(
        monkeypatch,
        ["--checkpoint", checkpoint, "--out", str(out), "--max-new-tokens", str(IMAGE_TOKENS)],
        script,
    )

    turns = [out / f"turn00{n}-0.png" for n in (1, 2, 3)]
    assert asked == [EDIT.format(e.rstrip(".")) for e in edits]
    # /image reads its image, then each edit the last one's output
    assert read == [image, image, str(turns[0]), str(turns[1]), "nowhere.png"]
    resolution = tiny_model_config()["vqgan"]["resolution"]
    assert all(Image.open(t).size == (resolution, resolution) for t in turns)
    assert saved.read_bytes() == turns[2].read_bytes()
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if line.startswith("saved")] == [
        *(f"saved {t}" for t in turns),
        f"saved {saved}",
    ]
    assert captured.err.splitlines()[-1] == "error: cannot read image nowhere.png: missing"


def test_chat_text_turns_and_mistakes_are_one_line_errors(checkpoint, image, tmp_path, monkeypatch, capsys):
    out = tmp_path / "session"
    args = ["--checkpoint", checkpoint, "--out", str(out), "--max-new-tokens", "3"]
    _chat(monkeypatch, args, "hello there\n/edit make it red\n/bogus\n/save x.png\n/help\n")  # ends at EOF
    captured = capsys.readouterr()
    assert "> hello there" in captured.out and "/reset" in captured.out
    assert captured.err.splitlines()[1:] == [
        "error: /edit needs a current image: /image PATH first",
        "error: unknown command /bogus (/help lists them)",
        "error: no current image to save",
    ]
    with pytest.raises(SystemExit, match=r"^chat: cannot read image nowhere\.png: missing$"):
        chat.main([*args, "--image", "nowhere.png"])
    out.mkdir(exist_ok=True)  # (a text-only session saves nothing)
    Image.open(image).save(out / "turn001-0.png")
    with pytest.raises(SystemExit, match="holds an earlier session's images"):
        _chat(monkeypatch, args, "/quit\n")
