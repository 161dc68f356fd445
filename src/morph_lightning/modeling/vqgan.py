"""The VQGAN image tokenizer of taming-transformers (Esser et al., 2021), written from its description.

Module names follow taming's layout exactly so that its released checkpoints (for instance
``vqgan_imagenet_f16_16384/last.ckpt``) load by key into :class:`VQGAN`.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .code_usage import CodeUsage

log = logging.getLogger(__name__)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # taming only creates the 1x1 shortcut when the width changes, so the key exists only then.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1 convs as projections."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def heads(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(heads(self.q(hn)), heads(self.k(hn)), heads(self.v(hn)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only), as taming does, keeps its weights aligned.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: resnet blocks, each followed by attention when the level has it."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attn: bool, dropout: float, groups: int):
        super().__init__()
        widths = [in_ch] + [out_ch] * n_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], out_ch, dropout, groups) for j in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(n_blocks if attn else 0))

    def forward(self, h: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        in_channels: int,
        z_channels: int,
        dropout: float,
        groups: int,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        widths = [ch] + [ch * m for m in ch_mult]
        for i in range(len(ch_mult)):
            res = resolution // 2**i
            level = _Level(widths[i], widths[i + 1], num_res_blocks, res in attn_resolutions, dropout, groups)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(widths[i + 1])
            self.down.append(level)
        self.mid = _Mid(widths[-1], dropout, groups)
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        out_ch: int,
        z_channels: int,
        dropout: float,
        groups: int,
    ) -> None:
        super().__init__()
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = _Mid(top, dropout, groups)
        # up[i] works at the same resolution as encoder.down[i]; it runs from the last index to 0,
        # and has one more resnet block than the encoder level, as in taming.
        self.up = nn.ModuleList()
        for i in range(len(ch_mult)):
            in_ch = ch * ch_mult[i + 1] if i + 1 < len(ch_mult) else top
            out = ch * ch_mult[i]
            res = resolution // 2**i
            level = _Level(in_ch, out, num_res_blocks + 1, res in attn_resolutions, dropout, groups)
            if i != 0:
                level.upsample = Upsample(out)
            self.up.append(level)
        self.norm_out = _norm(ch * ch_mult[0], groups)
        self.conv_out = nn.Conv2d(ch * ch_mult[0], out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: Tensor) -> Tensor:
        """[B, C, H, W] latents -> [B, H*W] indices of the nearest codebook entries (row-major)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight
        # ||z||^2 is the same for every entry, so it does not change the argmin.
        dist = (e * e).sum(1) - 2.0 * flat @ e.t()
        return dist.argmin(1).view(z.shape[0], -1)

    def lookup(self, codes: Tensor, h: int, w: int) -> Tensor:
        """[B, h*w] indices -> [B, C, h, w] codebook vectors."""
        return self.embedding(codes).view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        codes = self.codes(z)
        z_q = self.lookup(codes, z.shape[2], z.shape[3])
        # ||sg[z] - e||^2 moves the codebook, beta * ||z - sg[e]||^2 commits the encoder.
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return z_q, loss, codes


class VQGAN(nn.Module):
    """Encoder, quantizer and decoder of taming's ``VQModel`` (images in [-1, 1])."""

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        in_channels: int = 3,
        out_ch: int = 3,
        z_channels: int = 256,
        embed_dim: int = 256,
        n_embed: int = 16384,
        dropout: float = 0.0,
        beta: float = 0.25,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if num_res_blocks == 0 and any(m != 1 for m in ch_mult):
            # the encoder's resnet blocks are what change a level's width (as in taming, which also fails)
            raise ValueError(f"VQGAN: num_res_blocks 0 needs ch_mult of all 1s (got {list(ch_mult)})")
        self.resolution = resolution  # of the images in and out
        self.latent_size = resolution // 2 ** (len(ch_mult) - 1)
        common = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            resolution=resolution,
            z_channels=z_channels,
            dropout=dropout,
            groups=norm_groups,
        )
        self.encoder = Encoder(in_channels=in_channels, **common)
        self.decoder = Decoder(out_ch=out_ch, **common)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def codes_per_image(self) -> int:
        return self.latent_size**2

    @property
    def codebook(self) -> Tensor:
        return self.quantize.embedding.weight

    def latents(self, images: Tensor) -> Tensor:
        """[B, 3, R, R] images in [-1, 1] -> [B, embed_dim, h, w] latents before quantisation."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode_to_codes(self, images: Tensor) -> Tensor:
        """[B, 3, R, R] images in [-1, 1] -> [B, h*w] long codes, row-major (no grad: codes are discrete)."""
        return self.quantize.codes(self.latents(images))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """[B, h*w] codes -> [B, 3, R, R] images (not clamped)."""
        z_q = self.quantize.lookup(codes, self.latent_size, self.latent_size)
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (reconstruction, codebook loss, codes [B, h*w])."""
        return self._quantize_decode(self.latents(images))

    def _quantize_decode(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z_q, codebook_loss, codes = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q)), codebook_loss, codes

    def reconstruction_loss(
        self,
        images: Tensor,
        code_usage: CodeUsage | None = None,
        l2_weight: float = 0.0,
        pixel_weight: Tensor | None = None,
        quantize: bool = True,
    ) -> dict[str, Tensor]:
        """L1 reconstruction (+ `l2_weight` * MSE) + codebook loss. In training, `code_usage` (kept outside
        so the state dict stays taming's) counts the codes picked and revives dead ones from this batch.
        `pixel_weight` ([B, 1, R, R]) weighs the reconstruction error per pixel; `quantize=False` decodes
        the latents as they are (a plain autoencoder, codebook loss 0)."""
        z = self.latents(images)
        if quantize:
            track = code_usage is not None and self.training
            if track:
                code_usage.revive(self.codebook, z.detach().permute(0, 2, 3, 1).flatten(0, 2))
            recon, codebook_loss, codes = self._quantize_decode(z)
            if track:
                code_usage.update(codes)
        else:
            recon, codebook_loss = self.decoder(self.post_quant_conv(z)), z.new_zeros(())
        error = recon - images
        weight = 1.0 if pixel_weight is None else pixel_weight
        rec, l2 = (weight * error.abs()).mean(), (weight * error.square()).mean()
        return {"rec": rec, "l2": l2, "codebook": codebook_loss, "loss": rec + l2_weight * l2 + codebook_loss}

    @classmethod
    def frozen(cls, checkpoint: str | Path | None, **arch_kwargs) -> VQGAN:
        """The paper's pretrained tokenizer as the stages use it: loaded from a taming checkpoint (random
        when None), without gradients, in eval mode (owners keep it there when they switch to train)."""
        model = cls.from_taming_checkpoint(checkpoint, **arch_kwargs) if checkpoint else cls(**arch_kwargs)
        return model.requires_grad_(False).eval()

    @classmethod
    def from_taming_checkpoint(cls, path: str | Path, **arch_kwargs) -> VQGAN:
        """Builds a VQGAN from ``arch_kwargs`` and loads a taming Lightning checkpoint or plain state dict."""
        try:
            with torch.serialization.safe_globals(_TAMING_CALLBACK_KEYS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path}: cannot be read with torch.load(weights_only=True) (it pickles more than tensors). "
                "In a trusted environment, re-save just its 'state_dict' as a plain dict of tensors and load "
                f"that instead. Unpickler said: {err}"
            ) from err
        state_dict = obj["state_dict"] if isinstance(obj, Mapping) and "state_dict" in obj else obj
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{path}: expected a state dict or a checkpoint holding one, got {type(obj)}")
        model = cls(**arch_kwargs)
        load_taming_state_dict(model, state_dict, str(path))
        return model


class _CallbackKey:
    """Stands in for the callback classes that Lightning 1.x checkpoints (taming's) use as dict keys
    under "callbacks": a key is only a name, so nothing of Lightning 1.x is imported or run."""


_TAMING_CALLBACK_KEYS = [
    (_CallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_CallbackKey, "pytorch_lightning.callbacks.early_stopping.EarlyStopping"),
]


def load_taming_state_dict(model: VQGAN, state_dict: Mapping[str, Tensor], path_for_errors: str) -> None:
    """Strictly loads taming weights, dropping only its training-loss modules (``loss.*``: GAN, LPIPS)."""
    dropped = [k for k in state_dict if k.startswith("loss.")]
    if dropped:
        log.info("%s: ignoring %d training-loss keys (loss.*)", path_for_errors, len(dropped))
    weights = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    expected = model.state_dict()

    def first(keys: set[str]) -> str:
        return ", ".join(sorted(keys)[:5]) + (", ..." if len(keys) > 5 else "")

    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"{path_for_errors}: checkpoint does not match the VQGAN architecture; "
            f"missing {len(missing)} keys [{first(missing)}], unexpected {len(unexpected)} keys "
            f"[{first(unexpected)}]"
        )
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            raise ValueError(
                f"{path_for_errors}: shape mismatch for {key}: checkpoint {tuple(weights[key].shape)}, "
                f"model {tuple(tensor.shape)}"
            )
    model.load_state_dict(weights, strict=True)
