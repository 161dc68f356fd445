"""The MLLM: any HF causal LM with LoRA, extended by the special and morph tokens.

The base model's text embedding and head stay frozen and untouched (no resize): the new rows live in
`new_embed` / `new_head`, and a morph token's input embedding is `morph_in` applied to its codebook
vector, so a straight-through z_q from the encoder carries Eq. 4's gradient into the encoder.
Two ablations (docs/ablations.md) add rows: VQGAN code tokens with a learned embedding (`code_embed`,
as TEAL), and for continuous morph tokens a regression head (`morph_out`) in place of their logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from morph_lightning.modeling.sequence import IGNORE
from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer
from morph_lightning.modeling.tokens import MorphVocab, extend_tokenizer


@dataclass
class LLMOutput:
    hidden: torch.Tensor  # [B, T, H] last (normed) hidden states
    logits: torch.Tensor | None  # [B, T, vocab.size]; None when a chunked loss never held them whole
    past_key_values: object | None = None
    vectors: torch.Tensor | None = None  # [B, T, code_dim] the next continuous morph token, regressed
    token_ce: torch.Tensor | None = None  # [B, T] cross-entropy against the labels given (0 where ignored)


class MorphLLM(nn.Module):
    def __init__(
        self,
        name_or_path: str | None = "lmsys/vicuna-7b-v1.1",
        config: dict | None = None,
        tokenizer: str | None = None,
        num_morph_tokens: int = 8192,
        code_dim: int = 32,
        num_code_tokens: int = 0,
        continuous: bool = False,
        lora_r: int = 64,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        train_base: bool = False,
        attn_implementation: str | None = None,
        loss_chunk: int | None = None,
    ) -> None:
        """`num_morph_tokens`, `code_dim`: the morph vocabulary and the width of its codebook vectors.
        `num_code_tokens`: VQGAN codes as tokens of the LLM's own (0: none). `continuous`: the morph
        tokens are continuous vectors, each image slot one placeholder id whose vector `morph_out`
        regresses (the 'continuous' ablation). `attn_implementation`: transformers' attention kernels
        (None: its default, SDPA). Packed rows give their sample boundaries by `position_ids` alone:
        SDPA and eager attention turn them into a block-diagonal mask over the row, and
        `flash_attention_2` (the flash-attn package, on a GPU) into variable-length kernels that skip
        the masked blocks. `loss_chunk`: with labels, the head and its cross-entropy run this many
        labelled positions at a time, each chunk's logits recomputed in backward rather than kept, so
        the [tokens, vocab] logits never exist whole (None: all at once, the logits returned)."""
        if loss_chunk is not None and loss_chunk < 1:
            raise ValueError(
                f"llm.loss_chunk must be a positive number of positions or null, got {loss_chunk}"
            )
        super().__init__()
        self.loss_chunk = loss_chunk
        torch_dtype = getattr(torch, dtype) if dtype else None
        if config is not None:  # a fresh random model, e.g. {"model_type": "llama", "hidden_size": 64, ...}
            config = dict(config)
            hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
            self.hf = AutoModelForCausalLM.from_config(
                hf_config, dtype=torch_dtype, attn_implementation=attn_implementation
            )
        elif name_or_path is not None:
            self.hf = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=torch_dtype, attn_implementation=attn_implementation
            )
        else:
            raise ValueError("llm: give `name_or_path` (HF path or hub id) or `config` (a random model)")
        tok_source = tokenizer or (name_or_path if config is None else None)
        self.tokenizer: PreTrainedTokenizerBase = (
            AutoTokenizer.from_pretrained(tok_source) if tok_source else byte_level_tokenizer()
        )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        # adopt: an export's tokenizer already holds the morph tokens
        self.vocab: MorphVocab = extend_tokenizer(
            self.tokenizer, num_morph_tokens, adopt=True, num_codes=num_code_tokens
        )
        rows = self.hf.get_input_embeddings().num_embeddings
        if self.vocab.text_size > rows:
            raise ValueError(
                f"llm: tokenizer has {self.vocab.text_size} text tokens but the model only {rows} rows"
            )

        self.hf.requires_grad_(False)
        if lora_r > 0:
            lora = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=list(lora_target_modules),
            )
            # In place, no wrapper: the LoRA weights sit in this module's own state dict.
            inject_adapter_in_model(lora, self.hf)
            for name, p in self.hf.named_parameters():
                p.requires_grad_("lora_" in name)
        if train_base:  # a random toy LLM has nothing pretrained to adapt: train all of it
            self.hf.requires_grad_(True)
        if gradient_checkpointing:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        hidden = self.hf.config.get_text_config().hidden_size
        self.hidden_size = hidden
        self.new_embed = nn.Embedding(3, hidden)  # <img>, </img>, <Emp>
        self.morph_in = nn.Linear(code_dim, hidden) if num_morph_tokens else None
        self.code_embed = nn.Embedding(num_code_tokens, hidden) if num_code_tokens else None
        self.morph_out = nn.Linear(hidden, code_dim) if continuous else None
        self.new_head = nn.Linear(hidden, self.vocab.num_new, bias=False)
        std = self.hf.get_input_embeddings().weight.float().std().item()
        for table in (self.new_embed, self.code_embed):
            if table is not None:
                nn.init.normal_(table.weight, std=std)
        nn.init.normal_(self.new_head.weight, std=0.02)

    @property
    def stack(self) -> nn.Module:
        """The decoder stack without its head (LoRA already injected into it)."""
        return getattr(self.hf, self.hf.base_model_prefix)

    @property
    def emp_embedding(self) -> torch.Tensor:
        return self.new_embed.weight[2]

    def embed(self, ids: torch.Tensor, morph_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> input embeddings [B, T, H]; `morph_vectors` [B, T, code_dim] at morph positions."""
        v = self.vocab
        text = self.hf.get_input_embeddings()(ids.clamp(0, v.text_size - 1))
        special = self.new_embed((ids - v.text_size).clamp(0, 2)).to(text.dtype)
        out = torch.where((ids >= v.text_size).unsqueeze(-1), special, text)
        if self.code_embed is not None:
            code = self.code_embed((ids - v.code_offset).clamp(min=0)).to(text.dtype)
            out = torch.where(v.is_code(ids).unsqueeze(-1), code, out)
        is_morph = v.is_morph(ids)
        if morph_vectors is not None:
            morph = self.morph_in(morph_vectors.to(self.morph_in.weight.dtype)).to(text.dtype)
            out = torch.where(is_morph.unsqueeze(-1), morph, out)
        elif bool(is_morph.any()):
            raise ValueError("morph ids in the sequence but no morph vectors given")
        return out

    def head(self, hidden: torch.Tensor, text: bool = True) -> torch.Tensor:
        """Logits over the whole vocabulary. `text=False` skips the base model's head (most of the weights
        read per decoding step) and gives its rows -inf: inside an image, where no text id may follow."""
        new = self.new_head(hidden.to(self.new_head.weight.dtype))
        if not text:
            return F.pad(new.to(hidden.dtype), (self.vocab.text_size, 0), value=float("-inf"))
        text_logits = self.hf.get_output_embeddings()(hidden)[..., : self.vocab.text_size]
        return torch.cat([text_logits, new.to(text_logits.dtype)], dim=-1)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        with_logits: bool = True,
    ) -> LLMOutput:
        """The hidden states and logits of `inputs_embeds`; with `labels` [B, T] (IGNORE where none) also
        each position's cross-entropy, and with `loss_chunk` that alone, the logits left out.
        `with_logits=False` leaves them out too: generation runs `head` on the last position only."""
        out = self.stack(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        # Inside forward, so that a sharded LLM has its weights gathered for it.
        vectors = None if self.morph_out is None else self.morph_out(hidden.to(self.morph_out.weight.dtype))
        logits = self.head(hidden) if with_logits and (labels is None or self.loss_chunk is None) else None
        token_ce = None
        if labels is not None:
            token_ce = self._token_ce(hidden, labels) if logits is None else _ce(logits, labels)
        return LLMOutput(hidden, logits, out.past_key_values, vectors, token_ce)

    def _token_ce(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The cross-entropy [B, T] at the labelled positions, `loss_chunk` of them at a time, each chunk's
        logits recomputed in backward (torch.utils.checkpoint) instead of saved for it."""
        at = (labels != IGNORE).flatten().nonzero().squeeze(1)
        h, y = hidden.flatten(0, 1)[at], labels.flatten()[at]
        chunks = [
            checkpoint(
                self._chunk_ce, h[i : i + self.loss_chunk], y[i : i + self.loss_chunk], use_reentrant=False
            )
            for i in range(0, len(at), self.loss_chunk)
        ]
        ce = torch.zeros(labels.numel(), device=hidden.device, dtype=torch.float32)
        if chunks:
            ce = ce.index_put((at,), torch.cat(chunks))
        return ce.view_as(labels)

    def _chunk_ce(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _ce(self.head(hidden), labels)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position in float32, 0 where the label is IGNORE; `labels` any shape."""
    flat = F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return flat.view_as(labels)
