"""Throughput and MFU: Lightning's ThroughputMonitor, given the FLOPs each batch took.

FLOPs of a batch = sum over the vision tower, the LLM and the decoder of tokens x FLOPs per token, with
FLOPs per token = 2N (forward) + 2N (gradients of the activations) + 2N_trainable (gradients of the
weights), the backward terms only for a component that is trained and runs with gradients. N counts the
weights of a component's linear layers (its matmuls; embeddings are look-ups). So a fully trained
transformer costs the usual 6N per token, a LoRA-adapted one on a frozen base about 4N, a frozen tower
(or any component in validation) 2N. Left out: attention's quadratic term, and the Q-former and the
VQGAN, small next to the LLM, and activation checkpointing's recomputation (these are model FLOPs).
Tokens are the ones each forward ran, padding included, counted by forward hooks on the three
components; in the training loop only train-mode forwards count (the image logger draws in eval mode).

Items are the LLM's tokens. MFU needs the device's peak FLOPs, which Lightning knows for common GPUs;
on a CPU it has none, and only the rates (samples, items, FLOPs per second) are logged.
"""

from __future__ import annotations

from math import prod
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn
from torch.utils.hooks import RemovableHandle


def matmul_params(module: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters of the linear layers in `module`, each shared one counted once."""
    params = {id(p): p for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    return (
        sum(p.numel() for p in params.values()),
        sum(p.numel() for p in params.values() if p.requires_grad),
    )


def flops_per_token(module: nn.Module, backward: bool) -> int:
    """2N forward, plus 2N + 2N_trainable when the step also runs the module's backward (see above)."""
    n, trainable = matmul_params(module)
    return 2 * n + (2 * n + 2 * trainable if backward else 0)


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch: instructions, or image-text pairs."""
    return len(batch["samples"]) if "samples" in batch else len(batch["vision_pixels"])


def _tokens(name: str, module: nn.Module, output: Any) -> int:
    """Tokens one forward of a component ran, read from its output."""
    if name == "llm":
        return prod(output.hidden.shape[:2])
    if name == "decoder":  # logits at the L code positions; the input was n_prefix + L - 1 long
        return output.shape[0] * (module.config.n_prefix + output.shape[1] - 1)
    return prod(output.shape[:2])  # vision: patch tokens [B, T, C]


class MorphThroughputMonitor(ThroughputMonitor):
    COMPONENTS = ("vision", "llm", "decoder")

    def __init__(self, **kwargs: Any) -> None:
        """`kwargs`: `Throughput`'s (`window_size`, `separator`); batch size and items are set here."""
        super().__init__(batch_size_fn=batch_size, length_fn=self._items, **kwargs)
        self._hooks: list[RemovableHandle] = []
        self._llm_tokens = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        pl_module.flops_per_batch = 0  # ThroughputMonitor reads it after every batch
        model = getattr(pl_module, "model", None)
        for name in self.COMPONENTS:
            module = getattr(model, name, None)
            if module is not None:
                self._hooks.append(
                    module.register_forward_hook(self._counter(trainer, pl_module, name, module))
                )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _counter(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, module: nn.Module) -> Any:
        """The forward hook that adds one forward of component `name` to the batch's count."""
        trained = any(p.requires_grad for p in module.parameters())
        per_token = {backward: flops_per_token(module, backward) for backward in (False, True)}

        def count(mod: nn.Module, args: Any, output: Any) -> None:
            if trainer.training and not pl_module.training:
                return  # in the training loop but in eval mode: a callback's drawing, not the step
            tokens = _tokens(name, mod, output)
            pl_module.flops_per_batch += tokens * per_token[trained and torch.is_grad_enabled()]
            if name == "llm":
                self._llm_tokens += tokens

        return count

    def _items(self, batch: Any) -> int:
        return self._llm_tokens

    def _new_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.flops_per_batch = 0
        self._llm_tokens = 0

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = (
        _new_batch
    )
