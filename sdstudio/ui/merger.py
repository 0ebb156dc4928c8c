"""The Checkpoint Merger tab: A1111's fields with its element ids and defaults, plus sdstudio's block weights and
LoRAs to merge in. Merge queues the merge as the window's job (:meth:`JobService.submit_merge`), shows its
progress, then the saved file; the new checkpoint is in every checkpoint list at once."""

from __future__ import annotations

import html
import json

import gradio as gr

from ..models.merge import CONFIG_SOURCES, METHODS
from ..service.jobs import JobError
from ..service.queue import CANCELLED, FAILED
from .progress import client_of, finished, live_html

DESCRIPTIONS = {
    "No interpolation": "No interpolation will be used. Requires one model; A. Allows for format conversion and "
                        "VAE baking.",
    "Weighted sum": "A weighted sum will be used for interpolation. Requires two models; A and B. The result is "
                    "calculated as A * (1 - M) + B * M",
    "Add difference": "The difference between the last two models will be added to the first. Requires three "
                      "models; A, B and C. The result is calculated as A + (B - C) * M",
}
BLOCK_WEIGHTS_INFO = ("Optional, comma-separated: 26 values (BASE, IN00-IN11, M00, OUT00-OUT11) for SD 1.x/2.x, "
                      "20 (BASE, IN00-IN08, M00, OUT00-OUT08) for SDXL; each replaces M for its block.")
LORAS_INFO = "Optional, comma-separated name:weight, merged into the result."


def description_html(method: str) -> str:
    return f"<p style='margin-bottom: 2.5em'>{DESCRIPTIONS[method]}</p>"


class MergerTab:
    def __init__(self, ui):
        self.ui = ui

    def build(self) -> MergerTab:
        ui = self.ui
        titles = ui.checkpoint_titles()
        vaes = ["None", *[v.filename for v in ui.service.engine.registry.vaes]]
        with gr.Row(equal_height=False):
            with gr.Column(variant="compact"):
                self.description = gr.HTML(description_html("Weighted sum"), elem_id="modelmerger_interp_description")
                with gr.Row(elem_id="modelmerger_models"):
                    self.primary = gr.Dropdown(titles, label="Primary model (A)",
                                               elem_id="modelmerger_primary_model_name")
                    self.secondary = gr.Dropdown(titles, label="Secondary model (B)",
                                                 elem_id="modelmerger_secondary_model_name")
                    self.tertiary = gr.Dropdown(titles, label="Tertiary model (C)",
                                                elem_id="modelmerger_tertiary_model_name")
                    self.refresh = gr.Button("🔄", elem_id="refresh_checkpoint_A", size="sm", min_width=40, scale=0)
                self.custom_name = gr.Textbox(label="Custom Name (Optional)", elem_id="modelmerger_custom_name")
                self.amount = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Multiplier (M) - set to 0 to get model A",
                                        elem_id="modelmerger_interp_amount")
                self.method = gr.Radio(list(METHODS), value="Weighted sum", label="Interpolation Method",
                                       elem_id="modelmerger_interp_method")
                with gr.Row():
                    self.format = gr.Radio(["ckpt", "safetensors"], value="safetensors", label="Checkpoint format",
                                           elem_id="modelmerger_checkpoint_format")
                    self.half = gr.Checkbox(False, label="Save as float16", elem_id="modelmerger_save_as_half")
                with gr.Row():
                    self.config = gr.Radio(list(CONFIG_SOURCES), value="A, B or C", label="Copy config from",
                                           type="index", elem_id="modelmerger_config_method")
                    self.vae = gr.Dropdown(vaes, value="None", label="Bake in VAE", elem_id="modelmerger_bake_in_vae")
                self.discard = gr.Textbox("", label="Discard weights with matching name",
                                          elem_id="modelmerger_discard_weights")
                with gr.Accordion("Block weights and LoRAs", open=False, elem_id="modelmerger_sdstudio"):
                    self.block_weights = gr.Textbox("", label="Block weights", info=BLOCK_WEIGHTS_INFO,
                                                    elem_id="modelmerger_block_weights")
                    self.loras = gr.Textbox("", label="LoRAs to merge in", info=LORAS_INFO,
                                            elem_id="modelmerger_loras")
                with gr.Accordion("Metadata", open=False) as self.metadata_editor:
                    with gr.Row():
                        self.save_metadata = gr.Checkbox(True, label="Save metadata", elem_id="modelmerger_save_metadata")
                        self.add_recipe = gr.Checkbox(True, label="Add merge recipe metadata",
                                                      elem_id="modelmerger_add_recipe")
                        self.copy_metadata = gr.Checkbox(True, label="Copy metadata from merged models",
                                                         elem_id="modelmerger_copy_metadata")
                    self.metadata_json = gr.TextArea("{}", label="Metadata in JSON format",
                                                     elem_id="modelmerger_metadata_json")
                    self.read_metadata = gr.Button("Read metadata from selected checkpoints",
                                                   elem_id="modelmerger_read_metadata")
                with gr.Row():
                    self.merge = gr.Button("Merge", variant="primary", elem_id="modelmerger_merge")
            with gr.Column(variant="compact", elem_id="modelmerger_results_container"), \
                    gr.Group(elem_id="modelmerger_results_panel"):
                self.progress = gr.HTML("", elem_id="modelmerger_progress")
                self.result = gr.HTML("", elem_id="modelmerger_result")
        self.wire()
        return self

    def inputs(self) -> list:
        return [self.primary, self.secondary, self.tertiary, self.method, self.amount, self.half, self.custom_name,
                self.format, self.config, self.vae, self.discard, self.save_metadata, self.add_recipe,
                self.copy_metadata, self.metadata_json, self.block_weights, self.loras]

    def read_metadata_json(self, *names) -> str:
        """A1111's "Read metadata from selected checkpoints": their safetensors metadata, merged, as JSON."""
        from ..models.errors import ModelFileError, ModelNotFoundError
        from ..models.safe_load import open_state_dict

        out: dict = {}
        for name in names:
            if not name:
                continue
            try:
                file = self.ui.service.engine.registry.checkpoint(name)
                out.update(open_state_dict(file.path).metadata if file.path.suffix == ".safetensors" else {})
            except (ModelNotFoundError, ModelFileError):
                continue
        return json.dumps(out, indent=4, ensure_ascii=False)

    def run(self, client: str, a, b, c, method, amount, half, custom_name, fmt, config, vae, discard,
            save_metadata, add_recipe, copy_metadata, metadata_json, block_weights, loras):
        """Merge: queue the job as ``client``'s, then (progress, result, the refreshed model lists) as it goes."""
        service = self.ui.service
        try:
            job = service.prepare_merge(
                primary_model_name=a, secondary_model_name=b, tertiary_model_name=c, interp_method=method,
                multiplier=amount, save_as_half=half, custom_name=custom_name or "", checkpoint_format=fmt,
                config_source=int(config or 0), bake_in_vae=vae or "None", discard_weights=discard or "",
                save_metadata=save_metadata, add_merge_recipe=add_recipe, copy_metadata_fields=copy_metadata,
                metadata_json=metadata_json or "{}", block_weights=block_weights or None,
                loras=[x.strip() for x in (loras or "").split(",") if x.strip()])
            submitted = service.submit_merge(client, job)
        except JobError as exc:
            raise gr.Error(str(exc)) from None
        # the bar is the page script's to update (progress.live_html): no gradio update until the merge ends
        yield live_html("merger", submitted, previews=False), "", *[gr.skip()] * 4
        current = finished(service, submitted)
        titles = self.ui.checkpoint_titles()
        lists = [gr.Dropdown(choices=titles)] * 4
        if current is None or current.status == FAILED:
            message = (current.error if current else None) or "the merge failed"
            yield "", f"<p>Error merging checkpoints: {html.escape(message)}</p>", *lists
            return
        if current.status == CANCELLED:
            yield "", "<p><span>Interrupted</span></p>", *lists
            return
        result = current.result
        text = f'<p>Checkpoint saved to <code class="sd-notranslate">{html.escape(result["path"])}</code></p>'
        warnings = "".join(f"<li>{html.escape(w)}</li>" for w in result.get("warnings", []))
        if warnings:
            text += f'<ul class="sd-notranslate">{warnings}</ul>'
        yield "", text, *lists

    def wire(self) -> None:
        ui = self.ui
        self.method.change(description_html, self.method, self.description, show_progress="hidden")
        self.format.change(lambda fmt: gr.Accordion(visible=fmt == "safetensors"), self.format, self.metadata_editor,
                           show_progress="hidden")
        self.read_metadata.click(self.read_metadata_json, [self.primary, self.secondary, self.tertiary],
                                 self.metadata_json, show_progress="hidden")

        def refresh():
            ui.service.engine.registry.refresh()
            titles = ui.checkpoint_titles()
            return [gr.Dropdown(choices=titles)] * 3

        self.refresh.click(refresh, None, [self.primary, self.secondary, self.tertiary], show_progress="hidden")

        def on_merge(request: gr.Request, *values):  # gradio passes the request positionally only
            yield from self.run(client_of(request), *values)

        self.merge.click(on_merge, self.inputs(),
                         [self.progress, self.result, self.primary, self.secondary, self.tertiary, ui.checkpoint],
                         concurrency_limit=None, show_progress="hidden")
