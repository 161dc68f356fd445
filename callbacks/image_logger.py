"""ImageLogger: every N training steps, grids of what the model draws, in TensorBoard (the idea of
taming-transformers' ImageLogger).

Each grid holds one example per column, images mapped from [-1, 1] to [0, 1]:
- `images/reconstruction`: the batch's images (top) over what the decoder draws from their M̂ (bottom);
- `images/text_to_image`: one image per fixed prompt, generated greedily;
- `images/edit`: instruction samples with an image in the prompt and one in the answer (stage 3's
  edits): the last prompt image, the generated answer image, the target.
Stage 1 never trains the decoder (Eq. 4 has no image term), so there only `images/inputs` is logged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchvision.utils import make_grid

from morph_lightning.callbacks.tensorboard import tensorboard_writer
from morph_lightning.generation import generate, image_length
from morph_lightning.modeling.model import GenerationOutput, MorphModel
from morph_lightning.modeling.sequence import ImageRef, Sample
from morph_lightning.stages import MorphStage, Stage1AR


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside, then every submodule back to its own mode (frozen towers stay in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def image_grid(rows: list[Tensor]) -> Tensor:
    """Rows of images [K, 3, R, R] in [-1, 1] -> one [3, H, W] grid in [0, 1], K columns."""
    images = torch.cat([r.float().cpu() for r in rows])
    return make_grid((images + 1) / 2, nrow=len(rows[0]))


def _refs(pieces: list[Any], target: bool) -> list[int]:
    return [p.index for p in pieces if isinstance(p, ImageRef) and p.target == target]


def _answer_images(out: GenerationOutput, blank: Tensor) -> Tensor:
    """Each row's first generated image; a blank where a row drew none (it never opened <img>)."""
    return torch.stack([out.pixels[idx[0]].to(blank.dtype) if idx else blank for idx in out.images])


class ImageLogger(Callback):
    def __init__(
        self,
        every_n_steps: int = 1000,
        num_images: int = 4,
        prompts: list[str] | None = None,
        max_new_tokens: int = 64,
        log_first_step: bool = False,
    ) -> None:
        """`prompts`: text-to-image prompts, each given verbatim as a prompt (write them in the stage's
        format: a bare caption in stage 2, `USER: ... ASSISTANT: ` in stage 3). `log_first_step`: also
        draw before the first update (the model the stage starts from)."""
        super().__init__()
        if every_n_steps < 1 or num_images < 1:
            raise ValueError("ImageLogger: every_n_steps and num_images must be >= 1")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.prompts = list(prompts or [])
        self.max_new_tokens = max_new_tokens
        self.log_first_step = log_first_step
        self._last_step = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.log_first_step and trainer.global_step == 0:
            self._log(trainer, pl_module, batch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module, batch)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any]) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or trainer.global_step == self._last_step:  # accumulation: batches share a step
            return
        self._last_step = trainer.global_step
        # Sharded weights need every rank in each forward, so every rank draws (only rank 0 writes),
        # and drawings whose length depends on the rank's own data are left out.
        per_rank_data = pl_module.device_mesh is None or trainer.world_size == 1
        # Training's randomness is unaffected: MorphStage reseeds at the start of every step.
        with eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            grids = self.grids(pl_module, batch, per_rank_data)
        for tag, grid in grids.items():
            writer.add_image(tag, grid, global_step=trainer.global_step)

    def grids(
        self, stage: L.LightningModule, batch: dict[str, Any], per_rank_data: bool = True
    ) -> dict[str, Tensor]:
        """Tag -> grid for this batch (the module already in eval mode, without gradients)."""
        if "vqgan_pixels" not in batch:
            return {}
        if not isinstance(stage, MorphStage) or isinstance(stage, Stage1AR):
            return {"images/inputs": image_grid([batch["vqgan_pixels"][: self.num_images]])}
        grids = {}
        if "captions" in batch or per_rank_data:
            recon = self.reconstructions(stage, batch)
            if recon is not None:
                grids["images/reconstruction"] = image_grid(list(recon))
        if self.prompts:
            grids["images/text_to_image"] = image_grid([self.text_to_image(stage.model, batch)])
        if "samples" in batch and per_rank_data:
            edits = self.edits(stage.model, batch)
            if edits is not None:
                grids["images/edit"] = image_grid(list(edits))
        return grids

    def reconstructions(self, stage: MorphStage, batch: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """(images, drawn) [K, 3, R, R]: target images and what the decoder draws from their M̂, read as
        the stage's decoder term reads it (teacher-forced with the image's own morph tokens M)."""
        if "samples" in batch:  # instructions: the batch's own image answers
            samples = [s for s in batch["samples"] if _refs(s.answer, target=True)]
        else:  # pairs: the stage-2 loss's caption -> image row <Y, M>, whose M̂ feeds the decoder (Eq. 6)
            samples = [
                Sample(prompt=[c], answer=[ImageRef(i, target=True)]) for i, c in enumerate(batch["captions"])
            ]
        model = stage.model
        if not samples or model.decoder is None:  # without a decoder the LLM writes X itself
            return None
        enc = model.encode_images(batch["vision_pixels"])
        seq = stage.sequences(samples[: self.num_images], enc)
        targets = seq.targets[: self.num_images]
        # With `post_mllm: codes` this is the training path's straight-through Gumbel sample.
        mhat = model.post_mllm_tokens(model.run_llm(seq, enc), targets, enc)
        images = batch["vqgan_pixels"][[i for _, _, i in targets]]
        return images, model.draw(mhat, temperature=0.0)

    def text_to_image(self, model: MorphModel, batch: dict[str, Any]) -> Tensor:
        """[P, 3, R, R]: one greedy image per prompt (a blank where the model drew none)."""
        out = generate(model, [Sample(prompt=[p]) for p in self.prompts], **self._greedy(model))
        return _answer_images(out, torch.zeros_like(batch["vqgan_pixels"][0]))

    def edits(self, model: MorphModel, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor] | None:
        """(input, generated, target) [K, 3, R, R] for the batch's samples that map an image to an image."""
        picked = [
            s for s in batch["samples"] if _refs(s.prompt, target=False) and _refs(s.answer, target=True)
        ]
        picked = picked[: self.num_images]
        if not picked:
            return None
        pixels = batch["vqgan_pixels"]
        prompts = [Sample(prompt=s.prompt) for s in picked]
        # The VQGAN pixels too: `pre_mllm: vqgan` reads prompt images as their codes.
        out = generate(model, prompts, batch["vision_pixels"], vqgan_pixels=pixels, **self._greedy(model))
        inputs = pixels[[_refs(s.prompt, target=False)[-1] for s in picked]]
        targets = pixels[[_refs(s.answer, target=True)[0] for s in picked]]
        return inputs, _answer_images(out, torch.zeros_like(pixels[0])), targets

    def _greedy(self, model: MorphModel) -> dict[str, Any]:
        # Room for one whole image at least: with `post_mllm: vqgan` it is all of X's codes.
        steps = max(self.max_new_tokens, image_length(model) + 2)
        return {"max_new_tokens": steps, "temperature": 0.0, "image_temperature": 0.0}
