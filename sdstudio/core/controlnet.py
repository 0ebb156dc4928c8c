"""ControlNet units as the sd-webui-controlnet extension (Mikubill, v1.1.455) defines them: the fields, their
defaults, aliases and old spellings, the checks, and the infotext each enabled unit writes.

A unit comes from an API body (``alwayson_scripts.controlnet.args``: a list of unit dicts, webuiapi's
``ControlNetUnit.to_dict()`` among them), from the UI or from a pasted infotext; :func:`unit_from_dict`
reads all of them into one :class:`ControlUnit`. Unknown keys are ignored, as the extension's pydantic
model does; a bad value is a :class:`ControlNetError` naming the unit and field (an HTTP 422).

The control image travels as text: a base64 image from the API, or a file path once the queue stored it
(``image``), with an optional ``mask`` of the same size. Pure Python: the preprocessors and the hook live
in :mod:`sdstudio.engine`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import RequestError

SCRIPT_NAME = "ControlNet"
VERSION = 3  # what /controlnet/version answers (the extension's API version)
DEFAULT_UNIT_COUNT = 3  # the setting "Multi-ControlNet: ControlNet unit number"
MAX_UNIT_COUNT = 10

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                  "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill"}
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
# the extension's input modes: one picture, a folder of pictures (one generation each), several pictures merged
INPUT_MODES = ("simple", "batch", "merge")
PULID_MODES = ("Fidelity", "Extremely style")  # the extension's PuLIDMode values
# the batch tab's pictures: what the extension's folder listing finds that a picture reader reads
BATCH_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                   "guidance_start", "guidance_end", "pixel_perfect", "control_mode")
ALIASES = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "mask_image": "mask"}


class ControlNetError(RequestError):
    """A bad unit field; the message names the unit and the field."""


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's sliders (``module_detail`` in ``/controlnet/module_list``)."""

    name: str
    value: float
    minimum: float
    maximum: float
    step: float = 1.0

    def detail(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


# ControlNet++ union models' control types, in the extension's order (their indices are the model's), and
# the extension's filter tags that select them
UNION_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
UNION_UNKNOWN = "Unknown"
_UNION_TAGS = {"openpose": "OpenPose", "depth": "Depth", "scribble": "Soft Edge", "softedge": "Soft Edge",
               "canny": "Hard Edge", "lineart": "Hard Edge", "mlsd": "Hard Edge", "normalmap": "Normal Map",
               "segmentation": "Segmentation", "tile": "Tile", "blur": "Tile", "inpaint": "Inpaint"}


def union_type(value: Any) -> str:
    """The union control type ``value`` names: a type without regard to case, spaces or underscores, one of
    the extension's tags ("canny" -> "Hard Edge"), or "Unknown" (none); anything else is a ValueError naming
    the choices."""
    text = str(value).strip()
    squeezed = text.lower().replace(" ", "").replace("_", "")
    for name in (*UNION_TYPES, UNION_UNKNOWN):
        if squeezed == name.lower().replace(" ", ""):
            return name
    if squeezed in _UNION_TAGS:
        return _UNION_TAGS[squeezed]
    raise ValueError(f"{text!r} is not a union control type; one of {', '.join((*UNION_TYPES, UNION_UNKNOWN))}")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit, with the extension's field names and defaults."""

    enabled: bool = False
    module: str = "none"  # the preprocessor
    model: str = "None"
    weight: float = 1.0
    image: str | None = None  # base64 (API) or a stored file's path (a queued job)
    mask: str | None = None
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1  # -1: the preprocessor's default (as are threshold_a/b)
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    inpaint_crop_input_image: bool = True
    hr_option: str = "Both"
    save_detected_map: bool = True
    advanced_weighting: tuple[float, ...] | None = None  # one weight per control output (13 SD 1.x, 10 SDXL)
    union_control_type: str = "Unknown"  # what the map shows, for a ControlNet++ union model (UNION_TYPES)
    # a picture (base64) whose first channel (0-255 -> 0-1) scales where the unit acts: its ControlNet's
    # residuals, or its IP-Adapter's attention, are multiplied by it (the extension's field)
    effective_region_mask: str | None = None
    # the extension's Multi-Inputs beyond the first (image, mask): an IP-Adapter unit averages their tokens
    more_images: tuple[tuple[str, str | None], ...] = ()
    input_mode: str = "simple"  # INPUT_MODES; "merge" is unfolded by units_from (see there)
    # the batch tab (input_mode "batch"): a server folder of control pictures (or a list of their paths), one
    # generation each (sdstudio.scripts.controlnet); masks from batch_mask_dir (the i-th, or the first when
    # there are fewer); output_dir: where the pictures are also saved, named as their control pictures;
    # loopback: from the second generation on, the unit's picture is the previous generation's first image
    batch_images: str | tuple[str, ...] | None = None
    batch_mask_dir: str | None = None
    output_dir: str = ""
    loopback: bool = False
    pulid_mode: str = "Fidelity"  # a PuLID unit's attention (PULID_MODES; see engine.ip_adapter.PULID_ATTENTION)

    def replace(self, **changes) -> ControlUnit:
        return dataclasses.replace(self, **changes)

    def in_pass(self, pass_name: str, hires_job: bool) -> bool:
        """Whether the unit acts in this pass ("first" or "hires") by its ``hr_option`` (a job without
        Hires. fix has only its first pass, where every unit acts)."""
        if not hires_job:
            return True
        hires = pass_name == "hires"
        return not (self.hr_option == "Low res only" and hires or self.hr_option == "High res only" and not hires)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.advanced_weighting is not None:
            out["advanced_weighting"] = list(self.advanced_weighting)
        out["more_images"] = [list(pair) for pair in self.more_images]
        if isinstance(self.batch_images, tuple):
            out["batch_images"] = list(self.batch_images)
        return out

    @property
    def soft_injection(self) -> bool:
        """The extension's "soft injection": every mode but Balanced scales the outputs by depth."""
        return self.control_mode != "Balanced"

    @property
    def cfg_injection(self) -> bool:
        """"ControlNet is more important": control on the conditional (prompt) evaluation only."""
        return self.control_mode == "ControlNet is more important"

    def infotext(self) -> str:
        """``Module: canny, Model: …, Weight: 1.0, …`` in the extension's field order (its ``serialize``)."""
        return ", ".join(f"{_display(name)}: {_text(getattr(self, name))}" for name in INFOTEXT_FIELDS)


FIELDS = {f.name: f for f in dataclasses.fields(ControlUnit)}


def _display(name: str) -> str:
    return " ".join(word.capitalize() for word in name.split("_"))


def _text(value: Any) -> str:
    return str(value)


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off", ""):
            return False
        raise ControlNetError(f"{where}: {value!r} is not true or false")
    if value is None:
        return False
    return bool(value)


def _number(value: Any, where: str, kind: type) -> float | int:
    if isinstance(value, bool) or value is None:
        raise ControlNetError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ControlNetError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ControlNetError(f"{where}: expected a finite number, got {value!r}")
    if kind is int:
        if not number.is_integer():
            raise ControlNetError(f"{where}: expected a whole number, got {value!r}")
        return int(number)
    return number


def _choice(value: Any, where: str, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    if isinstance(value, bool):
        raise ControlNetError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(float(value))  # webuiapi and old clients send the position
        if 0 <= index < len(choices):
            return choices[index]
        raise ControlNetError(f"{where}: index {index} is out of range 0-{len(choices) - 1} ({', '.join(choices)})")
    text = str(value).strip()
    text = (aliases or {}).get(text, text)
    for choice in choices:
        if choice.lower() == text.lower():
            return choice
    raise ControlNetError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")


def _image_fields(values: dict, where: str) -> tuple[str | None, str | None, tuple[tuple[str, str | None], ...]]:
    """The extension's image forms: a string, ``{"image", "mask"}``, ``[image, mask]``, or a list of such dicts
    (its Multi-Inputs: the first is ``image``/``mask``, the others come back as the third item);
    ``mask`` / ``mask_image`` beside it."""
    image, mask = values.get("image"), values.get("mask")
    more: list[tuple[str, str | None]] = []
    if isinstance(image, Mapping):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, (list, tuple)):
        if not image:
            image = None
        elif isinstance(image[0], Mapping):
            for i, item in enumerate(image[1:], 1):
                extra = (item.get("image"), item.get("mask")) if isinstance(item, Mapping) else (None, None)
                if not isinstance(extra[0], str) or not extra[0] or not isinstance(extra[1], (str, type(None))):
                    raise ControlNetError(f"{where}.image[{i}]: expected {{\"image\": base64, \"mask\": base64 or "
                                          f"null}}")
                more.append((extra[0], extra[1] or None))
            image, mask = image[0].get("image"), image[0].get("mask", mask)
        elif len(image) == 2:
            image, mask = image
        else:
            raise ControlNetError(f"{where}.image: a list must be [image, mask], got {len(image)} items")
    for name, value in (("image", image), ("mask", mask)):
        if value is not None and not isinstance(value, str):
            raise ControlNetError(f"{where}.{name}: expected a base64-encoded image, got {type(value).__name__}")
    return image or None, mask or None, tuple(more)


def _more_images(value: Any, where: str) -> tuple[tuple[str, str | None], ...]:
    """``more_images`` as :meth:`ControlUnit.to_dict` writes it: a list of [image, mask or null]."""
    if not isinstance(value, (list, tuple)):
        raise ControlNetError(f"{where}: expected a list of [image, mask] pairs, got {type(value).__name__}")
    out = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str) or \
                not isinstance(pair[1], (str, type(None))):
            raise ControlNetError(f"{where}: expected [image, mask] pairs of base64 strings")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _batch_images(value: Any, where: str) -> str | tuple[str, ...] | None:
    """The batch tab's pictures: a folder (the extension's text box), or a list of picture paths."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(v.strip() for v in value) or None
    raise ControlNetError(f"{where}: expected a folder of control pictures or a list of their paths, got "
                          f"{type(value).__name__}")


def batch_files(unit: ControlUnit, index: int = 0) -> list[tuple[str, str | None]]:
    """A batch unit's (picture, mask or None) paths, in the order the generations use them: the folder's
    pictures sorted by name (hidden files left out, as A1111's ``listfiles``), masks from ``batch_mask_dir``
    likewise, the i-th mask with the i-th picture, the first with all when there are fewer. Reads only the
    folder listing; a missing or empty folder is a :class:`ControlNetError` naming it."""
    where = f"{SCRIPT_NAME} unit {index}"
    pictures = _listed(unit.batch_images, f"{where}.batch_images")
    masks = _listed(unit.batch_mask_dir, f"{where}.batch_mask_dir") if unit.batch_mask_dir else []
    if not masks:
        return [(p, None) for p in pictures]
    return [(p, masks[i] if len(masks) >= len(pictures) else masks[0]) for i, p in enumerate(pictures)]


def _listed(source: str | tuple[str, ...] | None, where: str) -> list[str]:
    import os

    if isinstance(source, tuple):
        return list(source)
    if not source:
        raise ControlNetError(f"{where}: no folder given")
    try:
        names = sorted(n for n in os.listdir(source) if not n.startswith("."))
    except OSError as exc:
        raise ControlNetError(f"{where}: cannot read the folder {source!r} ({exc.strerror or exc})") from None
    found = [os.path.join(source, n) for n in names
             if n.lower().endswith(BATCH_SUFFIXES) and os.path.isfile(os.path.join(source, n))]
    if not found:
        raise ControlNetError(f"{where}: the folder {source!r} holds no pictures "
                              f"({', '.join(s[1:] for s in BATCH_SUFFIXES)})")
    return found


def unit_from_dict(values: Mapping[str, Any] | ControlUnit, index: int = 0) -> ControlUnit:
    """A unit from an API/UI dict (aliases, old spellings, positions for enums); raises
    :class:`ControlNetError` naming ``unit {index}`` and the field."""
    if isinstance(values, ControlUnit):
        return values
    where = f"{SCRIPT_NAME} unit {index}"
    if not isinstance(values, Mapping):
        raise ControlNetError(f"{where}: expected an object with the unit's fields, got {type(values).__name__}")
    values = dict(values)
    for alias, name in ALIASES.items():
        if alias in values:
            if name in values and values[name] is not None and values[alias] is not None:
                raise ControlNetError(f"{where}: give {name!r} or its alias {alias!r}, not both")
            value = values.pop(alias)
            if values.get(name) is None:
                values[name] = value
    if values.get("ipadapter_input") not in (None, [], ""):
        raise ControlNetError(f"{where}.ipadapter_input: not read (it is a torch pickle, which can run code when "
                              f"loaded); send the picture as the unit's image instead")
    image, mask, more = _image_fields(values, where)
    out: dict[str, Any] = {"image": image, "mask": mask, **({"more_images": more} if more else {})}
    for name, f in FIELDS.items():
        if name in ("image", "mask") or name not in values or values[name] is None and name != "advanced_weighting":
            continue
        value, at = values[name], f"{where}.{name}"
        if name == "resize_mode":
            out[name] = _choice(value, at, RESIZE_MODES, RESIZE_ALIASES)
        elif name == "control_mode":
            out[name] = _choice(value, at, CONTROL_MODES)
        elif name == "hr_option":
            out[name] = _choice(value, at, HR_OPTIONS)
        elif name == "input_mode":
            out[name] = _choice(value, at, INPUT_MODES)
        elif name == "pulid_mode":
            out[name] = _choice(value, at, PULID_MODES)
        elif name == "batch_images":
            out[name] = _batch_images(value, at)
        elif name == "more_images":
            if values[name] and more:
                raise ControlNetError(f"{where}: give several images as an image list or as more_images, not both")
            out[name] = _more_images(values[name], f"{where}.more_images") or out.get(name, ())
        elif name == "effective_region_mask":
            if not isinstance(value, str):
                raise ControlNetError(f"{at}: expected a base64-encoded image, got {type(value).__name__}")
            out[name] = value or None
        elif name == "union_control_type":
            try:
                out[name] = union_type(value)
            except ValueError as exc:
                raise ControlNetError(f"{at}: {exc}") from None
        elif name == "advanced_weighting":
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not value:
                raise ControlNetError(f"{at}: expected a list of numbers, got {value!r}")
            out[name] = tuple(_number(v, at, float) for v in value)
        elif f.type == "bool":
            out[name] = _bool(value, at)
        elif f.type == "int":
            out[name] = _number(value, at, int)
        elif f.type == "float":
            out[name] = _number(value, at, float)
        else:
            out[name] = str(value).strip()
    unit = ControlUnit(**out)
    if not 0.0 <= unit.weight <= 2.0:
        raise ControlNetError(f"{where}.weight: must be from 0 to 2, got {unit.weight:g}")
    for name in ("guidance_start", "guidance_end"):
        if not 0.0 <= getattr(unit, name) <= 1.0:
            raise ControlNetError(f"{where}.{name}: must be from 0 to 1, got {getattr(unit, name):g}")
    if unit.guidance_start > unit.guidance_end:
        raise ControlNetError(f"{where}: guidance_start ({unit.guidance_start:g}) is after guidance_end "
                              f"({unit.guidance_end:g})")
    if unit.input_mode == "batch" and unit.enabled and not unit.batch_images:
        raise ControlNetError(f"{where}.batch_images: input_mode batch needs the folder of control pictures "
                              f"(or a list of their paths)")
    if not unit.module:
        unit = unit.replace(module="none")
    if not unit.model:
        unit = unit.replace(model="None")
    return unit


def units_from(values: Any, limit: int = MAX_UNIT_COUNT) -> list[ControlUnit]:
    """The units of ``alwayson_scripts.controlnet.args`` (or our ``{"units": [...]}``)."""
    if isinstance(values, Mapping):
        if "units" in values:
            values = values["units"]
        elif "args" in values:
            values = values["args"]
        else:
            values = [values]  # one unit given as a bare dict
    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        raise ControlNetError(f"{SCRIPT_NAME}: expected a list of units, got {type(values).__name__}")
    if len(values) > limit:
        raise ControlNetError(f"{SCRIPT_NAME}: {len(values)} units given; at most {limit}")
    return [u for i, v in enumerate(values) for u in unfold_merged(unit_from_dict(v, i))]


def unfold_merged(unit: ControlUnit) -> list[ControlUnit]:
    """The extension's "merge" input mode: an IP-Adapter unit keeps its pictures (it averages them); any other
    unit becomes one unit per picture, each at weight / N, in the unit's place (so the infotext numbers them
    one after another, as the extension's does)."""
    if unit.input_mode != "merge":
        return [unit]
    if unit.module.lower().startswith("ip-adapter") or not unit.more_images:
        return [unit.replace(input_mode="simple")]
    pictures = [(unit.image, unit.mask), *unit.more_images]
    return [unit.replace(image=image, mask=mask, more_images=(), weight=unit.weight / len(pictures),
                         input_mode="simple") for image, mask in pictures]


def _parse_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def unit_from_infotext(text: str, index: int = 0) -> ControlUnit:
    """A pasted ``ControlNet N`` value back into an enabled unit (the image is not in the infotext)."""
    values: dict[str, Any] = {"enabled": True}
    for item in str(text).split(","):
        key, sep, value = item.strip().partition(": ")
        if not sep:
            continue
        name = "_".join(word.lower() for word in key.strip().split(" "))
        if name in FIELDS:
            values[name] = _parse_value(value.strip())
    return unit_from_dict(values, index)


def infotext_pairs(units: list[ControlUnit]) -> dict[str, str]:
    """``ControlNet 0``, ``ControlNet 1``… numbered over the enabled units, as the extension writes them."""
    enabled = [u for u in units if u.enabled]
    return {f"{SCRIPT_NAME} {i}": u.infotext() for i, u in enumerate(enabled)}


def units_from_infotext(params: Mapping[str, str]) -> tuple[list[ControlUnit], set[str]]:
    """The units a parsed infotext describes, and the keys read."""
    units, used = [], set()
    i = 0
    while f"{SCRIPT_NAME} {i}" in params:
        key = f"{SCRIPT_NAME} {i}"
        try:
            units.append(unit_from_infotext(params[key], i))
            used.add(key)
        except ControlNetError:
            pass  # a damaged entry is left in the infotext's extra keys
        i += 1
    return units, used


@dataclass(frozen=True)
class Preprocessor:
    """One preprocessor ("module"): what the extension lists in ``/controlnet/module_list`` and runs on a
    control image before the ControlNet sees it. Built-in ones live in :mod:`sdstudio.engine.preprocessors`
    (weight-free) and :mod:`sdstudio.engine.annotators` (networks); plug-ins add theirs through
    ``PluginAPI.add_preprocessor``.

    ``run(image, resolution, threshold_a, threshold_b, mask)``: ``image`` is an H×W×3 uint8 numpy array,
    ``mask`` None or H×W uint8 (255 = masked); returns the detected map as H×W×3 uint8 (H×W×4 for the
    inpaint preprocessors: RGB and the mask). Resolution and thresholds arrive resolved (the unit's -1 =
    the slider's default). ``run`` None: nothing to run (``none``, the reference and IP-Adapter modules).
    """

    name: str
    run: Any = None
    resolution: Slider | None = None  # None: the preprocessor takes no resolution (none, invert...)
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    model_free: bool = False  # works without a ControlNet model (reference_only...)
    control_types: tuple[str, ...] = ()  # the quick filter's types ("Canny", "Depth"...)
    aliases: tuple[str, ...] = ()  # old module names that select it
    needs_mask: bool = False
    owner: str = "sdstudio"

    def sliders(self) -> list[Slider]:
        return [s for s in (self.resolution, self.threshold_a, self.threshold_b) if s is not None]

    def detail(self) -> dict:
        """Its entry in ``module_detail``."""
        return {"model_free": self.model_free, "sliders": [s.detail() for s in self.sliders()]}

    def resolved(self, processor_res: float, threshold_a: float, threshold_b: float) -> tuple[int, float, float]:
        """The unit's values, those out of a slider's range (the unit's -1) taking the slider's default, as the
        extension's ``bound_check_params``."""
        out = []
        for value, slider in ((processor_res, self.resolution), (threshold_a, self.threshold_a),
                              (threshold_b, self.threshold_b)):
            if slider is None:
                out.append(value)
            else:
                out.append(slider.value if not slider.minimum <= value <= slider.maximum else value)
        return int(out[0]), float(out[1]), float(out[2])
