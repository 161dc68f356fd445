"""LPIPS (Zhang et al. 2018) between two uint8 images, for the world evaluation's image metrics.

`lpips.LPIPS` ships its linear heads but asks torchvision for the ImageNet weights of its trunk, which
torchvision downloads into the torch hub cache when they are missing. An evaluation must never reach the
network (offline machines, runs that must not hang), so `load_lpips` builds the trunk without weights
and loads the cached file itself, or returns why it could not: the weights are never downloaded here.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lpips
import numpy as np
import torch
from PIL import Image
from torchvision import models
from torchvision.models import WeightsEnum

# lpips trunk name -> (torchvision builder, the ImageNet weights lpips asks for)
TRUNKS: dict[str, tuple[str, WeightsEnum]] = {
    "alex": ("alexnet", models.AlexNet_Weights.IMAGENET1K_V1),
    "vgg": ("vgg16", models.VGG16_Weights.IMAGENET1K_V1),
    "squeeze": ("squeezenet1_1", models.SqueezeNet1_1_Weights.IMAGENET1K_V1),
}
MIN_SIDE = 64  # LPIPS was calibrated on 64 px patches; AlexNet's five stages need 31 px at the least


def weights_path(net: str = "alex") -> Path:
    """Where torchvision caches (and would download) the ImageNet weights of the `net` trunk."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(TRUNKS[net][1].url).name


def _tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, H, W] in [-1, 1], LPIPS's input range."""
    return torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)[None].float() / 127.5 - 1


class LPIPSDistance:
    """LPIPS of a prediction to a target, both uint8 HxWx3; 0 for identical images, higher is farther."""

    def __init__(self, model: lpips.LPIPS) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prediction: np.ndarray, target: np.ndarray) -> float:
        height, width = target.shape[:2]
        if prediction.shape[:2] != (height, width):
            prediction = np.asarray(
                Image.fromarray(prediction).resize((width, height), Image.Resampling.BICUBIC)
            )
        factor = math.ceil(MIN_SIDE / min(height, width))
        if factor > 1:  # nearest keeps hard edges hard, as the images were drawn
            prediction, target = (
                x.repeat(factor, axis=0).repeat(factor, axis=1) for x in (prediction, target)
            )
        return float(self.model(_tensor(prediction), _tensor(target)).item())


def load_lpips(net: str = "alex") -> tuple[LPIPSDistance | None, str | None]:
    """(distance, None) when the trunk's ImageNet weights are in the torch hub cache, else (None, a
    one-line reason saying where the file should be and how to get it). Never downloads; runs on CPU."""
    path = weights_path(net)
    if not path.is_file():
        builder, weights = TRUNKS[net]
        return None, (
            f"LPIPS ({net}) not computed: no ImageNet weights at {path}; run "
            f'`torchvision.models.{builder}(weights="{weights.name}")` once with network access '
            f"(with the same TORCH_HOME) or copy {path.name} there"
        )
    with warnings.catch_warnings():  # lpips 0.1.4 passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # random trunk: nothing is fetched
    state = torch.load(path, map_location="cpu", weights_only=True)
    # lpips splits the trunk's `features` into `slice{k}` modules that keep torchvision's layer indices.
    model.net.load_state_dict({k: state["features." + k.split(".", 1)[1]] for k in model.net.state_dict()})
    return LPIPSDistance(model), None
