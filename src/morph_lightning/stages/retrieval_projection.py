"""Image-text retrieval with the morph encoder (paper Table 6, Appendix C.3): the dual-stream set-up.

C.3: "We adopt the dual-stream paradigm and incorporate the text encoder from BLIP2. Concurrently, we learn
a linear-projection layer using some image-text pairs from LAION, to align the output of the morph-encoder
with that of the text encoder." Here both encoders are frozen and only linear layers (and a temperature)
train, with CLIP's symmetric InfoNCE (`ContrastivePairs.losses`; the paper names no loss).

The image side reads "the output of the morph-encoder": M, its 32 straight-through codebook vectors z_q
(Eq. 1), not the Q-former's hidden states. How M becomes one vector is not in the paper: `image_pooling`
is the mean over the tokens, or their concatenation (a mean of 32 code vectors is only `code_dim`, 32,
wide). The text side is any transformers model: BLIP-2's Q-former text encoder is
`Blip2TextModelWithProjection` (`text_output: text_embeds`, the [CLS] row is BLIP-2's ITC text feature);
a CLIP text model works too (`CLIPTextModel`, `pooler_output`), and so does a causal LM's hidden states
(`AutoModel`, `last_hidden_state`) with `text_pooling: mean`, as the world's run uses its small LM
(configs/world/retrieval.yaml). `embed_dim: null` follows C.3's single layer: the image side is projected
into the text encoder's output space; a number projects both sides.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from morph_lightning.evaluation.retrieval import pre_caption
from morph_lightning.modeling.config import MorphModelConfig, kwargs_of, parse_section
from morph_lightning.modeling.encoder import build_encoder
from morph_lightning.modeling.vision import VisionBackbone
from morph_lightning.modeling.vqgan import VQGAN
from morph_lightning.stages.base import load_model_weights
from morph_lightning.stages.contrastive_towers import ContrastivePairs
from morph_lightning.stages.schedule import warmup_cosine


class RetrievalProjection(ContrastivePairs):
    def __init__(
        self,
        model: MorphModelConfig,
        text_encoder: str,
        init_from: str | None = None,
        text_model_class: str = "AutoModel",
        text_output: str = "pooler_output",
        text_pooling: Literal["first", "mean"] = "first",
        max_text_len: int = 77,
        max_words: int = 50,
        embed_dim: int | None = None,
        image_pooling: Literal["mean", "flatten"] = "mean",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        """`model`: the stage's `MorphModel` section; only its vision tower and encoder are built (the
        encoder's confounder dictionary from its VQGAN's codebook, as `MorphModel` does). `init_from`: a
        stage checkpoint whose `vision.*` / `encoder.*` weights load (a frozen vision tower the checkpoint
        left out is rebuilt from its source); without it the encoder is `model.encoder_init`'s.
        `text_encoder`: a local directory or cached hub id, read with `text_model_class` (a transformers
        class name) and `AutoTokenizer`, offline, in float32. `text_output`: the output field that is the
        text's feature; a per-token field is pooled by `text_pooling`: "first", its first ([CLS]) row
        (BLIP-2, BERT-like encoders); "mean", the mean over the text's tokens, padding left out (a causal
        LM, whose first row has seen only the first token). Captions are cleaned by LAVIS's
        `pre_caption(max_words)`, then cut to `max_text_len` tokens."""
        super().__init__()
        if text_pooling not in ("first", "mean"):
            raise ValueError(f"RetrievalProjection.text_pooling: 'first' or 'mean', got {text_pooling!r}")
        c = parse_section(MorphModelConfig, model, "model.init_args.model")
        self.save_hyperparameters(ignore=["model"])
        self.hparams.update(model=dataclasses.asdict(c))  # plain dicts: checkpoints load with weights_only

        self.vision = VisionBackbone(**kwargs_of(c.vision))
        codebook = VQGAN.frozen(c.vqgan_checkpoint, **kwargs_of(c.vqgan)).codebook
        self.encoder = build_encoder(
            kwargs_of(c.qformer), kwargs_of(c.quantizer), self.vision.out_dim, codebook, c.encoder_init
        )
        if init_from:
            self._init_from(init_from)
        # float32 whatever the saved dtype: a half-precision save (the world's LM) is slow and coarse on CPU
        self.text_encoder = getattr(transformers, text_model_class).from_pretrained(
            text_encoder, local_files_only=True, dtype=torch.float32
        )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(text_encoder, local_files_only=True)
        for tower in (self.vision, self.encoder, self.text_encoder):
            tower.requires_grad_(False).eval()

        n_tokens = 1 if image_pooling == "mean" else self.encoder.num_tokens
        text_dim = self.text_features(["a"]).shape[-1]
        self.image_proj = nn.Linear(n_tokens * self.encoder.code_dim, embed_dim or text_dim)
        self.text_proj = nn.Identity() if embed_dim is None else nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.strict_loading = False  # checkpoints hold the trainable weights only; the towers are rebuilt

    def _init_from(self, path: str) -> None:
        weights = {
            k: v for k, v in load_model_weights(path).items() if k.split(".")[0] in ("vision", "encoder")
        }
        missing, _ = self.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k.startswith("encoder.")]
        if missing:
            raise ValueError(f"init_from {path}: no encoder weights {missing[:5]}")

    def train(self, mode: bool = True) -> RetrievalProjection:
        super().train(mode)
        for tower in (self.vision, self.encoder, self.text_encoder):
            tower.eval()  # frozen: no dropout, and the quantizer revives no codes
        return self

    # ---- the two streams --------------------------------------------------------------------------
    def image_features(self, vision_pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z_q = self.encoder(self.vision(vision_pixels)).z_q  # M: [N, num_tokens, code_dim]
        return (z_q.mean(1) if self.hparams.image_pooling == "mean" else z_q.flatten(1)).float()

    def text_features(self, captions: list[str]) -> torch.Tensor:
        h = self.hparams
        texts = [pre_caption(t, h.max_words) for t in captions]
        tok = self.tokenizer(
            texts, padding=True, truncation=True, max_length=h.max_text_len, return_tensors="pt"
        )
        with torch.no_grad():
            out = self.text_encoder(
                input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
            )
        feat = getattr(out, h.text_output).float()
        if feat.ndim == 2:  # one vector per text already (CLIP's pooler_output)
            if h.text_pooling == "mean":
                raise ValueError(f"text_pooling 'mean' needs a per-token text_output, not {h.text_output!r}")
            return feat
        if h.text_pooling == "first":
            return feat[:, 0]
        mask = tok.attention_mask.to(feat).unsqueeze(-1)
        return (feat * mask).sum(1) / mask.sum(1)

    def encode_images(self, vision_pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [N, D]."""
        return F.normalize(self.image_proj(self.image_features(vision_pixels)), dim=-1)

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings [T, D]."""
        return F.normalize(self.text_proj(self.text_features(captions)), dim=-1)

    def embeddings(
        self, vision_pixels: torch.Tensor, captions: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_images(vision_pixels), self.encode_texts(captions)

    # ---- checkpoints and optimisation -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = {n for n, p in self.named_parameters() if p.requires_grad} - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(f"checkpoint lacks trainable weights: {sorted(missing)}")

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]  # the projections and the temperature
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": h.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=h.lr, betas=(0.9, 0.999))
        return warmup_cosine(opt, self.trainer, h.warmup_steps, h.min_lr_ratio)
