import pytest
import torch

from morph_lightning.modeling.qformer import DeconfoundedQFormer, QFormerAttention, slot_attention_weights

VISION_DIM, DIM, QUERIES, DICT = 16, 32, 8, (20, 6)


def make_qformer(deconfound: bool = True, depth: int = 2, **kwargs) -> DeconfoundedQFormer:
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
        **kwargs,
    ).eval()


def patches(batch: int = 2, num: int = 10) -> torch.Tensor:
    return torch.randn(batch, num, VISION_DIM, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("slot_attention", ["replace", "added", "none"])
def test_shapes(slot_attention) -> None:
    for deconfound in (True, False):
        out = make_qformer(deconfound, depth=3, slot_attention=slot_attention)(patches(3, 10))
        assert out.shape == (3, QUERIES, DIM)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        DeconfoundedQFormer(vision_dim=4, dim=30, num_heads=4, depth=1)
    with pytest.raises(ValueError, match="slot_layers.*added"):
        make_qformer(slot_attention="replace", slot_layers=[1])
    with pytest.raises(ValueError, match=r"slot_layers \[5\]"):
        make_qformer(slot_attention="added", slot_layers=[5])


def test_blip2_layout_cross_attention_every_other_layer() -> None:
    qformer = make_qformer(depth=4)
    assert [layer.crossattention is not None for layer in qformer.layers] == [True, False, True, False]
    assert set(qformer.state_dict()) >= {
        "query_tokens",
        "layernorm.weight",
        "encoder.layer.0.attention.attention.query.weight",
        "encoder.layer.0.crossattention.attention.key.weight",
        "encoder.layer.1.output_query.LayerNorm.bias",
    }
    assert qformer.layers[0].crossattention.attention.key.weight.shape == (DIM, VISION_DIM)


def test_slot_attention_modes_place_the_additions() -> None:
    # replace (the paper): BLIP-2's cross-attention layers become deconfounded slot attention
    replace = make_qformer(depth=4, slot_attention="replace")
    for layer in replace.layers:
        assert layer.slotattention is None
        if layer.crossattention is not None:
            assert layer.crossattention.slot and layer.crossattention.deconfounder is not None
    # added (the released code): cross-attention stays, slot attention is added in slot_layers
    added = make_qformer(depth=4, slot_attention="added", slot_layers=[1, 2])
    assert [layer.slotattention is not None for layer in added.layers] == [False, True, True, False]
    assert all(not layer.crossattention.slot for layer in added.layers if layer.crossattention is not None)
    assert added.layers[1].slotattention.slot and added.layers[1].slotattention.deconfounder is not None
    default = make_qformer(depth=4, slot_attention="added")  # the layers without cross-attention
    assert [layer.slotattention is not None for layer in default.layers] == [False, True, False, True]
    # none: BLIP-2 as published, and no deconfounder without slot attention
    none = make_qformer(depth=4, slot_attention="none")
    assert none.dictionary is None and not any("deconfounder" in n for n, _ in none.named_parameters())


def test_self_attention_is_causal() -> None:
    # Without slot attention nothing else mixes the queries, so query i depends on queries <= i only.
    qformer, x = make_qformer(slot_attention="none"), patches()
    query = qformer.query_tokens.detach().clone()
    j = 5
    with torch.no_grad():
        base = qformer(x)
        qformer.query_tokens[:, j] += torch.randn(DIM)
        moved = qformer(x)
        qformer.query_tokens.copy_(query)
    torch.testing.assert_close(base[:, :j], moved[:, :j])
    assert (base[:, j:] - moved[:, j:]).abs().amax(dim=-1).min() > 1e-6  # every later query sees token j
    bidirectional = make_qformer(slot_attention="none", causal=False)
    with torch.no_grad():
        before = bidirectional(x)
        bidirectional.query_tokens[:, j] += torch.randn(DIM)
        assert not torch.allclose(before[:, :j], bidirectional(x)[:, :j])


def test_self_attention_sublayer_is_causal_with_slot_attention() -> None:
    # Slot attention's query-axis softmax couples all queries; the self-attention sublayer stays causal.
    attn = make_qformer(depth=1).layers[0].attention
    x = torch.randn(1, QUERIES, DIM)
    x2 = x.clone()
    x2[:, 5] += torch.randn(DIM)
    with torch.no_grad():
        y, y2 = attn(x), attn(x2)
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_slot_attention_normalisation() -> None:
    q, k = torch.randn(2, 4, QUERIES, 8), torch.randn(2, 4, 10, 8)
    assign, weights = slot_attention_weights(q, k)
    assert assign.shape == weights.shape == (2, 4, QUERIES, 10)
    # each visual token is distributed over the queries ...
    torch.testing.assert_close(assign.sum(dim=-2), torch.ones(2, 4, 10))
    # ... and each query takes a weighted mean over the visual tokens
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 4, QUERIES))
    torch.testing.assert_close(weights, assign / assign.sum(dim=-1, keepdim=True))


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, h, d // h).transpose(1, 2)


def test_slot_attention_sublayer_is_eq7_with_the_eq12_query() -> None:
    qformer = make_qformer()
    qformer.init_dictionary(torch.randn(*DICT), prior=torch.rand(DICT[0]))
    slot: QFormerAttention = qformer.layers[0].crossattention
    x, tokens = torch.randn(2, QUERIES, DIM), torch.randn(2, 10, VISION_DIM)
    h, a = slot.num_heads, slot.attention
    with torch.no_grad():
        log_prior = qformer.prior.log()
        q = a.query(x) + slot.deconfounder(x, qformer.dictionary, log_prior)  # Q = G W_q + E_d[h_G(d)]
        _, weights = slot_attention_weights(_heads(q, h), _heads(a.key(tokens), h))
        ctx = (weights @ _heads(a.value(tokens), h)).transpose(1, 2).reshape(2, QUERIES, DIM)
        expected = slot.output.LayerNorm(slot.output.dense(ctx) + x)
        torch.testing.assert_close(slot(x, tokens, qformer.dictionary, log_prior), expected)


def test_dictionary_and_prior_change_output() -> None:
    qformer, x = make_qformer(), patches()
    with torch.no_grad():  # BERT's std-0.02 start makes every attention near uniform: widen it
        for name, p in qformer.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                p.normal_(std=0.5)
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
    deconf = qformer.layers[0].crossattention.deconfounder
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
    qformer = make_qformer(depth=3)
    assert "dictionary" in dict(qformer.named_buffers())
    assert all("dictionary" not in name for name, _ in qformer.named_parameters())
    qformer(patches()).sum().backward()
    assert qformer.layers[0].crossattention.deconfounder.k.weight.grad.abs().sum() > 0
    assert qformer.layers[2].crossattention.deconfounder.v.weight.grad.abs().sum() > 0


def test_no_deconfound_has_no_dictionary() -> None:
    qformer = make_qformer(deconfound=False)
    assert qformer.dictionary is None and qformer.prior is None
    assert not any("deconfounder" in name for name, _ in qformer.named_parameters())
    with pytest.raises(RuntimeError, match="no deconfounder"):
        qformer.init_dictionary(torch.randn(*DICT))
    # same weights with the deconfounder left out reproduce a deconfound=False model exactly
    other = make_qformer(deconfound=True)
    other.load_state_dict(qformer.state_dict(), strict=False)
    for layer in other.layers:
        if layer.crossattention is not None:
            layer.crossattention.deconfounder = None
    other.deconfound = False
    with torch.no_grad():
        torch.testing.assert_close(other(patches()), qformer(patches()))


def test_init_dictionary_rejects_wrong_shape() -> None:
    qformer = make_qformer()
    with pytest.raises(ValueError, match=r"\(20, 7\).*\(20, 6\)"):
        qformer.init_dictionary(torch.randn(20, 7))
    with pytest.raises(ValueError, match="prior"):
        qformer.init_dictionary(torch.randn(*DICT), prior=torch.ones(19))
