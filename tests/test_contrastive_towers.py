import lightning as L
import torch

from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.modeling.vision import VisionBackbone
from morph_lightning.stages.contrastive_towers import ContrastiveTowers

VISION = dict(
    backend="timm",
    name="vit_tiny_patch16_224",
    image_size=32,
    model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
)


def test_contrastive_loss_falls_and_pairs_are_found():
    torch.manual_seed(0)
    towers = ContrastiveTowers(vision=VISION)
    dm = ToyDataModule(num_train=16, batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW(towers.parameters(), lr=3e-3)
    first = towers.losses(batch)
    for _ in range(40):
        loss = towers.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = towers.losses(batch)
    assert last["loss"] < 0.6 * first["loss"]  # the toy batch repeats some scenes: not separable to 0
    assert last["i2t_acc"] > first["i2t_acc"]


def test_exported_image_tower_loads_frozen_as_a_vision_backbone(tmp_path):
    torch.manual_seed(0)
    towers = ContrastiveTowers(vision=VISION, export_path=str(tmp_path / "tower.safetensors"))
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(towers, ToyDataModule(num_train=8, batch_size=4))
    frozen = VisionBackbone(**VISION, pretrained=False, checkpoint_path=str(tmp_path / "tower.safetensors"))
    assert not any(p.requires_grad for p in frozen.parameters())
    pixels = torch.randn(2, 3, 32, 32)
    towers.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(pixels), towers.image_tower(pixels))
