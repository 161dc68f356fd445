from types import SimpleNamespace

import pytest
import torch

from morph_lightning import generation
from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.generation import generate
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import ImageRef, Sample, build_sequences


def _batch(instruct: bool = False, n: int = 4) -> dict:
    dm = ToyDataModule(instruct=instruct, num_train=n, batch_size=n)
    return next(iter(dm.train_dataloader()))


def test_shapes_through_the_model(tiny_cfg):
    model = MorphModel(tiny_cfg)
    batch = _batch()
    enc = model.encode_images(batch["vision_pixels"])
    assert enc.ids.shape == (4, model.num_tokens) == (4, 8)
    assert enc.z_q.shape == (4, 8, model.encoder.code_dim)
    assert model.vqgan_codes(batch["vqgan_pixels"]).shape == (4, model.vqgan.codes_per_image)
    assert model.decoder.config.prefix_dim == model.llm.hidden_size  # post_mllm: hidden


def test_frozen_towers_stay_frozen_and_in_eval(tiny_cfg):
    tiny_cfg["llm"]["train_base"] = False  # the paper's setting: the LLM itself is adapted by LoRA only
    model = MorphModel(tiny_cfg).train()
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.vqgan.parameters())
    assert not model.vqgan.training and not model.vision.training
    assert not model.llm.hf.get_input_embeddings().weight.requires_grad


def test_deconfounder_dictionary_starts_as_the_vqgan_codebook(tiny_cfg):
    model = MorphModel(tiny_cfg)
    torch.testing.assert_close(model.encoder.qformer.dictionary, model.vqgan.codebook)


def test_emp_padding_and_trimming(tiny_cfg):
    model = MorphModel(tiny_cfg)
    h = model.llm.hidden_size
    short = torch.randn(5, h)
    padded = model.complete_mhat(short)
    assert padded.shape == (8, h)
    torch.testing.assert_close(padded[:5], short)
    torch.testing.assert_close(padded[5:], model.llm.emp_embedding.expand(3, h))
    long = torch.randn(11, h)
    torch.testing.assert_close(model.complete_mhat(long), long[:8])


def test_codes_mode_reads_mhat_through_the_codebook(tiny_cfg):
    model = MorphModel({**tiny_cfg, "post_mllm": "codes"})
    assert model.decoder.config.prefix_dim == model.encoder.code_dim
    assert torch.equal(model.emp_vector(), torch.zeros(model.encoder.code_dim))


class _Scripted:
    """Replaces the LLM head: at each step puts the next id of `script` on top (by default <img>, three
    morph ids, </img> (an early close), then </s>). Where generation masks that id, the argmax falls on
    the first allowed id."""

    def __init__(self, model: MorphModel, script: list[int] | None = None):
        v, self.model, self.step = model.vocab, model, 0
        self.script = script or [
            v.img_start,
            *(v.morph_offset + k for k in (1, 2, 3)),
            v.img_end,
            model.llm.tokenizer.eos_token_id,
        ]
        self.real = model.llm.head

    def __call__(self, hidden, text=True):  # generation calls it once a step, on the last position
        logits = torch.zeros_like(self.real(hidden, text))
        logits[..., self.script[min(self.step, len(self.script) - 1)]] = 100.0
        self.step += 1
        return logits


def _spy_prefix(model: MorphModel, monkeypatch) -> dict:
    """Records the M̂ that generation hands to the decoder (`seen["prefix"]`, [K, 32, D])."""
    seen = {}
    real_generate = model.decoder.generate

    def spy(prefix, **kw):
        seen["prefix"] = prefix
        return real_generate(prefix, **kw)

    monkeypatch.setattr(model.decoder, "generate", spy)
    return seen


def _spy_ids(monkeypatch) -> list[list[int]]:
    """Records the ids generation emits, one list per row (what it renders into `texts`)."""
    seen = []
    real_render = generation._render

    def spy(model, ids):
        seen.append(list(ids))
        return real_render(model, ids)

    monkeypatch.setattr(generation, "_render", spy)
    return seen


@pytest.mark.parametrize("post_mllm", ["hidden", "codes"])
def test_generation_pads_an_early_closed_image_with_emp(tiny_cfg, monkeypatch, post_mllm):
    model = MorphModel({**tiny_cfg, "post_mllm": post_mllm}).eval()
    monkeypatch.setattr(model.llm, "head", _Scripted(model))
    seen = _spy_prefix(model, monkeypatch)
    out = generate(model, [Sample(prompt=["a red circle"])], max_new_tokens=10)
    assert out.texts == ["<image>"]
    assert out.images == [[0]]
    assert out.pixels.shape == (1, 3, 16, 16)
    prefix = seen["prefix"][0]
    assert prefix.shape == (8, model.decoder.config.prefix_dim)
    torch.testing.assert_close(prefix[3:], model.emp_vector().expand(5, -1))
    if post_mllm == "codes":  # M̂ = the emitted ids' codebook vectors
        torch.testing.assert_close(prefix[:3], model.encoder.quantizer.codebook[1:4])


def test_generation_collects_the_mhat_that_training_reads(tiny_cfg, monkeypatch):
    """Eq. 6 trains the decoder on M̂ that `post_mllm_tokens` reads from a teacher-forced sequence;
    generation collects M̂ step by step. Both must be the hidden states that emit the image's morph
    tokens, so they agree for the same sequence: reading either one position off breaks this."""
    model = MorphModel(tiny_cfg).eval()
    v, n = model.vocab, model.num_tokens
    codes = torch.randperm(model.encoder.quantizer.codebook.shape[0])[:n]
    eos = model.llm.tokenizer.eos_token_id
    script = [v.img_start, *(v.morph_offset + codes).tolist(), v.img_end, eos]
    monkeypatch.setattr(model.llm, "head", _Scripted(model, script))
    seen = _spy_prefix(model, monkeypatch)
    prompts = ["a red circle", "USER: draw a blue square on the left ASSISTANT:"]  # unequal: left padding
    out = generate(model, [Sample(prompt=[p]) for p in prompts], max_new_tokens=n + 3)
    assert out.images == [[0], [1]]

    # the same sequences teacher-forced, as stages 2 and 3 see them (with the emitted ids as the image's)
    ids = codes.expand(len(prompts), n)
    enc = SimpleNamespace(ids=ids, z_q=model.encoder.quantizer.codebook[ids])
    samples = [Sample(prompt=[p], answer=[ImageRef(i, target=True)]) for i, p in enumerate(prompts)]
    seq = build_sequences(samples, ids, v, model.llm.tokenizer)
    with torch.no_grad():
        mhat = model.post_mllm_tokens(model.run_llm(seq, enc), seq.targets)
    assert mhat.shape == seen["prefix"].shape == (2, n, model.llm.hidden_size)
    torch.testing.assert_close(mhat, seen["prefix"], rtol=1e-5, atol=1e-5)


def test_generation_forces_img_end_and_keeps_morph_ids_out_of_text(tiny_cfg, monkeypatch):
    """The head asks for a morph id at every step but the two <img>s. In text mode the morph ids must be
    masked, and after `num_tokens` morph ids `</img>` must be forced (not a token early or late, and
    counted afresh for the second image)."""
    model = MorphModel(tiny_cfg).eval()
    v, n, eos = model.vocab, model.num_tokens, model.llm.tokenizer.eos_token_id
    m = v.morph_offset + 5
    script = [m, v.img_start, *[m] * (n + 2), v.img_start, *[m] * (n + 1), eos]
    monkeypatch.setattr(model.llm, "head", _Scripted(model, script))
    ids = _spy_ids(monkeypatch)
    out = generate(model, [Sample(prompt=["a red circle"])], max_new_tokens=len(script))
    # text ids shown as "text": where the script's morph id was masked, a text id came instead
    shown = [t if t >= v.text_size or t == eos else "text" for t in ids[0]]
    image = [v.img_start, *[m] * n, v.img_end]
    assert shown == ["text", *image, "text", *image, eos]
    assert out.images == [[0, 1]]


def test_batched_generation_with_images_in_prompts_matches_each_prompt_alone(tiny_cfg, monkeypatch):
    """Greedy generation of a batch (prompts of different lengths, left-padded, with images) gives each
    row what that prompt gives alone: catches padding that leaks into attention (prompt or decode mask).
    The tiny random LLM attends almost uniformly, so wrong positions show only in the M̂ test above."""
    model = MorphModel(tiny_cfg).eval()
    batch = _batch(instruct=True, n=3)
    prompts = [Sample(prompt=s.prompt) for s in batch["samples"]]
    ids = _spy_ids(monkeypatch)
    kw = {"max_new_tokens": 12, "temperature": 0.0, "image_temperature": 0.0}
    together = generate(model, prompts, batch["vision_pixels"], **kw)
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], batch["vision_pixels"], **kw)
        assert ids[-1] == ids[b] and alone.texts[0] == together.texts[b], b
        assert len(alone.images[0]) == len(together.images[b]), b
        if alone.images[0]:
            torch.testing.assert_close(alone.pixels, together.pixels[together.images[b]])


def _spy_codes(model: MorphModel, monkeypatch) -> list[torch.Tensor]:
    """Records the codes the decoder draws, one tensor per `generate` call that draws."""
    seen = []
    real = model.decoder.generate
    monkeypatch.setattr(model.decoder, "generate", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    return seen


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("cache", ["none", "static"])
def test_every_cache_draws_what_the_dynamic_cache_draws(tiny_cfg, monkeypatch, cache, rows):
    """Greedy text-to-image (`start_image` makes every row draw first) through the LLM and the decoder.
    "none" (the benchmark's baseline) reruns the whole sequence each step; "static" writes buffers of the
    whole sequence in place and must attend to the filled positions only. Both must emit the dynamic
    caches' ids and codes. The three prompts differ in length (left padding), the first holds an image."""
    model = MorphModel(tiny_cfg).eval()
    batch = _batch(instruct=True, n=3)
    prompts = [Sample(prompt=s.prompt) for s in batch["samples"]][:rows]
    ids, codes = _spy_ids(monkeypatch), _spy_codes(model, monkeypatch)
    kw = {"max_new_tokens": model.num_tokens + 4, "temperature": 0.0, "image_temperature": 0.0}
    dynamic = generate(model, prompts, batch["vision_pixels"], start_image=True, **kw)
    other = generate(model, prompts, batch["vision_pixels"], start_image=True, cache=cache, **kw)
    assert ids[:rows] == ids[rows:]  # one list per row and call
    assert all(row[0] == model.vocab.img_start for row in ids)
    assert dynamic.images == other.images == [[k] for k in range(rows)]
    assert torch.equal(codes[0], codes[1])
    torch.testing.assert_close(dynamic.pixels, other.pixels)


@pytest.mark.parametrize("rows", [1, 3])
def test_the_static_cache_captions_what_the_dynamic_cache_captions(tiny_cfg, monkeypatch, rows):
    """Captioning, the LLM alone: an image and an instruction (a longer one in each row, so left padding)
    in, greedy text out, the same ids from the static cache as from the dynamic one."""
    model = MorphModel(tiny_cfg).eval()
    pixels = _batch(n=rows)["vision_pixels"]
    prompts = [
        Sample(prompt=["USER: ", ImageRef(k), " Describe it" + " briefly" * k + ". ASSISTANT:"])
        for k in range(rows)
    ]
    ids = _spy_ids(monkeypatch)
    kw = {"max_new_tokens": 16, "temperature": 0.0, "image_temperature": 0.0}
    dynamic = generate(model, prompts, pixels, **kw)
    static = generate(model, prompts, pixels, cache="static", **kw)
    assert ids[:rows] == ids[rows:] and dynamic.texts == static.texts
    assert [len(row) for row in ids[:rows]] == [16] * rows  # no row ended at once
