"""Stage 3 (Section 3.4): instruction tuning on `USER: ... ASSISTANT: ...` with images anywhere.

Text answers take CE; image answers take the decoder's CE on X given M̂. Their morph ids also take a CE
(`morph_ar_weight`, default 1 here) because at inference the LLM must emit them itself.
"""

from __future__ import annotations

from typing import Any

import torch

from morph_lightning.modeling.config import MorphModelConfig
from morph_lightning.stages.base import MorphStage


class Stage3Instruct(MorphStage):
    def __init__(
        self, model: MorphModelConfig, morph_ar_weight: float = 1.0, lr: float = 1e-5, **kwargs: Any
    ) -> None:
        super().__init__(model, morph_ar_weight=morph_ar_weight, lr=lr, **kwargs)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.answer_losses(batch, batch["samples"])
