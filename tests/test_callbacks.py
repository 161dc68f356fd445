import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from morph_lightning.callbacks import CodebookMonitor, ImageLogger, MorphThroughputMonitor
from morph_lightning.callbacks.codebook_monitor import codebook_summary
from morph_lightning.callbacks.image_logger import eval_mode
from morph_lightning.callbacks.tensorboard import tensorboard_writer
from morph_lightning.callbacks.throughput import flops_per_token
from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.modeling.sequence import ImageRef, Sample
from morph_lightning.stages import Stage1AR, Stage2AutoEncode, Stage3Instruct

R = 16  # the tiny VQGAN's resolution: every drawn image is R x R
PAD = 2  # make_grid's padding


def _fit(
    stage, tmp_path: Path, callbacks: list, steps: int = 4, instruct: bool = False, **data
) -> EventAccumulator:
    """Fit on the CPU with a TensorBoardLogger; the events read back."""
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage, ToyDataModule(instruct=instruct, **{"num_train": 8, "batch_size": 4, **data}))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    return events


def _grid_size(rows: int, cols: int) -> tuple[int, int]:
    if rows * cols == 1:
        return R, R  # make_grid returns a lone image as it is
    return rows * (R + PAD) + PAD, cols * (R + PAD) + PAD


def _images(events: EventAccumulator) -> dict[str, list[tuple[int, tuple[int, int]]]]:
    """Image tag -> [(step, (height, width))]."""
    return {
        tag: [(e.step, (e.height, e.width)) for e in events.Images(tag)] for tag in events.Tags()["images"]
    }


def _batch(instruct: bool, n: int = 6) -> dict:
    return next(iter(ToyDataModule(instruct=instruct, num_train=n, batch_size=n).train_dataloader()))


def _refs(pieces: list, target: bool) -> list[int]:
    return [p.index for p in pieces if isinstance(p, ImageRef) and p.target == target]


# ---------------------------------------------------------------- ImageLogger


def test_image_logger_stage2_logs_reconstructions_and_prompts_every_n_steps(tiny_cfg, tmp_path):
    prompts = ["a red square on the left", "a blue circle on the right"]
    logger = ImageLogger(every_n_steps=2, num_images=3, prompts=prompts, max_new_tokens=12)
    events = _fit(Stage2AutoEncode(model=tiny_cfg, warmup_steps=1), tmp_path, [logger])
    assert _images(events) == {
        "images/reconstruction": [(2, _grid_size(2, 3)), (4, _grid_size(2, 3))],  # not at step 0
        "images/text_to_image": [(2, _grid_size(1, 2)), (4, _grid_size(1, 2))],
    }


def test_reconstructions_draw_from_the_mhat_the_stage2_loss_trains(tiny_cfg, monkeypatch):
    """The bottom row is what the decoder draws (greedy) from the M̂ that Eq. 6's term feeds it, and
    the top row the images those M̂ belong to."""
    stage = Stage2AutoEncode(model={**tiny_cfg, "post_mllm": "hidden"}).eval()
    batch = _batch(False)
    seen = {}
    real = stage.model.decoder_loss
    monkeypatch.setattr(stage.model, "decoder_loss", lambda mhat, codes: seen.setdefault("mhat", mhat) * 0)
    with torch.no_grad():
        stage.losses(batch)
        images, drawn = ImageLogger(num_images=3).reconstructions(stage, batch)
        expected = stage.model.draw(seen["mhat"][:3], temperature=0.0)
    monkeypatch.setattr(stage.model, "decoder_loss", real)
    assert torch.equal(images, batch["vqgan_pixels"][:3])
    torch.testing.assert_close(drawn, expected)


def test_image_logger_stage3_edits_show_input_generated_and_target(tiny_cfg):
    stage = Stage3Instruct(model=tiny_cfg)
    batch = _batch(True, n=8)
    edits = [s for s in batch["samples"] if _refs(s.prompt, False) and _refs(s.answer, True)]
    answers = [s for s in batch["samples"] if _refs(s.answer, True)]
    assert edits and len(answers) > len(edits), "the toy batch should hold edits and text-to-image samples"
    prompt = "USER: a red square on the left ASSISTANT: "
    logger = ImageLogger(num_images=4, prompts=[prompt], max_new_tokens=12)
    with eval_mode(stage), torch.no_grad():
        grids = logger.grids(stage, batch)
        inputs, _, targets = logger.edits(stage.model, batch)
    k = min(4, len(edits))
    assert {t: tuple(g.shape) for t, g in grids.items()} == {
        "images/reconstruction": (3, *_grid_size(2, min(4, len(answers)))),
        "images/text_to_image": (3, *_grid_size(1, 1)),
        "images/edit": (3, *_grid_size(3, k)),
    }
    assert grids["images/edit"].min() >= 0 and grids["images/edit"].max() <= 1
    pixels = batch["vqgan_pixels"]
    assert torch.equal(inputs, pixels[[_refs(s.prompt, False)[-1] for s in edits[:k]]])
    assert torch.equal(targets, pixels[[_refs(s.answer, True)[0] for s in edits[:k]]])


def test_image_logger_stage1_logs_only_the_inputs(tiny_cfg, tmp_path):
    events = _fit(
        Stage1AR(model=tiny_cfg, warmup_steps=1), tmp_path, [ImageLogger(every_n_steps=2, num_images=3)]
    )
    assert _images(events) == {"images/inputs": [(2, _grid_size(1, 3)), (4, _grid_size(1, 3))]}


def test_no_tensorboard_logger_means_no_writer(tmp_path):
    assert tensorboard_writer(L.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu")) is None


def test_eval_mode_restores_each_module_s_own_mode(tiny_cfg):
    stage = Stage2AutoEncode(model=tiny_cfg).train()
    with eval_mode(stage):
        assert not any(m.training for m in stage.modules())
    assert stage.training and stage.model.llm.training
    assert not stage.model.vqgan.training  # a frozen tower stays in eval


# ---------------------------------------------------------------- CodebookMonitor


def test_codebook_summary_on_known_ids():
    monitor = CodebookMonitor()
    monitor.add(torch.tensor([[0, 1], [0, 2]]), codebook_size=4)  # 2 positions, 4 codes
    # per code: [2, 1, 1, 0] of 4 -> entropy 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    assert codebook_summary(monitor.counts) == pytest.approx(
        {
            "codebook/perplexity": 2**1.5,
            "codebook/dead_codes": 1.0,
            "codebook/dead_fraction": 0.25,
            "codebook/distinct_per_position": 1.5,  # position 0: code 0; position 1: codes 1, 2
        }
    )


def test_codebook_monitor_logs_each_window_of_training_ids(tiny_cfg, tmp_path):
    stage = Stage2AutoEncode(model=tiny_cfg, warmup_steps=1)
    windows = [[], [], []]  # the ids of training steps 1-2, 3-4 and 5, recorded apart from the monitor

    def spy(module, args, out):
        if module.training:
            windows[stage.global_step // 2].append(out.ids.clone())

    stage.model.encoder.quantizer.register_forward_hook(spy)
    monitor = CodebookMonitor(every_n_steps=2)
    # the image logger's drawings encode the same images again, in eval mode: they must not count
    events = _fit(stage, tmp_path, [ImageLogger(every_n_steps=1), monitor], steps=5)
    k = stage.model.encoder.quantizer.codebook_size
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    histograms = {e.step: e.histogram_value for e in events.Histograms("codebook/usage")}
    for step, ids in zip((2, 4), windows, strict=False):
        counts = torch.bincount(torch.cat(ids).flatten(), minlength=k).tolist()
        total = sum(counts)
        ppl = math.exp(-sum(c / total * math.log(c / total) for c in counts if c))
        dead = sum(c == 0 for c in counts)
        assert logged["codebook/perplexity"][step] == pytest.approx(ppl, rel=1e-5)
        assert logged["codebook/dead_codes"][step] == dead
        assert logged["codebook/dead_fraction"][step] == pytest.approx(dead / k)
        assert step in logged["codebook/ema_perplexity"]
        assert histograms[step].num == total
    # the open window (step 5) holds exactly that step's training ids, per position
    ids = torch.cat(windows[2])
    positions = stage.model.num_tokens
    per_position = torch.stack([torch.bincount(ids[:, p], minlength=k) for p in range(positions)])
    assert torch.equal(monitor.counts, per_position)
    assert sorted(histograms) == [2, 4]
    assert [(e.step, e.height, e.width) for e in events.Images("codebook/position_usage")] == [
        (2, positions, k),
        (4, positions, k),
    ]


# ---------------------------------------------------------------- throughput


def test_flops_per_token_counts_linear_weights_trained_or_not():
    net = nn.Sequential(nn.Linear(4, 8), nn.Embedding(10, 8), nn.Linear(8, 2))
    net[0].requires_grad_(False)  # 40 frozen, 18 trainable; the embedding is a look-up
    assert flops_per_token(net, backward=False) == 2 * 58
    assert flops_per_token(net, backward=True) == 2 * 58 + 2 * 58 + 2 * 18


def _linear_params(module: nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def test_throughput_logs_rates_and_the_flops_of_the_step(tiny_cfg, tmp_path):
    """One batch repeated, so the last step's FLOPs are known by hand; an image logger drawing in the
    same step (eval forwards) must not count."""
    stage = Stage2AutoEncode(model=tiny_cfg, warmup_steps=1)
    callbacks = [
        ImageLogger(every_n_steps=1, prompts=["a red square"], max_new_tokens=12),
        MorphThroughputMonitor(window_size=2),
    ]
    events = _fit(stage, tmp_path, callbacks, num_train=4)
    tags = set(events.Tags()["scalars"])
    assert {
        "train/device/samples_per_sec",
        "train/device/items_per_sec",
        "train/device/flops_per_sec",
    } <= tags
    assert "train/device/mfu" not in tags  # a CPU has no known peak

    batch = _batch(False, n=4)
    m = stage.model
    samples = [Sample(prompt=[ImageRef(i)], answer=[c]) for i, c in enumerate(batch["captions"])]
    samples += [
        Sample(prompt=[c], answer=[ImageRef(i, target=True)]) for i, c in enumerate(batch["captions"])
    ]
    with torch.no_grad():
        rows, length = stage.sequences(samples, m.encode_images(batch["vision_pixels"])).input_ids.shape
    assert all(p.requires_grad for p in m.llm.parameters()) and not any(
        p.requires_grad for p in m.vision.parameters()
    )
    expected = (
        4 * m.vision.num_tokens * 2 * _linear_params(m.vision)  # frozen: forward only
        + rows * length * 6 * _linear_params(m.llm)  # trained throughout (train_base): 6N
        + 4 * (m.decoder.config.n_prefix + m.decoder.config.n_codes - 1) * 6 * _linear_params(m.decoder)
    )
    assert stage.flops_per_batch == expected
