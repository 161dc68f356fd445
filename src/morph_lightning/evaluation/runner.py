"""The evaluation runner: one task, one model, predictions written as they come, then the scores.

Requests go through a LightningDataModule and a LightningModule's `predict_step`, so `devices=N` runs
data-parallel (DDP) with Lightning's progress bar. Each rank appends its predictions to its own
`predictions.part<rank>.jsonl` after every batch (flushed and synced), so a killed run loses at most the
batch in flight: run the same command again and only the missing items are answered. At the end the
parts are merged into `predictions.jsonl` (in the task's order) and `scores.json` and `table.md` are
written; every file is written whole under a temporary name and renamed into place, and a file an
earlier run wrote is moved aside with a timestamp rather than replaced when it would change. Stored
answers are resumed only for the same task, data and model (`run.json`) and the same requests (each
prediction carries its request's fingerprint); otherwise the earlier run moves to `earlier-<time>/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from morph_lightning.data_modules.instruct import prompt_pieces
from morph_lightning.data_modules.transforms import BadImage, ImageTransforms, load_image
from morph_lightning.evaluation.likelihood import continuation_logprobs
from morph_lightning.evaluation.task import Prediction, Request, Task, read_predictions_jsonl
from morph_lightning.evaluation.text_generation import generate_text
from morph_lightning.evaluation.world_eval import to_uint8
from morph_lightning.generation import generate, image_length
from morph_lightning.keep import aside_name, free_name
from morph_lightning.modeling.model import MorphModel
from morph_lightning.modeling.sequence import Sample, shift_refs

log = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"
RUN_FILE = "run.json"
IMAGES = "images"  # generated images, one PNG per image request


# ---------------------------------------------------------------- data


def image_transforms(model: MorphModel) -> ImageTransforms:
    """The model's own image preprocessing (the vision tower's size, mean and std)."""
    vision, size = model.vision, model.config.vqgan.resolution
    if vision is None:  # `pre_mllm: vqgan` reads the VQGAN's pixels alone
        return ImageTransforms(size, size)
    return ImageTransforms(vision.image_size, size, vision.mean, vision.std)


class LoadedRequest:
    """One request with its images read for the vision tower (and for the VQGAN, which `pre_mllm: vqgan`
    reads them through), or the reason they could not be."""

    def __init__(
        self,
        request: Request,
        pixels: list[torch.Tensor],
        error: str | None,
        vqgan_pixels: list[torch.Tensor] | None = None,
    ) -> None:
        self.request, self.pixels, self.error = request, pixels, error
        self.vqgan_pixels = vqgan_pixels or []


class _RequestDataset(Dataset):
    def __init__(self, requests: list[Request], transforms: ImageTransforms) -> None:
        self.requests, self.transforms = requests, transforms

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> LoadedRequest:
        request = self.requests[i]
        try:
            images = [load_image(src if isinstance(src, str) else src()) for src in request.images]
        except BadImage as bad:
            log.warning("%s: unreadable image (%s), scored as unanswered", request.id, bad)
            return LoadedRequest(request, [], f"unreadable image: {bad}")
        pairs = [self.transforms(img) for img in images]
        return LoadedRequest(request, [v for v, _ in pairs], None, [x for _, x in pairs])


class RequestDataModule(L.LightningDataModule):
    """The requests still to answer, in order; images read and transformed by the loader's workers."""

    def __init__(
        self, requests: list[Request], transforms: ImageTransforms, batch_size: int = 8, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.dataset = _RequestDataset(requests, transforms)
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=list
        )


# ---------------------------------------------------------------- model


def image_file(folder: Path, request_id: str) -> Path:
    """Where a request's generated image goes: its id as the file name, made safe (a digest is added
    when the id had to change, so two ids never share a file)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", request_id)
    if safe != request_id:
        safe += "-" + hashlib.sha1(request_id.encode("utf-8")).hexdigest()[:8]
    return folder / f"{safe}.png"


def _prompts(items: list[LoadedRequest]) -> tuple[list[Sample], torch.Tensor | None, torch.Tensor | None]:
    """The requests' prompts as samples over one stack of all their images, for the vision tower and for
    the VQGAN."""
    prompts, pixels, vqgan = [], [], []
    for item in items:
        prompts.append(Sample(shift_refs(prompt_pieces(item.request.prompt), len(pixels))))
        pixels += item.pixels
        vqgan += item.vqgan_pixels
    return prompts, torch.stack(pixels) if pixels else None, torch.stack(vqgan) if vqgan else None


class EvalModule(L.LightningModule):
    """Answers a batch of requests: generated text, the choices ranked by summed log-likelihood
    (InstructBLIP's vocabulary ranking; a task that wants them length-normalised reads the logprobs and
    token counts from the prediction), or a generated image, written as a PNG under `image_dir`.

    Images are asked for (`start_image`: the answer starts with `<img>`) and decoded greedily, text and
    codes alike, as the world evaluation does: the same model draws the same image every run."""

    def __init__(self, model: MorphModel, image_dir: Path | None = None) -> None:
        super().__init__()
        self.model, self.image_dir = model, image_dir

    def predict_step(self, batch: list[LoadedRequest], batch_idx: int) -> list[Prediction]:
        self.model.eval()
        out: dict[str, Prediction] = {}
        generate: dict[tuple, list[LoadedRequest]] = defaultdict(list)
        draw: list[LoadedRequest] = []
        for item in batch:
            r = item.request
            if item.error is not None:
                out[r.id] = Prediction(r.id, error=item.error, request=r.fingerprint())
            elif r.choices is not None:
                out[r.id] = self._rank(item)
            elif r.output == "image":
                draw.append(item)
            else:
                generate[(r.max_new_tokens, r.min_new_tokens, r.num_beams, r.length_penalty)].append(item)
        if draw:
            out |= self._draw(draw)
        for (max_new, min_new, beams, penalty), items in generate.items():
            prompts, pixels, vqgan_pixels = _prompts(items)
            texts = generate_text(
                self.model,
                prompts,
                pixels,
                vqgan_pixels=vqgan_pixels,
                max_new_tokens=max_new,
                min_new_tokens=min_new,
                num_beams=beams,
                length_penalty=penalty,
            )
            for item, text in zip(items, texts, strict=True):
                r = item.request
                out[r.id] = Prediction(r.id, text=text.strip(), request=r.fingerprint())
        return [out[item.request.id] for item in batch]

    def _draw(self, items: list[LoadedRequest]) -> dict[str, Prediction]:
        if self.image_dir is None:
            raise ValueError("image requests need an image_dir to write their PNGs to")
        prompts, pixels, vqgan_pixels = _prompts(items)
        steps = image_length(self.model) + 2  # <img>, the image's tokens, </img>
        drawn = generate(
            self.model,
            prompts,
            pixels,
            vqgan_pixels=vqgan_pixels,
            max_new_tokens=steps,
            start_image=True,
            temperature=0.0,
            image_temperature=0.0,
        )
        out = {}
        for k, item in enumerate(items):
            r, path = item.request, image_file(self.image_dir, item.request.id)
            write_png(drawn.pixels[drawn.images[k][0]], path)
            out[r.id] = Prediction(r.id, image=str(path.resolve()), request=r.fingerprint())
        return out

    def _rank(self, item: LoadedRequest) -> Prediction:
        r = item.request
        prompt = prompt_pieces(r.prompt)
        # A choice follows "ASSISTANT:" after a space, as training renders answers (`build_record`).
        # The images as the model reads them: through the vision tower, or as VQGAN codes (`pre_mllm: vqgan`).
        images = item.pixels if self.model.encoder is not None else item.vqgan_pixels
        rows = [(Sample(prompt, [" " + choice.lstrip()]), images) for choice in r.choices]
        scored = continuation_logprobs(self.model, rows, batch_size=len(rows))
        best = max(range(len(scored)), key=lambda k: scored[k].logprob)
        return Prediction(
            r.id,
            text=r.choices[best],
            choice_logprobs=[c.logprob for c in scored],
            choice_tokens=[c.tokens for c in scored],
            request=r.fingerprint(),
        )


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends each batch's predictions to `predictions.part<rank>.jsonl`, flushed and synced."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = out_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dl_idx):
        path = self.out_dir / f"predictions.part{trainer.global_rank}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in prediction))
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------- files


def write_png(pixels: torch.Tensor, path: Path) -> None:
    """An image [3, H, W] in [-1, 1] as a PNG, written whole under a temporary name (a rerun of an item
    whose prediction was lost writes its image again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(to_uint8(pixels)).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_atomic(path: Path, data: str | bytes, keep_earlier: bool = True) -> None:
    """Write `path` whole (text as UTF-8); with `keep_earlier`, an earlier file with other content is
    first moved aside, timestamped."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if keep_earlier and path.exists() and path.read_bytes() != raw:
        os.replace(path, aside_name(path))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(raw)
    os.replace(tmp, path)


def _merge(out: Path, ids: list[str]) -> dict[str, Prediction]:
    """Everything answered so far in `out` (the merged file and the parts of an interrupted run, whose
    last line may be torn) rewritten as one `predictions.jsonl`, in the task's order (lines for other
    ids after them, kept), the parts then removed; returns it."""
    done: dict[str, Prediction] = {}
    parts = sorted(out.glob("predictions.part*.jsonl"))
    for path in [out / PREDICTIONS, *parts]:
        if path.exists():
            done |= read_predictions_jsonl(path)
    order = [i for i in ids if i in done] + [i for i in done if i not in set(ids)]
    text = "".join(json.dumps(done[i].to_json(), ensure_ascii=False) + "\n" for i in order)
    write_atomic(out / PREDICTIONS, text, keep_earlier=False)  # holds every earlier line too
    for part in parts:
        part.unlink()
    return done


def _set_aside(out: Path, why: str) -> None:
    """Move an earlier run's files into `out/earlier-<time>/`: nothing stale is resumed, nothing lost."""
    stamp = (out / RUN_FILE).stat().st_mtime if (out / RUN_FILE).exists() else time.time()
    aside = free_name(out / time.strftime("earlier-%Y%m%d-%H%M%S", time.localtime(stamp)))
    aside.mkdir()
    for path in [out / RUN_FILE, out / PREDICTIONS, out / "scores.json", out / "table.md"]:
        if path.exists():
            os.replace(path, aside / path.name)
    for part in out.glob("predictions.part*.jsonl"):
        os.replace(part, aside / part.name)
    if (out / IMAGES).exists():  # the earlier run's generated images go with its predictions
        os.replace(out / IMAGES, aside / IMAGES)
    print(f"[evaluate] {out} held a run with {why}: its files are now in {aside}")


def _resumable(out: Path, run: dict[str, Any], requests: list[Request]) -> dict[str, Prediction]:
    """The answers stored in `out` that this run can keep. A run of another task, data or model (a
    checkpoint trained again, say), or whose stored answers were asked otherwise (a task option that
    changes prompts or decoding), is set aside whole."""
    path = out / RUN_FILE
    if path.exists() and (earlier := json.loads(path.read_text(encoding="utf-8"))) != run:
        _set_aside(out, "another " + ", ".join(k for k in run if earlier.get(k) != run[k]))
    ids = [r.id for r in requests]
    # A new part must not continue a torn line of an interrupted one. (Under DDP's script launcher every
    # rank runs this before joining the process group, so rank 0 writes no part before they are done.)
    done = _merge(out, ids)
    asked = {r.id: r.fingerprint() for r in requests}
    if any(p.request not in (None, asked[i]) for i, p in done.items() if i in asked):
        _set_aside(out, "answers to other prompts or decoding settings (another task option)")
        done = {}
    write_atomic(path, json.dumps(run, indent=2) + "\n")
    return done


def write_scores(task: Task, predictions: dict[str, Prediction], out: Path) -> dict[str, Any]:
    """Score `predictions`, write `scores.json` and `table.md` under `out`, return the scores."""
    out.mkdir(parents=True, exist_ok=True)
    scores = task.score(predictions)
    write_atomic(out / "scores.json", json.dumps(scores, indent=2) + "\n")
    write_atomic(out / "table.md", task.table(scores))
    return scores


# ---------------------------------------------------------------- run


def evaluate(
    task: Task,
    model: MorphModel,
    out: str | Path,
    model_source: str,
    batch_size: int = 8,
    devices: int = 1,
    accelerator: str = "auto",
    num_workers: int = 0,
    strategy: str = "ddp",
    score: bool = True,
) -> dict[str, Any] | None:
    """Answer every request of `task` not yet answered in `out`, then score them all (unless `score` is
    False: a pass whose answers later requests build on). Returns the scores (None on the ranks other than
    0 of a multi-device run, or without `score`). `strategy` is Lightning's, for `devices` > 1: each device
    answers its share of the requests (Lightning's distributed sampler)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    requests = task.requests()
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{task.name}: request ids are not unique")
    run = {"task": task.name, "data": str(task.data.resolve()), "model": model_source}
    done = _resumable(out, run, requests)
    pending = [r for r in requests if r.id not in done]
    print(f"[evaluate] {task.name}: {len(requests)} items, {len(requests) - len(pending)} answered before")
    if pending:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy if devices > 1 else "auto",
            logger=False,
            enable_checkpointing=False,
            default_root_dir=str(out),
            callbacks=[JsonlPredictionWriter(out)],
        )
        data = RequestDataModule(pending, image_transforms(model), batch_size, num_workers)
        start = time.perf_counter()
        trainer.predict(EvalModule(model, out / IMAGES), datamodule=data, return_predictions=False)
        trainer.strategy.barrier()  # every rank's part is written before rank 0 merges them
        if not trainer.is_global_zero:
            return None
        seconds = time.perf_counter() - start
        per_100 = 100 * seconds / len(pending)
        print(f"[evaluate] answered {len(pending)} items in {seconds:.1f} s ({per_100:.1f} s per 100)")
        done = _merge(out, ids)
    if not score:
        return None
    return write_scores(task, {i: done[i] for i in ids if i in done}, out)
