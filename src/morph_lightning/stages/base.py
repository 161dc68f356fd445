"""What the three stages share: one MorphModel, the losses' bookkeeping, AdamW + cosine, checkpoints."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from morph_lightning.generation import generate
from morph_lightning.modeling.config import MorphModelConfig, kwargs_of, parse_section, section_of
from morph_lightning.modeling.encoder import EncoderOutput
from morph_lightning.modeling.llm import LLMOutput
from morph_lightning.modeling.model import GenerationOutput, MorphModel
from morph_lightning.modeling.sequence import IGNORE, ImageRef, Sample, SequenceBatch, build_sequences
from morph_lightning.parallel import shard_morph_model, split_sharded
from morph_lightning.stages.schedule import warmup_cosine


def load_model_weights(path: str) -> dict[str, torch.Tensor]:
    """The `model.*` weights of a stage checkpoint, read without unpickling code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"init_from: cannot read {path}: {err}") from None
    state = ckpt.get("state_dict", ckpt)
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not weights:
        raise ValueError(f"init_from: {path} holds no `model.*` weights")
    return weights


def step_seed(step: int, rank: int) -> int:
    """A seed per (run seed, step, rank); the run seed is the one `seed_everything` set."""
    base = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return (base * 1_000_003 + step) * 1_009 + rank


GenerationSection = section_of(
    generate, "GenerationSection", skip=("model", "prompts", "vision_pixels", "generator"), module=__name__
)


class MorphStage(L.LightningModule):
    def __init__(
        self,
        model: MorphModelConfig,
        init_from: str | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.05,
        warmup_steps: int = 2000,
        min_lr_ratio: float = 0.0,
        quant_weight: float = 1.0,
        decoder_weight: float = 1.0,
        morph_ar_weight: float = 0.0,
        max_text_tokens: int = 512,
        pack_length: int | None = None,
        save_frozen_weights: bool = False,
        generation: GenerationSection | None = None,
        activation_checkpointing: bool = False,
        encoder_lr_scale: float = 1.0,
    ) -> None:
        """`generation`: the settings of `morph_lightning.generation.generate` used by `predict`.
        `pack_length`: pack several samples into each training row of up to that many tokens (see
        `build_sequences`); None pads every sample to the batch's longest.
        `activation_checkpointing`: recompute each LLM layer and decoder block in backward when sharded
        (ModelParallelStrategy, see `morph_lightning.parallel`).
        `encoder_lr_scale`: the morph-token encoder's learning rate relative to `lr`; 0 keeps it where it
        started (set the quantizer's `dead_code_threshold` to 0 too, or revival still rewrites codes).
        `decoder_weight`: the weight of the CE on an image answer's VQGAN codes X: the decoder's (Eq. 6),
        or the LLM's own without a decoder. `morph_ar_weight`: the weight of the AR term on an image
        answer's own tokens: the CE on its morph ids, or the MSE of continuous ones (docs/ablations.md)."""
        super().__init__()
        # Sections may arrive as dicts (a checkpoint's hyper-parameters); stored as plain dicts so that
        # checkpoints load with weights_only.
        model = parse_section(MorphModelConfig, model, "model.init_args.model")
        self.generation = parse_section(GenerationSection, generation, "model.init_args.generation")
        self.save_hyperparameters(ignore=["model", "generation"])
        self.hparams.update(model=dataclasses.asdict(model), generation=dataclasses.asdict(self.generation))
        self.model = MorphModel(model)
        if init_from:
            self._init_from(init_from)
        # Frozen towers are rebuilt from their sources, so checkpoints may leave them out.
        self.strict_loading = False

    # ---- checkpoints ----------------------------------------------------------------------------
    def _frozen_keys(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if not p.requires_grad}

    def _init_from(self, path: str) -> None:
        """Start from the previous stage: model weights only (no optimiser, no step count)."""
        missing, unexpected = self.model.load_state_dict(load_model_weights(path), strict=False)
        missing = set(missing) - self._frozen_keys()
        if missing or unexpected:
            raise ValueError(
                f"init_from {path}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.hparams.save_frozen_weights:
            frozen = {f"model.{k}" for k in self._frozen_keys()}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint:  # ModelParallelStrategy has loaded the weights itself
            return
        have = {k[len("model.") :] for k in checkpoint["state_dict"]}
        missing = set(self.model.state_dict()) - have - self._frozen_keys()
        if missing:
            raise ValueError(f"checkpoint lacks trainable weights: {sorted(missing)[:5]}")

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy (the only strategy that sets a device mesh)."""
        if self.device_mesh is not None:
            precision = self.trainer.precision
            shard_morph_model(self.model, self.device_mesh, precision, self.hparams.activation_checkpointing)

    # ---- the pieces every stage uses -----------------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> EncoderOutput | None:
        """The encoder's output for the batch's images; None without a morph encoder (VQGAN codes in)."""
        return None if self.model.encoder is None else self.model.encode_images(batch["vision_pixels"])

    def vqgan_codes(self, batch: dict[str, Any], index: torch.Tensor | None = None) -> torch.Tensor:
        """X of the batch's images (those at `index`): read from `vqgan_codes` when the data carries them
        (`precompute-codes`), else encoded from `vqgan_pixels`."""
        if "vqgan_codes" not in batch:
            pixels = batch["vqgan_pixels"]
            return self.model.vqgan_codes(pixels if index is None else pixels[index])
        codes = batch["vqgan_codes"] if index is None else batch["vqgan_codes"][index]
        expected = self.model.vqgan.codes_per_image
        if codes.shape[1] != expected:
            raise ValueError(
                f"vqgan_codes: {codes.shape[1]} codes per image, but this VQGAN makes {expected}: "
                "were the codes precomputed with another VQGAN or image size?"
            )
        return codes

    def sequences(
        self, samples: list[Sample], enc: EncoderOutput | None, batch: dict[str, Any] | None = None
    ) -> SequenceBatch:
        """The rows of `samples`; `batch` gives the images' VQGAN codes where the LLM reads or writes
        them itself (`pre_mllm` / `post_mllm: vqgan`)."""
        m = self.model
        h = self.hparams
        codes = self.vqgan_codes(batch) if enc is None or m.post_mllm == "vqgan" else None
        seq = build_sequences(
            samples,
            None if enc is None else enc.ids,
            m.vocab,
            m.llm.tokenizer,
            h.max_text_tokens,
            pack_length=h.pack_length,
            vqgan_codes=codes,
        )
        return seq.to(self.device)

    def token_losses(self, token_ce: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cross-entropy of each position [B, T] (`LLMOutput.token_ce`) averaged over the labelled
        ones, split into text, morph and VQGAN-code terms for logging. A continuous image slot's
        placeholder id is no target: `lm_losses` adds its MSE."""
        ce, labels = token_ce.flatten(), labels.flatten()
        labelled = labels != IGNORE
        vocab, continuous = self.model.vocab, self.model.pre_mllm == "continuous"
        morph = vocab.is_morph(labels) & labelled
        code = vocab.is_code(labels) & labelled
        masks = {"ce": labelled & ~morph if continuous else labelled, "text_ce": labelled & ~morph & ~code}
        if vocab.num_morph and not continuous:
            masks["morph_ce"] = morph
        if vocab.num_codes:
            masks["code_ce"] = code
        # masked means without a host sync; an empty term is 0 (ce is 0 at ignored positions)
        return {k: (ce * m).sum() / m.sum().clamp(min=1) for k, m in masks.items()}

    def lm_losses(
        self, out: LLMOutput, seq: SequenceBatch, enc: EncoderOutput | None
    ) -> dict[str, torch.Tensor]:
        """`token_losses`, and for continuous morph tokens the MSE of the next one in place of their CE."""
        tok = self.token_losses(out.token_ce, seq.labels)
        if self.model.pre_mllm == "continuous":
            tok["morph_mse"] = self.model.next_token_mse(out, seq, enc)
        return tok

    def decoder_term(
        self, seq: SequenceBatch, out: LLMOutput, batch: dict[str, Any], enc: EncoderOutput | None = None
    ) -> torch.Tensor:
        """Eq. 6 over every target image of the batch: CE of the decoder on X given M̂."""
        if not seq.targets:
            return torch.zeros((), device=self.device)
        mhat = self.model.post_mllm_tokens(out, seq.targets, enc)
        index = torch.tensor([i for _, _, i in seq.targets], device=self.device)
        return self.model.decoder_loss(mhat, self.vqgan_codes(batch, index))

    def embedding_term(self, seq: SequenceBatch, out: LLMOutput, enc: EncoderOutput) -> torch.Tensor:
        """abstr-abstr (SD): the MSE of the condition embedding regressed from each target image's M̂
        against its frozen generator's condition embedding of that image (`EncoderOutput.image_embedding`)."""
        if not seq.targets:
            return torch.zeros((), device=self.device)
        mhat = self.model.post_mllm_tokens(out, seq.targets)
        index = torch.tensor([i for _, _, i in seq.targets], device=self.device)
        target = enc.image_embedding[index].detach()
        return F.mse_loss(self.model.decoder_input(mhat).squeeze(1).float(), target.float())

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def answer_losses(self, batch: dict[str, Any], samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Stages 2-3: CE on text answers, CE on X for image answers (the decoder's given M̂, Eq. 6; the
        LLM's own without a decoder), + the weighted morph AR term (CE on the answer's morph ids, or the
        MSE of continuous ones)."""
        h = self.hparams
        enc = self.encode(batch)
        seq = self.sequences(samples, enc, batch)
        out = self.model.run_llm(seq, enc, with_loss=True)
        tok = self.lm_losses(out, seq, enc)
        terms = {"text_ce": tok["text_ce"]}
        if self.model.decoder is None:
            terms["code_ce"] = tok["code_ce"]
        elif self.model.post_mllm == "embedding":
            terms["embed_mse"] = self.embedding_term(seq, out, enc)
        else:
            terms["decoder_ce"] = self.decoder_term(seq, out, batch, enc)
        terms.update({k: tok[k] for k in ("morph_ce", "morph_mse") if k in tok})
        quant = self.quant_terms(enc)
        weight = {
            "text_ce": 1.0,
            "decoder_ce": h.decoder_weight,
            "code_ce": h.decoder_weight,
            "embed_mse": h.decoder_weight,
            "morph_ce": h.morph_ar_weight,
            "morph_mse": h.morph_ar_weight,
            "quant": h.quant_weight,
        }
        loss = sum(weight[k] * v for k, v in {**terms, **quant}.items() if k in weight)
        return {"loss": loss, **terms, **quant}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Each step's randomness (stage 1's image side, code revival, dropout) is a function of the step
        # and rank alone, so a resumed run draws what an uninterrupted one would have.
        torch.manual_seed(step_seed(self.global_step, self.global_rank))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=self._bs(batch))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=self._bs(batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"test/{k}": v for k, v in losses.items()}, batch_size=self._bs(batch))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> GenerationOutput:
        """Captions each image of a pair batch; answers each prompt of an instruction batch."""
        if "samples" in batch:
            prompts = [Sample(prompt=s.prompt) for s in batch["samples"]]
        else:
            prompts = [Sample(prompt=[ImageRef(i)]) for i in range(self._bs(batch))]
        return generate(self.model, prompts, batch["vision_pixels"], **kwargs_of(self.generation))

    @staticmethod
    def _bs(batch: dict[str, Any]) -> int:
        return len(batch["vision_pixels"])

    def quant_terms(self, enc: EncoderOutput | None) -> dict[str, torch.Tensor]:
        """The quantizer's loss and codebook health: batch perplexity and the fraction of codes used."""
        if enc is None or enc.quant_loss is None:
            return {}  # no quantizer: continuous tokens, or VQGAN codes in
        return {
            "quant": enc.quant_loss,
            "perplexity": enc.perplexity.detach(),
            "code_usage": enc.usage.detach(),
        }

    # ---- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        encoder = set() if self.model.encoder is None else {id(p) for p in self.model.encoder.parameters()}
        groups = []
        for in_encoder, scale in ((False, 1.0), (True, h.encoder_lr_scale)):
            params = [p for p in self.parameters() if p.requires_grad and (id(p) in encoder) == in_encoder]
            if scale == 0.0 or not params:
                continue  # out of the optimiser altogether: no update, no optimiser state
            groups += [
                {
                    "params": [p for p in params if p.ndim >= 2],
                    "weight_decay": h.weight_decay,
                    "lr": h.lr * scale,
                },
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": h.lr * scale},
            ]
        opt = torch.optim.AdamW(split_sharded(groups), lr=h.lr, betas=tuple(h.betas))
        return warmup_cosine(opt, self.trainer, h.warmup_steps, h.min_lr_ratio)
