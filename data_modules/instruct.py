"""Instruction data in the project's own jsonl, one record per line (the world writes it):

    {"input_img": ["a.jpg"], "output_img": "b.jpg" | null,
     "input_text": "USER: <image> What will this image be like with ...: make it green. ASSISTANT:",
     "output_text": "..." | null, ...extra keys ignored}

It differs from the released code's jsonl (`sources/released.py` reads that one) in three ways: the
prompt carries its chat template, the image mark is `<image>`, and exactly one of `output_img` and
`output_text` is set. Image paths are relative to the jsonl's folder and follow the order of the
`<image>` marks. A record is a `Sample`: prompt = input_text cut at its `<image>` marks into text and
`ImageRef(i)`, answer = `[output_text]` or `[ImageRef(len(input_img), target=True)]`.

A malformed line is skipped and counted by reason (`bad_records.py`); more than `max_bad_fraction` of
them stops `setup`. A record whose image is missing or unreadable is skipped at load time (warning
naming it, counted in `InstructionDataModule.skipped` by reason; per process, so with `num_workers > 0`
each worker counts its own) and the next record takes its place, which keeps batch sizes fixed.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from morph_lightning.data_modules.bad_records import MAX_BAD_FRACTION, BadRecord, BadRecords, iter_jsonl
from morph_lightning.data_modules.resume import ResumableDataModule
from morph_lightning.data_modules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_PIXELS,
    MIN_SIZE,
    BadImage,
    ImageTransforms,
    collate,
    load_image,
)
from morph_lightning.modeling.sequence import ImageRef, Piece, Sample

log = logging.getLogger(__name__)
KEYS = ("input_img", "output_img", "input_text", "output_text")
IMAGE_MARK = "<image>"


# A path, or a reader of an image stored in a dataset (its encoded bytes, or a path); `str()` names it.
ImageSource = str | Callable[[], bytes | str]


@dataclass
class Record:
    sample: Sample
    images: list[ImageSource]  # indexed by the sample's ImageRefs
    where: str  # "file:line", for messages


def prompt_pieces(text: str) -> list[Piece]:
    """A prompt with `<image>` marks -> its text pieces and `ImageRef(0)`, `ImageRef(1)`, ... in order;
    trailing space is dropped (it goes with the answer, see `build_record`)."""
    pieces: list[Piece] = []
    for i, piece in enumerate(text.rstrip().split(IMAGE_MARK)):
        if i:
            pieces.append(ImageRef(i - 1))
        if piece:
            pieces.append(piece)
    return pieces


def build_record(
    input_text: str,
    inputs: list[ImageSource],
    where: str,
    output_text: str | None = None,
    output_img: ImageSource | None = None,
) -> Record:
    """A prompt with one `<image>` mark per input image and one answer (text or image) -> a `Record`."""
    if input_text.count(IMAGE_MARK) != len(inputs):
        marks = f"{input_text.count(IMAGE_MARK)} {IMAGE_MARK} marks but {len(inputs)} images"
        raise BadRecord(where, "image marks", marks)
    if (output_img is None) == (output_text is None):
        raise BadRecord(where, "bad output", "exactly one of output_img and output_text must be set")
    # The space between "ASSISTANT:" and a text answer goes with the answer (" red"), as it does when a
    # whole conversation is tokenized at once: the answer then starts with the word-start token the LM
    # was pretrained on, and the prompt ends where generation starts.
    prompt = prompt_pieces(input_text)
    images = list(inputs)
    if output_text is not None:
        answer: list[Piece] = [" " + output_text.lstrip()]
    else:
        answer = [ImageRef(len(images), target=True)]
        images.append(output_img)
    return Record(Sample(prompt, answer), images, where)


def parse_record(obj: Any, folder: str, where: str) -> Record:
    """One decoded jsonl line -> a `Record`; a `BadRecord` (naming `where`) if it is malformed."""
    if not isinstance(obj, dict) or any(k not in obj for k in KEYS):
        have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise BadRecord(where, "missing keys", f"need {list(KEYS)}, got {have}")
    inputs, text = obj["input_img"], obj["input_text"]
    out_img, out_text = obj["output_img"], obj["output_text"]
    if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
        raise BadRecord(where, "bad 'input_img'", "must be a list of paths")
    if not isinstance(text, str):
        raise BadRecord(where, "bad 'input_text'", "must be a string")
    if (out_img is None) == (out_text is None):
        raise BadRecord(where, "bad output", "exactly one of output_img and output_text must be set")
    if not isinstance(out_img if out_text is None else out_text, str):
        raise BadRecord(where, "bad output", "output_img / output_text must be a string")
    out_img = None if out_img is None else os.path.join(folder, out_img)
    return build_record(text, [os.path.join(folder, p) for p in inputs], where, out_text, out_img)


def read_jsonl(path: str, bad: BadRecords) -> list[Record]:
    """All records of one jsonl file; bad lines are left out and counted in `bad`."""
    folder = os.path.dirname(os.path.abspath(path))
    records = []
    for where, obj in iter_jsonl(path, bad):
        with bad.skipping():
            records.append(parse_record(obj, folder, where))
    return records


class _BadSource(Exception):
    def __init__(self, reason: str, source: str) -> None:
        super().__init__(reason, source)
        self.reason, self.source = reason, source


class InstructionDataset(Dataset):
    def __init__(
        self,
        records: list[Record],
        transforms: ImageTransforms,
        skipped: Counter[str],
        min_size: int = MIN_SIZE,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.records, self.transforms, self.skipped = records, transforms, skipped
        self.min_size, self.max_pixels = min_size, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, src: ImageSource) -> Image.Image:
        try:
            return load_image(src if isinstance(src, str) else src(), self.min_size, self.max_pixels)
        except BadImage as bad:
            raise _BadSource(bad.reason, str(src)) from bad

    def __getitem__(self, i: int) -> dict[str, Any]:
        for j in range(i, i + len(self.records)):
            rec = self.records[j % len(self.records)]
            try:
                images = [self._load(src) for src in rec.images]
            except _BadSource as bad:
                self.skipped[bad.reason] += 1
                log.warning("skipping record %s: image %s: %s", rec.where, bad.source, bad.__cause__)
                continue
            pix = [self.transforms(img) for img in images]
            return {
                "vision": [p[0] for p in pix],
                "vqgan": [p[1] for p in pix],
                "caption": None,
                "sample": rec.sample,
            }
        raise RuntimeError("no record has readable images")


class InstructionDataModule(ResumableDataModule):
    """Instruction batches: `vision_pixels` [N, 3, S, S], `vqgan_pixels` [N, 3, R, R] (N = every image of
    the batch's records), `samples` whose `ImageRef`s index those rows. Training order is seeded by
    (`seed`, epoch) and resumes mid-epoch exactly (`resume.py`)."""

    def __init__(
        self,
        train_files: list[str] | str,
        val_files: list[str] | str | None = None,
        batch_size: int = 16,
        num_workers: int = 4,
        vision_size: int = 224,
        vqgan_size: int = 256,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        seed: int = 0,
        min_size: int = MIN_SIZE,
        max_pixels: int = MAX_PIXELS,
        max_bad_fraction: float = MAX_BAD_FRACTION,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.transforms = ImageTransforms(vision_size, vqgan_size, mean, std)
        self.skipped: Counter[str] = Counter()  # images that failed to load, by reason
        self.bad_records: dict[str, BadRecords] = {}  # lines left out at setup, by file
        self.train: InstructionDataset | None = None
        self.val: InstructionDataset | None = None

    def _dataset(self, files: list[str] | str) -> InstructionDataset:
        h = self.hparams
        records = []
        for f in [files] if isinstance(files, str) else files:
            bad = self.bad_records.setdefault(f, BadRecords())
            kept = read_jsonl(f, bad)
            bad.check(f, len(kept), h.max_bad_fraction)
            records += kept
        return InstructionDataset(records, self.transforms, self.skipped, h.min_size, h.max_pixels)

    def setup(self, stage: str | None = None) -> None:
        if self.train is None and stage in (None, "fit"):
            self.train = self._dataset(self.hparams.train_files)
        if self.val is None and self.hparams.val_files is not None:
            self.val = self._dataset(self.hparams.val_files)

    def _loader(self, ds: InstructionDataset, train: bool) -> DataLoader:
        h = self.hparams
        return DataLoader(
            ds,
            batch_size=h.batch_size,
            sampler=self.epoch_sampler(ds, h.seed, h.batch_size) if train else None,
            drop_last=train,
            num_workers=h.num_workers,
            collate_fn=collate,
            persistent_workers=h.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self._loader(self.val, train=False)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
