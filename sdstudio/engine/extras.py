"""Extras: upscale one picture and restore its faces as A1111's Extras tab does.

Upscaler 1 (a built-in resampler or a model file) brings the picture to the target size ("Scale by" a
factor, or "Scale to" a width × height, optionally cropped to fit); upscaler 2, when given, is blended
over it by its visibility (A1111's ``Image.blend(first, second, visibility)``; nothing when upscaler 1 is
None, as in A1111). Then, in A1111's order, GFPGAN and CodeFormer restore the faces, each blended
by its visibility.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..core.imageops import resize_image
from ..core.params import RequestError
from ..models.errors import ModelNotFoundError
from .faces import FaceRestorers
from .upscalers import Upscalers

MAX_PIXELS = 64 * 1024 * 1024


@dataclass
class ExtrasRequest:
    scale: float = 2.0  # "Scale by" (used when resize_to is None)
    resize_to: tuple[int, int] | None = None  # "Scale to" width × height
    crop: bool = True  # "Crop to fit" for resize_to
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0  # A1111's extras default: 0 = the most effect

    def target(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.resize_to is not None:
            w, h = self.resize_to
        else:
            if not 0 < self.scale <= 8:
                raise RequestError(f"upscaling_resize must be between 0 and 8, got {self.scale}")
            w, h = round(size[0] * self.scale), round(size[1] * self.scale)
        if not (0 < w and 0 < h) or w * h > MAX_PIXELS:
            raise RequestError(f"target size {w}x{h} must be positive and at most {MAX_PIXELS // 2**20} megapixels")
        return w, h


def _cover(size: tuple[int, int], w: int, h: int) -> tuple[int, int]:
    scale = max(w / size[0], h / size[1])
    return max(w, round(size[0] * scale)), max(h, round(size[1] * scale))


def check(req: ExtrasRequest, upscalers: Upscalers, faces: FaceRestorers | None = None) -> None:
    """Unknown upscaler names and missing face restoration files (ModelNotFoundError, naming what to put
    where) fail before any work."""
    for name in (req.upscaler_1, req.upscaler_2):
        upscalers.get(name)
    for name, value in (("upscaler 2 visibility", req.upscaler_2_visibility),
                        ("GFPGAN visibility", req.gfpgan_visibility),
                        ("CodeFormer visibility", req.codeformer_visibility), ("CodeFormer weight", req.codeformer_weight)):
        if not 0.0 <= value <= 1.0:
            raise RequestError(f"{name} must be between 0 and 1, got {value}")
    for name, visibility in (("GFPGAN", req.gfpgan_visibility), ("CodeFormer", req.codeformer_visibility)):
        if visibility > 0:
            if faces is None:
                raise ModelNotFoundError("face restoration is not available here")
            faces.check(name)


def run(image: Image.Image, req: ExtrasRequest, upscalers: Upscalers, faces: FaceRestorers | None = None) -> Image.Image:
    check(req, upscalers, faces)
    image = image.convert("RGB")
    w, h = req.target(image.size)
    crop = req.resize_to is not None and req.crop

    def upscale(name: str) -> Image.Image:
        if name == "None":
            return image
        big = upscalers.upscale(image, *(_cover(image.size, w, h) if crop else (w, h)), name)
        return resize_image(1, big, w, h) if crop else big

    first = upscale(req.upscaler_1)
    # A1111 skips the whole upscale step, upscaler 2 included, when upscaler 1 is None
    if req.upscaler_1 != "None" and req.upscaler_2 != "None" and req.upscaler_2_visibility > 0:
        second = upscale(req.upscaler_2).resize(first.size)
        first = Image.blend(first, second, req.upscaler_2_visibility)
    if req.gfpgan_visibility > 0:
        first = faces.restore(first, req.gfpgan_visibility, "GFPGAN")
    if req.codeformer_visibility > 0:
        first = faces.restore(first, req.codeformer_visibility, "CodeFormer", fidelity=req.codeformer_weight)
    return first
