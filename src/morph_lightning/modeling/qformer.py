"""Deconfounded Q-former: the morph-token encoder's backbone (paper Section 3.1, Appendix B, Eq. 7-12).

BLIP-2's Q-former in its published layout (BERT-style post-LN layers over learned query tokens, cross-
attention to the vision tokens every `cross_attention_frequency` layers, module names as in transformers'
`Blip2QFormerModel`), so BLIP-2 and SEED weights load by key (`encoder_weights.py`), with the paper's
additions:
- causal self-attention among the queries (Appendix B; SEED's tokenizer does the same);
- slot attention (Eq. 7): attention normalised over the queries, so every visual token is shared out
  among them. `slot_attention: replace` (the paper: "we replace the pivotal cross-attention computation
  in Qformer with slot-attention") turns BLIP-2's cross-attention layers into slot attention, keeping
  their weights; `added` (the released code) keeps BLIP-2's cross-attention and adds slot-attention
  sublayers in `slot_layers`; `none` is BLIP-2 as published;
- the deconfounder (Eq. 9-12): the slot-attention query becomes Q = G W_q + E_d[h_G(d)], a prior-
  weighted attention read of a frozen dictionary D initialised from the VQGAN codebook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

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


class Deconfounder(nn.Module):
    """The "single-layer Q-former" of Appendix B that gives E_d[h_G(d)].

    The query states attend over the dictionary D (keys and values are projections of D); the
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


class AttentionProjections(nn.Module):
    """BLIP-2's `attention` submodule: query from the queries, key and value from `kv_dim` inputs."""

    def __init__(self, dim: int, kv_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)


class DenseLayerNorm(nn.Module):
    """BERT's post-LN output: LayerNorm(dropout(dense(h)) + residual)."""

    def __init__(self, in_dim: int, dim: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)  # noqa: N815 (BLIP-2's key name)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class QFormerAttention(nn.Module):
    """One attention sublayer with its residual and LayerNorm: self-, cross- or slot attention.

    `slot`: normalise over the queries (Eq. 7) instead of over the keys. `causal`: query i sees keys
    <= i (self-attention only). `deconfounder`: adds E_d[h_G(d)] to the query projection (Eq. 12).
    """

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        num_heads: int,
        eps: float,
        dropout: float,
        slot: bool = False,
        causal: bool = False,
        deconfounder: Deconfounder | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.slot, self.causal, self.dropout = num_heads, slot, causal, dropout
        self.attention = AttentionProjections(dim, kv_dim)
        self.output = DenseLayerNorm(dim, dim, eps, dropout)
        self.deconfounder = deconfounder

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        dictionary: Tensor | None = None,
        log_prior: Tensor | None = None,
    ) -> Tensor:
        kv = x if kv is None else kv
        a, h = self.attention, self.num_heads
        q = a.query(x)
        if self.deconfounder is not None:
            q = q + self.deconfounder(x, dictionary, log_prior)  # Eq. 12: Q = G W_q + E_d[h_G(d)]
        q, k, v = _split_heads(q, h), _split_heads(a.key(kv), h), _split_heads(a.value(kv), h)
        if self.slot:
            _, weights = slot_attention_weights(q, k)
            ctx = F.dropout(weights.to(v.dtype), self.dropout, self.training) @ v
        else:
            drop = self.dropout if self.training else 0.0
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
        return self.output(_merge_heads(ctx), x)


class QFormerLayer(nn.Module):
    """Self-attention, then cross-attention (every `cross_attention_frequency` layers), then the added
    slot attention where asked, then the query feed-forward; BLIP-2's names throughout."""

    def __init__(
        self,
        dim: int,
        vision_dim: int,
        num_heads: int,
        intermediate_size: int,
        eps: float,
        dropout: float,
        causal: bool,
        cross: bool,
        slot: Literal["replace", "added", "none"],
        make_deconfounder: Callable[[], Deconfounder | None],
    ) -> None:
        super().__init__()
        attn = dict(num_heads=num_heads, eps=eps, dropout=dropout)
        self.attention = QFormerAttention(dim, dim, causal=causal, **attn)
        self.crossattention = None
        if cross:
            replace = slot == "replace"
            deconf = make_deconfounder() if replace else None
            self.crossattention = QFormerAttention(dim, vision_dim, slot=replace, deconfounder=deconf, **attn)
        self.slotattention = None
        if slot == "added":
            self.slotattention = QFormerAttention(
                dim, vision_dim, slot=True, deconfounder=make_deconfounder(), **attn
            )
        self.intermediate_query = nn.Sequential()
        self.intermediate_query.dense = nn.Linear(dim, intermediate_size)
        self.intermediate_query.act = nn.GELU()  # BERT's "gelu" is the exact (erf) one
        self.output_query = DenseLayerNorm(intermediate_size, dim, eps, dropout)

    def forward(
        self, x: Tensor, tokens: Tensor, dictionary: Tensor | None, log_prior: Tensor | None
    ) -> Tensor:
        x = self.attention(x)
        if self.crossattention is not None:
            x = self.crossattention(x, tokens, dictionary, log_prior)
        if self.slotattention is not None:
            x = self.slotattention(x, tokens, dictionary, log_prior)
        return self.output_query(self.intermediate_query(x), x)


class DeconfoundedQFormer(nn.Module):
    """Abstracts patch tokens [B, P, vision_dim] into num_queries features [B, N, dim]."""

    def __init__(
        self,
        vision_dim: int,
        num_queries: int = 32,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        intermediate_size: int | None = None,
        cross_attention_frequency: int = 2,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.0,
        causal: bool = True,
        slot_attention: Literal["replace", "added", "none"] = "replace",
        slot_layers: list[int] | None = None,
        deconfound: bool = True,
        dict_size: int = 16384,
        dict_dim: int = 256,
    ) -> None:
        """`intermediate_size`: the feed-forward width (None: 4 x dim, BLIP-2's 3,072 at 768).
        `slot_layers`: with `slot_attention: added`, the layers that get a slot-attention sublayer
        (None: those without cross-attention; the released code uses [3, 5, 7]).
        `deconfound`: the Eq. 12 query term in every slot-attention sublayer (none without slot attention).
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {cross_attention_frequency}")
        cross = [i % cross_attention_frequency == 0 for i in range(depth)]
        if slot_layers is None:
            slot_layers = [i for i in range(depth) if not cross[i]] if slot_attention == "added" else []
        elif slot_attention != "added":
            raise ValueError(f"slot_layers is only used with slot_attention: added, not {slot_attention!r}")
        elif not all(0 <= i < depth for i in slot_layers):
            raise ValueError(f"slot_layers {slot_layers} must lie in [0, depth={depth})")
        self.num_queries, self.dim = num_queries, dim
        self.deconfound = deconfound and slot_attention != "none"
        eps = layer_norm_eps

        def make_deconfounder() -> Deconfounder | None:
            return Deconfounder(dim, dict_dim, num_heads) if self.deconfound else None

        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.ln_vision = nn.LayerNorm(vision_dim)  # BLIP-2's LayerNorm on the ViT's tokens (eps 1e-5)
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.Module()  # transformers' `qformer.encoder.layer.N`, so keys match by name
        self.encoder.layer = nn.ModuleList(
            QFormerLayer(
                dim,
                vision_dim,
                num_heads,
                intermediate_size or 4 * dim,
                eps,
                dropout,
                causal,
                cross[i],
                slot_attention if (slot_attention != "added" or i in slot_layers) else "none",
                make_deconfounder,
            )
            for i in range(depth)
        )
        if self.deconfound:
            # Frozen confounder dictionary D and prior P(d); random until init_dictionary() copies in the
            # VQGAN codebook. Buffers, so checkpoints carry them and no optimizer ever sees them.
            self.register_buffer("dictionary", torch.randn(dict_size, dict_dim))
            self.register_buffer("prior", torch.full((dict_size,), 1.0 / dict_size))
        else:
            self.register_buffer("dictionary", None)
            self.register_buffer("prior", None)
        self.apply(_init_weights)
        nn.init.normal_(self.query_tokens, std=0.02)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    @torch.no_grad()
    def init_dictionary(self, codebook: Tensor, prior: Tensor | None = None) -> None:
        """Copy a VQGAN codebook [dict_size, dict_dim] into D and set P(d) (uniform when None)."""
        if self.dictionary is None:
            raise RuntimeError("this Q-former has no deconfounder (deconfound=False or no slot attention)")
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
        tokens = self.ln_vision(patch_tokens)
        x = self.dropout(self.layernorm(self.query_tokens.expand(patch_tokens.size(0), -1, -1)))
        log_prior = self.prior.log() if self.deconfound else None
        for layer in self.layers:
            x = layer(x, tokens, self.dictionary, log_prior)
        return x


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation (std 0.02), as BLIP-2's Q-former starts."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
