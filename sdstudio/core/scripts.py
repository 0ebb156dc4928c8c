"""The scripts' parameters (A1111's "Script" dropdown): names, typed arguments, checks and the
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
    kinds: ClassVar[tuple[str, ...]] = ("img2img",)
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
    def from_list(cls, args: list, upscaler_names: list[str], kind: str = "img2img") -> SDUpscale:
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
    kinds: ClassVar[tuple[str, ...]] = ("img2img",)
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
    def from_list(cls, args: list, upscaler_names: list[str], kind: str = "img2img") -> Loopback:
        # A1111: [loops, final_denoising_strength, denoising_curve, append_interrogation]
        loops, final, curve = _padded(args, [4, 0.5, "Linear"])
        return cls(int(loops), float(final), str(curve))


@dataclass
class PoorMansOutpainting:
    """Grow the canvas by ``pixels`` on the chosen sides and inpaint the new band."""

    name: ClassVar[str] = "Poor man's outpainting"
    kinds: ClassVar[tuple[str, ...]] = ("img2img",)
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
    def from_list(cls, args: list, upscaler_names: list[str], kind: str = "img2img") -> PoorMansOutpainting:
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
    kinds: ClassVar[tuple[str, ...]] = ("img2img",)
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
    def from_list(cls, args: list, upscaler_names: list[str], kind: str = "img2img") -> OutpaintingMk2:
        # A1111: [info, pixels, mask_blur, direction, noise_q, color_variation]
        _, pixels, blur, direction, noise_q, variation = _padded(args, [None, 128, 8, list(OUTPAINT_DIRECTIONS),
                                                                         1.0, 0.05])
        return cls(int(pixels), int(blur), [str(d) for d in direction], float(noise_q), float(variation))


# A1111 1.10's X/Y/Z axis list, in its order: what an index in a positional ``script_args`` means
# (per tab, the other tab's own axes left out). Axes we do not have are refused by name.
A1111_AXES = (
    "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps|t", "CFG Scale", "Image CFG Scale|i",
    "Prompt S/R", "Prompt order", "Sampler|t", "Hires sampler|t", "Sampler|i", "Checkpoint name",
    "Negative Guidance minimum sigma", "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Schedule type",
    "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Skip Early CFG", "Beta schedule alpha",
    "Beta schedule beta", "Eta", "Clip skip", "Denoising", "Initial noise multiplier", "Extra noise",
    "Hires upscaler|t", "Cond. Image Mask Weight|i", "VAE", "Styles", "UniPC Order", "Face restore",
    "Token merging ratio", "Token merging ratio high-res", "Always discard next-to-last sigma",
    "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at", "RNG source", "FP8 mode", "Size",
)


def a1111_axis_label(value, kind: str) -> str:
    """An axis type as A1111's API sends it (an index into its list for the tab, or the label)."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        return value
    tab = "t" if kind == "txt2img" else "i"
    labels = [a.split("|")[0] for a in A1111_AXES if "|" not in a or a.endswith("|" + tab)]
    index = int(value)
    if not 0 <= index < len(labels):
        raise ScriptError(f"X/Y/Z plot: axis type index {index} is out of range (0-{len(labels) - 1})")
    return labels[index]


@dataclass
class XYZPlot:
    """A grid of images, one per combination of up to three axes' values."""

    name: ClassVar[str] = "X/Y/Z plot"
    kinds: ClassVar[tuple[str, ...]] = ("txt2img", "img2img")
    x_type: str = "Nothing"
    x_values: str = ""
    y_type: str = "Nothing"
    y_values: str = ""
    z_type: str = "Nothing"
    z_values: str = ""
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False  # "Keep -1 for seeds"
    margin_size: int = 0
    keys: ClassVar[dict[str, str]] = {"x_type": "X Type", "x_values": "X Values", "y_type": "Y Type",
                                      "y_values": "Y Values", "z_type": "Z Type", "z_values": "Z Values",
                                      "draw_legend": "XYZ legend", "include_lone_images": "XYZ sub images",
                                      "include_sub_grids": "XYZ sub grids", "no_fixed_seeds": "XYZ keep -1 seeds",
                                      "margin_size": "XYZ margin"}

    def axes(self) -> list[tuple[str, str]]:
        return [(self.x_type, self.x_values), (self.y_type, self.y_values), (self.z_type, self.z_values)]

    def check(self) -> None:
        from . import xyz

        for kind, values in self.axes():
            try:
                ax = xyz.axis(kind)
                if ax.label != "Nothing":
                    xyz.axis_values(ax, values, keep_random_seeds=True)  # syntax errors now, axis named
            except xyz.AxisError as exc:
                raise ScriptError(f"X/Y/Z plot: {exc}") from None
        if not 0 <= self.margin_size <= 500:
            raise ScriptError(f"X/Y/Z plot: margin size must be from 0 to 500, got {self.margin_size!r}")

    @classmethod
    def from_list(cls, args: list, upscaler_names: list[str], kind: str = "txt2img") -> XYZPlot:
        # A1111: [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
        #         z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
        #         vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode]
        a = _padded(args, [0, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False])

        def values(text, dropdown):
            if dropdown and not str(text).strip():
                return ",".join(f'"{v}"' if "," in str(v) else str(v) for v in dropdown)
            return str(text)

        return cls(a1111_axis_label(a[0], kind), values(a[1], a[2]), a1111_axis_label(a[3], kind), values(a[4], a[5]),
                   a1111_axis_label(a[6], kind), values(a[7], a[8]), bool(a[9]), bool(a[10]), bool(a[11]),
                   bool(a[12]), int(a[16]))


@dataclass
class PromptMatrix:
    """``a cat|in a hat|wearing boots``: every combination of the parts after the first, in a labelled grid."""

    name: ClassVar[str] = "Prompt matrix"
    kinds: ClassVar[tuple[str, ...]] = ("txt2img", "img2img")
    put_at_start: bool = False
    different_seeds: bool = False
    prompt_type: str = "positive"  # or "negative"
    variations_delimiter: str = "comma"  # or "space"
    margin_size: int = 0
    keys: ClassVar[dict[str, str]] = {"put_at_start": "Matrix variable parts at start",
                                      "different_seeds": "Matrix different seeds", "prompt_type": "Matrix prompt type",
                                      "variations_delimiter": "Matrix delimiter", "margin_size": "Matrix margin"}

    def check(self) -> None:
        if self.prompt_type not in ("positive", "negative"):
            raise ScriptError(f"Prompt matrix: prompt type must be positive or negative, got {self.prompt_type!r}")
        if self.variations_delimiter not in ("comma", "space"):
            raise ScriptError(f"Prompt matrix: delimiter must be comma or space, got {self.variations_delimiter!r}")
        if not 0 <= self.margin_size <= 500:
            raise ScriptError(f"Prompt matrix: margin size must be from 0 to 500, got {self.margin_size!r}")

    @classmethod
    def from_list(cls, args: list, upscaler_names: list[str], kind: str = "txt2img") -> PromptMatrix:
        # A1111: [put_at_start, different_seeds, prompt_type, variations_delimiter, margin_size]
        a = _padded(args, [False, False, "positive", "comma", 0])
        return cls(bool(a[0]), bool(a[1]), str(a[2]), str(a[3]), int(a[4]))


@dataclass
class PromptsFromFile:
    """One job per line of ``prompt_txt``; a line may set fields the A1111 way: ``--steps 30 --prompt "..."``."""

    name: ClassVar[str] = "Prompts from file or textbox"
    kinds: ClassVar[tuple[str, ...]] = ("txt2img", "img2img")
    checkbox_iterate: bool = False  # "Iterate seed every line"
    checkbox_iterate_batch: bool = False  # "Use same random seed for all lines"
    prompt_position: str = "start"  # where the line's prompt goes relative to the request's: "start" / "end"
    prompt_txt: str = ""
    keys: ClassVar[dict[str, str]] = {}  # the lines are the job: not repeated in every image's infotext

    def check(self) -> None:
        from .prompts_file import PromptsFileError, parse_lines

        if self.prompt_position not in ("start", "end"):
            raise ScriptError(f"Prompts from file: prompt position must be start or end, got {self.prompt_position!r}")
        try:
            parse_lines(self.prompt_txt)
        except PromptsFileError as exc:
            raise ScriptError(f"Prompts from file: {exc}") from None

    @classmethod
    def from_list(cls, args: list, upscaler_names: list[str], kind: str = "txt2img") -> PromptsFromFile:
        # A1111: [checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt]
        a = _padded(args, [False, False, "start", ""])
        return cls(bool(a[0]), bool(a[1]), str(a[2]), str(a[3]))


SCRIPTS: dict[str, type] = {s.name: s for s in (SDUpscale, Loopback, PoorMansOutpainting, OutpaintingMk2, XYZPlot,
                                                PromptMatrix, PromptsFromFile)}


def names_for(kind: str) -> list[str]:
    return [name for name, cls in SCRIPTS.items() if kind in cls.kinds]


def parse(name: str, args: dict[str, Any], kind: str | None = None):
    """The typed, checked arguments of script ``name`` (for a ``kind`` of request, when given)."""
    if name not in SCRIPTS or (kind is not None and kind not in SCRIPTS[name].kinds):
        available = names_for(kind) if kind else list(SCRIPTS)
        raise ScriptError(f"unknown {kind + ' ' if kind else ''}script {name!r}; available: {', '.join(available)}")
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


def from_a1111_list(name: str, args: list, upscaler_names: list[str], kind: str = "img2img") -> dict[str, Any]:
    """A1111's positional ``script_args`` -> our dict."""
    if name not in SCRIPTS:
        raise ScriptError(f"unknown script {name!r}; available: {', '.join(SCRIPTS)}")
    cls = SCRIPTS[name]
    try:
        return dataclasses.asdict(cls.from_list(args, upscaler_names, kind))
    except (TypeError, ValueError, IndexError) as exc:
        raise ScriptError(f"{name}: cannot read script_args {args!r} ({exc})") from None


def infotext_pairs(name: str, args: dict[str, Any]) -> dict[str, object]:
    """``Script: name`` and the arguments under their infotext keys."""
    parsed = parse(name, args)
    pairs: dict[str, object] = {"Script": name}
    defaults = type(parsed)()
    for attr, key in parsed.keys.items():
        value = getattr(parsed, attr)
        if value in ("", "Nothing") or (isinstance(value, bool) and value == getattr(defaults, attr)):
            continue
        if attr == "margin_size" and value == 0:
            continue
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
            if kind is list:
                args[f.name] = [d for d in text.split(",") if d]
            elif kind is bool:
                args[f.name] = text.strip().lower() in ("true", "1", "yes")
            elif kind is int:
                args[f.name] = int(float(text))
            else:
                args[f.name] = kind(text)
    return name, args
