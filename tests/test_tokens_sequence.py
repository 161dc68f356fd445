import pytest
import torch

from morph_lightning.modeling.sequence import IGNORE, ImageRef, Sample, build_sequences, marks_word_starts
from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer, train_bpe_tokenizer
from morph_lightning.modeling.tokens import MorphVocab, extend_tokenizer, morph_token


def test_extend_tokenizer_layout():
    tok = byte_level_tokenizer()
    base = len(tok)
    vocab = extend_tokenizer(tok, num_morph=10)
    assert vocab == MorphVocab(text_size=base, num_morph=10)
    assert tok.convert_tokens_to_ids("<img>") == vocab.img_start == base
    assert tok.convert_tokens_to_ids("</img>") == vocab.img_end
    assert tok.convert_tokens_to_ids("<Emp>") == vocab.emp
    assert tok.convert_tokens_to_ids(morph_token(7)) == vocab.morph_offset + 7
    assert vocab.size == len(tok)
    with pytest.raises(ValueError, match="already holds"):
        extend_tokenizer(tok, num_morph=10)


def _setup():
    tok = byte_level_tokenizer()
    vocab = extend_tokenizer(tok, num_morph=10)
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]])
    return tok, vocab, codes


def test_sequence_labels_cover_answer_only():
    tok, vocab, codes = _setup()
    samples = [
        Sample(prompt=[ImageRef(0)], answer=["hi"]),
        Sample(prompt=["ab"], answer=[ImageRef(1, target=True)]),
    ]
    seq = build_sequences(samples, codes, vocab, tok)
    # row 0: <s> <img> m1 m2 m3 </img> h i </s>
    row = seq.input_ids[0].tolist()
    assert row[:6] == [
        tok.bos_token_id,
        vocab.img_start,
        *(vocab.morph_offset + c for c in (1, 2, 3)),
        vocab.img_end,
    ]
    scored = [t for t in seq.labels[0].tolist() if t != IGNORE]
    assert scored == [*tok("hi", add_special_tokens=False).input_ids, tok.eos_token_id]
    # image slots point at (image, k)
    assert seq.image_slot[0, 2:5].tolist() == [0, 1, 2]
    assert seq.image_slot[1][seq.image_slot[1] >= 0].tolist() == [3, 4, 5]
    # row 1: the target image's <img> position, and its morph ids are labelled (for the optional morph CE)
    ((b, p, i),) = seq.targets
    assert (b, i) == (1, 1) and seq.input_ids[1, p] == vocab.img_start
    assert seq.labels[1, p : p + 3].tolist() == [vocab.morph_offset + c for c in (4, 5, 6)]
    assert seq.labels[1, p + 3] == vocab.img_end
    assert seq.attention_mask[0].sum() == 9


def test_left_padding_keeps_targets_and_positions():
    tok, vocab, codes = _setup()
    samples = [Sample(prompt=["a"]), Sample(prompt=["abcdef", ImageRef(0, target=True)])]
    left = build_sequences(samples, codes, vocab, tok, pad_left=True, add_eos=False)
    right = build_sequences(samples, codes, vocab, tok, add_eos=False)
    assert left.attention_mask[0, -1] == 1 and left.attention_mask[0, 0] == 0
    ((b, p, _),) = left.targets
    assert left.input_ids[b, p] == vocab.img_start
    assert left.position_ids[0, -1] == right.attention_mask[0].sum() - 1


def test_a_continuing_piece_keeps_one_word_start_mark():
    tok = train_bpe_tokenizer(["what colour is it? red", "the red circle"] * 10, vocab_size=300)
    assert not marks_word_starts(tok)
    vocab = extend_tokenizer(tok, num_morph=4)
    # byte-level BPE: the leading space is what makes " red" the token it is inside a sentence
    whole = tok("is it? red", add_special_tokens=False).input_ids
    batch = build_sequences([Sample(["is it?"], [" red"])], torch.zeros(0, 2, dtype=torch.long), vocab, tok)
    assert batch.input_ids[0, 1 : 1 + len(whole)].tolist() == whole


def test_sentencepiece_style_pieces_drop_the_extra_space():
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Built like Llama's fast tokenizer: prepend "▁", spaces become "▁", so " red" alone is "▁▁red".
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"])
    core.train_from_iterator(["is it? red", "the red circle", "a red square"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pad_token = tok.eos_token
    assert marks_word_starts(tok)
    assert tok.tokenize(" red") == ["▁", "▁red"]  # what the piece would give with its space kept
    vocab = extend_tokenizer(tok, num_morph=4)
    batch = build_sequences([Sample(["is it?"], [" red"])], torch.zeros(0, 2, dtype=torch.long), vocab, tok)
    expected = (
        tok("is it?", add_special_tokens=False).input_ids + tok("red", add_special_tokens=False).input_ids
    )
    assert batch.input_ids[0, 1 : 1 + len(expected)].tolist() == expected
