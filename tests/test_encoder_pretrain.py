"""Stage 0 of the encoder (the world's stand-in for SEED's pretrained tokenizer): its morph tokens learn to
carry the image's VQGAN codes, and its export loads through `model.encoder_init` like SEED's file."""

import lightning as L
import torch

from conftest import fit_fixed_batch
from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.modeling.model import MorphModel
from morph_lightning.stages.encoder_pretrain import EncoderPretrain


def pretrain_stage(cfg: dict, **kwargs) -> EncoderPretrain:
    sections = {k: cfg[k] for k in ("vision", "qformer", "quantizer", "vqgan")}
    return EncoderPretrain(**sections, head_width=32, head_layers=1, head_heads=2, **kwargs)


def test_code_and_caption_prediction_train_the_encoder(tiny_cfg):
    stage = pretrain_stage(tiny_cfg, caption_weight=1.0)
    batch = next(iter(ToyDataModule(num_train=8, batch_size=8).train_dataloader()))
    before = {n: p.detach().clone() for n, p in stage.encoder.named_parameters()}
    history = fit_fixed_batch(stage, batch, steps=30)
    assert history[-1]["code_ce"] < 0.5 * history[0]["code_ce"]
    assert history[-1]["code_acc"] > history[0]["code_acc"]
    assert history[-1]["caption_ce"] < 0.5 * history[0]["caption_ce"]
    assert not torch.equal(stage.encoder.qformer.query_tokens, before["qformer.query_tokens"])
    assert all(not p.requires_grad for p in stage.vqgan.parameters())


def test_export_is_what_stage_one_starts_from(tiny_cfg, tmp_path):
    path = tmp_path / "towers" / "encoder.safetensors"
    stage = pretrain_stage(tiny_cfg, export_path=str(path), warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(stage, ToyDataModule(num_train=12, batch_size=4))
    model = MorphModel({**tiny_cfg, "encoder_init": str(path)})
    for name, p in stage.encoder.named_parameters():
        torch.testing.assert_close(model.encoder.get_parameter(name), p, rtol=0, atol=0, msg=name)


def test_caption_loss_reads_the_morph_tokens_and_skips_padding(tiny_cfg):
    """The caption CE depends on the tokens it is given (cross-attention reaches them), and a batch's is
    the token-weighted mean of its rows' alone: padding is never scored."""
    stage = pretrain_stage(tiny_cfg, caption_weight=1.0).eval()
    z = torch.randn(2, stage.encoder.num_tokens, stage.encoder.code_dim)
    captions = ["a red circle", "a big blue square on the left"]
    with torch.no_grad():
        both = stage.caption_loss(z, captions)
        assert not torch.allclose(both, stage.caption_loss(torch.randn_like(z), captions))
        alone = [stage.caption_loss(z[i : i + 1], captions[i : i + 1]) for i in range(2)]
    targets = [len(stage.tokenizer(c).input_ids) + 1 for c in captions]  # the caption's tokens and </s>
    expected = sum(l * n for l, n in zip(alone, targets, strict=True)) / sum(targets)
    torch.testing.assert_close(both, expected, rtol=1e-3, atol=1e-4)
