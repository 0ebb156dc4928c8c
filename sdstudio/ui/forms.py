"""The page's forms and the request object: one name per parameter, both ways.

A tab's controls are kept in a :class:`Form` under the request field they set (``steps``, ``cfg_scale``,
``hr_upscaler``...), so building a request from the page, and filling the page from a request (a pasted
infotext, PNG info, "send to"), are two loops over the same names rather than two hand-written lists.
Script controls are named ``script:<script name>:<field>``. A script whose argument is structured (ControlNet's
list of units) brings its own controls (:class:`ScriptControls`), attached with :meth:`Form.attach`.
"""

from __future__ import annotations

import typing
from typing import Any, Protocol

from ..core import scripts
from ..core.params import Img2ImgRequest, Txt2ImgRequest, option_fields
from ..core.settings import eta_for

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
    """The form's name of a script argument's control (selectable and always-on scripts alike)."""
    return f"script:{script_name}:{field_name}"


class ScriptControls(Protocol):
    """A script's own controls (its accordion module): they turn the form's values into the script's
    arguments (None: the script is off) and a request's arguments (None when it has none) into values."""

    def args(self, values: dict[str, Any]) -> dict[str, Any] | None: ...

    def fill(self, args: dict[str, Any] | None) -> dict[str, Any]: ...


class Form:
    """The controls of one tab, by request field name."""

    def __init__(self, kind: str, catalog: scripts.ScriptCatalog | None = None):
        self.kind = kind
        self.catalog = catalog or scripts.builtin()
        self.fields = TXT2IMG_FIELDS if kind == "txt2img" else IMG2IMG_FIELDS
        self.controls: dict[str, Any] = {}
        self.own: dict[str, ScriptControls] = {}  # scripts drawn by their own module, by script name

    def attach(self, script_name: str, controls: ScriptControls) -> None:
        """``controls`` make ``script_name``'s arguments (instead of one control per parameter)."""
        self.own[script_name] = controls

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
            fields["script_args"] = self._script_args(self.catalog.get(name), values)
        alwayson = {}
        for script in self.catalog:
            if script.alwayson and not script.request_fields and self.kind in script.tabs:
                own = self.own.get(script.name)
                args = own.args(values) if own is not None else self._script_args(script, values)
                if args and script.is_on(args):
                    alwayson[script.name] = args
        if alwayson:
            fields["alwayson_scripts"] = alwayson
        request_type = Txt2ImgRequest if self.kind == "txt2img" else Img2ImgRequest
        if "eta" not in fields and "eta" not in more:  # the tabs have no eta: A1111's settings give it
            more = {**more, "eta": eta_for(settings, fields.get("sampler_name") or "Euler", None)}
        return request_type(
            **fields, **more, clip_skip=int(settings.get("CLIP_stop_at_last_layers", 1)),
            rng=settings.get("randn_source", "GPU"), emphasis=settings.get("emphasis", "Original"),
            eta_noise_seed_delta=int(settings.get("eta_noise_seed_delta", 0)),
            uni_pc_variant=str(settings.get("uni_pc_variant", "bh1")), uni_pc_order=int(settings.get("uni_pc_order", 3)),
            uni_pc_skip_type=str(settings.get("uni_pc_skip_type", "time_uniform")),
            uni_pc_lower_order_final=bool(settings.get("uni_pc_lower_order_final", True)),
            face_restoration_model=settings.get("face_restoration_model", "CodeFormer"),
            code_former_weight=float(settings.get("code_former_weight", 0.5)),
            model=settings.get("sd_model_checkpoint") or None, vae=settings.get("sd_vae", "Automatic"),
            **option_fields(settings),
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
            elif name in ("script_name", "refiner_checkpoint") and not value:
                value = "None"
            out[name] = value
        chosen = {req.script_name: req.script_args} if req.script_name else {}
        for name, args in {**chosen, **req.alwayson_scripts}.items():
            for key, value in args.items():
                control = script_key(name, key)
                if control in self.controls:
                    out[control] = value
        for script in self.catalog:  # an always-on script the request leaves off shows as off
            if script.alwayson and script.enabled and script.name not in req.alwayson_scripts \
                    and not script.request_fields and script_key(script.name, script.enabled) in self.controls:
                out[script_key(script.name, script.enabled)] = False
        for name, own in self.own.items():
            found = next((args for key, args in req.alwayson_scripts.items() if key.lower() == name.lower()), None)
            out.update(own.fill(found))
        return out

    def _script_args(self, script: scripts.Script, values: dict[str, Any]) -> dict[str, Any]:
        """A script's arguments from its controls, as its declaration types them."""
        out = {}
        for p in script.params:
            key = script_key(script.name, p.name)
            if key in values:
                value = values[key]
                if p.kind is int and isinstance(value, float):
                    value = round(value)
                out[p.name] = p.coerce([] if value is None and p.kind is list else value, script.name)
        return out
