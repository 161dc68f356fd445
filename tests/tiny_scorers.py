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
