import torch

from morph_lightning.modeling.llm import MorphLLM
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
