"""img2img and inpainting: from init images and a mask to what the sampler starts from.

:func:`prepare` does A1111's image side once per job: resize mode, binary mask, mask blur,
"only masked" crop, masked content "fill", the overlay that restores unmasked pixels, and the VAE
encoding. Each batch then gets its init latents, the :class:`LatentMask` the denoiser blends with
(``denoised = init * keep + (1 - keep) * denoised``, or soft inpainting's blend) and, for 9-channel
inpainting UNets, the image conditioning (mask + masked-image latent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..core import imageops
from ..core.params import Img2ImgRequest, RequestError
from . import soft_inpaint
from . import vae as vae_ops

FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = range(4)


@dataclass
class Prepared:
    """One init image, processed."""

    image: Image.Image  # what was encoded (W×H)
    latent: torch.Tensor  # 1×C×h×w, scaled
    keep: torch.Tensor | None  # 1×1×h×w, 1 = keep the original latent (None: no mask); 0/1 unless soft
    overlay_base: Image.Image | None  # the original the result is pasted back onto
    overlay_mask: Image.Image | None  # blurred mask at overlay_base's size (white = result)
    region: tuple[int, int, int, int] | None  # "only masked": where the result goes in overlay_base
    image_cond: torch.Tensor | None  # 9-channel models: 1×5×h×w


def open_image(path: str | Image.Image, what: str) -> Image.Image:
    """A path's image, loaded; a PIL image (a script's inner pass hands over its tiles) as it is."""
    if isinstance(path, Image.Image):
        return path
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as exc:
        raise RequestError(f"{what}: cannot read the image ({exc})") from None


def flatten(image: Image.Image) -> Image.Image:
    """A1111's ``images.flatten``: an RGBA picture on white (its ``img2img_background_color``), then RGB; other
    modes are converted as they are."""
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> 1×3×H×W in [-1, 1] (what the VAE encodes)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def prepare(req: Img2ImgRequest, vae, device: torch.device, inpainting_model: bool) -> list[Prepared]:
    mask_src = binary_mask = None
    if req.mask:
        mask_src = imageops.binary_mask(open_image(req.mask, "mask"))
        if req.inpainting_mask_invert:
            mask_src = ImageOps.invert(mask_src)
    out = []
    for n, path in enumerate(req.init_images):
        original = flatten(open_image(path, f"init image {n + 1}"))
        region = overlay_base = overlay_mask = None
        if mask_src is not None:
            mask = mask_src if mask_src.size == original.size else mask_src.resize(original.size, Image.Resampling.LANCZOS)
            blurred = imageops.blur_mask(mask, req.mask_blur) if req.mask_blur > 0 else mask
            if req.inpaint_full_res:
                box = imageops.crop_region(mask, req.inpaint_full_res_padding) or (0, 0, *original.size)
                region = imageops.expand_to_ratio(box, req.width, req.height, *original.size)
                overlay_base, overlay_mask = original, blurred
                image = original.crop(region).resize((req.width, req.height), Image.Resampling.LANCZOS)
                binary_mask = blurred.crop(region).resize((req.width, req.height), Image.Resampling.LANCZOS)
            else:
                image = imageops.resize_image(req.resize_mode, original, req.width, req.height)
                binary_mask = imageops.resize_image(req.resize_mode, blurred, req.width, req.height)
                overlay_base, overlay_mask = image, binary_mask
            if req.inpainting_fill == FILL:
                image = imageops.fill_masked(image, binary_mask)
        elif req.resize_mode == 3:  # latent upscale: encode at the image's own size (multiple of 8)
            image = original.resize((max(8, original.width // 8 * 8), max(8, original.height // 8 * 8)),
                                    Image.Resampling.LANCZOS)
        else:
            image = imageops.resize_image(req.resize_mode, original, req.width, req.height)
        pixels = to_tensor(image)
        latent = vae_ops.encode(vae, pixels, device, req.tiled_vae)
        if latent.shape[-2:] != (req.height // 8, req.width // 8):
            latent = F.interpolate(latent, size=(req.height // 8, req.width // 8), mode="bilinear")
        keep = None
        if binary_mask is not None:
            small = binary_mask.convert("RGB").resize((req.width // 8, req.height // 8), Image.Resampling.BICUBIC)
            repaint = np.asarray(small, dtype=np.float32)[..., 0] / 255.0
            if not req.soft_inpainting:  # soft inpainting keeps the blur's partial values
                repaint = np.around(repaint)
            keep = torch.from_numpy(1.0 - repaint)[None, None]
        image_cond = None
        if inpainting_model:
            image_cond = inpaint_conditioning(vae, device, pixels, binary_mask, req.inpainting_mask_weight,
                                              latent.shape[-2:])
        out.append(Prepared(image, latent, keep, overlay_base, overlay_mask, region, image_cond))
    return out


def inpaint_conditioning(vae, device, pixels: torch.Tensor, mask: Image.Image | None, weight: float,
                         latent_size) -> torch.Tensor:
    """A 9-channel UNet's extra input: the repaint mask and the latent of the image with the masked
    part blanked, blended toward the full image by ``1 - weight`` (A1111's "conditioning mask strength")."""
    if mask is None:
        cmask = torch.ones(1, 1, *pixels.shape[-2:])
    else:
        cmask = torch.from_numpy(np.around(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0))[None, None]
    blanked = torch.lerp(pixels, pixels * (1.0 - cmask), weight)
    latent = vae_ops.encode(vae, blanked, device)
    small = F.interpolate(cmask, size=tuple(latent_size))
    return torch.cat([small, latent], dim=1)


def txt2img_conditioning(vae, device, batch: int, height: int, width: int) -> torch.Tensor:
    """A 9-channel UNet used for txt2img: all-repaint mask and the latent of a mid-grey image."""
    latent = vae_ops.encode(vae, torch.zeros(1, 3, height, width), device)
    return torch.cat([torch.ones(1, 1, *latent.shape[-2:]), latent], dim=1).repeat(batch, 1, 1, 1)


@dataclass
class LatentMask:
    """What the denoiser blends each prediction with: the init latent where ``keep`` is 1 (N×1×h×w)."""

    init: torch.Tensor
    keep: torch.Tensor
    soft: soft_inpaint.SoftInpainting | None = None

    def blend(self, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        init, keep = self.init.to(denoised.device), self.keep.to(denoised.device)
        if self.soft is not None:
            return soft_inpaint.blend(init, denoised, 1 - keep, sigma, self.soft)
        return init * keep + (1 - keep) * denoised

    def final(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's result: the original where the mask keeps it (soft inpainting composites in pixels
        instead, see :func:`finish`)."""
        if self.soft is not None:
            return latents
        return latents * (1 - self.keep) + self.init * self.keep


def finish(prepared: Prepared, result: Image.Image, latent: torch.Tensor | None = None,
           soft: soft_inpaint.SoftInpainting | None = None) -> Image.Image:
    """Paste the original back outside the mask (exactly, where the blurred mask is 0). With soft inpainting
    (``latent``: the result's final latent), the original goes back where the result changed little."""
    if prepared.overlay_mask is None:
        return result
    mask = prepared.overlay_mask
    if soft is not None and latent is not None and prepared.keep is not None:
        mask = soft_inpaint.composite_mask(1 - prepared.keep, prepared.latent, latent.cpu(), soft, result.size)
        if prepared.region is not None:  # "only masked": the mask goes where the result goes
            x1, y1, x2, y2 = prepared.region
            full = Image.new("L", prepared.overlay_base.size, 0)
            full.paste(mask.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            mask = full
    return imageops.overlay(result, prepared.overlay_base, mask, prepared.region)
