"""abstr-abstr (SD) at paper scale: a tiny diffusers unCLIP pipeline saved in its original layout
(`save_pretrained`, as stabilityai/stable-diffusion-2-1-unclip is), read through
`model.generator_pipeline`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableUnCLIPImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from conftest import tiny_model_config
from morph_lightning import generation
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import ImageRef, Sample
from morph_lightning.modeling.unclip import UnCLIPGenerator
from morph_lightning.stages import Stage2AutoEncode
from test_ablations import _batch, _grad

DIM = 16  # the CLIP image embedding's width (1,024 in the published pipeline)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A random unCLIP pipeline of the published one's components, saved as diffusers saves it."""
    root = tmp_path_factory.mktemp("unclip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    clip = dict(
        hidden_size=DIM, projection_dim=DIM, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip, image_size=32, patch_size=8))
    text_config = CLIPTextConfig(
        **clip, vocab_size=len(vocab), bos_token_id=0, eos_token_id=1, pad_token_id=1
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=DIM,
        use_linear_projection=True,
        # unCLIP conditions on the image embedding concatenated with its noise-level embedding
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * DIM,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    )
    StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=DIM),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=CLIPTextModel(text_config),
        unet=unet,
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        vae=vae,
    ).save_pretrained(root / "pipeline")
    return str(root / "pipeline")


def _stage(pipeline_dir: str) -> Stage2AutoEncode:
    model = tiny_model_config(post_mllm="embedding", generator_pipeline=pipeline_dir)
    return Stage2AutoEncode(model=model, morph_ar_weight=1.0)


def test_the_row_regresses_the_pipelines_clip_embedding_and_leaves_the_pipeline_frozen(pipeline_dir):
    """M̂'s condition vector is trained by MSE to the pipeline's own image encoder's embedding of the
    target, preprocessed as its feature extractor does; gradients reach the condition head and the LLM,
    none the pipeline, whose weights stay out of checkpoints."""
    stage = _stage(pipeline_dir).eval()  # eval: the same forward twice
    model, batch = stage.model, _batch(False)
    assert isinstance(model.decoder, UnCLIPGenerator) and model.condition_head.out_features == DIM
    losses = stage.losses(batch)

    samples = [Sample(prompt=[c], answer=[ImageRef(i, target=True)]) for i, c in enumerate(batch["captions"])]
    enc = stage.encode(batch)
    seq = stage.sequences(samples, enc, batch)
    pipe = model.decoder.pipe
    images01 = model.vision.denormalize(batch["vision_pixels"])
    clip_pixels = pipe.feature_extractor(images=images01, do_rescale=False, return_tensors="pt").pixel_values
    with torch.no_grad():
        mhat = model.post_mllm_tokens(model.run_llm(seq, enc), seq.targets)
        target = pipe.image_encoder(pixel_values=clip_pixels).image_embeds
        expected = F.mse_loss(model.decoder_input(mhat).squeeze(1), target[[i for _, _, i in seq.targets]])
    torch.testing.assert_close(losses["embed_mse"], expected, rtol=1e-4, atol=1e-5)

    losses["loss"].backward()
    assert _grad(model.condition_head) > 0 and _grad(model.llm) > 0
    assert all(p.grad is None for p in model.decoder.parameters())
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    stage.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("model.decoder.") for k in checkpoint["state_dict"])
    stage.on_load_checkpoint(checkpoint)  # a checkpoint without the pipeline is complete


def test_generation_draws_through_the_pipeline_from_the_regressed_condition(pipeline_dir, monkeypatch):
    """Each image the LLM closes goes to the pipeline as `image_embeds`: the condition head's map of the
    emitting states; the pixels come back at the VQGAN's size, in [-1, 1]."""
    model = _stage(pipeline_dir).model.eval()
    seen, prefixes = [], []
    call, complete = type(model.decoder.pipe).__call__, model.complete_mhat
    monkeypatch.setattr(
        type(model.decoder.pipe), "__call__", lambda s, **kw: seen.append(kw) or call(s, **kw)
    )
    monkeypatch.setattr(model, "complete_mhat", lambda m: prefixes.append(complete(m)) or prefixes[-1])
    greedy = {"temperature": 0.0, "image_temperature": 0.0, "start_image": True}
    out = generation.generate(
        model, [Sample(prompt=["a red"])] * 2, max_new_tokens=model.num_tokens + 2, **greedy
    )
    assert out.images == [[0], [1]]
    size = model.vqgan.resolution
    assert out.pixels.shape == (2, 3, size, size) and out.pixels.abs().max() <= 1
    assert len(seen) == 1 and seen[0]["prompt"] == ["", ""]
    with torch.no_grad():
        condition = model.decoder_input(torch.stack(prefixes)).squeeze(1)
    torch.testing.assert_close(seen[0]["image_embeds"], condition)


def test_a_missing_pipeline_or_two_generators_stop_in_one_line(pipeline_dir, tmp_path):
    cfg = tiny_model_config(post_mllm="embedding")
    with pytest.raises(ValueError, match="generator_pipeline: .*none is not a saved diffusers unCLIP") as err:
        MorphModel({**cfg, "generator_pipeline": str(tmp_path / "none")})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="two generators; set one"):
        MorphModel({**cfg, "generator_pipeline": pipeline_dir, "generator_checkpoint": str(tmp_path / "g")})
