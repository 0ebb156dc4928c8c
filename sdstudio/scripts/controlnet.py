"""ControlNet (sd-webui-controlnet) as an always-on script: its units are the one argument (``units``),
read from the extension's API forms (``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}``, webuiapi's
``ControlNetUnit.to_dict()``), our dict (``{"ControlNet": {"units": [...]}}``), the UI and pasted infotext
(``ControlNet 0: "Module: canny, Model: ..."``). Each enabled unit becomes a per-step hook
(:mod:`sdstudio.engine.controlnet`); the units' detected maps come back after the images.

The X/Y/Z axes ``[ControlNet] Weight`` and the others set a field of the first unit, as the extension's do,
and switch that unit on. Importing this module imports no torch.
"""

from __future__ import annotations

from ..core import controlnet as cn
from ..core import xyz
from ..core.scripts import Args, Param, Script, ScriptError

NAME = cn.SCRIPT_NAME


def _parse_units(value, script: str) -> list[dict]:
    try:
        return [u.to_dict() for u in cn.units_from(value)]
    except cn.ControlNetError as exc:
        raise ScriptError(str(exc)) from None


def units(args: Args) -> list[cn.ControlUnit]:
    return [cn.unit_from_dict(u, i) for i, u in enumerate(args.get("units", []))]


def _from_a1111(args: list, context: dict) -> dict:
    return {"units": list(args)}


def _write_infotext(args: Args) -> dict:
    return cn.infotext_pairs(units(args))


def _read_infotext(params: dict) -> tuple[dict | None, set]:
    found, used = cn.units_from_infotext(params)
    if not found:
        return None, used
    return {"units": [u.to_dict() for u in found]}, used


def _hooks(args: Args, req, ctx):
    from ..engine.controlnet import units_used

    listed = units(args)
    if not any(u.enabled for u in listed):
        return []
    engine = ctx.engine

    def base():
        file, model = engine.load(req.model, req.model_hash)
        return model, engine.vae_module(file, model, req.vae)[0]

    hooks = engine.controlnets.hooks(listed, req, ctx.extra_images, base=base)
    used = units_used(hooks)
    ctx.resolved[NAME] = Args(args, units=[used.get(i, u).to_dict() for i, u in enumerate(listed)])
    return hooks


def _unit_axis(label: str, kind: type, field: str, choices: str | None = None) -> xyz.Axis:
    """An axis setting ``field`` of the first unit (switched on)."""

    def apply(req, value, values):
        args = dict(req.alwayson_scripts.get(NAME, {}))
        listed = list(args.get("units", [])) or [cn.ControlUnit().to_dict()]
        first = cn.unit_from_dict({**listed[0], field: value, "enabled": True}).to_dict()
        args["units"] = [first, *listed[1:]]
        return req.replace(alwayson_scripts={**req.alwayson_scripts, NAME: args})

    return xyz.Axis(f"[ControlNet] {label}", kind, apply, choices=choices)


CONTROLNET = Script(
    name=NAME,
    params=(Param("units", [], label="ControlNet units", parse=_parse_units,
                  help="the units, each with the extension's fields (enabled, module, model, weight, image...)"),),
    alwayson=True,
    hooks=_hooks,
    from_a1111=_from_a1111,
    write_infotext=_write_infotext,
    read_infotext=_read_infotext,
    axes=(
        _unit_axis("Enabled", str, "enabled"),
        _unit_axis("Model", str, "model", choices="controlnets"),
        _unit_axis("Weight", float, "weight"),
        _unit_axis("Guidance Start", float, "guidance_start"),
        _unit_axis("Guidance End", float, "guidance_end"),
        _unit_axis("Control Mode", str, "control_mode"),
        _unit_axis("Resize Mode", str, "resize_mode"),
        _unit_axis("Preprocessor", str, "module", choices="preprocessors"),
        _unit_axis("Pre Resolution", int, "processor_res"),
        _unit_axis("Pre Threshold A", float, "threshold_a"),
        _unit_axis("Pre Threshold B", float, "threshold_b"),
    ),
    aliases=("controlnet", "cn"),
    description="Controls composition with a control image (edges, depth, pose...) through ControlNet models, "
                "as the sd-webui-controlnet extension.",
)
