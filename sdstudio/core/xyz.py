"""X/Y/Z plot: axis value syntax, axis types, and the order the cells are made in (pure Python).

Value syntax, as A1111's X/Y/Z plot reads it (:func:`expand_values`):

- a comma list with CSV quoting: ``3, 7, "a, b"``;
- integers: ``1-5`` (1, 2, 3, 4, 5), ``1-5 (+2)`` (1, 3, 5), ``10-100 [5]`` (5 evenly spaced: 10, 32, 55,
  77, 100), and negative steps ``10-1 (-3)``;
- floats: ``0.5-2 (+0.5)`` (0.5, 1.0, 1.5, 2.0), ``1-2 [3]`` (1.0, 1.5, 2.0);
- anything else is one value, converted to the axis type (a bad one is an error naming it).

Axis types (:data:`AXES`) say how a value changes the request, what values are allowed (checked against
the real lists before any image is made) and how costly a change is: an axis that switches checkpoints
is walked outermost so each checkpoint loads once, whatever the grid's layout.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .extra_networks import extract

RE_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
RE_RANGE_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
RE_RANGE_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*\])?\s*")
RE_RANGE_COUNT_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\[(\d+(?:\.\d*)?)\s*\])?\s*")
MAX_VALUES = 10_000


class AxisError(ValueError):
    """A bad axis: the message names the axis and the value."""


def csv_list(text: str) -> list[str]:
    """A1111's comma list: CSV quoting, each item stripped."""
    try:
        return [item.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for item in row]
    except csv.Error as exc:  # a lone carriage return inside an item
        raise AxisError(f"cannot read {text!r} as a comma list ({exc})") from None


def _number(text: str, kind: type) -> int | float:
    return kind(text.replace(" ", ""))


def _linspace(start: float, stop: float, num: int) -> list[float]:
    if num > MAX_VALUES:
        raise AxisError(f"more than {MAX_VALUES} values")
    if num <= 0:
        return []
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    return [start + i * step if i < num - 1 else float(stop) for i in range(num)]


def _arange(start: float, stop: float, step: float) -> list[float]:
    # numpy.arange(start, stop, step): ceil((stop - start) / step) values start + i * step
    if step == 0:
        raise AxisError("a range step of 0 never ends")
    span = (stop - start) / step
    if not math.isfinite(span) or span > MAX_VALUES:
        raise AxisError(f"the range from {start:g} to {stop:g} in steps of {step:g} has more than {MAX_VALUES} values")
    count = max(0, math.ceil(span))
    return [start + i * step for i in range(count)]


def expand_values(text: str, kind: type) -> list:
    """The concrete values of an axis whose values field is ``text``, for ``kind`` int, float or str."""
    items = csv_list(text)
    out: list = []
    for item in items:
        if kind is str:
            out.append(item)
            continue
        if item.strip() == "":
            continue
        try:
            if kind is int:
                if m := RE_RANGE.fullmatch(item):
                    start, end = _number(m.group(1), int), _number(m.group(2), int) + 1
                    step = int(m.group(3)) if m.group(3) is not None else 1
                    if step == 0:
                        raise AxisError(f"{item!r}: a range step of 0 never ends")
                    if (end - start) // step > MAX_VALUES:  # counted before it is made
                        raise AxisError(f"{item!r} has more than {MAX_VALUES} values")
                    out += list(range(start, end, step))
                elif m := RE_RANGE_COUNT.fullmatch(item):
                    start, end = _number(m.group(1), int), _number(m.group(2), int)
                    num = int(m.group(3)) if m.group(3) is not None else 1
                    out += [int(x) for x in _linspace(start, end, num)]
                else:
                    out.append(int(item))
            else:
                if m := RE_RANGE_FLOAT.fullmatch(item):
                    start, end = _number(m.group(1), float), _number(m.group(2), float)
                    step = float(m.group(3)) if m.group(3) is not None else 1.0
                    values = _arange(start, end + step, step)
                elif m := RE_RANGE_COUNT_FLOAT.fullmatch(item):
                    start, end = _number(m.group(1), float), _number(m.group(2), float)
                    num = float(m.group(3)) if m.group(3) is not None else 1
                    values = _linspace(start, end, int(min(num, MAX_VALUES + 1)))
                else:
                    values = [float(item)]
                if not all(math.isfinite(v) for v in values):  # "nan", "inf", hundreds of digits
                    raise AxisError(f"{item!r} is not a finite number")
                out += values
        except (ValueError, OverflowError) as exc:
            if isinstance(exc, AxisError):
                raise
            raise AxisError(f"{item!r} is not {'an integer' if kind is int else 'a number'} or a range") from None
        if len(out) > MAX_VALUES:
            raise AxisError(f"more than {MAX_VALUES} values")
    return out


# ---- axis types ------------------------------------------------------------------------------------

def _prompt_sr(req, value: str, values: list[str]):
    search = values[0]
    if search not in req.prompt and search not in req.negative_prompt and search not in req.hr_prompt:
        raise AxisError(f"Prompt S/R did not find {search!r} in the prompt or negative prompt")
    return req.replace(prompt=req.prompt.replace(search, value),
                       negative_prompt=req.negative_prompt.replace(search, value),
                       hr_prompt=req.hr_prompt.replace(search, value),
                       hr_negative_prompt=req.hr_negative_prompt.replace(search, value))


def _prompt_order(req, value: tuple[str, ...], values):
    """The listed words put in this order where they stand in the prompt (A1111's "Prompt order")."""
    prompt = req.prompt
    positions = sorted((prompt.find(token), token) for token in value)
    if any(pos < 0 for pos, _ in positions):
        missing = [t for pos, t in positions if pos < 0]
        raise AxisError(f"Prompt order: {missing[0]!r} is not in the prompt")
    parts = []
    for _, token in positions:
        n = prompt.find(token)
        parts.append(prompt[:n])
        prompt = prompt[n + len(token):]
    return req.replace(prompt="".join(part + value[i] for i, part in enumerate(parts)) + prompt)


def _size(req, value: str, values):
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
    if not m:
        raise AxisError(f"Size: {value!r} is not WxH")
    if len(m.group(1)) > 6 or len(m.group(2)) > 6:  # (Python refuses int() of over 4300 digits)
        raise AxisError(f"Size: {value[:40]!r} is not a size in pixels")
    return req.replace(width=int(m.group(1)), height=int(m.group(2)))


def _styles(req, value: str, values):
    return req.replace(styles=[*req.styles, *[s.strip() for s in value.split(",") if s.strip()]])


def _lora_weight(req, value: float, values):
    """Every ``<lora:name:…>`` of the prompt at this weight (beyond A1111: no S/R tricks needed)."""
    _, tags = extract(req.prompt)
    if not any(t.kind == "lora" for t in tags):
        raise AxisError("LoRA weight: the prompt has no <lora:...> tag")

    def weighted(m: re.Match) -> str:
        return f"<lora:{m.group(1)}:{value:g}>"

    return req.replace(prompt=re.sub(r"<lora:([^:>]+)(?::[^>]*)?>", weighted, req.prompt))


def _face_restore(req, value: str, values):
    """On/off, or a restorer's name as A1111 also takes (CodeFormer, GFPGAN)."""
    word = value.strip().lower()
    names = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}
    if word in names:
        return req.replace(restore_faces=True, face_restoration_model=names[word])
    if word not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        raise AxisError(f"Face restore: {value!r} is not true, false, CodeFormer or GFPGAN")
    return req.replace(restore_faces=word in ("true", "yes", "1", "on"))


def _bool(text: str) -> str:
    if text.strip().lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        raise AxisError(f"{text!r} is not true or false")
    return text


@dataclass(frozen=True)
class Axis:
    label: str
    kind: type  # int, float, str, or tuple for permutations
    apply: Callable[..., Any]  # (request, value, all values) -> request
    choices: str | None = None  # "samplers", "schedules", "checkpoints", "vaes", "upscalers": checked by the engine
    cost: int = 0  # how expensive a change is: model switches go outermost
    field: str | None = None  # the request field it sets, when it is that simple
    only: str | None = None  # "txt2img" / "img2img" when it makes sense for one kind only


def _field(label: str, kind: type, name: str, **kw) -> Axis:
    return Axis(label, kind, lambda req, v, vs: req.replace(**{name: v}), field=name, **kw)


AXES: dict[str, Axis] = {a.label: a for a in (
    Axis("Nothing", str, lambda req, v, vs: req),
    _field("Seed", int, "seed"),
    _field("Var. seed", int, "subseed"),
    _field("Var. strength", float, "subseed_strength"),
    _field("Steps", int, "steps"),
    _field("Hires steps", int, "hr_second_pass_steps", only="txt2img"),
    _field("CFG Scale", float, "cfg_scale"),
    Axis("Prompt S/R", str, _prompt_sr),
    Axis("Prompt order", tuple, _prompt_order),
    _field("Sampler", str, "sampler_name", choices="samplers"),
    _field("Hires sampler", str, "hr_sampler_name", choices="samplers", only="txt2img"),
    _field("Schedule type", str, "scheduler", choices="schedules"),
    _field("Checkpoint name", str, "model", choices="checkpoints", cost=2),
    _field("VAE", str, "vae", choices="vaes", cost=1),
    _field("Refiner checkpoint", str, "refiner_checkpoint", choices="checkpoints", cost=1),
    _field("Refiner switch at", float, "refiner_switch_at"),
    _field("Clip skip", int, "clip_skip"),
    _field("Denoising", float, "denoising_strength"),
    _field("Hires upscaler", str, "hr_upscaler", choices="upscalers", only="txt2img"),
    Axis("Styles", str, _styles),
    _field("Eta", float, "eta"),
    _field("UniPC Order", int, "uni_pc_order"),
    _field("Sigma Churn", float, "s_churn"),
    _field("Sigma min", float, "s_tmin"),
    _field("Sigma max", float, "s_tmax"),
    _field("Sigma noise", float, "s_noise"),
    Axis("Size", str, _size),
    Axis("Always discard next-to-last sigma", str,
         lambda req, v, vs: req.replace(always_discard_next_to_last_sigma=_bool(v).strip().lower() in ("true", "yes", "1", "on")),
         field="always_discard_next_to_last_sigma"),
    _field("Extra noise", float, "extra_noise"),
    Axis("Face restore", str, _face_restore),
    Axis("LoRA weight", float, _lora_weight),
)}
_AXIS_INDEX = {label.lower(): label for label in AXES}


def axis_names(kind: str, extra: dict[str, Axis] | None = None) -> list[str]:
    """The axes that make sense on a txt2img or img2img tab, in A1111's order (then the scripts' ``extra``)."""
    return [label for label, ax in {**AXES, **(extra or {})}.items() if ax.only in (None, kind)]


def axis(label: str, extra: dict[str, Axis] | None = None) -> Axis:
    """The axis named ``label`` (without regard to case), from ours or the scripts' ``extra`` axes."""
    found = _AXIS_INDEX.get(label.strip().lower())
    if found is not None:
        return AXES[found]
    for name, ax in (extra or {}).items():
        if name.lower() == label.strip().lower():
            return ax
    raise AxisError(f"unknown axis type {label!r}; one of: {', '.join([*AXES, *(extra or {})])}")


def script_axis(label: str, kind: type, script: str, param: str, enabled: str | None = None, **kw) -> Axis:
    """An axis that sets an always-on script's argument (and switches the script on)."""

    def apply(req, value, values):
        args = {**req.alwayson_scripts.get(script, {}), param: value}
        if enabled is not None:
            args[enabled] = True
        return req.replace(alwayson_scripts={**req.alwayson_scripts, script: args})

    return Axis(label, kind, apply, **kw)


def axis_values(ax: Axis, text: str, keep_random_seeds: bool = False, rng: random.Random | None = None) -> list:
    """The values of an axis as the plot uses them: expanded, typed, permuted (Prompt order), and -1
    seeds made concrete (drawn from ``rng``, default the module's) unless ``keep_random_seeds`` ("Keep -1
    for seeds")."""
    if ax.label == "Nothing":
        return [None]
    if ax.kind is tuple:
        words = csv_list(text)
        orders = 1
        for n in range(2, len(words) + 1):  # n! orders, refused before they are made
            orders *= n
            if orders > MAX_VALUES:
                raise AxisError(f"{ax.label}: {len(words)} words have more than {MAX_VALUES} orders")
        values = list(itertools.permutations(words))
    else:
        try:
            values = expand_values(text, ax.kind)
        except AxisError as exc:
            raise AxisError(f"{ax.label}: {exc}") from None
    if not values:
        raise AxisError(f"{ax.label}: no values")
    if ax.label in ("Seed", "Var. seed") and not keep_random_seeds:
        values = [(rng or random).randrange(4294967294) if v == -1 else v for v in values]
    if ax.label == "Prompt S/R" and len(values) < 1:
        raise AxisError("Prompt S/R needs the text to search for as its first value")
    return values


def label(ax: Axis, value) -> str:
    """The text written on the grid for a value (A1111's "Label: value" form, the S/R text alone)."""
    if ax.label == "Nothing":
        return ""
    if ax.label in ("Prompt S/R", "Sampler", "Checkpoint name", "Face restore"):  # A1111 shows the value alone
        return str(value)
    if isinstance(value, tuple):
        return ", ".join(value)
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{ax.label}: {value}"


def cell_order(shape: tuple[int, int, int], costs: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The (x, y, z) cells in the order they are made: Z outermost, then Y, then X, except that a costlier
    axis (model switches) goes further out, so its value changes as few times as possible."""
    axes = sorted(range(3), key=lambda a: (-costs[a], -a))  # outermost first; ties keep Z > Y > X
    ranges = [range(shape[a]) for a in axes]
    order = []
    for combo in itertools.product(*ranges):
        cell = [0, 0, 0]
        for a, i in zip(axes, combo):
            cell[a] = i
        order.append(tuple(cell))
    return order
