"""Flickr30K retrieval (Table 6): LAVIS's recalls and caption cleaning, the test-file readers, the
dual-stream projection trained on the morph encoder's tokens against a frozen text encoder, the
`evaluate flickr30k-retrieval` command, and the world's test split in LAVIS' layout."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import processors
from transformers import (
    AutoModel,
    Blip2Config,
    Blip2TextModelWithProjection,
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from conftest import fit_fixed_batch, tiny_model_config
from morph_lightning.data_modules.sources.templates import TEXT_TO_IMAGE
from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.data_modules.transforms import ImageTransforms, load_image
from morph_lightning.evaluate import main as evaluate_main
from morph_lightning.evaluation.retrieval import (
    pre_caption,
    read_flickr30k_test,
    recall_at_k,
)
from morph_lightning.evaluation.retrieval_eval import load_projection
from morph_lightning.evaluation.world_generation import write_generation_splits
from morph_lightning.modeling.kmeans import kmeans_plus_plus
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.text_tokenizer import byte_level_tokenizer
from morph_lightning.stages.retrieval_projection import RetrievalProjection

FIVE = [list(range(5 * i, 5 * i + 5)) for i in range(3)]
KEYS = {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean"}


# ---- recalls --------------------------------------------------------------------------------------
def test_perfect_similarity_scores_100_everywhere():
    txt2img = [i for i, caps in enumerate(FIVE) for _ in caps]
    sim = torch.tensor([[1.0 if t2i == i else 0.0 for t2i in txt2img] for i in range(3)])
    out = recall_at_k(sim, txt2img, FIVE)
    assert set(out) == KEYS
    assert all(v == 100.0 for v in out.values())


def test_hand_computed_two_images_ten_texts():
    sim = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.8, 0.7, 0.6, 0.05],  # its best caption (t4) comes 5th: rank 4
            [0.3, 0.1, 0.1, 0.1, 0.1, 0.2, 0.95, 0.1, 0.1, 0.1],  # t6 first: rank 0
        ]
    )
    out = recall_at_k(sim, [0] * 5 + [1] * 5, [list(range(5)), list(range(5, 10))])
    assert (out["txt_r1"], out["txt_r5"], out["txt_r10"]) == (50.0, 100.0, 100.0)
    # texts whose image ranks 2nd: t0 (0.1 < 0.3), t5 (0.9 > 0.2), t7, t8: 6 of 10 first
    assert (out["img_r1"], out["img_r5"], out["img_r10"]) == pytest.approx((60.0, 100.0, 100.0))
    assert out["txt_r_mean"] == pytest.approx(250 / 3)
    assert out["img_r_mean"] == pytest.approx(260 / 3)
    assert out["r_mean"] == pytest.approx(85.0)


def test_ties_are_broken_by_index_order():
    out = recall_at_k(torch.zeros(2, 2), [0, 1], [[0], [1]], ks=(1, 2))
    # image 0 finds text 0 first, image 1 finds text 0 before its own; the same for texts
    assert out["txt_r1"] == 50.0 and out["img_r1"] == 50.0
    assert out["txt_r2"] == 100.0 and out["img_r2"] == 100.0
    sim = torch.zeros(1, 12)
    sim[0, :3] = 1.0  # three better texts, then eight tied ahead of the one caption (index 11)
    out = recall_at_k(sim, [0] * 12, [[11]])
    assert out["txt_r10"] == 0.0


def test_similarity_shape_is_checked():
    with pytest.raises(ValueError, match="expected"):
        recall_at_k(torch.zeros(2, 3), [0, 1], [[0], [1]])


# ---- captions and files ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, clean",
    [
        ('A Dog; runs!!  (fast) "home".', "a dog runs fast home"),
        ("Hello.World", "hello world"),
        ("  two   spaces  ", "two spaces"),
        ("keeps, commas? and-dashes/slashes", "keeps, commas? and-dashes/slashes"),
        ("a\tb", "a\tb"),  # LAVIS collapses only runs of two or more whitespace characters
        ("x#y*z~w:v", "x y z w v"),
    ],
)
def test_pre_caption(raw, clean):
    assert pre_caption(raw) == clean


def test_pre_caption_truncates_to_max_words():
    assert pre_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert pre_caption("a b c", max_words=2) == "a b"


def test_read_lavis_layout(tmp_path):
    records = [
        {"image": "flickr30k-images/1.jpg", "caption": [f"one {i}" for i in range(5)]},
        {"image": "flickr30k-images/2.jpg", "caption": [f"two {i}" for i in range(5)]},
    ]
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(records))
    images, captions, txt2img, img2txt = read_flickr30k_test(tmp_path / "flickr30k_test.json")
    assert images == ["flickr30k-images/1.jpg", "flickr30k-images/2.jpg"]
    assert captions[:2] == ["one 0", "one 1"] and captions[5] == "two 0" and len(captions) == 10
    assert txt2img == [0] * 5 + [1] * 5
    assert img2txt == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_read_karpathy_layout_keeps_the_test_split(tmp_path):
    def image(name, split):
        return {"filename": name, "split": split, "sentences": [{"raw": f"{name} {i}"} for i in range(5)]}

    data = {"images": [image("a.jpg", "train"), image("b.jpg", "test"), image("c.jpg", "test")]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    images, captions, txt2img, img2txt = read_flickr30k_test(tmp_path / "dataset_flickr30k.json")
    assert images == ["b.jpg", "c.jpg"]
    assert captions[0] == "b.jpg 0" and captions[-1] == "c.jpg 4"
    assert txt2img == [0] * 5 + [1] * 5 and img2txt[1] == [5, 6, 7, 8, 9]


# ---- the projection -------------------------------------------------------------------------------
def eos_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer, ending every text with </s> (CLIP pools at its end-of-text token)."""
    tok = byte_level_tokenizer()
    core = tok.backend_tokenizer
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.eos_token_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_text_encoder(path) -> str:
    """A random CLIP text model and its tokenizer, saved as a hub checkpoint would be."""
    tok = eos_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    CLIPTextModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """(text encoder directory, a stage checkpoint of a tiny MorphModel, that model's encoder state)."""
    root = tmp_path_factory.mktemp("retrieval")
    torch.manual_seed(0)
    model = MorphModel(tiny_model_config()).eval()
    # A random encoder's latents hardly differ between images, and its quantizer snaps them all to the
    # same codes; a trained one does neither. With equal queries (no offset between token positions),
    # stretch the last layer so the latents of toy images spread about 0, and start the codebook from
    # their k-means: the morph tokens then tell the images apart.
    pixels = toy_batch(64)["vision_pixels"]
    enc = model.encoder
    last = enc.encode_task_layer[-1]
    with torch.no_grad():
        enc.qformer.query_tokens.zero_()
        hidden = enc.encode_task_layer[:-1](enc.qformer(model.vision(pixels)))
        latents = hidden @ last.weight.T
        last.weight.div_(latents.std(0).mean())
        last.bias.copy_(-(hidden @ last.weight.T).mean((0, 1)))
        latents = last(hidden).flatten(0, 1)
        enc.quantizer.embedding.weight.copy_(kmeans_plus_plus(latents, enc.quantizer.codebook_size))
    ckpt = root / "stage.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return tiny_text_encoder(root / "text"), str(ckpt), model.encoder.state_dict()


def projection(towers, **kwargs) -> RetrievalProjection:
    text, ckpt, _ = towers
    return RetrievalProjection(
        model=tiny_model_config(), text_encoder=text, init_from=ckpt, max_text_len=64, **kwargs
    )


def toy_batch(n: int = 16) -> dict:
    return next(iter(ToyDataModule(num_train=n, batch_size=n).train_dataloader()))


def test_encoder_comes_from_the_stage_checkpoint(towers):
    proj = projection(towers)
    for k, v in towers[2].items():
        torch.testing.assert_close(proj.encoder.state_dict()[k], v)


@pytest.mark.parametrize("embed_dim, pooling", [(None, "mean"), (16, "flatten")])
def test_only_projections_and_temperature_train(towers, embed_dim, pooling):
    proj = projection(towers, embed_dim=embed_dim, image_pooling=pooling).train()
    trainable = {n for n, p in proj.named_parameters() if p.requires_grad}
    expected = {"image_proj.weight", "image_proj.bias", "logit_scale"}
    if embed_dim is not None:
        expected |= {"text_proj.weight", "text_proj.bias"}
    assert trainable == expected
    assert not proj.encoder.training and not proj.text_encoder.training
    proj.losses(toy_batch(8))["loss"].backward()
    assert {n for n, p in proj.named_parameters() if p.grad is not None} == expected


def test_embeddings_are_unit_norm_and_the_spaces_agree(towers):
    proj = projection(towers, embed_dim=16).eval()
    batch = toy_batch(8)
    img, txt = proj.encode_images(batch["vision_pixels"]), proj.encode_texts(batch["captions"])
    assert img.shape == (8, 16) and txt.shape == (8, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(8))
    # no projection on the text side: the image is projected into the text encoder's output space
    assert projection(towers).encode_images(batch["vision_pixels"]).shape == (8, 24)


def test_training_on_a_fixed_batch_lowers_the_loss(towers):
    proj = projection(towers, embed_dim=16, image_pooling="flatten").train()
    history = fit_fixed_batch(proj, toy_batch(), steps=15, lr=1e-2)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["i2t_acc"] > history[0]["i2t_acc"]


def test_checkpoint_keeps_the_trainable_weights_and_reloads(towers, tmp_path):
    proj = projection(towers, embed_dim=16)
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(proj, ToyDataModule(num_train=8, batch_size=4))
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in proj.parameters() if p.requires_grad}
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert set(saved) == {
        "image_proj.weight",
        "image_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
        "logit_scale",
    }
    again = RetrievalProjection.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True).eval()
    proj.eval()
    batch = toy_batch(4)
    with torch.no_grad():
        torch.testing.assert_close(
            again.encode_images(batch["vision_pixels"]), proj.encode_images(batch["vision_pixels"])
        )
        torch.testing.assert_close(
            again.encode_texts(batch["captions"]), proj.encode_texts(batch["captions"])
        )


def test_blip2_text_encoder(towers, tmp_path):
    """C.3's text encoder: BLIP-2's Q-former text side with its ITC projection; the [CLS] row of
    `text_embeds` is the text feature, and the image is projected into its space."""
    tok = eos_tokenizer()
    qformer = dict(
        vocab_size=len(tok),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        encoder_hidden_size=16,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        use_qformer_text_input=True,  # the text layers, as in BLIP-2's ITM checkpoints
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = Blip2Config(
        vision_config=vision, qformer_config=qformer, num_query_tokens=4, image_text_hidden_size=12
    )
    blip2 = Blip2TextModelWithProjection(config).eval()
    blip2.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    proj = RetrievalProjection(
        model=tiny_model_config(),
        text_encoder=str(tmp_path),
        init_from=towers[1],
        text_model_class="Blip2TextModelWithProjection",
        text_output="text_embeds",
        max_text_len=32,
    ).eval()
    captions = ["a red circle", "Two blue squares."]
    ids = tok([pre_caption(c) for c in captions], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = blip2(input_ids=ids.input_ids, attention_mask=ids.attention_mask).text_embeds[:, 0]
        torch.testing.assert_close(proj.encode_texts(captions), expected)
        assert proj.encode_images(toy_batch(2)["vision_pixels"]).shape == (2, 12)


# ---- text pooling ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """A tiny LlamaForCausalLM saved in float16 with its tokenizer, as the world's LM is."""
    path = tmp_path_factory.mktemp("lm")
    tok = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).half().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def lm_projection(towers, lm: str, pooling: str) -> RetrievalProjection:
    return RetrievalProjection(
        model=tiny_model_config(),
        text_encoder=lm,
        init_from=towers[1],
        text_model_class="AutoModel",
        text_output="last_hidden_state",
        text_pooling=pooling,
        max_text_len=64,
    ).eval()


def test_mean_pooling_averages_each_captions_own_tokens(towers, causal_lm):
    captions = ["a red circle", "Two blue squares, far apart (left)."]
    proj = lm_projection(towers, causal_lm, "mean")
    assert proj.text_encoder.dtype == torch.float32  # read in float32 from its float16 save
    tok = proj.tokenizer([pre_caption(c) for c in captions], padding=True, return_tensors="pt")
    lengths = tok.attention_mask.sum(1).tolist()
    assert lengths[0] < lengths[1]  # the first caption is padded
    lm = AutoModel.from_pretrained(causal_lm, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = lm(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        by_hand = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
        torch.testing.assert_close(proj.text_features(captions), by_hand)
        assert not torch.allclose(proj.text_features(captions)[0], hidden[0].mean(0))  # padding left out
        first = lm_projection(towers, causal_lm, "first").text_features(captions)
        torch.testing.assert_close(first, hidden[:, 0])


def test_mean_pooling_needs_a_per_token_output(towers):
    with pytest.raises(ValueError, match="per-token text_output"):
        projection(towers, text_pooling="mean")  # CLIP's pooler_output: one vector per text
    with pytest.raises(ValueError, match="'first' or 'mean'"):
        projection(towers, text_pooling="cls")


# ---- the evaluate command -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrieval_ckpt(towers, tmp_path_factory):
    """A RetrievalProjection checkpoint as `fit` writes it (one training step)."""
    root = tmp_path_factory.mktemp("projection")
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(projection(towers, embed_dim=16), ToyDataModule(num_train=4, batch_size=4))
    trainer.save_checkpoint(root / "last.ckpt")
    return str(root / "last.ckpt")


@pytest.fixture
def flickr_dir(tmp_path):
    """LAVIS' `flickr30k_test.json` layout: three images under `flickr30k-images/`, two captions each."""
    records = []
    for c in ("red", "green", "blue"):
        (tmp_path / "flickr30k-images").mkdir(exist_ok=True)
        Image.new("RGB", (40, 48), c).save(tmp_path / "flickr30k-images" / f"{c}.png")
        records.append({"image": f"flickr30k-images/{c}.png", "caption": [f"A {c} image.", f"All {c}!"]})
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(records))
    return tmp_path


def test_cli_scores_a_retrieval_checkpoint_and_keeps_its_similarity(retrieval_ckpt, flickr_dir, tmp_path):
    out = tmp_path / "out"
    args = ["flickr30k-retrieval", "--data", str(flickr_dir), "--out", str(out)]
    run = [*args, "--checkpoint", retrieval_ckpt, "--batch-size", "2"]
    scores = evaluate_main(run)

    # the saved matrix is the model's own cosines, and the scores are LAVIS' recalls of it
    model = RetrievalProjection.load_from_checkpoint(retrieval_ckpt, weights_only=True).eval()
    images, captions, txt2img, img2txt = read_flickr30k_test(flickr_dir / "flickr30k_test.json")
    v = model.vision
    transform = ImageTransforms(v.image_size, v.image_size, v.mean, v.std).vision
    pixels = torch.stack([transform(load_image(flickr_dir / p)) for p in images])
    with torch.no_grad():
        by_hand = model.encode_images(pixels) @ model.encode_texts(captions).T
    sim = torch.from_numpy(np.load(out / "similarity.npy"))
    torch.testing.assert_close(sim, by_hand)
    assert scores == {
        **recall_at_k(sim, txt2img, img2txt),
        "images": 3,
        "texts": 6,
        "annotation": str(flickr_dir / "flickr30k_test.json"),
        "source": scores["source"],
    }
    assert json.loads((out / "scores.json").read_text()) == scores
    table = (out / "table.md").read_text()
    assert "| Model | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | R@m |" in table
    assert "| Morph-Tokens (paper) | 88.8 | 99.7 | 100.0 | 85.2 | 97.1 | 98.7 | 95.0 |" in table
    assert f"| this run | {scores['txt_r1']:.1f} |" in table and "3 images, 6 captions" in table

    # the same run again changes no file; the saved matrix scores the same through --predictions
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(files) == ["scores.json", "similarity.npy", "table.md"]
    evaluate_main(run)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    theirs = ["flickr30k-retrieval", "--data", str(flickr_dir), "--out", str(tmp_path / "theirs")]
    again = evaluate_main([*theirs, "--predictions", str(out / "similarity.npy")])
    assert {k: again[k] for k in KEYS} == {k: scores[k] for k in KEYS}
    # other scores in the same folder: the earlier files are moved aside, never deleted
    np.save(tmp_path / "other.npy", np.eye(3, 6, dtype=np.float32))
    evaluate_main([*args, "--predictions", str(tmp_path / "other.npy")])
    aside = sorted(p.name for p in out.iterdir() if p.name not in files)
    assert len(aside) == 2 and aside[0].startswith("scores.") and aside[1].startswith("table.")
    assert (out / "similarity.npy").read_bytes() == files["similarity.npy"]


def test_cli_reads_karpathys_file_an_image_root_and_a_limit(retrieval_ckpt, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    data = {"images": []}
    for k, (c, split) in enumerate([("red", "test"), ("green", "train"), ("blue", "test"), ("grey", "test")]):
        Image.new("RGB", (40, 48), c).save(images / f"{k}.jpg")
        sentences = [{"raw": f"A {c} picture."}] * (k + 1)
        data["images"].append({"filename": f"{k}.jpg", "split": split, "sentences": sentences})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    options = ["--option", "file=dataset_flickr30k.json", "--option", "image_root=images"]
    args = ["flickr30k-retrieval", "--data", str(tmp_path), "--checkpoint", retrieval_ckpt]
    scores = evaluate_main([*args, "--out", str(tmp_path / "out"), *options, "--limit", "2"])
    assert (scores["images"], scores["texts"]) == (2, 4)  # test images 0 and 2: 1 + 3 captions
    assert np.load(tmp_path / "out" / "similarity.npy").shape == (2, 4)
    with pytest.raises(ValueError, match="unknown options"):
        evaluate_main([*args, "--out", str(tmp_path / "x"), "--option", "images=images"])
    with pytest.raises(FileNotFoundError, match="image_root"):
        evaluate_main([*args, "--out", str(tmp_path / "x"), "--option", "file=dataset_flickr30k.json"])


def test_cli_scores_a_hand_made_similarity_matrix(tmp_path):
    """The 2 images x 10 texts of `test_hand_computed_two_images_ten_texts`, as `.pt` and `.npy` files
    (no image is read): TR@1 50, IR@1 60, R@m 85."""
    records = [{"image": f"{i}.jpg", "caption": [f"image {i} caption {k}" for k in range(5)]} for i in (0, 1)]
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(records))
    sim = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.8, 0.7, 0.6, 0.05],
            [0.3, 0.1, 0.1, 0.1, 0.1, 0.2, 0.95, 0.1, 0.1, 0.1],
        ]
    )
    torch.save(sim, tmp_path / "sim.pt")
    np.save(tmp_path / "sim.npy", sim.numpy())
    for name in ("sim.pt", "sim.npy"):
        args = ["flickr30k-retrieval", "--data", str(tmp_path), "--predictions", str(tmp_path / name)]
        scores = evaluate_main([*args, "--out", str(tmp_path / name.replace(".", "_"))])
        assert (scores["txt_r1"], scores["txt_r5"], scores["img_r1"], scores["img_r5"]) == pytest.approx(
            (50.0, 100.0, 60.0, 100.0)
        )
        assert scores["r_mean"] == pytest.approx(85.0) and (scores["images"], scores["texts"]) == (2, 10)
    table = (tmp_path / "sim_npy" / "table.md").read_text()
    assert "| this run | 50.0 | 100.0 | 100.0 | 60.0 | 100.0 | 100.0 | 85.0 |" in table
    torch.save(sim[:, :9], tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"needs a \[n_images, n_texts\] = \[2, 10\] matrix, got \(2, 9\)"):
        evaluate_main([*args[:3], "--predictions", str(tmp_path / "short.pt"), "--out", str(tmp_path / "s")])


def test_a_stage_checkpoint_is_refused_in_one_line(towers, flickr_dir, tmp_path):
    stage3 = tmp_path / "stage3.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "morph_lightning.stages.Stage3Instruct"}}, stage3)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    expected = [
        (towers[1], "is not a RetrievalProjection checkpoint: train one with"),
        (str(stage3), r"is not a RetrievalProjection checkpoint \(morph_lightning.stages.Stage3Instruct\)"),
        (str(tmp_path / "notes.ckpt"), "cannot read the checkpoint"),
    ]
    for ckpt, message in expected:
        args = ["flickr30k-retrieval", "--data", str(flickr_dir), "--checkpoint", ckpt]
        with pytest.raises(SystemExit, match=message) as err:
            evaluate_main([*args, "--out", str(tmp_path / "out")])
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_from_before_text_pooling_loads_as_first(retrieval_ckpt, tmp_path):
    ckpt = torch.load(retrieval_ckpt, weights_only=True)
    assert ckpt["hyper_parameters"]["text_pooling"] == "first"
    del ckpt["hyper_parameters"]["text_pooling"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert load_projection(tmp_path / "old.ckpt").hparams.text_pooling == "first"


# ---- the world's test split -----------------------------------------------------------------------
def test_world_retrieval_split_is_one_image_per_scene_with_its_captions(tmp_path):
    """Held-out text-to-image and captioning records in LAVIS' layout; records that show the same scene
    (objects listed in any order) share one image and pool their captions; other tasks are left out."""
    a = [{"cell": [0, 0], "colour": "red", "shape": "circle", "size": "small"}]
    a.append({"cell": [1, 1], "colour": "blue", "shape": "cross", "size": "large"})
    b = [{"cell": [2, 2], "colour": "green", "shape": "square", "size": "small"}]
    t2i = TEXT_TO_IMAGE.format(caption="Scene A.")
    records = [
        {"id": "t", "task": "t2i", "input_text": t2i, "output_img": "images/t-out.jpg", "scene_out": a},
        {"id": "q", "task": "vqa", "input_img": ["images/q-in.jpg"], "scene_in": b},
        {
            "id": "c1",
            "task": "caption",
            "input_img": ["images/c1-in.jpg"],
            "output_text": "B.",
            "scene_in": b,
        },
        {
            "id": "c2",
            "task": "caption",
            "input_img": ["images/c2-in.jpg"],
            "output_text": "A.",
            "scene_in": a[::-1],
        },
    ]
    (tmp_path / "world" / "instruct").mkdir(parents=True)
    (tmp_path / "world" / "instruct" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sizes = write_generation_splits(tmp_path / "world", tmp_path / "gen")
    assert (sizes["retrieval images"], sizes["retrieval captions"]) == (2, 3)
    assert json.loads((tmp_path / "gen" / "flickr30k_test.json").read_text()) == [
        {"image": "../world/instruct/images/t-out.jpg", "caption": ["Scene A.", "A."]},
        {"image": "../world/instruct/images/c1-in.jpg", "caption": ["B."]},
    ]
    _, _, txt2img, img2txt = read_flickr30k_test(tmp_path / "gen" / "flickr30k_test.json")
    assert txt2img == [0, 0, 1] and img2txt == [[0, 1], [2]]
