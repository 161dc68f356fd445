"""Frozen vision tower: images -> patch tokens ``V`` of shape ``[B, P, D_v]``.

The paper encodes images with EVA-CLIP-g (224 px, patch 14 -> 256 patch tokens) and keeps it
frozen. :class:`VisionBackbone` wraps two interchangeable implementations:

* ``backend="timm"`` - any timm ViT-like model (default ``eva_giant_patch14_clip_224.laion400m``),
  built with ``timm.create_model(name, num_classes=0, **model_kwargs)``;
* ``backend="transformers"`` - a Hugging Face ``CLIPVisionModel`` (e.g. ``openai/clip-vit-large-patch14``
  or a local directory written by ``save_pretrained``; a full ``CLIPModel`` checkpoint works too, its
  text tower is ignored).

Nothing here downloads weights unless the user explicitly asks for a hub name with ``pretrained=True``
(and even then a local hub cache is used when ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "VisionBackbone"]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_BACKENDS = ("timm", "transformers")


class VisionBackbone(nn.Module):
    """Image encoder producing patch tokens ``[B, P, out_dim]``.

    Args:
        backend: ``"timm"`` or ``"transformers"``.
        name: timm model name (``"eva_giant_patch14_clip_224.laion400m"``) or, for ``transformers``, a hub id
            or a local directory.
        pretrained: load pretrained weights. timm: from the hub / local hub cache (ignored when
            ``checkpoint_path`` is given: the file wins). transformers: ``CLIPVisionModel.from_pretrained``;
            with ``pretrained=False`` the model is randomly initialised from
            ``CLIPVisionConfig(**model_kwargs)`` when ``model_kwargs`` is given, else from ``name``'s config.
        checkpoint_path: timm: a local weight file (``.safetensors`` or a torch file; a raw state dict or one
            nested under ``state_dict``/``model``/``state_dict_ema``). It is loaded through timm's own
            pretrained-loading path (``pretrained_cfg_overlay=dict(file=...)``), so the model's checkpoint
            filter runs: OpenCLIP / EVA-CLIP ``visual.*`` checkpoints are converted, position embeddings are
            resampled to ``img_size`` and a classifier head that does not fit ``num_classes=0`` is dropped.
            transformers: a local directory used instead of ``name``.
        model_kwargs: timm: extra ``create_model`` kwargs (``img_size``, ``embed_dim`` ...). transformers:
            ``CLIPVisionConfig`` fields when ``pretrained=False``, else extra ``from_pretrained`` kwargs
            (``dtype``, ``attn_implementation`` ...).
        image_size: input resolution. ``None`` -> the model's native resolution. timm: an explicit value is
            passed to ``create_model`` as ``img_size`` (unless ``model_kwargs`` already has one, which must
            then agree). transformers: a value different from ``config.image_size`` turns on CLIP's
            ``interpolate_pos_encoding``.
        mean, std: per-channel normalisation used by :meth:`normalize` (OpenAI CLIP statistics by default,
            which is also what EVA-CLIP was trained with).
        drop_cls: drop prefix tokens (CLS / registers) so only the ``num_patches`` patch tokens remain.
        frozen: ``requires_grad_(False)``, permanently in eval mode (``train()`` is a no-op) and the forward
            runs under ``torch.no_grad()``.
        feature_layer: which layer's tokens to return, indexed like Hugging Face ``hidden_states``
            (``0`` = embeddings, ``k`` = output of block ``k``, negative counts from the end).
            ``-1`` (default) is the final output: timm ``forward_features`` (which *includes* the model's
            final norm) or CLIP's ``last_hidden_state`` (no norm there; CLIP's ``post_layernorm`` only
            touches the pooled CLS). Other values return the raw block output without any final norm:
            ``-2`` is the penultimate block, as used by LLaVA (CLIP) and BLIP-2 (EVA-CLIP-g, which then
            applies its own LayerNorm). The timm backend cannot return the embeddings (``0``).
    """

    def __init__(
        self,
        backend: str = "timm",
        name: str = "eva_giant_patch14_clip_224.laion400m",
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        std: tuple[float, float, float] = OPENAI_CLIP_STD,
        drop_cls: bool = True,
        frozen: bool = True,
        feature_layer: int = -1,
    ) -> None:
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"Unknown vision backend {backend!r}; expected one of {_BACKENDS}.")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean/std must have 3 channels, got {mean!r} / {std!r}.")
        self.backend = backend
        self.name = name
        self.drop_cls = drop_cls
        self.frozen = frozen
        self.feature_layer = int(feature_layer)
        self.interpolate_pos_encoding = False
        model_kwargs = dict(model_kwargs or {})

        if backend == "timm":
            self.model = self._build_timm(name, pretrained, checkpoint_path, model_kwargs, image_size)
            self._out_dim = int(self.model.num_features)
            self._num_prefix = int(getattr(self.model, "num_prefix_tokens", 0))
            self._depth = len(self.model.blocks) if hasattr(self.model, "blocks") else None
            grid = self._timm_grid(self.model)
            self._num_patches = grid[0] * grid[1]
            self.patch_size = int(self._timm_patch_size(self.model))
            self.image_size = int(image_size) if image_size is not None else grid[0] * self.patch_size
        else:
            self.model = self._build_transformers(name, pretrained, checkpoint_path, model_kwargs)
            cfg = self.model.config
            self._out_dim = int(cfg.hidden_size)
            self._num_prefix = 1  # the CLS token
            self._depth = int(cfg.num_hidden_layers)
            self.patch_size = int(cfg.patch_size)
            self.image_size = int(image_size) if image_size is not None else int(cfg.image_size)
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch size {self.patch_size}."
                )
            self.interpolate_pos_encoding = self.image_size != int(cfg.image_size)
            self._num_patches = (self.image_size // self.patch_size) ** 2

        if self._depth is not None:
            n = self._depth + 1  # number of hidden states (embeddings + one per block)
            if not -n <= self.feature_layer < n:
                raise ValueError(
                    f"feature_layer {feature_layer} out of range for a {self._depth}-block model."
                )
            if backend == "timm" and self.feature_layer % n == 0:
                raise ValueError("feature_layer 0 (patch embeddings) is not supported by the timm backend.")
        elif self.feature_layer != -1:
            raise ValueError(f"timm model {name!r} has no `blocks`; only feature_layer=-1 is supported.")

        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

        if frozen:
            self.model.requires_grad_(False)
        self.train(self.training)

    # ------------------------------------------------------------------ builders
    @staticmethod
    def _build_timm(
        name: str,
        pretrained: bool,
        checkpoint_path: str | None,
        kwargs: dict[str, Any],
        image_size: int | None,
    ) -> nn.Module:
        import timm

        if image_size is not None:
            img_size = kwargs.setdefault("img_size", int(image_size))
            sizes = {int(s) for s in (img_size if isinstance(img_size, (tuple, list)) else (img_size,))}
            if sizes != {int(image_size)}:
                raise ValueError(f"image_size={image_size} disagrees with model_kwargs img_size={img_size}.")
        kwargs.setdefault("num_classes", 0)
        if checkpoint_path is not None:
            # timm's pretrained path with a file override: runs the model's checkpoint filter
            # (EVA-CLIP / OpenCLIP conversion, pos-embed resampling) and drops a mismatched classifier.
            overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
            overlay["file"] = str(checkpoint_path)
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    @staticmethod
    def _build_transformers(
        name: str, pretrained: bool, checkpoint_path: str | None, kwargs: dict[str, Any]
    ) -> nn.Module:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        source = str(checkpoint_path) if checkpoint_path is not None else name
        if pretrained or checkpoint_path is not None:
            return CLIPVisionModel.from_pretrained(source, **kwargs)
        if kwargs:
            return CLIPVisionModel(CLIPVisionConfig(**kwargs))
        return CLIPVisionModel(CLIPVisionConfig.from_pretrained(source))

    @staticmethod
    def _timm_grid(model: nn.Module) -> tuple[int, int]:
        patch_embed = getattr(model, "patch_embed", None)
        grid = getattr(patch_embed, "grid_size", None)
        if grid is None:
            raise ValueError(f"timm model {type(model).__name__} has no patch_embed.grid_size (not a ViT?).")
        return int(grid[0]), int(grid[1])

    @staticmethod
    def _timm_patch_size(model: nn.Module) -> int:
        ps = model.patch_embed.patch_size
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)

    # ------------------------------------------------------------------ properties
    @property
    def out_dim(self) -> int:
        """Channel width ``D_v`` of the returned tokens."""
        return self._out_dim

    @property
    def num_patches(self) -> int:
        """Number of patch tokens ``P`` (prefix/CLS tokens excluded)."""
        return self._num_patches

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix (CLS / register) tokens the model prepends to the patch tokens."""
        return self._num_prefix

    @property
    def num_tokens(self) -> int:
        """Sequence length returned by :meth:`forward` (``num_patches`` plus prefix tokens unless dropped)."""
        return self._num_patches + (0 if self.drop_cls else self._num_prefix)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> VisionBackbone:
        """Set train mode; a frozen backbone always stays in eval mode (no dropout / drop-path)."""
        return super().train(bool(mode) and not self.frozen)

    # ------------------------------------------------------------------ preprocessing
    def normalize(self, images01: Tensor) -> Tensor:
        """Map ``[0, 1]`` images (``[B,3,H,W]`` or ``[3,H,W]``; ``uint8`` is divided by 255) to model input.

        Resizes to ``image_size x image_size`` (bicubic, antialiased, aspect ratio *not* kept - crop first if
        that matters), clamps the bicubic overshoot back into ``[0, 1]`` and applies ``(x - mean) / std``.
        The result is float32 on the input's device.
        """
        unbatched = images01.dim() == 3
        x = images01.unsqueeze(0) if unbatched else images01
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [B,3,H,W] or [3,H,W], got {tuple(images01.shape)}.")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            ).clamp_(0.0, 1.0)
        mean, std = channel_stats(self.mean, self.std, x.device)
        x = (x - mean) / std
        return x.squeeze(0) if unbatched else x

    def denormalize(self, pixels: Tensor) -> Tensor:
        """Model input [B, 3, S, S] back to images in [0, 1] (at the tower's size)."""
        mean, std = channel_stats(self.mean, self.std, pixels.device)
        return (pixels.float() * std + mean).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ forward
    @staticmethod
    def pool(tokens: Tensor) -> Tensor:
        """Tokens [B, N, D] -> one embedding per image [B, D]: their mean (a CLIP-style image embedding;
        the world's image tower was trained contrastively on exactly this mean)."""
        return tokens.mean(1)

    def embed(self, pixels: Tensor) -> Tensor:
        """One embedding per image [B, out_dim]: `pool` of its tokens."""
        return self.pool(self(pixels))

    def forward(self, pixels: Tensor) -> Tensor:
        """``pixels`` (already normalised, ``[B,3,S,S]``) -> tokens ``[B, num_tokens, out_dim]``."""
        param = next(self.model.parameters(), None)
        if param is not None and pixels.is_floating_point() and pixels.dtype != param.dtype:
            pixels = pixels.to(param.dtype)
        if self.frozen:
            with torch.no_grad():
                return self._encode(pixels)
        return self._encode(pixels)

    def _encode(self, pixels: Tensor) -> Tensor:
        if self.backend == "timm":
            return self._encode_timm(pixels)
        if self.feature_layer == -1:
            out = self.model(pixel_values=pixels, interpolate_pos_encoding=self.interpolate_pos_encoding)
            tokens = out.last_hidden_state
        else:
            out = self.model(
                pixel_values=pixels,
                interpolate_pos_encoding=self.interpolate_pos_encoding,
                output_hidden_states=True,
            )
            tokens = out.hidden_states[self.feature_layer]
        return tokens[:, self._num_prefix :] if self.drop_cls else tokens

    def _encode_timm(self, pixels: Tensor) -> Tensor:
        if self.feature_layer == -1:
            tokens = self.model.forward_features(pixels)
            return tokens[:, self._num_prefix :] if self.drop_cls else tokens
        # hidden_states index -> absolute block index (hidden_states[k] is the output of block k-1)
        n = self._depth + 1
        block = self.feature_layer % n - 1
        feats = self.model.forward_intermediates(
            pixels,
            indices=[block],
            return_prefix_tokens=not self.drop_cls,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
        if self.drop_cls:
            return feats
        patches, prefix = feats
        return patches if prefix is None else torch.cat([prefix, patches], dim=1)


def channel_stats(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel statistics as float32 [1, 3, 1, 1] tensors, built per call (not buffers) so that a
    bf16/fp16 cast of a module cannot degrade them."""
    shape = (1, 3, 1, 1)
    return torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)
