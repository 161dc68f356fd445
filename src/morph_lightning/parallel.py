"""FSDP2 sharding of a MorphModel under Lightning's `ModelParallelStrategy` (data parallel only).

Sharded: every LLM decoder layer and every image-decoder block (one FSDP unit each, so one layer's
weights are gathered at a time), then the LLM, the image decoder and the trainable encoder as roots of
their remaining weights (embeddings, heads, new token rows, Q-former). The frozen towers (vision, VQGAN)
are left alone: replicated on every GPU and out of the optimiser, as they have no trainable weight.

The morph quantizer's codebook is kept out of the shards: dead-code revival overwrites its rows inside
the forward pass, and FSDP2 would drop such writes (they land in the gathered copy, not in the shard).
It stays a replicated tensor whose gradient is averaged here; `CodeUsage` already keeps its revivals
identical across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from morph_lightning.modeling.decoder import MorphDecoder
from morph_lightning.modeling.model import MorphModel


def llm_layers(model: MorphModel) -> list[nn.Module]:
    """The LLM's decoder layers: the classes HF itself names as not to be split across devices."""
    names = set(model.llm.hf._no_split_modules or ())
    layers = [m for m in model.llm.stack.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"llm: no decoder layers of types {sorted(names)} to shard")
    return layers


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16 compute and all-gathers for bf16 runs, gradients reduced in fp32; otherwise the weights' dtype."""
    if str(precision).startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_morph_model(
    model: MorphModel, mesh: DeviceMesh, precision: str, activation_checkpointing: bool = False
) -> None:
    """Apply FSDP2 (and optionally activation checkpointing per block) in place; a second call is a no-op."""
    if isinstance(model.llm, FSDPModule):  # configure_model runs again for validate/test after fit
        return
    if "tensor_parallel" in (mesh.mesh_dim_names or ()):
        if mesh["tensor_parallel"].size() > 1:
            raise ValueError("only data parallelism is supported: set tensor_parallel_size: 1")
        mesh = mesh["data_parallel"]
    policy = mixed_precision(precision)
    # Either may be absent in an ablation; an unCLIP generator (frozen, diffusers' own networks) stays whole.
    decoder = model.decoder if isinstance(model.decoder, MorphDecoder) else None
    encoder = model.encoder
    for block in [*llm_layers(model), *(decoder.h if decoder is not None else [])]:
        if activation_checkpointing:
            checkpoint(block)  # composable: recomputes the block in backward, parameter names unchanged
        fully_shard(block, mesh=mesh, mp_policy=policy)
    if encoder is not None and encoder.quantizer is None:  # continuous tokens: no codebook to keep out
        fully_shard(encoder, mesh=mesh, mp_policy=policy)
    elif encoder is not None:
        codebook = encoder.quantizer.embedding.weight
        fully_shard(encoder, mesh=mesh, mp_policy=policy, ignored_params={codebook})
        _average_gradient(codebook, mesh)
    fully_shard(model.llm, mesh=mesh, mp_policy=policy)
    # Methods that read a root's own weights without going through its forward.
    register_fsdp_forward_method(model.llm, "embed")
    register_fsdp_forward_method(model.llm, "head")  # after a chunked loss (M̂'s logits); generation
    if model.condition_head is not None:  # abstr-abstr (SD): trained, outside the other roots
        fully_shard(model.condition_head, mesh=mesh, mp_policy=policy)
    if decoder is not None:
        fully_shard(decoder, mesh=mesh, mp_policy=policy)
        register_fsdp_forward_method(decoder, "generate")


def _average_gradient(param: nn.Parameter, mesh: DeviceMesh) -> None:
    """Data-parallel gradient averaging for a parameter FSDP does not manage."""
    group = mesh.get_group()

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, group=group)  # SUM, then divide: gloo has no AVG
        p.grad.div_(mesh.size())

    param.register_post_accumulate_grad_hook(hook)


def split_sharded(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each optimiser group split into its sharded (DTensor) and plain parameters.

    The fused/foreach optimiser kernels refuse a list that mixes the two.
    """
    out = []
    for group in groups:
        sharded = [p for p in group["params"] if isinstance(p, DTensor)]
        plain = [p for p in group["params"] if not isinstance(p, DTensor)]
        out += [{**group, "params": ps} for ps in (sharded, plain) if ps]
    return out
