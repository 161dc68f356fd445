"""Stage 0 for a world without a pretrained LLM: a small causal LM trained on the world's text.

The paper adapts a pretrained Vicuna with LoRA. A small world has no such model, so this trains one
from scratch on captions and exports it with `save_pretrained` (weights + tokenizer), which the stage
configs then load through `llm.name_or_path` and adapt with LoRA only, exactly as the real one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from morph_lightning.modeling.sequence import IGNORE
from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer
from morph_lightning.stages.schedule import warmup_cosine


class CausalLMPretrain(L.LightningModule):
    def __init__(
        self,
        config: dict[str, Any],
        tokenizer: str | None = None,
        text_key: str = "texts",
        lr: float = 1e-3,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        weight_decay: float = 0.05,
        max_length: int = 128,
        export_dir: str | None = None,
        export_dtype: str | None = None,
    ) -> None:
        """`config`: an HF config, e.g. {"model_type": "llama", "hidden_size": 64, ...}; its vocab_size
        defaults to the tokenizer's size. `tokenizer`: a tokenizer directory or hub id (None: bytes).
        `text_key`: the batch entry holding the list of strings ("texts" from `TextDataModule`,
        "captions" from the pair data module). `export_dtype` (e.g. "float16"): the dtype the export is
        saved in, as hub models often are (it halves the file); loaders choose their own with `llm.dtype`."""
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else byte_level_tokenizer()
        if self.tokenizer.bos_token is None or self.tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer}: needs bos and eos tokens to mark documents")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = {"vocab_size": len(self.tokenizer), **config}
        hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
        if hf_config.vocab_size < len(self.tokenizer):
            raise ValueError(
                f"config.vocab_size {hf_config.vocab_size} < tokenizer size {len(self.tokenizer)}"
            )
        self.lm = AutoModelForCausalLM.from_config(hf_config)

    def loss(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            [self.tokenizer.bos_token + t + self.tokenizer.eos_token for t in texts],
            padding=True,
            truncation=True,
            max_length=self.hparams.max_length,
            return_tensors="pt",
        ).to(self.device)
        labels = tok.input_ids.masked_fill(tok.attention_mask == 0, IGNORE)
        return self.lm(input_ids=tok.input_ids, attention_mask=tok.attention_mask, labels=labels).loss

    def texts(self, batch: dict[str, Any]) -> list[str]:
        if self.hparams.text_key not in batch:
            raise KeyError(f"text_key {self.hparams.text_key!r} not in the batch (keys: {sorted(batch)})")
        return batch[self.hparams.text_key]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        texts = self.texts(batch)
        loss = self.loss(texts)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(texts))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        texts = self.texts(batch)
        self.log("val/loss", self.loss(texts), batch_size=len(texts))

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        return warmup_cosine(opt, self.trainer, h.warmup_steps, h.min_lr_ratio)

    def export(self, directory: str | Path) -> None:
        """An HF model directory: `MorphLLM(name_or_path=directory)` loads it like any hub model."""
        dtype = self.hparams.export_dtype
        lm = copy.deepcopy(self.lm).to(getattr(torch, dtype)) if dtype else self.lm
        lm.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)
