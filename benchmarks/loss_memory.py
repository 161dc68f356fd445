"""Memory and time of the LM loss: the head and its cross-entropy over all positions at once, against
`llm.loss_chunk` positions at a time (each chunk's logits recomputed in backward instead of kept).

    python benchmarks/loss_memory.py                       # CPU, about 2 minutes on 2 cores
    python benchmarks/loss_memory.py --hidden 4096 --device cuda --dtype bfloat16    # Vicuna-7B's head

The head has Vicuna's 32,000 text rows + <img>, </img>, <Emp> + 8,192 morph rows = 40,195, as in the
paper's stages. One forward and backward of `MorphLLM` (a one-layer LLaMA stack: the stack's own
memory is not what is compared) over one packed row of `--tokens` labelled positions, the new rows
trainable and the hidden states needing their gradient, as under LoRA. Each setting runs in a fresh
process: on CPU the step's peak is the rise of the process's peak resident memory over what it held
before the step; on CUDA, the peak allocated memory of the step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from morph_lightning.modeling.llm import MorphLLM

TEXT_ROWS, MORPH_ROWS = 32_000, 8_192


def save_tokenizer(path: str) -> None:
    """A word-level tokenizer of Vicuna's 32,000 text ids (only its size matters here)."""
    words = {f"w{i}": i for i in range(TEXT_ROWS)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")), unk_token="w0", eos_token="w1"
    )
    tok.save_pretrained(path)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one_step(args: argparse.Namespace, tokenizer: str, chunk: int | None) -> tuple[float, int, float]:
    """(seconds, the step's peak bytes, the loss) of one forward and backward."""
    torch.manual_seed(0)
    config = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.hidden,
              "num_hidden_layers": 1, "num_attention_heads": args.hidden // 128, "vocab_size": TEXT_ROWS,
              "max_position_embeddings": args.tokens}  # fmt: skip
    dtype = getattr(torch, args.dtype)
    llm = MorphLLM(None, config, tokenizer, MORPH_ROWS, lora_r=0, loss_chunk=chunk).to(args.device, dtype)
    embeds = torch.randn(1, args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, llm.vocab.size, (1, args.tokens), device=args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = peak_rss()
    start = time.perf_counter()
    out = llm(embeds, labels=labels)
    loss = out.token_ce.mean()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before if cuda else peak_rss() - before
    return seconds, peak, float(loss.detach())


def in_fresh_process(argv: list[str], tokenizer: str, chunk: int | None) -> tuple[float, int, float]:
    """`one_step` in a new interpreter, so that its peak is its own."""
    cmd = [sys.executable, __file__, *argv, "--tokenizer", tokenizer, "--one-step", str(chunk or 0)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"loss_chunk {chunk}: the step failed: {done.stderr.strip()[-2000:]}")
    seconds, peak, loss = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, peak, loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=1024, help="the LLM's width (Vicuna-7B: 4096)")
    parser.add_argument("--tokens", type=int, default=4096, help="labelled positions in the row")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256], help="loss_chunk values")
    parser.add_argument("--one-step", type=int, help=argparse.SUPPRESS)  # a child: this chunk (0: whole)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.one_step is not None:
        print(json.dumps(one_step(args, args.tokenizer, args.one_step or None)))
        return {}

    with tempfile.TemporaryDirectory() as tokenizer:
        save_tokenizer(tokenizer)
        runs = {chunk: in_fresh_process(argv, tokenizer, chunk) for chunk in [None, *args.chunks]}
    print(f"head {TEXT_ROWS + 3 + MORPH_ROWS} rows x {args.hidden}, {args.tokens} labelled positions, "
          f"{args.device} {args.dtype}")  # fmt: skip
    print(f"{'loss_chunk':>10} {'seconds':>8} {'peak GiB':>9} {'loss':>9}")
    whole_seconds, whole_peak, whole_loss = runs[None]
    for chunk, (seconds, peak, loss) in runs.items():
        print(f"{chunk or 'whole':>10} {seconds:8.2f} {peak / 2**30:9.3f} {loss:9.5f}")
        if abs(loss - whole_loss) > 1e-3 * abs(whole_loss):
            raise AssertionError(f"loss_chunk {chunk}: loss {loss} against {whole_loss} whole")
    smallest = min(args.chunks, key=lambda c: runs[c][1])
    ratio = whole_peak / max(runs[smallest][1], 1)
    slower = runs[smallest][0] / whole_seconds
    print(f"loss memory, chunked ({smallest}) vs whole: {ratio:.2f}x less, {slower:.2f}x the time")
    return {"memory ratio": ratio, "time ratio": slower}


if __name__ == "__main__":
    main()
