"""The Extras, PNG Info and Settings tabs (A1111's controls and element ids)."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
from PIL import Image

from ..core import infotext, outputs
from ..core.params import RequestError
from ..core.settings import SettingError, sections
from ..engine import extras as extras_ops
from ..engine.img2img import open_image
from ..models.errors import ModelFileError, ModelNotFoundError
from .localization import available

QUICK_SETTINGS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers")  # in the top bar instead


class ExtrasTab:
    def __init__(self, ui):
        self.ui = ui

    def build(self) -> ExtrasTab:
        ui = self.ui
        names = ui.upscaler_names()
        with gr.Row():
            with gr.Column():
                self.mode = gr.State("single")
                with gr.Tabs(elem_id="mode_extras"):
                    with gr.Tab("Single Image", elem_id="extras_single_tab") as single:
                        self.image = gr.Image(label="Source", type="pil", elem_id="extras_image", height=360)
                    with gr.Tab("Batch Process", elem_id="extras_batch_process_tab") as batch:
                        self.files = gr.File(label="Batch Process", file_count="multiple", elem_id="extras_image_batch")
                    with gr.Tab("Batch from Directory", elem_id="extras_batch_directory_tab") as folder:
                        self.input_dir = gr.Textbox(label="Input directory", elem_id="extras_batch_input_dir")
                        self.output_dir = gr.Textbox(label="Output directory", elem_id="extras_batch_output_dir")
                for tab, mode in ((single, "single"), (batch, "batch"), (folder, "folder")):
                    tab.select(lambda m=mode: m, None, self.mode, show_progress="hidden")
                self.resize_to_state = gr.State(False)
                with gr.Tabs(elem_id="extras_resize_mode"):
                    with gr.Tab("Scale by", elem_id="extras_scale_by_tab") as by:
                        self.scale = gr.Slider(1, 8, value=4, step=0.05, label="Resize", elem_id="extras_upscaling_resize")
                    with gr.Tab("Scale to", elem_id="extras_scale_to_tab") as to, gr.Row():
                        self.width = gr.Slider(64, 8192, value=512, step=8, label="Width",
                                               elem_id="extras_upscaling_resize_w")
                        self.height = gr.Slider(64, 8192, value=512, step=8, label="Height",
                                                elem_id="extras_upscaling_resize_h")
                        self.crop = gr.Checkbox(True, label="Crop to fit", elem_id="extras_upscaling_crop")
                by.select(lambda: False, None, self.resize_to_state, show_progress="hidden")
                to.select(lambda: True, None, self.resize_to_state, show_progress="hidden")
                with gr.Row():
                    self.upscaler_1 = gr.Dropdown(names, value="None", label="Upscaler 1", elem_id="extras_upscaler_1")
                    self.upscaler_2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras_upscaler_2")
                    self.visibility = gr.Slider(0, 1, value=0, step=0.001, label="Upscaler 2 visibility",
                                                elem_id="extras_upscaler_2_visibility")
                installed = ui.service.engine.faces.available()
                with gr.Row():
                    self.gfpgan = gr.Slider(0, 1, value=0, step=0.001, label="GFPGAN visibility",
                                            elem_id="extras_gfpgan_visibility",
                                            info=None if "GFPGAN" in installed else "Face restoration is not installed")
                with gr.Row():
                    self.codeformer = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer visibility",
                                                elem_id="extras_codeformer_visibility",
                                                info=None if "CodeFormer" in installed else
                                                "Face restoration is not installed")
                    self.codeformer_weight = gr.Slider(0, 1, value=0, step=0.001,
                                                       label="CodeFormer weight (0 = maximum effect, 1 = minimum effect)",
                                                       elem_id="extras_codeformer_weight")
            with gr.Column():
                self.generate = gr.Button("Generate", variant="primary", elem_id="extras_generate")
                self.gallery = gr.Gallery(label="Result", elem_id="extras_gallery", columns=2, height=420,
                                          interactive=False, format="png")
                self.info = gr.HTML("", elem_id="extras_html_info")
        self.generate.click(self.run, [self.mode, self.image, self.files, self.input_dir, self.output_dir,
                                       self.resize_to_state, self.scale, self.width, self.height, self.crop,
                                       self.upscaler_1, self.upscaler_2, self.visibility, self.gfpgan,
                                       self.codeformer, self.codeformer_weight],
                            [self.gallery, self.info], concurrency_limit=1)
        return self

    def run(self, mode, image, files, input_dir, output_dir, resize_to, scale, width, height, crop, up1, up2, vis,
            gfpgan, codeformer, codeformer_weight):
        ui = self.ui
        engine = ui.service.engine
        req = extras_ops.ExtrasRequest(scale=float(scale), resize_to=(int(width), int(height)) if resize_to else None,
                                       crop=bool(crop), upscaler_1=up1 or "None", upscaler_2=up2 or "None",
                                       upscaler_2_visibility=float(vis), gfpgan_visibility=float(gfpgan or 0),
                                       codeformer_visibility=float(codeformer or 0),
                                       codeformer_weight=float(codeformer_weight or 0))
        try:
            extras_ops.check(req, engine.upscalers, engine.faces)
            if mode == "single":
                if image is None:
                    raise RequestError("Extras: upload an image first")
                sources = [(image, "", image.info.get("parameters"))]
            elif mode == "batch":
                if not files:
                    raise RequestError("Extras: add images to process first")
                sources = [(open_image(str(f), Path(str(f)).name), Path(str(f)).stem, None) for f in files]
            else:
                ui.require_folders()
                sources = [(open_image(str(p), p.name), p.stem, outputs.read_infotext(p))
                           for p in outputs.images_in(Path(input_dir or ".").expanduser())]
            folder = Path(output_dir).expanduser() if mode == "folder" and output_dir else \
                outputs.dated_dir(ui.paths.outputs_dir, "extras-images")
            saved = []
            for picture, stem, text in sources:
                result = extras_ops.run(picture.convert("RGB"), req, engine.upscalers, engine.faces)
                saved.append(str(outputs.save_image(result, folder, infotext=text, suffix=stem)))
        except (RequestError, ModelNotFoundError, ModelFileError) as exc:
            raise gr.Error(str(exc)) from None
        return saved, f'<p><span>Images saved to</span> <code class="sd-notranslate">{html.escape(str(folder))}</code></p>'


class PngInfoTab:
    def __init__(self, ui):
        self.ui = ui

    def build(self) -> PngInfoTab:
        with gr.Row():
            with gr.Column():
                self.image = gr.Image(label="Source", type="filepath", elem_id="pnginfo_image", height=400,
                                      sources=["upload", "clipboard"])
            with gr.Column():
                self.html = gr.HTML("", elem_id="pnginfo_html_info")
                self.text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_generation_info")
                with gr.Row():
                    self.to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_to_txt2img")
                    self.to_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_to_img2img")
                    self.to_inpaint = gr.Button("Send to inpaint", elem_id="pnginfo_send_to_inpaint")
                    self.to_extras = gr.Button("Send to extras", elem_id="pnginfo_send_to_extras")
        self.image.change(self.read, self.image, [self.html, self.text], show_progress="hidden")
        return self

    @staticmethod
    def read(path):
        if not path:
            return "", ""
        try:
            text = outputs.read_infotext(path)
        except outputs.NotAnImageError as exc:
            raise gr.Error(str(exc)) from None
        if not text:
            return '<div class="sd-pnginfo"><p><span>No parameters</span></p></div>', ""
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in infotext.parse(text).items())
        return f'<table class="sd-pnginfo sd-notranslate">{rows}</table>', text


class SettingsTab:
    def __init__(self, ui):
        self.ui = ui
        self.controls: dict[str, object] = {}

    def build(self) -> SettingsTab:
        ui = self.ui
        values = ui.settings.values
        for section, items in sections():
            items = [s for s in items if s.key not in QUICK_SETTINGS]
            if not items:
                continue
            with gr.Accordion(section, open=True, elem_id=f"settings_{section.lower().replace(' ', '_')}"):
                for s in items:
                    self.controls[s.key] = self._control(s, values.get(s.key, s.default))
        with gr.Row():
            self.apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
            self.reload = gr.Button("Reload UI", elem_id="settings_restart_gradio")
        self.result = gr.HTML("", elem_id="settings_result")
        self.apply.click(self.save, list(self.controls.values()), self.result, show_progress="hidden")
        self.reload.click(None, None, None, js="() => { window.location.reload(); }")
        return self

    def _control(self, s, value):
        elem_id = f"setting_{s.key}"
        if s.key == "localization":
            return gr.Dropdown(["None", *available(self.ui.paths)], value=value, label=s.label, elem_id=elem_id,
                               info="Reload UI to see the language change")
        if s.choices:
            return gr.Radio(list(s.choices), value=value, label=s.label, elem_id=elem_id)
        if isinstance(s.default, bool):
            return gr.Checkbox(bool(value), label=s.label, elem_id=elem_id)
        if isinstance(s.default, (int, float)):
            if s.minimum is not None and s.maximum is not None:
                step = 1 if isinstance(s.default, int) else 0.01
                return gr.Slider(s.minimum, s.maximum, value=value, step=step, label=s.label, elem_id=elem_id)
            return gr.Number(value, label=s.label, elem_id=elem_id, precision=0 if isinstance(s.default, int) else None)
        return gr.Textbox(value, label=s.label, elem_id=elem_id)

    def save(self, *values):
        try:
            changed = self.ui.settings.update(dict(zip(self.controls, values)))
        except (SettingError, ModelNotFoundError) as exc:
            raise gr.Error(str(exc)) from None
        if not changed:
            return '<p><span>Nothing changed</span></p>'
        return f'<p><span>Settings saved</span>: <code class="sd-notranslate">{html.escape(", ".join(changed))}</code></p>'


def open_picture(path: str | None):
    if not path:
        return None
    with Image.open(path) as im:
        im.load()
        return im.copy()


class ExtensionsTab:
    """A1111's Extensions tab: the plug-ins found, their version, origin and status; switching one off or on
    is kept in config.json (``disabled_extensions``) and applies when the server starts again. A plug-in
    folder or wheel on this machine can be installed (offline)."""

    def __init__(self, ui):
        self.ui = ui

    def build(self) -> ExtensionsTab:
        infos = self.ui.service.plugins.infos
        loadable = [i.name for i in infos if i.status != "not a plug-in"]
        with gr.Tab("Installed", elem_id="extensions_installed_tab"):
            self.table = gr.HTML(self.table_html(), elem_id="extensions_installed_html")
            self.enabled = gr.CheckboxGroup(loadable, value=[i.name for i in infos if i.enabled and i.name in loadable],
                                            label="Enabled plug-ins", elem_id="extensions_enabled")
            self.apply = gr.Button("Apply (restart the server to load or unload)", variant="primary",
                                   elem_id="extensions_apply")
            self.result = gr.HTML("", elem_id="extensions_result")
        with gr.Tab("Install from a folder or wheel", elem_id="extensions_install_tab"):
            self.source = gr.Textbox("", label="Plug-in folder or .whl file on this machine", elem_id="extensions_source")
            self.install = gr.Button("Install", elem_id="extensions_install")
            self.install_result = gr.HTML("", elem_id="extensions_install_result")
        self.apply.click(self.save, self.enabled, self.result, show_progress="hidden")
        self.install.click(self.install_from, self.source, self.install_result)
        return self

    def table_html(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(i.name)}</td><td>{html.escape(i.version)}</td><td>{html.escape(i.origin)}</td>"
            f"<td class='sd-ext-{html.escape(i.status.replace(' ', '-'))}'>{html.escape(i.status)}</td>"
            f"<td>{html.escape(', '.join(i.scripts + i.samplers))}</td>"
            f"<td>{html.escape(i.error or i.last_error)}</td></tr>" for i in self.ui.service.plugins.infos)
        if not rows:
            rows = "<tr><td colspan='6'><span>No plug-ins installed</span></td></tr>"
        return ("<table class='sd-extensions'><tr><th>Extension</th><th>Version</th><th>Origin</th><th>Status</th>"
                f"<th>Adds</th><th>Error</th></tr>{rows}</table>")

    def save(self, enabled):
        infos = self.ui.service.plugins.infos
        disabled = sorted(i.name for i in infos if i.status != "not a plug-in" and i.name not in (enabled or []))
        changed = self.ui.settings.update({"disabled_extensions": disabled})
        if not changed:
            return "<p><span>Nothing changed</span></p>"
        return ("<p><span>Saved</span>: <span>disabled</span> <code class='sd-notranslate'>"
                f"{html.escape(', '.join(disabled) or '-')}</code>. <span>Restart the server to apply</span></p>")

    def install_from(self, source: str):
        from ..plugins.install import InstallError, install

        self.ui.require_folders()
        try:
            where = install(source, self.ui.paths.data_dir / "extensions")
        except InstallError as exc:
            raise gr.Error(str(exc)) from None
        return (f"<p><span>Installed</span>: <code class='sd-notranslate'>{html.escape(where)}</code>. "
                "<span>Restart the server to load it</span></p>")
