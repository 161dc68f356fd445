"""Morph-token decoder: a GPT that autoregresses VQGAN codes conditioned on post-MLLM morph tokens.

The sequence is ``proj(M̂) ++ embed(X[:-1])``; the outputs at positions n_prefix-1 .. n_prefix+n_codes-2
predict X[0] .. X[n_codes-1] (Eq. 6 of the paper). The prefix is a continuous input, so gradients of the
reconstruction loss flow back through it into the LLM (LoRA) and the morph-token encoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from morph_lightning.modeling.sampling import sample_next

KV = tuple[Tensor, Tensor]  # one layer's (k, v), each [B, n_head, T, head_dim]
KVCache = list[KV]
CACHES = ("none", "dynamic", "static")


def compile_step(fn: Callable, device: torch.device) -> Callable:
    """`fn`, one decoding step, under `torch.compile`: CUDA graphs on CUDA ("reduce-overhead"), inductor's
    default elsewhere. A CUDA graph's outputs live in memory that its next replay overwrites, so on CUDA
    each call starts a new graph step and returns copies of the outputs (`fn` returns tensors, or None in
    place of one)."""
    if device.type != "cuda":
        return torch.compile(fn)
    fast = torch.compile(fn, mode="reduce-overhead")

    def step(*args: object) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        out = fast(*args)
        return tuple(None if t is None else t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    return step


@dataclass
class DecoderConfig:
    vocab_size: int = 16384  # VQGAN codebook size
    n_codes: int = 256  # codes per image (16x16 for a 256px f16 VQGAN)
    n_prefix: int = 32  # number of morph tokens |M|
    prefix_dim: int = 4096  # hidden size of the LLM that produces M̂
    n_layer: int = 48
    n_head: int = 24
    n_embd: int = 1536
    dropout: float = 0.0
    bias: bool = True

    @property
    def block_size(self) -> int:
        # The last code is only ever a target, never an input.
        return self.n_prefix + self.n_codes - 1


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, past: KV | None = None, pos: Tensor | None = None) -> tuple[Tensor, KV]:
        """x [B, T, C]; past: this layer's cached (k, v). Returns the output and the updated (k, v).

        With `pos` (x's positions, [T]) the cache is static: `past` holds buffers for the whole sequence,
        written in place at `pos`, so that every step has the same shapes."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask = None
        if pos is not None:
            past[0].index_copy_(2, pos, k)
            past[1].index_copy_(2, pos, v)
            k, v = past
            # Each position sees the filled ones up to itself, not the buffers' unwritten tail.
            mask = torch.arange(k.size(2), device=pos.device) <= pos.unsqueeze(1)
        elif past is not None:
            # SDPA's is_causal aligns the mask top-left, which is wrong once keys outnumber queries, so the
            # cached path is restricted to one new position, which may attend to every cached key.
            if T != 1:
                raise ValueError(f"cached attention takes one position at a time, got {T}")
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=past is None
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, past: KV | None = None, pos: Tensor | None = None) -> tuple[Tensor, KV]:
        a, kv = self.attn(self.ln_1(x), past, pos)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class MorphDecoder(nn.Module):
    """GPT decoder p(X | M̂) over VQGAN codes X with the morph tokens M̂ as a continuous prefix."""

    def __init__(
        self,
        vocab_size: int = 16384,
        n_codes: int = 256,
        n_prefix: int = 32,
        prefix_dim: int = 4096,
        n_layer: int = 48,
        n_head: int = 24,
        n_embd: int = 1536,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.config = config = DecoderConfig(
            vocab_size=vocab_size,
            n_codes=n_codes,
            n_prefix=n_prefix,
            prefix_dim=prefix_dim,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            dropout=dropout,
            bias=bias,
        )
        self.prefix_proj = nn.Linear(config.prefix_dim, config.n_embd, bias=config.bias)
        # LLM hidden states have a much larger scale than the code embeddings; normalise them to match.
        self.prefix_ln = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _embed_prefix(self, prefix: Tensor) -> Tensor:
        c = self.config
        if prefix.dim() != 3 or prefix.shape[1:] != (c.n_prefix, c.prefix_dim):
            raise ValueError(f"prefix must be [B, {c.n_prefix}, {c.prefix_dim}], got {tuple(prefix.shape)}")
        # The LLM may run in a different dtype (e.g. bf16 weights); the cast keeps the graph for gradients.
        return self.prefix_ln(self.prefix_proj(prefix.to(self.prefix_proj.weight.dtype)))

    def _run_blocks(
        self, x: Tensor, start: int | Tensor, cache: KVCache | None = None, static: bool = False
    ) -> tuple[Tensor, KVCache]:
        """Add positions start..start+T-1 to x [B, T, C], run every block, return ln_f output and (k, v)s.

        `static`: `cache` is `static_cache`'s buffers, written in place."""
        pos = start + torch.arange(x.size(1), device=x.device)
        x = self.drop(x + self.wpe(pos))
        new_cache: KVCache = []
        for i, block in enumerate(self.h):
            x, kv = block(x, None if cache is None else cache[i], pos if static else None)
            new_cache.append(kv)
        return self.ln_f(x), new_cache

    def _next_logits(
        self, x: Tensor, start: int | Tensor, cache: KVCache | None = None, static: bool = False
    ) -> tuple[Tensor, KVCache]:
        """The logits that follow x [B, T, C] at positions start.., and the (k, v)s."""
        x, cache = self._run_blocks(x, start, cache, static)
        return self.lm_head(x[:, -1]), cache

    def _static_step(self, x: Tensor, start: Tensor, cache: KVCache) -> Tensor:
        """`_next_logits` on a static cache, which it fills in place: the step that `compile` wraps."""
        return self._next_logits(x, start, cache, static=True)[0]

    def static_cache(self, batch: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """Every layer's (k, v) for the whole sequence, zeros of [batch, n_head, block_size, head_dim]."""
        c = self.config
        shape = (batch, c.n_head, c.block_size, c.n_embd // c.n_head)
        cache = [tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in "kv") for _ in self.h]
        for kv in cache:
            for t in kv:  # CUDA graphs then read and write them in place instead of copying them each step
                torch._dynamo.mark_static_address(t)
        return cache

    def forward(self, prefix: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced logits: prefix [B, n_prefix, prefix_dim], codes [B, L] -> [B, L, vocab_size].

        logits[:, i] predicts codes[:, i] from the prefix and codes[:, :i]. L is normally n_codes; any
        1 <= L <= n_codes works (the last code is never an input).
        """
        c = self.config
        if codes.dim() != 2 or not 1 <= codes.size(1) <= c.n_codes or codes.size(0) != prefix.size(0):
            raise ValueError(f"codes must be [B, L] with 1 <= L <= {c.n_codes}, got {tuple(codes.shape)}")
        x = torch.cat((self._embed_prefix(prefix), self.wte(codes[:, :-1])), dim=1)
        x, _ = self._run_blocks(x, start=0)
        # Only the positions that predict a code need the (large) vocabulary head.
        return self.lm_head(x[:, c.n_prefix - 1 :])

    def loss(self, prefix: Tensor, codes: Tensor) -> Tensor:
        """Mean cross-entropy of the codes given the prefix (Eq. 6)."""
        logits = self(prefix, codes)
        # float32 log-softmax: a bf16 one over a 16k vocabulary is too coarse for the loss.
        return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())

    @torch.no_grad()
    def generate(
        self,
        prefix: Tensor,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        cache: str = "dynamic",
        compile: bool = False,
    ) -> Tensor:
        """Sample codes [B, n_codes] from p(X | prefix): one pass over the prefix, then one code per step.

        Dropout follows the module's mode; call ``.eval()`` first for deterministic decoding.
        `cache`: "dynamic" grows each layer's (k, v) by a position a step; "static" writes them into
        buffers of the whole sequence, so every step has the same shapes, which `compile` (the step under
        `torch.compile`, CUDA graphs on CUDA) needs; "none" runs the whole sequence again at every step
        (the same codes, much slower): the baseline `benchmarks/generation.py` measures the caches against.
        """
        if cache not in CACHES or (compile and cache != "static"):
            raise ValueError(f"cache must be one of {CACHES} (static with compile), got {cache!r}")
        start, static = self._embed_prefix(prefix), cache == "static"
        kv = self.static_cache(len(start), start.dtype, start.device) if static else None
        logits, kv = self._next_logits(start, 0, kv, static)  # the prefix: not compiled
        step = compile_step(self._static_step, start.device) if compile else self._static_step
        n_prefix, n_codes = self.config.n_prefix, self.config.n_codes
        # The static step's position as a tensor: a compiled step does not specialise on its value.
        pos = torch.tensor(n_prefix - 1, device=start.device)
        codes = torch.empty(prefix.size(0), n_codes, dtype=torch.long, device=prefix.device)
        for i in range(n_codes):
            codes[:, i] = sample_next(logits, temperature, top_k=top_k, top_p=top_p, generator=generator)
            if i + 1 == n_codes:
                break
            if cache == "none":
                logits, _ = self._next_logits(torch.cat([start, self.wte(codes[:, : i + 1])], dim=1), 0)
            elif static:
                pos = pos + 1
                logits = step(self.wte(codes[:, i : i + 1]), pos, kv)
            else:
                logits, kv = self._next_logits(self.wte(codes[:, i : i + 1]), n_prefix + i, kv)
        return codes
