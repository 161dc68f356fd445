import numpy as np
import pytest
import torch
import torchvision

from morph_lightning.evaluation.perceptual import LPIPSDistance, load_lpips, weights_path


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub dir, so nothing cached on this machine (and no download) is used."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    yield tmp_path
    torch.hub.set_dir(old)


def test_missing_weights_give_a_reason_naming_the_path(hub_dir):
    distance, reason = load_lpips()
    expected = hub_dir / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert weights_path() == expected
    assert distance is None and str(expected) in reason and "IMAGENET1K_V1" in reason
    assert not expected.exists()  # nothing was downloaded


def test_distance_with_cached_weights(hub_dir):
    path = weights_path()
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), path)  # random init: stands in for ImageNet's
    distance, reason = load_lpips()
    assert isinstance(distance, LPIPSDistance) and reason is None
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2))
    assert distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert distance(a, b) > 0
    # A prediction at another size is resized to the target's: a 2x nearest upscale of `a` is close to `a`.
    big = a.repeat(2, axis=0).repeat(2, axis=1)
    assert distance(big, a) < distance(b, a)
    assert distance(a[:16, :16], b) > 0
