import pytest
import torch

from morph_lightning.modeling.decoder import MorphDecoder
from morph_lightning.modeling.sampling import sample_next

TINY = dict(vocab_size=50, n_codes=16, n_prefix=4, prefix_dim=12, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model() -> MorphDecoder:
    torch.manual_seed(0)
    return MorphDecoder(**TINY).eval()


def batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(b, TINY["n_prefix"], TINY["prefix_dim"], generator=g)
    codes = torch.randint(0, TINY["vocab_size"], (b, TINY["n_codes"]), generator=g)
    return prefix, codes


def test_config_and_block_size(model: MorphDecoder) -> None:
    assert model.config.vocab_size == 50
    assert model.config.block_size == 4 + 16 - 1
    assert model.wpe.num_embeddings == model.config.block_size


def test_logits_shape(model: MorphDecoder) -> None:
    prefix, codes = batch()
    assert model(prefix, codes).shape == (3, 16, 50)


def test_causality(model: MorphDecoder) -> None:
    prefix, codes = batch()
    ref = model(prefix, codes)
    for j in (0, 5, 15):
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 1) % TINY["vocab_size"]
        out = model(prefix, changed)
        # logits[:, i] sees codes[:, :i] only, so positions up to j are unaffected.
        torch.testing.assert_close(out[:, : j + 1], ref[:, : j + 1], rtol=0, atol=0)
        if j + 1 < TINY["n_codes"]:
            assert not torch.allclose(out[:, j + 1 :], ref[:, j + 1 :])


def test_prefix_changes_every_position(model: MorphDecoder) -> None:
    prefix, codes = batch()
    out = model(prefix + 1.0, codes)
    ref = model(prefix, codes)
    assert (out - ref).abs().amax(dim=-1).gt(0).all()


def test_gradient_reaches_prefix(model: MorphDecoder) -> None:
    prefix, codes = batch()
    prefix.requires_grad_(True)
    model.loss(prefix, codes).backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0


def test_loss_at_init_is_near_uniform(model: MorphDecoder) -> None:
    prefix, codes = batch()
    loss = model.loss(prefix, codes)
    assert loss.ndim == 0
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def greedy_without_cache(model: MorphDecoder, prefix: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(prefix.size(0), 0, dtype=torch.long)
    for i in range(model.config.n_codes):
        # The last input code is never read, so a placeholder stands in for the code being predicted.
        logits = model(prefix, torch.cat((out, out.new_zeros(out.size(0), 1)), dim=1))[:, i]
        out = torch.cat((out, logits.argmax(-1, keepdim=True)), dim=1)
    return out


def test_greedy_generate_matches_full_forward(model: MorphDecoder) -> None:
    prefix, _ = batch(4)
    with torch.no_grad():
        expected = greedy_without_cache(model, prefix)
    assert torch.equal(model.generate(prefix, temperature=0.0), expected)


def test_sampled_generate_matches_full_forward(model: MorphDecoder) -> None:
    prefix, _ = batch(4)
    expected = torch.zeros(4, 0, dtype=torch.long)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i in range(model.config.n_codes):
            logits = model(prefix, torch.cat((expected, expected.new_zeros(4, 1)), dim=1))[:, i]
            nxt = sample_next(logits, temperature=1.0, top_k=10, generator=g)
            expected = torch.cat((expected, nxt[:, None]), dim=1)
    got = model.generate(prefix, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, expected)


def test_generate_shape_and_range(model: MorphDecoder) -> None:
    prefix, _ = batch(5)
    codes = model.generate(prefix, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (5, 16) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < TINY["vocab_size"]


def test_top_k_one_equals_greedy(model: MorphDecoder) -> None:
    prefix, _ = batch(4)
    sampled = model.generate(prefix, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(prefix, temperature=0.0))


@pytest.mark.parametrize("b", [1, 3])
def test_static_cache_draws_the_dynamic_cache_codes(model: MorphDecoder, b: int) -> None:
    """The static cache writes buffers of the whole sequence in place and must attend to the filled
    positions only: greedy and sampled with the same seed, it draws what the dynamic cache draws."""
    prefix, _ = batch(b)
    greedy = model.generate(prefix, temperature=0.0)
    assert torch.equal(model.generate(prefix, temperature=0.0, cache="static"), greedy)
    sampled = [
        model.generate(prefix, top_k=10, generator=torch.Generator().manual_seed(7), cache=cache)
        for cache in ("dynamic", "static")
    ]
    assert torch.equal(*sampled)


def test_compile_needs_the_static_cache(model: MorphDecoder) -> None:
    prefix, _ = batch(1)
    for cache in ("dynamic", "none", "sliding"):
        with pytest.raises(ValueError, match="cache must be"):
            model.generate(prefix, cache=cache, compile=cache != "sliding")


def test_rejects_bad_shapes(model: MorphDecoder) -> None:
    prefix, codes = batch()
    with pytest.raises(ValueError):
        model(prefix[:, :-1], codes)
    with pytest.raises(ValueError):
        model(prefix, torch.cat((codes, codes), dim=1))


def test_memorises_fixed_batch() -> None:
    torch.manual_seed(0)
    model = MorphDecoder(**TINY).train()
    prefix, codes = batch(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    initial = model.loss(prefix, codes).item()
    for _ in range(100):
        opt.zero_grad()
        loss = model.loss(prefix, codes)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * initial
