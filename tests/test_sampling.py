import math

import pytest
import torch

from morph_lightning.modeling.sampling import filter_logits, sample_next


def test_top_k_keeps_exactly_k_largest() -> None:
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0))
    out = filter_logits(logits, top_k=7)
    finite = torch.isfinite(out)
    assert (finite.sum(-1) == 7).all()
    # The kept entries are the 7 largest, unchanged.
    top = logits.topk(7, dim=-1).indices
    assert finite.gather(-1, top).all()
    assert torch.equal(out[finite], logits[finite])


def test_top_k_larger_than_vocab_keeps_everything() -> None:
    logits = torch.randn(2, 10)
    assert torch.equal(filter_logits(logits, top_k=100), logits)


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.1, 0.2, 0.3, 0.4]])
    out = filter_logits(probs.log(), top_p=0.75)
    # Row 0: 0.5 + 0.3 = 0.8 >= 0.75 -> {1, 3}; row 1: 0.4 + 0.3 + 0.2 = 0.9 -> {3, 2, 1}.
    expected = torch.tensor([[False, True, False, True], [False, True, True, True]])
    assert torch.equal(torch.isfinite(out), expected)


def test_top_p_always_keeps_top1() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    out = filter_logits(probs.log(), top_p=0.01)
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, False, False]]))


def test_top_k_then_top_p() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # After top-2 the renormalised mass is [4/7, 3/7]; top_p=0.5 then keeps only the first.
    out = filter_logits(probs.log(), top_k=2, top_p=0.5)
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, False, False, False]]))


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(8, 50)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(16, 50)
    a = sample_next(logits, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(123))
    b = sample_next(logits, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(123))
    assert a.dtype == torch.long and a.shape == (16,)
    assert torch.equal(a, b)


def test_all_mass_on_one_token_is_always_sampled() -> None:
    logits = torch.full((4, 50), -math.inf)
    target = torch.tensor([3, 17, 0, 49])
    logits[torch.arange(4), target] = 0.0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(logits, temperature=1.3, top_p=0.9, generator=g), target)


def test_invalid_arguments() -> None:
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError):
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError):
        sample_next(logits, temperature=-1.0)
