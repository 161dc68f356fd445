"""`python -m morph_lightning precompute-codes`: encode every image of a set of pair shards once with the
stage's frozen VQGAN and write its codes beside the sample (`{key}.codes.npy`), so stages 2-3 read X
instead of running the VQGAN encoder every step (at 256 px, f16, the encoder costs about as much as the
decoder it feeds).

The VQGAN (architecture, checkpoint) and its input size come from a stage config, so the codes are the
ones that stage would compute. Output shards keep every member of the input and the same names, each
written to a temporary file and renamed when complete; shards already written are skipped, so an
interrupted run picks up where it stopped. A sample whose image cannot be read is copied without codes
(the pair data module then skips it, as it would have) and counted.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from omegaconf import OmegaConf
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from morph_lightning.cli import resolve_config
from morph_lightning.data_modules.pairs import CODES_EXT, IMAGE_EXTS, expand_shards
from morph_lightning.data_modules.transforms import BadImage, ImageTransforms, load_image
from morph_lightning.modeling.config import MorphModelConfig, kwargs_of, parse_section
from morph_lightning.modeling.vqgan import VQGAN


def vqgan_from_stage_config(path: str) -> tuple[VQGAN, int]:
    """The frozen VQGAN a stage config builds, and the image size its data module feeds it."""
    cfg = OmegaConf.to_container(OmegaConf.load(resolve_config(path)), resolve=True)
    try:
        model = parse_section(MorphModelConfig, cfg["model"]["init_args"]["model"], "model.init_args.model")
        size = int(cfg.get("data", {}).get("init_args", {}).get("vqgan_size", model.vqgan.resolution))
    except KeyError as err:
        raise ValueError(f"{path}: not a stage config (no {err} key)") from None
    if not model.vqgan_checkpoint:
        raise ValueError(f"{path}: model.vqgan_checkpoint is not set; codes of a random VQGAN are useless")
    vqgan = VQGAN.from_taming_checkpoint(model.vqgan_checkpoint, **kwargs_of(model.vqgan))
    return vqgan.eval(), size


def codes_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


@torch.no_grad()
def encode_shard(
    src: str, dst: Path, vqgan: VQGAN, transforms: ImageTransforms, batch_size: int, device: str
) -> Counter[str]:
    """Copy shard `src` to `dst` with codes added; returns counts (`encoded` and skip reasons)."""
    counts: Counter[str] = Counter()
    dtype = codes_dtype(vqgan.codebook.shape[0])
    tmp = dst.with_name(dst.name + ".tmp")
    pending: list[tuple[dict[str, Any], torch.Tensor | None]] = []

    def flush(writer: wds.TarWriter) -> None:
        images = [img for _, img in pending if img is not None]
        codes = iter(vqgan.encode_to_codes(torch.stack(images).to(device)).cpu().numpy()) if images else None
        for sample, img in pending:
            if img is not None:
                sample[CODES_EXT] = next(codes).astype(dtype)
                counts["encoded"] += 1
            writer.write(sample)
        pending.clear()

    with open(tmp, "wb") as stream, wds.TarWriter(stream) as writer:
        for raw in tarfile_samples([{"url": src}]):
            sample = {k: v for k, v in raw.items() if k not in ("__url__", "__local_path__")}
            data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
            try:
                if data is None:
                    raise BadImage("missing")
                img = transforms.vqgan(load_image(data))
            except BadImage as bad:
                counts[bad.reason] += 1
                img = None
            pending.append((sample, img))
            if len(pending) == batch_size:
                flush(writer)
        flush(writer)
    os.replace(tmp, dst)
    return counts


def main(argv: list[str] | None = None) -> Counter[str]:
    parser = argparse.ArgumentParser(prog="python -m morph_lightning precompute-codes", description=__doc__)
    parser.add_argument("--config", required=True, help="stage config whose VQGAN encodes (stage2.yaml)")
    parser.add_argument("--shards", required=True, nargs="+", help="input shards (brace patterns allowed)")
    parser.add_argument("--out", required=True, help="folder for the output shards (same names)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    vqgan, size = vqgan_from_stage_config(args.config)
    vqgan.to(args.device)
    transforms = ImageTransforms(vqgan_size=size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    totals: Counter[str] = Counter()
    for src in tqdm(expand_shards(args.shards), desc="shards"):
        dst = out / Path(src).name
        if dst.exists():
            totals["shards_done_before"] += 1
            continue
        totals.update(encode_shard(src, dst, vqgan, transforms, args.batch_size, args.device))
        totals["shards"] += 1
    print(f"[precompute-codes] {dict(totals)}")
    return totals
