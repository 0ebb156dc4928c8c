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
from ..core import outputs, xyz
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


def _series(args: Args):
    """The batch tab: a job with an enabled unit in input_mode "batch" runs once per control picture."""
    return _batch_run if any(u.enabled and u.input_mode == "batch" for u in units(args)) else None


def _batch_units(listed: list[cn.ControlUnit]) -> dict[int, list[tuple[str, str | None]]]:
    return {i: cn.batch_files(u, i) for i, u in enumerate(listed) if u.enabled and u.input_mode == "batch"}


def _batch_precheck(ctx, req, args: Args) -> None:
    try:
        _batch_units(units(args))  # the folders are there and hold pictures
    except cn.ControlNetError as exc:
        raise ScriptError(str(exc)) from None


def _server_paths(args: Args) -> dict[str, str]:
    found: dict[str, str] = {}
    for i, u in enumerate(units(args)):
        if not (u.enabled and u.input_mode == "batch"):
            continue
        where = f"{NAME} unit {i}"
        pictures = u.batch_images if isinstance(u.batch_images, tuple) else (u.batch_images,)
        found.update({f"{where}.batch_images" + (f"[{k}]" if len(pictures) > 1 else ""): path
                      for k, path in enumerate(pictures) if path})
        if u.batch_mask_dir:
            found[f"{where}.batch_mask_dir"] = u.batch_mask_dir
        if u.output_dir:
            found[f"{where}.output_dir"] = u.output_dir
    return found


def _read_picture(path: str, where: str) -> str:
    """A batch picture as the base64 text a unit carries, checked readable (the error names the file)."""
    import base64

    from ..engine.controlnet import decode_image

    try:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
    except OSError as exc:
        raise ScriptError(f"{where}: cannot read {path!r} ({exc.strerror or exc})") from None
    try:
        decode_image(data, f"{where}: {path}")
    except cn.ControlNetError as exc:
        raise ScriptError(str(exc)) from None
    return data


def _save_batch_output(image, folder: str, picture: str, n: int, infotext: str) -> None:
    """The extension's batch output: named as the control picture (``name-N.ext`` for the N-th image after
    the first), in RGB, written whole under that name."""
    import os
    from pathlib import Path

    stem, suffix = os.path.splitext(os.path.basename(picture))
    name = f"{stem}-{n}{suffix}" if n else f"{stem}{suffix}"
    target = Path(folder) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    fmt = suffix.lower().lstrip(".")
    if fmt in ("png", "jpg", "jpeg", "webp"):
        outputs.write_image(image.convert("RGB"), tmp, infotext=infotext, fmt=fmt)
    else:
        image.convert("RGB").save(tmp, format={"tif": "TIFF"}.get(fmt, fmt.upper()))
    os.replace(tmp, target)


def _batch_run(ctx, req, args: Args):
    """One generation per control picture of the batch units' folders (as many as the shortest has), each
    unit given its next picture (and mask); the same seed each time, as the extension runs it (moved on by the
    job's image count after each picture with ``controlnet_increment_seed_during_batch``). A loopback
    unit gets the previous generation's first image from the second on. Detected maps are not appended (the
    extension turns them off in batch), and the pictures are also saved into the last batch unit's
    ``output_dir`` when it names one. Every generation is a unit of the job: paused and resumed between."""
    listed = units(args)
    batch = _batch_units(listed)
    count = min(len(files) for files in batch.values())
    output = next((listed[i].output_dir for i in sorted(batch, reverse=True) if listed[i].output_dir), "")
    names = batch[max(batch)]
    passes = ctx.passes(count)
    previous = None
    step = req.n_iter * req.batch_size if req.controlnet_increment_seed_during_batch else 0
    for k in range(count):
        current = []
        for i, u in enumerate(listed):
            where = f"{NAME} unit {i}"
            if u.enabled and u.loopback and k > 0 and previous is not None:
                u = u.replace(image=outputs.png_base64(previous.image), mask=None, more_images=())
            elif i in batch:
                picture, mask = batch[i][k]
                u = u.replace(image=_read_picture(picture, where),
                              mask=_read_picture(mask, f"{where} mask") if mask else u.mask)
            current.append(u.replace(input_mode="simple" if u.input_mode == "batch" else u.input_mode,
                                     batch_images=None, batch_mask_dir=None))
        inner = req.replace(alwayson_scripts={**req.alwayson_scripts,
                                              NAME: Args(args, units=[u.to_dict() for u in current])},
                            seed=req.seed + k * step, subseed=req.subseed + k * step)
        result = passes.run(inner)
        if result.interrupted:
            yield req.seed, None
            return
        own = [g for g in result.images if not getattr(g, "extra", False)]
        if output:
            for n, g in enumerate(own):
                _save_batch_output(g.image, output, names[k][0], n, g.infotext)
        previous = own[0] if own else previous
        yield inner.seed, own


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
    series=_series,
    precheck=_batch_precheck,
    server_paths=_server_paths,
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
