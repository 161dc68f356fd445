"""Useful tokens per second of packed vs padded training rows, on the same samples, side by side.

    PYTHONPATH=src python benchmarks/packing.py [--device cuda] [--hidden 1024 --layers 8]

Samples mix short stage-1 pairs (`<img> M </img>` + a caption of 3-40 words, skewed short as in
CC3M) with longer instruction conversations (an image, a question and a 20-120 word answer). Each
configuration runs the LLM forward and backward (cross-entropy on the answers) over the same
samples; "useful" tokens are the non-padding ones. A random Llama-architecture LLM stands in for
Vicuna, so no weights are needed.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import IGNORE, ImageRef, Sample, SequenceBatch, build_sequences

WORDS = "a the red small dog runs over green field near two old houses under blue sky with cloud".split()


def make_samples(n: int, rng: random.Random) -> list[Sample]:
    samples = []
    for i in range(n):
        if rng.random() < 0.7:  # a caption pair, lengths skewed short
            words = min(40, 3 + int(rng.expovariate(1 / 9)))
            samples.append(Sample(answer=[ImageRef(i), " " + " ".join(rng.choices(WORDS, k=words))]))
        else:
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 15)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))
            samples.append(
                Sample(prompt=["USER: ", ImageRef(i), f" {question}? ASSISTANT:"], answer=[" " + answer])
            )
    return samples


def build_model(args: argparse.Namespace) -> MorphModel:
    llm = {
        "name_or_path": None,
        "tokenizer": None,
        "config": {
            "model_type": "llama",
            "vocab_size": 259,
            "hidden_size": args.hidden,
            "intermediate_size": 4 * args.hidden,
            "num_hidden_layers": args.layers,
            "num_attention_heads": max(1, args.hidden // 64),
            "max_position_embeddings": 4096,
        },
        "lora_r": 8,
        "train_base": True,
    }
    tiny = {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16}
    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    cfg = {
        "vision": {"backend": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "image_size": 32,
                   "model_kwargs": vit},
        "qformer": {"num_queries": args.morph_tokens, "dim": 32, "depth": 1, "num_heads": 2},
        "quantizer": {"codebook_size": 256, "dim": 16},
        "llm": llm,
        "decoder": {"n_layer": 1, "n_head": 2, "n_embd": 32},
        "vqgan": {**tiny, "z_channels": 8, "embed_dim": 8, "n_embed": 64, "norm_groups": 8},
    }  # fmt: skip
    return MorphModel(cfg).to(args.device)


def train_step(model: MorphModel, seq: SequenceBatch, vectors: torch.Tensor) -> None:
    class Encoded:  # run_llm reads only the straight-through vectors
        z_q = vectors

    with torch.autocast(seq.input_ids.device.type, dtype=torch.bfloat16, enabled=seq.input_ids.is_cuda):
        out = model.run_llm(seq, Encoded)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), seq.labels.flatten(), ignore_index=IGNORE)
    loss.backward()


def measure(model: MorphModel, batches: list[SequenceBatch], vectors: torch.Tensor, device: str) -> dict:
    train_step(model, batches[0].to(device), vectors)  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for seq in batches:
        train_step(model, seq.to(device), vectors)
    sync()
    seconds = time.perf_counter() - start
    useful = sum(int(s.attention_mask.sum()) for s in batches)
    total = sum(s.input_ids.numel() for s in batches)
    rows = sum(s.input_ids.shape[0] for s in batches)
    return {"seconds": seconds, "useful": useful, "total": total, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--morph-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per padded batch")
    parser.add_argument("--pack-length", type=int, default=512)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args)
    rng = random.Random(0)
    n = args.batch_size * args.batches
    samples = make_samples(n, rng)
    codes = torch.randint(0, 256, (n, args.morph_tokens))
    vectors = torch.randn(n, args.morph_tokens, model.encoder.code_dim, device=args.device)
    vocab, tok = model.vocab, model.llm.tokenizer
    chunks = [samples[i : i + args.batch_size] for i in range(0, n, args.batch_size)]

    def batches(pack_length: int | None) -> list[SequenceBatch]:
        # refs index the whole sample list, so every chunk sees all codes
        return [build_sequences(c, codes, vocab, tok, pack_length=pack_length) for c in chunks]

    results = {"padded": measure(model, batches(None), vectors, args.device)}
    results[f"packed ({args.pack_length})"] = measure(model, batches(args.pack_length), vectors, args.device)
    print(f"{n} samples, LLM hidden {args.hidden} x {args.layers} layers, {args.device}")
    print(f"{'':16} {'rows':>6} {'tokens':>8} {'padding':>8} {'seconds':>8} {'useful tok/s':>13}")
    for name, r in results.items():
        pad = 1 - r["useful"] / r["total"]
        print(
            f"{name:16} {r['rows']:6d} {r['total']:8d} {pad:8.1%} {r['seconds']:8.2f} "
            f"{r['useful'] / r['seconds']:13.0f}"
        )
    base, packed = results.values()
    print(f"speed-up: {(packed['useful'] / packed['seconds']) / (base['useful'] / base['seconds']):.2f}x")
    return results


if __name__ == "__main__":
    main()
