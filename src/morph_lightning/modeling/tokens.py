"""The one place that owns the id layout of the MLLM's vocabulary.

ids [0, text_size)                   the LLM's own text tokens
text_size + 0, 1, 2                  <img>, </img>, <Emp>
text_size + 3 + k, k < num_morph     morph token k (codebook entry k)
code_offset + k, k < num_codes       VQGAN code k: only in the ablations whose LLM reads or writes the
                                     VQGAN codes X itself (`post_mllm: vqgan`, docs/ablations.md)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

SPECIAL_TOKENS = ("<img>", "</img>", "<Emp>")


def morph_token(k: int) -> str:
    return f"<morph_{k:05d}>"


def code_token(k: int) -> str:
    return f"<code_{k:05d}>"


@dataclass(frozen=True)
class MorphVocab:
    text_size: int
    num_morph: int
    num_codes: int = 0

    @property
    def img_start(self) -> int:
        return self.text_size

    @property
    def img_end(self) -> int:
        return self.text_size + 1

    @property
    def emp(self) -> int:
        return self.text_size + 2

    @property
    def morph_offset(self) -> int:
        return self.text_size + len(SPECIAL_TOKENS)

    @property
    def code_offset(self) -> int:
        return self.morph_offset + self.num_morph

    @property
    def num_new(self) -> int:
        """Rows beyond the text vocabulary: the specials, the morph tokens and the VQGAN codes."""
        return len(SPECIAL_TOKENS) + self.num_morph + self.num_codes

    @property
    def size(self) -> int:
        return self.text_size + self.num_new

    def morph_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.morph_offset

    def is_morph(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.morph_offset) & (ids < self.code_offset)

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.code_offset

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= 0) & (ids < self.text_size)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Morph ids back to codebook indices (non-morph ids clamp to 0; mask them yourself)."""
        return (ids - self.morph_offset).clamp(min=0)


def extend_tokenizer(
    tokenizer: PreTrainedTokenizerBase, num_morph: int, adopt: bool = False, num_codes: int = 0
) -> MorphVocab:
    """Add <img>, </img>, <Emp>, the morph tokens and the VQGAN code tokens so that their ids follow the
    layout above. With `adopt`, a tokenizer that already holds them (one saved by an export) is taken as
    it is, once its layout is checked."""
    img = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[0])
    extended = img not in (None, tokenizer.unk_token_id)
    if extended and not adopt:
        raise ValueError("tokenizer already holds <img>: pass the base LLM's tokenizer, not an extended one")
    vocab = MorphVocab(
        text_size=img if extended else len(tokenizer), num_morph=num_morph, num_codes=num_codes
    )
    new = [
        *SPECIAL_TOKENS,
        *(morph_token(k) for k in range(num_morph)),
        *(code_token(k) for k in range(num_codes)),
    ]
    if not extended:
        tokenizer.add_tokens(new, special_tokens=True)
    got = tokenizer.convert_tokens_to_ids([new[0], new[-1]])
    if got != [vocab.img_start, vocab.size - 1] or len(tokenizer) != vocab.size:
        raise ValueError(
            f"tokenizer ids {got} for <img> and {new[-1]} (size {len(tokenizer)}), expected "
            f"{[vocab.img_start, vocab.size - 1]} (size {vocab.size}) for {num_morph} morph tokens and "
            f"{num_codes} VQGAN code tokens"
        )
    return vocab
