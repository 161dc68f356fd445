"""Export a trained MorphModel into files other tools read, and rebuild it from them for inference.

An export directory holds (see docs/export.md):

    morph_config.json   the MorphModel config as plain JSON, paths pointing into the export, and `files`
    morph.safetensors   what training made that is not the base LLM: encoder, decoder, the LLM's new rows
    tokenizer/          the LLM's tokenizer with <img>, </img>, <Emp> and the morph tokens added
    adapter/            the LoRA adapter in peft's format, with the new tokens' rows and the tokenizer
                        (`AutoPeftModelForCausalLM.from_pretrained("adapter")`)
    llm_base/           the base LLM, only when its source cannot rebuild it (random, trained, or copied)
    llm_merged/         (--merged) the LLM with LoRA merged in and the new tokens' rows, with the tokenizer
                        (`AutoModelForCausalLM`)
    vision.safetensors  vqgan.safetensors: the frozen towers, when copied; otherwise their sources are named

Everything is read back with safetensors and json: nothing is unpickled.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from morph_lightning.modeling.llm import MorphLLM
from morph_lightning.modeling.model import MorphModel
from morph_lightning.stages.base import MorphStage

CONFIG_FILE = "morph_config.json"
FORMAT_VERSION = 1
# The modules training makes that the base LLM does not hold; morph.safetensors keys start with these.
TRAINED_PARTS = ("encoder", "decoder", "llm.new_embed", "llm.morph_in", "llm.new_head")
# peft saves adapter keys as seen from a PeftModel, which wraps the HF model as `base_model.model`.
PEFT_KEY_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# How peft's trainable tokens (`LoraConfig.trainable_token_indices`) name the rows they replace.
TOKEN_ROWS_KEY = "token_adapter.trainable_tokens_delta"


# ---- export ------------------------------------------------------------------------------------------
def export_model(
    source: str | os.PathLike | MorphStage | MorphModel,
    out_dir: str | os.PathLike,
    merged: bool = False,
    copy_towers: bool = False,
    base_model: str | None = None,
) -> Path:
    """Write `source` (a stage checkpoint, a stage or a model) as an export directory; returns its path.

    `merged` adds `llm_merged/`; `copy_towers` copies the frozen towers and the base LLM in, so that
    the export needs nothing outside it (parts without a source to rebuild them are always copied).
    `base_model` (a hub id or path) names the base LLM where it will be found instead of where it is
    now: in `adapter/adapter_config.json`, and in morph_config.json for a base that is not copied."""
    model = _as_model(source)
    if model.pre_mllm != "morph" or model.post_mllm in ("vqgan", "embedding"):
        raise ValueError(
            f"export: the format holds a morph codebook and a decoder of M̂, which pre_mllm: "
            f"{model.pre_mllm}, post_mllm: {model.post_mllm} lacks: evaluate this row from its checkpoint "
            "(--checkpoint)"
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"export: {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(model.config)  # plain containers: json-able
    config["encoder_init"] = None  # the trained encoder is in morph.safetensors
    files: dict[str, str | None] = {"morph": "morph.safetensors", "tokenizer": "tokenizer"}

    save_file(_for_saving(_parts_state(model, TRAINED_PARTS)), out / files["morph"])
    model.llm.tokenizer.save_pretrained(out / files["tokenizer"])
    config["llm"]["tokenizer"] = files["tokenizer"]
    llm_files, rows_in = _export_llm(model, config["llm"], out, merged, copy_towers, base_model)
    files.update(llm_files)
    files.update(_export_towers(model, config, out, copy_towers))

    vocab = model.vocab
    new_tokens = {"first_id": vocab.text_size, "count": vocab.num_new, "rows_in": rows_in}
    manifest = {"format_version": FORMAT_VERSION, "model": config, "files": files, "new_tokens": new_tokens}
    (out / CONFIG_FILE).write_text(json.dumps(manifest, indent=2))  # last: marks the export complete
    return out


def _as_model(source: str | os.PathLike | MorphStage | MorphModel) -> MorphModel:
    if isinstance(source, MorphModel):
        return source
    if isinstance(source, MorphStage):
        return source.model
    return model_from_checkpoint(source)


def model_from_checkpoint(path: str | os.PathLike) -> MorphModel:
    """The MorphModel of a stage checkpoint: built from its `hyper_parameters["model"]`, frozen towers
    from their sources where the checkpoint leaves them out."""
    try:  # mmap: only the hyper-parameters are needed here
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"export: cannot read checkpoint {path}: {err}") from None
    config = ckpt.get("hyper_parameters", {}).get("model") if isinstance(ckpt, dict) else None
    if config is None:
        raise ValueError(f"export: {path} has no hyper_parameters['model'] (not a stage checkpoint)")
    # The checkpoint holds the trained encoder: its initial weights need not be read (nor exist here).
    config = {**config, "encoder_init": None}
    return MorphStage(model=config, init_from=str(path)).model  # init_from checks the weights' keys


def _export_llm(
    model: MorphModel,
    section: dict[str, Any],
    out: Path,
    merged: bool,
    copy_base: bool,
    base_model: str | None,
) -> tuple[dict[str, str | None], list[str]]:
    """The adapter, and the base and merged LLMs where asked or needed; rewrites `section` to match.
    Also returns the entries whose LLM holds the new tokens' rows (morph.safetensors always does)."""
    llm = model.llm
    files: dict[str, str | None] = {"adapter": None, "llm_base": None, "llm_merged": None}
    rows_in: list[str] = []
    rows = _new_rows(llm, model.encoder.quantizer.codebook)
    # A random base (`config`) or a trained one (`train_base`) exists nowhere but here.
    if copy_base or section["config"] is not None or section["train_base"]:
        files["llm_base"] = "llm_base"
        _without_lora(llm, merge=False).save_pretrained(out / "llm_base")
        # As given, like the config's own paths: peft reads a relative one from the working directory.
        base_name = str(out / files["llm_base"])
        section.update(name_or_path=files["llm_base"], config=None)
    else:
        base_name = section["name_or_path"]
        section["name_or_path"] = base_model or base_name
    if _has_lora(llm):
        files["adapter"] = "adapter"
        # peft's trainable tokens would tie a tied head's new rows to the input rows, which differ here.
        adapter_rows = None if _tied(llm.hf) else rows
        _save_adapter(llm, out / "adapter", base_model or base_name, adapter_rows)
        if adapter_rows is not None:
            rows_in.append(files["adapter"])
    if merged:
        files["llm_merged"] = "llm_merged"
        _merged_llm(llm, rows).save_pretrained(out / "llm_merged")
        llm.tokenizer.save_pretrained(out / "llm_merged")
        rows_in.append(files["llm_merged"])
    return files, rows_in


def _has_lora(llm: MorphLLM) -> bool:
    return "default" in getattr(llm.hf, "peft_config", {})


def _tied(hf: PreTrainedModel) -> bool:
    return hf.get_output_embeddings().weight is hf.get_input_embeddings().weight


@torch.no_grad()
def _new_rows(llm: MorphLLM, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output rows of the new tokens in id order, through `MorphLLM.embed` itself: a morph
    token's input row is `morph_in` of its codebook vector (the encoder's straight-through z_q is that
    vector in value, as generation feeds it)."""
    ids = torch.arange(llm.vocab.text_size, llm.vocab.size, device=codebook.device)
    inputs = llm.embed(ids[None], codebook[llm.vocab.codes(ids)][None])[0]
    return inputs, llm.new_head.weight.to(llm.hf.get_output_embeddings().weight.dtype)


def _save_adapter(
    llm: MorphLLM, adapter_dir: Path, base_name: str, rows: tuple[torch.Tensor, torch.Tensor] | None
) -> None:
    """peft's on-disk adapter: adapter_config.json and the LoRA weights under peft's key names. With
    `rows`, also the new tokens' embedding and head rows as peft's trainable tokens, and the tokenizer,
    whose length `AutoPeftModelForCausalLM` resizes the base to before the rows go in."""
    config: LoraConfig = copy.deepcopy(llm.hf.peft_config["default"])
    config.base_model_name_or_path = base_name
    config.inference_mode = True
    config.task_type = "CAUSAL_LM"  # PeftModel.from_pretrained then gives a PeftModelForCausalLM (generate)
    weights = {PEFT_KEY_PREFIX + k: v for k, v in get_peft_model_state_dict(llm.hf).items()}
    if rows is not None:
        ids = list(range(llm.vocab.text_size, llm.vocab.size))
        layers = (llm.hf.get_input_embeddings(), llm.hf.get_output_embeddings())
        names = [next(n for n, m in llm.hf.named_modules() if m is layer) for layer in layers]
        config.trainable_token_indices = dict.fromkeys(names, ids)
        for name, row in zip(names, rows, strict=True):
            weights[f"{PEFT_KEY_PREFIX}{name}.{TOKEN_ROWS_KEY}"] = row
        llm.tokenizer.save_pretrained(adapter_dir)
    config.save_pretrained(adapter_dir)
    save_file(_for_saving(weights), adapter_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def _without_lora(llm: MorphLLM, merge: bool) -> PreTrainedModel:
    """A copy of the HF model without LoRA layers, LoRA merged into its weights or left out (the base).

    LoRA sits in `llm.hf` in place, with no PeftModel to unload it: a PeftModel over a fresh model of the
    same config has the same modules, so it takes `llm.hf`'s state dict as it is, and peft merges or
    unloads that copy, leaving the model being exported untouched."""
    if not _has_lora(llm):
        return llm.hf
    fresh = AutoModelForCausalLM.from_config(llm.hf.config, dtype=llm.hf.dtype)
    peft_model = get_peft_model(fresh, copy.deepcopy(llm.hf.peft_config["default"]))
    peft_model.base_model.model.load_state_dict(llm.hf.state_dict(), strict=True)
    return peft_model.merge_and_unload() if merge else peft_model.unload()


def _merged_llm(llm: MorphLLM, rows: tuple[torch.Tensor, torch.Tensor]) -> PreTrainedModel:
    """A copy of the HF model with LoRA merged in and the new tokens' rows at their ids, so that it reads
    the extended tokenizer's ids on its own and scores them as the MorphModel's LLM does."""
    hf = _without_lora(llm, merge=True) if _has_lora(llm) else copy.deepcopy(llm.hf)
    vocab, embed, head = llm.vocab, hf.get_input_embeddings(), hf.get_output_embeddings()
    if _tied(hf):  # the new tokens' input and output rows differ: the head gets its own weight
        head.weight = nn.Parameter(head.weight.detach().clone())
        for config in (hf.config, hf.config.get_text_config()):
            config.tie_word_embeddings = False
    # A base vocabulary padded past its text tokens keeps its size: the new ids take padding rows.
    hf.resize_token_embeddings(max(embed.num_embeddings, vocab.size), mean_resizing=False)
    embed, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    with torch.no_grad():
        embed.weight[vocab.text_size : vocab.size] = rows[0]
        head.weight[vocab.text_size : vocab.size] = rows[1]
        if head.bias is not None:  # `new_head` has none
            head.bias[vocab.text_size : vocab.size] = 0
    return hf


def _export_towers(
    model: MorphModel, config: dict[str, Any], out: Path, copy_all: bool
) -> dict[str, str | None]:
    """Copies a frozen tower in when asked, when it has no source (random) or when it was trained;
    otherwise the config keeps naming its source."""
    vision, files = config["vision"], {"vision": None, "vqgan": None}
    if copy_all or not vision["frozen"] or not (vision["pretrained"] or vision["checkpoint_path"]):
        files["vision"] = "vision.safetensors"
        save_file(_for_saving(model.vision.state_dict()), out / files["vision"])
        vision.update(pretrained=False, checkpoint_path=None)
        if vision["backend"] == "transformers":  # rebuilt from its config, which the source held
            vision["model_kwargs"] = model.vision.model.config.to_diff_dict()
    if copy_all or config["vqgan_checkpoint"] is None:
        files["vqgan"] = "vqgan.safetensors"
        save_file(_for_saving(model.vqgan.state_dict()), out / files["vqgan"])
        config["vqgan_checkpoint"] = None
    return files


def _parts_state(model: nn.Module, parts: Iterable[str]) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v for p in parts for k, v in model.get_submodule(p).state_dict().items()}


def _for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


# ---- load --------------------------------------------------------------------------------------------
def load_exported(
    export_dir: str | os.PathLike,
    form: Literal["adapter", "merged"] = "adapter",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> MorphModel:
    """Rebuild the MorphModel of an export for inference (eval mode, no gradients).

    `form`: "adapter" puts the LoRA adapter on the base LLM; "merged" loads `llm_merged/`. `dtype`: the
    LLM's (as `llm.dtype` in a config; None keeps the exported one); the rest stays as it was trained."""
    out = Path(export_dir)
    manifest = _read_manifest(out / CONFIG_FILE)
    config, files = manifest["model"], manifest["files"]
    llm = config["llm"]
    llm["tokenizer"] = str(_inside(out, files.get("tokenizer"), "tokenizer"))
    if form == "merged":
        if not files.get("llm_merged"):
            raise ValueError(f"{out / CONFIG_FILE}: exported without llm_merged/ (export with --merged)")
        merged_dir = _inside(out, files["llm_merged"], "llm_merged")
        llm.update(name_or_path=str(merged_dir), config=None, lora_r=0, train_base=False)
    elif form == "adapter":
        if files.get("llm_base"):
            llm["name_or_path"] = str(_inside(out, files["llm_base"], "llm_base"))
    else:
        raise ValueError(f"load_exported: form must be 'adapter' or 'merged', got {form!r}")
    if dtype is not None:
        llm["dtype"] = str(dtype).removeprefix("torch.")
    morph = _inside(out, files.get("morph"), "morph")
    towers = {t: _inside(out, files[t], t) for t in ("vision", "vqgan") if files.get(t)}
    adapter = (
        _inside(out, files["adapter"], "adapter") if form == "adapter" and files.get("adapter") else None
    )

    model = MorphModel(config)
    _load_weights(model, morph, TRAINED_PARTS)
    for tower, path in towers.items():
        _load_weights(model.get_submodule(tower), path)  # a tower's file has the tower's own keys
    if adapter is not None:
        _load_adapter(model.llm, adapter)
    model.requires_grad_(False).eval()
    return model.to(device)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not an export directory?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}"
        )
    for key in ("model", "files"):
        if key not in manifest:
            raise ValueError(f"{path}: no `{key}` entry")
    return manifest


def _inside(out: Path, name: str | None, what: str) -> Path:
    """An entry of the export that `files` names, which must exist."""
    if not name:
        raise ValueError(f"{out / CONFIG_FILE}: `files` names no {what}")
    path = out / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the export ({what})")
    return path


def _load_weights(module: nn.Module, path: Path, parts: Iterable[str] | None = None) -> None:
    """Load a safetensors file into `parts` of `module` (all of it if None): keys and shapes must match."""
    weights = load_file(path)
    expected = module.state_dict() if parts is None else _parts_state(module, parts)
    _check_keys(path, weights.keys(), expected.keys())
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(weights[key].shape)}, the model {tuple(tensor.shape)}"
            )
    module.load_state_dict(weights, strict=False)  # strict over the parts: checked above


def _load_adapter(llm: MorphLLM, adapter_dir: Path) -> None:
    """peft's adapter files into the LoRA layers injected in `llm.hf`, after checking they agree."""
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / ADAPTER_WEIGHTS
    for path in (config_file, weights_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the export (adapter)")
    saved = _lora_shape(LoraConfig.from_pretrained(str(adapter_dir)))
    ours = _lora_shape(llm.hf.peft_config["default"])
    if saved != ours:
        raise ValueError(f"{config_file}: LoRA (r, alpha, targets) {saved}, but {CONFIG_FILE} says {ours}")
    weights = load_peft_weights(str(adapter_dir), device="cpu")  # safetensors: the file exists
    # The new tokens' rows are there for peft users; this model takes them from morph.safetensors.
    weights = {k: v for k, v in weights.items() if not k.endswith(TOKEN_ROWS_KEY)}
    _check_keys(
        weights_file, weights.keys(), {PEFT_KEY_PREFIX + k for k in get_peft_model_state_dict(llm.hf)}
    )
    try:
        set_peft_model_state_dict(llm.hf, weights)
    except RuntimeError as err:  # a shape mismatch
        raise ValueError(f"{weights_file}: {err}") from None


def _lora_shape(config: LoraConfig) -> tuple[int, float, list[str]]:
    return config.r, config.lora_alpha, sorted(config.target_modules)


def _check_keys(path: Path, got: Iterable[str], expected: Iterable[str]) -> None:
    got, expected = set(got), set(expected)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match the model: missing {len(missing)} {missing[:5]}, "
            f"unexpected {len(unexpected)} {unexpected[:5]}"
        )


# ---- command line ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> Path:
    """`python -m morph_lightning export --checkpoint CKPT --out DIR [--merged] [--copy-towers]
    [--base-model NAME]`"""
    parser = argparse.ArgumentParser(
        prog="python -m morph_lightning export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="a stage checkpoint (e.g. runs/stage3/last.ckpt)")
    parser.add_argument("--out", required=True, help="the export directory (new or empty)")
    parser.add_argument("--merged", action="store_true", help="also write llm_merged/ (LoRA merged in)")
    parser.add_argument(
        "--copy-towers",
        action="store_true",
        help="copy the vision tower, the VQGAN and the base LLM in: nothing outside the export is needed",
    )
    parser.add_argument(
        "--base-model",
        help="how the adapter (and morph_config.json, for a base not copied in) names the base LLM, "
        "when it will live elsewhere than now: a hub id or a path",
    )
    args = parser.parse_args(argv)
    out = export_model(
        args.checkpoint,
        args.out,
        merged=args.merged,
        copy_towers=args.copy_towers,
        base_model=args.base_model,
    )
    print(f"exported {args.checkpoint} to {out}")
    return out
