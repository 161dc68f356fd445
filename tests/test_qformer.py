import pytest
import torch

from morph_lightning.modeling.qformer import CausalSelfAttention, DeconfoundedQFormer, slot_attention_weights

VISION_DIM, DIM, QUERIES, DICT = 16, 32, 8, (20, 6)


def make_qformer(deconfound: bool = True, depth: int = 2) -> DeconfoundedQFormer:
    torch.manual_seed(0)
    return DeconfoundedQFormer(
        vision_dim=VISION_DIM,
        num_queries=QUERIES,
        dim=DIM,
        depth=depth,
        num_heads=4,
        deconfound=deconfound,
        dict_size=DICT[0],
        dict_dim=DICT[1],
    ).eval()


def patches(batch: int = 2, num: int = 10) -> torch.Tensor:
    return torch.randn(batch, num, VISION_DIM, generator=torch.Generator().manual_seed(1))


def test_shapes() -> None:
    for deconfound in (True, False):
        assert make_qformer(deconfound)(patches(3, 10)).shape == (3, QUERIES, DIM)


def test_dim_must_divide_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        DeconfoundedQFormer(vision_dim=4, dim=30, num_heads=4, depth=1)


def test_self_attention_is_causal() -> None:
    # Slot attention's query-axis softmax couples all queries, so causality is a property of the
    # self-attention sublayer alone: test that sublayer on the model's own group tokens.
    qformer = make_qformer(depth=1)
    layer = qformer.layers[0]
    attn: CausalSelfAttention = layer.self_attn
    g = qformer.group_tokens.detach().unsqueeze(0)
    j = 5
    g2 = g.clone()
    g2[:, j] += torch.randn(DIM)
    with torch.no_grad():
        y, y2 = attn(layer.norm_self(g)), attn(layer.norm_self(g2))
    torch.testing.assert_close(y[:, :j], y2[:, :j])
    assert (y[:, j:] - y2[:, j:]).abs().amax(dim=-1).min() > 1e-6  # every later query sees token j


def test_slot_attention_normalisation() -> None:
    q, k = torch.randn(2, 4, QUERIES, 8), torch.randn(2, 4, 10, 8)
    assign, weights = slot_attention_weights(q, k)
    assert assign.shape == weights.shape == (2, 4, QUERIES, 10)
    # each visual token is distributed over the queries ...
    torch.testing.assert_close(assign.sum(dim=-2), torch.ones(2, 4, 10))
    # ... and each query takes a weighted mean over the visual tokens
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 4, QUERIES))
    torch.testing.assert_close(weights, assign / assign.sum(dim=-1, keepdim=True))


def test_slot_attention_module_matches_weights() -> None:
    slot = make_qformer(deconfound=False).layers[0].slot_attn
    x, tokens = torch.randn(2, QUERIES, DIM), torch.randn(2, 10, DIM)
    h, hd = slot.num_heads, DIM // slot.num_heads
    with torch.no_grad():
        q = slot.q(x).view(2, QUERIES, h, hd).transpose(1, 2)
        k, v = (t.view(2, 10, h, hd).transpose(1, 2) for t in slot.kv(tokens).split(DIM, dim=-1))
        _, weights = slot_attention_weights(q, k)
        expected = slot.proj((weights @ v).transpose(1, 2).reshape(2, QUERIES, DIM))
        torch.testing.assert_close(slot(x, tokens), expected)


def test_dictionary_and_prior_change_output() -> None:
    qformer, x = make_qformer(), patches()
    with torch.no_grad():
        base = qformer(x)
        qformer.init_dictionary(torch.randn(*DICT))
        new_dict = qformer(x)
        qformer.init_dictionary(qformer.dictionary.clone(), prior=torch.rand(DICT[0]))
        new_prior = qformer(x)
    assert not torch.allclose(base, new_dict)
    assert not torch.allclose(new_dict, new_prior)
    torch.testing.assert_close(qformer.prior.sum(), torch.tensor(1.0))


def test_deconfounder_is_prior_weighted_attention() -> None:
    # E_d[h_G(d)] = sum_d A_d P(d) h(d) / sum_d A_d P(d), with A the softmax attention over D, per head
    qformer = make_qformer()
    qformer.init_dictionary(torch.randn(*DICT), prior=torch.rand(DICT[0]))
    deconf = qformer.layers[0].deconfounder
    x = torch.randn(2, QUERIES, DIM)
    h, hd = deconf.num_heads, DIM // deconf.num_heads
    with torch.no_grad():
        d = deconf.dict_norm(qformer.dictionary)
        q = deconf.q(x).view(2, QUERIES, h, hd).transpose(1, 2)
        k, v = (t.view(DICT[0], h, hd).transpose(0, 1) for t in (deconf.k(d), deconf.v(d)))
        a = (q @ k.transpose(-2, -1) / hd**0.5).softmax(dim=-1) * qformer.prior
        expected = ((a / a.sum(dim=-1, keepdim=True)) @ v).transpose(1, 2).reshape(2, QUERIES, DIM)
        torch.testing.assert_close(deconf(x, qformer.dictionary, qformer.prior.log()), expected)


def test_dictionary_is_frozen_buffer_and_projections_train() -> None:
    qformer = make_qformer()
    assert "dictionary" in dict(qformer.named_buffers())
    assert all("dictionary" not in name for name, _ in qformer.named_parameters())
    qformer(patches()).sum().backward()
    assert qformer.layers[0].deconfounder.k.weight.grad.abs().sum() > 0
    assert qformer.layers[1].deconfounder.v.weight.grad.abs().sum() > 0


def test_no_deconfound_has_no_dictionary() -> None:
    qformer = make_qformer(deconfound=False)
    assert qformer.dictionary is None and qformer.prior is None
    assert not any("deconfounder" in name for name, _ in qformer.named_parameters())
    with pytest.raises(RuntimeError, match="deconfound=False"):
        qformer.init_dictionary(torch.randn(*DICT))
    # same weights with the deconfounder left out reproduce a deconfound=False model exactly
    torch.manual_seed(0)
    other = make_qformer(deconfound=True)
    other.load_state_dict(qformer.state_dict(), strict=False)
    for layer in other.layers:
        layer.deconfounder = None
    other.deconfound = False
    with torch.no_grad():
        torch.testing.assert_close(other(patches()), qformer(patches()))


def test_init_dictionary_rejects_wrong_shape() -> None:
    qformer = make_qformer()
    with pytest.raises(ValueError, match=r"\(20, 7\).*\(20, 6\)"):
        qformer.init_dictionary(torch.randn(20, 7))
    with pytest.raises(ValueError, match="prior"):
        qformer.init_dictionary(torch.randn(*DICT), prior=torch.ones(19))
