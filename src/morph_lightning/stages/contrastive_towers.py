"""Stage 0 for a world without pretrained towers: a CLIP-style image encoder trained contrastively.

The paper freezes a pretrained CLIP-ViT. A small world has none, so this trains one on its own
image-caption pairs (symmetric InfoNCE, as CLIP) and exports the image tower's timm weights, which
`VisionBackbone(checkpoint_path=...)` then loads and freezes exactly as it would EVA-CLIP-g.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer
from morph_lightning.modeling.vision import VisionBackbone
from morph_lightning.stages.schedule import warmup_cosine


def tower_args_path(tower: str | Path) -> Path:
    """The sidecar of an exported image tower (`vision.safetensors` -> `vision.json`): a JSON object of the
    `VisionBackbone` arguments that load it, all but `checkpoint_path`, which is the tower file itself."""
    return Path(tower).with_suffix(".json")


class CaptionEncoder(nn.Module):
    """A small transformer over bytes, mean-pooled: the text side of the contrastive pair."""

    def __init__(self, width: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.tokenizer = byte_level_tokenizer()
        self.max_len = max_len
        self.embed = nn.Embedding(len(self.tokenizer), width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, captions: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt"
        )
        ids, mask = tok.input_ids.to(self.pos.device), tok.attention_mask.to(self.pos.device)
        h = self.blocks(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=mask == 0)
        h = self.norm(h)
        return (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


class ContrastivePairs(L.LightningModule):
    """Image-text pairs trained with CLIP's symmetric InfoNCE over the batch. Subclasses give
    `embeddings(pixels, captions)` (unit-norm image and text embeddings) and a learnable `logit_scale`."""

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, text = self.embeddings(batch["vision_pixels"], batch["captions"])
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.T
        target = torch.arange(len(image), device=image.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"loss": loss, "i2t_acc": (logits.argmax(1) == target).float().mean()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["captions"])
        )
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["captions"]))


class ContrastiveTowers(ContrastivePairs):
    def __init__(
        self,
        vision: dict[str, Any],
        embed_dim: int = 64,
        text_width: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        max_text_len: int = 96,
        lr: float = 1e-3,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        weight_decay: float = 0.05,
        export_path: str | None = None,
    ) -> None:
        """`vision`: `VisionBackbone` arguments of a timm tower (trained here, so never frozen)."""
        super().__init__()
        self.save_hyperparameters()
        self.image_tower = VisionBackbone(**{**vision, "frozen": False, "pretrained": False})
        if self.image_tower.backend != "timm":
            raise ValueError("ContrastiveTowers.vision: only a timm tower can be trained and exported")
        self.text_tower = CaptionEncoder(text_width, text_layers, text_heads, max_text_len)
        self.image_proj = nn.Linear(self.image_tower.out_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def embeddings(
        self, vision_pixels: torch.Tensor, captions: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image_proj(self.image_tower(vision_pixels).mean(1))
        text = self.text_proj(self.text_tower(captions))
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        return warmup_cosine(opt, self.trainer, h.warmup_steps, h.min_lr_ratio)

    def export_image_tower(self, path: str | Path) -> None:
        """The image tower's timm state dict as safetensors, and beside it (`tower_args_path`) the arguments
        that load it frozen: `VisionBackbone(checkpoint_path=path, **args)`."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.image_tower.model.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        # a checkpoint it was initialised from is not needed to load it: the exported file holds the weights
        args = {k: v for k, v in self.hparams.vision.items() if k != "checkpoint_path"}
        args |= {"pretrained": False, "frozen": True}
        tower_args_path(path).write_text(json.dumps(args, indent=1) + "\n")

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.export_image_tower(self.hparams.export_path)
