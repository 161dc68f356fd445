import pytest
import torch

from morph_lightning.data_modules.text import TextDataModule
from morph_lightning.modeling.llm import MorphLLM
from morph_lightning.modeling.text_tokenizer import train_bpe_tokenizer
from morph_lightning.stages.lm_pretrain import CausalLMPretrain

CONFIG = dict(
    model_type="llama",
    vocab_size=259,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
)
TEXTS = ["a small red circle on the left", "a large blue square at the top", "there is a green cross"]


def test_pretraining_loss_falls_and_the_export_loads_as_the_mllm_base(tmp_path):
    torch.manual_seed(0)
    stage = CausalLMPretrain(config=CONFIG)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
    first = float(stage.loss(TEXTS))
    for _ in range(30):
        loss = stage.loss(TEXTS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(stage.loss(TEXTS)) < 0.5 * first

    stage.export(tmp_path / "lm")
    llm = MorphLLM(name_or_path=str(tmp_path / "lm"), num_morph_tokens=4, code_dim=4, lora_r=4)
    ids = stage.tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = llm(llm.embed(ids)).logits[..., : llm.vocab.text_size]
        ref = stage.lm.eval()(ids).logits
    torch.testing.assert_close(ours, ref)


def test_a_trained_tokenizer_sets_the_vocabulary_and_text_comes_from_the_corpus(tmp_path):
    train_bpe_tokenizer(TEXTS * 10, vocab_size=300).save_pretrained(tmp_path / "tok")
    config = {k: v for k, v in CONFIG.items() if k != "vocab_size"}
    stage = CausalLMPretrain(config=config, tokenizer=str(tmp_path / "tok"))
    assert stage.lm.config.vocab_size == len(stage.tokenizer) == 300

    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(TEXTS) + "\n\n")
    data = TextDataModule(train_files=str(corpus), val_files=[str(corpus)], batch_size=2)
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert len(batches) == 1 and len(batches[0]["texts"]) == 2  # blank line skipped, last partial dropped
    assert [t for b in data.val_dataloader() for t in b["texts"]] == TEXTS
    assert float(stage.loss(batches[0]["texts"])) > 0

    with pytest.raises(KeyError, match="captions"):
        CausalLMPretrain(config=CONFIG, text_key="captions").texts(batches[0])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TextDataModule(train_files=str(tmp_path / "missing.txt")).setup("fit")
