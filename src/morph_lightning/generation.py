"""Batched generation with KV caches: text, and images between <img> and </img>.

In text mode morph ids are masked; after <img> only morph ids and </img> may follow, and </img> is
forced after 32 morph tokens. M̂ is collected per step (the hidden state that emitted each morph token,
or its codebook vector for `post_mllm: codes`), completed with <Emp> or trimmed, then decoded to VQGAN
codes and pixels. The ablations (docs/ablations.md) change what an image is: continuous slots, each one's
input the vector regressed for it (`morph_out`), and with `post_mllm: vqgan` exactly `codes_per_image`
VQGAN code tokens that the VQGAN decodes directly; those two never close an image early.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, StaticCache

from morph_lightning.modeling.decoder import CACHES, compile_step
from morph_lightning.modeling.encoder import EncoderOutput
from morph_lightning.modeling.model import GenerationOutput, MorphModel
from morph_lightning.modeling.sampling import sample_next
from morph_lightning.modeling.sequence import Sample, SequenceBatch, build_sequences

IMAGE_MARK = "<image>"


def image_length(model: MorphModel) -> int:
    """Tokens between the <img> and </img> the model writes: |M|, or X's codes with `post_mllm: vqgan`."""
    return model.vqgan.codes_per_image if model.post_mllm == "vqgan" else model.num_tokens


def _allowed_mask(model: MorphModel, in_image: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: which ids each row may emit next."""
    v = model.vocab
    ids = torch.arange(v.size, device=in_image.device)
    writes_codes = model.post_mllm == "vqgan"
    text_mode = ~v.is_morph(ids) & ~v.is_code(ids) & (ids != v.img_end) & (ids != v.emp)
    # Only discrete morph tokens may close early (<Emp> completes M̂): the VQGAN needs all its codes, and
    # a continuous slot's placeholder id has no trained logit to choose </img> against.
    early_close = not writes_codes and model.pre_mllm == "morph"
    image_mode = (v.is_code(ids) if writes_codes else v.is_morph(ids)) | ((ids == v.img_end) & early_close)
    full = count >= image_length(model)
    allowed = torch.where(in_image.unsqueeze(1), image_mode.unsqueeze(0), text_mode.unsqueeze(0))
    only_close = (ids == v.img_end).unsqueeze(0).expand_as(allowed)
    return torch.where((in_image & full).unsqueeze(1), only_close, allowed)


def read_images(
    model: MorphModel, pixels: torch.Tensor | None
) -> tuple[EncoderOutput | None, torch.Tensor | None, torch.Tensor | None]:
    """Images [N, 3, S, S] as the model reads them -> (the encoder's output, its morph ids, VQGAN codes X).
    With an encoder, `pixels` are normalised for the vision tower and X is None; with `pre_mllm: vqgan`
    they are in [-1, 1] for the VQGAN, and the first two are None. No images: empty ids or codes."""
    device = model.llm.new_head.weight.device
    if pixels is None or not len(pixels):
        empty = torch.zeros(0, model.num_tokens, dtype=torch.long)
        return (None, None, empty) if model.encoder is None else (None, empty, None)
    if model.encoder is None:
        return None, None, model.vqgan_codes(pixels.to(device))
    enc = model.encode_images(pixels.to(device))
    return enc, enc.ids, None


def prompt_batch(
    model: MorphModel,
    prompts: list[Sample],
    vision_pixels: torch.Tensor | None,
    vqgan_pixels: torch.Tensor | None = None,
) -> tuple[SequenceBatch, EncoderOutput | None]:
    """The prompts as left-padded rows (each row's next token at the last position), on the model's
    device, and the encoder's output for their images (None without images, or without an encoder:
    `pre_mllm: vqgan` reads the images as their VQGAN codes, from `vqgan_pixels` in [-1, 1])."""
    if model.encoder is None and vqgan_pixels is None and vision_pixels is not None and len(vision_pixels):
        raise ValueError("pre_mllm: vqgan reads prompt images as VQGAN codes: pass vqgan_pixels")
    enc, ids, x = read_images(model, vqgan_pixels if model.encoder is None else vision_pixels)
    tok = model.llm.tokenizer
    batch = build_sequences(prompts, ids, model.vocab, tok, pad_left=True, add_eos=False, vqgan_codes=x)
    return batch.to(model.llm.new_head.weight.device), enc


@torch.no_grad()
def generate(
    model: MorphModel,
    prompts: list[Sample],
    vision_pixels: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    image_temperature: float = 1.0,
    image_top_k: int | None = None,
    generator: torch.Generator | None = None,
    start_image: bool = False,
    cache: str = "dynamic",
    compile: bool = False,
    vqgan_pixels: torch.Tensor | None = None,
) -> GenerationOutput:
    """Continue each prompt (its `answer` empty); images in prompts index into `vision_pixels`, and
    into `vqgan_pixels` (the same images in [-1, 1], VQGAN-sized) where the LLM reads VQGAN codes.

    `start_image`: every answer starts with `<img>`, so each row draws an image first (text-to-image
    asked for, rather than left to the model). `cache`, for the LLM and the decoder alike: "dynamic" KV
    caches grow by a position each step; "static" ones are allocated for the whole sequence and written
    in place, so every step has the same shapes, which `compile` (each one-step function under
    `torch.compile`, CUDA graphs on CUDA) needs; "none" runs the whole sequence again at every step (the
    same tokens, much slower): the baseline that `benchmarks/generation.py` measures the caches against."""
    if cache not in CACHES or (compile and cache != "static"):
        raise ValueError(f"cache must be one of {CACHES} (static with compile), got {cache!r}")
    v, tok = model.vocab, model.llm.tokenizer
    device = model.llm.new_head.weight.device
    batch, enc = prompt_batch(model, prompts, vision_pixels, vqgan_pixels)
    rows, filled = batch.input_ids.shape
    static = cache == "static"
    if static:
        past = StaticCache(config=model.llm.hf.config, max_cache_len=filled + max_new_tokens)
    else:
        past = DynamicCache(config=model.llm.hf.config) if cache == "dynamic" else None
    # The padding mask of every position the loop can reach, each column written as its token comes: a
    # static cache is given all of it (its shapes never change), the others the part filled so far.
    mask = F.pad(batch.attention_mask, (0, max_new_tokens))

    def llm_step(inputs: Tensor, positions: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """The last position's hidden state and regressed continuous token (None without one); the cache
        takes in the inputs' keys and values. The logits are `head`'s, on that position alone."""
        out = model.llm(
            inputs, mask, positions, past_key_values=past, use_cache=past is not None, with_logits=False
        )
        return out.hidden[:, -1], None if out.vectors is None else out.vectors[:, -1]

    # The LLM's inputs this step: every input so far without a cache, the new token's with one.
    inputs = model.llm.embed(batch.input_ids, model.morph_vectors(batch, enc))
    positions = batch.position_ids
    hidden, vectors = llm_step(inputs, positions, mask if static else mask[:, :filled])  # the prompt
    step = compile_step(llm_step, device) if compile else llm_step
    in_image = torch.zeros(rows, dtype=torch.bool, device=device)
    count = torch.zeros(rows, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(rows)]
    # Per row, the open image's M̂ rows, or its code ids with `post_mllm: vqgan`.
    image_rows: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    finished_images: list[tuple[int, torch.Tensor]] = []
    writes_codes = model.post_mllm == "vqgan"
    quantizer = getattr(model.encoder, "quantizer", None)
    codebook = None if quantizer is None else quantizer.codebook
    for i in range(max_new_tokens):
        # Inside an image no text id may follow, so the base model's head is not run for it.
        logits = model.llm.head(hidden, text=not bool(in_image.all()))
        logits = logits.float().masked_fill(~_allowed_mask(model, in_image, count), float("-inf"))
        text_next = sample_next(logits, temperature, top_k, top_p, generator)
        image_next = sample_next(logits, image_temperature, image_top_k, None, generator)
        nxt = torch.where(in_image, image_next, text_next)
        if start_image and i == 0:
            nxt = torch.full_like(nxt, v.img_start)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        is_image = (v.is_code(nxt) if writes_codes else v.is_morph(nxt)) & ~done
        for b in range(rows):
            if done[b]:
                continue
            t = int(nxt[b])
            generated[b].append(t)
            if is_image[b]:
                if writes_codes:
                    image_rows[b].append(nxt[b] - v.code_offset)
                else:  # the emitting state (`hidden`, `embedding`, continuous slots) or a codebook vector
                    image_rows[b].append(
                        codebook[t - v.morph_offset] if model.post_mllm in ("codes", "tied") else hidden[b]
                    )
            elif t == v.img_end:
                got = image_rows[b]
                if writes_codes:  # the mask closes an image only once all its codes are written
                    finished_images.append((b, torch.stack(got)))
                else:
                    finished_images.append(
                        (b, model.complete_mhat(torch.stack(got) if got else model.emp_vector()[:0]))
                    )
                image_rows[b] = []
        count = torch.where(is_image, count + 1, torch.where(nxt == v.img_end, 0, count))
        in_image = (in_image | (nxt == v.img_start)) & (nxt != v.img_end)
        done = done | (nxt == tok.eos_token_id)
        if bool(done.all()):
            break
        # A continuous slot's input is the vector regressed for it; a morph id's, its codebook vector
        # (other ids read row 0, which `embed` leaves unused).
        morph_vecs = None
        if model.pre_mllm == "continuous":
            morph_vecs = vectors.unsqueeze(1)
        elif codebook is not None:
            morph_vecs = codebook[v.codes(nxt) * v.is_morph(nxt)].unsqueeze(1)
        embeds = model.llm.embed(nxt.unsqueeze(1), morph_vecs)
        mask[:, filled] = ~done
        filled += 1
        step_positions = positions[:, -1:] + 1
        if cache == "none":
            inputs = torch.cat([inputs, embeds], dim=1)
            positions = torch.cat([positions, step_positions], dim=1)
        else:
            inputs, positions = embeds, step_positions
        hidden, vectors = step(inputs, positions, mask if static else mask[:, :filled])

    images: list[list[int]] = [[] for _ in range(rows)]
    pixels = None
    if finished_images:
        drawn = torch.stack([m for _, m in finished_images])
        pixels = model.draw(drawn, image_temperature, image_top_k, generator, cache, compile)
        for k, (b, _) in enumerate(finished_images):
            images[b].append(k)
    return GenerationOutput(texts=[_render(model, ids) for ids in generated], images=images, pixels=pixels)


def _render(model: MorphModel, ids: list[int]) -> str:
    """Decode text, showing each generated image as one mark."""
    v, pieces, text, inside = model.vocab, [], [], False
    for t in ids:
        if t == v.img_start:
            pieces.append(model.llm.tokenizer.decode(text, skip_special_tokens=True))
            text, inside = [], True
            pieces.append(IMAGE_MARK)
        elif t == v.img_end:
            inside = False
        elif not inside and v.is_text(torch.tensor(t)):
            text.append(t)
    pieces.append(model.llm.tokenizer.decode(text, skip_special_tokens=True))
    return "".join(pieces)
