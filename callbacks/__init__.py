"""Lightning callbacks: sample images, codebook health, throughput (with the world and eval work)."""

from morph_lightning.callbacks.codebook_monitor import CodebookMonitor
from morph_lightning.callbacks.image_logger import ImageLogger
from morph_lightning.callbacks.throughput import MorphThroughputMonitor

__all__ = ["CodebookMonitor", "ImageLogger", "MorphThroughputMonitor"]
