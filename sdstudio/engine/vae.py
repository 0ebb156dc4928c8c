"""Latents <-> images through the VAE, with A1111's NaN guard: a half-precision VAE that produces
NaNs is retried in float32 (and stays float32 for that model).

``tiled=True`` runs the VAE tile by tile (:mod:`.tiled_vae`): the same pixels, in bounded GPU memory.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from ..core.errors import MODEL_UNFIT, StudioError
from . import tiled_vae

log = logging.getLogger(__name__)


class VAENaNError(StudioError, RuntimeError):
    """The VAE gives NaNs even in float32: the checkpoint or VAE file is unusable (a 422, not a crash)."""

    kind = MODEL_UNFIT


def _decode(vae, scaled: torch.Tensor, tiled: bool) -> torch.Tensor:
    if tiled:
        out = tiled_vae.decode(vae, scaled)
        if out is not None:
            return out
        log.warning("tiled VAE: this VAE's layout is not one the tiler knows; decoding it whole")
    return vae.decode(scaled).sample.float()


def _encode(vae, pixels: torch.Tensor, tiled: bool) -> torch.Tensor:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if tiled and pixels.shape[-1] % factor == 0 and pixels.shape[-2] % factor == 0:
        moments = tiled_vae.encode_moments(vae, pixels)
        if moments is not None:
            return moments[:, :moments.shape[1] // 2]  # the mean half
    return vae.encode(pixels).latent_dist.mean.float()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, device: torch.device, tiled: bool = False) -> torch.Tensor:
    """Latents (already divided out of the sampler space) -> images in [0, 1], float32 on the CPU.
    ``tiled``: tile by tile (:mod:`.tiled_vae`), the same image in a fraction of the GPU memory."""
    scaled = latents / vae.config.scaling_factor + _shift(vae)
    out = _decode(vae, scaled.to(device, vae.dtype), tiled).float()
    if torch.isnan(out).any():
        if vae.dtype == torch.float32:
            raise VAENaNError("the VAE produced NaNs even in float32; the model or VAE file is likely broken")
        log.warning("VAE produced NaNs in half precision; retrying in float32 (use --no-half-vae to skip this)")
        vae.to(torch.float32)
        out = _decode(vae, scaled.to(device, torch.float32), tiled).float()
    return ((out + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, device: torch.device, tiled: bool = False) -> torch.Tensor:
    """Images in [-1, 1] (B×3×H×W) -> scaled latents on the CPU, float32. The distribution's mean is
    used (A1111 samples it with an unseeded generator, which no one can reproduce)."""
    latent = _encode(vae, pixels.to(device, vae.dtype), tiled).float()
    if torch.isnan(latent).any() and vae.dtype != torch.float32:
        log.warning("VAE encode produced NaNs in half precision; retrying in float32")
        vae.to(torch.float32)
        latent = _encode(vae, pixels.to(device, torch.float32), tiled).float()
    return ((latent - _shift(vae)) * vae.config.scaling_factor).cpu()


def _shift(vae) -> float:
    """The latent mean SD 3.x / Flux VAEs take out before scaling (0.0609 / 0.1159); 0 for SD 1.x / SDXL."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)  # truncation, as A1111
    return [Image.fromarray(a) for a in arr]
