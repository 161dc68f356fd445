import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_model_config(**overrides) -> dict:
    """The `MorphModel` section of the tiny stage-1 config (the sizes the CLI trains)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tiny" / "stage1.yaml"))["model"]["init_args"][
        "model"
    ]
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_cfg() -> dict:
    return tiny_model_config()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def fit_fixed_batch(stage, batch: dict, steps: int = 40, lr: float = 3e-3) -> list[dict[str, float]]:
    """Train `stage` on one batch with AdamW (no Trainer); each step's losses, before its update."""
    opt = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        losses = stage.losses(batch)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history


@pytest.fixture(scope="session")
def tiny_eval_model():
    """A tiny random MorphModel in eval mode: runs evaluation tasks end to end in seconds."""
    from morph_lightning.modeling.model import MorphModel

    torch.manual_seed(0)
    return MorphModel(tiny_model_config()).eval()
