"""The page's forms and the request object: one name per parameter, both ways.

A tab's controls are kept in a :class:`Form` under the request field they set (``steps``, ``cfg_scale``,
``hr_upscaler``...), so building a request from the page, and filling the page from a request (a pasted
infotext, PNG info, "send to"), are two loops over the same names rather than two hand-written lists.
Script controls are named ``script:<script name>:<field>``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..core import scripts
from ..core.params import Img2ImgRequest, Txt2ImgRequest

SAME_SAMPLER = "Use same sampler"
SAME_SCHEDULER = "Use same scheduler"

COMMON_FIELDS = ("prompt", "negative_prompt", "styles", "sampler_name", "scheduler", "steps", "width", "height",
                 "n_iter", "batch_size", "cfg_scale", "seed", "subseed", "subseed_strength", "seed_resize_from_w",
                 "seed_resize_from_h", "tiling", "restore_faces", "tiled_vae", "script_name")
TXT2IMG_FIELDS = COMMON_FIELDS + ("enable_hr", "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_scale",
                                  "hr_resize_x", "hr_resize_y", "hr_sampler_name", "hr_scheduler", "hr_prompt",
                                  "hr_negative_prompt", "hr_cfg")
IMG2IMG_FIELDS = COMMON_FIELDS + ("denoising_strength", "resize_mode", "mask_blur", "inpainting_fill",
                                  "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert")

_HINTS = {**typing.get_type_hints(Img2ImgRequest)}


def _convert(name: str, value: Any) -> Any:
    """A control's value as the request field's type (gradio numbers arrive as floats, choices as text)."""
    kind = _HINTS.get(name)
    if value is None:
        return value
    if kind is int:
        return round(float(value))
    if kind is float:
        return float(value)
    if kind is bool:
        return bool(value)
    if kind is str:
        return str(value)
    return value


def script_key(script_name: str, field_name: str) -> str:
    return f"script:{script_name}:{field_name}"


def script_fields(kind: str) -> list[tuple[str, dataclasses.Field]]:
    """(script name, field) for every argument of every script of this kind of tab."""
    return [(name, f) for name in scripts.names_for(kind) for f in dataclasses.fields(scripts.SCRIPTS[name])]


class Form:
    """The controls of one tab, by request field name."""

    def __init__(self, kind: str):
        self.kind = kind
        self.fields = TXT2IMG_FIELDS if kind == "txt2img" else IMG2IMG_FIELDS
        self.controls: dict[str, Any] = {}

    def add(self, name: str, control):
        self.controls[name] = control
        return control

    @property
    def names(self) -> list[str]:
        return list(self.controls)

    @property
    def components(self) -> list:
        return list(self.controls.values())

    def request(self, values: dict[str, Any], settings: dict[str, Any], **more) -> Txt2ImgRequest:
        """The request these control values (and the server's settings) ask for."""
        fields = {name: _convert(name, values[name]) for name in self.fields if name in values}
        if "hr_sampler_name" in fields and fields["hr_sampler_name"] == SAME_SAMPLER:
            fields["hr_sampler_name"] = ""
        if "hr_scheduler" in fields and fields["hr_scheduler"] == SAME_SCHEDULER:
            fields["hr_scheduler"] = ""
        if "hr_cfg" in fields and not fields["hr_cfg"]:
            fields["hr_cfg"] = None  # 0 = the first pass's CFG
        fields["styles"] = list(values.get("styles") or [])
        name = fields.get("script_name") or ""
        if name in ("None", ""):
            fields["script_name"] = ""
        else:
            fields["script_args"] = {f.name: values[script_key(name, f.name)]
                                     for f in dataclasses.fields(scripts.SCRIPTS[name])
                                     if script_key(name, f.name) in values}
            fields["script_args"] = {k: _script_value(name, k, v) for k, v in fields["script_args"].items()}
        request_type = Txt2ImgRequest if self.kind == "txt2img" else Img2ImgRequest
        return request_type(
            **fields, **more, clip_skip=int(settings.get("CLIP_stop_at_last_layers", 1)),
            rng=settings.get("randn_source", "GPU"), emphasis=settings.get("emphasis", "Original"),
            eta_noise_seed_delta=int(settings.get("eta_noise_seed_delta", 0)),
            face_restoration_model=settings.get("face_restoration_model", "CodeFormer"),
            code_former_weight=float(settings.get("code_former_weight", 0.5)),
            model=settings.get("sd_model_checkpoint") or None, vae=settings.get("sd_vae", "Automatic"),
            **({"fix_steps": bool(settings.get("img2img_fix_steps", False)),
                "initial_noise_multiplier": float(settings.get("initial_noise_multiplier", 1.0)),
                "inpainting_mask_weight": float(settings.get("inpainting_mask_weight", 1.0))}
               if self.kind == "img2img" else {}))

    def fill(self, req: Txt2ImgRequest) -> dict[str, Any]:
        """Control values showing ``req`` (for a paste or "send to"): every control of this tab that the
        request has a value for. Scripts' controls are filled when the request names the script."""
        out: dict[str, Any] = {}
        for name in self.controls:
            if name.startswith("script:"):
                continue
            if not hasattr(req, name):
                continue
            value = getattr(req, name)
            if name == "hr_sampler_name" and not value:
                value = SAME_SAMPLER
            elif name == "hr_scheduler" and not value:
                value = SAME_SCHEDULER
            elif name == "hr_cfg" and value is None:
                value = 0
            elif name == "script_name" and not value:
                value = "None"
            out[name] = value
        if req.script_name:
            for key, value in req.script_args.items():
                control = script_key(req.script_name, key)
                if control in self.controls:
                    out[control] = value
        return out


def _script_value(script_name: str, field_name: str, value: Any) -> Any:
    field = next(f for f in dataclasses.fields(scripts.SCRIPTS[script_name]) if f.name == field_name)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return round(float(value))
    if isinstance(default, float):
        return float(value)
    if isinstance(default, list):
        return list(value or [])
    return "" if value is None else str(value)
