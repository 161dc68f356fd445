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
