"""Export round trips: adapter and merged forms rebuild the same model; peft and transformers read the
LLM parts on their own, new tokens included; a checkpoint's towers are named or copied; missing or
mismatched files are named."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from conftest import tiny_model_config
from morph_lightning.export import export_model, load_exported, main
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import ImageRef, Sample, build_sequences
from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer
from morph_lightning.modeling.tokens import extend_tokenizer, morph_token
from morph_lightning.modeling.vqgan import VQGAN
from morph_lightning.stages.base import MorphStage


def _perturb_lora(model: MorphModel) -> None:
    """LoRA B starts at zero, which would make a lost adapter invisible."""
    with torch.no_grad():
        for name, p in model.llm.hf.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)


@torch.no_grad()
def _outputs(model: MorphModel) -> dict[str, torch.Tensor]:
    """Encoder ids, LLM logits over a sequence with morph tokens, decoder logits, VQGAN codes."""
    g = torch.Generator().manual_seed(1)
    vision_px = torch.randn(2, 3, model.vision.image_size, model.vision.image_size, generator=g)
    vqgan_px = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    enc = model.encode_images(vision_px)
    samples = [
        Sample(prompt=["USER: ", ImageRef(0), " what is it?"], answer=[" a red circle"]),
        Sample(prompt=["USER: draw it"], answer=[ImageRef(1, target=True)]),
    ]
    seq = build_sequences(samples, enc.ids, model.vocab, model.llm.tokenizer)
    assert model.vocab.is_morph(seq.input_ids).sum() == 2 * model.num_tokens
    out = model.run_llm(seq, enc)
    codes = model.vqgan_codes(vqgan_px[1:])
    decoder = model.decoder(model.post_mllm_tokens(out, seq.targets), codes)
    return {"ids": enc.ids, "input_ids": seq.input_ids, "llm": out.logits, "decoder": decoder, "codes": codes}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in ("ids", "input_ids", "codes"):
        assert torch.equal(a[key], b[key]), key
    for key in ("llm", "decoder"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny config: random towers and a random, trained base LLM, so every part is copied in."""
    torch.manual_seed(0)
    model = MorphModel(tiny_model_config()).eval()
    _perturb_lora(model)
    out = export_model(model, tmp_path_factory.mktemp("export") / "tiny", merged=True)
    return model, out


@pytest.mark.parametrize("form", ["adapter", "merged"])
def test_both_forms_rebuild_the_exported_model(exported, form):
    model, out = exported
    loaded = load_exported(out, form=form)
    _assert_same(_outputs(model), _outputs(loaded))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.llm.vocab == model.llm.vocab


TEXT_WITH_IMAGE = f"USER: <img>{morph_token(3)}{morph_token(31)}</img> what is it?<Emp> a red circle"


@torch.no_grad()
def _llm_logits(model: MorphModel, ids: torch.Tensor) -> torch.Tensor:
    """The MorphModel LLM's logits for `ids`, a morph token read as its codebook vector (as in generation)."""
    vectors = model.encoder.quantizer.codebook[model.vocab.codes(ids)]
    return model.llm(model.llm.embed(ids, vectors)).logits


def _text_with_image(tokenizer, model: MorphModel) -> torch.Tensor:
    ids = tokenizer(TEXT_WITH_IMAGE, return_tensors="pt").input_ids
    v = model.vocab
    assert {v.img_start, v.img_end, v.emp, v.morph_offset + 3, v.size - 1} <= set(ids[0].tolist())
    return ids


@torch.no_grad()
def test_the_merged_llm_scores_the_new_tokens_with_transformers(exported):
    """`<img>`, `</img>`, `<Emp>` and morph tokens score as in the MorphModel: the merged LLM holds rows
    for every token of its tokenizer."""
    model, out = exported
    tokenizer = AutoTokenizer.from_pretrained(out / "llm_merged")
    assert len(tokenizer) == model.vocab.size
    assert tokenizer.convert_tokens_to_ids(morph_token(0)) == model.vocab.morph_offset
    merged = AutoModelForCausalLM.from_pretrained(out / "llm_merged")
    assert merged.get_input_embeddings().num_embeddings == merged.config.vocab_size == len(tokenizer)
    assert merged.get_output_embeddings().out_features == len(tokenizer)
    ids = _text_with_image(tokenizer, model)
    torch.testing.assert_close(merged(ids).logits, _llm_logits(model, ids), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_adapter_loads_alone_with_peft_new_tokens_included(exported):
    """The adapter names the export's llm_base/ as its base and holds the new tokens' rows and the
    tokenizer, so `AutoPeftModelForCausalLM` gives the MorphModel's logits."""
    model, out = exported
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out / "llm_base")
    with_adapter = AutoPeftModelForCausalLM.from_pretrained(out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    ids = _text_with_image(tokenizer, model)
    expected = _llm_logits(model, ids)
    torch.testing.assert_close(with_adapter(ids).logits, expected)
    # By hand: the base resized to the tokenizer, as AutoPeftModelForCausalLM does.
    base = AutoModelForCausalLM.from_pretrained(out / "llm_base")
    text_ids = ids[:, :4]
    assert not torch.allclose(base(text_ids).logits, expected[:, :4, : model.vocab.text_size], atol=1e-3)
    base.resize_token_embeddings(len(tokenizer))
    torch.testing.assert_close(PeftModel.from_pretrained(base, out / "adapter")(ids).logits, expected)

    manifest = json.loads((out / "morph_config.json").read_text())
    assert (
        manifest["model"]["llm"]["name_or_path"] == "llm_base" and manifest["model"]["llm"]["config"] is None
    )
    assert manifest["new_tokens"] == {"first_id": 259, "count": 35, "rows_in": ["adapter", "llm_merged"]}


def test_the_adapter_names_its_base_as_the_config_does_or_as_told(tmp_path, monkeypatch):
    """A base LLM saved with `save_pretrained` and named by a relative path: the adapter names it so (peft
    reads it from the working directory, as training did), or as `--base-model` says where it moved."""
    monkeypatch.chdir(tmp_path)
    stage = MorphStage(model=_sources(Path("src")))
    _perturb_lora(stage.model)
    ckpt = {"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams)}
    stage.on_save_checkpoint(ckpt)
    torch.save(ckpt, "last.ckpt")
    model = stage.model.eval()
    named = main(["--checkpoint", "last.ckpt", "--out", "named"])
    moved = main(["--checkpoint", "last.ckpt", "--out", "moved", "--base-model", "elsewhere/llm"])

    def base_name(out: Path) -> str:
        return json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]

    assert base_name(named) == "src/llm" and base_name(moved) == "elsewhere/llm"
    tokenizer = AutoTokenizer.from_pretrained(named / "adapter")
    ids = _text_with_image(tokenizer, model)
    expected = _llm_logits(model, ids)
    with torch.no_grad():
        logits = AutoPeftModelForCausalLM.from_pretrained(named / "adapter")(ids).logits
    torch.testing.assert_close(logits, expected)

    Path("elsewhere").mkdir()
    shutil.move("src/llm", "elsewhere/llm")
    with torch.no_grad():
        logits = AutoPeftModelForCausalLM.from_pretrained(moved / "adapter")(ids).logits
    torch.testing.assert_close(logits, expected)
    assert json.loads((moved / "morph_config.json").read_text())["model"]["llm"]["name_or_path"] == (
        "elsewhere/llm"
    )
    torch.testing.assert_close(_llm_logits(load_exported(moved), ids), expected)


def test_a_tied_head_gets_its_own_rows_in_the_merged_llm(tmp_path):
    """A base whose head is its input embedding: the new tokens' input and output rows differ, so the
    merged LLM unties them; peft's trainable tokens would tie them, so the adapter covers the text
    vocabulary only and the manifest says where the rows are."""
    cfg = tiny_model_config()
    cfg["llm"]["config"]["tie_word_embeddings"] = True
    model = MorphModel(cfg).eval()
    _perturb_lora(model)
    assert model.llm.hf.get_output_embeddings().weight is model.llm.hf.get_input_embeddings().weight
    out = export_model(model, tmp_path / "tied", merged=True)

    tokenizer = AutoTokenizer.from_pretrained(out / "llm_merged")
    ids = _text_with_image(tokenizer, model)
    expected = _llm_logits(model, ids)
    text_ids = ids[:, :4]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "llm_merged")
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
        adapter = AutoPeftModelForCausalLM.from_pretrained(out / "adapter")
        torch.testing.assert_close(adapter(text_ids).logits, expected[:, :4, : model.vocab.text_size])
    assert len(tokenizer) == merged.get_input_embeddings().num_embeddings
    assert not (out / "adapter" / "tokenizer_config.json").exists()  # no rows: no resize to the tokenizer
    assert json.loads((out / "morph_config.json").read_text())["new_tokens"]["rows_in"] == ["llm_merged"]
    _assert_same(_outputs(model), _outputs(load_exported(out, form="merged")))


def _sources(root) -> dict:
    """A tiny model whose LLM, vision tower and VQGAN come from files, as real weights do."""
    cfg = tiny_model_config()
    llm = AutoModelForCausalLM.from_config(
        LlamaConfig(**{k: v for k, v in cfg["llm"]["config"].items() if k != "model_type"})
    )
    llm.save_pretrained(root / "llm")
    byte_level_tokenizer().save_pretrained(root / "llm")
    cfg["llm"].update(name_or_path=str(root / "llm"), config=None, train_base=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPVisionModel(CLIPVisionConfig(**vision, image_size=32, patch_size=8)).save_pretrained(root / "vision")
    cfg["vision"] = {"backend": "transformers", "name": "unused", "checkpoint_path": str(root / "vision")}
    torch.save({"state_dict": VQGAN(**cfg["vqgan"]).state_dict()}, root / "vqgan.ckpt")
    cfg["vqgan_checkpoint"] = str(root / "vqgan.ckpt")
    return cfg


def test_checkpoint_export_names_its_sources_or_copies_them(tmp_path):
    stage = MorphStage(model=_sources(tmp_path / "src"))
    _perturb_lora(stage.model)
    ckpt = {"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams)}
    stage.on_save_checkpoint(ckpt)  # leaves out the frozen towers and base LLM, as training does
    torch.save(ckpt, tmp_path / "last.ckpt")
    expected = _outputs(stage.model.eval())

    named = main(["--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "named")])
    assert sorted(p.name for p in named.iterdir()) == [
        "adapter",
        "morph.safetensors",
        "morph_config.json",
        "tokenizer",
    ]
    config = json.loads((named / "morph_config.json").read_text())["model"]
    assert config["llm"]["name_or_path"] == str(tmp_path / "src" / "llm")
    assert config["vqgan_checkpoint"] == str(tmp_path / "src" / "vqgan.ckpt")
    _assert_same(expected, _outputs(load_exported(named)))
    with pytest.raises(ValueError, match="llm_merged"):
        load_exported(named, form="merged")
    with pytest.raises(ValueError, match="not empty"):
        main(["--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "named")])

    copied = main(
        ["--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "copied"), "--copy-towers"]
    )
    shutil.rmtree(tmp_path / "src")  # self-contained: the sources are no longer needed
    _assert_same(expected, _outputs(load_exported(copied)))


def _damage(path, action: str, key: str | None) -> None:
    if action == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    weights = load_file(path)
    if action == "drop":
        del weights[key]
    else:  # shrink
        weights[key] = weights[key][:1].clone()
    save_file(weights, path)


LORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("entry", "action", "key", "message"),
    [
        ("morph_config.json", "delete", None, r"morph_config\.json: missing"),
        ("morph.safetensors", "delete", None, r"morph\.safetensors: missing"),
        ("tokenizer", "delete", None, r"tokenizer: missing"),
        ("adapter/adapter_model.safetensors", "delete", None, r"adapter_model\.safetensors: missing"),
        (
            "morph.safetensors",
            "drop",
            "decoder.ln_f.weight",
            r"morph\.safetensors: keys.*decoder\.ln_f\.weight",
        ),
        (
            "morph.safetensors",
            "shrink",
            "llm.new_head.weight",
            r"morph\.safetensors: llm\.new_head\.weight has shape",
        ),
        (
            "vqgan.safetensors",
            "drop",
            "quantize.embedding.weight",
            r"vqgan\.safetensors: keys.*quantize\.embedding",
        ),
        ("adapter/adapter_model.safetensors", "drop", LORA_KEY, r"adapter_model\.safetensors: keys.*lora_B"),
    ],
)
def test_missing_or_mismatched_files_are_named(exported, tmp_path, entry, action, key, message):
    broken = shutil.copytree(exported[1], tmp_path / "broken")
    _damage(broken / entry, action, key)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        load_exported(broken)


def test_an_extended_tokenizer_is_adopted_only_with_its_own_layout():
    tokenizer = byte_level_tokenizer()
    vocab = extend_tokenizer(tokenizer, num_morph=6)
    assert extend_tokenizer(tokenizer, num_morph=6, adopt=True) == vocab
    with pytest.raises(ValueError, match="for 5 morph tokens"):
        extend_tokenizer(tokenizer, num_morph=5, adopt=True)


def test_a_trained_base_llm_is_exported_not_its_source(tmp_path):
    """`train_base: true` with `name_or_path` set (the world configs): the export must carry the trained
    base weights; naming the source model instead would silently undo the training."""
    cfg = _sources(tmp_path / "src")
    cfg["llm"]["train_base"] = True
    stage = MorphStage(model=cfg)
    trained = stage.model.llm.hf.model.layers[0].mlp.down_proj.weight
    assert trained.requires_grad
    with torch.no_grad():
        trained.add_(torch.randn_like(trained))  # as training would have moved it
    ckpt = {"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams)}
    stage.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "last.ckpt")
    expected = _outputs(stage.model.eval())

    out = main(["--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "export")])
    assert json.loads((out / "morph_config.json").read_text())["files"]["llm_base"] == "llm_base"
    loaded = load_exported(out)
    reloaded = loaded.llm.hf.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(reloaded, trained)
    _assert_same(expected, _outputs(loaded))
