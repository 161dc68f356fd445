"""MorphModel: vision tower -> encoder -> MLLM -> decoder -> VQGAN, with the paper's data flow.

Comprehension reads M (pre-MLLM morph tokens from the encoder). Generation reads M̂ (post-MLLM), which
no loss ties to M: stage 2 trains M̂ only through the decoder's reconstruction loss (Eq. 6).
`pre_mllm` and `post_mllm` other than the defaults build the paper's ablations (docs/ablations.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from morph_lightning.modeling.config import DecoderSection, MorphModelConfig, kwargs_of, parse_section
from morph_lightning.modeling.decoder import MorphDecoder
from morph_lightning.modeling.encoder import EncoderOutput, build_encoder
from morph_lightning.modeling.llm import LLMOutput, MorphLLM
from morph_lightning.modeling.sequence import IGNORE, SequenceBatch
from morph_lightning.modeling.tokens import MorphVocab
from morph_lightning.modeling.unclip import UnCLIPGenerator
from morph_lightning.modeling.vision import VisionBackbone
from morph_lightning.modeling.vqgan import VQGAN


@dataclass
class GenerationOutput:
    texts: list[str]  # per row, the generated text with each image shown as "<image>"
    images: list[list[int]]  # per row, indices into `pixels` of the images it generated
    pixels: torch.Tensor | None  # [K, 3, R, R] in [-1, 1]


def check_tokens(pre_mllm: str, post_mllm: str, encoder_init: str | None) -> None:
    """Refuse the combinations that cannot be built, in one line each."""
    if pre_mllm == "vqgan" and post_mllm != "vqgan":
        raise ValueError(
            f"model.post_mllm: {post_mllm} feeds the decoder morph tokens M̂, and pre_mllm: vqgan has none "
            "(detail-detail is pre_mllm: vqgan with post_mllm: vqgan)"
        )
    if pre_mllm != "morph" and post_mllm == "embedding":
        raise ValueError(
            f"model.post_mllm: embedding regresses the image tower's embedding from the states at discrete "
            f"morph tokens; pre_mllm: {pre_mllm} has none (abstr-abstr (SD) is pre_mllm: morph)"
        )
    if pre_mllm == "continuous" and post_mllm in ("codes", "tied"):
        raise ValueError(
            f"model.post_mllm: {post_mllm} reads morph codebook vectors; pre_mllm: continuous has none"
        )
    if pre_mllm == "vqgan" and encoder_init:
        raise ValueError("model.encoder_init: pre_mllm: vqgan has no morph encoder to load it into")


class MorphModel(nn.Module):
    def __init__(self, config: MorphModelConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = c = parse_section(MorphModelConfig, config, "model")
        check_tokens(c.pre_mllm, c.post_mllm, c.encoder_init)
        self.pre_mllm, self.post_mllm = c.pre_mllm, c.post_mllm
        self.gumbel_tau = c.gumbel_tau

        # Frozen towers (the paper's pretrained CLIP-ViT and VQGAN). With VQGAN codes as the pre-MLLM
        # tokens (detail-detail) the VQGAN is the image tokenizer: no vision tower, no morph encoder.
        codes_in = c.pre_mllm == "vqgan"
        self.vision = None if codes_in else VisionBackbone(**kwargs_of(c.vision))
        self.vqgan = VQGAN.frozen(c.vqgan_checkpoint, **kwargs_of(c.vqgan))
        self.encoder = None
        if not codes_in:
            sections = kwargs_of(c.qformer), kwargs_of(c.quantizer)
            self.encoder = build_encoder(
                *sections, self.vision.out_dim, self.vqgan.codebook, c.encoder_init, c.pre_mllm == "morph"
            )
        # A continuous image slot is one placeholder id whose vector the encoder supplies.
        num_morph = {"morph": c.quantizer.codebook_size, "continuous": 1, "vqgan": 0}[c.pre_mllm]
        self.llm = MorphLLM(
            **kwargs_of(c.llm),
            num_morph_tokens=num_morph,
            code_dim=0 if codes_in else self.encoder.code_dim,
            num_code_tokens=self.vqgan.codebook.shape[0] if c.post_mllm == "vqgan" else 0,
            continuous=c.pre_mllm == "continuous",
        )
        # With post_mllm: vqgan the LLM writes X itself and the VQGAN decodes it: there is no decoder.
        self.decoder = None
        self.condition_head = None
        if c.post_mllm == "embedding":
            # abstr-abstr (SD): a separately trained generator, frozen, draws an image from one condition
            # vector; M̂ is mapped to it (`decoder_input`) and trained by MSE against the generator's own
            # embedding of the target (`encode_images`). At paper scale an unCLIP Stable Diffusion on its
            # CLIP image embedding; else the stage-0 generator of X on the image tower's embedding.
            if c.generator_pipeline and c.generator_checkpoint:
                raise ValueError(
                    "model: generator_checkpoint and generator_pipeline are two generators; set one"
                )
            if c.generator_pipeline:
                self.decoder = UnCLIPGenerator(c.generator_pipeline)
                condition_dim = self.decoder.condition_dim
            else:
                self.decoder = load_generator(c, self.vision.out_dim, self.vqgan)
                condition_dim = self.vision.out_dim
            self.condition_head = nn.Linear(self.llm.hidden_size, condition_dim)
        elif c.post_mllm != "vqgan":
            prefix_dim = self.llm.hidden_size if c.post_mllm == "hidden" else self.encoder.code_dim
            self.decoder = MorphDecoder(
                **kwargs_of(c.decoder),
                vocab_size=self.vqgan.codebook.shape[0],
                n_codes=self.vqgan.codes_per_image,
                n_prefix=self.encoder.num_tokens,
                prefix_dim=prefix_dim,
            )

    def train(self, mode: bool = True) -> MorphModel:
        super().train(mode)
        self.vqgan.eval()  # frozen towers never leave eval mode
        if self.post_mllm == "embedding":
            self.decoder.eval()  # the frozen generator
        return self

    @property
    def vocab(self) -> MorphVocab:
        return self.llm.vocab

    @property
    def num_tokens(self) -> int:
        """Tokens of an image in the LLM's input: |M|, or the VQGAN's codes per image without an encoder."""
        return self.vqgan.codes_per_image if self.encoder is None else self.encoder.num_tokens

    # ---- towers -------------------------------------------------------------------------------
    def encode_images(self, vision_pixels: torch.Tensor) -> EncoderOutput:
        """Images (normalised for the vision tower) -> pre-MLLM morph tokens M; for abstr-abstr (SD) also
        each image's condition embedding, which M̂ regresses: the tower's, or the unCLIP pipeline's."""
        tokens = self.vision(vision_pixels)
        enc = self.encoder(tokens)
        if isinstance(self.decoder, UnCLIPGenerator):  # its own image encoder's embedding
            enc.image_embedding = self.decoder.embed(self.vision.denormalize(vision_pixels))
        elif self.post_mllm == "embedding":
            enc.image_embedding = self.vision.pool(tokens)
        return enc

    @torch.no_grad()
    def vqgan_codes(self, vqgan_pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> X, the VQGAN codes [N, codes_per_image]."""
        return self.vqgan.encode_to_codes(vqgan_pixels)

    # ---- MLLM ---------------------------------------------------------------------------------
    def morph_vectors(self, batch: SequenceBatch, enc: EncoderOutput | None) -> torch.Tensor | None:
        """The codebook vector behind every morph position: the encoder's straight-through z_q."""
        if enc is None or enc.z_q.numel() == 0:
            return None
        is_slot = batch.image_slot >= 0
        flat = enc.z_q.reshape(-1, enc.z_q.shape[-1])
        return flat[batch.image_slot.clamp(min=0)] * is_slot.unsqueeze(-1)

    def run_llm(self, batch: SequenceBatch, enc: EncoderOutput | None, with_loss: bool = False) -> LLMOutput:
        """The LLM over `batch`; `with_loss` adds each position's cross-entropy against its labels (and
        with `llm.loss_chunk` leaves the logits out)."""
        embeds = self.llm.embed(batch.input_ids, self.morph_vectors(batch, enc))
        mask = None if batch.packed else batch.attention_mask  # packed: boundaries come from position_ids
        labels = batch.labels if with_loss else None
        return self.llm(embeds, attention_mask=mask, position_ids=batch.position_ids, labels=labels)

    def decoder_input(self, mhat: torch.Tensor) -> torch.Tensor:
        """What the decoder reads for M̂ [K, 32, H]: M̂ itself, or with `post_mllm: embedding` the
        condition embedding regressed from it [K, 1, D] (the mean of its rows, mapped linearly)."""
        if self.condition_head is None:
            return mhat
        return self.condition_head(mhat.mean(1).to(self.condition_head.weight.dtype)).unsqueeze(1)

    def post_mllm_tokens(
        self, out: LLMOutput, targets: list[tuple[int, int, int]], enc: EncoderOutput | None = None
    ) -> torch.Tensor:
        """M̂ [K, 32, D] of each target image: read at the positions that emit its morph tokens."""
        n = self.num_tokens

        def at_targets(per_position: torch.Tensor) -> torch.Tensor:  # [B, T, ...] -> [K, 32, ...]
            return torch.stack([per_position[b, p : p + n] for b, p, _ in targets])

        if self.post_mllm in ("hidden", "embedding"):
            return at_targets(out.hidden)
        if self.post_mllm == "tied":
            # abstr-abstr (VQ): M̂ is M, the target image's own morph tokens (their straight-through z_q,
            # the vectors the LLM reads for them). Nothing of the decoder's loss reaches the LLM, which
            # learns to emit M by the morph CE alone.
            if enc is None:
                raise ValueError("post_mllm: tied reads M̂ from the encoder's output: pass `enc`")
            return enc.z_q[[i for _, _, i in targets]]
        # 'codes': the released inference path (ids -> codebook vectors), made differentiable with a
        # straight-through Gumbel-softmax over the morph logits.
        off = self.vocab.morph_offset
        # A chunked loss kept no logits: the head again, at these positions only.
        if out.logits is None:
            logits = self.llm.head(at_targets(out.hidden))[..., off:]
        else:
            logits = at_targets(out.logits[..., off:])
        one_hot = F.gumbel_softmax(logits.float(), tau=self.gumbel_tau, hard=True)
        return one_hot @ self.encoder.quantizer.codebook

    def next_token_mse(self, out: LLMOutput, batch: SequenceBatch, enc: EncoderOutput) -> torch.Tensor:
        """Continuous morph tokens: the MSE of the vector regressed at each labelled position whose next
        token is an image slot, against that slot's vector, held fixed as a target (as a CE's target id
        is): the encoder learns from the inputs alone, as with discrete tokens."""
        nxt = F.pad(batch.image_slot[:, 1:], (0, 1), value=-1)  # the slot of the token each position predicts
        at = ((nxt >= 0) & (batch.labels != IGNORE)).float()
        target = enc.z_q.reshape(-1, enc.z_q.shape[-1])[nxt.clamp(min=0)].detach()
        err = (out.vectors.float() - target.float()).pow(2).mean(-1)
        return (err * at).sum() / at.sum().clamp(min=1)  # a masked mean without a host sync

    @torch.no_grad()
    def draw(
        self,
        mhat: torch.Tensor,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache: str = "dynamic",
        compile: bool = False,
    ) -> torch.Tensor:
        """Images [K, 3, R, R] in [-1, 1] from each image's post-MLLM tokens: M̂ [K, 32, D] through the
        decoder (or the abstr-abstr (SD) generator) and the VQGAN, or with `post_mllm: vqgan` the codes X
        [K, n] the LLM wrote, through the VQGAN alone. The options sample the decoder's codes."""
        if isinstance(self.decoder, UnCLIPGenerator):
            return self.decoder.draw(self.decoder_input(mhat), self.vqgan.resolution, generator)
        codes = mhat
        if self.decoder is not None:
            codes = self.decoder.generate(
                self.decoder_input(mhat).to(self.decoder_dtype),
                temperature=temperature,
                top_k=top_k,
                generator=generator,
                cache=cache,
                compile=compile,
            )
        return self.vqgan.decode_codes(codes).clamp(-1, 1)

    def decoder_loss(self, mhat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Eq. 6: cross-entropy of the decoder on X given M̂."""
        return self.decoder.loss(mhat.to(self.decoder_dtype), codes)

    @property
    def decoder_dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    def emp_vector(self) -> torch.Tensor:
        """What fills M̂ when the LLM closes an image early (<Emp>, Section 3.4)."""
        if self.post_mllm in ("hidden", "embedding"):
            return self.llm.emp_embedding
        return torch.zeros(self.encoder.code_dim, device=self.llm.emp_embedding.device)

    def complete_mhat(self, mhat: torch.Tensor) -> torch.Tensor:
        """Pad M̂ [n, D] with <Emp> up to 32 rows, or trim it to 32."""
        n = self.num_tokens
        if mhat.shape[0] >= n:
            return mhat[:n]
        pad = self.emp_vector().to(mhat.dtype).expand(n - mhat.shape[0], -1)
        return torch.cat([mhat, pad])


def build_generator(decoder: DecoderSection, vqgan: VQGAN, condition_dim: int) -> MorphDecoder:
    """The world's conditional generator of `post_mllm: embedding`: a decoder over `vqgan`'s codes X,
    sized by the `decoder` section, with one prefix vector, the condition (stage 0 trains it)."""
    return MorphDecoder(
        **kwargs_of(decoder),
        vocab_size=vqgan.codebook.shape[0],
        n_codes=vqgan.codes_per_image,
        n_prefix=1,
        prefix_dim=condition_dim,
    )


def load_generator(c: MorphModelConfig, condition_dim: int, vqgan: VQGAN) -> MorphDecoder:
    """`build_generator`, frozen, its weights from `generator_checkpoint` (random without)."""
    generator = build_generator(c.decoder, vqgan, condition_dim)
    if c.generator_checkpoint:
        if not Path(c.generator_checkpoint).is_file():
            raise FileNotFoundError(
                f"model.generator_checkpoint: {c.generator_checkpoint} not found (the stage-0 conditional "
                "generator exports it: world/stage0_generator.yaml's export_path)"
            )
        try:
            generator.load_state_dict(load_file(c.generator_checkpoint))
        except RuntimeError as err:
            reason = " ".join(str(err).split())  # one line
            raise ValueError(
                f"model.generator_checkpoint: {c.generator_checkpoint} does not fit the decoder section: "
                f"{reason}"
            ) from None
    return generator.requires_grad_(False).eval()
