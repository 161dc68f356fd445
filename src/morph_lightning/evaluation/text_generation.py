"""Text answers through transformers' `generate`: greedy or beam search over the text vocabulary.

The benchmarks' decoding settings (InstructBLIP's beam 5 with a minimum length and a length penalty)
are what transformers' generation implements, so the prompt (text and morph tokens) is embedded as in
training and handed to the base LM's `generate` as `inputs_embeds`. Only text can follow: the rows past
the text vocabulary (the image and morph tokens live in `MorphLLM`'s own head, not the base LM's) are
suppressed. `morph_lightning.generation.generate` is the path that can also emit images.
"""

from __future__ import annotations

import torch

from morph_lightning.generation import prompt_batch
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import Sample


@torch.no_grad()
def generate_text(
    model: MorphModel,
    prompts: list[Sample],
    vision_pixels: torch.Tensor | None = None,
    max_new_tokens: int = 100,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    vqgan_pixels: torch.Tensor | None = None,
) -> list[str]:
    """Continue each prompt (ImageRefs index `vision_pixels`, and `vqgan_pixels` where the LLM reads
    VQGAN codes: `generation.prompt_batch`) with text; returns the new text only."""
    tok, hf = model.llm.tokenizer, model.llm.hf
    batch, enc = prompt_batch(model, prompts, vision_pixels, vqgan_pixels)
    embeds = model.llm.embed(batch.input_ids, model.morph_vectors(batch, enc))
    rows = hf.get_output_embeddings().weight.shape[0]
    out = hf.generate(
        inputs_embeds=embeds,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=num_beams,
        length_penalty=length_penalty,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=list(range(model.vocab.text_size, rows)) or None,
    )
    return tok.batch_decode(out, skip_special_tokens=True)
