"""Flickr30K retrieval (Table 6): LAVIS's recalls and caption cleaning, the test-file readers, and the
dual-stream projection trained on the morph encoder's tokens against a frozen text encoder."""

import json

import lightning as L
import pytest
import torch
from PIL import Image
from tokenizers import processors
from transformers import (
    Blip2Config,
    Blip2TextModelWithProjection,
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
)

from conftest import fit_fixed_batch, tiny_model_config
from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.evaluation.retrieval import (
    flickr30k_retrieval,
    pre_caption,
    read_flickr30k_test,
    recall_at_k,
)
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


def test_flickr30k_retrieval_end_to_end(towers, tmp_path):
    colours = ["red", "green", "blue"]
    records = []
    for c in colours:
        Image.new("RGB", (40, 48), c).save(tmp_path / f"{c}.png")
        records.append({"image": f"{c}.png", "caption": [f"A {c} image.", f"{c}!", "x", "y", "z"]})
    (tmp_path / "test.json").write_text(json.dumps(records))
    out = flickr30k_retrieval(
        projection(towers).eval(), str(tmp_path / "test.json"), str(tmp_path), batch_size=2
    )
    assert set(out) == KEYS and all(0.0 <= v <= 100.0 for v in out.values())
    assert out["img_r5"] == 100.0  # 3 images: every text's image is among the first 3


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
