import json
import re
import shutil
from pathlib import Path

import lpips as lpips_lib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import yaml
from PIL import Image
from transformers import (
    AutoModel,
    CLIPImageProcessorPil,
    CLIPModel,
    ViTConfig,
    ViTModel,
)

from morph_lightning.data_modules.transforms import ImageTransforms
from morph_lightning.evaluation.image_metrics import ImageScorer
from morph_lightning.evaluation.perceptual import weights_path
from morph_lightning.stages.contrastive_towers import ContrastiveTowers, tower_args_path
from tiny_scorers import TINY_VISION, save_random_inception, save_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
# the world's stage-0 image tower (48 px, 2 blocks of width 64): tiny, and the one the world ships
WORLD_TOWER = yaml.safe_load((ROOT / "configs/world/stage0_clip.yaml").read_text())["model"]["init_args"][
    "vision"
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random CLIP (32 px) and DINO-like ViT (224 px, MagicBrush's crop) saved as from_pretrained
    reads them, and an AlexNet state dict in a temporary torch hub cache for LPIPS (nothing downloaded)."""
    root = tmp_path_factory.mktemp("image_models")
    torch.manual_seed(0)
    save_tiny_clip(root / "clip")
    ViTModel(ViTConfig(**TINY_VISION, image_size=224, patch_size=16)).save_pretrained(root / "dino")
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(root / "hub"))
    weights_path().parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), weights_path())  # random init stands in
    yield root
    torch.hub.set_dir(old_hub)


@pytest.fixture(scope="module")
def scorer(models):
    # one tiny CLIP serves both here; the defaults differ (CLIP ViT-L/14 vs CVS ViT-B/32)
    return ImageScorer(
        clip_model=str(models / "clip"), cvs_model=str(models / "clip"), dino_model=str(models / "dino")
    )


def _random_images(n, size=(40, 40), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


PAIR = ([Image.new("RGB", (40, 40))], [Image.new("RGB", (40, 40), (9, 9, 9))])  # (generated, reference)


def test_l1_l2_by_hand():
    scorer = ImageScorer(clip_model="nobody/no-such-clip")  # models load lazily: none is needed here
    black = Image.new("RGB", (4, 4))
    half = np.zeros((4, 4, 3), np.uint8)
    half[:, :2] = 255
    half = Image.fromarray(half)
    assert scorer.l1([black], [half]) == [pytest.approx(0.5)]
    assert scorer.l2([black], [half]) == [pytest.approx(0.5)]  # 1^2 over half the pixels
    assert scorer.l1([half, black], [half, black]) == [0.0, 0.0]
    assert scorer.l2([half], [half]) == [0.0]
    # a grey-level image is compared as RGB
    assert scorer.l1([Image.new("L", (4, 4), 255)], [Image.new("RGB", (4, 4), (255, 255, 255))]) == [0.0]


def test_l1_resizes_generated_to_reference_size():
    scorer = ImageScorer()
    # a constant image stays constant under any resize filter
    assert scorer.l1([Image.new("RGB", (2, 2), (100, 100, 100))], [Image.new("RGB", (4, 4))]) == [
        pytest.approx(100 / 255)
    ]
    gen, ref = _random_images(1, (2, 2))[0], _random_images(1, (4, 4), seed=1)[0]
    upsampled = np.asarray(gen.resize((4, 4)), np.float64)  # PIL's default filter, as MagicBrush
    expected = np.abs(upsampled - np.asarray(ref, np.float64)).mean() / 255
    assert scorer.l1([gen], [ref]) == [pytest.approx(expected, abs=1e-6)]
    assert scorer.l2([gen], [ref]) == [
        pytest.approx((((upsampled - np.asarray(ref, np.float64)) / 255) ** 2).mean(), abs=1e-6)
    ]


def test_similarities_of_identical_and_different_images(scorer):
    a, b, c = _random_images(3)
    for metric in (scorer.clip_similarity, scorer.cvs, scorer.dino_similarity):
        same = metric([a, b], [a, b])
        assert same == [pytest.approx(100, abs=1e-3)] * 2
        assert all(s < 100 - 1e-3 for s in metric([a, b], [c, a]))


def test_clip_similarity_equals_direct_computation(models):
    scorer = ImageScorer(clip_model=str(models / "clip"), batch_size=2)  # 3 pairs: two batches
    generated, reference = _random_images(3), _random_images(3, (64, 48), seed=1)
    model = CLIPModel.from_pretrained(models / "clip").eval()
    processor = CLIPImageProcessorPil.from_pretrained(models / "clip")
    with torch.no_grad():
        a, b = (
            model.get_image_features(**processor(images, return_tensors="pt")).pooler_output
            for images in (generated, reference)
        )
    expected = (F.cosine_similarity(a, b) * 100).tolist()
    assert scorer.clip_similarity(generated, reference) == pytest.approx(expected, abs=1e-4)


def test_dino_similarity_equals_magicbrush_computation(models, scorer):
    generated, reference = _random_images(2, (64, 48)), _random_images(2, (300, 260), seed=1)
    model = AutoModel.from_pretrained(models / "dino").eval()
    transform = T.Compose(  # MagicBrush's evaluation/image_eval.py
        [
            T.Resize(256, interpolation=3),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    with torch.no_grad():
        a, b = (
            model(pixel_values=torch.stack([transform(i) for i in images])).last_hidden_state[:, 0]
            for images in (generated, reference)
        )
    expected = (F.cosine_similarity(a, b) * 100).tolist()
    assert scorer.dino_similarity(generated, reference) == pytest.approx(expected, abs=1e-4)


def test_processors_take_any_size(scorer):
    small, large = _random_images(1, (64, 48))[0], _random_images(1, (300, 200), seed=2)[0]
    for metric in (scorer.clip_similarity, scorer.dino_similarity, scorer.lpips, scorer.l1):
        (score,) = metric([small], [large])
        assert np.isfinite(score)


def test_lpips(scorer):
    a, b = _random_images(2, (64, 48))
    assert scorer.lpips([a], [a]) == [pytest.approx(0, abs=1e-6)]
    (different,) = scorer.lpips([a], [b])
    assert different > 0
    # GILL's lpips_2dirs.py: lpips.im2tensor, then both resized to 256x256 with antialiasing
    model = scorer._lpips
    x, y = (TF.resize(lpips_lib.im2tensor(np.asarray(i)), [256, 256], antialias=True) for i in (a, b))
    with torch.no_grad():
        assert different == pytest.approx(model(x, y).item(), abs=1e-6)


def test_missing_models_say_what_to_do(tmp_path):
    where = str(tmp_path / "clip-l14")
    message = f"CLIP model '{where}' not found locally: save it with CLIPModel"
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        ImageScorer(clip_model=where).clip_similarity(*PAIR)
    with pytest.raises(FileNotFoundError, match="CLIP model 'nobody/no-such-clip'.*--option cvs_model=DIR"):
        ImageScorer(cvs_model="nobody/no-such-clip").cvs(*PAIR)
    with pytest.raises(FileNotFoundError, match="DINO model .*--option dino_model=DIR"):
        ImageScorer(dino_model=str(tmp_path / "dino")).dino_similarity(*PAIR)
    with pytest.raises(ValueError, match="no DINO model given"):
        ImageScorer().dino_similarity(*PAIR)
    with pytest.raises(ValueError, match="LPIPS is off"):
        ImageScorer(lpips_net=None).lpips(*PAIR)


def test_missing_lpips_weights_name_the_path(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError, match=re.escape(str(weights_path()))):
            ImageScorer().lpips(*PAIR)
        assert not weights_path().exists()  # nothing was downloaded
    finally:
        torch.hub.set_dir(old)


def test_score_pairs(scorer):
    generated, reference = _random_images(3), _random_images(3, seed=1)
    scores = scorer.score_pairs(generated, reference, ("l1", "clip", "lpips"))
    assert list(scores) == ["l1", "clip", "lpips"]
    assert scores["l1"] == pytest.approx(np.mean(scorer.l1(generated, reference)))
    assert scores["clip"] == pytest.approx(np.mean(scorer.clip_similarity(generated, reference)))
    with pytest.raises(ValueError, match="unknown image metrics"):
        scorer.score_pairs(generated, reference, ("fid",))
    with pytest.raises(ValueError, match="3 generated images but 2 reference"):
        scorer.score_pairs(generated, reference[:2], ("l1",))


@pytest.fixture(scope="module")
def exported_tower(tmp_path_factory):
    """A randomly initialised world image tower and the file `export_image_tower` wrote it to."""
    torch.manual_seed(0)
    towers = ContrastiveTowers(vision=WORLD_TOWER).eval()
    path = tmp_path_factory.mktemp("tower") / "vision.safetensors"
    towers.export_image_tower(path)
    return towers.image_tower, path


def test_export_writes_the_sidecar_shipped_with_the_world(exported_tower):
    _, path = exported_tower
    sidecar = tower_args_path(path)
    assert sidecar.name == "vision.json"
    assert json.loads(sidecar.read_text()) == {**WORLD_TOWER, "pretrained": False, "frozen": True}
    assert sidecar.read_text() == (ROOT / "towers/world/vision.json").read_text()


def test_tower_similarities_of_identical_and_different_images(exported_tower):
    _, path = exported_tower
    scorer = ImageScorer(clip_model=str(path), cvs_model=str(path))
    a, b, c = _random_images(3)
    for metric in (scorer.clip_similarity, scorer.cvs):
        assert metric([a, b], [a, b]) == [pytest.approx(100, abs=1e-3)] * 2
        assert all(s < 100 - 1e-3 for s in metric([a, b], [c, a]))


def test_tower_similarity_equals_direct_computation(exported_tower):
    """The scorer reads the exported file and its sidecar back; its features are the trained tower's mean
    token, on images prepared as stage 0 trained it (48 px, CLIP's resize, crop and mean/std)."""
    tower, path = exported_tower
    generated, reference = _random_images(3, (64, 48)), _random_images(3, seed=1)
    prepare = ImageTransforms(48, 48).vision
    with torch.no_grad():
        a, b = (tower(torch.stack([prepare(i) for i in images])).mean(1) for images in (generated, reference))
    expected = (F.cosine_similarity(a, b) * 100).tolist()
    scorer = ImageScorer(clip_model=str(path), batch_size=2)  # 3 pairs: two batches
    assert scorer.clip_similarity(generated, reference) == pytest.approx(expected, abs=1e-4)


def test_tower_without_sidecar_or_with_unknown_arguments_says_what_to_write(exported_tower, tmp_path):
    _, path = exported_tower
    alone = tmp_path / "alone.safetensors"
    shutil.copy(path, alone)
    message = (
        f"image tower {alone} has no {tmp_path / 'alone.json'}: write its VisionBackbone arguments there"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        ImageScorer(clip_model=str(alone)).clip_similarity(*PAIR)
    (tmp_path / "alone.json").write_text(json.dumps({**WORLD_TOWER, "img_size": 48}))
    with pytest.raises(
        ValueError, match=re.escape("alone.json: ['img_size'] are no VisionBackbone arguments")
    ):
        ImageScorer(cvs_model=str(alone)).cvs(*PAIR)
    with pytest.raises(
        FileNotFoundError, match=r"image tower \S*nowhere.safetensors not found \(option cvs_model\)"
    ):
        ImageScorer(cvs_model=str(tmp_path / "nowhere.safetensors")).cvs(*PAIR)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    torch.manual_seed(0)
    return save_random_inception(tmp_path_factory.mktemp("fid") / "inception.pth")


def test_fid_is_zero_for_the_same_set_and_equals_torchmetrics(inception):
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    a = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]
    b = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) // 4) for _ in range(4)]
    b[1] = b[1].resize((56, 48))  # another size: updated apart from the rest
    scorer = ImageScorer(fid_weights=str(inception), batch_size=3)

    assert abs(scorer.fid_over_files(list(zip(a, a, strict=True)), lambda im: im)) < 1e-2
    fid = scorer.fid_over_files(list(zip(a, b, strict=True)), lambda im: im)
    direct = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception))
    as_uint8 = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1).unsqueeze(0) for im in a + b]
    for i, x in enumerate(as_uint8):
        direct.update(x, real=i >= len(a))
    assert fid > 1 and fid == pytest.approx(float(direct.compute()), rel=1e-4)
    assert scorer.fid_over_files([(a[0], b[0])], lambda im: im) is None  # one pair: no covariance


def test_missing_fid_weights_say_where_to_put_them(tmp_path):
    scorer = ImageScorer(fid_weights=str(tmp_path / "none.pth"))
    image = Image.new("RGB", (8, 8))
    with pytest.raises(FileNotFoundError, match=r"none\.pth: copy torch-fidelity's weights-inception"):
        scorer.fid_over_files([(image, image)] * 2, lambda im: im)
