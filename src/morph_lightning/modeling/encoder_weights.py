"""Start the morph-token encoder from pretrained weights, by key: BLIP-2's Q-former or SEED's tokenizer.

Sources (the paper never trains the encoder from random: the released code loads a pretrained Q-former
before stage 1, and its `encode_task_layer` and 8,192 x 32 quantizer follow SEED's tokenizer):
- a transformers BLIP-2 directory (`save_pretrained` of `Blip2Model`, `Blip2ForConditionalGeneration`,
  ...): `query_tokens`, `qformer.*`, and `vision_model.post_layernorm` as the Q-former's `ln_vision`;
- a transformers `Blip2QFormerModel` directory: its keys carry no prefix (no query tokens there);
- a LAVIS-layout file: SEED's `seed_quantizer.pt` (a flat state dict) or LAVIS's BLIP-2 checkpoints
  (`{"model": state_dict}`): `query_tokens`, `ln_vision.*`, `Qformer.bert.*` and, SEED's only,
  `encode_task_layer.*` and `quantize.embedding.weight`. The released Morph-Tokens encoder uses the same
  layout (names read from its code: `slotattention` sublayers, `quantizer.embedding_weight`); its
  per-head deconfounder has no counterpart here and starts fresh.
Everything is read without unpickling anything but tensors (`weights_only`, safetensors). Encoder
weights that the source lacks (the paper's additions: deconfounders, added slot attention; the codebook
from BLIP-2) keep their fresh start and are listed; source keys the encoder has no place for are counted.
A key with the wrong shape stops the load, naming the file, the key and both shapes.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

log = logging.getLogger(__name__)

# LAVIS / SEED key -> this encoder's key (first match wins; `None` drops the key as unused).
LAVIS_RULES: list[tuple[str, str | None]] = [
    (r"^query_tokens$", "qformer.query_tokens"),
    (r"^ln_vision\.", "qformer.ln_vision."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (
        r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention|slotattention)\.self\.",
        r"qformer.encoder.layer.\1.\2.attention.",
    ),
    (r"^Qformer\.bert\.encoder\.", "qformer.encoder."),
    (r"^encode_task_layer\.", "encode_task_layer."),
    (r"^quantize\.embedding\.weight$", "quantizer.embedding.weight"),
    (r"^quantizer\.embedding_weight$", "quantizer.embedding.weight"),  # the released Morph-Tokens code
]
# transformers' BLIP-2 (whole model) -> this encoder's key.
HF_BLIP2_RULES: list[tuple[str, str | None]] = [
    (r"^query_tokens$", "qformer.query_tokens"),
    (r"^vision_model\.post_layernorm\.", "qformer.ln_vision."),
    (r"^qformer\.(layernorm|encoder)\.", r"qformer.\1."),
]
# transformers' Blip2QFormerModel alone: the same names without the `qformer.` prefix.
HF_QFORMER_RULES: list[tuple[str, str | None]] = [(r"^(layernorm|encoder)\.", r"qformer.\1.")]


# This encoder's key -> SEED's (what `save_encoder_weights` writes; `LAVIS_RULES` reads it back).
# The deconfounder and added slot attention keep their own names under `Qformer.bert.encoder.`.
SEED_EXPORT_RULES: list[tuple[str, str | None]] = [
    (r"^qformer\.query_tokens$", "query_tokens"),
    (r"^qformer\.ln_vision\.", "ln_vision."),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (
        r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention|slotattention)\.attention\.",
        r"Qformer.bert.encoder.layer.\1.\2.self.",
    ),
    (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
    (r"^encode_task_layer\.", "encode_task_layer."),
    (r"^quantizer\.embedding\.weight$", "quantize.embedding.weight"),
]


@dataclass
class EncoderLoadReport:
    source: str  # "blip2", "blip2_qformer" or "lavis"
    loaded: list[str] = field(default_factory=list)  # encoder keys written from the file
    fresh: list[str] = field(default_factory=list)  # encoder parameters the file does not have
    unused: list[str] = field(default_factory=list)  # file keys the encoder has no place for


def map_keys(keys: list[str], rules: list[tuple[str, str | None]]) -> dict[str, str | None]:
    """Each source key -> the encoder key it loads into, or None when no rule takes it."""
    out: dict[str, str | None] = {}
    for key in keys:
        out[key] = None
        for pattern, target in rules:
            if re.search(pattern, key):
                out[key] = None if target is None else re.sub(pattern, target, key)
                break
    return out


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> EncoderLoadReport:
    """Copy a BLIP-2 or SEED checkpoint's weights into `encoder` (a `MorphEncoder`), by key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.is_dir():
        source, rules = _hf_source(path)
        tensors = _read_hf_dir(path, rules)
    else:
        source, rules = "lavis", LAVIS_RULES
        tensors = _read_lavis_file(path)
    mapping = map_keys(list(tensors), rules)
    own = encoder.state_dict()
    report = EncoderLoadReport(source=source)
    with torch.no_grad():
        for key, target in mapping.items():
            if target is None or target not in own:
                report.unused.append(key)
                continue
            value = tensors[key]
            if value.shape != own[target].shape:
                raise ValueError(
                    f"{path}: key {key!r} has shape {tuple(value.shape)}, the encoder's {target!r} has "
                    f"{tuple(own[target].shape)}; the Q-former/quantizer sizes in the config must match it"
                )
            own[target].copy_(value.to(own[target].dtype))
            report.loaded.append(target)
    if not report.loaded:
        raise ValueError(
            f"{path}: no key of this {source} checkpoint fits the encoder (is it the right file?)"
        )
    done = set(report.loaded)
    report.fresh = [name for name, _ in encoder.named_parameters() if name not in done]
    log.info(
        "encoder weights from %s (%s): %d tensors loaded, %d parameters start fresh (%s), %d keys unused",
        path,
        source,
        len(report.loaded),
        len(report.fresh),
        ", ".join(report.fresh) or "none",
        len(report.unused),
    )
    return report


def _hf_source(path: Path) -> tuple[str, list[tuple[str, str | None]]]:
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: a directory of encoder weights needs a transformers config.json")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type == "blip-2":
        return "blip2", HF_BLIP2_RULES
    if model_type == "blip_2_qformer":
        return "blip2_qformer", HF_QFORMER_RULES
    raise ValueError(f"{config}: model_type {model_type!r} is neither 'blip-2' nor 'blip_2_qformer'")


def _read_hf_dir(path: Path, rules: list[tuple[str, str | None]]) -> dict[str, Tensor]:
    """The tensors that a rule takes from a transformers directory (safetensors, sharded or not, or a
    `pytorch_model.bin`); a whole BLIP-2 also holds its LLM, which is never read."""

    def wanted(key: str) -> bool:
        return any(re.search(pattern, key) for pattern, _ in rules)

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if wanted(k)}
    else:
        raise ValueError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    tensors = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if wanted(key):
                    tensors[key] = f.get_tensor(key)
    return tensors


def _read_lavis_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # LAVIS's {"model": ...} wrapper
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return state


def save_encoder_weights(encoder: nn.Module, path: str | Path) -> Path:
    """Write `encoder`'s weights as SEED's tokenizer holds them (LAVIS names), as safetensors, so a
    pretrained world encoder loads through `encoder_init` exactly as SEED's file does. The confounder
    dictionary and code-usage statistics are left out: the dictionary is copied from the VQGAN codebook
    when the model is built."""
    state = encoder.state_dict()
    mapping = map_keys(list(state), SEED_EXPORT_RULES)
    out = {target: state[key].detach().cpu().contiguous() for key, target in mapping.items() if target}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
