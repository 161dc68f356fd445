"""Tiny random scorer models saved as `from_pretrained` reads them, for the tests of generation metrics."""

from pathlib import Path

from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def save_tiny_clip(folder: Path) -> Path:
    """A random 32 px CLIP and its image processor in `folder`."""
    text = dict(TINY_VISION, hidden_size=16, intermediate_size=32, vocab_size=64)
    clip = CLIPConfig(
        text_config={**text, "max_position_embeddings": 16},
        vision_config={**TINY_VISION, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(clip).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def save_random_inception(path: Path) -> Path:
    """torch-fidelity's FID Inception with random weights (He-initialised convolutions, so that the pool
    features do not vanish), saved as a real weights file is. Its constructor always loads a state dict,
    so the model is built once around an empty one."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # keep the random init
    try:
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)
        )
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        torch.nn.init.kaiming_normal_(
            conv.weight, nonlinearity="relu"
        )  # features keep their scale over depth
    torch.save(model.state_dict(), path)
    return path
