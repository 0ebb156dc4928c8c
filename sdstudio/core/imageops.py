"""Picture geometry for img2img and inpainting, as A1111 does it (PIL and numpy, no torch).

- :func:`resize_image`: the four resize modes (Just resize, Crop and resize, Resize and fill, and
  Just resize (latent upscale), whose pixel part is a plain resize).
- Masks: :func:`binary_mask` (threshold at 128, alpha channel of an RGBA drawing), :func:`blur_mask`
  (Gaussian, kernel radius ``int(2.5 * blur + 0.5)``), :func:`fill_masked` ("fill" masked content:
  the hole painted with ever finer blurs of its surroundings).
- "Only masked": :func:`crop_region` (the mask's box plus padding) widened by :func:`expand_to_ratio`
  to the processing size's aspect ratio.
- :func:`overlay`: the original pasted back over the result outside the mask, so unmasked pixels
  are the original's exactly.
- :func:`inpaint_sketch`: A1111's "Inpaint sketch": the mask is where the sketch differs from the
  original, the init is the (blurred) strokes over the original.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# The formats an uploaded image may be in. PIL reads many more, some through outside programs (EPS runs Ghostscript).
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")  # JPEG includes MPO (phones)

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def _resize(im: Image.Image, w: int, h: int) -> Image.Image:
    return im if im.size == (w, h) else im.resize((w, h), Image.Resampling.LANCZOS)


def resize_image(mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """``im`` brought to ``width`` × ``height`` by A1111's resize mode ``mode`` (0-3)."""
    if mode in (0, 3):
        return _resize(im, width, height)
    ratio, src_ratio = width / height, im.width / im.height
    if mode == 1:  # crop and resize: fill the frame, cut what sticks out
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:  # resize and fill: fit inside, stretch the edge rows/columns into the bands
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = _resize(im, src_w, src_h)
    out = Image.new(im.mode if im.mode in ("RGB", "L") else "RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:
        if ratio < src_ratio:
            band = height // 2 - src_h // 2
            if band > 0:
                out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                          box=(0, band + src_h))
        elif ratio > src_ratio:
            band = width // 2 - src_w // 2
            if band > 0:
                out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                          box=(band + src_w, 0))
    return out


def binary_mask(mask: Image.Image, threshold: bool = True) -> Image.Image:
    """An uploaded or drawn mask as "L": white = repaint. A transparent RGBA drawing uses its alpha."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.split()[-1]
    mask = mask.convert("L")
    return mask.point(lambda v: 255 if v > 128 else 0) if threshold else mask


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float | None = None) -> Image.Image:
    """Gaussian blur of a mask, separately in x and y (A1111's "Mask blur")."""
    from scipy.ndimage import gaussian_filter1d

    blur_y = blur_x if blur_y is None else blur_y
    arr = np.asarray(mask, dtype=np.float64)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma > 0:
            radius = int(2.5 * sigma + 0.5)
            arr = gaussian_filter1d(arr, sigma, axis=axis, mode="mirror", truncate=radius / sigma)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted from its surroundings: blurs of the unmasked pixels at falling radii,
    each laid over the last (A1111's "fill")."""
    keep = ImageOps.invert(mask.convert("L"))
    src = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    alpha = np.asarray(keep, dtype=np.float64) / 255.0
    premultiplied = Image.fromarray(np.uint8(np.rint(np.dstack([src * alpha[..., None], alpha]) * 255)), "RGBA")
    out = np.zeros(src.shape[:2] + (3,))
    out_alpha = np.zeros(src.shape[:2])
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied
        b = np.asarray(blurred, dtype=np.float64) / 255.0
        a = b[..., 3]
        colour = np.where(a[..., None] > 0, b[..., :3] / np.maximum(a[..., None], 1e-8), 0)
        for _ in range(repeats):  # "over" compositing of the blurred layer onto what is there
            new_alpha = a + out_alpha * (1 - a)
            out = np.where(new_alpha[..., None] > 0,
                           (colour * a[..., None] + out * out_alpha[..., None] * (1 - a[..., None]))
                           / np.maximum(new_alpha[..., None], 1e-8), 0)
            out_alpha = new_alpha
    return Image.fromarray(np.uint8(np.clip(np.rint(out * 255), 0, 255)), "RGB")


def crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-zero pixels grown by ``pad``; None if empty."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    w, h = mask.size
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """The span [lo, hi) grown by ``diff`` (split evenly), shifted back inside [0, limit]."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def expand_to_ratio(region: tuple[int, int, int, int], width: int, height: int, image_w: int, image_h: int
                    ) -> tuple[int, int, int, int]:
    """Grow a region to the aspect ratio of ``width`` × ``height`` and keep it inside the image."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def overlay(result: Image.Image, original: Image.Image, mask: Image.Image,
            region: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The result (placed at ``region`` of the original for "only masked") shown where ``mask`` is
    white, the original where it is black, blended in between."""
    base = original.convert("RGB").copy()
    if region is not None:
        x1, y1, x2, y2 = region
        base.paste(result.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
        result = base
    else:
        result = result.convert("RGB")
    a = np.asarray(mask.convert("L"), dtype=np.uint16)[..., None]
    res = np.asarray(result, dtype=np.uint16)
    org = np.asarray(original.convert("RGB"), dtype=np.uint16)
    mixed = (res * a + org * (255 - a) + 127) // 255
    return Image.fromarray(mixed.astype(np.uint8), "RGB")


def inpaint_sketch(original: Image.Image, sketch: Image.Image, mask_blur: int = 4,
                   mask_alpha: float = 0.0) -> tuple[Image.Image, Image.Image]:
    """(init image, mask) for an inpaint sketch: ``sketch`` is ``original`` with colour strokes drawn on
    it. The mask is every pixel the strokes changed, dimmed by ``mask_alpha`` % ("mask transparency");
    the init is the sketch, blurred by ``mask_blur``, laid over the original through the blurred mask."""
    if sketch.size != original.size:
        sketch = sketch.resize(original.size, Image.Resampling.LANCZOS)
    original, sketch = original.convert("RGB"), sketch.convert("RGB")
    changed = np.any(np.asarray(sketch) != np.asarray(original), axis=-1)
    mask = Image.fromarray(changed.astype(np.uint8) * 255, "L")
    mask = ImageEnhance.Brightness(mask).enhance(1 - mask_alpha / 100)
    blur = ImageFilter.GaussianBlur(mask_blur)
    return Image.composite(sketch.filter(blur), original, mask.filter(blur)), mask


def match_histogram(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``values`` (N×C) remapped per channel so their distribution is ``reference``'s (M×C): each value
    goes to the reference quantile of its own rank."""
    out = np.empty_like(values, dtype=np.float64)
    for c in range(values.shape[1]):
        order = np.argsort(values[:, c], kind="stable")
        quantiles = (np.arange(len(order)) + 0.5) / len(order)
        out[order, c] = np.quantile(reference[:, c], quantiles)
    return out


def matched_noise(image: np.ndarray, unknown: np.ndarray, falloff: float = 1.0, color_variation: float = 0.05,
                  seed: int = 0) -> np.ndarray:
    """Fill for outpainting ("Outpainting mk2"): noise with the known picture's spatial spectrum and
    colour distribution in the ``unknown`` part (H×W, 1 = unknown) of ``image`` (H×W×3 in 0..1).

    Grey-ish noise (``color_variation`` of it keeps its own colour) is shaped in the frequency domain to
    the known picture's amplitude spectrum raised to ``falloff`` (lower = more fine detail), keeping the
    noise's own phases, then each channel is histogram-matched to the known pixels. Deterministic."""
    h, w, _ = image.shape
    known = unknown < 1e-3
    if not known.any() or known.all():
        return image.copy()
    mean = image[known].mean(axis=0)
    filled = image * (1 - unknown[..., None]) + mean * unknown[..., None]
    src_amplitude = np.abs(np.fft.fft2(filled - mean, axes=(0, 1)))
    rng = np.random.default_rng(seed)
    noise = rng.random((h, w, 3))
    grey = noise.mean(axis=2, keepdims=True)
    noise = noise * color_variation + grey * (1 - color_variation)
    spectrum = np.fft.fft2(noise - noise.mean(axis=(0, 1)), axes=(0, 1))
    phase = spectrum / np.maximum(np.abs(spectrum), 1e-12)
    shaped = np.real(np.fft.ifft2(phase * src_amplitude ** falloff, axes=(0, 1)))
    fill = unknown > 1e-6
    shaped[fill] = match_histogram(shaped[fill], image[known])
    return np.clip(image * (1 - unknown[..., None]) + shaped * unknown[..., None], 0.0, 1.0)
