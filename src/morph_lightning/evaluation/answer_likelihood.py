"""Does the model read the image? Answer likelihood with the record's own images vs another record's.

Generated answers can beat a trivial baseline on the language prior alone (the commonest colour, the
usual caption template). The teacher-forced negative log-likelihood of the reference answer, once with
the record's own images and once with another record's, separates the two: a model that ignores its
images scores both the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import IGNORE, Sample, build_sequences, shift_refs


@torch.no_grad()
def answer_nll(
    model: MorphModel,
    rows: list[tuple[Sample, list[torch.Tensor]]],
    batch_size: int = 16,
    max_text_tokens: int = 512,
) -> float:
    """Mean NLL per answer token (nats) of each row's text answer given its prompt and its images.

    rows: (a Sample with a text answer and ImageRefs into its own images, those images [3, S, S]
    normalised for the vision tower). The morph tokens are the encoder's, as in training.
    """
    param = next(model.parameters())
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        samples, vision = [], []
        for sample, images in rows[start : start + batch_size]:
            base = len(vision)
            samples.append(Sample(shift_refs(sample.prompt, base), shift_refs(sample.answer, base)))
            vision += images
        enc = model.encode_images(torch.stack(vision).to(param.device)) if vision else None
        codes = enc.ids if enc is not None else torch.zeros(0, model.num_tokens, dtype=torch.long)
        seq = build_sequences(samples, codes, model.vocab, model.llm.tokenizer, max_text_tokens)
        seq = seq.to(param.device)
        logits = model.run_llm(seq, enc).logits
        labels = seq.labels.flatten()
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE).sum())
    if count == 0:
        raise ValueError("answer_nll: no answer tokens to score (every answer empty or cut off)")
    return total / count
