"""Image scorers of the generation benchmarks: text-to-image (Table 4) and editing (Tables 5 and 8).

Each metric follows its public reference scorer (docs: shared EVAL_PROTOCOLS.md sections 5 and 6):
- `clip_similarity`: GILL's pair-wise CLIP similarity, the cosine of `get_image_features` of the generated
  and the reference image under CLIP ViT-L/14 and its own processor (shortest side 224 bicubic, centre
  crop 224). GILL used the PIL-based `CLIPProcessor`, so the PIL backend of the processor is loaded here.
- `cvs`: the same cosine under CLIP ViT-B/32, MagicBrush's CLIP-I backbone.
- `dino_similarity`: MagicBrush's DINO score, the cosine of the CLS features of DINO ViT-S/16 after
  MagicBrush's own transform (resize 256 bicubic, centre crop 224, ImageNet mean/std). The Hugging Face
  dino-vits16 processor squashes to 224x224 instead, so that transform is fixed here, not loaded.
- `l1` / `l2`: MagicBrush's pixel distances in [0, 1], the generated image resized to the reference's size.
- `lpips`: GILL's `lpips_2dirs.py`, AlexNet LPIPS 0.1 on both images resized to 256x256 (antialiased).

`clip_model` / `cvs_model` may instead name an exported timm image tower, a `.safetensors` file with its
`VisionBackbone` arguments in a JSON sidecar beside it (`tower_args_path`: `vision.safetensors` ->
`vision.json`), as `ContrastiveTowers.export_image_tower` writes them: a world without a CLIP (the embedded
world) scores with its own stage-0 tower. Such scores are on that tower's scale, not CLIP's.

Similarities are cosines x100, as the paper's tables print them (GILL and MagicBrush print raw cosines).
Distances are raw: L1 0.05 and LPIPS 0.279 are the tables' 5.0 and 27.9, so a table multiplies them by 100.
Models load on first use, from a local directory or the Hugging Face cache only: nothing is downloaded.
- `fid` (a set score, not per pair): torchmetrics' FrechetInceptionDistance over the 2048-d pool features
  of torch-fidelity's Inception (the TF FID network), each image as it is (torchmetrics resizes to 299).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from morph_lightning.evaluation.perceptual import load_lpips

# MagicBrush's DINO transform (evaluation/image_eval.py)
DINO_TRANSFORM = T.Compose(
    [
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)
# torch-fidelity's FID Inception as torch.hub caches it (converted from the TensorFlow FID network)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
LPIPS_SIZE = 256  # GILL resizes both images to 256x256, "to match the AlexNet model used"
TOWER_SUFFIX = ".safetensors"  # a clip_model / cvs_model ending so is an exported image tower, not a CLIP

# An embedder: RGB images -> one feature row per image.
Embedder = Callable[[list[Image.Image]], torch.Tensor]


def _not_found(what: str, name: str, option: str, saved: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} model {name!r} not found locally: save it with {saved} and pass --option {option}=DIR, "
        "or put it in the Hugging Face cache"
    )


def embedder_name(model: str | None, option: str) -> str:
    """How a table names the image embedder of a similarity: CLIP, an image tower (on its own scale, not
    comparable with CLIP's numbers), or none given."""
    if not model:
        return f"no CLIP given (option {option})"
    if model.endswith(TOWER_SUFFIX):
        return f"image tower {model}, on its own scale, not CLIP's"
    return f"CLIP {model}"


def _rgb(images: list[Image.Image]) -> list[Image.Image]:
    return [image.convert("RGB") for image in images]


def _check_pairs(generated: list[Image.Image], reference: list[Image.Image]) -> None:
    if len(generated) != len(reference):
        raise ValueError(f"{len(generated)} generated images but {len(reference)} reference images")


class ImageScorer:
    """Per-pair scores of generated images against reference images (PIL images, paired by position)."""

    # metric name (as `score_pairs` takes it) -> the method giving its per-pair scores
    METRICS = {
        "clip": "clip_similarity",
        "cvs": "cvs",
        "dino": "dino_similarity",
        "l1": "l1",
        "l2": "l2",
        "lpips": "lpips",
    }

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        cvs_model: str = "openai/clip-vit-base-patch32",
        dino_model: str | None = None,
        lpips_net: str | None = "alex",
        device: str = "cpu",
        batch_size: int = 32,
        fid_weights: str | None = None,
    ) -> None:
        """`fid_weights`: torch-fidelity's Inception file; None looks for it in the torch hub cache."""
        self.clip_model, self.cvs_model, self.dino_model = clip_model, cvs_model, dino_model
        self.fid_weights = fid_weights
        self.lpips_net, self.device, self.batch_size = lpips_net, torch.device(device), batch_size

    # --- models, loaded on first use ---

    def _load_clip(self, name: str, option: str) -> Embedder:
        from transformers import CLIPImageProcessorPil, CLIPModel  # here: transformers is slow to import

        try:  # fp32, as GILL ran it (fp16 moves the third decimal)
            model = CLIPModel.from_pretrained(name, local_files_only=True, dtype=torch.float32)
            processor = CLIPImageProcessorPil.from_pretrained(name, local_files_only=True)
        except OSError:
            raise _not_found(
                "CLIP",
                name,
                option,
                "CLIPModel.save_pretrained(DIR) and CLIPImageProcessor.save_pretrained(DIR)",
            ) from None
        model = model.eval().to(self.device)

        def embed(images: list[Image.Image]) -> torch.Tensor:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            return model.get_image_features(pixel_values=pixels).pooler_output

        return embed

    def _load_tower(self, name: str, option: str) -> Embedder:
        """An exported image tower: the mean of its output tokens, which is the contrastive embedding of
        `ContrastiveTowers` before its projection (the projection is not exported). Images are prepared as
        the tower expects: its size and normalisation, CLIP's resize and centre crop."""
        # here: the stage module brings Lightning, slow to import
        from morph_lightning.data_modules.transforms import ImageTransforms
        from morph_lightning.modeling.vision import VisionBackbone
        from morph_lightning.stages.contrastive_towers import tower_args_path

        sidecar = tower_args_path(name)
        if not Path(name).is_file():
            raise FileNotFoundError(f"image tower {name} not found (option {option})")
        if not sidecar.is_file():
            raise FileNotFoundError(
                f"image tower {name} has no {sidecar}: write its VisionBackbone arguments there as a JSON "
                "object (ContrastiveTowers.export_image_tower does)"
            )
        try:
            args = json.loads(sidecar.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{sidecar}: not JSON ({err})") from None
        known = set(inspect.signature(VisionBackbone).parameters) - {"checkpoint_path"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(
                f"{sidecar}: {unknown} are no VisionBackbone arguments; put there only "
                f"{', '.join(sorted(known))} (the tower file {name} is the checkpoint)"
            )
        tower = VisionBackbone(checkpoint_path=name, **args).eval().to(self.device)
        prepare = ImageTransforms(tower.image_size, tower.image_size, tower.mean, tower.std).vision

        def embed(images: list[Image.Image]) -> torch.Tensor:
            return tower.embed(torch.stack([prepare(image) for image in images]).to(self.device))

        return embed

    def _load_image_embedder(self, name: str, option: str) -> Embedder:
        load = self._load_tower if name.endswith(TOWER_SUFFIX) else self._load_clip
        return load(name, option)

    @cached_property
    def _clip(self) -> Embedder:
        return self._load_image_embedder(self.clip_model, "clip_model")

    @cached_property
    def _cvs(self) -> Embedder:
        return self._load_image_embedder(self.cvs_model, "cvs_model")

    @cached_property
    def _dino(self) -> Embedder:
        if self.dino_model is None:
            raise ValueError("no DINO model given: pass dino_model=DIR (facebook/dino-vits16 saved there)")
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(self.dino_model, local_files_only=True, dtype=torch.float32)
        except OSError:
            raise _not_found(
                "DINO", self.dino_model, "dino_model", "AutoModel.save_pretrained(DIR)"
            ) from None
        model = model.eval().to(self.device)

        def embed(images: list[Image.Image]) -> torch.Tensor:
            pixels = torch.stack([DINO_TRANSFORM(image) for image in images]).to(self.device)
            return model(pixel_values=pixels).last_hidden_state[:, 0]  # the CLS token, as hub DINO returns

        return embed

    @cached_property
    def _lpips(self) -> torch.nn.Module:
        if self.lpips_net is None:
            raise ValueError("LPIPS is off (lpips_net=None)")
        distance, reason = load_lpips(self.lpips_net)
        if distance is None:
            raise FileNotFoundError(reason)
        return distance.model.to(self.device)

    # --- metrics ---

    @torch.inference_mode()
    def _features(self, embed: Embedder, images: list[Image.Image]) -> torch.Tensor:
        images = _rgb(images)
        chunks = [embed(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.cat(chunks).float().cpu()

    def _cosine_x100(
        self, embed: Embedder, generated: list[Image.Image], reference: list[Image.Image]
    ) -> list[float]:
        _check_pairs(generated, reference)
        if not generated:
            return []
        a, b = self._features(embed, generated), self._features(embed, reference)
        return (F.cosine_similarity(a, b, dim=-1) * 100).tolist()

    def clip_similarity(self, generated: list[Image.Image], reference: list[Image.Image]) -> list[float]:
        """GILL's CLIP image-image cosine per pair, x100 (text-to-image)."""
        return self._cosine_x100(self._clip, generated, reference)

    def cvs(self, generated: list[Image.Image], reference: list[Image.Image]) -> list[float]:
        """CLIP visual similarity per pair under the CVS backbone (MagicBrush's CLIP-I), x100 (editing)."""
        return self._cosine_x100(self._cvs, generated, reference)

    def dino_similarity(self, generated: list[Image.Image], reference: list[Image.Image]) -> list[float]:
        """MagicBrush's DINO cosine of CLS features per pair, x100 (editing)."""
        return self._cosine_x100(self._dino, generated, reference)

    @staticmethod
    def _pixel_distance(
        generated: list[Image.Image], reference: list[Image.Image], loss: Callable[..., torch.Tensor]
    ) -> list[float]:
        _check_pairs(generated, reference)
        scores = []
        for gen, ref in zip(_rgb(generated), _rgb(reference), strict=True):
            gen = gen.resize(ref.size)  # PIL's default filter, as MagicBrush calls it
            scores.append(float(loss(TF.to_tensor(gen), TF.to_tensor(ref))))
        return scores

    def l1(self, generated: list[Image.Image], reference: list[Image.Image]) -> list[float]:
        """MagicBrush's L1 per pair: mean |gen - ref| over C x H x W in [0, 1], gen resized to ref's size."""
        return self._pixel_distance(generated, reference, F.l1_loss)

    def l2(self, generated: list[Image.Image], reference: list[Image.Image]) -> list[float]:
        """MagicBrush's L2 per pair: the mean squared error, otherwise as `l1`."""
        return self._pixel_distance(generated, reference, F.mse_loss)

    @staticmethod
    def _lpips_input(image: Image.Image) -> torch.Tensor:
        """lpips.im2tensor (uint8 -> [-1, 1]), then GILL's resize of that tensor to 256x256."""
        x = torch.from_numpy(np.asarray(image) / 127.5 - 1).float().permute(2, 0, 1)
        return TF.resize(x, [LPIPS_SIZE, LPIPS_SIZE], antialias=True)

    @torch.inference_mode()
    def lpips(self, generated: list[Image.Image], reference: list[Image.Image]) -> list[float]:
        """GILL's LPIPS per pair, raw (the tables print x100: MA5k's 27.9 is 0.279)."""
        _check_pairs(generated, reference)
        model, scores = self._lpips, []
        gen_rgb, ref_rgb = _rgb(generated), _rgb(reference)
        for i in range(0, len(gen_rgb), self.batch_size):
            a, b = (
                torch.stack([self._lpips_input(image) for image in images[i : i + self.batch_size]])
                for images in (gen_rgb, ref_rgb)
            )
            scores += model(a.to(self.device), b.to(self.device)).flatten().tolist()
        return scores

    def score_pairs(
        self, generated: list[Image.Image], reference: list[Image.Image], metrics: tuple[str, ...]
    ) -> dict[str, float]:
        """The mean over pairs of each metric named in `metrics` (names from `METRICS`)."""
        unknown = [m for m in metrics if m not in self.METRICS]
        if unknown:
            raise ValueError(f"unknown image metrics {unknown}; known: {', '.join(self.METRICS)}")
        if not generated:
            raise ValueError("no image pairs to score")
        return {m: float(np.mean(getattr(self, self.METRICS[m])(generated, reference))) for m in metrics}

    def mean_over_files(
        self,
        pairs: list[tuple[object, object]],
        metrics: tuple[str, ...],
        read: Callable[[object], Image.Image],
    ) -> dict[str, float | None]:
        """The mean of each metric over (generated, reference) image sources, read with `read` a batch at a
        time, so a 30k-image set is never in memory at once; None for a metric when there are no pairs."""
        per_pair: dict[str, list[float]] = {m: [] for m in metrics}
        for k in range(0, len(pairs), self.batch_size):
            chunk = pairs[k : k + self.batch_size]
            generated, reference = [read(g) for g, _ in chunk], [read(r) for _, r in chunk]
            for m in metrics:
                per_pair[m] += getattr(self, self.METRICS[m])(generated, reference)
        return {m: float(np.mean(v)) if v else None for m, v in per_pair.items()}

    def _inception_file(self) -> str:
        path = Path(self.fid_weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
        if not path.is_file():  # torch-fidelity would download it: say where to put it instead
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}: copy torch-fidelity's {INCEPTION_FILE} there, "
                "or pass --option fid_weights=FILE"
            )
        return str(path)

    @torch.inference_mode()
    def fid_over_files(
        self, pairs: list[tuple[object, object]], read: Callable[[object], Image.Image]
    ) -> float | None:
        """FID of the generated images against the references (None below two pairs: no covariance), the
        images read a batch at a time; each image goes in as uint8 at its own size, same-size images of a
        batch together."""
        if len(pairs) < 2:
            return None
        from torchmetrics.image.fid import FrechetInceptionDistance  # imports torch-fidelity: only for FID

        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=self._inception_file())
        fid = fid.to(self.device)
        for k in range(0, len(pairs), self.batch_size):
            chunk = pairs[k : k + self.batch_size]
            for real, sources in ((False, [g for g, _ in chunk]), (True, [r for _, r in chunk])):
                by_size: dict[tuple[int, int], list[torch.Tensor]] = {}
                for image in _rgb([read(src) for src in sources]):
                    by_size.setdefault(image.size, []).append(torch.from_numpy(np.asarray(image).copy()))
                for same in by_size.values():
                    fid.update(torch.stack(same).permute(0, 3, 1, 2).to(self.device), real=real)
        return float(fid.compute())
