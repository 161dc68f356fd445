"""Does the model read the image? Answer likelihood with the record's own images vs another record's.

Generated answers can beat a trivial baseline on the language prior alone (the commonest colour, the
usual caption template). The teacher-forced negative log-likelihood of the reference answer, once with
the record's own images and once with another record's, separates the two: a model that ignores its
images scores both the same.
"""

from __future__ import annotations

import torch

from morph_lightning.evaluation.likelihood import continuation_logprobs
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import Sample


def answer_nll(
    model: MorphModel,
    rows: list[tuple[Sample, list[torch.Tensor]]],
    batch_size: int = 16,
    max_text_tokens: int = 512,
) -> float:
    """Mean NLL per answer token (nats, the end-of-answer token included) of each row's text answer
    given its prompt and its images (see `continuation_logprobs`)."""
    scored = continuation_logprobs(model, rows, batch_size, max_text_tokens, add_eos=True)
    count = sum(c.tokens for c in scored)
    if count == 0:
        raise ValueError("answer_nll: no answer tokens to score (every answer empty or cut off)")
    return -sum(c.logprob for c in scored) / count
