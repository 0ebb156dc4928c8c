"""Latents <-> images through the VAE, with A1111's NaN guard: a half-precision VAE that produces
NaNs is retried in float32 (and stays float32 for that model).

``tiled=True`` runs the VAE over overlapping tiles (diffusers' own tiled encode/decode, 25 % overlap,
blended), so a 2048×2048 decode needs the memory of a 512×512 one.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


class VAENaNError(RuntimeError):
    pass


TILE = 512  # pixels per tile side (64 latents): what every SD VAE decodes comfortably


@contextlib.contextmanager
def tiling(vae, on: bool, tile: int = TILE):
    """Within the block the VAE works in ``tile``-pixel tiles when ``on`` (its settings restored after)."""
    if not on:
        yield
        return
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = \
        True, tile, tile // factor, 0.25
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved


@torch.no_grad()
def decode(vae, latents: torch.Tensor, device: torch.device, tiled: bool = False) -> torch.Tensor:
    """Latents (already divided out of the sampler space) -> images in [0, 1], float32 on the CPU."""
    scaled = latents / vae.config.scaling_factor
    with tiling(vae, tiled):
        out = vae.decode(scaled.to(device, vae.dtype)).sample.float()
        if torch.isnan(out).any():
            if vae.dtype == torch.float32:
                raise VAENaNError("the VAE produced NaNs even in float32; the model or VAE file is likely broken")
            log.warning("VAE produced NaNs in half precision; retrying in float32 (use --no-half-vae to skip this)")
            vae.to(torch.float32)
            out = vae.decode(scaled.to(device, torch.float32)).sample.float()
    return ((out + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, device: torch.device, tiled: bool = False) -> torch.Tensor:
    """Images in [-1, 1] (B×3×H×W) -> scaled latents on the CPU, float32. The distribution's mean is
    used (A1111 samples it with an unseeded generator, which no one can reproduce)."""
    with tiling(vae, tiled):
        latent = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean.float()
        if torch.isnan(latent).any() and vae.dtype != torch.float32:
            log.warning("VAE encode produced NaNs in half precision; retrying in float32")
            vae.to(torch.float32)
            latent = vae.encode(pixels.to(device, torch.float32)).latent_dist.mean.float()
    return (latent * vae.config.scaling_factor).cpu()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)  # truncation, as A1111
    return [Image.fromarray(a) for a in arr]
