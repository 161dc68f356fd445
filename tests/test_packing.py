import pytest
import torch

from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import ImageRef, Sample, build_sequences
from morph_lightning.stages import Stage1AR, Stage2AutoEncode, Stage3Instruct


def _samples() -> list[Sample]:
    return [
        Sample(prompt=[ImageRef(0), " what colour?"], answer=[" red"]),
        Sample(prompt=["draw a big blue square"], answer=[ImageRef(1, target=True)]),
        Sample(answer=["a cat", ImageRef(2)]),
        Sample(prompt=[ImageRef(0), " and", ImageRef(2), " which is bigger?"], answer=[" the first one"]),
        Sample(prompt=["edit", ImageRef(2)], answer=[ImageRef(3, target=True)]),
    ]


@pytest.fixture(params=["sdpa", "eager"])
def model(tiny_cfg, request) -> MorphModel:
    """Each attention kernel reads packed rows' boundaries from `position_ids` (flash_attention_2 needs a
    GPU and the flash-attn package)."""
    cfg = {**tiny_cfg, "llm": {**tiny_cfg["llm"], "attn_implementation": request.param}}
    model = MorphModel(cfg).eval()
    assert model.llm.hf.config._attn_implementation == request.param
    return model


def _build(model: MorphModel, pack_length: int | None):
    codes = torch.randint(0, model.encoder.quantizer.codebook_size, (4, model.num_tokens))
    torch.manual_seed(0)
    return build_sequences(_samples(), codes, model.vocab, model.llm.tokenizer, pack_length=pack_length)


def _segments(plain, packed) -> list[tuple[int, int, int, int]]:
    """(packed row, start, plain row, length) of every sample found whole in a packed row."""
    lengths = plain.attention_mask.sum(1).tolist()
    found = []
    for row in range(packed.input_ids.shape[0]):
        for s in (packed.position_ids[row] == 0).nonzero().flatten().tolist():
            for b, n in enumerate(lengths):
                if torch.equal(packed.input_ids[row, s : s + n], plain.input_ids[b, :n]) and bool(
                    packed.attention_mask[row, s : s + n].all()
                ):
                    found.append((row, s, b, n))
    return found


def test_packed_rows_hold_each_sample_unchanged(model):
    torch.manual_seed(1)
    plain = _build(model, None)
    torch.manual_seed(1)
    packed = _build(model, 64)
    lengths = plain.attention_mask.sum(1).tolist()
    assert packed.packed and packed.input_ids.shape[0] < plain.input_ids.shape[0]
    assert packed.input_ids.shape[1] <= max(64, max(lengths))
    # every sample's tokens, labels and image slots appear once, contiguously, with positions 0..n-1
    segments = _segments(plain, packed)
    assert sorted(b for _, _, b, _ in segments) == list(range(len(lengths)))
    for row, s, b, n in segments:
        assert torch.equal(packed.position_ids[row, s : s + n], torch.arange(n))
        assert torch.equal(packed.labels[row, s : s + n], plain.labels[b, :n])
        assert torch.equal(packed.image_slot[row, s : s + n], plain.image_slot[b, :n])
    assert packed.attention_mask.sum() == plain.attention_mask.sum()
    # targets still point at the <img> that opens each generated image
    assert len(packed.targets) == len(plain.targets) == 2
    for row, pos, _ in packed.targets:
        assert packed.input_ids[row, pos] == model.vocab.img_start
    assert [i for *_, i in packed.targets] == [i for *_, i in plain.targets]


def test_packed_llm_outputs_match_and_nothing_leaks_across_samples(model):
    torch.manual_seed(1)
    plain = _build(model, None)
    torch.manual_seed(1)  # the same morph ids, so segments can be matched to their samples
    packed = _build(model, 64)
    codes_vectors = torch.randn(4 * model.num_tokens, model.encoder.code_dim)

    class Enc:  # just the straight-through vectors run_llm reads
        z_q = codes_vectors.view(4, model.num_tokens, -1)

    with torch.no_grad():
        out_plain = model.run_llm(plain, Enc)
        out_packed = model.run_llm(packed, Enc)
        packed.packed = False  # one causal mask over the whole row: later samples see earlier ones
        out_leaky = model.run_llm(packed, Enc)

    # sample by sample: each packed segment's logits equal its own unpacked row's, position by position
    segments = _segments(plain, packed)
    assert sorted(b for _, _, b, _ in segments) == list(range(plain.input_ids.shape[0]))
    for row, s, b, n in segments:
        got = out_packed.logits[row, s : s + n]
        torch.testing.assert_close(got, out_plain.logits[b, :n], atol=1e-5, rtol=1e-4, msg=f"sample {b}")
    # a sample placed after another in its row sees it under one causal mask over the row
    later = [(row, s, b, n) for row, s, b, n in segments if s > 0]
    assert later
    assert all(
        not torch.allclose(out_leaky.logits[row, s : s + n], out_plain.logits[b, :n], atol=1e-3)
        for row, s, b, n in later
    )


def _batch(instruct: bool, n: int = 6) -> dict:
    return next(iter(ToyDataModule(instruct=instruct, num_train=n, batch_size=n).train_dataloader()))


@pytest.mark.parametrize(
    ("stage_cls", "instruct"), [(Stage1AR, False), (Stage2AutoEncode, False), (Stage3Instruct, True)]
)
def test_packed_and_unpacked_losses_and_grads_agree(tiny_cfg, stage_cls, instruct):
    batch = _batch(instruct)
    results = []
    for pack_length in (None, 256):
        torch.manual_seed(0)
        stage = stage_cls(model=tiny_cfg, pack_length=pack_length).eval()  # eval: no code revival
        torch.manual_seed(1)  # stage 1 draws which side the image goes
        losses = stage.losses(batch)
        losses["loss"].backward()
        grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (plain, plain_grads), (packed, packed_grads) = results
    for key in plain:
        torch.testing.assert_close(packed[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], g, atol=1e-5, rtol=1e-3, msg=name)


def test_packing_is_refused_for_left_padded_prompts(model):
    codes = torch.zeros(4, model.num_tokens, dtype=torch.long)
    with pytest.raises(ValueError, match="packing"):
        build_sequences(_samples(), codes, model.vocab, model.llm.tokenizer, pad_left=True, pack_length=64)
