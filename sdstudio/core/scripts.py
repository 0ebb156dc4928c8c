"""The img2img scripts' parameters (A1111's "Script" dropdown): names, typed arguments, checks and the
infotext keys they are written under. Running them is :mod:`sdstudio.engine.scripts`' job.

A request names its script in ``script_name`` and carries ``script_args`` as a dict of the fields below
(the API also takes A1111's positional ``script_args`` list; :func:`from_a1111_list` reads it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

DENOISING_CURVES = ("Aggressive", "Linear", "Lazy")
OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")


class ScriptError(ValueError):
    pass


def _padded(args: list, defaults: list) -> list:
    """A1111's positional arguments, the missing trailing ones taking their defaults (extra ones ignored)."""
    args = list(args)[:len(defaults)]
    return args + defaults[len(args):]


@dataclass
class SDUpscale:
    """Upscale the init image, then img2img it in overlapping tiles of the request's size."""

    name: ClassVar[str] = "SD upscale"
    overlap: int = 64
    upscaler: str = "None"
    scale: float = 2.0
    keys: ClassVar[dict[str, str]] = {"overlap": "SD upscale overlap", "upscaler": "SD upscale upscaler",
                                      "scale": "SD upscale scale"}

    def check(self) -> None:
        if not 0 <= self.overlap <= 256:
            raise ScriptError(f"SD upscale: overlap must be from 0 to 256 pixels, got {self.overlap!r}")
        if not 1.0 <= self.scale <= 8.0:
            raise ScriptError(f"SD upscale: scale must be from 1 to 8, got {self.scale!r}")

    @classmethod
    def from_list(cls, args: list, upscaler_names: list[str]) -> SDUpscale:
        # A1111: [info, overlap, upscaler_index, scale_factor]
        _, overlap, index, scale = _padded(args, [None, 64, 0, 2.0])
        if isinstance(index, str):
            upscaler = index
        elif not 0 <= int(index) < len(upscaler_names):
            raise ScriptError(f"SD upscale: upscaler index {index} is out of range (0-{len(upscaler_names) - 1})")
        else:
            upscaler = upscaler_names[int(index)]
        return cls(int(overlap), upscaler, float(scale))


@dataclass
class Loopback:
    """Run img2img again on its own output ``loops`` times, the denoising strength moving toward
    ``final_denoising_strength`` along the curve."""

    name: ClassVar[str] = "Loopback"
    loops: int = 4
    final_denoising_strength: float = 0.5
    denoising_curve: str = "Linear"
    keys: ClassVar[dict[str, str]] = {"loops": "Loopback loops", "final_denoising_strength": "Final denoising strength",
                                      "denoising_curve": "Denoising curve"}

    def check(self) -> None:
        if not 1 <= self.loops <= 32:
            raise ScriptError(f"Loopback: loops must be from 1 to 32, got {self.loops!r}")
        if not 0.0 <= self.final_denoising_strength <= 1.0:
            raise ScriptError(f"Loopback: final denoising strength must be from 0 to 1, got {self.final_denoising_strength!r}")
        if self.denoising_curve not in DENOISING_CURVES:
            raise ScriptError(f"Loopback: denoising curve must be one of {', '.join(DENOISING_CURVES)}")

    def strength(self, initial: float, loop: int) -> float:
        """A1111's schedule: the strength for loop ``loop`` (0-based) of ``loops``."""
        import math

        if self.loops == 1:
            return initial
        progress = loop / (self.loops - 1)
        curve = {"Aggressive": math.sin(progress * math.pi * 0.5),
                 "Lazy": 1 - math.cos(progress * math.pi * 0.5)}.get(self.denoising_curve, progress)
        return initial + (self.final_denoising_strength - initial) * curve

    @classmethod
    def from_list(cls, args: list, upscaler_names: list[str]) -> Loopback:
        # A1111: [loops, final_denoising_strength, denoising_curve, append_interrogation]
        loops, final, curve = _padded(args, [4, 0.5, "Linear"])
        return cls(int(loops), float(final), str(curve))


@dataclass
class PoorMansOutpainting:
    """Grow the canvas by ``pixels`` on the chosen sides and inpaint the new band."""

    name: ClassVar[str] = "Poor man's outpainting"
    pixels: int = 128
    mask_blur: int = 4
    inpainting_fill: int = 1  # "fill", "original", "latent noise", "latent nothing"
    direction: list[str] = field(default_factory=lambda: list(OUTPAINT_DIRECTIONS))
    keys: ClassVar[dict[str, str]] = {"pixels": "Outpaint pixels", "mask_blur": "Outpaint mask blur",
                                      "inpainting_fill": "Outpaint masked content", "direction": "Outpaint direction"}

    def check(self) -> None:
        if not 8 <= self.pixels <= 512 or self.pixels % 8:
            raise ScriptError(f"outpainting: pixels must be a multiple of 8 from 8 to 512, got {self.pixels!r}")
        if not 0 <= self.mask_blur <= 64:
            raise ScriptError(f"outpainting: mask blur must be from 0 to 64, got {self.mask_blur!r}")
        if self.inpainting_fill not in range(4):
            raise ScriptError(f"outpainting: masked content must be 0-3, got {self.inpainting_fill!r}")
        bad = [d for d in self.direction if d not in OUTPAINT_DIRECTIONS]
        if bad or not self.direction:
            raise ScriptError(f"outpainting: directions must be some of {', '.join(OUTPAINT_DIRECTIONS)}, got {self.direction!r}")

    @classmethod
    def from_list(cls, args: list, upscaler_names: list[str]) -> PoorMansOutpainting:
        # A1111: [pixels, mask_blur, inpainting_fill, direction]
        pixels, blur, fill, direction = _padded(args, [128, 4, 1, list(OUTPAINT_DIRECTIONS)])
        fills = ("fill", "original", "latent noise", "latent nothing")
        fill = fills.index(fill) if isinstance(fill, str) and fill in fills else int(fill)
        return cls(int(pixels), int(blur), fill, [str(d) for d in direction])


@dataclass
class OutpaintingMk2:
    """Grow the canvas side by side, filling each new band with noise matched to the picture's spectrum
    and colours, then inpainting it (one pass per side)."""

    name: ClassVar[str] = "Outpainting mk2"
    pixels: int = 128
    mask_blur: int = 8
    direction: list[str] = field(default_factory=lambda: list(OUTPAINT_DIRECTIONS))
    noise_q: float = 1.0  # fall-off exponent (lower = more detail)
    color_variation: float = 0.05
    keys: ClassVar[dict[str, str]] = {"pixels": "Outpaint pixels", "mask_blur": "Outpaint mask blur",
                                      "direction": "Outpaint direction", "noise_q": "Outpaint fall-off exponent",
                                      "color_variation": "Outpaint color variation"}

    def check(self) -> None:
        PoorMansOutpainting(self.pixels, min(self.mask_blur, 64), 1, self.direction).check()
        if not 0.0 <= self.noise_q <= 4.0:
            raise ScriptError(f"Outpainting mk2: fall-off exponent must be from 0 to 4, got {self.noise_q!r}")
        if not 0.0 <= self.color_variation <= 1.0:
            raise ScriptError(f"Outpainting mk2: color variation must be from 0 to 1, got {self.color_variation!r}")

    @classmethod
    def from_list(cls, args: list, upscaler_names: list[str]) -> OutpaintingMk2:
        # A1111: [info, pixels, mask_blur, direction, noise_q, color_variation]
        _, pixels, blur, direction, noise_q, variation = _padded(args, [None, 128, 8, list(OUTPAINT_DIRECTIONS),
                                                                         1.0, 0.05])
        return cls(int(pixels), int(blur), [str(d) for d in direction], float(noise_q), float(variation))


SCRIPTS: dict[str, type] = {s.name: s for s in (SDUpscale, Loopback, PoorMansOutpainting, OutpaintingMk2)}


def parse(name: str, args: dict[str, Any]):
    """The typed, checked arguments of script ``name``."""
    if name not in SCRIPTS:
        raise ScriptError(f"unknown script {name!r}; available: {', '.join(SCRIPTS)}")
    cls = SCRIPTS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ScriptError(f"{name}: unknown argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(names))}")
    try:
        parsed = cls(**args)
    except TypeError as exc:
        raise ScriptError(f"{name}: {exc}") from None
    parsed.check()
    return parsed


def from_a1111_list(name: str, args: list, upscaler_names: list[str]) -> dict[str, Any]:
    """A1111's positional ``script_args`` -> our dict."""
    if name not in SCRIPTS:
        raise ScriptError(f"unknown script {name!r}; available: {', '.join(SCRIPTS)}")
    try:
        return dataclasses.asdict(SCRIPTS[name].from_list(args, upscaler_names))
    except (TypeError, ValueError, IndexError) as exc:
        raise ScriptError(f"{name}: cannot read script_args {args!r} ({exc})") from None


def infotext_pairs(name: str, args: dict[str, Any]) -> dict[str, object]:
    """``Script: name`` and the arguments under their infotext keys."""
    parsed = parse(name, args)
    pairs: dict[str, object] = {"Script": name}
    for attr, key in parsed.keys.items():
        value = getattr(parsed, attr)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        pairs[key] = ",".join(value) if isinstance(value, list) else value
    return pairs


def from_infotext_pairs(params: dict[str, str]) -> tuple[str, dict[str, Any]] | None:
    """The script and arguments an infotext names, or None."""
    name = params.get("Script")
    if name not in SCRIPTS:
        return None
    cls = SCRIPTS[name]
    args: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = cls.keys.get(f.name)
        if key in params:
            text = params[key]
            kind = type(getattr(cls(), f.name))
            args[f.name] = [d for d in text.split(",") if d] if kind is list else kind(float(text)) if kind is int else kind(text)
    return name, args
