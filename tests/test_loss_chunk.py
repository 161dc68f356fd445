"""`llm.loss_chunk`: the head and its cross-entropy a few labelled positions at a time. The stages'
losses and every gradient are those of the whole-logits path; only the logits are never held whole."""

from __future__ import annotations

import pytest
import torch

from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.modeling.model import MorphModel
from morph_lightning.stages import Stage1AR, Stage2AutoEncode, Stage3Instruct


def _stage(stage_cls, tiny_cfg: dict, loss_chunk: int | None, **model):
    torch.manual_seed(0)
    cfg = {**tiny_cfg, "llm": {**tiny_cfg["llm"], "loss_chunk": loss_chunk}, **model}
    return stage_cls(model=cfg, pack_length=96)


def _losses_and_grads(stage, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same draws (stage 1's image side, the Gumbel noise) in both runs
    losses = stage.losses(batch)
    losses["loss"].backward()
    grads = {n: p.grad for n, p in stage.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize(
    ("stage_cls", "instruct", "model"),
    [
        (Stage1AR, False, {}),
        (Stage2AutoEncode, False, {"post_mllm": "codes"}),  # M̂ from the morph logits: the head again
        (Stage3Instruct, True, {}),
    ],
)
def test_chunked_loss_gives_the_same_losses_and_gradients(tiny_cfg, stage_cls, instruct, model):
    batch = next(iter(ToyDataModule(instruct=instruct, num_train=6, batch_size=6).train_dataloader()))
    whole, whole_grads = _losses_and_grads(_stage(stage_cls, tiny_cfg, None, **model).eval(), batch)
    chunked, chunked_grads = _losses_and_grads(_stage(stage_cls, tiny_cfg, 7, **model).eval(), batch)
    assert whole.keys() == chunked.keys()
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-5, atol=1e-6, msg=k)
    assert whole_grads.keys() == chunked_grads.keys() and any("new_head" in n for n in whole_grads)
    for n in whole_grads:
        torch.testing.assert_close(chunked_grads[n], whole_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_chunked_loss_keeps_no_logits_and_generation_still_gets_them(tiny_cfg):
    model = MorphModel({**tiny_cfg, "llm": {**tiny_cfg["llm"], "loss_chunk": 4}})
    embeds = torch.randn(2, 9, model.llm.hidden_size)
    labels = torch.full((2, 9), -100)
    labels[0, 3:] = 5
    out = model.llm(embeds, labels=labels)
    assert out.logits is None and out.token_ce.shape == (2, 9)
    assert bool((out.token_ce[labels == -100] == 0).all()) and bool((out.token_ce[labels != -100] > 0).all())
    plain = model.llm(embeds)  # no labels (generation, likelihoods): the logits as always
    assert plain.token_ce is None and plain.logits.shape == (2, 9, model.vocab.size)


def test_a_bad_loss_chunk_stops_in_one_line(tiny_cfg):
    with pytest.raises(ValueError, match="llm.loss_chunk must be a positive") as err:
        MorphModel({**tiny_cfg, "llm": {**tiny_cfg["llm"], "loss_chunk": 0}})
    assert "\n" not in str(err.value)
