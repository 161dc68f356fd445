"""CodebookMonitor: how the morph-token quantizer uses its codes over training, every N steps.

The ids come from a forward hook on the quantizer, kept only for training forwards (validation and
the image logger's drawings run in eval mode), so no stage code is involved. Over each window of N
steps (all ranks' images) it logs:
- `codebook/perplexity`: exp(entropy) of the code histogram (1: one code for everything; K: uniform);
- `codebook/dead_codes`, `codebook/dead_fraction`: codes that no image picked in the window;
- `codebook/distinct_per_position`: distinct codes at each query position, averaged over positions;
- `codebook/ema_*`: the quantizer's own health (`CodeUsage.stats`, the EMA that dead-code revival reads);
and to TensorBoard the per-code histogram `codebook/usage` and the heat map `codebook/position_usage`
(a row per query position, a column per code, brightness log(1 + count)).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from morph_lightning.callbacks.tensorboard import tensorboard_writer
from morph_lightning.modeling.code_usage import perplexity
from morph_lightning.modeling.quantizer import MorphQuantizer, QuantizerOutput


def codebook_summary(counts: Tensor) -> dict[str, float]:
    """The window's numbers from its counts [positions, codes]."""
    per_code = counts.sum(0).double()
    dead = int((per_code == 0).sum())
    return {
        "codebook/perplexity": float(perplexity(per_code / per_code.sum())),
        "codebook/dead_codes": float(dead),
        "codebook/dead_fraction": dead / len(per_code),
        "codebook/distinct_per_position": float((counts > 0).sum(1).double().mean()),
    }


class CodebookMonitor(Callback):
    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError("CodebookMonitor: every_n_steps must be >= 1")
        self.every_n_steps = every_n_steps
        self.counts: Tensor | None = None  # [positions, codes] since the last log
        self._quantizer: MorphQuantizer | None = None
        self._hook: RemovableHandle | None = None
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        encoder = getattr(getattr(pl_module, "model", None), "encoder", None)
        self._quantizer = getattr(encoder, "quantizer", None)
        if self._quantizer is not None:
            self._hook = self._quantizer.register_forward_hook(self._collect)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _collect(self, module: nn.Module, args: Any, output: QuantizerOutput) -> None:
        if module.training:
            self.add(output.ids, module.codebook_size)

    def add(self, ids: Tensor, codebook_size: int) -> None:
        """Count one batch's ids [B, positions] per (position, code)."""
        positions = ids.shape[-1]
        if self.counts is None:
            self.counts = torch.zeros(positions, codebook_size, dtype=torch.long, device=ids.device)
        flat = (torch.arange(positions, device=ids.device) * codebook_size + ids).flatten()
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))  # no host sync, unlike bincount

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step or self.counts is None:
            return
        self._last_step = step
        counts = trainer.strategy.reduce(self.counts, reduce_op="sum")
        self.counts = None
        stats = self._quantizer.code_usage.stats()
        metrics = codebook_summary(counts) | {f"codebook/ema_{k}": v for k, v in stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            self._write(writer, counts.cpu(), step)

    @staticmethod
    def _write(writer: Any, counts: Tensor, step: int) -> None:
        per_code = counts.sum(0).double()
        codes = torch.arange(len(per_code), dtype=torch.double)
        used = codes[per_code > 0]
        # One bucket per code: a histogram of the picked ids, exact rather than re-binned from samples.
        writer.add_histogram_raw(
            "codebook/usage",
            min=float(used.min()),
            max=float(used.max()),
            num=int(per_code.sum()),
            sum=float((codes * per_code).sum()),
            sum_squares=float((codes**2 * per_code).sum()),
            bucket_limits=(codes + 0.5).tolist(),
            bucket_counts=per_code.tolist(),
            global_step=step,
        )
        heat = counts.double().log1p()
        writer.add_image("codebook/position_usage", (heat / heat.max()).unsqueeze(0), global_step=step)
