"""Stage 2 (Eq. 5-6): auto-encoding through the MLLM, Image -> V -> M -> M̂ -> X -> Image.

Every image gives two rows: captioning `<M, Y>` with CE on Y (Eq. 5), and text-to-image `<Y, M>`
whose post-MLLM tokens M̂ feed the decoder, trained by CE on the VQGAN codes X (Eq. 6). No loss ties
M̂ to M; the paper has no morph AR loss for `<Y, M>` (`morph_ar_weight`, default 0, studies it).
"""

from __future__ import annotations

from typing import Any

import torch

from morph_lightning.modeling.sequence import ImageRef, Sample
from morph_lightning.stages.base import MorphStage


class Stage2AutoEncode(MorphStage):
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        captions = batch["captions"]
        samples = [Sample(prompt=[ImageRef(i)], answer=[cap]) for i, cap in enumerate(captions)]
        samples += [Sample(prompt=[cap], answer=[ImageRef(i, target=True)]) for i, cap in enumerate(captions)]
        return self.answer_losses(batch, samples)
