"""The Train tab: A1111's Create embedding, Create hypernetwork, Preprocess images and Train sub-tabs (its
labels, defaults and element ids), plus a LoRA sub-tab (kohya-format, :meth:`JobService.prepare_train_lora`)
and a Dreambooth one (a fine-tuned checkpoint, :func:`sdstudio.training.dreambooth.prepare_job`), both built by
one builder. Every button but Create hypernetwork (a small file write, as A1111's route does it) queues a job
as the window's; the tab shows its progress bar and step/loss text while it runs, then the file written and
the run's loss curve.
Interrupt stops the window's job: a textual inversion or hypernetwork is saved at the step reached, a LoRA or
Dreambooth run keeps its state for Resume, a preprocess stops after its current picture."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from types import SimpleNamespace

import gradio as gr
from fastapi import HTTPException

from ..core.errors import StudioError
from ..service.jobs import JobError
from ..service.queue import CANCELLED, FAILED, FINISHED
from ..training import hypernetwork as hn_training
from ..training.embedding import list_templates
from ..training.lora import SCHEDULERS
from .progress import client_of, finished, live_html

SIZES = [str(s) for s in (768, 1024, 320, 640, 1280)]
CAPTIONERS = {"BLIP": "blip", "DeepBooru": "deepbooru", "BLIP + DeepBooru": "both"}  # caption_missing's values


def loss_plot(losses, most: int = 400) -> str:
    """A finished run's loss per step as a small inline SVG line (what the progress area shows at the end):
    ``losses`` are floats (step 1, 2, ...: LoRA, Dreambooth) or ``[step, loss]`` pairs (textual inversion,
    hypernetworks); a long run is drawn as ``most`` bucket means. Empty for fewer than two steps."""
    points = [(float(x[0]), float(x[1])) if isinstance(x, (list, tuple)) else (float(i + 1), float(x))
              for i, x in enumerate(losses or [])]
    points = [(step, value) for step, value in points if math.isfinite(value)]
    if len(points) < 2:
        return ""
    if len(points) > most:  # bucket means: the curve's shape without a point per step
        size = math.ceil(len(points) / most)
        points = [(sum(s for s, _ in b) / len(b), sum(v for _, v in b) / len(b))
                  for b in (points[i:i + size] for i in range(0, len(points), size))]
    width, height, pad = 320, 120, 4
    first, last = points[0][0], points[-1][0]
    low, high = min(v for _, v in points), max(v for _, v in points)
    xs, ys = (last - first) or 1.0, (high - low) or 1.0
    line = " ".join(f"{pad + (s - first) / xs * (width - 2 * pad):.1f},{height - pad - (v - low) / ys * (height - 2 * pad):.1f}"
                    for s, v in points)
    return (f'<figure class="sd-loss-plot"><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="loss"><polyline fill="none" stroke="currentColor" stroke-width="1.5" '
            f'points="{line}"/></svg><figcaption>loss {points[0][1]:.4f} → {points[-1][1]:.4f} (min {low:.4f}), '
            f'<span>Step</span> {first:.0f}–{last:.0f}</figcaption></figure>')


def _error(text: str) -> str:
    return f'<p style="color: var(--error-text-color, red)">{html.escape(text)}</p>'


class TrainTab:
    def __init__(self, ui):
        self.ui = ui

    # ---- lists ------------------------------------------------------------------------------------
    def embedding_names(self) -> list[str]:
        library = self.ui.service.engine.embeddings
        library.refresh()
        return sorted(library.names())

    def hypernetwork_names(self) -> list[str]:
        return [m.name for m in self.ui.service.engine.registry.hypernetworks]

    def template_names(self) -> list[str]:
        return list(list_templates(self.ui.service.engine.paths.data_dir / "textual_inversion_templates"))

    # ---- the tab ----------------------------------------------------------------------------------
    def build(self) -> TrainTab:
        with gr.Row(equal_height=False):
            with gr.Column(variant="compact"), gr.Tabs(elem_id="train_tabs"):
                with gr.Tab("Create embedding", id="create_embedding", elem_id="train_create_embedding_tab"):
                    self.emb_name = gr.Textbox(label="Name", elem_id="train_new_embedding_name")
                    self.init_text = gr.Textbox("*", label="Initialization text", elem_id="train_initialization_text")
                    self.nvpt = gr.Slider(1, 75, value=1, step=1, label="Number of vectors per token",
                                          elem_id="train_nvpt")
                    self.emb_overwrite = gr.Checkbox(False, label="Overwrite Old Embedding",
                                                     elem_id="train_overwrite_old_embedding")
                    self.create_embedding = gr.Button("Create embedding", variant="primary",
                                                      elem_id="train_create_embedding")
                with gr.Tab("Create hypernetwork", id="create_hypernetwork",
                            elem_id="train_create_hypernetwork_tab"):
                    self.hn_name = gr.Textbox(label="Name", elem_id="train_new_hypernetwork_name")
                    self.hn_sizes = gr.CheckboxGroup(SIZES, value=["768", "320", "640", "1280"], label="Modules",
                                                     elem_id="train_new_hypernetwork_sizes")
                    self.hn_layers = gr.Textbox("1, 2, 1", label="Enter hypernetwork layer structure",
                                                placeholder="1st and last digit must be 1. ex:'1, 2, 1'",
                                                elem_id="train_new_hypernetwork_layer_structure")
                    self.hn_activation = gr.Dropdown(list(hn_training.ACTIVATIONS), value="linear",
                                                     label="Select activation function of hypernetwork. "
                                                           "Recommended : Swish / Linear(none)",
                                                     elem_id="train_new_hypernetwork_activation_func")
                    self.hn_init = gr.Dropdown(list(hn_training.WEIGHT_INITS), value="Normal",
                                               label="Select Layer weights initialization. Recommended: Kaiming "
                                                     "for relu-like, Xavier for sigmoid-like, Normal otherwise",
                                               elem_id="train_new_hypernetwork_initialization_option")
                    self.hn_layer_norm = gr.Checkbox(False, label="Add layer normalization",
                                                     elem_id="train_new_hypernetwork_add_layer_norm")
                    self.hn_dropout = gr.Checkbox(False, label="Use dropout",
                                                  elem_id="train_new_hypernetwork_use_dropout")
                    self.hn_dropout_structure = gr.Textbox(
                        "0, 0, 0", label="Enter hypernetwork Dropout structure (or empty). Recommended : 0~0.35 "
                                         "incrementing sequence: 0, 0.05, 0.15",
                        placeholder="1st and last digit must be 0 and values should be between 0 and 1. "
                                    "ex:'0, 0.01, 0'", elem_id="train_new_hypernetwork_dropout_structure")
                    self.hn_overwrite = gr.Checkbox(False, label="Overwrite Old Hypernetwork",
                                                    elem_id="train_overwrite_old_hypernetwork")
                    self.create_hypernetwork = gr.Button("Create hypernetwork", variant="primary",
                                                         elem_id="train_create_hypernetwork")
                self._preprocess_tab()
                with gr.Tab("Train", id="train", elem_id="train_train_tab"):
                    gr.Markdown("Train an embedding or Hypernetwork; you must specify a directory with a set of "
                                "1:1 ratio images")
                    with gr.Row():
                        self.embedding = gr.Dropdown(self.embedding_names(), label="Embedding",
                                                     elem_id="train_embedding")
                        self.hypernetwork = gr.Dropdown(self.hypernetwork_names(), label="Hypernetwork",
                                                        elem_id="train_hypernetwork")
                        self.refresh_lists = gr.Button("🔄", elem_id="train_refresh", size="sm", min_width=40,
                                                       scale=0)
                    with gr.Row():
                        self.emb_lr = gr.Textbox("0.005", label="Embedding Learning rate",
                                                 placeholder="Embedding Learning rate",
                                                 elem_id="train_embedding_learn_rate")
                        self.hn_lr = gr.Textbox("0.00001", label="Hypernetwork Learning rate",
                                                placeholder="Hypernetwork Learning rate",
                                                elem_id="train_hypernetwork_learn_rate")
                    with gr.Row():
                        self.clip_grad_mode = gr.Dropdown(["disabled", "value", "norm"], value="disabled",
                                                          label="Gradient Clipping", elem_id="train_clip_grad_mode")
                        self.clip_grad_value = gr.Textbox("0.1", show_label=False, elem_id="train_clip_grad_value")
                    with gr.Row():
                        self.batch_size = gr.Number(1, label="Batch size", precision=0, elem_id="train_batch_size")
                        self.gradient_step = gr.Number(1, label="Gradient accumulation steps", precision=0,
                                                       elem_id="train_gradient_step")
                    self.data_root = gr.Textbox(label="Dataset directory",
                                                placeholder="Path to directory with input images",
                                                elem_id="train_dataset_directory")
                    self.log_directory = gr.Textbox("textual_inversion", label="Log directory",
                                                    placeholder="Path to directory where to write outputs",
                                                    elem_id="train_log_directory")
                    self.template = gr.Dropdown(self.template_names(), value="style_filewords.txt",
                                                label="Prompt template", elem_id="train_template_file")
                    self.width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="train_training_width")
                    self.height = gr.Slider(64, 2048, value=512, step=8, label="Height",
                                            elem_id="train_training_height")
                    self.varsize = gr.Checkbox(False, label="Do not resize images", elem_id="train_varsize")
                    self.steps = gr.Number(100000, label="Max steps", precision=0, elem_id="train_steps")
                    with gr.Row():
                        self.image_every = gr.Number(500, label="Save an image to log directory every N steps, "
                                                                "0 to disable", precision=0,
                                                     elem_id="train_create_image_every")
                        self.save_every = gr.Number(500, label="Save a copy of embedding to log directory every "
                                                               "N steps, 0 to disable", precision=0,
                                                    elem_id="train_save_embedding_every")
                    self.use_weight = gr.Checkbox(False, label="Use PNG alpha channel as loss weight",
                                                  elem_id="use_weight")
                    self.save_with_embedding = gr.Checkbox(True, label="Save images with embedding in PNG chunks",
                                                           elem_id="train_save_image_with_stored_embedding")
                    self.shuffle_tags = gr.Checkbox(False, label="Shuffle tags by ',' when creating prompts.",
                                                    elem_id="train_shuffle_tags")
                    self.tag_drop_out = gr.Slider(0, 1, value=0, step=0.1, label="Drop out tags when creating "
                                                                                 "prompts.",
                                                  elem_id="train_tag_drop_out")
                    self.latent_sampling = gr.Radio(["once", "deterministic", "random"], value="once",
                                                    label="Choose latent sampling method",
                                                    elem_id="train_latent_sampling_method")
                    with gr.Row():
                        self.train_embedding = gr.Button("Train Embedding", variant="primary",
                                                         elem_id="train_train_embedding")
                        self.interrupt = gr.Button("Interrupt", elem_id="train_interrupt_training")
                        self.train_hypernetwork = gr.Button("Train Hypernetwork", variant="primary",
                                                            elem_id="train_train_hypernetwork")
                self.lora = self._run_tab("lora", "LoRA", "Train LoRA", 1e-4, after_name=self._lora_network,
                                          checks=self._lora_checks)
                self.db = self._run_tab("dreambooth", "Dreambooth", "Train Dreambooth", 2e-6,
                                        before_model=self._class_images, checks=self._dreambooth_checks)
            with gr.Column(elem_id="ti_gallery_container"):
                self.progress = gr.HTML("", elem_id="ti_progressbar")
                self.output = gr.Textbox("", show_label=False, elem_id="ti_output")
                self.outcome = gr.HTML("", elem_id="ti_error")
        self.wire()
        return self

    def _preprocess_tab(self) -> None:
        """A1111 1.x's Preprocess images sub-tab: its labels, defaults and element ids."""
        with gr.Tab("Preprocess images", id="preprocess_images", elem_id="train_preprocess_images_tab"):
            self.process_src = gr.Textbox(label="Source directory", elem_id="train_process_src")
            self.process_dst = gr.Textbox(label="Destination directory", elem_id="train_process_dst")
            self.process_width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="train_process_width")
            self.process_height = gr.Slider(64, 2048, value=512, step=8, label="Height",
                                            elem_id="train_process_height")
            self.process_txt_action = gr.Dropdown(["ignore", "copy", "prepend", "append"], value="ignore",
                                                  label="Existing Caption txt Action",
                                                  elem_id="train_preprocess_txt_action")
            with gr.Row():
                self.process_keep_original_size = gr.Checkbox(False, label="Keep original size",
                                                              elem_id="train_process_keep_original_size")
                self.process_flip = gr.Checkbox(False, label="Create flipped copies", elem_id="train_process_flip")
                self.process_split = gr.Checkbox(False, label="Split oversized images", elem_id="train_process_split")
                self.process_focal_crop = gr.Checkbox(False, label="Auto focal point crop",
                                                      elem_id="train_process_focal_crop")
                self.process_multicrop = gr.Checkbox(False, label="Auto-sized crop", elem_id="train_process_multicrop")
                self.process_caption = gr.Checkbox(False, label="Use BLIP for caption", elem_id="train_process_caption")
                self.process_caption_deepbooru = gr.Checkbox(False, label="Use deepbooru for caption",
                                                             elem_id="train_process_caption_deepbooru")
            with gr.Row(visible=False) as split_row:
                self.process_split_threshold = gr.Slider(0, 1, value=0.5, step=0.05, label="Split image threshold",
                                                         elem_id="train_process_split_threshold")
                self.process_overlap_ratio = gr.Slider(0, 0.9, value=0.2, step=0.05, label="Split image overlap ratio",
                                                       elem_id="train_process_overlap_ratio")
            with gr.Row(visible=False) as focal_row:
                self.process_focal_crop_face_weight = gr.Slider(0, 1, value=0.9, step=0.05,
                                                                label="Focal point face weight",
                                                                elem_id="train_process_focal_crop_face_weight")
                self.process_focal_crop_entropy_weight = gr.Slider(0, 1, value=0.15, step=0.05,
                                                                   label="Focal point entropy weight",
                                                                   elem_id="train_process_focal_crop_entropy_weight")
                self.process_focal_crop_edges_weight = gr.Slider(0, 1, value=0.5, step=0.05,
                                                                 label="Focal point edges weight",
                                                                 elem_id="train_process_focal_crop_edges_weight")
                self.process_focal_crop_debug = gr.Checkbox(False, label="Create debug image",
                                                            elem_id="train_process_focal_crop_debug")
            with gr.Column(visible=False) as multicrop_column:
                gr.Markdown("Each image is center-cropped with an automatically chosen width and height.")
                with gr.Row():
                    self.process_multicrop_mindim = gr.Slider(64, 2048, value=384, step=8, label="Dimension lower bound",
                                                              elem_id="train_process_multicrop_mindim")
                    self.process_multicrop_maxdim = gr.Slider(64, 2048, value=768, step=8, label="Dimension upper bound",
                                                              elem_id="train_process_multicrop_maxdim")
                with gr.Row():
                    self.process_multicrop_minarea = gr.Slider(64 * 64, 2048 * 2048, value=64 * 64, step=1,
                                                               label="Area lower bound",
                                                               elem_id="train_process_multicrop_minarea")
                    self.process_multicrop_maxarea = gr.Slider(64 * 64, 2048 * 2048, value=640 * 640, step=1,
                                                               label="Area upper bound",
                                                               elem_id="train_process_multicrop_maxarea")
                with gr.Row():
                    self.process_multicrop_objective = gr.Radio(["Maximize area", "Minimize error"],
                                                                value="Maximize area", label="Resizing objective",
                                                                elem_id="train_process_multicrop_objective")
                    self.process_multicrop_threshold = gr.Slider(0, 1, value=0.1, step=0.01, label="Error threshold",
                                                                 elem_id="train_process_multicrop_threshold")
            with gr.Row():
                self.interrupt_preprocessing = gr.Button("Interrupt", elem_id="train_interrupt_preprocessing")
                self.run_preprocess_button = gr.Button("Preprocess", variant="primary", elem_id="train_run_preprocess")
        for box, shown in ((self.process_split, split_row), (self.process_focal_crop, focal_row),
                           (self.process_multicrop, multicrop_column)):
            box.change(lambda on: gr.update(visible=bool(on)), box, shown, show_progress="hidden")

    def _run_tab(self, kind: str, title: str, button: str, lr: float, *, before_model=None, after_name=None,
                 checks=None) -> SimpleNamespace:
        """The LoRA / Dreambooth sub-tab (ids ``train_<kind>_...``): the dataset, model, output name, steps,
        learning rate, resolution, batch, scheduler, flip / cache latents / resume checkboxes, its button and
        Interrupt; ``before_model``, ``after_name`` and ``checks`` add the trainer's own controls to the
        namespace returned (in the place their names say)."""
        ui = self.ui
        c = SimpleNamespace()
        with gr.Tab(title, id=f"train_{kind}", elem_id=f"train_{kind}_tab"):
            c.dataset = gr.Textbox(label="Dataset folder", placeholder="A folder inside the data dir; kohya's N_name "
                                                                       "subfolders repeat their images N times",
                                   elem_id=f"train_{kind}_dataset")
            if before_model is not None:
                before_model(c)
            c.model = gr.Dropdown(ui.checkpoint_titles(), value=ui.settings.get("sd_model_checkpoint"), label="Model",
                                  elem_id=f"train_{kind}_model")
            c.name = gr.Textbox(label="Output name", placeholder="The dataset folder's name",
                                elem_id=f"train_{kind}_output_name")
            if after_name is not None:
                after_name(c)
            with gr.Row():
                c.steps = gr.Number(1600, label="Max train steps", precision=0, elem_id=f"train_{kind}_max_train_steps")
                c.lr = gr.Number(lr, label="Learning rate", elem_id=f"train_{kind}_learning_rate")
            with gr.Row():
                c.resolution = gr.Slider(64, 2048, value=512, step=64, label="Resolution",
                                         elem_id=f"train_{kind}_resolution")
                c.batch = gr.Number(1, label="Batch size", precision=0, elem_id=f"train_{kind}_batch_size")
            c.scheduler = gr.Dropdown(list(SCHEDULERS), value="constant", label="Learning rate scheduler",
                                      elem_id=f"train_{kind}_lr_scheduler")
            with gr.Row():
                if checks is not None:
                    checks(c)
                c.flip = gr.Checkbox(False, label="Flip images (augmentation)", elem_id=f"train_{kind}_flip_aug")
                c.cache_latents = gr.Checkbox(False, label="Cache latents", elem_id=f"train_{kind}_cache_latents")
                c.resume = gr.Checkbox(False, label="Resume from the saved state", elem_id=f"train_{kind}_resume")
            with gr.Row():
                c.caption_missing = gr.Checkbox(False, label="Caption pictures that have no caption",
                                                elem_id=f"train_{kind}_caption_missing")
                c.captioner = gr.Radio(list(CAPTIONERS), value="BLIP", label="Captioner", visible=False,
                                       elem_id=f"train_{kind}_captioner")
            c.caption_missing.change(lambda on: gr.update(visible=bool(on)), c.caption_missing, c.captioner,
                                     show_progress="hidden")
            with gr.Row():
                c.button = gr.Button(button, variant="primary", elem_id=f"train_train_{kind}")
                c.interrupt = gr.Button("Interrupt", elem_id=f"train_{kind}_interrupt")
        return c

    @staticmethod
    def _lora_network(c: SimpleNamespace) -> None:
        with gr.Row():
            c.dim = gr.Slider(1, 128, value=8, step=1, label="Network dim", elem_id="train_lora_network_dim")
            c.alpha = gr.Slider(0, 128, value=4, step=0.5, label="Network alpha", elem_id="train_lora_network_alpha")

    @staticmethod
    def _lora_checks(c: SimpleNamespace) -> None:
        c.shuffle = gr.Checkbox(False, label="Shuffle caption tags", elem_id="train_lora_shuffle_caption")

    @staticmethod
    def _class_images(c: SimpleNamespace) -> None:
        c.class_dir = gr.Textbox(label="Class images folder",
                                 placeholder="A folder inside the data dir for prior preservation; empty: none",
                                 elem_id="train_dreambooth_class_dir")
        with gr.Row():
            c.class_prompt = gr.Textbox(label="Class prompt", placeholder="e.g. a photo of a dog",
                                        elem_id="train_dreambooth_class_prompt")
            c.num_class = gr.Number(0, label="Number of class images", precision=0,
                                    elem_id="train_dreambooth_num_class_images")
            c.prior_weight = gr.Slider(0, 2, value=1, step=0.05, label="Prior loss weight",
                                       elem_id="train_dreambooth_prior_loss_weight")

    @staticmethod
    def _dreambooth_checks(c: SimpleNamespace) -> None:
        c.text_encoder = gr.Checkbox(False, label="Train text encoder", elem_id="train_dreambooth_train_text_encoder")
        c.fp16 = gr.Checkbox(False, label="Save as float16", elem_id="train_dreambooth_fp16")

    # ---- actions (plain functions: the page's events call them, and so do the tests) --------------
    def follow(self, client: str, job_id: str, done) -> Iterator[tuple]:
        """(progress area, step/loss text, outcome): first the area the page's script keeps up to date with the
        bar and the step/loss line (no gradio update while the job runs: each costs the page's CPU, taken from
        a long run on a small machine), then ``done(job)``'s outcome."""
        service = self.ui.service
        current = service.queue.get(job_id)
        if current is not None and current.status not in FINISHED:
            yield live_html("train", current, previews=False, info=True), "", gr.skip()
            current = finished(service, current)
        if current is None:
            yield "", "", _error("the job was removed")
        elif current.status == FAILED:
            yield "", "", _error(current.error or "the job failed")
        elif current.status == CANCELLED:
            yield "", "", "<p><span>Interrupted</span></p>"
        else:
            yield loss_plot((current.result or {}).get("losses")), *done(current)

    def _submit_train(self, client: str, job: dict) -> str:
        try:
            return self.ui.service.submit_train(client, job).id
        except JobError as exc:
            raise gr.Error(str(exc)) from None

    def _model(self) -> str:
        from ..models.errors import ModelNotFoundError

        try:
            return self.ui.service.engine.registry.checkpoint(self.ui.settings.get("sd_model_checkpoint") or None).title
        except ModelNotFoundError as exc:
            raise gr.Error(str(exc)) from None

    def run_create_embedding(self, client: str, name: str, init_text: str, nvpt, overwrite) -> Iterator[tuple]:
        if not (name or "").strip():
            raise gr.Error("name is empty")
        job = {"what": "create_embedding", "model": self._model(),
               "kwargs": {"name": name.strip(), "num_vectors_per_token": int(nvpt or 1),
                          "overwrite_old": bool(overwrite), "init_text": init_text or ""}}
        job_id = self._submit_train(client, job)
        yield from self.follow(client, job_id, lambda j: (f"Created: {j.result.get('path', '')}", ""))

    def run_create_hypernetwork(self, name, sizes, layers, activation, weight_init, layer_norm, dropout,
                                dropout_structure, overwrite) -> tuple:
        engine = self.ui.service.engine
        try:
            path = hn_training.create_hypernetwork(
                str(name or ""), [int(s) for s in sizes or []], layers or "1, 2, 1", activation or "linear",
                weight_init or "Normal", bool(layer_norm), bool(dropout), dropout_structure or None, bool(overwrite),
                folder=engine.paths.hypernetwork_dir)
        except (StudioError, ValueError) as exc:
            return "", _error(str(exc)), gr.skip()
        engine.registry.refresh()
        return f"Created: {path}", "", gr.Dropdown(choices=self.hypernetwork_names(), value=path.stem)

    def run_train(self, client: str, which: str, embedding_name, hypernetwork_name, emb_lr, hn_lr, clip_grad_mode,
                  clip_grad_value, batch_size, gradient_step, data_root, log_directory, template, width, height,
                  varsize, steps, image_every, save_every, use_weight, save_with_embedding, shuffle_tags,
                  tag_drop_out, latent_sampling) -> Iterator[tuple]:
        """Train Embedding / Train Hypernetwork (``which``): A1111's fields, checked as its routes check them
        (``save_with_embedding`` is taken, as A1111's route takes it, and not used by our trainer)."""
        from ..api.train import FieldError, train_kwargs

        hypernetwork = which == "hypernetwork"
        name = hypernetwork_name if hypernetwork else embedding_name
        if not name:
            raise gr.Error(f"{which} not selected")
        args = {"learn_rate": hn_lr if hypernetwork else emb_lr, "batch_size": batch_size,
                "gradient_step": gradient_step, "data_root": data_root, "log_directory": log_directory,
                "training_width": width, "training_height": height, "varsize": varsize, "steps": steps,
                "clip_grad_mode": clip_grad_mode, "clip_grad_value": clip_grad_value, "shuffle_tags": shuffle_tags,
                "tag_drop_out": tag_drop_out, "latent_sampling_method": latent_sampling, "use_weight": use_weight,
                "create_image_every": image_every, "template_filename": template,
                "save_hypernetwork_every" if hypernetwork else "save_embedding_every": save_every}
        try:
            kwargs = train_kwargs(args, self.ui.service.engine.paths.data_dir, hypernetwork=hypernetwork)
        except FieldError as exc:
            raise gr.Error(str(exc)) from None
        except HTTPException as exc:
            raise gr.Error(str(exc.detail)) from None
        kwargs[f"{which}_name"] = str(name)
        job_id = self._submit_train(client, {"what": which, "model": self._model(), "kwargs": kwargs})

        def done(job):
            path = job.result.get("path") or ""
            return f"Training finished at step {job.result.get('steps', '')}".rstrip() if not path else \
                f"Training finished: {path}", ""

        yield from self.follow(client, job_id, done)

    def _folders(self, **folders: tuple[str, str | None]) -> dict:
        """Each ``key=(label, value)`` as a folder inside the data dir (None when empty), refused with the
        label named when it lies outside."""
        from ..api.common import inside

        data_dir = self.ui.service.engine.paths.data_dir
        try:
            return {key: inside(data_dir, (value or "").strip(), label) for key, (label, value) in folders.items()}
        except HTTPException as exc:
            raise gr.Error(str(exc.detail)) from None

    @staticmethod
    def _dataset_options(resolution, flip) -> dict:
        res = int(resolution or 512)
        return {"resolution": res, "min_bucket_reso": min(256, res), "max_bucket_reso": max(1024, res),
                "caption_extension": ".caption", "flip_aug": bool(flip)}

    @staticmethod
    def _run_config(steps, lr, batch, scheduler, cache_latents) -> dict:
        return {"max_train_steps": int(steps or 1), "learning_rate": float(lr or 0) or -1.0,
                "batch_size": int(batch or 1), "lr_scheduler": scheduler or "constant",
                "cache_latents": bool(cache_latents)}

    @staticmethod
    def _finished(what: str):
        """The outcome of a LoRA / Dreambooth job: the file (``what`` saved) or the state kept for Resume, and
        the pictures skipped."""
        def done(job):
            r = job.result
            skipped = "".join(f"<li>{html.escape(n)}: {html.escape(why)}</li>" for n, why in r.get("skipped_images", []))
            extra = f'<ul class="sd-notranslate">{skipped}</ul>' if skipped else ""
            captioned = f"; {len(r['captioned'])} pictures captioned" if r.get("captioned") else ""
            if r.get("interrupted"):
                return (f"Stopped at step {r['steps']} of {r['total']}; state saved to {r['state_path']}{captioned}",
                        extra)
            return f"{what} saved: {r['path']} ({r['steps']} steps, loss log {r['log_path']}){captioned}", extra

        return done

    @staticmethod
    def _caption_missing(on, captioner) -> str | None:
        """The "Caption pictures that have no caption" checkbox and its captioner -> ``caption_missing``."""
        return CAPTIONERS.get(captioner or "BLIP", "blip") if on else None

    def run_train_lora(self, client: str, dataset, model, name, dim, alpha, steps, lr, resolution, batch,
                       scheduler, flip, shuffle, resume, cache_latents=False, caption_missing=False,
                       captioner="BLIP") -> Iterator[tuple]:
        """Train LoRA: the same checks and job as ``POST /sdstudio/v1/train/lora`` (the folder inside the data dir);
        with ``caption_missing`` the job captions the pictures that have no caption first."""
        service = self.ui.service
        if not (dataset or "").strip():
            raise gr.Error("Dataset folder is empty")
        folder = self._folders(dataset=("Dataset folder", dataset))["dataset"]
        try:
            job = service.prepare_train_lora(
                dataset=str(folder), model=model or None, output_name=(name or "").strip() or None,
                resume=bool(resume), dataset_options={**self._dataset_options(resolution, flip),
                                                      "shuffle_caption": bool(shuffle)},
                config={**self._run_config(steps, lr, batch, scheduler, cache_latents),
                        "network_dim": int(dim or 1), "network_alpha": float(alpha or 0)})
            job["caption_missing"] = self._caption_missing(caption_missing, captioner)
            submitted = service.submit_train_lora(client, job)
        except (JobError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None
        yield from self.follow(client, submitted.id, self._finished("LoRA"))

    def run_train_dreambooth(self, client: str, dataset, class_dir, class_prompt, num_class, prior_weight, model,
                             name, steps, lr, resolution, batch, scheduler, text_encoder, fp16, flip,
                             resume, cache_latents=False, caption_missing=False, captioner="BLIP") -> Iterator[tuple]:
        """Train Dreambooth: the same checks and job as ``POST /sdstudio/v1/train/dreambooth`` (both folders
        inside the data dir)."""
        from ..models.errors import ModelNotFoundError
        from ..training import DatasetError, TrainingError
        from ..training.dreambooth import prepare_job

        service = self.ui.service
        if not (dataset or "").strip():
            raise gr.Error("Dataset folder is empty")
        folders = self._folders(dataset=("Dataset folder", dataset), classes=("Class images folder", class_dir))
        try:
            job = prepare_job(
                service.engine.registry, dataset=str(folders["dataset"]), model=model or None,
                output_name=(name or "").strip() or None, resume=bool(resume),
                dataset_options=self._dataset_options(resolution, flip),
                class_dir=str(folders["classes"]) if folders["classes"] else None,
                class_options={"num_class_images": int(num_class or 0), "class_prompt": (class_prompt or "").strip()},
                config={**self._run_config(steps, lr, batch, scheduler, cache_latents),
                        "prior_loss_weight": float(prior_weight if prior_weight is not None else 1.0),
                        "train_text_encoder": bool(text_encoder), "save_precision": "fp16" if fp16 else "float"},
                caption_missing=self._caption_missing(caption_missing, captioner))
            submitted = service.submit_train_dreambooth(client, job)
        except (JobError, TrainingError, DatasetError, ModelNotFoundError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None
        yield from self.follow(client, submitted.id, self._finished("Checkpoint"))

    def run_preprocess(self, client: str, *values) -> Iterator[tuple]:
        """Preprocess: A1111's fields in its order (``process_src`` ... ``process_multicrop_threshold``), checked
        as ``POST /sdapi/v1/preprocess`` checks them, queued as a ``train`` job. It reads and writes folders on
        the server's disk: refused when the server is shared over the network (--listen), as batch folders are."""
        from ..api.train import PREPROCESS, FieldError, preprocess_kwargs

        if not self.ui.allow_folders:
            raise gr.Error("Preprocess images reads and writes folders on the server: only available when the "
                           "server is not shared over the network (started without --listen)")
        args = dict(zip(PREPROCESS[1:], values, strict=True))
        try:
            kwargs = preprocess_kwargs(args, self.ui.service.engine.paths.data_dir)
        except FieldError as exc:
            raise gr.Error(str(exc)) from None
        job_id = self._submit_train(client, {"what": "preprocess", "model": None, "kwargs": kwargs})

        def done(job):
            r = job.result
            skipped = "".join(f"<li>{html.escape(n)}: {html.escape(why)}</li>" for n, why in r.get("skipped", []))
            text = "Preprocessing interrupted." if r.get("interrupted") else "Preprocessing finished."
            note = f"<p>{html.escape(r['note'])}</p>" if r.get("note") else ""
            return text, (f'<ul class="sd-notranslate">{skipped}</ul>' if skipped else "") + note

        yield from self.follow(client, job_id, done)

    def stop(self, client: str) -> None:
        self.ui.service.interrupt(client)

    # ---- events -----------------------------------------------------------------------------------
    def wire(self) -> None:
        outputs = [self.progress, self.output, self.outcome]

        def on_create_embedding(request: gr.Request, *values):
            for progress, text, outcome in self.run_create_embedding(client_of(request), *values):
                yield progress, text, outcome, gr.skip()
            yield gr.skip(), gr.skip(), gr.skip(), gr.Dropdown(choices=self.embedding_names())

        self.create_embedding.click(on_create_embedding, [self.emb_name, self.init_text, self.nvpt, self.emb_overwrite],
                                    [*outputs, self.embedding], concurrency_limit=None, show_progress="hidden")
        self.create_hypernetwork.click(
            self.run_create_hypernetwork,
            [self.hn_name, self.hn_sizes, self.hn_layers, self.hn_activation, self.hn_init, self.hn_layer_norm,
             self.hn_dropout, self.hn_dropout_structure, self.hn_overwrite],
            [self.output, self.outcome, self.hypernetwork], show_progress="hidden")
        train_inputs = [self.embedding, self.hypernetwork, self.emb_lr, self.hn_lr, self.clip_grad_mode,
                        self.clip_grad_value, self.batch_size, self.gradient_step, self.data_root, self.log_directory,
                        self.template, self.width, self.height, self.varsize, self.steps, self.image_every,
                        self.save_every, self.use_weight, self.save_with_embedding, self.shuffle_tags,
                        self.tag_drop_out, self.latent_sampling]
        for button, which in ((self.train_embedding, "embedding"), (self.train_hypernetwork, "hypernetwork")):
            def on_train(request: gr.Request, *values, which=which):
                yield from self.run_train(client_of(request), which, *values)

            button.click(on_train, train_inputs, outputs, concurrency_limit=None, show_progress="hidden")

        lora, db = self.lora, self.db
        for run, c, inputs in (
                (self.run_train_lora, lora, [lora.dataset, lora.model, lora.name, lora.dim, lora.alpha, lora.steps,
                                             lora.lr, lora.resolution, lora.batch, lora.scheduler, lora.flip,
                                             lora.shuffle, lora.resume, lora.cache_latents, lora.caption_missing,
                                             lora.captioner]),
                (self.run_train_dreambooth, db, [db.dataset, db.class_dir, db.class_prompt, db.num_class,
                                                 db.prior_weight, db.model, db.name, db.steps, db.lr, db.resolution,
                                                 db.batch, db.scheduler, db.text_encoder, db.fp16, db.flip, db.resume,
                                                 db.cache_latents, db.caption_missing, db.captioner])):
            def on_run(request: gr.Request, *values, run=run):
                yield from run(client_of(request), *values)

            c.button.click(on_run, inputs, outputs, concurrency_limit=None, show_progress="hidden")

        preprocess_inputs = [self.process_src, self.process_dst, self.process_width, self.process_height,
                             self.process_txt_action, self.process_keep_original_size, self.process_flip,
                             self.process_split, self.process_caption, self.process_caption_deepbooru,
                             self.process_split_threshold, self.process_overlap_ratio, self.process_focal_crop,
                             self.process_focal_crop_face_weight, self.process_focal_crop_entropy_weight,
                             self.process_focal_crop_edges_weight, self.process_focal_crop_debug,
                             self.process_multicrop, self.process_multicrop_mindim, self.process_multicrop_maxdim,
                             self.process_multicrop_minarea, self.process_multicrop_maxarea,
                             self.process_multicrop_objective, self.process_multicrop_threshold]

        def on_preprocess(request: gr.Request, *values):
            yield from self.run_preprocess(client_of(request), *values)

        self.run_preprocess_button.click(on_preprocess, preprocess_inputs, outputs, concurrency_limit=None,
                                         show_progress="hidden")

        def on_interrupt(request: gr.Request):
            self.stop(client_of(request))

        for button in (self.interrupt, self.interrupt_preprocessing, self.lora.interrupt, self.db.interrupt):
            button.click(on_interrupt, None, None, show_progress="hidden")

        def refresh():
            self.ui.service.engine.registry.refresh()
            return (gr.Dropdown(choices=self.embedding_names()), gr.Dropdown(choices=self.hypernetwork_names()),
                    gr.Dropdown(choices=self.template_names()))

        self.refresh_lists.click(refresh, None, [self.embedding, self.hypernetwork, self.template],
                                 show_progress="hidden")

