"""The web UI: A1111's tabs and element ids on gradio, every job through the shared queue.

:class:`StudioUI` holds what the tabs share (the job service, the settings, the tokenizer) and builds
the page: the top bar (checkpoint, VAE, clip skip), txt2img, img2img, Extras, PNG Info and Settings, with
"send to" links between them. :meth:`StudioUI.router` serves the page's small JSON routes (its language,
network preview pictures); :func:`page_assets` is the script and style the page loads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import gradio as gr
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

from ..core import styles as styles_file
from ..core.names import LATENT_UPSCALE_MODES
from ..core.params import RequestError
from ..core.settings import SettingError, Settings
from ..models.errors import ModelFileError, ModelNotFoundError
from ..service.jobs import JobError, JobService
from . import localization, networks, progress
from .deforum import DeforumTab
from .generation import GenerationTab
from .merger import MergerTab
from .progress import client_of, follow
from .tabs import ExtensionsTab, ExtrasTab, PngInfoTab, SettingsTab, open_picture
from .train import TrainTab

STATIC = Path(__file__).parent / "static"


EMBEDDINGS_RECHECK_S = 5.0  # how stale the token counters' view of the embeddings folder may be


def page_assets() -> dict:
    """``head`` and ``css`` for :func:`gradio.mount_gradio_app`."""
    script = (STATIC / "sdstudio.js").read_text(encoding="utf-8")
    return {"head": f"<script>{script}</script>", "css": (STATIC / "sdstudio.css").read_text(encoding="utf-8")}


class StudioUI:
    def __init__(self, service: JobService, settings: Settings, limits: dict | None = None,
                 allow_folders: bool = True):
        self.service, self.settings, self.limits = service, settings, limits or {}
        self.paths = service.engine.paths
        self.allow_folders = allow_folders  # batch folders typed in the page (off when served to the network)
        self.forever: set[str] = set()  # clients with "Generate forever" on
        self._queue_key = secrets.token_bytes(32)  # signs the queue panels' tokens (queue_token)
        self._lookup = None  # (checked at, embedding names, lookup) for the token counters

    # ---- shared helpers ---------------------------------------------------------------------------
    def forever_has(self, client: str) -> bool:
        return client in self.forever

    def queue_token(self, client: str) -> str:
        """The token a window's queue panel polls with: its client id and a signature only this process
        makes, so that one window cannot read or cancel another's jobs by guessing a gradio session."""
        name = base64.urlsafe_b64encode(client.encode()).decode().rstrip("=")
        return f"{name}.{self._queue_mac(client)}"

    def _queue_mac(self, client: str) -> str:
        return hmac.new(self._queue_key, client.encode(), hashlib.sha256).hexdigest()[:32]

    def client_of_token(self, token: str) -> str | None:
        name, _, mac = token.partition(".")
        if len(mac) != 32 or mac.strip("0123456789abcdef"):  # not one of our signatures (compare_digest
            return None  # refuses non-ASCII text with a TypeError)
        try:
            client = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return client if hmac.compare_digest(self._queue_mac(client), mac) else None

    def queue_panel(self, client: str | None) -> str:
        """The queue panel of ``client``'s window (None: a new page's empty panel, which polls nothing)."""
        if client is None:
            return progress.queue_panel_empty()
        return progress.queue_panel(self.service, client, self.queue_token(client))

    def require_folders(self) -> None:
        """Batch folders typed into the page read and write the server's disk: refused when it is shared."""
        if not self.allow_folders:
            raise RequestError("Batch from a folder is only available when the server is not shared over the "
                               "network (started without --listen)")

    def style_names(self) -> list[str]:
        return list(styles_file.load(self.paths.styles_file))

    def upscaler_names(self) -> list[str]:
        return [u.name for u in self.service.engine.upscalers.available()]

    def hires_upscalers(self) -> list[str]:
        return [*LATENT_UPSCALE_MODES, *self.upscaler_names()]

    def checkpoint_titles(self) -> list[str]:
        return [m.title for m in self.service.engine.registry.checkpoints]

    def checkpoint_choices(self) -> list[tuple[str, str]]:
        """The checkpoint dropdown's (label, title) pairs: a pickle the safe loader would refuse is labelled
        as A1111's picklescan warns (:func:`sdstudio.models.pickle_scan.unsafe_warning`)."""
        from ..models.pickle_scan import unsafe_warning

        return [(f"{m.title} ⚠ may be malicious" if unsafe_warning(m.path) else m.title, m.title)
                for m in self.service.engine.registry.checkpoints]

    def vae_names(self) -> list[str]:
        return ["Automatic", "None", *[v.name for v in self.service.engine.registry.vaes]]

    def has_interrogator(self, backend: str) -> bool:
        folders = ("BLIP", "CLIP") if backend == "clip" else ("deepbooru",)
        return all((self.paths.models_dir / f).is_dir() and any((self.paths.models_dir / f).iterdir())
                   for f in folders)

    def interrogate(self, picture, backend: str) -> str:
        try:
            return self.service.engine.interrogators.interrogate(picture.convert("RGB"), backend)
        except (ModelNotFoundError, RequestError) as exc:
            raise gr.Error(str(exc)) from None

    def tokenizer(self):
        from ..models.loader import clip_tokenizer

        return clip_tokenizer()

    def embedding_lookup(self):
        """The embeddings by token, for the token counters (asked on every keystroke): the folder is looked at
        again at most every few seconds, and the names are tokenized again only when they changed."""
        from ..engine.conditioning import embedding_lookup

        now = time.monotonic()
        if self._lookup is None or now - self._lookup[0] > EMBEDDINGS_RECHECK_S:
            library = self.service.engine.embeddings
            names = tuple(library.names())
            if self._lookup is None or names != self._lookup[1]:
                self._lookup = (now, names, embedding_lookup(self.tokenizer(), {n: library.get(n) for n in names}))
            else:
                self._lookup = (now, *self._lookup[1:])
        return self._lookup[2]

    def open_folder(self, path: str | None, request) -> None:
        """Open the image's folder in the file manager of the machine the server runs on, when the page is
        on that machine; otherwise say where it is."""
        folder = Path(path).parent if path else self.paths.outputs_dir
        host = getattr(getattr(request, "client", None), "host", "")
        opener = "explorer" if sys.platform == "win32" else ("open" if sys.platform == "darwin" else "xdg-open")
        if host in ("127.0.0.1", "::1", "localhost") and shutil.which(opener) and os.environ.get("DISPLAY", "x"):
            subprocess.Popen([opener, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gr.Info(f"Images saved to {folder}")

    def zip_results(self, results: list[dict]) -> str:
        if not results:
            raise gr.Error("Generate an image first")
        out = Path(tempfile.mkdtemp(prefix="sdstudio-zip-")) / "images.zip"
        with zipfile.ZipFile(out, "w") as z:
            for r in results:
                z.write(r["path"], Path(r["path"]).name)
        return str(out)

    # ---- the page ---------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        settings = self.settings
        with gr.Blocks(title="sdstudio", analytics_enabled=False) as page:
            with gr.Row(elem_id="quicksettings"):
                self.checkpoint = gr.Dropdown(self.checkpoint_choices(), value=settings.get("sd_model_checkpoint"),
                                              label="Stable Diffusion checkpoint", elem_id="setting_sd_model_checkpoint",
                                              scale=4)
                self.refresh = gr.Button("🔄", elem_id="refresh_sd_model_checkpoint", size="sm", min_width=40, scale=0)
                self.vae = gr.Dropdown(self.vae_names(), value=settings.get("sd_vae", "Automatic"), label="SD VAE",
                                       elem_id="setting_sd_vae", scale=2)
                self.clip_skip = gr.Slider(1, 12, value=int(settings.get("CLIP_stop_at_last_layers", 1)), step=1,
                                           label="Clip skip", elem_id="setting_CLIP_stop_at_last_layers", scale=2)
                self.model_status = gr.HTML("", elem_id="sd_checkpoint_status")
            self.checkpoint_request = gr.Textbox("", elem_id="sd_checkpoint_request", elem_classes=["sd-hidden"],
                                                 show_label=False, container=False)
            with gr.Tabs(elem_id="tabs") as self.tabs:
                with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                    self.txt2img = GenerationTab(self, "txt2img").build()
                with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                    self.img2img = GenerationTab(self, "img2img").build()
                with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
                    self.extras = ExtrasTab(self).build()
                with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                    self.pnginfo = PngInfoTab(self).build()
                with gr.Tab("Checkpoint Merger", id="modelmerger", elem_id="tab_modelmerger"):
                    self.merger = MergerTab(self).build()
                with gr.Tab("Train", id="train", elem_id="tab_train"):
                    self.train = TrainTab(self).build()
                with gr.Tab("Deforum", id="deforum", elem_id="tab_deforum"):
                    self.deforum = DeforumTab(self).build()
                with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                    self.settings_tab = SettingsTab(self).build()
                with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                    self.extensions = ExtensionsTab(self).build()
            gr.HTML(self.footer_html(), elem_id="footer")
            self.txt2img.wire()
            self.img2img.wire()
            self._wire_top()
            self._wire_send_to()
            page.load(self._current_settings, None, self._settings_outputs(), show_progress="hidden")
            # the window's queue panels get its token at once, so that the page's script also shows the jobs
            # that other events queue (a model load, Deforum, the merger, training)
            panels = [self.txt2img.queue_list, self.img2img.queue_list]

            def window_panels(request: gr.Request) -> list[str]:
                return [self.queue_panel(client_of(request))] * len(panels)

            page.load(window_panels, None, panels, show_progress="hidden")
        return page

    def footer_html(self) -> str:
        """A1111's footer line: versions, and where the model runs in which precision (and why)."""
        import html

        import torch

        from .. import __version__

        return (f'<div class="versions">sdstudio {__version__} • python {sys.version.split()[0]} • '
                f'torch {torch.__version__} • gradio {gr.__version__} • '
                f'device: {html.escape(self.service.engine.plan.describe())}</div>')

    def _settings_outputs(self) -> list:
        sizes = [tab.form.controls[k] for tab in (self.txt2img, self.img2img) for k in ("width", "height")]
        return [self.checkpoint, self.vae, self.clip_skip, *self.settings_tab.controls.values(), *sizes]

    def _current_settings(self) -> list:
        """A page load shows the settings as they are now (the API or another window may have changed them),
        and the current checkpoint's own size as the default width and height. A control whose value has not
        changed since the page was built is left alone: the load event arrives after the page is usable, and
        must not undo what the user (or a page script) typed in the meantime."""
        values = self.settings.values
        w, h = self.model_size()
        fresh = [values.get("sd_vae", "Automatic"), values.get("CLIP_stop_at_last_layers", 1),
                 *[values.get(key) for key in self.settings_tab.controls], w, h, w, h]
        controls = self._settings_outputs()[1:]
        return [gr.Dropdown(choices=self.checkpoint_choices(), value=values.get("sd_model_checkpoint")),
                *[gr.skip() if value == control.value else value for control, value in zip(controls, fresh)]]

    def model_size(self) -> tuple[int, int]:
        """The size the current checkpoint was made for, from its ``modelspec.resolution`` metadata (SAI's
        files and our demo model carry it); 512×512 otherwise, A1111's default."""
        from ..models.safe_load import open_safetensors

        try:
            file = self.service.engine.registry.checkpoint(self.settings.get("sd_model_checkpoint") or None)
            text = open_safetensors(file.path).metadata.get("modelspec.resolution", "") \
                if file.path.suffix == ".safetensors" else ""
            w, h = (int(v) for v in text.lower().split("x"))
            if 64 <= w <= 4096 and 64 <= h <= 4096:
                return w // 8 * 8, h // 8 * 8
        except (ModelNotFoundError, ModelFileError, ValueError, OSError):
            pass
        return 512, 512

    def _wire_top(self) -> None:
        settings = self.settings

        def switch(title, request: gr.Request):
            if not title:
                return
            client = client_of(request)
            try:
                settings.update({"sd_model_checkpoint": title})
                job = self.service.submit_load(client, title)
            except (SettingError, ModelNotFoundError, JobError) as exc:
                raise gr.Error(str(exc)) from None
            for tick in follow(self.service, client, job):
                if tick.job is None:
                    yield tick.html
                elif tick.job.status == "failed":
                    raise gr.Error(tick.job.error or "the model did not load")
                else:
                    yield ('<span class="sd-model-status"><span>Model loaded</span>: '
                           f'<span class="sd-notranslate">{tick.job.result.get("model_name", "")}</span></span>')

        self.checkpoint.input(switch, self.checkpoint, self.model_status, concurrency_limit=None)

        def from_card(title, request: gr.Request):
            yield gr.Dropdown(value=title), gr.skip()
            for html_ in switch(title, request):
                yield gr.skip(), html_

        self.checkpoint_request.change(from_card, self.checkpoint_request, [self.checkpoint, self.model_status],
                                      concurrency_limit=None)

        def refresh():
            self.service.engine.registry.refresh()
            return (gr.Dropdown(choices=self.checkpoint_choices(), value=settings.get("sd_model_checkpoint")),
                    gr.Dropdown(choices=self.vae_names()))

        self.refresh.click(refresh, None, [self.checkpoint, self.vae], show_progress="hidden")

        def set_option(key):
            def apply(value):
                try:
                    settings.update({key: value})
                except (SettingError, ModelNotFoundError) as exc:
                    raise gr.Error(str(exc)) from None
            return apply

        self.vae.input(set_option("sd_vae"), self.vae, None, show_progress="hidden")
        self.clip_skip.release(set_option("CLIP_stop_at_last_layers"), self.clip_skip, None, show_progress="hidden")
        self.clip_skip.change(set_option("CLIP_stop_at_last_layers"), self.clip_skip, None, show_progress="hidden")

    def _wire_send_to(self) -> None:
        """The 🖼️ 🎨 📐 buttons of both galleries and PNG Info's send buttons."""
        img = self.img2img
        img_fill = img.fill_outputs()

        def to_img2img_values(path: str | None, text: str, mode: str):
            picture = open_picture(path)
            values = img.fill_values(img.request_from_text(text)) if text and "Steps:" in text else \
                [gr.skip()] * len(img_fill)
            editor = {"background": picture, "layers": [], "composite": picture}
            init = picture if mode == "img2img" else gr.skip()
            inpaint = editor if mode == "Inpaint" else gr.skip()
            return [gr.Tabs(selected="img2img"), gr.Tabs(selected="inpaint" if mode == "Inpaint" else "img2img"),
                    mode, init, inpaint, *values]

        targets = [self.tabs, img.mode_tabs, img.mode_state, img.init_image, img.inpaint, *img_fill]
        for tab in (self.txt2img, self.img2img):
            def pick(results, index):
                if not results:
                    raise gr.Error("Generate an image first")
                chosen = results[index if 0 <= index < len(results) else 0]
                return chosen["path"], chosen["infotext"]

            tab.to_img2img.click(lambda r, i, pick=pick: to_img2img_values(*pick(r, i), "img2img"),
                                 [tab.results, tab.selected], targets, show_progress="hidden")
            tab.to_inpaint.click(lambda r, i, pick=pick: to_img2img_values(*pick(r, i), "Inpaint"),
                                 [tab.results, tab.selected], targets, show_progress="hidden")
            tab.to_extras.click(lambda r, i, pick=pick: (gr.Tabs(selected="extras"), open_picture(pick(r, i)[0])),
                                [tab.results, tab.selected], [self.tabs, self.extras.image], show_progress="hidden")

        png = self.pnginfo
        t2i = self.txt2img

        def png_to_txt2img(text):
            if not text:
                raise gr.Error("The image has no generation parameters")
            return [gr.Tabs(selected="txt2img"), *t2i.fill_values(t2i.request_from_text(text))]

        png.to_txt2img.click(png_to_txt2img, png.text, [self.tabs, *t2i.fill_outputs()], show_progress="hidden")
        png.to_img2img.click(lambda path, text: to_img2img_values(path, text, "img2img"), [png.image, png.text],
                             targets, show_progress="hidden")
        png.to_inpaint.click(lambda path, text: to_img2img_values(path, text, "Inpaint"), [png.image, png.text],
                             targets, show_progress="hidden")
        png.to_extras.click(lambda path: (gr.Tabs(selected="extras"), open_picture(path)), png.image,
                            [self.tabs, self.extras.image], show_progress="hidden")

    # ---- the page's JSON routes ------------------------------------------------------------------
    def router(self) -> APIRouter:
        r = APIRouter(prefix="/sdstudio", include_in_schema=False)

        @r.get("/localization.json")
        def language():
            name = self.settings.get("localization", "None")
            try:
                strings = localization.load(name, self.paths)
                # the plug-ins' own texts for this language (their file, if the data dir has one, wins)
                return {"language": name, "strings": {**self.service.plugins.localizations.get(name, {}), **strings}}
            except (KeyError, ValueError):
                return {"language": "None", "strings": {}}

        @r.get("/preview")
        def preview(kind: str, name: str):
            if kind not in networks.KINDS:
                raise HTTPException(404, f"unknown kind {kind!r}")
            path = networks.preview_file(self, kind, name)
            if path is None:
                raise HTTPException(404, f"no preview for {name!r}")
            return FileResponse(path)

        # A generation's progress, polled by the page's script. A job's id (a random 128-bit uuid, given only
        # to the window that queued it) is what lets a page read it; API clients have /sdstudio/v1/jobs.
        def ui_job(job_id: str):
            job = self.service.queue.get(job_id)
            if job is None or not job.client.startswith("ui:"):
                raise HTTPException(404, f"no job {job_id!r}")
            return job

        @r.get("/progress/{job_id}")
        async def job_progress(job_id: str):  # quick (no disk, no image): on the event loop, no thread hop
            return progress.snapshot(self.service, ui_job(job_id).id)

        @r.get("/progress/{job_id}/preview")
        def job_preview(job_id: str):
            image = self.service.preview_image(None, ui_job(job_id).id)
            if image is None:
                raise HTTPException(404, "no preview yet")
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG", quality=90)
            return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

        # The window's queue panel, polled by the page's script (progress.queue_panel; more often while busy).
        def queue_client(token: str) -> str:
            client = self.client_of_token(token)
            if client is None:
                raise HTTPException(404, "no such queue panel")
            return client

        def queue_state(client: str) -> dict:
            table, busy = progress.queue_state(self.service, client)
            return {"html": table, "busy": busy}

        @r.get("/queue/{token}")
        def window_queue(token: str):
            return queue_state(queue_client(token))

        @r.post("/queue/{token}/cancel/{job_id}")
        def cancel_job(token: str, job_id: str):
            client = queue_client(token)
            self.service.cancel(job_id, client)
            return queue_state(client)

        return r

