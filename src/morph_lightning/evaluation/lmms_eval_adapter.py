"""lmms-eval model `morph_tokens`: a MorphModel answering lmms-eval's tasks (written against lmms-eval 0.7.3).

    python -m lmms_eval --model morph_tokens --model_args checkpoint=runs/stage3/last.ckpt \\
        --tasks mme --batch_size 8 --output_path out/lmms

`--model_args export=DIR,form=merged` loads an export instead, `device=cuda:1` places the model. lmms-eval
0.7.3's CLI finds models in its registry v2, which reads the `lmms_eval.models` entry points: the package
declares `morph_tokens = morph_lightning.evaluation.lmms_eval_adapter:manifest` (setup.cfg), so an installed
morph_lightning is all it needs. `register_model` below also puts the class in lmms-eval's older registry
(`lmms_eval.api.registry`), which Python code built on it reads.

Requests are answered as the project's runner answers its own: the context in the chat template
"USER: <image> {context} ASSISTANT:" (one mark per image before the text, unless the context places its
marks), images through the runner's transforms, text from `generate_text` (greedy or beam search; cut at the
task's `until` strings) and scores from `continuation_logprobs`. One process: the model reports rank 0 of 1
(for data-parallel runs, `python -m morph_lightning evaluate`). Nothing in morph_lightning imports this
module, so lmms-eval stays optional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image
from tqdm import tqdm

from morph_lightning.data_modules.instruct import IMAGE_MARK, prompt_pieces
from morph_lightning.evaluation.likelihood import continuation_logprobs
from morph_lightning.evaluation.runner import EvalModule, LoadedRequest, image_transforms
from morph_lightning.evaluation.task import USER_TEMPLATE, Request
from morph_lightning.export import load_exported, model_from_checkpoint
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import Sample

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

MODEL_NAME = "morph_tokens"
# The generation_kwargs that set a Request's decoding; temperature and top_p only matter when sampling.
DECODING: dict[str, Callable[[Any], Any]] = {
    "max_new_tokens": int,
    "min_new_tokens": int,
    "num_beams": int,
    "length_penalty": float,
}


@register_model(MODEL_NAME)
class MorphTokens(lmms):
    """`--model_args`: `checkpoint=` (a stage .ckpt) or `export=` (an export folder; `form=adapter|merged`),
    `device=` (default: cuda when there is one), `batch_size=` (lmms-eval's --batch_size); or `model=`, a
    MorphModel (tests)."""

    is_simple = True

    def __init__(
        self,
        checkpoint: str | None = None,
        export: str | None = None,
        form: str = "adapter",
        device: str | None = None,
        batch_size: int | str = 8,
        model: MorphModel | None = None,
    ) -> None:
        super().__init__()
        if sum(source is not None for source in (checkpoint, export, model)) != 1:
            raise ValueError(f"{MODEL_NAME}: give exactly one of checkpoint=, export= or model=")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"{MODEL_NAME}: batch_size must be a positive number, got {batch_size!r}")
        if model is None:
            model = model_from_checkpoint(checkpoint) if checkpoint else load_exported(export, form=form)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(device).eval()
        self.batch_size = int(batch_size)
        self.transforms = image_transforms(self.model)
        self.answerer = EvalModule(self.model)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Instance.args = (context, gen_kwargs, doc_to_visual, doc_id, task, split); the answers in order."""
        out: list[str] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc=MODEL_NAME, disable=self.rank != 0):
            batch, stops = [], []
            for k, instance in enumerate(requests[start : start + self.batch_size]):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
                gen_kwargs = dict(gen_kwargs or {})
                pixels = self._pixels(doc_to_visual(self.task_dict[task][split][doc_id]))
                names = [f"{task}/{split}/{doc_id}#{i}" for i in range(len(pixels))]  # for messages only
                request = Request(
                    str(start + k), self._prompt(context, len(pixels)), names, **_decoding(gen_kwargs)
                )
                batch.append(LoadedRequest(request, pixels, None))
                stops.append(gen_kwargs.get("until"))
            predictions = self.answerer.predict_step(batch, start // self.batch_size)
            out += [_cut(p.text, until) for p, until in zip(predictions, stops, strict=True)]
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Instance.args = (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split), or
        (context, continuation) without images; (summed logprob, every token the argmax) per request."""
        rows = []
        for instance in requests:
            context, target, *where = instance.args
            pixels = []
            if where:
                doc_to_visual, doc_id, task, split = where
                doc = self.task_dict[task][split][doc_id]
                pixels = self._pixels(doc_to_visual(doc))
                target = target(doc) if callable(target) else target
            if not isinstance(target, str):
                raise TypeError(f"{MODEL_NAME}: a continuation must be text, got {type(target).__name__}")
            prompt = prompt_pieces(self._prompt(context, len(pixels)))
            # The answer follows "ASSISTANT:" after one space, as training and the runner's ranking render it.
            rows.append((Sample(prompt, [" " + target.lstrip()]), pixels))
        scored = continuation_logprobs(self.model, rows, batch_size=self.batch_size)
        return [(c.logprob, c.greedy) for c in scored]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            f"{MODEL_NAME}: multi-round tasks (generate_until_multi_round) are not supported; "
            "run single-round tasks"
        )

    def _pixels(self, visuals: list[Any] | None) -> list[torch.Tensor]:
        for visual in visuals or []:
            if not isinstance(visual, Image.Image):
                raise TypeError(f"{MODEL_NAME} takes images (PIL), got {type(visual).__name__}")
        return [self.transforms(visual)[0] for visual in visuals or []]

    @staticmethod
    def _prompt(context: str, n_images: int) -> str:
        """The context in the chat template, one mark per image before the text as training places them,
        unless the context places its own."""
        marks = context.count(IMAGE_MARK)
        if marks == 0:
            context = " ".join(part for part in [*[IMAGE_MARK] * n_images, context] if part)
        elif marks != n_images:
            raise ValueError(
                f"{MODEL_NAME}: the context holds {marks} {IMAGE_MARK} marks for {n_images} images"
            )
        return USER_TEMPLATE.format(context)


def _decoding(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A task's generation_kwargs as Request fields; what a task leaves out keeps the Request's default."""
    if gen_kwargs.get("do_sample"):
        raise ValueError(
            f"{MODEL_NAME} decodes greedily or by beam search, and this task samples (do_sample=True); "
            "run it with --gen_kwargs do_sample=False"
        )
    return {key: cast(gen_kwargs[key]) for key, cast in DECODING.items() if gen_kwargs.get(key) is not None}


def _cut(text: str, until: str | list[str] | None) -> str:
    """`text` up to the first of the stop strings."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def manifest() -> ModelManifest:
    """lmms-eval's registry-v2 record of this model: the payload of the `lmms_eval.models` entry point."""
    # Entry points load while `lmms_eval.models` initialises: take the submodule it has already imported,
    # never the package's own names (which do not exist yet then).
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{MorphTokens.__name__}")
