"""Stage 0 for a world without a pretrained Q-former: the morph-token encoder, pretrained to carry the image.

The paper never trains the encoder from random: the released code starts stage 1 from a pretrained
Q-former, and its encoder follows SEED's tokenizer, whose quantized tokens are trained to carry what the
image holds. A small world has no such checkpoint, so this trains one: from the encoder's morph tokens
(straight-through `z_q`) one small head predicts the image's VQGAN codes, every cell of the scene, and
another its caption (BLIP-2's image-grounded text generation). The encoder is then exported in SEED's
layout, and stage 1 loads it through `model.encoder_init` as it would load SEED's file. The heads are
discarded, like SEED's reconstruction blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer

from morph_lightning.modeling.config import (
    QFormerSection,
    QuantizerSection,
    VisionSection,
    VQGANSection,
    kwargs_of,
    parse_section,
)
from morph_lightning.modeling.encoder import EncoderOutput, build_encoder
from morph_lightning.modeling.encoder_weights import save_encoder_weights
from morph_lightning.modeling.sequence import IGNORE
from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer
from morph_lightning.modeling.vision import VisionBackbone
from morph_lightning.modeling.vqgan import VQGAN
from morph_lightning.stages.pretrain_base import PretrainOverTowers


class TokenReader(nn.Module):
    """A small transformer decoder whose targets cross-attend to the morph tokens, then a vocabulary
    head: what the two stage-0 heads share."""

    def __init__(self, code_dim: int, vocab: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.inp = nn.Linear(code_dim, width)
        layer = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, layers)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab))

    def read(self, h: Tensor, z_q: Tensor, **mask: Tensor | bool | None) -> Tensor:
        return self.out(self.blocks(h, self.inp(z_q), **mask))


class CodeHead(TokenReader):
    """Predicts each of the image's VQGAN codes from the morph tokens: one learned query per code
    position."""

    def __init__(self, code_dim: int, n_codes: int, vocab: int, width: int, layers: int, heads: int) -> None:
        super().__init__(code_dim, vocab, width, layers, heads)
        self.queries = nn.Parameter(torch.randn(n_codes, width) * 0.02)

    def forward(self, z_q: Tensor) -> Tensor:
        return self.read(self.queries.expand(z_q.size(0), -1, -1), z_q)


class CaptionHead(TokenReader):
    """BLIP-2's image-grounded text generation, read from the morph tokens: causal over the caption."""

    def __init__(self, code_dim: int, vocab: int, width: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__(code_dim, vocab, width, layers, heads)
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)

    def forward(self, z_q: Tensor, ids: Tensor, pad: Tensor) -> Tensor:
        """Next-token logits [B, T, vocab] for caption ids [B, T] (pad: True where padding)."""
        t = ids.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        h = self.embed(ids) + self.pos[:t]
        return self.read(h, z_q, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=pad)


class EncoderPretrain(PretrainOverTowers):
    def __init__(
        self,
        vision: VisionSection,
        qformer: QFormerSection,
        quantizer: QuantizerSection,
        vqgan: VQGANSection,
        vqgan_checkpoint: str | None = None,
        head_width: int = 64,
        head_layers: int = 2,
        head_heads: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        quant_weight: float = 1.0,
        code_weight: float = 1.0,
        caption_weight: float = 1.0,
        tokenizer: str | None = None,
        max_caption_tokens: int = 64,
        export_path: str | None = None,
    ) -> None:
        """`vision`, `qformer`, `quantizer`, `vqgan`, `vqgan_checkpoint`: the sections of the stage
        configs that will load this encoder (the towers are loaded and frozen as there). The loss is
        `code_weight` x the VQGAN-code CE + `caption_weight` x the caption CE (BLIP-2's image-grounded
        text generation; captions tokenized with `tokenizer`, a directory, or bytes when None) + the
        quantizer's. `export_path`: where the encoder goes in SEED's layout when training ends, for
        `model.encoder_init`."""
        super().__init__()
        sections = {
            "vision": parse_section(VisionSection, vision, "model.init_args.vision"),
            "qformer": parse_section(QFormerSection, qformer, "model.init_args.qformer"),
            "quantizer": parse_section(QuantizerSection, quantizer, "model.init_args.quantizer"),
            "vqgan": parse_section(VQGANSection, vqgan, "model.init_args.vqgan"),
        }
        self.save_hyperparameters(ignore=list(sections))
        # plain dicts, so the checkpoint loads with weights_only
        self.hparams.update({name: kwargs_of(section) for name, section in sections.items()})
        self.vision = VisionBackbone(**kwargs_of(sections["vision"]))
        self.vqgan = VQGAN.frozen(vqgan_checkpoint, **kwargs_of(sections["vqgan"]))
        self.encoder = build_encoder(
            kwargs_of(sections["qformer"]),
            kwargs_of(sections["quantizer"]),
            self.vision.out_dim,
            self.vqgan.codebook,
            None,
        )
        self.head = CodeHead(
            self.encoder.code_dim,
            self.vqgan.codes_per_image,
            self.vqgan.codebook.shape[0],
            head_width,
            head_layers,
            head_heads,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else byte_level_tokenizer()
        self.caption_head = CaptionHead(
            self.encoder.code_dim,
            len(self.tokenizer),
            head_width,
            head_layers,
            head_heads,
            max_caption_tokens,
        )

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        enc: EncoderOutput = self.encoder(self.vision(batch["vision_pixels"]))
        if "vqgan_codes" in batch:
            codes = batch["vqgan_codes"]
        else:
            codes = self.vqgan.encode_to_codes(batch["vqgan_pixels"])
        logits = self.head(enc.z_q)
        code_ce = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())
        caption_ce = self.caption_loss(enc.z_q, batch["captions"])
        h = self.hparams
        return {
            "loss": h.code_weight * code_ce + h.caption_weight * caption_ce + h.quant_weight * enc.quant_loss,
            "code_ce": code_ce,
            "caption_ce": caption_ce,
            "code_acc": (logits.argmax(-1) == codes).float().mean(),
            "quant": enc.quant_loss,
            "perplexity": enc.perplexity.detach(),
            "code_usage": enc.usage.detach(),
        }

    def caption_loss(self, z_q: Tensor, captions: list[str]) -> Tensor:
        """Next-token CE of `<s> caption </s>` given the morph tokens."""
        tok = self.tokenizer
        texts = [tok.bos_token + c + tok.eos_token for c in captions]
        enc = tok(
            texts,
            padding=True,
            truncation=True,
            max_length=self.hparams.max_caption_tokens,
            return_tensors="pt",
        )
        ids, pad = enc.input_ids.to(z_q.device), enc.attention_mask.to(z_q.device) == 0
        logits = self.caption_head(z_q, ids[:, :-1], pad[:, :-1])
        target = ids[:, 1:].masked_fill(pad[:, 1:], IGNORE)
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE)

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            save_encoder_weights(self.encoder, Path(self.hparams.export_path))
