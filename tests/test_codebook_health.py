import pytest
import torch

from morph_lightning.evaluation.codebook import codebook_health
from morph_lightning.modeling.model import MorphModel


def test_codebook_health_counts_the_codes_images_use(tiny_cfg, monkeypatch):
    model = MorphModel(tiny_cfg).eval()
    k, n = model.encoder.quantizer.codebook_size, model.num_tokens
    pixels = torch.zeros(6, 3, model.vision.image_size, model.vision.image_size)
    pixels[:, 0, 0, 0] = torch.tensor([0.0, 1, 2, 0, 1, 2])  # which code each fake image's tokens take

    class Enc:
        def __init__(self, px):
            self.ids = px[:, 0, 0, 0].long().unsqueeze(1).expand(-1, n)

    monkeypatch.setattr(model, "encode_images", Enc)
    # three codes, equally often, across batches of 4 and 2 images
    assert codebook_health(model, pixels, batch_size=4) == {"codes_used": round(3 / k, 4), "perplexity": 3.0}
    assert codebook_health(model, pixels[:1]) == {"codes_used": round(1 / k, 4), "perplexity": 1.0}
    with pytest.raises(ValueError, match="no images"):
        codebook_health(model, pixels[:0])
