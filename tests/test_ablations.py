"""The paper's ablations (Tables 7-8, Appendix C.3) as options of the stage modules: each row's fragment
(configs/ablations/<row>.yaml) over the tiny config builds, trains, and has the row's own sequence and
loss. docs/ablations.md describes the rows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import CONFIGS, fit_fixed_batch, tiny_model_config
from morph_lightning import generation
from morph_lightning.callbacks.image_logger import ImageLogger, eval_mode
from morph_lightning.cli import main
from morph_lightning.data_modules.toy import ToyDataModule
from morph_lightning.evaluation.codebook import codebook_health
from morph_lightning.evaluation.runner import EvalModule, _RequestDataset, image_transforms
from morph_lightning.evaluation.task import Request
from morph_lightning.export import export_model
from morph_lightning.modeling.encoder_weights import load_encoder_weights, save_encoder_weights
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.qformer import Deconfounder, QFormerAttention
from morph_lightning.modeling.sequence import IGNORE, ImageRef, Sample
from morph_lightning.stages import Stage1AR, Stage2AutoEncode, Stage3Instruct
from morph_lightning.stages.conditional_generator import ConditionalGenerator

ROWS = ("wo_deconfound", "abstr_abstr_sd", "abstr_abstr_vq", "continuous", "wo_decoder", "detail_detail")
STAGES = {1: (Stage1AR, False), 2: (Stage2AutoEncode, False), 3: (Stage3Instruct, True)}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fragment(row: str, world: bool = False) -> dict:
    folder = CONFIGS / "world" / "ablations" if world else CONFIGS / "ablations"
    return yaml.safe_load((folder / f"{row}.yaml").read_text())["model"]["init_args"]


def row_stage(row: str, stage: int, **model_overrides):
    """The row's stage at tiny size: the fragment's model options over the tiny model, its stage options."""
    init = fragment(row)
    # abstr-abstr (SD): a random generator of the tiny decoder's size in place of the paper's unCLIP
    own = {
        k: v
        for k, v in init.get("model", {}).items()
        if k not in ("generator_checkpoint", "generator_pipeline")
    }
    model = _merge(tiny_model_config(), {**own, **model_overrides})
    kwargs = {k: v for k, v in init.items() if k != "model"}
    return STAGES[stage][0](model=model, **kwargs)


def _batch(instruct: bool, n: int = 4) -> dict:
    return next(iter(ToyDataModule(instruct=instruct, num_train=n, batch_size=n).train_dataloader()))


def _grad(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# ---- every row: builds, trains, logs its own terms ---------------------------------------------------
TERMS = {  # the terms each row's stage 2 logs beside `loss` and `text_ce`
    "wo_deconfound": {"decoder_ce", "morph_ce", "quant", "perplexity", "code_usage"},
    "abstr_abstr_sd": {"embed_mse", "morph_ce", "quant", "perplexity", "code_usage"},
    "abstr_abstr_vq": {"decoder_ce", "morph_ce", "quant", "perplexity", "code_usage"},
    "continuous": {"decoder_ce", "morph_mse"},
    "wo_decoder": {"code_ce", "morph_ce", "quant", "perplexity", "code_usage"},
    "detail_detail": {"code_ce"},
}
FALLING = {1: "ce", 2: "text_ce", 3: "text_ce"}  # besides `loss`, in every row
IMAGE_TERM = {"continuous": "decoder_ce", "wo_decoder": "code_ce", "detail_detail": "code_ce"}
IMAGE_TERM |= {"abstr_abstr_sd": "embed_mse"}


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("row", ROWS)
def test_every_row_trains_in_every_stage(row, stage):
    history = fit_fixed_batch(row_stage(row, stage), _batch(STAGES[stage][1]), steps=12)
    if stage == 2:
        assert set(history[0]) == {"loss", "text_ce", *TERMS[row]}
    falling = ["loss", FALLING[stage]] + ([IMAGE_TERM.get(row, "decoder_ce")] if stage > 1 else [])
    for term in falling:
        assert history[-1][term] < 0.9 * history[0][term], (term, history[0][term], history[-1][term])


def test_impossible_combinations_stop_in_one_line(tiny_cfg):
    cases = [
        ({"pre_mllm": "vqgan", "post_mllm": "hidden"}, "post_mllm: hidden feeds the decoder morph tokens"),
        ({"pre_mllm": "continuous", "post_mllm": "tied"}, "post_mllm: tied reads morph codebook vectors"),
        ({"pre_mllm": "continuous", "post_mllm": "codes"}, "post_mllm: codes reads morph codebook vectors"),
        ({"pre_mllm": "vqgan", "post_mllm": "vqgan", "encoder_init": "seed.pt"}, "encoder_init: pre_mllm"),
        ({"pre_mllm": "continuous", "post_mllm": "embedding"}, "post_mllm: embedding regresses"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            MorphModel({**tiny_cfg, **overrides})
        assert "\n" not in str(err.value)


def test_continuous_inputs_compose_with_the_llm_writing_x():
    """No paper row, but a possible one: continuous morph tokens in, X written by the LLM, no decoder."""
    stage = Stage2AutoEncode(model=tiny_model_config(pre_mllm="continuous", post_mllm="vqgan"))
    history = fit_fixed_batch(stage, _batch(False), steps=6)
    assert set(history[0]) == {"loss", "text_ce", "code_ce", "morph_mse"}
    assert history[-1]["code_ce"] < history[0]["code_ce"]


# ---- w/o deconfound ------------------------------------------------------------------------------
def test_wo_deconfound_removes_the_deconfounding_path(tiny_cfg):
    """No Eq. 12 term anywhere (no Deconfounder, no dictionary D, no prior), slot attention kept; the
    method's output moves with D and the ablation has no D to move."""
    method = MorphModel(tiny_cfg).eval()
    ablation = row_stage("wo_deconfound", 1).model.eval()
    qf = ablation.encoder.qformer
    assert not any(isinstance(m, Deconfounder) for m in ablation.modules())
    assert qf.dictionary is None and qf.prior is None
    assert not any("deconfounder" in k or "dictionary" in k for k in ablation.state_dict())
    assert any(isinstance(m, QFormerAttention) and m.slot for m in qf.modules())  # slot attention stays
    patches = ablation.vision(_batch(False)["vision_pixels"])
    # From BERT's 0.02-std start the term hardly differs between queries, and a term the same for every
    # query cancels in slot attention's softmax over the queries: widen it so that it shows.
    for m in method.modules():
        if isinstance(m, Deconfounder):
            for linear in (m.q, m.k, m.v):
                torch.nn.init.normal_(linear.weight, std=1.0)
    before = method.encoder.qformer(patches)
    method.encoder.qformer.dictionary.mul_(-1.0)
    assert not torch.allclose(before, method.encoder.qformer(patches))


def test_wo_deconfound_loads_a_deconfounded_encoder_without_its_deconfounder(tiny_cfg, tmp_path):
    """The world's row starts from the stage-0 encoder, which stage 0 trained with a deconfounder: its
    deconfounder weights are left unused, and everything else loads."""
    path = save_encoder_weights(MorphModel(tiny_cfg).encoder, tmp_path / "encoder.safetensors")
    report = load_encoder_weights(row_stage("wo_deconfound", 1).model.encoder, path)
    assert report.unused and all(".deconfounder." in k for k in report.unused)
    assert report.fresh == []


# ---- abstr-abstr (VQ) ------------------------------------------------------------------------------
def test_abstr_abstr_ties_mhat_to_m_and_keeps_the_decoder_loss_out_of_the_llm():
    """M̂ is M: the decoder reads the target image's own morph tokens (the codebook vectors of its ids,
    which is what generation reads for emitted ids), so the decoder's loss trains the decoder and the
    encoder, never the LLM; the LLM learns M from the morph CE, weighted 1 in stage 2."""
    stage = row_stage("abstr_abstr_vq", 2)
    assert stage.hparams.morph_ar_weight == 1.0
    model, batch = stage.model, _batch(False)
    enc = model.encode_images(batch["vision_pixels"])
    samples = [Sample(prompt=[c], answer=[ImageRef(i, target=True)]) for i, c in enumerate(batch["captions"])]
    seq = stage.sequences(samples, enc, batch)
    out = model.run_llm(seq, enc)
    mhat = model.post_mllm_tokens(out, seq.targets, enc)
    codebook = model.encoder.quantizer.codebook
    torch.testing.assert_close(mhat, codebook[enc.ids[[i for _, _, i in seq.targets]]])
    stage.decoder_term(seq, out, batch, enc).backward()
    assert _grad(model.decoder) > 0 and _grad(model.encoder.encode_task_layer) > 0
    assert _grad(model.llm) == 0


def test_abstr_abstr_morph_ce_teaches_the_llm_to_emit_m():
    quantizer = {**tiny_model_config()["quantizer"], "dead_code_threshold": 0.0}  # M stays put
    history = fit_fixed_batch(row_stage("abstr_abstr_vq", 2, quantizer=quantizer), _batch(False), steps=12)
    assert history[0]["morph_ce"] > 0 and history[-1]["morph_ce"] < 0.7 * history[0]["morph_ce"]


def test_abstr_abstr_sd_regresses_the_towers_embedding_for_a_frozen_generator(monkeypatch):
    """M̂ (the states at the target's morph positions) becomes one condition vector, trained by MSE to
    the frozen image tower's embedding of the target image (taken from the tower's one pass over the
    batch). The generator is frozen, gets no gradient and stays out of checkpoints; the condition head
    and the LLM learn."""
    stage = row_stage("abstr_abstr_sd", 2).eval()  # eval: the same forward twice
    model, batch = stage.model, _batch(False)
    assert model.decoder.config.n_prefix == 1 and model.decoder.config.prefix_dim == model.vision.out_dim
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert {f"decoder.{n}" for n, _ in model.decoder.named_parameters()} <= stage._frozen_keys()
    passes, forward = [], model.vision.forward
    monkeypatch.setattr(model.vision, "forward", lambda pixels: passes.append(len(pixels)) or forward(pixels))
    losses = stage.losses(batch)
    assert passes == [len(batch["vision_pixels"])]  # the targets' embeddings come from the encoder's pass
    monkeypatch.undo()
    # the same M̂ from the <Y, M> rows alone (each sample attends to itself only, packed or not)
    samples = [Sample(prompt=[c], answer=[ImageRef(i, target=True)]) for i, c in enumerate(batch["captions"])]
    enc = stage.encode(batch)
    seq = stage.sequences(samples, enc, batch)
    with torch.no_grad():
        mhat = model.post_mllm_tokens(model.run_llm(seq, enc), seq.targets)
        expected = F.mse_loss(
            model.decoder_input(mhat).squeeze(1), model.vision.embed(batch["vision_pixels"])
        )
    torch.testing.assert_close(losses["embed_mse"], expected, rtol=1e-4, atol=1e-6)
    losses["loss"].backward()
    assert _grad(model.condition_head) > 0 and _grad(model.llm) > 0
    assert all(p.grad is None for p in model.decoder.parameters())


def test_the_conditional_generator_trains_exports_and_loads_into_the_row(tmp_path):
    """Stage 0 of abstr-abstr (SD) learns X from the embedding and exports the weights that the row's
    model loads, frozen; weights of another size stop in one line."""
    cfg = tiny_model_config()
    path = tmp_path / "generator.safetensors"
    gen = ConditionalGenerator(cfg["vision"], cfg["vqgan"], cfg["decoder"], export_path=str(path))
    batch = _batch(False)
    history = fit_fixed_batch(gen, batch, steps=15)
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    gen.trainer = type("T", (), {"is_global_zero": True})()
    gen.on_train_end()
    model = MorphModel({**cfg, "post_mllm": "embedding", "generator_checkpoint": str(path)})
    for name, weight in gen.generator.state_dict().items():
        torch.testing.assert_close(model.decoder.state_dict()[name], weight, msg=name)
    with torch.no_grad():  # a later, different export moves the earlier one aside
        gen.generator.lm_head.weight.add_(1.0)
    gen.on_train_end()
    assert len(list(tmp_path.glob("generator*.safetensors"))) == 2
    wider = {**cfg["decoder"], "n_embd": 2 * cfg["decoder"]["n_embd"]}
    with pytest.raises(ValueError, match="does not fit the decoder section") as err:
        MorphModel({**cfg, "decoder": wider, "post_mllm": "embedding", "generator_checkpoint": str(path)})
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="none.safetensors not found"):
        MorphModel(
            {**cfg, "post_mllm": "embedding", "generator_checkpoint": str(tmp_path / "none.safetensors")}
        )


def test_abstr_abstr_generates_from_the_ids_the_llm_emits(monkeypatch):
    """At inference M̂ is the codebook vectors of the morph ids the LLM emitted (padded with <Emp>'s
    zeros): generation's `codes` path, as it is."""
    model = row_stage("abstr_abstr_vq", 3).model.eval()
    rows, prefixes = [], []
    render, draw = generation._render, model.decoder.generate
    monkeypatch.setattr(generation, "_render", lambda m, ids: rows.append(list(ids)) or render(m, ids))
    monkeypatch.setattr(
        model.decoder, "generate", lambda prefix, **kw: prefixes.append(prefix) or draw(prefix, **kw)
    )
    greedy = {"temperature": 0.0, "image_temperature": 0.0, "start_image": True}
    out = generation.generate(
        model, [Sample(prompt=["a red"])] * 2, max_new_tokens=model.num_tokens + 2, **greedy
    )
    assert out.images == [[0], [1]]
    v, codebook = model.vocab, model.encoder.quantizer.codebook
    for ids, prefix in zip(rows, prefixes[0], strict=True):
        morph = [t - v.morph_offset for t in ids if v.morph_offset <= t < v.code_offset]
        torch.testing.assert_close(prefix, model.complete_mhat(codebook[morph]))


# ---- continuous ----------------------------------------------------------------------------------
def test_continuous_has_no_quantizer_and_regresses_the_next_token_with_mse():
    """The MLP's outputs go to the LLM as they are, one placeholder id per slot; stage 1's loss is the
    CE on text plus the MSE of the vector regressed at each position that precedes an image token."""
    stage = row_stage("continuous", 1)
    model, batch = stage.model, _batch(False)
    assert model.encoder.quantizer is None
    assert not any(k.startswith("encoder.quantizer") for k in model.state_dict())
    assert model.vocab.num_morph == 1
    enc = model.encode_images(batch["vision_pixels"])
    z = model.encoder.encode_task_layer(model.encoder.qformer(model.vision(batch["vision_pixels"])))
    torch.testing.assert_close(enc.z_q, z)
    assert enc.quant_loss is None and not enc.ids.any()

    torch.manual_seed(0)
    losses = stage.losses(batch)
    assert "morph_ce" not in losses and "quant" not in losses
    torch.testing.assert_close(losses["ce"], losses["text_ce"])  # the placeholder ids are no CE target
    torch.testing.assert_close(losses["loss"], losses["ce"] + losses["morph_mse"])

    torch.manual_seed(0)  # the same image sides as `losses` drew
    samples = [
        Sample(answer=[ImageRef(i), c] if first else [c, ImageRef(i)])
        for i, (c, first) in enumerate(
            zip(batch["captions"], torch.rand(len(batch["captions"])) < 0.5, strict=True)
        )
    ]
    seq = stage.sequences(samples, enc, batch)
    out = model.run_llm(seq, enc)
    n = model.num_tokens
    errs = []  # by hand: positions <img> .. m_31 predict m_1 .. m_32 (every token of stage 1 is scored)
    for b, p in (seq.input_ids == model.vocab.img_start).nonzero().tolist():
        i = int(seq.image_slot[b, p + 1]) // n
        errs.append(F.mse_loss(out.vectors[b, p : p + n], enc.z_q[i].detach()))
    torch.testing.assert_close(model.next_token_mse(out, seq, enc), torch.stack(errs).mean())


def test_continuous_mse_is_stage3s_morph_term():
    stage = row_stage("continuous", 3)
    losses = stage.losses(_batch(True))
    expected = losses["text_ce"] + stage.hparams.decoder_weight * losses["decoder_ce"] + losses["morph_mse"]
    assert stage.hparams.morph_ar_weight == 1.0 and losses["morph_mse"] > 0
    torch.testing.assert_close(losses["loss"], expected)


# ---- w/o decoder and detail-detail: the LLM writes the VQGAN codes X itself ---------------------------
def _image_spans(seq, vocab) -> list[list[int]]:
    """The ids between each <img> and </img> of the batch, row by row."""
    spans = []
    for row in seq.input_ids.tolist():
        while vocab.img_start in row:
            start = row.index(vocab.img_start)
            end = row.index(vocab.img_end, start)
            spans.append(row[start + 1 : end])
            row = row[end + 1 :]
    return spans


def test_wo_decoder_has_no_decoder_and_the_llm_writes_x_with_ce():
    """Stage 2: the caption row reads the image as morph tokens M; the text-to-image row writes it as its
    VQGAN codes X (code tokens of the LLM's own vocabulary), labelled for the CE."""
    stage = row_stage("wo_decoder", 2)
    model, batch = stage.model, _batch(False)
    assert model.decoder is None and not any(k.startswith("decoder.") for k in model.state_dict())
    v = model.vocab
    assert (
        v.num_codes == model.vqgan.codebook.shape[0] and v.num_morph == model.encoder.quantizer.codebook_size
    )
    enc = model.encode_images(batch["vision_pixels"])
    x = model.vqgan_codes(batch["vqgan_pixels"])
    captions = batch["captions"]
    samples = [Sample(prompt=[ImageRef(0)], answer=[captions[0]]), Sample([captions[0]], [ImageRef(0, True)])]
    seq = stage.sequences(samples, enc, batch)
    read, written = _image_spans(seq, v)
    assert read == v.morph_ids(enc.ids[0]).tolist()
    assert written == (x[0] + v.code_offset).tolist()
    ((b, p, _),) = seq.targets
    assert seq.labels[b, p : p + len(written)].tolist() == written  # CE on every code
    losses = stage.losses(batch)
    assert losses["code_ce"] > 0 and losses["morph_ce"] == 0  # the image answers are X, not M
    torch.testing.assert_close(losses["loss"], losses["text_ce"] + losses["code_ce"] + losses["quant"])


def test_detail_detail_reads_and_writes_vqgan_codes_only():
    """No vision tower, morph encoder or decoder; stage 1 auto-regresses `<img> X </img> Y` and
    `Y <img> X </img>` with one CE over text and codes (TEAL's unified AR)."""
    stage = row_stage("detail_detail", 1)
    model, batch = stage.model, _batch(False)
    assert model.vision is None and model.encoder is None and model.decoder is None
    assert model.vocab.num_morph == 0 and model.num_tokens == model.vqgan.codes_per_image
    assert not any(k.split(".")[0] in ("vision", "encoder", "decoder") for k in model.state_dict())
    x = model.vqgan_codes(batch["vqgan_pixels"])
    samples = [Sample(answer=[ImageRef(0), "a"]), Sample(answer=["a", ImageRef(1)])]
    seq = stage.sequences(samples, None, batch)
    assert _image_spans(seq, model.vocab) == [(x[i] + model.vocab.code_offset).tolist() for i in (0, 1)]
    losses = stage.losses(batch)
    assert set(losses) == {"loss", "ce", "text_ce", "code_ce"}
    assert losses["code_ce"] > 0 and torch.equal(losses["loss"], losses["ce"])
    scored = seq.labels[seq.labels != IGNORE]
    assert model.vocab.is_code(scored).sum() == 2 * model.vqgan.codes_per_image


# ---- generation of the rows without a codebook or a decoder ------------------------------------------
DRAWING_ROWS = ("continuous", "wo_decoder", "detail_detail")


def _written_ids(monkeypatch) -> list[list[int]]:
    """Every row's generated ids, one list per row per `generate` call, in call order."""
    rows, render = [], generation._render
    monkeypatch.setattr(generation, "_render", lambda m, ids: rows.append(list(ids)) or render(m, ids))
    return rows


def _image_token(model, ids: torch.Tensor) -> torch.Tensor:
    """The ids the row writes inside an image: VQGAN codes, or morph ids (one placeholder if continuous)."""
    return model.vocab.is_code(ids) if model.post_mllm == "vqgan" else model.vocab.is_morph(ids)


@pytest.mark.parametrize("row", DRAWING_ROWS)
def test_rows_draw_images_from_left_padded_prompts_the_same_with_and_without_a_cache(row, monkeypatch):
    """Batch 1 and 3, prompts of different lengths (two with images): each row draws one image of exactly
    the row's length (`codes_per_image` codes; |M| slots), the same greedy tokens and pixels with and
    without the KV cache, and a prompt draws the same alone as beside longer ones."""
    model = row_stage(row, 3).model.eval()
    batch = _batch(False, n=3)
    prompts = [
        Sample(prompt=["a red"]),
        Sample(prompt=[ImageRef(0), " a much longer prompt than the first"]),
        Sample(prompt=["two:", ImageRef(1), ImageRef(2)]),
    ]
    n = generation.image_length(model)
    assert n == (model.vqgan.codes_per_image if row != "continuous" else model.num_tokens)
    ids = _written_ids(monkeypatch)
    kw = {
        "vision_pixels": batch["vision_pixels"],
        "vqgan_pixels": batch["vqgan_pixels"],
        "max_new_tokens": n + 2,
        "start_image": True,
        "temperature": 0.0,
        "image_temperature": 0.0,
    }
    out = {cache: generation.generate(model, prompts, cache=cache, **kw) for cache in ("none", "dynamic")}
    alone = generation.generate(model, prompts[:1], **kw)
    size = model.config.vqgan.resolution
    assert alone.pixels.shape == (1, 3, size, size) and out["dynamic"].pixels.shape == (3, 3, size, size)
    assert out["dynamic"].images == out["none"].images == [[0], [1], [2]]
    torch.testing.assert_close(out["none"].pixels, out["dynamic"].pixels)
    torch.testing.assert_close(alone.pixels[0], out["dynamic"].pixels[0])
    assert ids[:3] == ids[3:6] and ids[6] == ids[0]
    v = model.vocab
    for row_ids in ids:
        inner = torch.tensor(row_ids[1:-1])
        assert row_ids[0] == v.img_start and row_ids[-1] == v.img_end and len(inner) == n
        assert bool(_image_token(model, inner).all())


@pytest.mark.parametrize("row", DRAWING_ROWS)
def test_rows_keep_image_tokens_out_of_text_and_other_tokens_out_of_images(row, monkeypatch):
    """With every morph and code logit pushed far above the text's, and </img>'s above those, text mode
    still writes none of them, and image mode writes only the row's own image tokens, then </img> after
    exactly the row's length (these rows never close an image early)."""
    model = row_stage(row, 3).model.eval()
    v, head = model.vocab, model.llm.head
    ids = torch.arange(v.size)
    bias = 100.0 * (ids >= v.morph_offset) + 200.0 * (ids == v.img_end)
    monkeypatch.setattr(model.llm, "head", lambda h, text=True: head(h, text) + bias.to(h.dtype))
    written = _written_ids(monkeypatch)
    n, extra = generation.image_length(model), 4
    greedy = {"temperature": 0.0, "image_temperature": 0.0, "start_image": True}
    generation.generate(
        model, [Sample(prompt=["a"]), Sample(prompt=["a longer one"])], max_new_tokens=n + 2 + extra, **greedy
    )
    for row_ids in written:
        t = torch.tensor(row_ids)
        assert t[0] == v.img_start and bool(_image_token(model, t[1 : n + 1]).all()) and t[n + 1] == v.img_end
        assert not bool((v.is_morph(t[n + 2 :]) | v.is_code(t[n + 2 :])).any())
        assert len(t) == n + 2 + extra or t[-1] == model.llm.tokenizer.eos_token_id


def test_continuous_feeds_back_the_regressed_vector_and_hands_the_decoder_the_emitting_states(monkeypatch):
    """Each slot's input is `morph_in` of the vector regressed at the position before it, and M̂ is the
    hidden states of the positions that emit the slots: as a teacher-forced pass over the same inputs."""
    model = row_stage("continuous", 3).model.eval()
    prefixes, draw = [], model.decoder.generate
    monkeypatch.setattr(
        model.decoder, "generate", lambda prefix, **kw: prefixes.append(prefix) or draw(prefix, **kw)
    )
    n = model.num_tokens
    greedy = {"temperature": 0.0, "image_temperature": 0.0, "start_image": True}
    generation.generate(model, [Sample(prompt=["a red"])], max_new_tokens=n + 2, **greedy)
    # Teacher forcing: <bos> a red <img>, then each slot's input the vector regressed one position before.
    batch, _ = generation.prompt_batch(model, [Sample(prompt=["a red"])], None)
    inputs = model.llm.embed(torch.cat([batch.input_ids, torch.tensor([[model.vocab.img_start]])], 1))
    with torch.no_grad():
        for _ in range(n):
            out = model.llm(inputs)
            inputs = torch.cat([inputs, model.llm.morph_in(out.vectors[:, -1:])], 1)
        out = model.llm(inputs)
    torch.testing.assert_close(prefixes[0][0], out.hidden[0, -n - 1 : -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("row", ["wo_decoder", "detail_detail"])
def test_the_runner_draws_image_requests_without_a_decoder(row, tmp_path):
    """A text-to-image request, and an edit whose prompt image `detail_detail` reads as VQGAN codes."""
    model = row_stage(row, 3).model.eval()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "in.png")
    requests = [
        Request("t2i", "USER: a red square ASSISTANT:", output="image"),
        Request(
            "edit", "USER: <image> Make it green. ASSISTANT:", [str(tmp_path / "in.png")], output="image"
        ),
    ]
    loaded = _RequestDataset(requests, image_transforms(model))
    preds = EvalModule(model, tmp_path / "images").predict_step([loaded[0], loaded[1]], 0)
    size = model.config.vqgan.resolution
    assert all(p.error is None and Image.open(p.image).size == (size, size) for p in preds)


def test_detail_detail_answers_and_ranks_with_prompt_images_read_as_vqgan_codes(tmp_path):
    """DEMON's text answers and ranked choices for a row without a vision tower: the prompt's image
    enters as its VQGAN codes, and the answer's likelihood depends on which image it is."""
    model = row_stage("detail_detail", 3).model.eval()
    for colour in ("red", "blue"):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{colour}.png")
    prompt = "USER: <image> Which colour? ASSISTANT:"
    requests = [Request("answer", prompt, [str(tmp_path / "red.png")], max_new_tokens=4)] + [
        Request(f"rank-{c}", prompt, [str(tmp_path / f"{c}.png")], choices=["red", "blue"])
        for c in ("red", "blue")
    ]
    loaded = _RequestDataset(requests, image_transforms(model))
    answer, red, blue = EvalModule(model).predict_step([loaded[k] for k in range(3)], 0)
    assert answer.error is None and isinstance(answer.text, str)
    assert red.text in ("red", "blue") and len(red.choice_logprobs) == 2
    assert red.choice_logprobs != blue.choice_logprobs


def test_abstr_abstr_sd_draws_from_the_condition_regressed_from_the_emitting_states(monkeypatch):
    """The frozen generator gets one condition vector per image, the condition head's map of the states
    that emitted its morph tokens; left-padded prompts draw the same with and without the KV cache."""
    model = row_stage("abstr_abstr_sd", 3).model.eval()
    prefixes, draw = [], model.decoder.generate
    monkeypatch.setattr(
        model.decoder, "generate", lambda prefix, **kw: prefixes.append(prefix) or draw(prefix, **kw)
    )
    prompts = [Sample(prompt=["a red"]), Sample(prompt=["a much longer prompt than the first"])]
    greedy = {"temperature": 0.0, "image_temperature": 0.0, "start_image": True}
    out = {
        cache: generation.generate(model, prompts, max_new_tokens=model.num_tokens + 2, cache=cache, **greedy)
        for cache in ("none", "dynamic")
    }
    assert out["dynamic"].images == out["none"].images == [[0], [1]]
    torch.testing.assert_close(out["none"].pixels, out["dynamic"].pixels)
    assert prefixes[0].shape == (2, 1, model.vision.out_dim)
    torch.testing.assert_close(prefixes[0], prefixes[1])


@pytest.mark.parametrize("row", [*DRAWING_ROWS, "abstr_abstr_sd"])
def test_image_logger_draws_every_row(row):
    """Stage 3's grids: text-to-image and edits for each row, reconstructions where there is a decoder."""
    stage = row_stage(row, 3)
    logger = ImageLogger(num_images=2, prompts=["USER: a red square ASSISTANT: "], max_new_tokens=4)
    with eval_mode(stage), torch.no_grad():
        grids = logger.grids(stage, _batch(True, n=8))
    expected = {"images/text_to_image", "images/edit"} | (
        {"images/reconstruction"} if row in ("continuous", "abstr_abstr_sd") else set()
    )
    assert set(grids) == expected


def test_export_and_codebook_health_refuse_the_rows_without_a_codebook_in_one_line(tmp_path):
    for row in (*DRAWING_ROWS, "abstr_abstr_sd"):
        model = row_stage(row, 3).model
        with pytest.raises(ValueError, match="evaluate this row from its checkpoint"):
            export_model(model, tmp_path / row)
        assert not (tmp_path / row).exists()
    with pytest.raises(ValueError, match="no morph codebook"):
        codebook_health(row_stage("continuous", 3).model, _batch(False)["vision_pixels"])


# ---- the fragments ---------------------------------------------------------------------------------
def test_world_fragments_set_what_the_paper_fragments_set():
    """The same options at both scales, but for abstr-abstr (SD)'s generator: the world's stage-0 one, the
    paper's unCLIP pipeline."""
    generators = ("generator_checkpoint", "generator_pipeline")
    for row in ROWS:
        world, paper = (copy.deepcopy(fragment(row, world)) for world in (True, False))
        for f in (world, paper):
            for key in generators:
                f.get("model", {}).pop(key, None)
        assert world == paper, row
    assert "generator_checkpoint" in fragment("abstr_abstr_sd", world=True)["model"]
    assert "generator_pipeline" in fragment("abstr_abstr_sd")["model"]


@pytest.mark.parametrize("world", [False, True])
@pytest.mark.parametrize("row", ROWS)
def test_each_fragment_parses_over_each_stage(row, world, capsys, tmp_path, monkeypatch):
    """`fit --config [world/]stageN.yaml --config [world/]ablations/<row>.yaml` parses, and every value of
    the fragment arrives in the model section."""
    monkeypatch.chdir(tmp_path)
    scale = "world/" if world else ""
    for stage in (1, 2, 3):
        args = ["--config", f"{scale}stage{stage}.yaml", "--config", f"{scale}ablations/{row}.yaml"]
        with pytest.raises(SystemExit) as exc:
            main(["fit", *args, "--print_config"])
        out, err = capsys.readouterr()
        assert exc.value.code in (0, None), err
        init = yaml.safe_load(out)["model"]["init_args"]
        assert _merge(init, fragment(row, world)) == init, (row, stage)


def test_the_generator_config_shares_the_rows_towers_decoder_and_path(capsys, tmp_path, monkeypatch):
    """`world/stage0_generator.yaml` parses; its towers and decoder sizes are the world row's (so its
    export fits the row's frozen generator), and it exports where the row's fragment reads."""
    monkeypatch.chdir(tmp_path)
    parsed = {}
    for name, args in {
        "generator": ["--config", "world/stage0_generator.yaml"],
        "row": ["--config", "world/stage2.yaml", "--config", "world/ablations/abstr_abstr_sd.yaml"],
    }.items():
        with pytest.raises(SystemExit) as exc:
            main(["fit", *args, "--print_config"])
        out, err = capsys.readouterr()
        assert exc.value.code in (0, None), err
        parsed[name] = yaml.safe_load(out)["model"]["init_args"]
    generator, row = parsed["generator"], parsed["row"]["model"]
    for section in ("vision", "vqgan", "decoder"):  # the row's sections also list the defaults
        assert {k: row[section][k] for k in generator[section]} == generator[section], section
    assert generator["vqgan_checkpoint"] == row["vqgan_checkpoint"]
    assert generator["export_path"] == row["generator_checkpoint"]
