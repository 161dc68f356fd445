"""Training throughput: this project's stage-1/2 LLM step against plain transformers + peft, same samples.

    python benchmarks/train_throughput.py                              # tiny LLaMA on CPU, ~1 min on 2 cores
    python benchmarks/train_throughput.py --fused --compile --dtype bfloat16   # the optimisations, one by one
    python benchmarks/train_throughput.py --preset 7b --device cuda    # Vicuna-7B shape, random weights

Both systems train the same LLaMA-shaped LLM (random weights, nothing downloaded) with LoRA r=64 on
q_proj and v_proj (alpha 16, dropout 0.05: configs/stage1.yaml) on the same samples, those of
benchmarks/packing.py: caption pairs of 3-40 words skewed short as in CC3M, and LLaVA-like
conversations (a question and a 20-120 word answer), one image of 32 morph tokens each. The tokenizer
is a BPE learnt on those words (about one token a word, as Llama's gives English) padded with unused
ids to `--vocab` text tokens, so the head has vocab + 3 + codebook rows (40,195 for Vicuna-7B).

(a) transformers + peft, as the released code and most users do it: the morph tokens are vocabulary
    ids, `LlamaForCausalLM` with the new rows of embedding and head trainable (peft's
    `trainable_token_indices`), right-padded batches, the model's own loss, `torch.optim.AdamW`.
(b) this project: `build_sequences` with `pack_length` (packed rows, as `MorphStage.sequences` builds
    them), `MorphModel.run_llm`, `MorphStage.token_losses`, and the stage's optimiser and schedule
    (`configure_optimizers`). This LLM step is the same in stages 1 and 2.
Both get the same precomputed morph codes (the encoder is the same in both and not what is compared);
(b) gets them as straight-through vectors.

Rows are built (tokenised, padded or packed) before timing, as a data loader does; the time is that of
forward, loss, backward and optimiser step, after `--warmup` steps. Useful tokens are the non-padding
ones, the same in both (asserted). Two informative rows follow (no ratio): the full `Stage1AR` and
`Stage2AutoEncode` steps on caption batches, encoder (and stage 2's decoder) included, with tiny towers.

On CUDA, MFU = 6 N (useful tokens/s) / the GPU's dense bf16 peak, N the LLM's parameters less its
input embedding (a lookup). 6N per token is the usual estimate: with LoRA the frozen weights get no
weight gradient, but their input gradients still cost about 2N, and attention's T^2 term is left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from morph_lightning.modeling.sequence import IGNORE, Sample, SequenceBatch, build_sequences
from morph_lightning.modeling.text_tokenizer import train_bpe_tokenizer
from morph_lightning.modeling.tokens import MorphVocab, extend_tokenizer
from morph_lightning.stages import MorphStage, Stage1AR, Stage2AutoEncode
from morph_lightning.stages.schedule import warmup_cosine


def _load_packing():  # benchmarks/ is no package: load the sibling script for its sample mix
    spec = importlib.util.spec_from_file_location("packing_benchmark", Path(__file__).with_name("packing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_samples = _load_packing().make_samples

PRESETS = {
    # Vicuna-7B (LLaMA-7B) shape, the paper's 8,192 morph tokens; a batch's ~1,100 tokens in one row:
    # no padding, and the masked attention's T^2 is small next to a 7B's linear layers
    "7b": dict(
        hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000, codebook=8192, pack_length=2048
    ),
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}  # dense
LORA = {"lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_modules": ["q_proj", "v_proj"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a real model's shape (meant for a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="the LLM's weights (bf16: + autocast); default float32 on CPU")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, help="default hidden / 64")
    parser.add_argument("--intermediate", type=int, help="default hidden * 11008 / 4096, as LLaMA-7B")
    parser.add_argument("--vocab", type=int, default=2048, help="text tokens")
    parser.add_argument("--codebook", type=int, default=1024, help="morph tokens (the paper: 8192)")
    parser.add_argument("--morph-tokens", type=int, default=32, help="per image")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per system")
    # A batch's rows are padded to its longest, and SDPA computes the whole T x T of a packed row (the
    # other samples' part masked, not skipped): at the CPU shape rows a little longer than the longest
    # sample (~180 tokens) run faster than 512 or 1024.
    parser.add_argument("--pack-length", type=int, default=256, help="(b): tokens a row; 0: padded, as (a)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (2+ with --compile)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per system; the best counts")
    parser.add_argument("--full-batches", type=int, default=3, help="batches of the full stage rows; 0: none")
    parser.add_argument("--fused", action="store_true", help="(b): AdamW(fused=True), same groups")
    parser.add_argument("--compile", action="store_true", help="(b): torch.compile each decoder layer")
    parser.add_argument(
        "--attn", help="both: transformers' attn_implementation (flash_attention_2: varlen for packed rows)"
    )
    parser.add_argument("--seed", type=int, default=0)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:  # the preset's shape, explicit flags still win
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.pack_length = args.pack_length or None
    args.heads = args.heads or max(1, args.hidden // 64)
    args.intermediate = args.intermediate or args.hidden * 11008 // 4096
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.compile:
        args.warmup = max(args.warmup, 2)  # the second shape recompiles with dynamic shapes
    return args


# ---- the shared inputs ------------------------------------------------------------------------------
def save_tokenizer(samples: list[Sample], vocab: int, path: str) -> None:
    """A BPE learnt on the samples' words, padded with unused tokens to `vocab` text ids."""
    texts = [p for s in samples for p in s.prompt + s.answer if isinstance(p, str)]
    tok = train_bpe_tokenizer(texts, min(vocab, 1024))
    tok.add_tokens([f"<unused_{i}>" for i in range(vocab - len(tok))])
    tok.save_pretrained(path)


def hf_labels(seq: SequenceBatch) -> torch.Tensor:
    """build_sequences' labels are shifted (labels[t] is the id at t + 1); HF's loss shifts itself."""
    unshifted = torch.full_like(seq.labels, IGNORE)
    unshifted[:, 1:] = seq.labels[:, :-1]
    return unshifted


def check_same_tokens(padded: SequenceBatch, packed: SequenceBatch) -> None:
    """Both systems see the same ids and score the same targets, only laid out differently."""
    ids = [s.input_ids[s.attention_mask.bool()].sort().values for s in (padded, packed)]
    targets = [s.labels[s.labels != IGNORE].sort().values for s in (padded, packed)]
    assert torch.equal(*ids) and torch.equal(*targets), "padded and packed rows hold different tokens"


def morph_config(args: argparse.Namespace, tokenizer_dir: str) -> dict:
    """MorphModel: the LLM of both systems, tiny towers (only the full stage rows run them)."""
    llm = {
        "name_or_path": None,
        "tokenizer": tokenizer_dir,
        "config": {
            "model_type": "llama",
            "vocab_size": args.vocab,
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads,
            "max_position_embeddings": 4096,
        },
        "dtype": args.dtype,
        "train_base": False,
        "attn_implementation": args.attn,
        **LORA,
    }
    tiny = {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16}
    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    return {
        "vision": {"backend": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "image_size": 32,
                   "model_kwargs": vit},
        "qformer": {"num_queries": args.morph_tokens, "dim": 32, "depth": 1, "num_heads": 2},
        "quantizer": {"codebook_size": args.codebook, "dim": 32},
        "llm": llm,
        "decoder": {"n_layer": 1, "n_head": 2, "n_embd": 32},
        "vqgan": {**tiny, "z_channels": 8, "embed_dim": 8, "n_embed": 64, "norm_groups": 8},
    }  # fmt: skip


def llm_flops_params(args: argparse.Namespace, vocab: MorphVocab) -> int:
    """N for 6N per token: LLaMA's layers, final norm and head (the input embedding is a lookup)."""
    h = args.hidden
    layer = 4 * h * h + 3 * h * args.intermediate + 2 * h
    return args.layers * layer + h + h * vocab.size


def peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ---- the two systems --------------------------------------------------------------------------------
def build_hf(args: argparse.Namespace, vocab: MorphVocab) -> nn.Module:
    """(a): a plain LlamaForCausalLM whose vocabulary holds the new tokens, LoRA and token rows by peft."""
    config = LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=4096,
    )
    with torch.device(args.device):  # a 7B model is built where it runs
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
        )
    new = list(range(vocab.text_size, vocab.size))  # <img>, </img>, <Emp>, the morph tokens
    lora = LoraConfig(
        r=LORA["lora_r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        target_modules=LORA["lora_target_modules"],
        # The new rows train, the text rows stay: peft's TrainableTokens on the embedding and (untied,
        # as in Vicuna) the head.
        trainable_token_indices={"embed_tokens": new, "lm_head": new},
    )
    return get_peft_model(model, lora).to(args.device)


def build_stage(
    cls: type[MorphStage], args: argparse.Namespace, tokenizer_dir: str
) -> tuple[MorphStage, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(b): a stage with its own optimiser and schedule (the schedule reads only the step count)."""
    with torch.device(args.device):
        stage = cls(model=morph_config(args, tokenizer_dir), pack_length=args.pack_length)
    stage = stage.to(args.device).train()
    # all that warmup_cosine reads from a trainer; the benchmark's steps all fall in the warm-up
    stage.trainer = SimpleNamespace(estimated_stepping_batches=200_000)
    conf = stage.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    if args.fused:
        h = stage.hparams  # the same groups and settings, and the same schedule over them
        groups = [
            {"params": g["params"], "weight_decay": g["weight_decay"], "lr": g["initial_lr"]}
            for g in opt.param_groups
        ]
        opt = torch.optim.AdamW(groups, betas=tuple(h.betas), fused=True)
        sched = warmup_cosine(opt, stage.trainer, h.warmup_steps, h.min_lr_ratio)["lr_scheduler"]["scheduler"]
    if args.compile:  # layer by layer: one graph for all layers, the mask and head stay eager
        for layer in stage.model.llm.stack.layers:
            layer.compile()
    return stage, opt, sched


def timed(step: Callable[[int], None], batches: list[int], device: str) -> float:
    """Seconds of `step(i)` over the batches `i`, with the device's queue drained."""
    start = time.perf_counter()
    for i in batches:
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(step: Callable[[int], None], n: int, warmup: int, repeats: int, device: str) -> dict:
    """`warmup` untimed steps, then `repeats` timed passes over the `n` batches. The best pass counts:
    another process's load only ever slows a pass down."""
    warm = timed(step, [i % n for i in range(warmup)], device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    passes = [timed(step, list(range(n)), device) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    return {"seconds": min(passes, default=0.0), "passes": passes, "warmup": warm, "peak_gib": peak}


def counts(batches: list[SequenceBatch], samples: int) -> dict:
    return {
        "rows": sum(s.input_ids.shape[0] for s in batches),
        "total": sum(s.input_ids.numel() for s in batches),
        "useful": sum(int(s.attention_mask.sum()) for s in batches),  # non-padding tokens
        "samples": samples,
    }


def optimizer_step(
    loss: torch.Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler | None = None
) -> None:
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad()


def full_stage_step(
    stage: MorphStage,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    full: list[dict],
    args: argparse.Namespace,
    autocast: Callable[[], AbstractContextManager],
) -> dict:
    """The stage's own `losses` (encoder, LLM and, in stage 2, the decoder) + backward + step."""
    seen: list[SequenceBatch] = []
    build = stage.sequences

    def recording(*args, **kwargs) -> SequenceBatch:
        seen.append(seq := build(*args, **kwargs))
        return seq

    stage.sequences = recording  # counts the rows the stage builds itself

    def step(i: int) -> None:
        with autocast():
            loss = stage.losses(full[i])["loss"]
        optimizer_step(loss, opt, sched)

    r = measure(step, len(full), args.warmup, args.repeats, args.device)
    best = r["passes"].index(r["seconds"])  # the rows of the best pass
    rows = seen[args.warmup + best * len(full) : args.warmup + (best + 1) * len(full)]
    return r | counts(rows, sum(len(f["captions"]) for f in full))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dev, dtype = args.device, getattr(torch, args.dtype)
    on_cuda = dev.startswith("cuda")

    def autocast() -> AbstractContextManager:
        return torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    n = args.batch_size * args.batches
    samples = make_samples(n, random.Random(args.seed))
    chunks = [samples[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    tokenizer_dir = tempfile.mkdtemp(prefix="train_throughput_tok_")
    save_tokenizer(samples, args.vocab, tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = extend_tokenizer(tok, args.codebook)
    codes = torch.randint(0, args.codebook, (n, args.morph_tokens))  # refs index all samples' images

    # The same samples as rows of each system, on the device before timing (a data loader's work).
    padded = [build_sequences(c, codes, vocab, tok) for c in chunks]
    packed = [build_sequences(c, codes, vocab, tok, pack_length=args.pack_length) for c in chunks]
    for a, b in zip(padded, packed, strict=True):
        check_same_tokens(a, b)
    hf_batches = [(s.input_ids.to(dev), s.attention_mask.to(dev), hf_labels(s).to(dev)) for s in padded]
    morph_batches = [s.to(dev) for s in packed]

    # (a) transformers + peft
    model = build_hf(args, vocab).train()
    hf_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def hf_step(i: int) -> None:
        ids, mask, labels = hf_batches[i]
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer_step(loss, hf_opt)

    # (b) this project's LLM step (stages 1 and 2), fed the same codes as straight-through vectors
    stage, opt, sched = build_stage(Stage1AR, args, tokenizer_dir)
    z_q = torch.randn(n, args.morph_tokens, stage.model.encoder.code_dim, device=dev)
    enc = SimpleNamespace(ids=codes, z_q=z_q)

    def morph_step(i: int) -> None:
        seq = morph_batches[i]
        with autocast():
            out = stage.model.run_llm(seq, enc, with_loss=True)
            loss = stage.token_losses(out.token_ce, seq.labels)["ce"]
        optimizer_step(loss, opt, sched)

    results: dict[str, dict] = {}
    rows = f"packed {args.pack_length}" if args.pack_length else "padded"
    a, b = "transformers+peft", f"this project ({rows})"
    # Passes alternate between the systems, so that a slow spell of the machine hits both.
    steps = {a: hf_step, b: morph_step}
    warm = {k: timed(step, [i % args.batches for i in range(args.warmup)], dev) for k, step in steps.items()}
    passes: dict[str, list[float]] = {a: [], b: []}
    for _ in range(args.repeats):
        for k, step in steps.items():
            passes[k].append(timed(step, list(range(args.batches)), dev))
    for name, batches in ((a, padded), (b, packed)):
        results[name] = {"seconds": min(passes[name]), "passes": passes[name], "warmup": warm[name]}
        results[name] |= counts(batches, n)
    model = hf_opt = None  # (a) is done: free its memory
    if on_cuda:
        torch.cuda.empty_cache()

    # Informative: the whole stage steps on caption batches, towers included.
    if args.full_batches:
        captions = [s.answer[1] for s in samples if not s.prompt]
        full = []
        for i in range(0, min(len(captions), args.batch_size * args.full_batches), args.batch_size):
            caps = captions[i : i + args.batch_size]
            pixels = torch.randn(len(caps), 3, 32, 32, device=dev)  # the tiny towers' sizes
            full.append(
                {"captions": caps, "vision_pixels": pixels, "vqgan_pixels": pixels[..., ::2, ::2].tanh()}
            )
        results["stage 1 full step"] = full_stage_step(stage, opt, sched, full, args, autocast)
        stage = opt = sched = None  # one 7B at a time
        if on_cuda:
            torch.cuda.empty_cache()
        stage2 = build_stage(Stage2AutoEncode, args, tokenizer_dir)
        results["stage 2 full step"] = full_stage_step(*stage2, full, args, autocast)

    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    report(args, vocab, results)
    return results


def report(args: argparse.Namespace, vocab: MorphVocab, results: dict[str, dict]) -> None:
    peak = peak_tflops(args.device)
    flops_per_token = 6 * llm_flops_params(args, vocab)
    options = "".join(f", {o}" for o, on in (("fused AdamW", args.fused), ("compiled", args.compile)) if on)
    print(
        f"LLaMA {args.hidden} x {args.layers} layers, {args.heads} heads, FFN {args.intermediate}, "
        f"vocab {vocab.text_size} + 3 + {vocab.num_morph}, LoRA r={LORA['lora_r']} on q,v; "
        f"{args.device} {args.dtype}{options}; best of {args.repeats} passes"
    )
    head = f"{'system':32} {'rows':>5} {'tokens':>7} {'padding':>7} {'warm-up':>8} {'seconds':>8}"
    print(head + f" {'samples/s':>9} {'useful tok/s':>12}" + (f" {'MFU':>6}" if peak else ""))
    for name, r in results.items():
        tok_s = r["useful"] / r["seconds"]
        line = (
            f"{name:32} {r['rows']:5d} {r['total']:7d} {1 - r['useful'] / r['total']:7.1%} "
            f"{r['warmup']:8.2f} {r['seconds']:8.2f} {r['samples'] / r['seconds']:9.1f} {tok_s:12.0f}"
        )
        if peak:
            line += f" {flops_per_token * tok_s / (peak * 1e12):6.1%}"
        print(line)
    for name, r in results.items():
        memory = f", peak memory {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
        print(f"{name}: seconds per pass {' '.join(f'{t:.2f}' for t in r['passes'])}{memory}")
    if not args.device.startswith("cuda"):  # no per-step peak on CPU: the process's, all systems together
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"process peak memory (RSS, whole run): {rss:.2f} GiB")
    base, ours = list(results.values())[:2]
    ratio = (ours["useful"] / ours["seconds"]) / (base["useful"] / base["seconds"])
    results["speedup"] = {"ratio": ratio}
    print(f"train speed-up vs transformers+peft: {ratio:.2f}x")


if __name__ == "__main__":
    main()
