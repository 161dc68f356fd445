"""Stage 0 for abstr-abstr (SD): an image generator conditioned on the frozen image tower's embedding.

SEED-LLaMA, which the ablation follows, aligns its post-MLLM tokens to the condition embedding of an
unCLIP Stable Diffusion: a generator trained apart from the MLLM that draws an image from one CLIP image
embedding. The world has no such generator, so this trains one: a decoder-only transformer over the
VQGAN codes X (the architecture of the method's decoder, `decoder` section) whose one prefix vector is
the image tower's embedding of the image (`VisionBackbone.embed`). Its weights are exported as a
safetensors state dict, which `model.generator_checkpoint` loads, frozen, for `post_mllm: embedding`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import Tensor

from morph_lightning.evaluation.runner import write_atomic
from morph_lightning.modeling.config import (
    DecoderSection,
    VisionSection,
    VQGANSection,
    kwargs_of,
    parse_section,
)
from morph_lightning.modeling.model import build_generator
from morph_lightning.modeling.vision import VisionBackbone
from morph_lightning.modeling.vqgan import VQGAN
from morph_lightning.stages.pretrain_base import PretrainOverTowers


class ConditionalGenerator(PretrainOverTowers):
    def __init__(
        self,
        vision: dict[str, Any],
        vqgan: dict[str, Any],
        decoder: dict[str, Any],
        vqgan_checkpoint: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        export_path: str | None = None,
    ) -> None:
        """`vision`, `vqgan`, `vqgan_checkpoint`, `decoder`: the sections of the stage configs that will
        load this generator (the towers frozen as there; `decoder` gives the generator's sizes). The loss
        is the CE on X given the embedding. `export_path`: where the weights go when training ends."""
        super().__init__()
        sections = {
            "vision": parse_section(VisionSection, vision, "model.init_args.vision"),
            "vqgan": parse_section(VQGANSection, vqgan, "model.init_args.vqgan"),
            "decoder": parse_section(DecoderSection, decoder, "model.init_args.decoder"),
        }
        self.save_hyperparameters(ignore=list(sections))
        # plain dicts, so the checkpoint loads with weights_only
        self.hparams.update({name: kwargs_of(section) for name, section in sections.items()})
        self.vision = VisionBackbone(**kwargs_of(sections["vision"]))
        self.vqgan = VQGAN.frozen(vqgan_checkpoint, **kwargs_of(sections["vqgan"]))
        self.generator = build_generator(sections["decoder"], self.vqgan, self.vision.out_dim)

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        condition = self.vision.embed(batch["vision_pixels"]).unsqueeze(1)
        return {"loss": self.generator.loss(condition, self.vqgan.encode_to_codes(batch["vqgan_pixels"]))}

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            path = Path(self.hparams.export_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            # whole or not at all; an earlier, different export is moved aside, not overwritten
            write_atomic(path, save({k: v.contiguous() for k, v in self.generator.state_dict().items()}))
