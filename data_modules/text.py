"""Plain-text corpora (one document per line) for pretraining a language model, as batches of strings.

Blank lines are skipped; a missing file stops `setup` with its name.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader


def read_lines(files: list[str] | str) -> list[str]:
    lines: list[str] = []
    for f in [files] if isinstance(files, str) else files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"text corpus {path} does not exist")
        lines += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines


def collate_texts(texts: list[str]) -> dict[str, list[str]]:
    return {"texts": texts}


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_files: list[str] | str,
        val_files: list[str] | str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        """Batches are ``{"texts": [str, ...]}``; training batches are shuffled and the last partial one
        dropped, so every step sees `batch_size` documents."""
        super().__init__()
        self.save_hyperparameters()
        self.train: list[str] = []
        self.val: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        self.train = read_lines(self.hparams.train_files)
        if self.hparams.val_files:
            self.val = read_lines(self.hparams.val_files)

    def _loader(self, lines: list[str], train: bool) -> DataLoader:
        return DataLoader(
            lines,
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_texts,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, train=False) if self.val else []
