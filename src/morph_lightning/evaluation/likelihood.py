"""Teacher-forced log-likelihood of text answers given a prompt and its images.

The one place the evaluation scores a given continuation rather than generating one: ranking a
benchmark's candidate answers (InstructBLIP's vocabulary ranking, lmms-eval's `loglikelihood`) and the
world's answer NLL with a record's own images against another record's (`answer_likelihood`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from morph_lightning.generation import read_images
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import IGNORE, Sample, build_sequences, shift_refs


class Continuation(NamedTuple):
    logprob: float  # summed over the answer's tokens (natural log)
    tokens: int
    greedy: bool  # every answer token is the argmax at its position


@torch.no_grad()
def continuation_logprobs(
    model: MorphModel,
    rows: list[tuple[Sample, list[torch.Tensor]]],
    batch_size: int = 16,
    max_text_tokens: int = 512,
    add_eos: bool = False,
) -> list[Continuation]:
    """Each row's text answer scored after its prompt, with its images [3, S, S] as the model reads them
    (ImageRefs index the row's own images): normalised for the vision tower, or in [-1, 1] for the VQGAN
    where the LLM reads VQGAN codes (`pre_mllm: vqgan`). The tokens are the encoder's (or the VQGAN's),
    as in training; `add_eos` also scores the end of the answer."""
    param = next(model.parameters())
    tok = model.llm.tokenizer
    out: list[Continuation] = []
    for start in range(0, len(rows), batch_size):
        samples, images = [], []
        for sample, own in rows[start : start + batch_size]:
            base = len(images)
            samples.append(Sample(shift_refs(sample.prompt, base), shift_refs(sample.answer, base)))
            images += own
        enc, ids, x = read_images(model, torch.stack(images) if images else None)
        seq = build_sequences(samples, ids, model.vocab, tok, max_text_tokens, add_eos=add_eos, vqgan_codes=x)
        seq = seq.to(param.device)
        logits = model.run_llm(seq, enc).logits.float()
        scored = seq.labels != IGNORE
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, seq.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
        hits = (logits.argmax(-1) == seq.labels) | ~scored
        for b in range(len(samples)):
            out.append(Continuation(float(picked[b].sum()), int(scored[b].sum()), bool(hits[b].all())))
    return out
