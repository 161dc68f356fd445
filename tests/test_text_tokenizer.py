import pytest

from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer, train_bpe_tokenizer

CORPUS = [
    "a small red circle left of a blue square",
    "move the red circle to the top",
    "is there a cross?",
] * 20


def test_bpe_learns_whole_words_and_still_encodes_any_text():
    tok = train_bpe_tokenizer(CORPUS, vocab_size=320)
    assert len(tok) <= 320
    text = "a small red circle left of a blue square"
    assert len(tok(text).input_ids) <= len(text.split()) < len(byte_level_tokenizer()(text).input_ids)
    unseen = "zebra ünïcode 42"
    assert tok.decode(tok(unseen).input_ids) == unseen
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")


def test_bpe_is_deterministic_and_checks_its_size():
    a, b = train_bpe_tokenizer(CORPUS, 300), train_bpe_tokenizer(CORPUS, 300)
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CORPUS, 100)
