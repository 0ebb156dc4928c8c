"""The txt2img and img2img tabs: A1111's controls and element ids, one :class:`~sdstudio.ui.forms.Form` each.

Generate queues the tab's request as a job of this browser window and follows it (progress bar, live
preview, queue panel); the gallery shows the saved files with their infotext. Paste (↙) and PNG info fill
the same controls from an infotext through :meth:`Form.fill`.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..core import imageops, infotext, outputs
from ..core import styles as styles_file
from ..core.imageops import MASKED_CONTENT, RESIZE_MODES
from ..core.names import sampler_labels, schedule_labels
from ..core.params import (
    SOFT_INPAINTING_FIELDS,
    Img2ImgRequest,
    RequestError,
    Txt2ImgRequest,
    from_infotext,
    with_png_info,
)
from ..service.jobs import JobError, Txt2ImgJob, grid_entries
from ..service.queue import FAILED
from . import networks
from .controlnet import ControlNetAccordion
from .forms import SAME_SAMPLER, SAME_SCHEDULER, Form, script_key
from .progress import client_of, finished, live_html

INTERROGATE_NOTE = ("Interrogation needs weight files: BLIP and CLIP in models/BLIP and models/CLIP, the tagger in "
                    "models/deepbooru")
IMG2IMG_MODES = ("img2img", "Sketch", "Inpaint", "Inpaint sketch", "Inpaint upload", "Batch")


def token_counter(tokenizer, embeddings, text: str, steps: int = 20) -> str:
    """A1111's counter: the longest of the prompt's AND parts and scheduled variants, ``12/75``."""
    from ..core.extra_networks import extract
    from ..core.prompt import prompt_schedule, split_and
    from ..engine.conditioning import token_count

    plain, _ = extract(text or "")
    best = (0, 75)
    for part, _weight in split_and(plain):
        for _end, variant in prompt_schedule(part, max(1, int(steps or 1))):
            best = max(best, token_count(tokenizer, variant, embeddings))
    return f'<span class="sd-token-count">{best[0]}/{best[1]}</span>'



def gallery_entries(result: dict, detected_maps: bool = True) -> list[dict]:
    """A finished job's pictures for the gallery: grids first (as A1111 shows them), the images, then
    ControlNet's detected maps (as the extension appends them; off with its "Do not append detectmap to
    output" setting), which show the first image's parameters when selected."""
    found = [{"path": e["path"], "infotext": e["infotext"]} for e in grid_entries(result) + result.get("images", [])]
    if detected_maps:
        text = found[0]["infotext"] if found else ""
        found += [{"path": e["path"], "infotext": text} for e in result.get("extras", [])]
    return found

class GenerationTab:
    def __init__(self, ui, kind: str):
        self.ui, self.kind = ui, kind
        self.t = kind  # A1111's element id prefix
        self.form = Form(kind, ui.service.studio.catalog)
        self.mode_state = None  # img2img: the sub-tab in use
        self.controlnet: ControlNetAccordion | None = None

    # ---- layout -----------------------------------------------------------------------------------
    def build(self) -> GenerationTab:
        t, f, ui = self.t, self.form, self.ui
        with gr.Row(elem_id=f"{t}_toprow"):
            with gr.Column(scale=6):
                with gr.Row():
                    f.add("prompt", gr.Textbox(label="Prompt", show_label=False, lines=3, elem_id=f"{t}_prompt",
                                               placeholder="Prompt (press Ctrl+Enter to generate)", scale=8))
                    self.token_counter = gr.HTML('<span class="sd-token-count">0/75</span>',
                                                 elem_id=f"{t}_token_counter", elem_classes=["sd-counter"])
                with gr.Row():
                    f.add("negative_prompt", gr.Textbox(label="Negative prompt", show_label=False, lines=2,
                                                        elem_id=f"{t}_neg_prompt", scale=8,
                                                        placeholder="Negative prompt (press Ctrl+Enter to generate)"))
                    self.neg_token_counter = gr.HTML('<span class="sd-token-count">0/75</span>',
                                                     elem_id=f"{t}_negative_token_counter",
                                                     elem_classes=["sd-counter"])
                with gr.Row():
                    f.add("styles", gr.Dropdown(ui.style_names(), multiselect=True, label="Styles", scale=3,
                                                elem_id=f"{t}_styles"))
                    self.style_name = gr.Textbox(label="Style name", elem_id=f"{t}_style_name", max_lines=1, scale=1)
            with gr.Column(scale=2, min_width=240):
                with gr.Row():
                    self.interrupt = gr.Button("Interrupt", elem_id=f"{t}_interrupt", size="sm")
                    self.skip = gr.Button("Skip", elem_id=f"{t}_skip", size="sm")
                self.generate = gr.Button("Generate", variant="primary", elem_id=f"{t}_generate")
                with gr.Row():
                    self.forever = gr.Button("Generate forever", elem_id=f"{t}_generate_forever", size="sm")
                    self.forever_stop = gr.Button("Cancel generate forever", elem_id=f"{t}_cancel_generate_forever",
                                                  size="sm")
                with gr.Row(elem_id=f"{t}_tools"):
                    self.paste = gr.Button("↙️", elem_id="paste" if t == "txt2img" else f"{t}_paste",
                                           size="sm", min_width=40)
                    self.clear = gr.Button("🗑️", elem_id=f"{t}_clear_prompt", size="sm", min_width=40)
                    self.style_apply = gr.Button("📋", elem_id=f"{t}_style_apply", size="sm", min_width=40)
                    self.style_save = gr.Button("💾", elem_id=f"{t}_style_create", size="sm", min_width=40)
        with gr.Accordion("Extra networks", open=False, elem_id=f"{t}_extra_networks_accordion"):
            self.networks = networks.build(ui, t)
        with gr.Row():
            with gr.Column(scale=1, elem_id=f"{t}_settings"):
                if self.kind == "img2img":
                    self._img2img_inputs()
                with gr.Row():
                    f.add("sampler_name", gr.Dropdown(sampler_labels(), value="DPM++ 2M", label="Sampling method",
                                                      elem_id=f"{t}_sampling"))
                    f.add("scheduler", gr.Dropdown(schedule_labels(), value="Automatic", label="Schedule type",
                                                   elem_id=f"{t}_scheduler", elem_classes=["translate-choices"]))
                f.add("steps", gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{t}_steps"))
                if self.kind == "img2img":
                    self._img2img_resize()
                else:
                    self._size_controls()
                    self._hires()
                with gr.Row():
                    f.add("n_iter", gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{t}_batch_count"))
                    f.add("batch_size", gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{t}_batch_size"))
                self._refiner()
                f.add("cfg_scale", gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id=f"{t}_cfg_scale"))
                f.add("distilled_cfg_scale", gr.Slider(0, 30, value=3.5, step=0.1, label="Distilled CFG Scale",
                                                       elem_id=f"{t}_distilled_cfg_scale",
                                                       info="Flux.1 dev only (its guidance embedding)"))
                if self.kind == "img2img":
                    f.add("denoising_strength", gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                                          elem_id=f"{t}_denoising_strength"))
                self._seed_controls()
                with gr.Row():
                    installed = bool(ui.service.engine.faces.available())
                    f.add("restore_faces", gr.Checkbox(False, label="Restore faces", elem_id=f"{t}_restore_faces",
                                                       info=None if installed else "Face restoration is not installed"))
                    f.add("tiling", gr.Checkbox(False, label="Tiling", elem_id=f"{t}_tiling"))
                    f.add("tiled_vae", gr.Checkbox(False, label="Tiled VAE", elem_id=f"{t}_tiled_vae"))
                self._scripts()
            with gr.Column(scale=1, elem_id=f"{t}_results"):
                self.progress = gr.HTML("", elem_id=f"{t}_progressbar")
                self.gallery = gr.Gallery(label="Output", columns=2, elem_id=f"{t}_gallery", height=420,
                                          interactive=False, format="png")
                with gr.Row(elem_id=f"image_buttons_{t}"):
                    self.open_folder = gr.Button("📂", elem_id=f"{t}_open_folder", size="sm", min_width=40)
                    self.save = gr.Button("💾", elem_id=f"save_{t}", size="sm", min_width=40)
                    self.zip = gr.Button("🗃️", elem_id=f"save_zip_{t}", size="sm", min_width=40)
                    self.to_img2img = gr.Button("🖼️", elem_id=f"{t}_send_to_img2img", size="sm", min_width=40)
                    self.to_inpaint = gr.Button("🎨", elem_id=f"{t}_send_to_inpaint", size="sm", min_width=40)
                    self.to_extras = gr.Button("📐", elem_id=f"{t}_send_to_extras", size="sm", min_width=40)
                self.download = gr.File(label="Download", visible=False, elem_id=f"download_files_{t}")
                self.info = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                       elem_id=f"{t}_html_info")
                with gr.Accordion("Queue", open=True, elem_id=f"{t}_queue"):
                    # filled by the page's events and then kept fresh by the page's script (progress.py)
                    self.queue_list = gr.HTML(self.ui.queue_panel(None), elem_id=f"{t}_queue_list")
        self.results = gr.State([])  # [{"path", "infotext"}] parallel to the gallery
        self.selected = gr.State(0)
        return self

    def _size_controls(self) -> None:
        t, f = self.t, self.form
        w, h = self.ui.model_size()  # the checkpoint's own size (the page load updates it if the model changed)
        with gr.Row():
            with gr.Column(scale=4):
                f.add("width", gr.Slider(64, 2048, value=w, step=8, label="Width", elem_id=f"{t}_width"))
                f.add("height", gr.Slider(64, 2048, value=h, step=8, label="Height", elem_id=f"{t}_height"))
            self.swap = gr.Button("⇅", elem_id=f"{t}_res_switch_btn", size="sm", min_width=40, scale=0)

    def _hires(self) -> None:
        t, f, ui = self.t, self.form, self.ui
        f.add("enable_hr", gr.Checkbox(False, label="Hires. fix", elem_id=f"{t}_enable_hr"))
        with gr.Accordion("Hires. fix settings", open=False, elem_id=f"{t}_hr"):
            with gr.Row():
                f.add("hr_upscaler", gr.Dropdown(ui.hires_upscalers(), value="Latent", label="Upscaler",
                                                 elem_id=f"{t}_hr_upscaler"))
                f.add("hr_second_pass_steps", gr.Slider(0, 150, value=0, step=1, label="Hires steps",
                                                        elem_id=f"{t}_hires_steps"))
                f.add("denoising_strength", gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                                      elem_id=f"{t}_denoising_strength"))
            with gr.Row():
                f.add("hr_scale", gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id=f"{t}_hr_scale"))
                f.add("hr_resize_x", gr.Slider(0, 2048, value=0, step=8, label="Resize width to",
                                               elem_id=f"{t}_hr_resize_x"))
                f.add("hr_resize_y", gr.Slider(0, 2048, value=0, step=8, label="Resize height to",
                                               elem_id=f"{t}_hr_resize_y"))
            with gr.Row():
                f.add("hr_sampler_name", gr.Dropdown([SAME_SAMPLER, *sampler_labels()], value=SAME_SAMPLER,
                                                     label="Hires sampling method", elem_id="hr_sampler",
                                                     elem_classes=["translate-choices"]))
                f.add("hr_scheduler", gr.Dropdown([SAME_SCHEDULER, *schedule_labels()], value=SAME_SCHEDULER,
                                                  label="Hires schedule type", elem_id="hr_scheduler",
                                                  elem_classes=["translate-choices"]))
                f.add("hr_cfg", gr.Slider(0, 30, value=0, step=0.5, label="Hires CFG Scale",
                                          info="0: the same as CFG Scale", elem_id=f"{t}_hr_cfg"))
            f.add("hr_prompt", gr.Textbox(label="Hires prompt", lines=2, elem_id="hires_prompt",
                                          placeholder="Leave empty to use the same prompt as in the first pass"))
            f.add("hr_negative_prompt", gr.Textbox(label="Hires negative prompt", lines=2, elem_id="hires_neg_prompt",
                                                   placeholder="Leave empty to use the same negative prompt as in "
                                                               "the first pass"))

    def _refiner(self) -> None:
        """A1111's Refiner accordion: a checkpoint that takes over once "Switch at" of the sampling is done."""
        t, f = self.t, self.form
        with gr.Accordion("Refiner", open=False, elem_id=f"{t}_refiner"), gr.Row():
            f.add("refiner_checkpoint", gr.Dropdown(["None", *self.ui.checkpoint_titles()], value="None",
                                                    label="Checkpoint", elem_id=f"{t}_refiner_checkpoint"))
            f.add("refiner_switch_at", gr.Slider(0.01, 1.0, value=0.8, step=0.01, label="Switch at",
                                                 elem_id=f"{t}_refiner_switch_at",
                                                 info="fraction of sampling steps when the switch to refiner "
                                                      "model should happen; 1=never, 0.5=switch in the middle"))

    def _seed_controls(self) -> None:
        t, f = self.t, self.form
        with gr.Row():
            f.add("seed", gr.Number(-1, label="Seed", precision=0, elem_id=f"{t}_seed", scale=4))
            self.random_seed = gr.Button("🎲️", elem_id=f"{t}_random_seed", size="sm", min_width=40, scale=0)
            self.reuse_seed = gr.Button("♻️", elem_id=f"{t}_reuse_seed", size="sm", min_width=40, scale=0)
            self.show_extra = gr.Checkbox(False, label="Extra", elem_id=f"{t}_subseed_show", scale=1)
        with gr.Group(visible=False, elem_id=f"{t}_seed_extras") as extras:
            with gr.Row():
                f.add("subseed", gr.Number(-1, label="Variation seed", precision=0, elem_id=f"{t}_subseed"))
                f.add("subseed_strength", gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                                    elem_id=f"{t}_subseed_strength"))
            with gr.Row():
                f.add("seed_resize_from_w", gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width",
                                                      elem_id=f"{t}_seed_resize_from_w"))
                f.add("seed_resize_from_h", gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height",
                                                      elem_id=f"{t}_seed_resize_from_h"))
        self.seed_extras = extras

    def _scripts(self) -> None:
        """The always-on scripts' accordions, then the Script dropdown and each script's controls, all made
        from the scripts' declarations (soft inpainting's controls are the inpaint tab's own)."""
        t, f = self.t, self.form
        catalog = f.catalog
        for script in catalog:
            if script.alwayson and not script.request_fields and self.kind in script.tabs:
                if script.name == ControlNetAccordion.SCRIPT:  # its units: the module's own accordion
                    self.controlnet = ControlNetAccordion(self.ui, self.kind, f).build()
                    continue
                if any(p.parse is not None for p in script.params):
                    continue  # a structured argument no generic control can show (a plug-in's): API only
                with gr.Accordion(script.name, open=False, elem_id=f"{t}_script_{_slug(script.name)}"):
                    for param in script.params:
                        f.add(script_key(script.name, param.name), _script_control(self.kind, script, param, self.ui))
        names = catalog.names_for(self.kind)
        f.add("script_name", gr.Dropdown(["None", *names], value="None", label="Script", elem_id=f"{t}_script_list",
                                         elem_classes=["translate-choices"]))
        self.script_groups = {}
        for name in names:
            script = catalog.get(name)
            with gr.Group(visible=False, elem_id=f"{t}_script_{_slug(name)}") as group:
                for param in script.params:
                    f.add(script_key(name, param.name), _script_control(self.kind, script, param, self.ui))
            self.script_groups[name] = group

    def _img2img_inputs(self) -> None:
        _t, f = self.t, self.form
        self.mode_state = gr.State("img2img")
        with gr.Tabs(elem_id="mode_img2img") as self.mode_tabs:
            with gr.Tab("img2img", id="img2img", elem_id="img2img_img2img_tab") as tab_i:
                self.init_image = gr.Image(label="Image for img2img", type="pil", elem_id="img2img_image",
                                           sources=["upload", "clipboard"], height=360)
            with gr.Tab("Sketch", id="sketch", elem_id="img2img_img2img_sketch_tab") as tab_s:
                self.sketch = gr.ImageEditor(label="Sketch", type="pil", elem_id="img2img_sketch", height=360,
                                             brush=gr.Brush(colors=["#000000", "#ffffff", "#ff0000", "#00ff00",
                                                                    "#0000ff", "#ffff00"], color_mode="defaults"))
            with gr.Tab("Inpaint", id="inpaint", elem_id="img2img_inpaint_tab") as tab_p:
                self.inpaint = gr.ImageEditor(label="Image for inpainting with mask", type="pil", elem_id="img2maskimg",
                                              height=360, brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
            with gr.Tab("Inpaint sketch", id="inpaint_sketch", elem_id="img2img_inpaint_sketch_tab") as tab_ps:
                self.inpaint_sketch = gr.ImageEditor(label="Inpaint sketch", type="pil", elem_id="inpaint_sketch",
                                                     height=360, brush=gr.Brush(color_mode="defaults"))
                self.mask_alpha = gr.Slider(0, 100, value=0, step=1, label="Mask transparency",
                                            elem_id="img2img_mask_alpha")
            with gr.Tab("Inpaint upload", id="inpaint_upload", elem_id="img2img_inpaint_upload_tab") as tab_u, \
                    gr.Row():
                self.upload_base = gr.Image(label="Image", type="pil", elem_id="img_inpaint_base", height=300)
                self.upload_mask = gr.Image(label="Mask", type="pil", elem_id="img_inpaint_mask", height=300)
            with gr.Tab("Batch", id="batch", elem_id="img2img_batch_tab") as tab_b:
                self.batch_input = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir")
                self.batch_output = gr.Textbox(label="Output directory", elem_id="img2img_batch_output_dir")
                self.batch_masks = gr.Textbox(label="Inpaint batch mask directory (required for inpaint batch processing only)",
                                              elem_id="img2img_batch_inpaint_mask_dir")
                self.batch_png_info = gr.Checkbox(False, label="Append png info to prompts",
                                                  elem_id="img2img_batch_use_png_info")
        for tab, mode in zip((tab_i, tab_s, tab_p, tab_ps, tab_u, tab_b), IMG2IMG_MODES):
            tab.select(lambda m=mode: m, None, self.mode_state, show_progress="hidden")
        with gr.Row():
            self.interrogate_clip = gr.Button("Interrogate CLIP", elem_id="interrogate", size="sm",
                                              interactive=self.ui.has_interrogator("clip"))
            self.interrogate_booru = gr.Button("Interrogate DeepBooru", elem_id="deepbooru", size="sm",
                                               interactive=self.ui.has_interrogator("deepdanbooru"))
        if not (self.ui.has_interrogator("clip") and self.ui.has_interrogator("deepdanbooru")):
            gr.Markdown(INTERROGATE_NOTE, elem_id="interrogate_note")
        with gr.Accordion("Inpaint options", open=True, elem_id="img2img_inpaint_controls"):
            with gr.Row():
                f.add("mask_blur", gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="img2img_mask_blur"))
                f.add("inpainting_mask_invert", gr.Radio([("Inpaint masked", 0), ("Inpaint not masked", 1)], value=0,
                                                         label="Mask mode", elem_id="img2img_mask_mode"))
            f.add("inpainting_fill", gr.Radio([(name, i) for i, name in enumerate(MASKED_CONTENT)], value=1,
                                              label="Masked content", elem_id="img2img_inpainting_fill"))
            with gr.Row():
                f.add("inpaint_full_res", gr.Radio([("Whole picture", False), ("Only masked", True)], value=False,
                                                   label="Inpaint area", elem_id="img2img_inpaint_full_res"))
                f.add("inpaint_full_res_padding", gr.Slider(0, 256, value=32, step=4,
                                                            label="Only masked padding, pixels",
                                                            elem_id="img2img_inpaint_full_res_padding"))
            with gr.Accordion("Soft inpainting", open=False, elem_id="soft_inpainting_enabled_accordion"):
                f.add("soft_inpainting", gr.Checkbox(False, label="Soft inpainting", elem_id="soft_inpainting_enabled",
                                                     info="Blends the result with the original through the mask's "
                                                          "blur; a large Mask blur is recommended"))
                with gr.Row():
                    for (field, _key, low, high), (label, step) in zip(SOFT_INPAINTING_FIELDS,
                                                                       SOFT_INPAINTING_CONTROLS, strict=True):
                        f.add(field, gr.Slider(low, high, value=getattr(Img2ImgRequest, field), step=step,
                                               label=label, elem_id=field))

    def _img2img_resize(self) -> None:
        t, f = self.t, self.form
        f.add("resize_mode", gr.Radio([(name, i) for i, name in enumerate(RESIZE_MODES)], value=0,
                                      label="Resize mode", elem_id="resize_mode"))
        self.resize_by_state = gr.State(False)
        with gr.Tabs(elem_id=f"{t}_tabs_resize"):
            with gr.Tab("Resize to", id="to", elem_id=f"{t}_tab_resize_to") as tab_to:
                self._size_controls()
            with gr.Tab("Resize by", id="by", elem_id=f"{t}_tab_resize_by") as tab_by:
                self.scale_by = gr.Slider(0.05, 4, value=1, step=0.05, label="Scale", elem_id=f"{t}_scale")
        tab_to.select(lambda: False, None, self.resize_by_state, show_progress="hidden")
        tab_by.select(lambda: True, None, self.resize_by_state, show_progress="hidden")

    # ---- the request ------------------------------------------------------------------------------
    def image_inputs(self) -> list:
        if self.kind != "img2img":
            return []
        return [self.mode_state, self.init_image, self.sketch, self.inpaint, self.inpaint_sketch, self.mask_alpha,
                self.upload_base, self.upload_mask, self.resize_by_state, self.scale_by, self.batch_input,
                self.batch_output, self.batch_masks, self.batch_png_info]

    def jobs_for(self, values: dict, images: list) -> list[Txt2ImgJob]:
        """The job(s) Generate queues (an img2img batch folder gives one per picture). Bad input raises
        :class:`RequestError` naming it."""
        settings = self.ui.settings.values
        fmt = settings.get("samples_format", "png")
        if self.kind == "txt2img":
            return [Txt2ImgJob(self.form.request(values, settings), samples_format=fmt)]
        (mode, init, sketch, inpaint, inpaint_sketch, mask_alpha, up_base, up_mask, resize_by, scale,
         batch_in, batch_out, batch_masks, batch_png) = images
        if mode == "Batch":
            return self._batch_jobs(values, batch_in, batch_out, batch_masks, batch_png, fmt)
        mask = None
        if mode == "img2img":
            picture = init
        elif mode == "Sketch":
            picture = _composite(sketch)
        elif mode == "Inpaint":
            picture, mask = _background(inpaint), _drawn_mask(inpaint)
        elif mode == "Inpaint sketch":
            original = _background(inpaint_sketch)
            if original is None:
                raise RequestError("Inpaint sketch: upload an image first")
            picture, mask = imageops.inpaint_sketch(original, _composite(inpaint_sketch),
                                                    int(values.get("mask_blur", 4)), float(mask_alpha or 0))
        else:
            picture, mask = up_base, (up_mask.convert("L") if up_mask is not None else None)
        if picture is None:
            raise RequestError(f"{mode}: upload an image first")
        if mode in ("Inpaint", "Inpaint upload") and mask is None:
            raise RequestError(f"{mode}: draw or upload a mask")
        picture = picture.convert("RGB")
        if resize_by:
            values = {**values, "width": _round8(picture.width * float(scale)),
                      "height": _round8(picture.height * float(scale))}
        stored = self.ui.service.store_inputs([picture] + ([mask] if mask is not None else []))
        req = self.form.request(values, settings, init_images=[stored[0]],
                                mask=stored[1] if mask is not None else None)
        return [Txt2ImgJob(req, samples_format=fmt)]

    def _batch_jobs(self, values, batch_in, batch_out, batch_masks, use_png_info, fmt) -> list[Txt2ImgJob]:
        self.ui.require_folders()
        if not batch_in:
            raise RequestError("Batch: give an input directory")
        inputs = outputs.images_in(Path(batch_in).expanduser())
        outdir = str(Path(batch_out).expanduser()) if batch_out else None
        masks = Path(batch_masks).expanduser() if batch_masks else None
        jobs = []
        for path in inputs:
            req = self.form.request(values, self.ui.settings.values, init_images=[str(path)],
                                    mask=outputs.mask_for(path, masks))
            if use_png_info:
                req = with_png_info(req, outputs.read_infotext(path))
            jobs.append(Txt2ImgJob(req, samples_format=fmt, outdir=outdir))
        return jobs

    # ---- events -----------------------------------------------------------------------------------
    def wire(self) -> None:
        ui, f = self.ui, self.form
        service = ui.service
        outputs_ = [self.progress, self.gallery, self.info, self.results, self.queue_list]

        image_inputs = self.image_inputs()

        def on_generate(data: dict, request: gr.Request):
            """``data``: every input control's value by component (gradio passes a set of inputs so)."""
            client = client_of(request)
            values = {name: data[c] for name, c in f.controls.items()}
            images = [data[c] for c in image_inputs]
            gallery: list[str] = []
            results: list[dict] = []
            while True:
                try:
                    jobs = [service.submit(client, job) for job in self.jobs_for(values, images)]
                except (RequestError, JobError) as exc:
                    raise gr.Error(str(exc)) from None
                previews = bool(ui.settings.get("live_previews_enable"))
                period = float(ui.settings.get("live_preview_refresh_period", 1000)) / 1000
                for job in jobs:  # the page's script shows the bar and preview (see progress.py)
                    yield (live_html(self.kind, job, previews, period), gr.skip(), gr.skip(), gr.skip(),
                           ui.queue_panel(client))
                    done = finished(service, job)
                    if done is None or done.status == FAILED:
                        ui.forever.discard(client)
                        raise gr.Error((done.error if done else None) or "the job failed")
                    # (a job cancelled from the queue panel ends without pictures; the loop goes on to the next)
                    found = gallery_entries(done.result or {}, not ui.settings.get("control_net_no_detectmap"))
                    results = found + results if ui.forever_has(client) else results + found
                    gallery = [r["path"] for r in results]
                if not ui.forever_has(client):
                    break
                yield "", gallery, _first_infotext(results), results, ui.queue_panel(client)
            if not results:  # all cancelled: the gallery keeps what it showed
                yield "", gr.skip(), gr.skip(), gr.skip(), ui.queue_panel(client)
                return
            yield "", gallery, _first_infotext(results), results, ui.queue_panel(client)

        inputs = set(f.components + image_inputs)
        self.generate.click(on_generate, inputs, outputs_, concurrency_limit=None, show_progress="hidden")

        def start_forever(data: dict, request: gr.Request):
            ui.forever.add(client_of(request))
            yield from on_generate(data, request)

        self.forever.click(start_forever, inputs, outputs_, concurrency_limit=None, show_progress="hidden")
        def stop_forever(request: gr.Request):
            ui.forever.discard(client_of(request))

        def interrupt(request: gr.Request):
            ui.forever.discard(client_of(request))
            service.interrupt(client_of(request))

        def skip(request: gr.Request):
            service.skip(client_of(request))

        self.forever_stop.click(stop_forever, None, None, show_progress="hidden")
        self.interrupt.click(interrupt, None, None, show_progress="hidden", concurrency_limit=None)
        self.skip.click(skip, None, None, show_progress="hidden", concurrency_limit=None)

        # token counters
        def count(text, steps):
            return token_counter(ui.tokenizer(), ui.embedding_lookup(), text, steps)

        f.controls["prompt"].change(count, [f.controls["prompt"], f.controls["steps"]], self.token_counter,
                                    show_progress="hidden", trigger_mode="always_last", concurrency_limit=None)
        f.controls["negative_prompt"].change(count, [f.controls["negative_prompt"], f.controls["steps"]],
                                             self.neg_token_counter, show_progress="hidden",
                                             trigger_mode="always_last", concurrency_limit=None)

        if self.controlnet is not None:
            self.controlnet.wire()

        # seeds, sizes, scripts
        self.random_seed.click(lambda: -1, None, f.controls["seed"], show_progress="hidden")
        self.reuse_seed.click(lambda results, i: _seed_of(results, i, "Seed"), [self.results, self.selected],
                              f.controls["seed"], show_progress="hidden")
        self.show_extra.change(lambda v: gr.Group(visible=bool(v)), self.show_extra, self.seed_extras,
                               show_progress="hidden")
        self.swap.click(lambda w, h: (h, w), [f.controls["width"], f.controls["height"]],
                        [f.controls["width"], f.controls["height"]], show_progress="hidden")
        names = list(self.script_groups)
        f.controls["script_name"].change(lambda chosen: [gr.Group(visible=chosen == name) for name in names],
                                         f.controls["script_name"], list(self.script_groups.values()),
                                         show_progress="hidden")

        # styles
        def apply_styles(prompt, negative, chosen):
            table = styles_file.load(ui.paths.styles_file)
            prompt, negative = styles_file.apply(prompt, negative, list(chosen or []), table)
            return prompt, negative, []

        self.style_apply.click(apply_styles, [f.controls["prompt"], f.controls["negative_prompt"], f.controls["styles"]],
                               [f.controls["prompt"], f.controls["negative_prompt"], f.controls["styles"]],
                               show_progress="hidden")

        def save_style(name, prompt, negative):
            name = (name or "").strip()
            if not name:
                raise gr.Error("Give the style a name first")
            styles_file.upsert(ui.paths.styles_file, styles_file.Style(name, prompt, negative))
            return gr.Dropdown(choices=ui.style_names())

        self.style_save.click(save_style, [self.style_name, f.controls["prompt"], f.controls["negative_prompt"]],
                              f.controls["styles"], show_progress="hidden")
        self.clear.click(lambda: ("", ""), None, [f.controls["prompt"], f.controls["negative_prompt"]],
                         show_progress="hidden")

        # paste (↙): an infotext in the prompt box fills every control
        self.paste.click(self.fill_from_text, [f.controls["prompt"]], self.fill_outputs(), show_progress="hidden")

        # gallery
        def on_select(results, evt: gr.SelectData):
            index = evt.index if isinstance(evt.index, int) else 0
            text = results[index]["infotext"] if 0 <= index < len(results) else ""
            return index, text

        self.gallery.select(on_select, self.results, [self.selected, self.info], show_progress="hidden")
        def open_folder(results, i, request: gr.Request):
            ui.open_folder(_pick(results, i), request)

        self.open_folder.click(open_folder, [self.results, self.selected], None, show_progress="hidden")
        self.save.click(lambda results, i: gr.File(value=_pick(results, i), visible=True),
                        [self.results, self.selected], self.download, show_progress="hidden")
        self.zip.click(lambda results: gr.File(value=ui.zip_results(results), visible=True), self.results,
                       self.download, show_progress="hidden")

        if self.kind == "img2img":
            def interrogate(backend, mode, init, sketch, inpaint, inpaint_sketch, up_base):
                picture = {"img2img": init, "Sketch": _composite(sketch), "Inpaint": _background(inpaint),
                           "Inpaint sketch": _background(inpaint_sketch), "Inpaint upload": up_base}.get(mode)
                if picture is None:
                    raise gr.Error("Upload an image to interrogate first")
                return ui.interrogate(picture, backend)

            pictures = [self.mode_state, self.init_image, self.sketch, self.inpaint, self.inpaint_sketch,
                        self.upload_base]
            self.interrogate_clip.click(lambda *a: interrogate("clip", *a), pictures, f.controls["prompt"])
            self.interrogate_booru.click(lambda *a: interrogate("deepdanbooru", *a), pictures, f.controls["prompt"])

    # ---- filling from an infotext ------------------------------------------------------------------
    def fill_outputs(self) -> list:
        return self.form.components + [self.ui.clip_skip, self.show_extra]

    def fill_values(self, req: Txt2ImgRequest) -> list:
        values = self.form.fill(req)
        out = [values.get(name, gr.skip()) for name in self.form.names]
        extra = req.subseed_strength > 0 or req.seed_resize_from_w > 0 or req.seed_resize_from_h > 0
        return out + [req.clip_skip, extra or gr.skip()]

    def request_from_text(self, text: str) -> Txt2ImgRequest:
        base = Img2ImgRequest() if self.kind == "img2img" else Txt2ImgRequest()
        try:
            return from_infotext(text, base)
        except (RequestError, ValueError) as exc:
            raise gr.Error(f"Could not read the parameters: {exc}") from None

    def fill_from_text(self, text: str) -> list:
        text = (text or "").strip()
        if not text:
            raise gr.Error("Paste an image's generation parameters (A1111 infotext) into the prompt box first")
        if "Steps:" not in text:
            raise gr.Error("The prompt box holds no generation parameters (no 'Steps:' line)")
        return self.fill_values(self.request_from_text(text))


def _round8(value: float) -> int:
    return max(64, round(value / 8) * 8)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


# A1111's soft inpainting sliders (label, step), in SOFT_INPAINTING_FIELDS' order (fields, element ids, ranges)
SOFT_INPAINTING_CONTROLS = (("Schedule bias", 0.1), ("Preservation strength", 0.05), ("Transition contrast boost", 0.5),
                            ("Mask influence", 0.05), ("Difference threshold", 0.25), ("Difference contrast", 0.25))


def _first_infotext(results: list[dict]) -> str:
    return next((r["infotext"] for r in results if r["infotext"]), "")


def _pick(results: list[dict], index: int) -> str | None:
    if not results:
        raise gr.Error("Generate an image first")
    return results[index if 0 <= index < len(results) else 0]["path"]


def _seed_of(results: list[dict], index: int, key: str):
    if not results:
        raise gr.Error("Generate an image first")
    text = results[index if 0 <= index < len(results) else 0]["infotext"] or _first_infotext(results)
    try:
        return int(infotext.parse(text)[key])
    except (KeyError, ValueError):
        raise gr.Error(f"The image's parameters have no {key}") from None


def _background(value):
    if isinstance(value, dict):
        return value.get("background")
    return value


def _composite(value):
    if isinstance(value, dict):
        return value.get("composite") or value.get("background")
    return value


def _drawn_mask(value):
    """The strokes of an inpaint editor's layers as a white-on-black mask (None when nothing was drawn)."""
    if not isinstance(value, dict) or not value.get("layers"):
        return None
    from PIL import Image, ImageChops

    background = value.get("background")
    size = background.size if background is not None else value["layers"][0].size
    mask = Image.new("L", size, 0)
    for layer in value["layers"]:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size)
        mask = ImageChops.lighter(mask, alpha.point(lambda a: 255 if a > 0 else 0))
    return mask if mask.getbbox() else None


def _script_control(kind: str, script, param, ui):
    """The control of one script argument, from its declaration (:class:`sdstudio.core.scripts.Param`)."""
    label = param.title
    elem_id = f"{kind}_script_{_slug(script.name)}_{param.name}"
    default = list(param.default) if isinstance(param.default, list) else param.default
    info = param.help or None
    if param.choices == "xyz axes":
        from ..core.xyz import axis_names

        return gr.Dropdown(axis_names(kind, ui.service.studio.catalog.axes()), value=default, label=label,
                           elem_id=elem_id, elem_classes=["translate-choices"])
    if param.choices == "upscalers":
        return gr.Dropdown(ui.upscaler_names(), value=default, label=label, elem_id=elem_id)
    if isinstance(param.choices, tuple):
        if param.kind is list:
            return gr.CheckboxGroup(list(param.choices), value=default, label=label, elem_id=elem_id, info=info)
        if len(param.choices) > 5:
            return gr.Dropdown(list(param.choices), value=default, label=label, elem_id=elem_id, info=info)
        return gr.Radio(list(param.choices), value=default, label=label, elem_id=elem_id, info=info)
    if param.kind is bool:
        return gr.Checkbox(default, label=label, elem_id=elem_id, info=info)
    if param.kind in (int, float):
        if param.minimum is not None and param.maximum is not None and param.step is not None:
            return gr.Slider(param.minimum, param.maximum, value=default, step=param.step, label=label,
                             elem_id=elem_id, info=info)
        return gr.Number(default, label=label, elem_id=elem_id, precision=0 if param.kind is int else None, info=info)
    return gr.Textbox(default, label=label, elem_id=elem_id, lines=param.lines, info=info)


