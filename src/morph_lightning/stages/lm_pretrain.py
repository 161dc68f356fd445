"""Stage 0 for a world without a pretrained LLM: a small causal LM trained on the world's text.

The paper adapts a pretrained Vicuna with LoRA. A small world has no such model, so this trains one
from scratch on captions and exports it with `save_pretrained` (weights + tokenizer), which the stage
configs then load through `llm.name_or_path` and adapt with LoRA only, exactly as the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from morph_lightning.modeling.llm import byte_level_tokenizer
from morph_lightning.modeling.sequence import IGNORE


class CausalLMPretrain(L.LightningModule):
    def __init__(
        self,
        config: dict[str, Any],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        max_length: int = 128,
        export_dir: str | None = None,
    ) -> None:
        """`config`: an HF config, e.g. {"model_type": "llama", "hidden_size": 64, ...}."""
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = byte_level_tokenizer()
        config = dict(config)
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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch["captions"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["captions"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch["captions"]), batch_size=len(batch["captions"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def export(self, directory: str | Path) -> None:
        """An HF model directory: `MorphLLM(name_or_path=directory)` loads it like any hub model."""
        self.lm.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)
