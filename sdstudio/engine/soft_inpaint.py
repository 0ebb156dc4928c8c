"""Soft inpainting, as A1111's built-in "Soft inpainting" script does it.

Plain inpainting rounds the mask to a hard edge in latent space and, after decoding, pastes the original
back through the blurred mask. Soft inpainting keeps the mask's blur instead:

1. every step, the denoiser's prediction is blended with the original latent through the soft mask
   raised to ``sigma ** power * scale`` ("Schedule bias", "Preservation strength"): early, noisy steps
   keep more of the original in partly masked places, late steps less. The blend interpolates each latent
   vector's length separately (a power mean with exponent ``detail``, "Transition contrast boost"), so a
   half-blended vector does not lose the contrast a plain linear mix would;
2. after sampling, the original is composited back where the result did not change much: the per-pixel
   distance between the final and the original latents, smoothed by two weighted percentile filters,
   gives the original's opacity (half at ``threshold``, sharper with ``contrast``; "Mask influence" lets
   the mask scale the threshold), upscaled and blurred into the overlay mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class SoftInpainting:
    """The six settings (the request's fields; A1111's defaults live there)."""

    power: float  # "Schedule bias" (mask_blend_power)
    scale: float  # "Preservation strength" (mask_blend_scale)
    detail: float  # "Transition contrast boost" (inpaint_detail_preservation)
    influence: float  # "Mask influence" (composite_mask_influence)
    threshold: float  # "Difference threshold" (composite_difference_threshold)
    contrast: float  # "Difference contrast" (composite_difference_contrast)

    @classmethod
    def of(cls, req) -> SoftInpainting | None:
        """The request's soft inpainting settings, or None when it is off (or the request has no mask)."""
        if not getattr(req, "soft_inpainting", False) or getattr(req, "mask", None) is None:
            return None
        return cls(req.mask_blend_power, req.mask_blend_scale, req.inpaint_detail_preservation,
                   req.composite_mask_influence, req.composite_difference_threshold, req.composite_difference_contrast)


def blend(init: torch.Tensor, current: torch.Tensor, repaint: torch.Tensor, sigma: torch.Tensor,
          soft: SoftInpainting) -> torch.Tensor:
    """One step's blend of the prediction ``current`` with ``init`` (N×C×h×w); ``repaint``: N×1×h×w soft mask
    (1 = repaint), ``sigma``: the step's noise level (a number or N×1×1×1)."""
    t = repaint.clamp(0, 1) ** (sigma ** soft.power * soft.scale)
    mixed = init * (1 - t) + current * t
    p = soft.detail
    length_now = mixed.norm(dim=1, keepdim=True).double() + 1e-5
    length_wanted = (init.norm(dim=1, keepdim=True).double() ** p * (1 - t)
                     + current.norm(dim=1, keepdim=True).double() ** p * t) ** (1 / p)
    return mixed * (length_wanted / length_now).to(mixed.dtype)


def composite_mask(repaint: torch.Tensor, init: torch.Tensor, final: torch.Tensor, soft: SoftInpainting,
                   size: tuple[int, int]) -> Image.Image:
    """The overlay mask (white = the result, black = the original) at ``size`` for one image: 1×1×h×w repaint
    mask, 1×C×h×w original and final latents."""
    r = repaint[0, 0].float().clamp(0, 1)
    bias = 1 - r ** (soft.scale / 2)  # where the mask keeps the original, a larger distance still keeps it
    bias = 0.5 * (1 - soft.influence) + bias * soft.influence
    bias = bias / (1.00001 - bias)
    distance = (final.float() - init.float()).norm(dim=1)[0]
    distance = percentile_filter(distance, 0.9, 1.0)  # a soft local maximum...
    distance = percentile_filter(distance, 0.25, 0.75)  # ...then a local interquartile mean
    ratio = distance / (soft.threshold * bias)  # (a threshold of 0: infinite, nothing of the original kept)
    kept = 1 / (1 + ratio ** soft.contrast)
    kept = smootherstep(kept.clamp(0, 1))
    mask = ((1 - kept) * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
    image = Image.fromarray(mask, "L").resize(size, Image.Resampling.LANCZOS)
    return image.filter(ImageFilter.GaussianBlur(4))


def smootherstep(x: torch.Tensor) -> torch.Tensor:
    return x * x * x * (x * (6 * x - 15) + 10)


def gaussian_kernel(stddev: float = 1.5, radius: int = 2) -> torch.Tensor:
    """(2r+1)² weights: a Gaussian lowered and rescaled so it is 1 at the centre and 0 one pixel past ``radius``."""
    def g(d2: float) -> float:
        return math.exp(-d2 / (stddev * stddev))

    zero = g((radius + 1.0) ** 2)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    d2 = coords[:, None] ** 2 + coords[None, :] ** 2
    return ((torch.exp(-d2 / (stddev * stddev)) - zero) / (1 - zero)).clamp(min=0)


def percentile_filter(image: torch.Tensor, lo: float, hi: float, min_width: float = 1.0,
                      kernel: torch.Tensor | None = None) -> torch.Tensor:
    """A weighted percentile filter of a 2-D map: at each pixel the window's values are sorted and stacked,
    each as high as its kernel weight; the result is the mean of the values in the stack between the
    ``lo`` and ``hi`` fractions of its height (at least ``min_width`` high), each counted by its overlap.
    lo=0, hi=1 is a weighted mean; a narrow window near 0.5 a weighted median, near 1 a maximum. Pixels
    past the border are left out (not padded)."""
    kernel = gaussian_kernel() if kernel is None else kernel
    k = kernel.shape[0]
    h, w = image.shape
    x = image.double()[None, None]
    inside = F.pad(torch.ones_like(x), (k // 2,) * 4)
    values = F.unfold(F.pad(x, (k // 2,) * 4), k)[0].T  # (h*w, k*k)
    weights = F.unfold(inside, k)[0].T * kernel.double().flatten()
    values, order = values.sort(dim=1)
    weights = weights.gather(1, order)
    top = weights.cumsum(1)
    bottom = top - weights
    total = top[:, -1:]
    low, high = total * lo, total * hi
    narrow = (high - low) < min_width
    centre = (low + high) / 2
    n_low, n_high = centre - min_width / 2, centre + min_width / 2
    past = n_high > total
    n_low, n_high = torch.where(past, total - min_width, n_low), torch.where(past, total, n_high)
    below = n_low < 0
    n_low = torch.where(below, torch.zeros_like(n_low), n_low)
    n_high = torch.where(below, torch.full_like(n_high, min_width), n_high)
    low, high = torch.where(narrow, n_low, low), torch.where(narrow, n_high, high)
    overlap = (torch.minimum(high, top) - torch.maximum(low, bottom)).clamp(min=0)
    sums = overlap.sum(1)
    out = torch.where(sums > 0, (values * overlap).sum(1) / sums.clamp(min=1e-300), torch.zeros_like(sums))
    return out.reshape(h, w).to(image.dtype)
