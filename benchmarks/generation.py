"""Generation speed with and without the KV caches, on the same prompts and the same random model.

    python benchmarks/generation.py                      # tiny shape, CPU (about 2 minutes on 2 cores)
    python benchmarks/generation.py --preset paper       # 7B LLM + 48-layer decoder, random bf16, GPU

Text-to-image is the whole path of `generation.generate` with `start_image`: the LLM emits `<img>`, 32
morph tokens and `</img>`, the decoder emits 256 VQGAN codes from M̂, and the VQGAN draws the pixels.
Captioning is the LLM alone: an image and an instruction in, `--caption-tokens` tokens out. All run
(a) recomputing the whole sequence at every step (`cache="none"`), (b) with the dynamic KV caches of the
LLM and the decoder (what the project runs), (c) with static KV caches (allocated for the whole sequence,
written in place) and each one-step function under `torch.compile` (CUDA graphs on CUDA). (c) compiles
on the first call of each shape: that warm-up is timed apart from the steady-state call. Greedy
decoding, so all emit the same tokens (checked: exactly in float32; in bf16 kernels that round
differently part near-tied logits, so differences are counted and reported rather than fatal). The
random LLM's end token is masked so that every row generates the same number of tokens.

On a GPU the batch-1 text-to-image times are also set beside their memory-bandwidth floor: every weight
of the LLM read once per LLM step and every weight of the decoder once per code.
"""

from __future__ import annotations

import argparse
import time

import torch

from morph_lightning.generation import generate
from morph_lightning.modeling.model import GenerationOutput, MorphModel
from morph_lightning.modeling.sequence import ImageRef, Sample

WORDS = "a the red small dog runs over green field near two old houses under blue sky with cloud".split()
# HBM bandwidth in bytes/s by device name, for the floor (public spec sheets, SXM parts).
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
PRESETS = {
    "tiny": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024, "vocab": None, "codebook": 1024,
             "decoder_layers": 4, "decoder_width": 256, "decoder_heads": 4, "vqgan_resolution": 32,
             "vqgan_ch_mult": [1, 2], "vqgan_ch": 16, "vqgan_z": 8, "n_embed": 1024},
    # Vicuna-7B's shape; the released decoder (48 x 1536, 24 heads); VQGAN f16 with 16,384 codes.
    "paper": {"hidden": 4096, "layers": 32, "heads": 32, "intermediate": 11008, "vocab": 32000,
              "codebook": 8192, "decoder_layers": 48, "decoder_width": 1536, "decoder_heads": 24,
              "vqgan_resolution": 256, "vqgan_ch_mult": [1, 1, 2, 2, 4], "vqgan_ch": 128, "vqgan_z": 256,
              "n_embed": 16384},
}  # fmt: skip


def build_model(p: dict, device: str, dtype: str) -> MorphModel:
    """A random model of preset `p`; vision tower and Q-former tiny (they run once per prompt)."""
    llm_config = {
        "model_type": "llama",
        "hidden_size": p["hidden"],
        "intermediate_size": p["intermediate"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "max_position_embeddings": 4096,
    }
    if p["vocab"]:
        llm_config["vocab_size"] = p["vocab"]
    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    vqgan = {
        "ch": p["vqgan_ch"],
        "ch_mult": p["vqgan_ch_mult"],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "resolution": p["vqgan_resolution"],
        "z_channels": p["vqgan_z"],
        "embed_dim": p["vqgan_z"],
        "n_embed": p["n_embed"],
        "norm_groups": 8,
    }
    cfg = {
        "vision": {"backend": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "image_size": 32,
                   "model_kwargs": vit},
        "qformer": {"num_queries": 32, "dim": 32, "depth": 1, "num_heads": 2},
        "quantizer": {"codebook_size": p["codebook"], "dim": 16},
        "llm": {"name_or_path": None, "config": llm_config, "lora_r": 0},
        "decoder": {"n_layer": p["decoder_layers"], "n_head": p["decoder_heads"],
                    "n_embd": p["decoder_width"]},
        "vqgan": vqgan,
    }  # fmt: skip
    model = MorphModel(cfg).eval().to(device=device, dtype=getattr(torch, dtype))
    eos = model.llm.tokenizer.eos_token_id
    head = model.llm.head

    def no_end(hidden: torch.Tensor, text: bool = True) -> torch.Tensor:  # every row: as many tokens
        logits = head(hidden, text)
        logits[..., eos] = float("-inf")
        return logits

    model.llm.head = no_end
    return model


def timed(fn, device: str) -> tuple[float, object]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def differences(a: GenerationOutput, b: GenerationOutput) -> str:
    """Empty when a and b hold the same texts and, image for image, the same pixels (the same codes
    through the same VQGAN); else how many differ."""
    texts = sum(x != y for x, y in zip(a.texts, b.texts, strict=True))
    if a.images != b.images:
        return f"{texts} of {len(a.texts)} texts differ, and which rows drew images"
    images = 0 if a.pixels is None else int((a.pixels != b.pixels).flatten(1).any(1).sum())
    return f"{texts} of {len(a.texts)} texts and {images} images differ" if texts or images else ""


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--batch", type=int, default=None, help="the large batch (default 64 on CUDA, 16 on CPU)"
    )
    parser.add_argument("--caption-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, help="override the preset's LLM width (and decoder width)")
    parser.add_argument("--layers", type=int, help="override the preset's LLM and decoder depth")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="(c) with its static caches, not compiled (quick: the tests)",
    )
    args = parser.parse_args(argv)
    static = "static" if args.no_compile else "static+compile"
    systems = {"recompute": {"cache": "none"}, "KV cache": {"cache": "dynamic"},
               static: {"cache": "static", "compile": not args.no_compile}}  # fmt: skip
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    big = args.batch or (64 if cuda else 16)  # 16 on CPU keeps the recompute baseline near a minute
    preset = dict(PRESETS[args.preset])
    if args.hidden:
        preset.update(hidden=args.hidden, intermediate=4 * args.hidden, decoder_width=args.hidden)
    if args.layers:
        preset.update(layers=args.layers, decoder_layers=args.layers)
    torch.manual_seed(0)
    model = build_model(preset, args.device, dtype)
    n_codes = model.decoder.config.n_codes
    greedy = {"temperature": 0.0, "image_temperature": 0.0}
    t2i_steps = model.num_tokens + 2  # <img>, the morph tokens, </img>

    def prompts(n: int) -> list[Sample]:
        return [Sample(prompt=[f"USER: {' '.join(WORDS[k % 7 : k % 7 + 6])} Generate an image. ASSISTANT:"])
                for k in range(n)]  # fmt: skip

    def caption_prompts(n: int) -> list[Sample]:
        return [
            Sample(prompt=["USER: ", ImageRef(k), " A short image caption: ASSISTANT:"]) for k in range(n)
        ]

    pixels = torch.randn(big, 3, 32, 32, dtype=getattr(torch, dtype))

    def run(task: str, batch: int, system: str) -> GenerationOutput:
        if task == "text-to-image":
            return generate(
                model,
                prompts(batch),
                max_new_tokens=t2i_steps,
                start_image=True,
                **systems[system],
                **greedy,
            )
        return generate(
            model, caption_prompts(batch), pixels[:batch], max_new_tokens=args.caption_tokens,
            **systems[system], **greedy,
        )  # fmt: skip

    run("text-to-image", 1, "KV cache")  # warm-up (first CUDA kernels, the allocator)
    results: dict[str, float] = {}
    rows, warmups = [], []
    for task, batch in (("text-to-image", 1), ("text-to-image", big), ("captioning", big)):
        outs = {}
        for system, options in systems.items():
            if options.get("compile"):  # the first call of a shape compiles (and records the CUDA graphs)
                seconds, _ = timed(lambda: run(task, batch, system), args.device)  # noqa: B023
                warmups.append((task, batch, seconds))
            seconds, outs[system] = timed(lambda: run(task, batch, system), args.device)  # noqa: B023
            if task == "text-to-image":
                rate = batch / seconds
                rows.append(
                    (task, batch, system, seconds, f"{rate:9.2f} images/s {seconds / batch:8.3f} s/image")
                )
            else:
                rate = batch * args.caption_tokens / seconds
                rows.append((task, batch, system, seconds, f"{rate:9.1f} tokens/s"))
            results[f"{task} {batch} {system}"] = rate
        for system in ("KV cache", static):
            if differ := differences(outs["recompute"], outs[system]):
                differ = f"{task} batch {batch}, {system} against recompute: {differ}"
                if dtype == "float32":
                    raise AssertionError(differ)
                # e.g. inductor keeps fused pointwise chains in float32 where eager rounds each op
                print(f"warning: {differ} (kernels that round {dtype} differently part near-tied logits)")

    shape = f"LLM {preset['hidden']} x {preset['layers']}, decoder {preset['decoder_width']} x "
    shape += f"{preset['decoder_layers']}, {model.num_tokens} morph tokens, {n_codes} codes"
    print(f"preset {args.preset}: {shape}, {args.device} {dtype}")
    print(f"{'task':14} {'batch':>5} {'system':14} {'seconds':>8}  rate")
    for task, batch, system, seconds, rate in rows:
        print(f"{task:14} {batch:5d} {system:14} {seconds:8.2f} {rate}")
    for task, batch, seconds in warmups:
        print(f"{task:14} {batch:5d} {'compile':14} {seconds:8.2f} first {static} call (warm-up)")
    if cuda:
        name = torch.cuda.get_device_name()
        bandwidth = next((bw for key, bw in BANDWIDTH.items() if key in name), None)
        if bandwidth:
            floor = (weight_bytes(model.llm) * t2i_steps + weight_bytes(model.decoder) * n_codes) / bandwidth
            for system in ("KV cache", static):
                measured = 1 / results[f"text-to-image 1 {system}"]
                print(f"batch-1 text-to-image, {system}: {measured:.2f} s, bandwidth floor {floor:.2f} s on "
                      f"{name}: {measured / floor:.2f}x the floor")  # fmt: skip
    for batch in (1, big):
        speedup = results[f"text-to-image {batch} KV cache"] / results[f"text-to-image {batch} recompute"]
        results[f"speed-up {batch}"] = speedup
    results["speed-up captioning"] = (
        results[f"captioning {big} KV cache"] / results[f"captioning {big} recompute"]
    )
    print(f"text-to-image batch 1: {results['speed-up 1']:.2f}x; captioning batch {big}: "
          f"{results['speed-up captioning']:.2f}x")  # fmt: skip
    keys = ("text-to-image 1", f"text-to-image {big}", f"captioning {big}")
    for key in keys:
        results[f"{static} vs KV cache, {key}"] = results[f"{key} {static}"] / results[f"{key} KV cache"]
    ratios = ", ".join(f"{key} {results[f'{static} vs KV cache, {key}']:.2f}x" for key in keys)
    print(f"{static} vs KV cache (steady state): {ratios}")
    # The headline is text-to-image at the large batch, where images/s is measured.
    print(f"generation speed-up vs recompute: {results[f'speed-up {big}']:.2f}x")
    return results


if __name__ == "__main__":
    main()
