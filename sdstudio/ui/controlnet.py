"""The ControlNet accordion of txt2img and img2img: sd-webui-controlnet's unit tabs, controls and element ids.

The ControlNet script (:mod:`sdstudio.scripts.controlnet`) takes one structured argument, its list of
units, so the generic script accordion cannot draw it. This module draws it as the extension does: one tab
per unit (the setting ``control_net_unit_count``), each with the control image (a brush draws the optional
mask on it), the preprocessor preview, the control-type quick filter, preprocessor and model, weight and
guidance window, the preprocessor's own sliders (their names, ranges and defaults follow the chosen
preprocessor), control, resize and Hires. fix modes.

:class:`ControlNetAccordion` is attached to the tab's :class:`~sdstudio.ui.forms.Form` as the script's own
controls: :meth:`~ControlNetAccordion.args` turns the controls' values into the request's
``alwayson_scripts["ControlNet"] = {"units": [...]}`` (images as base64 PNG, the only form the engine
reads), and :meth:`~ControlNetAccordion.fill` shows a request's units (a pasted infotext's ``ControlNet N``)
in the tabs, leaving the images as they are: an infotext does not carry them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from ..core import controlnet as cn
from ..core.errors import RequestError
from ..core.outputs import png_base64

CONTROL_TYPE_ALL = "All"
# what the unit's fields are called in the tab's Form (kept out of the request fields' names)
UNIT_FIELDS = ("enabled", "image", "low_vram", "pixel_perfect", "allow_preview", "type_filter", "module", "model",
               "weight", "guidance_start", "guidance_end", "processor_res", "threshold_a", "threshold_b",
               "control_mode", "resize_mode", "hr_option", "union_control_type", "input_mode", "batch_images",
               "loopback", "pulid_mode")
SLIDER_FIELDS = ("processor_res", "threshold_a", "threshold_b")
# the sliders' labels before a preprocessor names them (the extension's)
SLIDER_LABELS = {"processor_res": "Preprocessor resolution", "threshold_a": "Threshold A",
                 "threshold_b": "Threshold B"}
RUN_SYMBOL, REFRESH_SYMBOL = "\U0001f4a5", "\U0001f504"  # 💥 🔄, the extension's tool buttons


def is_pulid(model: str | None) -> bool:
    """Whether a model's title names a PuLID file (the extension shows PuLID Mode by the name)."""
    return "pulid" in str(model or "").lower()


def unit_key(index: int, name: str) -> str:
    """The Form's name of unit ``index``'s control ``name``."""
    return f"controlnet:{index}:{name}"


def unit_prefix(kind: str, index: int, count: int) -> str:
    """The extension's element id prefix of a unit: ``txt2img_controlnet_ControlNet-0`` (``..._ControlNet``
    when there is a single unit, drawn without tabs)."""
    return f"{kind}_controlnet_ControlNet" + (f"-{index}" if count > 1 else "")


def unit_count(settings: dict) -> int:
    try:
        count = int(settings.get("control_net_unit_count", cn.DEFAULT_UNIT_COUNT))
    except (TypeError, ValueError):
        count = cn.DEFAULT_UNIT_COUNT
    return max(1, min(cn.MAX_UNIT_COUNT, count))


def image_and_mask(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """The control image and the drawn mask (white where painted; None when nothing was painted) of an
    image editor's value. Strokes on an empty canvas are the image itself (a scribble)."""
    from .generation import _drawn_mask

    if value is None:
        return None, None
    if isinstance(value, Image.Image):
        return value, None
    if not isinstance(value, dict):
        raise RequestError(f"ControlNet: unexpected image value {type(value).__name__}")
    background = value.get("background")
    layers = [layer for layer in value.get("layers") or [] if layer is not None]
    if background is None or not background.getbbox():
        composite = value.get("composite")
        if composite is not None and composite.getbbox():
            return _on_white(composite), None  # drawn on an empty canvas
        return None, None
    return background, _drawn_mask({**value, "layers": layers}) if layers else None


def _on_white(image: Image.Image) -> Image.Image:
    """Strokes drawn on a transparent canvas, on white (a scribble's paper)."""
    rgba = image.convert("RGBA")
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(paper, rgba).convert("RGB")


@dataclass
class UnitTab:
    """One unit's controls (by field) and its tool buttons."""

    index: int
    prefix: str
    controls: dict[str, Any] = field(default_factory=dict)
    preview: Any = None
    preview_group: Any = None
    run: Any = None
    refresh: Any = None


class ControlNetAccordion:
    """The ControlNet accordion of one generation tab; the ControlNet script's own controls in its Form."""

    SCRIPT = cn.SCRIPT_NAME

    def __init__(self, ui, kind: str, form):
        self.ui, self.kind, self.form = ui, kind, form
        self.count = unit_count(ui.settings.values)
        self.units: list[UnitTab] = []

    # ---- what the server knows -----------------------------------------------------------------------
    @property
    def preprocessors(self):
        return self.ui.service.engine.controlnets.preprocessors

    def model_titles(self) -> list[str]:
        registry = self.ui.service.engine.registry
        titles = getattr(registry, "controlnet_titles", None)
        return list(titles()) if callable(titles) else []

    def module_choices(self, labels: list[str] | None = None) -> list[tuple[str, str]]:
        """(label, name) pairs: the dropdown shows the extension's label (``depth_midas``), the unit gets
        the name the engine knows (``depth``)."""
        from ..engine.preprocessors import label_of

        ordered = self.preprocessors.sorted()
        if labels is None:
            return [(label_of(p), p.name) for p in ordered]
        by_label = {label_of(p): p for p in ordered}
        return [(label, by_label[label].name) for label in labels if label in by_label]

    def find_preprocessor(self, module: str | None) -> cn.Preprocessor | None:
        """The preprocessor a name, alias or label (an infotext's ``Module: depth_midas``) names; None when
        the server has none of that name."""
        from ..engine.preprocessors import label_of

        text = (module or "").strip()
        if not text:
            return None
        if text in self.preprocessors:
            return self.preprocessors.get(text)
        return next((p for p in self.preprocessors.sorted() if label_of(p).lower() == text.lower()), None)

    def control_types(self) -> dict[str, dict]:
        return self.preprocessors.control_types(self.model_titles())["control_types"]

    # ---- layout ----------------------------------------------------------------------------------------
    def build(self) -> ControlNetAccordion:
        kind = self.kind
        with gr.Group(elem_id=f"{kind}_controlnet"), \
                gr.Accordion(cn.SCRIPT_NAME, open=False, elem_id=f"{kind}_script_controlnet",
                             elem_classes=["controlnet"]):
            if self.count > 1:
                with gr.Tabs(elem_id=f"{kind}_controlnet_tabs"):
                    for i in range(self.count):
                        prefix = unit_prefix(kind, i, self.count)
                        with gr.Tab(f"ControlNet Unit {i}", elem_id=f"{prefix}_tab", elem_classes=["cnet-unit-tab"]):
                            self.units.append(self._unit(i))
            else:
                with gr.Column():
                    self.units.append(self._unit(0))
        for unit in self.units:
            for name, control in unit.controls.items():
                self.form.add(unit_key(unit.index, name), control)
        self.form.attach(cn.SCRIPT_NAME, self)
        return self

    def _unit(self, index: int) -> UnitTab:
        p = unit_prefix(self.kind, index, self.count)
        unit, c = UnitTab(index, p), {}
        defaults = cn.ControlUnit()
        img2img = self.kind == "img2img"
        c["input_mode"] = gr.State(defaults.input_mode)  # which input tab is open, as the extension keeps it
        with gr.Tabs(elem_classes=["cnet-input-tabs"]):
            with gr.Tab("Single Image", elem_classes=["cnet-unit-image"]) as single, \
                    gr.Row(elem_classes=["cnet-image-row"], equal_height=True):
                c["image"] = gr.ImageEditor(
                    label="Image (leave empty to use the img2img image)" if img2img else "Image", type="pil",
                    elem_id=f"{p}_input_image", elem_classes=["cnet-image"], height=300,
                    sources=["upload", "clipboard"], brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                    eraser=gr.Eraser(), layers=False)
                with gr.Group(visible=False, elem_classes=["cnet-generated-image-group"]) as unit.preview_group:
                    unit.preview = gr.Image(label="Preprocessor Preview", type="numpy", interactive=False,
                                            elem_id=f"{p}_generated_image", elem_classes=["cnet-image"], height=300)
            with gr.Tab("Batch", elem_classes=["cnet-unit-batch"]) as batch:
                c["batch_images"] = gr.Textbox(label="Input Directory", elem_id=f"{p}_batch_image_dir",
                                               placeholder="A folder on the server: one generation per picture")
        c["loopback"] = gr.Checkbox(False, label="[Batch Loopback] Automatically send generated images to this "
                                                 "ControlNet unit in batch generation", visible=False,
                                    elem_id=f"{p}_controlnet_automatically_send_generated_images_checkbox",
                                    elem_classes=["controlnet_loopback_checkbox"])
        for tab, mode in ((single, "simple"), (batch, "batch")):
            tab.select(lambda m=mode: (m, gr.Checkbox(visible=m == "batch")), None,
                       [c["input_mode"], c["loopback"]], show_progress="hidden")
        with gr.Row(elem_classes=["controlnet_main_options"]):
            c["enabled"] = gr.Checkbox(defaults.enabled, label="Enable", elem_id=f"{p}_controlnet_enable_checkbox",
                                       elem_classes=["cnet-unit-enabled"])
            c["low_vram"] = gr.Checkbox(defaults.low_vram, label="Low VRAM",
                                        elem_id=f"{p}_controlnet_low_vram_checkbox")
            c["pixel_perfect"] = gr.Checkbox(defaults.pixel_perfect, label="Pixel Perfect",
                                             elem_id=f"{p}_controlnet_pixel_perfect_checkbox")
            c["allow_preview"] = gr.Checkbox(False, label="Allow Preview", elem_classes=["cnet-allow-preview"],
                                             elem_id=f"{p}_controlnet_preprocessor_preview_checkbox")
        types = list(self.control_types())
        with gr.Row(elem_classes=["controlnet_control_type", "controlnet_row"]):
            c["type_filter"] = gr.Radio(types, value=CONTROL_TYPE_ALL, label="Control Type",
                                        elem_id=f"{p}_controlnet_type_filter_radio",
                                        elem_classes=["controlnet_control_type_filter_group"])
        with gr.Row(elem_classes=["controlnet_preprocessor_model", "controlnet_row"]):
            c["module"] = gr.Dropdown(self.module_choices(), value=defaults.module, label="Preprocessor",
                                      allow_custom_value=True, elem_id=f"{p}_controlnet_preprocessor_dropdown",
                                      scale=4)
            unit.run = gr.Button(RUN_SYMBOL, elem_id=f"{p}_controlnet_trigger_preprocessor",
                                 elem_classes=["cnet-run-preprocessor"], size="sm", min_width=40, scale=0)
            c["model"] = gr.Dropdown(["None", *self.model_titles()], value=defaults.model, label="Model",
                                     allow_custom_value=True, elem_id=f"{p}_controlnet_model_dropdown", scale=4)
            unit.refresh = gr.Button(REFRESH_SYMBOL, elem_id=f"{p}_controlnet_refresh_models", size="sm",
                                     min_width=40, scale=0)
        with gr.Row(elem_classes=["controlnet_weight_steps", "controlnet_row"]):
            c["weight"] = gr.Slider(0.0, 2.0, value=defaults.weight, step=0.05, label="Control Weight",
                                    elem_id=f"{p}_controlnet_control_weight_slider",
                                    elem_classes=["controlnet_control_weight_slider"])
            c["guidance_start"] = gr.Slider(0.0, 1.0, value=defaults.guidance_start, step=0.01,
                                            label="Starting Control Step",
                                            elem_id=f"{p}_controlnet_start_control_step_slider",
                                            elem_classes=["controlnet_start_control_step_slider"])
            c["guidance_end"] = gr.Slider(0.0, 1.0, value=defaults.guidance_end, step=0.01,
                                          label="Ending Control Step",
                                          elem_id=f"{p}_controlnet_ending_control_step_slider",
                                          elem_classes=["controlnet_ending_control_step_slider"])
        first = self.find_preprocessor(defaults.module)  # drawn as the default preprocessor's sliders
        specs = slider_specs(first, defaults.pixel_perfect)
        with gr.Row(elem_classes=["controlnet_row"]):
            c["processor_res"] = gr.Slider(**specs[0], elem_id=f"{p}_controlnet_preprocessor_resolution_slider")
            c["threshold_a"] = gr.Slider(**specs[1], elem_id=f"{p}_controlnet_threshold_A_slider")
            c["threshold_b"] = gr.Slider(**specs[2], elem_id=f"{p}_controlnet_threshold_B_slider")
        c["control_mode"] = gr.Radio(list(cn.CONTROL_MODES), value=defaults.control_mode, label="Control Mode",
                                     elem_id=f"{p}_controlnet_control_mode_radio",
                                     elem_classes=["controlnet_control_mode_radio"])
        c["resize_mode"] = gr.Radio(list(cn.RESIZE_MODES), value=defaults.resize_mode, label="Resize Mode",
                                    elem_id=f"{p}_controlnet_resize_mode_radio",
                                    elem_classes=["controlnet_resize_mode_radio"])
        c["hr_option"] = gr.Radio(list(cn.HR_OPTIONS), value=defaults.hr_option, label="Hires-Fix Option",
                                  elem_id=f"{p}_controlnet_hr_option_radio",
                                  elem_classes=["controlnet_hr_option_radio"], visible=False)
        # the extension's PuLID Mode, shown while the model is a PuLID one (by its name, as the extension)
        c["pulid_mode"] = gr.Radio(list(cn.PULID_MODES), value=defaults.pulid_mode, label="PuLID Mode",
                                   elem_id=f"{p}_controlnet_pulid_mode_radio", elem_classes=["controlnet_pulid_mode_radio"],
                                   visible=is_pulid(defaults.model))
        # the extension keeps this hidden and sets it from the quick filter; shown here so it can be checked
        c["union_control_type"] = gr.Dropdown([*cn.UNION_TYPES, cn.UNION_UNKNOWN], value=defaults.union_control_type,
                                              label="Union Control Type",
                                              elem_id=f"{p}_controlnet_union_control_type_dropdown")
        unit.controls = c
        return unit

    # ---- events ----------------------------------------------------------------------------------------
    def wire(self) -> None:
        """The tabs' events: the preprocessor's sliders, the quick filter, refresh, preview; in txt2img the
        Hires-Fix option shows while Hires. fix is on, as the extension shows it."""
        form = self.form
        for unit in self.units:
            self._wire_unit(unit)
        enable_hr = form.controls.get("enable_hr")
        if enable_hr is not None:
            radios = [u.controls["hr_option"] for u in self.units]
            enable_hr.change(lambda on: [gr.Radio(visible=bool(on))] * len(radios), enable_hr, radios,
                             show_progress="hidden")

    def _wire_unit(self, unit: UnitTab) -> None:
        c = unit.controls
        sliders = [c[name] for name in SLIDER_FIELDS]
        c["module"].input(self.module_picked, [c["module"], c["pixel_perfect"]], [*sliders, c["model"]],
                          show_progress="hidden")
        c["pixel_perfect"].change(self.pixel_perfect_changed, [c["module"], c["pixel_perfect"]], c["processor_res"],
                                  show_progress="hidden")
        c["type_filter"].input(self.type_picked, [c["type_filter"], c["pixel_perfect"]],
                               [c["module"], c["model"], *sliders, c["union_control_type"]], show_progress="hidden")
        unit.refresh.click(self.refresh_models, [c["type_filter"], c["model"]], c["model"], show_progress="hidden")
        c["allow_preview"].change(lambda on: gr.Group(visible=bool(on)), c["allow_preview"], unit.preview_group,
                                  show_progress="hidden")
        c["model"].change(lambda model: gr.Radio(visible=is_pulid(model)), c["model"], c["pulid_mode"],
                          show_progress="hidden")

        def on_run(*values):
            try:
                detected = self.preview(*values)
            except RequestError as exc:
                raise gr.Error(str(exc)) from None
            return detected, True, gr.Group(visible=True)

        size = [self.form.controls["width"], self.form.controls["height"]]
        unit.run.click(on_run, [c["image"], c["module"], *sliders, c["pixel_perfect"], c["resize_mode"], *size],
                       [unit.preview, c["allow_preview"], unit.preview_group], concurrency_limit=1)

    def module_picked(self, module: str, pixel_perfect: bool) -> list:
        """The user picked a preprocessor: its sliders at their defaults (as the extension redraws them); the
        model hidden for one that needs none (reference_only...)."""
        pre = self.find_preprocessor(module)
        return [*slider_updates(pre, pixel_perfect), gr.Dropdown(visible=not (pre and pre.model_free))]

    def pixel_perfect_changed(self, module: str, pixel_perfect: bool):
        """Pixel Perfect computes the resolution from the image and the output size: its slider hides."""
        pre = self.find_preprocessor(module)
        return gr.Slider(visible=bool(pre and pre.resolution is not None and not pixel_perfect))

    def type_picked(self, control_type: str, pixel_perfect: bool) -> list:
        """The quick filter narrows both lists to the type and picks its default preprocessor and model, and
        the union control type it stands for (the extension's ``from_str`` of the type: Canny -> Hard Edge)."""
        types = self.control_types()
        entry = types.get(control_type) or types[CONTROL_TYPE_ALL]
        default = self.find_preprocessor(entry["default_option"])
        module = default.name if default is not None else cn.ControlUnit().module
        return [gr.Dropdown(choices=self.module_choices(entry["module_list"]), value=module),
                gr.Dropdown(choices=entry["model_list"], value=entry["default_model"],
                            visible=not (default and default.model_free)),
                *slider_updates(default, pixel_perfect), union_of_filter(control_type)]

    def refresh_models(self, control_type: str, model: str):
        """🔄: the ControlNet folder read again; the model kept when it is still there."""
        self.ui.service.engine.registry.refresh()
        types = self.control_types()
        choices = (types.get(control_type) or types[CONTROL_TYPE_ALL])["model_list"]
        return gr.Dropdown(choices=choices, value=model if model in choices else "None")

    def preview(self, value, module: str, res: float, a: float, b: float, pixel_perfect: bool, resize_mode: str,
                width: float, height: float) -> np.ndarray:
        """The preprocessor's detected map of the unit's image, as the preview shows it (an inpaint map's
        masked area greyed). Raises :class:`RequestError` naming what is missing."""
        from ..engine.controlnet import _mask_array, _rgb_array
        from ..engine.preprocessors import detect, inpaint_display, pixel_perfect_resolution

        image, mask = image_and_mask(value)
        if image is None:
            raise RequestError("ControlNet: upload a control image first")
        pre = self.find_preprocessor(module)
        if pre is None:
            raise cn.ControlNetError(f"ControlNet: unknown preprocessor {module!r}")
        source = _rgb_array(image)
        mask_array = _mask_array(mask, (source.shape[1], source.shape[0])) if mask is not None else None
        if pre.resolution is not None and pixel_perfect:
            res = pixel_perfect_resolution(source.shape[:2], int(width), int(height), resize_mode)
        detected = detect(pre, source, float(res), float(a), float(b), mask_array, pixel_perfect=bool(pixel_perfect))
        return inpaint_display(detected) if detected.ndim == 3 and detected.shape[2] == 4 else detected

    # ---- the Form's side: values <-> the script's arguments ----------------------------------------------
    def unit_dict(self, index: int, values: dict[str, Any]) -> dict[str, Any]:
        """Unit ``index`` from the controls' values, as the request carries it (``ControlUnit.to_dict()``)."""
        v = {name: values.get(unit_key(index, name)) for name in UNIT_FIELDS}
        enabled = bool(v["enabled"])
        pre = self.find_preprocessor(v["module"])
        fields: dict[str, Any] = {
            "enabled": enabled, "module": pre.name if pre is not None else (v["module"] or "none"),
            "model": v["model"] or "None", "weight": v["weight"], "low_vram": v["low_vram"],
            "pixel_perfect": v["pixel_perfect"], "guidance_start": v["guidance_start"],
            "guidance_end": v["guidance_end"], "control_mode": v["control_mode"], "resize_mode": v["resize_mode"],
            "hr_option": v["hr_option"], "union_control_type": v["union_control_type"], "pulid_mode": v["pulid_mode"]}
        for name, slider in zip(SLIDER_FIELDS, _sliders(pre), strict=True):
            # a slider the preprocessor does not have is sent as -1 (its default), as the API's default unit
            fields[name] = values.get(unit_key(index, name)) if pre is None or slider is not None else -1
            if name == "processor_res" and fields[name] is not None:
                fields[name] = round(float(fields[name]))
        if pre is not None and pre.model_free:
            fields["model"] = "None"
        if enabled and v["input_mode"] == "batch":  # a folder on the server's disk (refused when it is shared)
            self.ui.require_folders()
            fields.update(input_mode="batch", batch_images=(v["batch_images"] or "").strip(),
                          loopback=bool(v["loopback"]))
        elif enabled:  # a switched-off unit's picture is not needed by the job
            image, mask = image_and_mask(v["image"])
            fields["image"] = png_base64(image) if image is not None else None
            fields["mask"] = png_base64(mask) if mask is not None else None
        return cn.unit_from_dict({k: val for k, val in fields.items() if val is not None}, index).to_dict()

    def args(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """``{"units": [...]}`` for the request when a unit is on (all units listed, so their numbers are the
        tabs'), None when none is."""
        units = [self.unit_dict(i, values) for i in range(len(self.units))]
        return {"units": units} if any(u["enabled"] for u in units) else None

    def fill(self, args: dict[str, Any] | None) -> dict[str, Any]:
        """The controls showing a request's units: each unit's fields (not its image), the sliders drawn as
        its preprocessor's; tabs beyond the request's units, or all when it has none, are switched off."""
        units = cn.units_from(args) if args else []
        out: dict[str, Any] = {}
        for i in range(len(self.units)):
            if i >= len(units):
                out[unit_key(i, "enabled")] = False
                continue
            unit = units[i]
            pre = self.find_preprocessor(unit.module)
            module = pre.name if pre is not None else unit.module
            values = {"enabled": unit.enabled, "low_vram": unit.low_vram, "pixel_perfect": unit.pixel_perfect,
                      "weight": unit.weight, "guidance_start": unit.guidance_start,
                      "guidance_end": unit.guidance_end, "control_mode": unit.control_mode,
                      "resize_mode": unit.resize_mode, "hr_option": unit.hr_option,
                      "union_control_type": unit.union_control_type, "type_filter": CONTROL_TYPE_ALL,
                      "pulid_mode": gr.Radio(value=unit.pulid_mode, visible=is_pulid(unit.model)),
                      "module": gr.Dropdown(choices=self.module_choices(), value=module, allow_custom_value=True),
                      "model": gr.Dropdown(choices=["None", *self.model_titles()], value=unit.model,
                                           allow_custom_value=True, visible=not (pre and pre.model_free))}
            current = (unit.processor_res, unit.threshold_a, unit.threshold_b)
            for name, update in zip(SLIDER_FIELDS, slider_updates(pre, unit.pixel_perfect, current), strict=True):
                values[name] = update
            out.update({unit_key(i, name): value for name, value in values.items()})
        return out


def union_of_filter(control_type: str) -> str:
    """The union control type a quick-filter type stands for ("Canny" -> "Hard Edge"; others, "Unknown")."""
    try:
        return cn.union_type(str(control_type).replace(" ", "").replace("-", ""))
    except ValueError:
        return cn.UNION_UNKNOWN


def _sliders(pre: cn.Preprocessor | None) -> tuple:
    if pre is None:
        return None, None, None
    return pre.resolution, pre.threshold_a, pre.threshold_b


def slider_specs(pre: cn.Preprocessor | None, pixel_perfect: bool, current: tuple | None = None) -> list[dict]:
    """The three sliders as ``pre`` has them: its names, ranges and steps; ``current`` values where in range
    (a pasted unit's), the defaults otherwise; hidden where it has none (the resolution also under Pixel
    Perfect). No preprocessor: the extension's placeholders, hidden."""
    out = []
    for i, (name, slider) in enumerate(zip(SLIDER_FIELDS, _sliders(pre), strict=True)):
        if slider is None:
            out.append({"minimum": 64, "maximum": 2048 if name == "processor_res" else 1024, "value": 512 if
                        name == "processor_res" else 64, "step": 1, "label": SLIDER_LABELS[name], "visible": False})
            continue
        value = slider.value
        if current is not None and slider.minimum <= float(current[i]) <= slider.maximum:
            value = current[i]
        out.append({"minimum": slider.minimum, "maximum": slider.maximum, "step": slider.step, "value": value,
                    "label": slider.name, "visible": not (name == "processor_res" and pixel_perfect)})
    return out


def slider_updates(pre: cn.Preprocessor | None, pixel_perfect: bool, current: tuple | None = None) -> list:
    """:func:`slider_specs` as updates of the drawn sliders; an unknown preprocessor (a pasted name this
    server lacks) leaves them as they are."""
    if pre is None:
        return [gr.skip()] * 3
    return [gr.Slider(**spec) if slider is not None else gr.Slider(visible=False)
            for slider, spec in zip(_sliders(pre), slider_specs(pre, pixel_perfect, current), strict=True)]
