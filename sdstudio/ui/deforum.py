"""The Deforum tab: the extension's settings in sub-tabs (Run, Keyframes, Prompts, Init, ControlNet, Hybrid Video,
Output), its settings file in and out, and Generate queueing the run as a job like any other.

The controls are kept by settings key (:attr:`DeforumTab.controls`), so a loaded file fills them and the page
builds the settings back by the same names; the keys without a control of their own (and a file's unknown keys)
ride along in the loaded settings (``self.base``), so "Load settings" → "Save settings" gives the file back. A
run's progress is shown per frame ("Frame i of N", the frame just made) by the page's script, as a generation's
(:func:`~sdstudio.ui.progress.live_html`: no gradio update while the run goes on), its video when done.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path

import gradio as gr

from ..core import deforum as spec
from ..core.names import sampler_labels
from ..core.params import RequestError
from ..service.jobs import JobError
from ..service.queue import CANCELLED, FAILED
from .progress import client_of, finished, live_html

CONTROLNET_NOTE = "ControlNet units per frame are read from the settings' cn_1_ … cn_5_ keys; edit them here as JSON."
HYBRID_NOTE = "Hybrid video's keys, as JSON."
PROMPTS_NOTE = 'Frame → prompt as JSON, e.g. {"0": "a forest", "30": "a city --neg fog"}.'


def _is_cn(key: str) -> bool:
    return key.startswith("cn_") and key[3:4].isdigit()


def _is_hybrid(key: str) -> bool:
    return key.startswith("hybrid_")


class DeforumTab:
    def __init__(self, ui):
        self.ui = ui
        self.controls: dict[str, gr.components.Component] = {}

    # ---- layout -----------------------------------------------------------------------------------
    def _add(self, key: str, component):
        self.controls[key] = component
        return component

    def _text(self, key: str, label: str, lines: int = 1):
        return self._add(key, gr.Textbox(str(spec.DEFORUM_DEFAULTS[key]), label=label, lines=lines,
                                         elem_id=f"deforum_{key}"))

    def _choice(self, key: str, label: str, choices=None):
        choices = list(choices or spec.CHOICES[key])
        return self._add(key, gr.Dropdown(choices, value=spec.DEFORUM_DEFAULTS[key], label=label,
                                          elem_id=f"deforum_{key}"))

    def _check(self, key: str, label: str):
        return self._add(key, gr.Checkbox(bool(spec.DEFORUM_DEFAULTS[key]), label=label, elem_id=f"deforum_{key}"))

    def _number(self, key: str, label: str, whole: bool = True):
        return self._add(key, gr.Number(spec.DEFORUM_DEFAULTS[key], label=label, precision=0 if whole else None,
                                        elem_id=f"deforum_{key}"))

    def build(self) -> DeforumTab:
        defaults = spec.load_settings({}, legacy_colormatch_default=False)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    self.load = gr.UploadButton("Load settings", file_types=[".txt", ".json"], size="sm",
                                                elem_id="deforum_load_settings")
                    self.save = gr.Button("Save settings", size="sm", elem_id="deforum_save_settings")
                self.notes = gr.HTML("", elem_id="deforum_settings_notes")
                with gr.Tabs(elem_id="deforum_tabs"):
                    with gr.Tab("Run", elem_id="deforum_run_tab"):
                        with gr.Row():
                            self._choice("sampler", "Sampler", sampler_labels())
                            self._add("steps", gr.Slider(1, 200, value=25, step=1, label="Steps",
                                                         elem_id="deforum_steps"))
                        with gr.Row():
                            self._add("W", gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="deforum_W"))
                            self._add("H", gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="deforum_H"))
                        with gr.Row():
                            self._number("seed", "Seed")
                            self._choice("seed_behavior", "Seed behavior")
                            self._number("seed_iter_N", "Seed iter N")
                        self._text("batch_name", "Batch name")
                        with gr.Row():
                            self._check("restore_faces", "Restore faces")
                            self._check("tiling", "Tiling")
                    with gr.Tab("Keyframes", elem_id="deforum_keyframes_tab"):
                        with gr.Row():
                            self._choice("animation_mode", "Animation mode")
                            self._number("max_frames", "Max frames")
                            self._choice("border", "Border")
                            self._add("diffusion_cadence", gr.Slider(1, 50, value=2, step=1, label="Cadence",
                                                                     elem_id="deforum_diffusion_cadence"))
                        with gr.Accordion("Motion", open=True, elem_id="deforum_motion"):
                            for key, label in (("angle", "Angle"), ("zoom", "Zoom"), ("translation_x", "Translation X"),
                                               ("translation_y", "Translation Y"), ("translation_z", "Translation Z"),
                                               ("transform_center_x", "Transform center X"),
                                               ("transform_center_y", "Transform center Y"),
                                               ("rotation_3d_x", "Rotation 3D X"), ("rotation_3d_y", "Rotation 3D Y"),
                                               ("rotation_3d_z", "Rotation 3D Z")):
                                self._text(key, label)
                            self._check("enable_perspective_flip", "Enable perspective flip")
                            for key, label in (("perspective_flip_theta", "Perspective flip theta"),
                                               ("perspective_flip_phi", "Perspective flip phi"),
                                               ("perspective_flip_gamma", "Perspective flip gamma"),
                                               ("perspective_flip_fv", "Perspective flip fv")):
                                self._text(key, label)
                        with gr.Accordion("Schedules", open=False, elem_id="deforum_schedules"):
                            for key, label in (("strength_schedule", "Strength schedule"),
                                               ("noise_schedule", "Noise schedule"),
                                               ("contrast_schedule", "Contrast schedule"),
                                               ("cfg_scale_schedule", "CFG scale schedule"),
                                               ("amount_schedule", "Anti-blur amount schedule"),
                                               ("fov_schedule", "FOV schedule"), ("near_schedule", "Near schedule"),
                                               ("far_schedule", "Far schedule")):
                                self._text(key, label)
                            self._check("enable_steps_scheduling", "Enable steps scheduling")
                            self._text("steps_schedule", "Steps schedule")
                            self._check("enable_sampler_scheduling", "Enable sampler scheduling")
                            self._text("sampler_schedule", "Sampler schedule")
                            self._check("enable_checkpoint_scheduling", "Enable checkpoint scheduling")
                            self._text("checkpoint_schedule", "Checkpoint schedule")
                            self._text("seed_schedule", "Seed schedule")
                        with gr.Accordion("Coherence", open=False, elem_id="deforum_coherence"):
                            with gr.Row():
                                self._choice("color_coherence", "Color coherence")
                                self._choice("optical_flow_cadence", "Optical flow cadence")
                                self._choice("noise_type", "Noise type")
                            self._text("color_coherence_image_path", "Color coherence image path")
                    with gr.Tab("Prompts", elem_id="deforum_prompts_tab"):
                        gr.Markdown(PROMPTS_NOTE)
                        self._add("prompts", gr.Textbox(json.dumps(defaults["prompts"], indent=4, ensure_ascii=False),
                                                        label="Prompts", lines=10, elem_id="deforum_prompts"))
                        self._text("positive_prompts", "Prompts positive", 2)
                        self._text("negative_prompts", "Prompts negative", 2)
                    with gr.Tab("Init", elem_id="deforum_init_tab"):
                        with gr.Row():
                            self._check("use_init", "Use init")
                            self._add("strength", gr.Slider(0, 1, value=0.8, step=0.01, label="Strength",
                                                            elem_id="deforum_strength"))
                        self._text("init_image", "Init image path")
                        with gr.Row():
                            self._check("use_mask", "Use mask")
                            self._text("mask_file", "Mask file path")
                        self._text("video_init_path", "Video init path")
                        with gr.Row():
                            self._number("extract_nth_frame", "Extract nth frame")
                            self._number("extract_from_frame", "Extract from frame")
                            self._number("extract_to_frame", "Extract to frame")
                    with gr.Tab("ControlNet", elem_id="deforum_controlnet_tab"):
                        gr.Markdown(CONTROLNET_NOTE)
                        self.cn_json = gr.Textbox(self._json(defaults.to_dict(), _is_cn), label="ControlNet units",
                                                  lines=12, elem_id="deforum_controlnet_json")
                    with gr.Tab("Hybrid Video", elem_id="deforum_hybrid_tab"):
                        gr.Markdown(HYBRID_NOTE)
                        self.hybrid_json = gr.Textbox(self._json(defaults.to_dict(), _is_hybrid),
                                                      label="Hybrid video settings", lines=12,
                                                      elem_id="deforum_hybrid_json")
                    with gr.Tab("Output", elem_id="deforum_output_tab"):
                        with gr.Row():
                            self._number("fps", "Frames per second")
                            self._check("make_gif", "Make GIF")
                            self._check("skip_video_creation", "Skip video creation")
                            self._check("delete_imgs", "Delete frames after the video is made")
                        with gr.Row():
                            self._choice("add_soundtrack", "Soundtrack")
                            self._text("soundtrack_path", "Soundtrack path")
                        with gr.Row():
                            self.crf = gr.Slider(0, 51, value=spec.DEFORUM_OPTIONS["deforum_ffmpeg_crf"], step=1,
                                                 label="Video quality (CRF)", elem_id="deforum_ffmpeg_crf")
                            self.preset = gr.Dropdown(list(spec.FFMPEG_PRESETS),
                                                      value=spec.DEFORUM_OPTIONS["deforum_ffmpeg_preset"],
                                                      label="Encoder preset", elem_id="deforum_ffmpeg_preset")
            with gr.Column(scale=2):
                with gr.Row():
                    self.interrupt = gr.Button("Interrupt", size="sm", elem_id="deforum_interrupt")
                    self.generate = gr.Button("Generate", variant="primary", elem_id="deforum_generate")
                self.progress = gr.HTML("", elem_id="deforum_progress")
                self.frame = gr.Image(label="Current frame", type="pil", interactive=False, height=320,
                                      elem_id="deforum_current_frame")
                self.video = gr.Video(label="Video", interactive=False, elem_id="deforum_video")
                self.info = gr.HTML("", elem_id="deforum_info")
                self.download = gr.File(label="Settings file", visible=False, elem_id="deforum_settings_file")
        self.base = gr.State(defaults.to_dict())  # the whole settings, keys without a control included
        self.wire()
        return self

    @staticmethod
    def _json(settings: dict, which) -> str:
        return json.dumps({k: v for k, v in settings.items() if which(k)}, indent=4, ensure_ascii=False)

    # ---- settings both ways -----------------------------------------------------------------------
    def inputs(self) -> list:
        return [self.base, self.cn_json, self.hybrid_json, *self.controls.values()]

    def settings_from(self, base: dict, cn_json: str, hybrid_json: str, *values) -> spec.DeforumSettings:
        """The page's settings, checked as a settings file is (a bad value: its key in the message)."""
        data = dict(base or {})
        for label, text in (("ControlNet units", cn_json), ("Hybrid video settings", hybrid_json)):
            try:
                extra = json.loads(text or "{}")
            except json.JSONDecodeError as exc:
                raise RequestError(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            if not isinstance(extra, dict):
                raise RequestError(f"{label}: expected a JSON object of key → value")
            data.update(extra)
        for (key, control), value in zip(self.controls.items(), values, strict=True):
            default = spec.DEFORUM_DEFAULTS[key]
            if key == "prompts":
                try:
                    value = json.loads(value or "{}")
                except json.JSONDecodeError as exc:
                    raise RequestError(f"prompts: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            elif isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, int) and value is not None:
                value = round(float(value))
            elif isinstance(default, float) and value is not None:
                value = float(value)
            data[key] = value
        return spec.load_settings(data, legacy_colormatch_default=False)

    def values_of(self, settings: spec.DeforumSettings) -> list:
        """What each control shows for ``settings`` (the order of :meth:`inputs`)."""
        whole = settings.to_dict()
        out = [whole, self._json(whole, _is_cn), self._json(whole, _is_hybrid)]
        for key in self.controls:
            value = settings[key]
            out.append(json.dumps(value, indent=4, ensure_ascii=False) if key == "prompts" else value)
        return out

    def notes_html(self, settings: spec.DeforumSettings) -> str:
        if not settings.notes:
            return ""
        return '<ul class="sd-deforum-notes sd-notranslate">' + "".join(
            f"<li>{html.escape(n)}</li>" for n in settings.notes) + "</ul>"

    # ---- events -----------------------------------------------------------------------------------
    def load_file(self, file) -> list:
        """"Load settings": the file's values in the controls (the order of :meth:`inputs`), then its notes."""
        if file is None:
            return [gr.skip()] * (len(self.inputs()) + 1)
        try:
            settings = spec.load_settings(Path(getattr(file, "name", file)))
        except (RequestError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        return [*self.values_of(settings), self.notes_html(settings)]

    def save_file(self, *values) -> str:
        """"Save settings": the page's settings as the extension's settings file; returns its path."""
        try:
            settings = self.settings_from(*values)
        except RequestError as exc:
            raise gr.Error(str(exc)) from None
        path = Path(tempfile.mkdtemp(prefix="sdstudio-deforum-")) / "deforum_settings.txt"
        path.write_text(settings.to_json(), encoding="utf-8")
        return str(path)

    def check_files(self, settings: spec.DeforumSettings, request) -> None:
        """The files the run reads (init image, video init, mask, soundtrack, colour-coherence image, ControlNet
        videos, guided images) under the API's rule: anywhere for a page opened on this machine, as in A1111; for
        one from the network, a full path inside the data dir (gr.Error naming the field otherwise). ``request``
        None: an in-process caller, on this machine."""
        if request is None:
            return
        from fastapi import HTTPException

        from ..api.common import server_file

        data_dir = self.ui.service.engine.paths.data_dir
        for key, path in spec.check_files(settings).items():
            try:
                server_file(request, data_dir, path, key)
            except HTTPException as exc:
                raise gr.Error(str(exc.detail)) from None

    def run(self, client: str, crf, preset, *values, request=None):
        """Generate: queue the run as ``client``'s job, then (progress, current frame, video, info) as it goes;
        ``request`` (the page's gr.Request) decides where the files it reads may lie (:meth:`check_files`)."""
        ui, service = self.ui, self.ui.service
        try:
            settings = self.settings_from(*values)
            self.check_files(settings, request)
            job = service.prepare_deforum(settings, model=ui.settings.get("sd_model_checkpoint") or None,
                                          options_overrides={"deforum_ffmpeg_crf": int(crf),
                                                             "deforum_ffmpeg_preset": preset})
            submitted = service.submit_deforum(client, job)
        except (RequestError, JobError) as exc:
            raise gr.Error(str(exc)) from None
        yield live_html("deforum", submitted, previews=True), None, None, self.notes_html(settings)
        current = finished(service, submitted)
        if current is None or current.status == FAILED:
            raise gr.Error((current.error if current else None) or "the run failed")
        result = current.result
        frames = result.get("frames", [])
        words = "Cancelled" if current.status == CANCELLED else ("Interrupted" if result.get("interrupted") else "Done")
        text = (f'<p><span>{words}</span>: {len(frames)} <span>frames</span>. <span>Saved to</span> '
                f'<code class="sd-notranslate">{html.escape(result.get("outdir", ""))}</code></p>')
        warnings = "".join(f"<li>{html.escape(w)}</li>" for w in result.get("warnings", []))
        if warnings:
            text += f'<ul class="sd-deforum-notes sd-notranslate">{warnings}</ul>'
        yield "", frames[-1] if frames else None, result.get("video"), text

    def wire(self) -> None:
        service = self.ui.service
        inputs = self.inputs()
        self.load.upload(self.load_file, self.load, [*inputs, self.notes], show_progress="hidden")
        self.save.click(lambda *values: gr.File(value=self.save_file(*values), visible=True), inputs, self.download,
                        show_progress="hidden")

        def on_generate(request: gr.Request, crf, preset, *values):  # gradio passes the request positionally only
            yield from self.run(client_of(request), crf, preset, *values, request=request)

        self.generate.click(on_generate, [self.crf, self.preset, *inputs],
                            [self.progress, self.frame, self.video, self.info], concurrency_limit=None,
                            show_progress="hidden")

        def interrupt(request: gr.Request) -> None:
            service.interrupt(client_of(request))

        self.interrupt.click(interrupt, None, None, show_progress="hidden", concurrency_limit=None)
