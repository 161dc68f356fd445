import torch
from transformers import LlamaConfig, LlamaForCausalLM

from morph_lightning.modeling.llm import MorphLLM
from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer

TINY = dict(
    vocab_size=259,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def test_loads_a_saved_hf_model_and_tokenizer(tmp_path):
    """The real-weight path: a local HF directory (as Vicuna-7B would be) loads through the same code."""
    hf = LlamaForCausalLM(LlamaConfig(**TINY))
    hf.save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    llm = MorphLLM(name_or_path=str(tmp_path), num_morph_tokens=5, code_dim=4, lora_r=4)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        ours = llm(llm.embed(ids)).logits[..., : llm.vocab.text_size]
        ref = hf(ids).logits[..., : llm.vocab.text_size]
    torch.testing.assert_close(ours, ref)  # LoRA starts as the identity (B = 0)
    assert llm.vocab.size == 259 + 3 + 5 == len(llm.tokenizer)


def test_trainable_set_is_lora_and_new_rows():
    llm = MorphLLM(
        name_or_path=None,
        config={"model_type": "llama", **TINY},
        num_morph_tokens=5,
        code_dim=4,
        lora_r=4,
        lora_target_modules=("q_proj", "v_proj"),
    )
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n or n.split(".")[0] in {"new_embed", "morph_in", "new_head"} for n in trainable
    )
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    assert not any("k_proj.lora" in n for n in trainable)
    assert not llm.hf.get_input_embeddings().weight.requires_grad


def test_morph_positions_embed_their_vectors():
    llm = MorphLLM(
        name_or_path=None, config={"model_type": "llama", **TINY}, num_morph_tokens=5, code_dim=4, lora_r=0
    )
    v = llm.vocab
    ids = torch.tensor([[1, v.img_start, v.morph_offset + 2, v.img_end]])
    vec = torch.zeros(1, 4, 4, requires_grad=True)
    emb = llm.embed(ids, vec)
    torch.testing.assert_close(emb[0, 2], llm.morph_in(vec[0, 2]))
    torch.testing.assert_close(emb[0, 1], llm.new_embed.weight[0])
    emb[0, 2].sum().backward()
    assert vec.grad[0, 2].abs().sum() > 0 and vec.grad[0, 1].abs().sum() == 0


def test_head_without_text_rows_leaves_them_out_and_the_new_rows_as_they_are():
    """Generation inside an image skips the base head: text ids -inf, every new id's logit unchanged."""
    llm = MorphLLM(
        name_or_path=None, config={"model_type": "llama", **TINY}, num_morph_tokens=5, code_dim=4, lora_r=0
    )
    hidden = torch.randn(2, 3, TINY["hidden_size"])
    with torch.no_grad():
        full, image = llm.head(hidden), llm.head(hidden, text=False)
    text = llm.vocab.text_size
    assert image.shape == full.shape == (2, 3, llm.vocab.size)
    assert torch.isneginf(image[..., :text]).all()
    torch.testing.assert_close(image[..., text:], full[..., text:])
