"""The `model` config section: one dataclass per component, derived from the component's constructor.

Typed sections let jsonargparse check every key and type when the config is parsed, merge an override
of one key into the section (`--model.init_args.model.llm.lora_r 8`), and print every value with
`--print_config`. Deriving them from the constructors keeps one source of truth for names and
defaults. Sizes that one component fixes for another (the decoder's prefix width is the LLM's hidden
size, ...) are left out of the sections, so the config cannot contradict them.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

from jsonargparse import ArgumentParser

from morph_lightning.modeling.decoder import MorphDecoder
from morph_lightning.modeling.llm import MorphLLM
from morph_lightning.modeling.qformer import DeconfoundedQFormer
from morph_lightning.modeling.quantizer import MorphQuantizer
from morph_lightning.modeling.vision import VisionBackbone
from morph_lightning.modeling.vqgan import VQGAN


def section_of(target: Callable, name: str, skip: Iterable[str] = (), module: str = __name__) -> type:
    """A dataclass whose fields are `target`'s keyword parameters (types and defaults), less `skip`."""
    func = target.__init__ if inspect.isclass(target) else target
    hints = typing.get_type_hints(func)
    fields = [
        (p.name, hints[p.name], dataclasses.field(default=p.default))
        for p in inspect.signature(func).parameters.values()
        if p.name not in ("self", *skip)
    ]
    cls = dataclasses.make_dataclass(name, fields)
    cls.__module__ = module  # the module that binds `name`, so the class is found like a hand-written one
    return cls


VisionSection = section_of(VisionBackbone, "VisionSection")
QFormerSection = section_of(
    DeconfoundedQFormer, "QFormerSection", skip=("vision_dim", "dict_size", "dict_dim")
)
QuantizerSection = section_of(MorphQuantizer, "QuantizerSection")
LLMSection = section_of(
    MorphLLM, "LLMSection", skip=("num_morph_tokens", "code_dim", "num_code_tokens", "continuous")
)
DecoderSection = section_of(
    MorphDecoder, "DecoderSection", skip=("vocab_size", "n_codes", "n_prefix", "prefix_dim")
)
VQGANSection = section_of(VQGAN, "VQGANSection")


@dataclasses.dataclass
class MorphModelConfig:
    vision: VisionSection = dataclasses.field(default_factory=VisionSection)
    qformer: QFormerSection = dataclasses.field(default_factory=QFormerSection)
    quantizer: QuantizerSection = dataclasses.field(default_factory=QuantizerSection)
    llm: LLMSection = dataclasses.field(default_factory=LLMSection)
    decoder: DecoderSection = dataclasses.field(default_factory=DecoderSection)
    vqgan: VQGANSection = dataclasses.field(default_factory=VQGANSection)
    vqgan_checkpoint: str | None = None  # a taming `last.ckpt`; None builds a random VQGAN
    # The encoder's initial weights: a BLIP-2 directory or a SEED / LAVIS file (encoder_weights.py);
    # None starts it from random.
    encoder_init: str | None = None
    # What an image is in the LLM's input (pre-MLLM tokens) and what draws an image from its output
    # (post-MLLM tokens). The defaults are the paper's method; the other values build its ablations
    # (docs/ablations.md): `pre_mllm` continuous (no quantizer) or vqgan (VQGAN codes, no morph encoder);
    # `post_mllm` tied (M̂ is M, abstr-abstr VQ), embedding (M̂ regresses the condition embedding of a
    # frozen conditional generator, which draws from it: abstr-abstr SD) or vqgan (the LLM writes X).
    pre_mllm: Literal["morph", "continuous", "vqgan"] = "morph"
    post_mllm: Literal["hidden", "codes", "tied", "embedding", "vqgan"] = "hidden"
    # post_mllm: embedding: the stage-0 conditional generator's weights (stages/conditional_generator.py
    # exports them; the `decoder` section gives its sizes); None builds a random one.
    generator_checkpoint: str | None = None
    # post_mllm: embedding at paper scale: a saved diffusers unCLIP pipeline (StableUnCLIPImg2ImgPipeline)
    # in place of that generator; M̂ then regresses its CLIP image embedding (modeling/unclip.py).
    generator_pipeline: str | None = None
    gumbel_tau: float = 1.0


def parse_section(cls: type, value: Any, where: str) -> Any:
    """A section from a plain dict (a checkpoint's hyper-parameters, a test), checked like the CLI does."""
    if isinstance(value, cls):
        return value
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--section", type=cls)
    try:
        return parser.instantiate_classes(parser.parse_object({"section": value or {}})).section
    except Exception as err:  # jsonargparse names the offending key; add where it sits
        raise ValueError(f"{where}: {err}") from None


def kwargs_of(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
