"""Stage 1 (Eq. 4): auto-regress `<img> M </img> Y` and `Y <img> M </img>` with one cross-entropy.

Pre- and post-MLLM morph tokens are equal here (teacher-forced ids), which is no conflict because no
image is generated. Trains the encoder (Q-former, MLP, codebook), LoRA and the new token rows; the
morph positions' inputs are straight-through z_q, so the CE on Y reaches the encoder. Continuous morph
tokens (the 'continuous' ablation) take the MSE of the next token in place of their CE.
"""

from __future__ import annotations

from typing import Any

import torch

from morph_lightning.modeling.config import MorphModelConfig
from morph_lightning.modeling.sequence import ImageRef, Sample
from morph_lightning.stages.base import MorphStage


class Stage1AR(MorphStage):
    def __init__(self, model: MorphModelConfig, image_first_prob: float = 0.5, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.image_first_prob = image_first_prob

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        enc = self.encode(batch)
        image_first = torch.rand(len(batch["captions"])) < self.image_first_prob
        samples = [
            Sample(answer=[ImageRef(i), cap] if first else [cap, ImageRef(i)])
            for i, (cap, first) in enumerate(zip(batch["captions"], image_first.tolist(), strict=True))
        ]
        seq = self.sequences(samples, enc, batch)
        out = self.model.run_llm(seq, enc, with_loss=True)
        tok = self.lm_losses(out, seq, enc)
        quant = self.quant_terms(enc)
        loss = tok["ce"] + tok.get("morph_mse", 0.0) + self.hparams.quant_weight * quant.get("quant", 0.0)
        return {"loss": loss, **tok, **quant}
