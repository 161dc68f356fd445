"""Starting the encoder from BLIP-2 and SEED weights: tiny random models saved in each source's layout.

The reference is transformers' own `Blip2QFormerModel`: loaded into our Q-former with the paper's
additions switched off (bidirectional queries, no slot attention, no deconfounder), the two give the
same outputs. SEED's tokenizer file is a flat state dict in LAVIS's names (`Qformer.bert.*`) plus
`encode_task_layer.*` and the `quantize.embedding.weight` codebook; the test writes one from the same
transformers Q-former, renamed the way transformers' BLIP-2 conversion script maps LAVIS to its names.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Blip2Config, Blip2Model, Blip2QFormerConfig, Blip2QFormerModel

from morph_lightning.modeling.encoder import MorphEncoder
from morph_lightning.modeling.encoder_weights import load_encoder_weights, save_encoder_weights
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.qformer import DeconfoundedQFormer
from morph_lightning.modeling.quantizer import MorphQuantizer

VISION, DIM, HEADS, DEPTH, FFN, QUERIES, CODES, CODE_DIM = 16, 32, 4, 3, 48, 8, 24, 8
VANILLA = dict(causal=False, slot_attention="none", deconfound=False)


def hf_qformer() -> Blip2QFormerModel:
    torch.manual_seed(3)
    config = Blip2QFormerConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        encoder_hidden_size=VISION,
        cross_attention_frequency=2,
    )
    model = Blip2QFormerModel(config).eval()
    with torch.no_grad():  # random LayerNorms too, so a LayerNorm loaded in the wrong place shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
    return model


def encoder(**qformer_kwargs) -> MorphEncoder:
    torch.manual_seed(0)
    qformer = DeconfoundedQFormer(
        vision_dim=VISION,
        num_queries=QUERIES,
        dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        intermediate_size=FFN,
        dict_size=12,
        dict_dim=6,
        **qformer_kwargs,
    )
    return MorphEncoder(qformer, MorphQuantizer(codebook_size=CODES, dim=CODE_DIM)).eval()


def reference_output(hf: Blip2QFormerModel, enc: MorphEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' Q-former on our query tokens and our ln_vision(tokens) (its own input norm)."""
    qf = enc.qformer
    query = qf.query_tokens.expand(tokens.size(0), -1, -1)
    return hf(query_embeds=query, encoder_hidden_states=qf.ln_vision(tokens)).last_hidden_state


def test_blip2_qformer_dir_loads_and_matches_transformers(tmp_path):
    hf = hf_qformer()
    hf.save_pretrained(tmp_path / "qformer")
    enc = encoder(**VANILLA)
    report = load_encoder_weights(enc, tmp_path / "qformer")
    assert report.source == "blip2_qformer"
    assert len(report.loaded) == len(hf.state_dict()) and not report.unused
    # a bare Q-former carries no query tokens, ln_vision, task layer or codebook: those start fresh
    assert {"qformer.query_tokens", "qformer.ln_vision.weight", "encode_task_layer.0.weight"} <= set(
        report.fresh
    )
    assert "quantizer.embedding.weight" in report.fresh

    tokens = torch.randn(2, 10, VISION, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            enc.qformer(tokens), reference_output(hf, enc, tokens), atol=1e-5, rtol=1e-5
        )
        # the same weights with the paper's additions switched on give other outputs
        morph = encoder(causal=True, slot_attention="replace", deconfound=True)
        fresh = load_encoder_weights(morph, tmp_path / "qformer").fresh
        assert not torch.allclose(morph.qformer(tokens), enc.qformer(tokens), atol=1e-4)
    assert any(".crossattention.deconfounder." in name for name in fresh)  # the paper's additions


def test_whole_blip2_dir_loads_query_tokens_and_vision_norm(tmp_path):
    torch.manual_seed(4)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=VISION,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        qformer_config=dict(
            hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=FFN
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
        ),
        num_query_tokens=QUERIES,
    )
    hf = Blip2Model(config).eval()
    with torch.no_grad():
        hf.vision_model.post_layernorm.weight.normal_(1.0, 0.2)
        hf.query_tokens.normal_()
    hf.save_pretrained(tmp_path / "blip2")
    enc = encoder(**VANILLA)
    report = load_encoder_weights(enc, tmp_path / "blip2")
    assert report.source == "blip2"
    assert "qformer.query_tokens" in report.loaded and "qformer.ln_vision.weight" in report.loaded
    torch.testing.assert_close(enc.qformer.query_tokens, hf.query_tokens)
    torch.testing.assert_close(enc.qformer.ln_vision.weight, hf.vision_model.post_layernorm.weight)
    assert not any(key.startswith("language_model") for key in report.unused)  # the LLM is never read
    tokens = torch.randn(2, 5, VISION)
    with torch.no_grad():
        expected = reference_output(hf.qformer, enc, tokens)
        torch.testing.assert_close(enc.qformer(tokens), expected, atol=1e-5, rtol=1e-5)


def lavis_name(hf_key: str) -> str:
    """transformers' Q-former key -> LAVIS's (the inverse of transformers' BLIP-2 conversion script)."""
    if hf_key.startswith("layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + hf_key.removeprefix("layernorm.")
    return "Qformer.bert." + re.sub(r"(attention|crossattention)\.attention\.", r"\1.self.", hf_key)


def seed_state_dict(hf: Blip2QFormerModel) -> dict[str, torch.Tensor]:
    """A tiny SEED tokenizer checkpoint: its Q-former, task layers, codebook and the parts we do not use."""
    g = torch.Generator().manual_seed(5)
    state = {lavis_name(k): v.clone() for k, v in hf.state_dict().items()}
    state.update(
        {
            "query_tokens": torch.randn(1, QUERIES, DIM, generator=g),
            "ln_vision.weight": 1 + 0.1 * torch.randn(VISION, generator=g),
            "ln_vision.bias": 0.1 * torch.randn(VISION, generator=g),
            "encode_task_layer.0.weight": torch.randn(DIM, DIM, generator=g),
            "encode_task_layer.0.bias": torch.randn(DIM, generator=g),
            "encode_task_layer.2.weight": torch.randn(CODE_DIM, DIM, generator=g),
            "encode_task_layer.2.bias": torch.randn(CODE_DIM, generator=g),
            "quantize.embedding.weight": torch.randn(CODES, CODE_DIM, generator=g),
            "decode_task_layer.0.weight": torch.randn(CODE_DIM, CODE_DIM, generator=g),
            "distill_image_proj.weight": torch.randn(4, 4, generator=g),
            "blocks.0.norm1.weight": torch.ones(DIM),
            "Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
        }
    )
    return state


@pytest.mark.parametrize("wrapped", [False, True])
def test_seed_tokenizer_file_loads_every_encoder_part(tmp_path, wrapped):
    hf = hf_qformer()
    state = seed_state_dict(hf)
    path = tmp_path / "seed_quantizer.pt"
    torch.save({"model": state} if wrapped else state, path)  # SEED's flat dict; LAVIS wraps it
    enc = encoder(**VANILLA)
    report = load_encoder_weights(enc, path)
    assert report.source == "lavis"
    assert not report.fresh  # SEED's tokenizer has every part of the vanilla encoder
    assert set(report.unused) == {
        "decode_task_layer.0.weight",
        "distill_image_proj.weight",
        "blocks.0.norm1.weight",
        "Qformer.bert.embeddings.position_ids",
    }
    torch.testing.assert_close(enc.quantizer.embedding.weight, state["quantize.embedding.weight"])
    torch.testing.assert_close(enc.encode_task_layer[2].weight, state["encode_task_layer.2.weight"])
    torch.testing.assert_close(enc.qformer.ln_vision.bias, state["ln_vision.bias"])
    tokens = torch.randn(2, 10, VISION)
    with torch.no_grad():
        expected = reference_output(hf, enc, tokens)
        torch.testing.assert_close(enc.qformer(tokens), expected, atol=1e-5, rtol=1e-5)
        ids = enc(tokens).ids  # the whole tokenizer path: Q-former -> task layer -> nearest code
        z = enc.encode_task_layer(expected)
        assert torch.equal(ids, torch.cdist(z, state["quantize.embedding.weight"]).argmin(-1))


def test_seed_file_into_the_paper_encoder_lists_what_starts_fresh(tmp_path):
    path = tmp_path / "seed.pt"
    torch.save(seed_state_dict(hf_qformer()), path)
    report = load_encoder_weights(encoder(slot_attention="added", slot_layers=[1]), path)
    assert "qformer.encoder.layer.1.slotattention.attention.query.weight" in report.fresh
    assert "qformer.encoder.layer.0.crossattention.attention.query.weight" in report.loaded
    assert all(".deconfounder." in k or ".slotattention." in k for k in report.fresh)


def test_load_errors_name_the_file_and_key(tmp_path):
    state = seed_state_dict(hf_qformer())
    state["quantize.embedding.weight"] = torch.randn(CODES, CODE_DIM + 1)
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt.*'quantize\.embedding\.weight'.*\(24, 9\).*\(24, 8\)"):
        load_encoder_weights(encoder(**VANILLA), tmp_path / "wide.pt")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_encoder_weights(encoder(), tmp_path / "nothing.pt")
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no key"):
        load_encoder_weights(encoder(), tmp_path / "other.safetensors")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="'clip'"):
        load_encoder_weights(encoder(), tmp_path / "clip")


def test_model_config_encoder_init_loads_at_construction(tmp_path, tiny_cfg):
    model = MorphModel(tiny_cfg)
    qf = model.encoder.qformer
    state = {
        "query_tokens": torch.randn_like(qf.query_tokens),
        "quantize.embedding.weight": torch.randn_like(model.encoder.quantizer.embedding.weight),
    }
    torch.save(state, tmp_path / "seed.pt")
    loaded = MorphModel({**tiny_cfg, "encoder_init": str(tmp_path / "seed.pt")})
    torch.testing.assert_close(loaded.encoder.qformer.query_tokens, state["query_tokens"])
    torch.testing.assert_close(loaded.encoder.quantizer.embedding.weight, state["quantize.embedding.weight"])


def test_saved_encoder_is_seed_layout_and_loads_back_exactly(tmp_path):
    """`save_encoder_weights` writes SEED's names (what a pretrained world encoder ships as); loading the
    file into a fresh encoder reproduces every weight, the paper's additions included."""
    trained = encoder(slot_attention="added", slot_layers=[1])
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    path = save_encoder_weights(trained, tmp_path / "towers" / "encoder.safetensors")
    keys = set(load_file(path))
    assert {"query_tokens", "ln_vision.weight", "Qformer.bert.embeddings.LayerNorm.weight"} <= keys
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in keys
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in keys
    assert "Qformer.bert.encoder.layer.1.slotattention.self.value.weight" in keys
    assert {"encode_task_layer.2.weight", "quantize.embedding.weight"} <= keys
    assert not any("dictionary" in k or "code_usage" in k for k in keys)

    fresh = encoder(slot_attention="added", slot_layers=[1])
    report = load_encoder_weights(fresh, path)
    assert not report.fresh and not report.unused
    for name, p in trained.named_parameters():
        torch.testing.assert_close(fresh.get_parameter(name), p, rtol=0, atol=0, msg=name)
