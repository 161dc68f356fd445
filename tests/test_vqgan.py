import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from morph_lightning.modeling.vqgan import VQGAN, load_taming_state_dict
from morph_lightning.stages.vqgan_autoencoder import VQGANAutoencoder

# 16 px images, one downsampling: an 8x8 grid of codes, with attention at resolution 8.
TINY = dict(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    resolution=16,
    z_channels=8,
    embed_dim=8,
    n_embed=64,
    norm_groups=8,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: extra intra-op threads only add overhead, which explodes on a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(**TINY).eval()


def images(b: int = 2, seed: int = 0) -> torch.Tensor:
    # Smooth images (upsampled 4x4 noise) are learnable in a few steps, unlike white noise.
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=16, mode="bilinear", align_corners=False)


def fit_quietly(stage: L.LightningModule, loader: DataLoader, steps: int) -> L.Trainer:
    """`steps` training steps on the CPU (cycling the loader), no logs, checkpoints or progress bar."""
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage, train_dataloaders=loader)
    return trainer


def test_shapes(model: VQGAN) -> None:
    x = images(3)
    assert model.codes_per_image == 64
    assert model.codebook.shape == (64, 8)
    codes = model.encode_to_codes(x)
    assert codes.shape == (3, 64) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    assert model.decode_codes(codes).shape == (3, 3, 16, 16)
    recon, codebook_loss, fwd_codes = model(x)
    assert recon.shape == x.shape and codebook_loss.ndim == 0
    assert torch.equal(fwd_codes, codes)
    # decode_codes is the decoder half of forward.
    torch.testing.assert_close(model.decode_codes(codes), recon)
    assert set(model.reconstruction_loss(x)) == {"rec", "l2", "codebook", "loss"}


def test_straight_through_reaches_encoder(model: VQGAN) -> None:
    recon, _, _ = model(images())
    recon.square().mean().backward()
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_taming_checkpoint_round_trip(model: VQGAN, tmp_path) -> None:
    sd = model.state_dict()
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.1.attn.0.proj_out.weight",
        "encoder.mid.attn_1.q.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.1.attn.1.k.bias",
        "decoder.norm_out.weight",
        "quantize.embedding.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in sd, key
    assert "encoder.down.1.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd

    junk = {"loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}
    ckpt = {"state_dict": {**sd, **junk}, "global_step": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = VQGAN.from_taming_checkpoint(tmp_path / "last.ckpt", **TINY).eval()
    codes = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_codes(codes), model.decode_codes(codes), rtol=0, atol=0)

    torch.save(sd, tmp_path / "plain.pt")
    plain = VQGAN.from_taming_checkpoint(tmp_path / "plain.pt", **TINY)
    assert torch.equal(plain.codebook, model.codebook)


def test_load_errors_name_the_key(model: VQGAN, tmp_path) -> None:
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "encoder.mid.attn_1.v.bias"}
    with pytest.raises(ValueError, match=r"ckpt_x.*encoder\.mid\.attn_1\.v\.bias"):
        load_taming_state_dict(VQGAN(**TINY), missing, "ckpt_x")

    extra = {**sd, "model.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"model\.extra\.weight"):
        load_taming_state_dict(VQGAN(**TINY), extra, "ckpt_x")

    wrong = {**sd, "quantize.embedding.weight": torch.zeros(32, 8)}
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight.*\(32, 8\).*\(64, 8\)"):
        load_taming_state_dict(VQGAN(**TINY), wrong, "ckpt_x")

    # Anything beyond tensors and plain containers is refused rather than unpickled.
    torch.save({"state_dict": sd, "junk": torch.nn.Identity()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="pickled.ckpt"):
        VQGAN.from_taming_checkpoint(tmp_path / "pickled.ckpt", **TINY)


def test_paper_scale_layout_on_meta() -> None:
    with torch.device("meta"):
        big = VQGAN()
    assert big.codebook.shape == (16384, 256)
    assert big.codes_per_image == 256
    shapes = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    # Attention only at resolution 16: the last encoder level (two blocks) and decoder.up.4 (three blocks).
    assert shapes["encoder.down.4.attn.0.q.weight"] == (512, 512, 1, 1)
    assert "encoder.down.4.attn.1.q.weight" in shapes and "encoder.down.3.attn.0.q.weight" not in shapes
    assert "decoder.up.4.attn.2.proj_out.weight" in shapes and "decoder.up.3.attn.0.q.weight" not in shapes
    assert "encoder.down.4.downsample.conv.weight" not in shapes
    assert shapes["encoder.down.3.downsample.conv.weight"] == (256, 256, 3, 3)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert shapes["quant_conv.weight"] == (256, 256, 1, 1)


def test_autoencoder_stage_learns() -> None:
    torch.manual_seed(0)
    stage = VQGANAutoencoder(vqgan=TINY)
    x = images(4)
    with torch.no_grad():
        initial = stage.vqgan.reconstruction_loss(x)["rec"].item()

    trainer = fit_quietly(stage, DataLoader([{"vqgan_pixels": x}], batch_size=None), steps=30)

    assert {"train/rec", "train/codebook", "train/loss"} <= set(trainer.callback_metrics)
    with torch.no_grad():
        final = stage.vqgan.reconstruction_loss(x)["rec"].item()
    assert final < 0.8 * initial, (initial, final)


def test_lightning1_checkpoint_with_callback_class_keys_loads(tmp_path, monkeypatch):
    """taming's released last.ckpt was written by Lightning 1.x, which keys "callbacks" by class."""
    import sys
    import types

    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    model = VQGAN(**TINY).eval()
    ckpt = {"state_dict": model.state_dict(), "callbacks": {ModelCheckpoint: {"best_model_score": None}}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)  # the loader must not need Lightning 1.x
    loaded = VQGAN.from_taming_checkpoint(tmp_path / "last.ckpt", **TINY).eval()
    codes = torch.randint(0, TINY["n_embed"], (1, 64))
    assert torch.equal(loaded.decode_codes(codes), model.decode_codes(codes))


def test_trained_vqgan_export_feeds_the_stage_configs(tmp_path):
    """Stage 0's export is what `model.vqgan_checkpoint` reads, exactly as taming's last.ckpt."""
    module = VQGANAutoencoder(vqgan=TINY, export_path=str(tmp_path / "vqgan.ckpt"))
    module.export(tmp_path / "vqgan.ckpt")
    loaded = VQGAN.from_taming_checkpoint(tmp_path / "vqgan.ckpt", **TINY).eval()
    codes = torch.randint(0, TINY["n_embed"], (1, 64))
    assert torch.equal(loaded.decode_codes(codes), module.vqgan.eval().decode_codes(codes))


def test_kmeans_plus_plus_finds_separated_clusters() -> None:
    from morph_lightning.modeling.kmeans import kmeans_plus_plus

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2, generator=g)
    found = kmeans_plus_plus(points, 4, generator=g)
    assert torch.cdist(centres, found).min(1).values.max() < 0.1  # one centre on every cluster
    with pytest.raises(ValueError, match="at least k=8"):
        kmeans_plus_plus(points[:5], 8)


def test_autoencoder_warmup_starts_the_codebook_from_its_latents() -> None:
    """Before `autoencoder_steps` the quantizer is bypassed (codebook loss 0, codebook untouched); at the
    switch the codebook becomes k-means++ centres of the gathered latents, each near some latent."""
    torch.manual_seed(0)
    stage = VQGANAutoencoder(vqgan=TINY, autoencoder_steps=4, kmeans_batches=2)
    initial = stage.vqgan.codebook.detach().clone()
    loader = DataLoader([{"vqgan_pixels": images(4, seed=s)} for s in range(5)], batch_size=None)

    assert fit_quietly(stage, loader, steps=4).callback_metrics["train/codebook"] == 0
    assert torch.equal(stage.vqgan.codebook, initial)
    assert len(stage._kmeans_sample) == 2  # the latents of the last 2 warm-up batches

    torch.manual_seed(0)
    stage = VQGANAutoencoder(vqgan=TINY, autoencoder_steps=4, kmeans_batches=2)
    assert (
        fit_quietly(stage, loader, steps=5).callback_metrics["train/codebook"] > 0
    )  # step 5 quantizes, from the new codebook
    assert not stage._kmeans_sample
    with torch.no_grad():
        latents = torch.cat([stage.vqgan.latents(b["vqgan_pixels"]) for b in loader]).permute(0, 2, 3, 1)
    latents = latents.flatten(0, 2)

    def mean_distance(codebook: torch.Tensor) -> float:
        return torch.cdist(latents, codebook).min(1).values.mean().item()

    assert mean_distance(stage.vqgan.codebook) < 0.5 * mean_distance(initial)


def test_foreground_cells_mark_the_latent_cells_that_hold_an_object() -> None:
    from morph_lightning.stages.vqgan_autoencoder import foreground_cells

    x = torch.full((1, 3, 16, 16), 0.9)
    x[0, :, 9:11, 2:4] = -0.5  # an object in the bottom-left 8x8 cell
    mask = foreground_cells(x, cell=8)
    assert mask.shape == (1, 1, 16, 16)
    assert mask[0, 0, 8:, :8].eq(1).all() and mask.sum() == 64


def test_weighted_loss_counts_the_weighted_pixels_more(model: VQGAN) -> None:
    x = images(2)
    weight = torch.ones(2, 1, 16, 16)
    plain = model.reconstruction_loss(x, pixel_weight=weight)
    weight[:, :, :8] = 5.0
    weighted = model.reconstruction_loss(x, pixel_weight=weight)
    assert weighted["rec"] > plain["rec"] and model.reconstruction_loss(x, quantize=False)["codebook"] == 0


def test_no_resnet_blocks_with_changing_widths_is_refused() -> None:
    with pytest.raises(ValueError, match="num_res_blocks 0 needs ch_mult of all 1s"):
        VQGAN(**TINY | {"num_res_blocks": 0})
