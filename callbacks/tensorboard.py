"""The TensorBoard writer of a run, for the callbacks that log more than scalars (images, histograms)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter


def tensorboard_writer(trainer: L.Trainer) -> SummaryWriter | None:
    """The first TensorBoardLogger's writer, or None when the run has none. Every rank gets the same
    answer (loggers come from the config), so callbacks stay in step; off rank 0 the writer is
    Lightning's dummy, which drops what it is given."""
    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    return None if logger is None else logger.experiment
