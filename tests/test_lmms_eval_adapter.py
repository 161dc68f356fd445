"""The lmms-eval model adapter, driven with hand-built lmms-eval Instances and a fake task_dict (no
lmms-eval data): answers in request order, `until`, log-likelihoods equal to the project's, registration."""

from __future__ import annotations

import string
import subprocess
import sys

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from morph_lightning.data_modules.instruct import prompt_pieces  # noqa: E402
from morph_lightning.data_modules.transforms import ImageTransforms  # noqa: E402
from morph_lightning.evaluation.likelihood import continuation_logprobs  # noqa: E402
from morph_lightning.evaluation.lmms_eval_adapter import MODEL_NAME, MorphTokens, manifest  # noqa: E402
from morph_lightning.evaluation.task import USER_TEMPLATE  # noqa: E402
from morph_lightning.evaluation.text_generation import generate_text  # noqa: E402
from morph_lightning.modeling.sequence import Sample  # noqa: E402

COLORS = ["red", "navy", "green", "orange"]
TASK_DICT = {
    "fake": {"test": [{"image": Image.new("RGB", (40, 30), c), "q": f"What is {c}?"} for c in COLORS]}
}


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [doc["image"]]


def instance(kind: str, args: tuple, doc_id: int = 0) -> Instance:
    return Instance(kind, args, idx=0, metadata={"task": "fake", "doc_id": doc_id, "repeats": 1})


def gen(doc_id: int, **gen_kwargs) -> Instance:
    context = TASK_DICT["fake"]["test"][doc_id]["q"]
    return instance("generate_until", (context, gen_kwargs, doc_to_visual, doc_id, "fake", "test"), doc_id)


def adapter(model, batch_size: int = 2) -> MorphTokens:
    lm = MorphTokens(model=model, device="cpu", batch_size=batch_size)
    lm.task_dict = TASK_DICT
    return lm


@pytest.fixture
def letters_model(tiny_eval_model):
    """The tiny model with +10 on the logits of the lowercase letters: its greedy answers are letters (not
    undecodable bytes) that differ from prompt to prompt, and it prefers letters to any other text."""
    tok = tiny_eval_model.llm.tokenizer
    head = tiny_eval_model.llm.hf.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[tok(string.ascii_lowercase, add_special_tokens=False).input_ids] = 10.0
    handle = head.register_forward_hook(lambda module, args, out: out + bias.to(out))
    yield tiny_eval_model
    handle.remove()


def vision_pixels(model, image: Image.Image) -> torch.Tensor:
    v = model.vision
    return ImageTransforms(v.image_size, model.config.vqgan.resolution, v.mean, v.std)(image)[0]


def test_generate_until_answers_every_request_in_order(letters_model):
    requests = [gen(0, max_new_tokens=10), gen(1, max_new_tokens=4), gen(2, max_new_tokens=10), gen(3)]
    answers = adapter(letters_model, batch_size=3).generate_until(requests)
    assert len(answers) == 4 and all(isinstance(a, str) and a for a in answers)
    assert len(set(answers)) == 4  # distinct, so the order below means something
    assert len(answers[1]) <= 4 < len(answers[0])
    assert [adapter(letters_model, 1).generate_until([r])[0] for r in requests] == answers
    assert adapter(letters_model, 3).generate_until(requests[::-1]) == answers[::-1]
    # the prompt is the chat template with the image mark before the context
    prompt = Sample(prompt_pieces("USER: <image> What is red? ASSISTANT:"))
    pixels = vision_pixels(letters_model, TASK_DICT["fake"]["test"][0]["image"])[None]
    assert generate_text(letters_model, [prompt], pixels, max_new_tokens=10)[0].strip() == answers[0]


def test_generate_until_cuts_at_the_first_stop_string(letters_model):
    lm = adapter(letters_model)
    full = lm.generate_until([gen(0, max_new_tokens=12)])[0]
    stop = full[5:7]
    expected = full[: full.index(stop)]
    assert 0 < len(expected) < len(full)
    assert lm.generate_until([gen(0, max_new_tokens=12, until=["never", stop])])[0] == expected
    assert lm.generate_until([gen(0, max_new_tokens=12, until=stop)])[0] == expected


def test_sampling_and_multi_round_are_refused(tiny_eval_model):
    lm = adapter(tiny_eval_model)
    with pytest.raises(ValueError, match="do_sample"):
        lm.generate_until([gen(0, do_sample=True, temperature=0.7)])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([gen(0)])


def test_loglikelihood_is_the_projects_continuation_logprob(letters_model):
    lm = adapter(letters_model, batch_size=2)
    context = "What is this?"

    def target(doc: dict) -> str:
        return " " + doc["q"].split()[-1].rstrip("?").lower()  # " red", " navy", ...

    requests = [
        instance("loglikelihood", (context, " abc", doc_to_visual, 0, "fake", "test")),
        instance("loglikelihood", (context, " 123", doc_to_visual, 0, "fake", "test")),
        instance("loglikelihood", (context, target, doc_to_visual, 1, "fake", "test"), doc_id=1),
        instance("loglikelihood", ("", "abc")),  # no images: the unconditional form
    ]
    scores = lm.loglikelihood(requests)
    assert len(scores) == 4
    assert all(isinstance(lp, float) and isinstance(greedy, bool) for lp, greedy in scores)

    def expected(prompt: str, answer: str, doc_id: int | None) -> tuple[float, bool]:
        images = (
            []
            if doc_id is None
            else [vision_pixels(letters_model, TASK_DICT["fake"]["test"][doc_id]["image"])]
        )
        (c,) = continuation_logprobs(letters_model, [(Sample(prompt_pieces(prompt), [answer]), images)])
        return c.logprob, c.greedy

    prompt = "USER: <image> What is this? ASSISTANT:"
    for got, want in zip(
        scores,
        [
            expected(prompt, " abc", 0),
            expected(prompt, " 123", 0),
            expected(prompt, " navy", 1),
            expected(USER_TEMPLATE.format(""), " abc", None),  # the template around no context
        ],
        strict=True,
    ):
        assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-4) and got[1] == want[1]
    # the model prefers letters by +10 a token: " abc" over " 123"
    assert scores[0][0] > scores[1][0] + 20


def test_context_marks_must_match_the_images(tiny_eval_model):
    lm = adapter(tiny_eval_model)
    marked = instance("loglikelihood", ("Look: <image> and this", " a", doc_to_visual, 0, "fake", "test"))
    assert lm.loglikelihood([marked])[0][0] < 0
    twice = instance("loglikelihood", ("<image> <image>", " a", doc_to_visual, 0, "fake", "test"))
    with pytest.raises(ValueError, match="2 <image> marks for 1 images"):
        lm.loglikelihood([twice])


def test_constructor_takes_one_model_source(tiny_eval_model):
    with pytest.raises(ValueError, match="exactly one"):
        MorphTokens(device="cpu")
    with pytest.raises(ValueError, match="exactly one"):
        MorphTokens(checkpoint="a.ckpt", model=tiny_eval_model, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        MorphTokens(model=tiny_eval_model, device="cpu", batch_size="auto")
    assert MorphTokens(model=tiny_eval_model, device="cpu", batch_size="3").batch_size == 3


def test_registered_as_morph_tokens():
    from lmms_eval.api.registry import get_model as legacy_get_model
    from lmms_eval.models import get_model
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    assert MODEL_NAME == "morph_tokens"
    assert legacy_get_model("morph_tokens") is MorphTokens
    assert get_model("morph_tokens") is MorphTokens  # `--model morph_tokens`, through the entry point
    fresh = ModelRegistryV2()  # the entry point's payload, in a registry of its own
    fresh.register_manifest(manifest())
    assert fresh.get_model_class("morph_tokens") is MorphTokens


def test_importing_morph_lightning_never_imports_lmms_eval():
    code = (
        "import sys, morph_lightning, morph_lightning.evaluate, morph_lightning.evaluation.runner, "
        "morph_lightning.evaluation.tasks.mme; assert 'lmms_eval' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
