"""Tokenizers for LLMs that are built here rather than downloaded: a byte-level one for tiny random
models, and a byte-level BPE trained on a corpus (the embedded world's language) with `tokenizers`.

Both are `PreTrainedTokenizerFast`s with <s> </s> <pad>, so `save_pretrained` writes them next to a
model and `AutoTokenizer.from_pretrained` reads them back like any hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 bytes + <s> </s> <pad>, no merges: any text, no training, for tiny random LLMs."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return _wrap(Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with at most `vocab_size` tokens (bytes and the three specials included) learnt
    from `texts`. Any text still encodes (bytes are always in the vocabulary); the corpus' frequent
    words become single tokens, which shortens sequences several-fold against bytes. Deterministic for
    a given corpus and size."""
    if vocab_size < 256 + len(SPECIAL):
        raise ValueError(f"vocab_size {vocab_size} < {256 + len(SPECIAL)} (the bytes and the special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)
