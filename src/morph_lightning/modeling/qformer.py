"""Deconfounded Q-former: the morph-token encoder's backbone (paper Section 3.1, Appendix B, Eq. 7-12).

Learnable group tokens G read the CLIP patch tokens V through pre-LN layers of
causal self-attention -> slot attention -> MLP. Slot attention normalises over the queries, so every
visual token is shared out among the group tokens (Eq. 7). The slot-attention query carries the
deconfounding term E_d[h_G(d)], a prior-weighted attention read of a frozen dictionary D that is
initialised from the VQGAN codebook (Eq. 9-12).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)


def slot_attention_weights(q: Tensor, k: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Slot-attention weights of queries q [..., N, hd] over visual tokens k [..., P, hd].

    Returns (assign, weights), both [..., N, P]. `assign` is the softmax over the query axis (Eq. 7):
    each visual token's column sums to 1, i.e. the token is distributed over the queries. `weights`
    renormalises each query's row to sum to 1, so a query's output is the weighted mean of the tokens
    it claimed rather than a sum that grows with the number of patches.
    """
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    assign = logits.softmax(dim=-2)
    weights = assign / (assign.sum(dim=-1, keepdim=True) + eps)
    return assign, weights


class CausalSelfAttention(nn.Module):
    """Self-attention among the group tokens; token i attends to tokens <= i."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).split(x.size(-1), dim=-1))
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class SlotAttention(nn.Module):
    """Cross-attention from the group tokens to the visual tokens, normalised over the queries."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, tokens: Tensor, query_bias: Tensor | None = None) -> Tensor:
        q = self.q(x)
        if query_bias is not None:
            q = q + query_bias  # Eq. 12: Q = G W_q + E_d[h_G(d)]
        k, v = self.kv(tokens).split(x.size(-1), dim=-1)
        h = self.num_heads
        _, weights = slot_attention_weights(_split_heads(q, h), _split_heads(k, h), self.eps)
        return self.proj(_merge_heads(weights.to(v.dtype) @ _split_heads(v, h)))


class Deconfounder(nn.Module):
    """The "single-layer Q-former" of Appendix B that gives E_d[h_G(d)].

    The group-token states attend over the dictionary D (keys and values are projections of D); the
    attention A over d is reweighted by the prior P(d) and renormalised, and the values are summed:
    E_d[h_G(d)] = sum_d A_d P(d) h(d) / sum_d A_d P(d).
    """

    def __init__(self, dim: int, dict_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dict_norm = nn.LayerNorm(dict_dim)  # a VQGAN codebook's scale is arbitrary
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dict_dim, dim)
        self.v = nn.Linear(dict_dim, dim)

    def forward(self, x: Tensor, dictionary: Tensor, log_prior: Tensor) -> Tensor:
        b, h = x.size(0), self.num_heads
        d = self.dict_norm(dictionary).unsqueeze(0)
        q = _split_heads(self.q(x), h)
        k = _split_heads(self.k(d), h).expand(b, -1, -1, -1)
        v = _split_heads(self.v(d), h).expand(b, -1, -1, -1)
        # softmax(logits + log P) == softmax(logits) * P renormalised over d; as an additive mask the
        # prior needs no [B, H, N, |D|] weight tensor of its own.
        mask = log_prior.to(q.dtype).view(1, -1)
        return _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class QFormerLayer(nn.Module):
    """Pre-LN layer: causal self-attention, (deconfounded) slot attention, MLP; residual around each."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, deconfound: bool, dict_dim: int
    ) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = CausalSelfAttention(dim, num_heads)
        self.norm_slot = nn.LayerNorm(dim)
        self.slot_attn = SlotAttention(dim, num_heads)
        self.deconfounder = Deconfounder(dim, dict_dim, num_heads) if deconfound else None
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, tokens: Tensor, dictionary: Tensor | None = None, log_prior: Tensor | None = None
    ) -> Tensor:
        x = x + self.drop(self.self_attn(self.norm_self(x)))
        h = self.norm_slot(x)
        # The paper adds E_d[h_G(d)] to the slot-attention query (Eq. 12), as here; the released code
        # instead adds a deconfounding term per head inside its slot-attention layers.
        bias = self.deconfounder(h, dictionary, log_prior) if self.deconfounder is not None else None
        x = x + self.drop(self.slot_attn(h, tokens, bias))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class DeconfoundedQFormer(nn.Module):
    """Abstracts patch tokens [B, P, vision_dim] into num_queries group-token features [B, N, dim]."""

    def __init__(
        self,
        vision_dim: int,
        num_queries: int = 32,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        deconfound: bool = True,
        dict_size: int = 16384,
        dict_dim: int = 256,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_queries = num_queries
        self.dim = dim
        self.deconfound = deconfound
        self.group_tokens = nn.Parameter(torch.zeros(num_queries, dim))
        self.in_proj = nn.Linear(vision_dim, dim)
        self.in_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            QFormerLayer(dim, num_heads, mlp_ratio, dropout, deconfound, dict_dim) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        if deconfound:
            # Frozen confounder dictionary D and prior P(d); random until init_dictionary() copies in the
            # VQGAN codebook. Buffers, so checkpoints carry them and no optimizer ever sees them.
            self.register_buffer("dictionary", torch.randn(dict_size, dict_dim))
            self.register_buffer("prior", torch.full((dict_size,), 1.0 / dict_size))
        else:
            self.register_buffer("dictionary", None)
            self.register_buffer("prior", None)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.group_tokens, std=0.02)

    @torch.no_grad()
    def init_dictionary(self, codebook: Tensor, prior: Tensor | None = None) -> None:
        """Copy a VQGAN codebook [dict_size, dict_dim] into D and set P(d) (uniform when None)."""
        if self.dictionary is None:
            raise RuntimeError("this Q-former was built with deconfound=False and has no dictionary")
        if codebook.shape != self.dictionary.shape:
            raise ValueError(
                f"codebook shape {tuple(codebook.shape)} does not match the deconfounder dictionary shape "
                f"{tuple(self.dictionary.shape)} (dict_size, dict_dim)"
            )
        if prior is None:
            prior = torch.ones_like(self.prior)
        elif prior.shape != self.prior.shape:
            raise ValueError(f"prior shape {tuple(prior.shape)} does not match {tuple(self.prior.shape)}")
        elif (prior < 0).any() or prior.sum() <= 0:
            raise ValueError("prior must be non-negative with a positive sum")
        self.dictionary.copy_(codebook)
        self.prior.copy_(prior / prior.sum())

    def forward(self, patch_tokens: Tensor) -> Tensor:
        tokens = self.in_norm(self.in_proj(patch_tokens))
        x = self.group_tokens.expand(patch_tokens.size(0), -1, -1)
        log_prior = self.prior.log() if self.deconfound else None
        for layer in self.layers:
            x = layer(x, tokens, self.dictionary, log_prior)
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
