import lightning as L
import pytest
import torch

from conftest import fit_fixed_batch
from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.modeling.tokens import SPECIAL_TOKENS
from morph_lightning.stages import Stage1AR, Stage2AutoEncode, Stage3Instruct


def _batch(instruct: bool, n: int = 6) -> dict:
    return next(iter(ToyDataModule(instruct=instruct, num_train=n, batch_size=n).train_dataloader()))


@pytest.mark.parametrize(
    ("stage_cls", "instruct", "terms"),
    [
        (Stage1AR, False, ["loss", "text_ce", "morph_ce"]),
        (Stage2AutoEncode, False, ["loss", "text_ce", "decoder_ce"]),
        (Stage3Instruct, True, ["loss", "text_ce", "decoder_ce"]),
    ],
)
def test_each_stage_loss_falls_on_a_fixed_batch(tiny_cfg, stage_cls, instruct, terms):
    torch.manual_seed(0)
    stage = stage_cls(model=tiny_cfg)
    history = fit_fixed_batch(stage, _batch(instruct))
    for term in terms:
        assert history[-1][term] < 0.9 * history[0][term], (term, history[0][term], history[-1][term])


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_stage1_loss_trains_the_encoder(tiny_cfg):
    stage = Stage1AR(model=tiny_cfg, quant_weight=0.0)  # only Eq. 4's cross-entropy
    stage.losses(_batch(False))["loss"].backward()
    qf = stage.model.encoder.qformer
    assert qf.query_tokens.grad is not None and qf.query_tokens.grad.abs().sum() > 0
    assert _grad_norm(stage.model.encoder.encode_task_layer) > 0


@pytest.mark.parametrize("post_mllm", ["hidden", "codes"])
def test_stage2_decoder_loss_reaches_lora_and_encoder_through_mhat(tiny_cfg, post_mllm):
    stage = Stage2AutoEncode(model={**tiny_cfg, "post_mllm": post_mllm})
    batch = _batch(False)
    losses = stage.losses(batch)
    losses["decoder_ce"].backward()  # Eq. 6 alone
    lora = [p for n, p in stage.model.llm.named_parameters() if "lora_B" in n]
    assert sum(float(p.grad.abs().sum()) for p in lora) > 0
    assert stage.model.encoder.qformer.query_tokens.grad.abs().sum() > 0
    assert _grad_norm(stage.model.decoder) > 0


def test_stage2_ties_no_loss_between_mhat_and_m(tiny_cfg, monkeypatch):
    """With the paper's weights nothing asks the LLM to reproduce M where M̂ is read: the cross-entropy at
    the positions that emit the image's morph tokens gets no gradient. `morph_ar_weight` > 0 (the knob for
    studying it) adds that tie."""
    batch = _batch(False)
    for weight, expect_grad in [(0.0, False), (1.0, True)]:
        torch.manual_seed(0)
        stage = Stage2AutoEncode(model=tiny_cfg, morph_ar_weight=weight)
        seen = {}
        real = stage.token_losses

        def spy(token_ce, labels, real=real, seen=seen):
            token_ce.retain_grad()
            seen.update(token_ce=token_ce, labels=labels)
            return real(token_ce, labels)

        monkeypatch.setattr(stage, "token_losses", spy)
        stage.losses(batch)["loss"].backward()
        at_morph = stage.model.vocab.is_morph(seen["labels"])
        assert at_morph.sum() == 6 * stage.model.num_tokens  # one target image per caption
        assert bool(seen["token_ce"].grad[at_morph].abs().sum() > 0) is expect_grad


def test_stage3_morph_ce_reaches_the_loss_and_the_new_head_rows(tiny_cfg):
    """Stage 3 adds the CE on an image answer's morph ids (`morph_ar_weight`, 1 by default) because at
    inference the LLM must emit them itself: the term is in the loss and its gradient reaches the morph
    rows of `llm.new_head`. Breaks if the weight leaves the loss, defaults to 0, or the term is detached."""
    stage = Stage3Instruct(model=tiny_cfg).eval()  # eval: the same forward with each weight
    batch = _batch(True)
    runs = []
    for weight in (stage.hparams.morph_ar_weight, 0.0):
        stage.hparams.morph_ar_weight = weight
        stage.zero_grad()
        losses = stage.losses(batch)
        losses["loss"].backward()
        runs.append((losses, stage.model.llm.new_head.weight.grad.clone()))
    (with_morph, grad), (without, grad0) = runs
    assert with_morph["morph_ce"] > 0  # the batch has image answers
    torch.testing.assert_close(with_morph["loss"] - without["loss"], with_morph["morph_ce"])
    morph_rows = slice(len(SPECIAL_TOKENS), None)
    assert (grad - grad0)[morph_rows].abs().sum() > 0


def _trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")],
    )


def test_save_load_gives_identical_outputs(tiny_cfg, tmp_path):
    stage = Stage2AutoEncode(model=tiny_cfg, warmup_steps=1, save_frozen_weights=True)
    _trainer(tmp_path, 3).fit(stage, ToyDataModule(num_train=12, batch_size=4))
    loaded = Stage2AutoEncode.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    batch = _batch(False)
    stage.eval(), loaded.eval()
    with torch.no_grad():
        a, b = stage.losses(batch), loaded.losses(batch)
    for k in ("text_ce", "decoder_ce"):
        assert torch.equal(a[k], b[k])


def test_checkpoint_leaves_frozen_towers_out_and_next_stage_starts_from_it(tiny_cfg, tmp_path):
    torch.manual_seed(1)
    stage1 = Stage1AR(model=tiny_cfg, warmup_steps=1)
    _trainer(tmp_path, 2).fit(stage1, ToyDataModule(num_train=8, batch_size=4))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("model.vqgan.") for k in saved)
    assert any(k.startswith("model.vqgan.") for k in stage1.state_dict())
    assert any("lora_A" in k for k in saved)

    torch.manual_seed(1)  # same seed: the frozen towers are rebuilt identically, as from their sources
    stage2 = Stage2AutoEncode(model=tiny_cfg, init_from=str(tmp_path / "last.ckpt"))
    for name, p in stage1.model.named_parameters():
        torch.testing.assert_close(p, stage2.model.get_parameter(name), msg=name)


def test_init_from_a_mismatched_model_names_the_keys(tiny_cfg, tmp_path):
    stage = Stage1AR(model=tiny_cfg)
    bad = {
        "state_dict": {f"model.{k}": v for k, v in stage.model.state_dict().items() if "new_head" not in k}
    }
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="new_head"):
        Stage2AutoEncode(model=tiny_cfg, init_from=str(tmp_path / "bad.ckpt"))


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_encoder_lr_scale(tiny_cfg, tmp_path, scale):
    quant = {**tiny_cfg["quantizer"], "dead_code_threshold": 0.0}  # no revival: the codebook moves only by lr
    stage = Stage1AR(model={**tiny_cfg, "quantizer": quant}, warmup_steps=1, encoder_lr_scale=scale)
    before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
    _trainer(tmp_path, 3).fit(stage, ToyDataModule(num_train=12, batch_size=4))
    moved = {n for n, p in stage.model.named_parameters() if not torch.equal(p, before[n])}
    encoder = {n for n in before if n.startswith("encoder.")}
    assert any("lora_" in n for n in moved)
    if scale == 0.0:  # out of the optimiser: the encoder is exactly where it started, and it is saved
        assert not moved & encoder
        saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
        assert {f"model.{n}" for n in encoder} <= set(saved)
    else:
        assert moved & encoder
        lrs = {g["initial_lr"] for g in stage.optimizers().optimizer.param_groups}
        assert sorted(lrs) == [stage.hparams.lr * scale, stage.hparams.lr]


class _RecordLR(L.Callback):
    """Each optimiser group's lr as the step uses it, and the one left after the last step."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.steps.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_end(self, trainer, module) -> None:
        self.steps.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_lr_schedule_and_optimiser_groups(tiny_cfg, tmp_path):
    """Linear warm-up to lr, a cosine down to lr * min_lr_ratio at the last step, the encoder's groups at
    encoder_lr_scale throughout, and no weight decay on 1-d parameters (biases, norms, gains)."""
    lr, warmup, total, floor, scale = 1e-3, 4, 20, 0.1, 0.5
    schedule = dict(lr=lr, warmup_steps=warmup, min_lr_ratio=floor, encoder_lr_scale=scale, weight_decay=0.05)
    stage = Stage1AR(model=tiny_cfg, **schedule)
    record = _RecordLR()
    trainer = _trainer(tmp_path, total)
    trainer.callbacks.append(record)
    trainer.fit(stage, ToyDataModule(num_train=4 * total, batch_size=4))

    groups = stage.optimizers().optimizer.param_groups
    encoder = {id(p) for p in stage.model.encoder.parameters()}
    is_encoder = [all(id(p) in encoder for p in g["params"]) for g in groups]
    assert is_encoder.count(True) == 2 and not any(id(p) in encoder for g in groups[:2] for p in g["params"])
    base = [lr * (scale if e else 1.0) for e in is_encoder]
    lrs = torch.tensor(record.steps)  # [total + 1, groups]
    expected = {
        0: 1 / warmup,  # the first step: 1/warmup of the peak
        warmup - 1: 1.0,  # the last warm-up step reaches the peak
        warmup + (total - warmup) // 2: floor + (1 - floor) * 0.5,  # the cosine's middle
        total: floor,  # after the last step: the floor
    }
    for step, factor in expected.items():
        torch.testing.assert_close(lrs[step], torch.tensor(base) * factor, msg=f"step {step}")
    assert (lrs[warmup:].diff(dim=0) <= 1e-12).all()  # never rises after warm-up

    trainable = [p for p in stage.parameters() if p.requires_grad]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in trainable)  # each trainable parameter exactly once
    for g in groups:
        decays = g["weight_decay"] > 0
        assert all((p.ndim >= 2) == decays for p in g["params"]), g["weight_decay"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}


def test_a_checkpoint_that_lacks_trainable_weights_is_refused(tiny_cfg, tmp_path):
    """Resuming (or loading) from a checkpoint without a trainable weight would leave it at random."""
    stage = Stage1AR(model=tiny_cfg, warmup_steps=1)
    _trainer(tmp_path, 1).fit(stage, ToyDataModule(num_train=4, batch_size=4))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    del ckpt["state_dict"]["model.llm.new_head.weight"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=r"lacks trainable weights.*llm\.new_head\.weight"):
        Stage1AR.load_from_checkpoint(tmp_path / "broken.ckpt", weights_only=True)
    with pytest.raises(ValueError, match=r"llm\.new_head\.weight"):  # resuming a run: the same check
        data = ToyDataModule(num_train=8, batch_size=4)
        _trainer(tmp_path, 2).fit(Stage1AR(model=tiny_cfg), data, ckpt_path=tmp_path / "broken.ckpt")
