import torch

from morph_lightning.modeling.encoder import EncoderOutput, MorphEncoder
from morph_lightning.modeling.qformer import DeconfoundedQFormer
from morph_lightning.modeling.quantizer import MorphQuantizer


def make_encoder(deconfound: bool = True) -> MorphEncoder:
    torch.manual_seed(0)
    qformer = DeconfoundedQFormer(
        vision_dim=16,
        num_queries=8,
        dim=32,
        depth=2,
        num_heads=4,
        deconfound=deconfound,
        dict_size=20,
        dict_dim=6,
    )
    return MorphEncoder(qformer, MorphQuantizer(codebook_size=16, dim=8))


def test_shapes_and_sizes() -> None:
    for deconfound in (True, False):
        encoder = make_encoder(deconfound)
        assert encoder.num_tokens == 8 and encoder.code_dim == 8
        out = encoder(torch.randn(3, 10, 16))
        assert isinstance(out, EncoderOutput)
        assert out.ids.shape == (3, 8) and out.ids.dtype == torch.long
        assert out.z_q.shape == (3, 8, 8)
        assert out.quant_loss.ndim == out.perplexity.ndim == out.usage.ndim == 0
        torch.testing.assert_close(out.z_q, encoder.quantizer.embed(out.ids))


def test_gradient_reaches_qformer() -> None:
    encoder = make_encoder()
    out = encoder(torch.randn(2, 10, 16))
    (out.z_q**2).sum().backward()
    first = encoder.qformer.layers[0]
    for p in (
        encoder.qformer.query_tokens,
        encoder.qformer.ln_vision.weight,
        first.attention.attention.query.weight,
        first.crossattention.attention.key.weight,
        first.crossattention.deconfounder.q.weight,
        first.intermediate_query.dense.weight,
        encoder.encode_task_layer[0].weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_quant_loss_trains_codebook() -> None:
    encoder = make_encoder()
    encoder(torch.randn(2, 10, 16)).quant_loss.backward()
    assert encoder.quantizer.embedding.weight.grad.abs().sum() > 0
    assert encoder.qformer.query_tokens.grad.abs().sum() > 0
