import pytest
import torch

from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.generation import generate
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import Sample


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
    """Replaces the LLM head: emits <img>, three morph ids, </img> (an early close), then </s>."""

    def __init__(self, model: MorphModel):
        v, self.model, self.step = model.vocab, model, 0
        self.script = [v.img_start, v.morph_offset + 1, v.morph_offset + 2, v.morph_offset + 3, v.img_end]
        self.script.append(model.llm.tokenizer.eos_token_id)
        self.real = model.llm.head

    def __call__(self, hidden):
        logits = self.real(hidden)
        if logits.shape[1] == 1 or self.step == 0:  # one decode step (or the prompt's forward)
            logits = torch.zeros_like(logits)
            logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 100.0
            self.step += 1
        return logits


@pytest.mark.parametrize("post_mllm", ["hidden", "codes"])
def test_generation_pads_an_early_closed_image_with_emp(tiny_cfg, monkeypatch, post_mllm):
    model = MorphModel({**tiny_cfg, "post_mllm": post_mllm}).eval()
    monkeypatch.setattr(model.llm, "head", _Scripted(model))
    seen = {}
    real_generate = model.decoder.generate

    def spy(prefix, **kw):
        seen["prefix"] = prefix
        return real_generate(prefix, **kw)

    monkeypatch.setattr(model.decoder, "generate", spy)
    out = generate(model, [Sample(prompt=["a red circle"])], max_new_tokens=10)
    assert out.texts == ["<image>"]
    assert out.images == [[0]]
    assert out.pixels.shape == (1, 3, 16, 16)
    prefix = seen["prefix"][0]
    assert prefix.shape == (8, model.decoder.config.prefix_dim)
    torch.testing.assert_close(prefix[3:], model.emp_vector().expand(5, -1))
    if post_mllm == "codes":  # M̂ = the emitted ids' codebook vectors
        torch.testing.assert_close(prefix[:3], model.encoder.quantizer.codebook[1:4])


def test_batched_text_generation_with_images_in_prompts(tiny_cfg):
    model = MorphModel(tiny_cfg).eval()
    batch = _batch(instruct=True, n=3)
    prompts = [Sample(prompt=s.prompt) for s in batch["samples"]]
    gen = torch.Generator().manual_seed(0)
    out = generate(model, prompts, batch["vision_pixels"], max_new_tokens=6, temperature=1.0, generator=gen)
    assert len(out.texts) == 3 and all(isinstance(t, str) for t in out.texts)
    n_images = sum(len(i) for i in out.images)
    assert (out.pixels is None and n_images == 0) or out.pixels.shape[0] == n_images
