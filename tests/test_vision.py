"""Tests for the frozen vision tower (tiny random models, no downloads)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from morph_lightning.modeling.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
TINY_CLIP = dict(
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    image_size=32,
    patch_size=8,
)


def _tiny_timm(**kw) -> VisionBackbone:
    return VisionBackbone(
        backend="timm", name="vit_tiny_patch16_224", pretrained=False, model_kwargs=dict(TINY_VIT), **kw
    )


def test_timm_shapes_and_frozen():
    torch.manual_seed(0)
    vb = _tiny_timm()
    assert vb.out_dim == 24 and vb.num_patches == 16 and vb.num_tokens == 16 and vb.image_size == 32
    x = torch.randn(2, 3, 32, 32)
    out = vb(x)
    assert out.shape == (2, 16, 24)
    assert not out.requires_grad
    assert not any(p.requires_grad for p in vb.parameters())
    parent = nn.Sequential(vb, nn.Linear(24, 4))
    parent.train()
    assert parent.training and parent[1].training
    assert not vb.training and not any(m.training for m in vb.modules())
    # the full sequence (CLS kept) matches forward_features
    vb_cls = _tiny_timm(drop_cls=False)
    vb_cls.load_state_dict(vb.state_dict())
    full = vb_cls(x)
    assert full.shape == (2, 17, 24) and vb_cls.num_tokens == 17
    torch.testing.assert_close(full[:, 1:], out)


def test_timm_trainable_and_feature_layer():
    torch.manual_seed(0)
    vb = _tiny_timm(frozen=False)
    vb.train()
    assert vb.training and all(p.requires_grad for p in vb.parameters())
    vb.eval()
    x = torch.randn(2, 3, 32, 32)
    out = vb(x)
    out.sum().backward()
    assert vb.model.patch_embed.proj.weight.grad is not None
    # feature_layer=-2 -> raw output of the penultimate block (hidden_states convention)
    pen = _tiny_timm(feature_layer=-2)
    pen.load_state_dict(vb.state_dict())
    with torch.no_grad():
        ref = vb.model.blocks[0](vb.model.norm_pre(vb.model._pos_embed(vb.model.patch_embed(x))))
    got = pen(x)
    assert got.shape == (2, 16, 24)
    torch.testing.assert_close(got, ref[:, 1:])
    same = _tiny_timm(feature_layer=1, drop_cls=False)
    same.load_state_dict(vb.state_dict())
    torch.testing.assert_close(same(x), ref)
    with pytest.raises(ValueError):
        _tiny_timm(feature_layer=0)
    with pytest.raises(ValueError):
        _tiny_timm(feature_layer=5)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "nested"])
def test_timm_checkpoint_path(tmp_path, fmt):
    torch.manual_seed(0)
    # saved with its 1000-way head: the backbone (num_classes=0) must drop it
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()
    sd = ref.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "vit.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "vit.pt"
        torch.save({"state_dict": sd} if fmt == "nested" else sd, path)
    torch.manual_seed(1)  # a different random init would differ if the file were ignored
    vb = VisionBackbone(
        backend="timm",
        name="vit_tiny_patch16_224",
        pretrained=False,
        checkpoint_path=str(path),
        model_kwargs=dict(TINY_VIT),
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.forward_features(x)[:, ref.num_prefix_tokens :]
    torch.testing.assert_close(vb(x), expected)


def _tiny_clip(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    ref = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    ref.save_pretrained(str(tmp_path))
    return ref


def test_transformers_from_saved_dir(tmp_path):
    ref = _tiny_clip(tmp_path)
    vb = VisionBackbone(backend="transformers", name=str(tmp_path))
    assert vb.out_dim == 24 and vb.num_patches == 16 and vb.image_size == 32
    assert not any(p.requires_grad for p in vb.parameters())
    vb.train()
    assert not vb.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state[:, 1:]
    out = vb(x)
    assert out.shape == (2, 16, 24)
    torch.testing.assert_close(out, expected)
    pen = VisionBackbone(backend="transformers", name=str(tmp_path), feature_layer=-2)
    out_pen = pen(x)
    assert out_pen.shape == (2, 16, 24)
    assert not torch.allclose(out_pen, out)
    with torch.no_grad():
        hs = ref(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out_pen, hs[-2][:, 1:])


def test_transformers_random_from_kwargs():
    vb = VisionBackbone(
        backend="transformers", name="unused", pretrained=False, model_kwargs=dict(TINY_CLIP), drop_cls=False
    )
    assert vb.num_tokens == 17
    assert vb(torch.randn(1, 3, 32, 32)).shape == (1, 17, 24)


def test_unknown_backend():
    with pytest.raises(ValueError, match="bogus"):
        VisionBackbone(backend="bogus", pretrained=False)


def test_normalize():
    vb = _tiny_timm()
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert vb.mean == OPENAI_CLIP_MEAN and vb.std == OPENAI_CLIP_STD
    img = torch.full((2, 3, 50, 70), 0.5)
    out = vb.normalize(img)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, ((0.5 - mean) / std).expand(2, 3, 32, 32))
    single = vb.normalize(torch.rand(3, 32, 32))
    assert single.shape == (3, 32, 32)
    u8 = vb.normalize(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8))
    torch.testing.assert_close(u8, ((1.0 - mean) / std).expand(1, 3, 32, 32))
    assert vb(out).shape == (2, 16, 24)
