"""A1111's training routes: ``/sdapi/v1/create/embedding``, ``/sdapi/v1/train/embedding``,
``/sdapi/v1/create/hypernetwork``, ``/sdapi/v1/train/hypernetwork`` and ``/sdapi/v1/preprocess`` (A1111 1.x's
Preprocess images; ``{"info": "preprocess complete"}``).

Bodies carry A1111's keyword arguments (its routes pass the JSON object straight to its functions, so an
unknown key is an error there too); answers are ``{"info": "..."}`` with A1111's wording, errors included
(A1111 answers 200 with "... error: ..." text). Training runs as a ``train`` queue job on the worker, on
the current checkpoint (``sd_model_checkpoint``); the call blocks until it ends, as A1111's does, while
``/sdapi/v1/progress`` shows its step and loss (``textinfo``) and ``/sdapi/v1/interrupt`` stops it with the
file saved at the step reached. Folders: ``data_root`` may be anywhere the server can read (relative paths
from the data dir), and so may an absolute ``template_filename``, for a caller on the server's machine; for a
caller from the network both must lie inside the data dir; ``log_directory`` must lie inside the data dir
(default ``textual_inversion``). Preprocess's ``process_src`` and ``process_dst`` follow ``data_root``'s rule
(the destination is written: from the network, only inside the data dir); Auto focal point crop scores
faces with face restoration's RetinaFace file when installed (:mod:`sdstudio.training.focal`).

Our own routes (A1111 has none), with kohya's field names: ``POST /sdstudio/v1/train/lora`` and
``POST /sdstudio/v1/train/dreambooth`` check the request, queue the run and answer 202 with the job. Both take
``caption_missing`` (``blip``, ``deepbooru`` or ``both``): the job first writes a caption file (the
``caption_extension``) beside every picture of the dataset folder that has none, with the interrogators in
models/BLIP and models/deepbooru (missing weights fail the job, naming the folder to fill).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Body, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..core.errors import StudioError, http_status
from ..models.errors import ModelNotFoundError
from ..service.jobs import JobError, JobService
from ..service.queue import DONE
from ..training import hypernetwork as hn_training
from .common import client_id, inside, server_file

PREVIEW_FIELDS = ("preview_from_txt2img", "preview_prompt", "preview_negative_prompt", "preview_steps",
                  "preview_sampler_name", "preview_sampler_index", "preview_cfg_scale", "preview_seed",
                  "preview_width", "preview_height")
COMMON_TRAIN = ("id_task", "learn_rate", "batch_size", "gradient_step", "data_root", "log_directory",
                "training_width", "training_height", "varsize", "steps", "clip_grad_mode", "clip_grad_value",
                "shuffle_tags", "tag_drop_out", "latent_sampling_method", "use_weight", "create_image_every",
                "template_filename", *PREVIEW_FIELDS, "seed")
EMBEDDING_TRAIN = ("embedding_name", "save_embedding_every", "save_image_with_stored_embedding", *COMMON_TRAIN)
HYPERNETWORK_TRAIN = ("hypernetwork_name", "save_hypernetwork_every", *COMMON_TRAIN)
CREATE_EMBEDDING = ("name", "num_vectors_per_token", "overwrite_old", "init_text")
CREATE_HYPERNETWORK = ("name", "enable_sizes", "overwrite_old", "layer_structure", "activation_func", "weight_init",
                       "add_layer_norm", "use_dropout", "dropout_structure")


PREPROCESS = ("id_task", "process_src", "process_dst", "process_width", "process_height", "preprocess_txt_action",
              "process_keep_original_size", "process_flip", "process_split", "process_caption",
              "process_caption_deepbooru", "split_threshold", "overlap_ratio", "process_focal_crop",
              "process_focal_crop_face_weight", "process_focal_crop_entropy_weight",
              "process_focal_crop_edges_weight", "process_focal_crop_debug", "process_multicrop",
              "process_multicrop_mindim", "process_multicrop_maxdim", "process_multicrop_minarea",
              "process_multicrop_maxarea", "process_multicrop_objective", "process_multicrop_threshold")


ANY_BODY = Body(default_factory=dict)  # A1111 takes any JSON object and passes it on as keyword arguments


class FieldError(ValueError):
    pass


def _unknown(args: dict, known: tuple[str, ...], function: str) -> None:
    extra = [k for k in args if k not in known]
    if extra:
        raise FieldError(f"{function}() got an unexpected keyword argument {extra[0]!r}")


def _int(args: dict, key: str, default: int) -> int:
    value = args.get(key, default)
    if value is None or value == "":
        return default
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise FieldError(f"{key} must be a whole number, got {value!r}") from None
    if as_float != int(as_float):
        raise FieldError(f"{key} must be a whole number, got {value!r}")
    return int(as_float)


def _float(args: dict, key: str, default: float) -> float:
    value = args.get(key, default)
    try:
        return float(default if value is None or value == "" else value)
    except (TypeError, ValueError):
        raise FieldError(f"{key} must be a number, got {value!r}") from None


def _bool(args: dict, key: str, default: bool = False) -> bool:
    value = args.get(key, default)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def train_kwargs(args: dict, data_dir: Path, *, hypernetwork: bool) -> dict:
    """A1111's train fields -> the trainer's keyword arguments (JSON values, for the queue)."""
    learn_rate = args.get("learn_rate", "0.00001" if hypernetwork else "0.005")
    if learn_rate in (None, "", 0, "0"):
        raise FieldError("Learning rate is empty or 0")
    data_root = str(args.get("data_root") or "")
    if not data_root:
        raise FieldError("Dataset directory is empty")
    try:
        root = Path(data_root).expanduser()
    except RuntimeError as exc:  # "~nobody": no such home folder
        raise FieldError(f"data_root: {data_root!r}: {exc}") from None
    root = root if root.is_absolute() else data_dir / root
    if not root.is_dir():
        raise FieldError("Dataset directory doesn't exist")
    template = args.get("template_filename") or ("hypernetwork.txt" if hypernetwork else "style_filewords.txt")
    kwargs = {"learn_rate": str(learn_rate), "batch_size": _int(args, "batch_size", 1),
              "gradient_step": _int(args, "gradient_step", 1), "data_root": str(root),
              "training_width": _int(args, "training_width", 512), "training_height": _int(args, "training_height", 512),
              "varsize": _bool(args, "varsize"), "steps": _int(args, "steps", 100000),
              "clip_grad_mode": str(args.get("clip_grad_mode") or "disabled"),
              "clip_grad_value": str(args.get("clip_grad_value") or "0.1"),
              "shuffle_tags": _bool(args, "shuffle_tags"), "tag_drop_out": _float(args, "tag_drop_out", 0.0),
              "latent_sampling_method": str(args.get("latent_sampling_method") or "once"),
              "use_weight": _bool(args, "use_weight"), "create_image_every": _int(args, "create_image_every", 0),
              "template_file": str(template), "templates_dir": str(data_dir / "textual_inversion_templates"),
              "log_directory": str(inside(data_dir, str(args.get("log_directory") or "textual_inversion"),
                                          "log_directory", "the data folder"))}
    every = "save_hypernetwork_every" if hypernetwork else "save_embedding_every"
    kwargs["save_hypernetwork_every" if hypernetwork else "save_embedding_every"] = _int(args, every, 0)
    if args.get("seed") not in (None, "", -1):
        kwargs["seed"] = _int(args, "seed", -1)
    if _bool(args, "preview_from_txt2img"):
        kwargs["preview"] = {"prompt": str(args.get("preview_prompt") or ""),
                             "negative_prompt": str(args.get("preview_negative_prompt") or ""),
                             "steps": _int(args, "preview_steps", 20),
                             "sampler_name": str(args.get("preview_sampler_name") or "Euler a"),
                             "cfg_scale": _float(args, "preview_cfg_scale", 7.0),
                             "seed": _int(args, "preview_seed", -1),
                             "width": _int(args, "preview_width", 512), "height": _int(args, "preview_height", 512)}
    for name, value in kwargs.items():
        if name in ("templates_dir", "template_file", "data_root", "log_directory"):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value < 0 and name != "seed":
            raise FieldError(f"{name} must be positive, got {value}")
    return kwargs


def _folder_arg(args: dict, key: str, data_dir: Path, what: str) -> str:
    value = str(args.get(key) or "")
    if not value:
        raise FieldError(f"{what} is empty")
    try:
        path = Path(value).expanduser()
    except RuntimeError as exc:  # "~nobody": no such home folder
        raise FieldError(f"{what}: {value!r}: {exc}") from None
    return str(path if path.is_absolute() else data_dir / path)


def preprocess_kwargs(args: dict, data_dir: Path) -> dict:
    """A1111's ``preprocess()`` keyword arguments -> a ``preprocess`` job's (JSON): unknown keys refused as
    its function refuses them, its defaults, its clamping of the split threshold (0..1) and overlap (0..0.9);
    relative folders from the data dir. Auto focal point crop takes its function's default weights (face 0.9,
    entropy 0.3, edges 0.5; its tab's entropy slider starts at 0.15)."""
    _unknown(args, PREPROCESS, "preprocess")
    focal = None
    if _bool(args, "process_focal_crop"):
        focal = {"face_weight": _float(args, "process_focal_crop_face_weight", 0.9),
                 "entropy_weight": _float(args, "process_focal_crop_entropy_weight", 0.3),
                 "edges_weight": _float(args, "process_focal_crop_edges_weight", 0.5),
                 "debug": _bool(args, "process_focal_crop_debug")}
        for key, value in focal.items():
            if key != "debug" and value < 0:
                raise FieldError(f"process_focal_crop_{key}: must be 0 or more, got {value}")
    kwargs = {"src": _folder_arg(args, "process_src", data_dir, "Source directory"),
              "dst": _folder_arg(args, "process_dst", data_dir, "Destination directory"),
              "width": _int(args, "process_width", 512), "height": _int(args, "process_height", 512),
              "txt_action": str(args.get("preprocess_txt_action") or "ignore"),
              "keep_original_size": _bool(args, "process_keep_original_size"), "flip": _bool(args, "process_flip"),
              "split": _bool(args, "process_split"),
              "split_threshold": max(0.0, min(1.0, _float(args, "split_threshold", 0.5))),
              "overlap_ratio": max(0.0, min(0.9, _float(args, "overlap_ratio", 0.2))),
              "blip": _bool(args, "process_caption"), "deepbooru": _bool(args, "process_caption_deepbooru"),
              "focal": focal, "multicrop": None}
    if _bool(args, "process_multicrop"):
        kwargs["multicrop"] = {"mindim": _int(args, "process_multicrop_mindim", 384),
                               "maxdim": _int(args, "process_multicrop_maxdim", 768),
                               "minarea": _int(args, "process_multicrop_minarea", 64 * 64),
                               "maxarea": _int(args, "process_multicrop_maxarea", 640 * 640),
                               "objective": str(args.get("process_multicrop_objective") or "Maximize area"),
                               "threshold": _float(args, "process_multicrop_threshold", 0.1)}
    return kwargs


class _TrainBody(BaseModel):
    """What the LoRA and Dreambooth routes share: kohya sd-scripts' names (its training scripts' arguments)
    where they exist; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    train_data_dir: str  # inside the data dir; kohya's "N_name" subfolders give repeats
    model: str | None = None  # a checkpoint title or name; None: the current one (sd_model_checkpoint)
    output_name: str | None = None  # the output file's name; None: the folder's name
    resume: bool = False  # carry on from <output_name>-state.pt (left by an interrupted run)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler_num_cycles: int = Field(1, ge=1)
    lr_scheduler_power: float = 1.0
    max_train_steps: int | None = Field(None, ge=1)
    max_train_epochs: int | None = Field(None, ge=1)
    train_batch_size: int = Field(1, ge=1, le=256)
    resolution: int | str = 512  # kohya: "512" or "512,768" (width,height)
    enable_bucket: bool = True
    min_bucket_reso: int = Field(256, ge=64)
    max_bucket_reso: int = Field(1024, ge=64)
    bucket_reso_steps: int = Field(64, ge=8)
    bucket_no_upscale: bool = False
    caption_extension: str = ".caption"
    flip_aug: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0)
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1)
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    min_snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float | None = Field(None, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    optimizer_type: Literal["AdamW", "AdamW8bit"] = "AdamW"
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42
    save_every_n_steps: int | None = Field(None, ge=1)
    clip_skip: int = Field(1, ge=1, le=12)
    cache_latents: bool = False  # every picture (and its mirror with flip_aug) through the VAE once, up front
    # pictures without a caption file captioned first, the caption written beside them (kohya's make_captions)
    caption_missing: Literal["blip", "deepbooru", "both"] | None = None
    sample_every_n_steps: int | None = Field(None, ge=1)
    sample_prompts: list[str] = Field(default_factory=list)  # pictures every sample_every_n_steps


class LoraTrainBody(_TrainBody):
    """train_network.py's arguments."""

    network_module: Literal["networks.lora"] = "networks.lora"
    network_dim: int = Field(4, ge=1, le=1024)
    network_alpha: float = Field(1.0, ge=0)
    conv_dim: int | None = Field(None, ge=1, le=1024)  # LoCon (kohya's network_args conv_dim / conv_alpha)
    conv_alpha: float | None = Field(None, ge=0)
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    unet_lr: float | None = Field(None, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0)
    training_comment: str | None = None


class DreamboothTrainBody(_TrainBody):
    """train_db.py's arguments (``reg_data_dir``: the class images, kohya's ``N_class`` folders or plain
    images, inside the data dir), plus the Dreambooth extension's class-image generation: with
    ``num_class_images`` more than the folder holds, the rest are generated from ``class_prompt`` on the base
    checkpoint first. The checkpoint goes to the checkpoint folder as ``<output_name>.safetensors``."""

    learning_rate: float = Field(2e-6, gt=0)
    learning_rate_te: float | None = Field(None, gt=0)  # the text encoder's (None: learning_rate)
    train_text_encoder: bool = False
    reg_data_dir: str | None = None
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(0, ge=0, le=100000)
    class_prompt: str | None = None
    class_negative_prompt: str = ""
    class_infer_steps: int = Field(20, ge=1, le=150)
    class_guidance_scale: float = Field(7.5, ge=1, le=30)
    class_sampler_name: str = "DPM++ 2M"
    class_seed: int = Field(0, ge=0)
    class_batch_size: int = Field(1, ge=1, le=64)
    save_precision: Literal["float", "fp16", "bf16"] = "float"


def _resolution(value: int | str) -> tuple[int, int]:
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise HTTPException(422, f"resolution: {value!r} is not 'N' or 'W,H'") from None
    if len(sizes) not in (1, 2) or min(sizes) < 64:
        raise HTTPException(422, f"resolution: {value!r} is not 'N' or 'W,H' (at least 64)")
    return (sizes[0], sizes[-1])


def _dataset_options(body: _TrainBody) -> dict:
    """The body's dataset fields -> :meth:`TrainingDataset.from_folder` arguments."""
    width, height = _resolution(body.resolution)
    return {"resolution": (width, height), "caption_extension": body.caption_extension,
            "enable_bucket": body.enable_bucket, "min_bucket_reso": min(body.min_bucket_reso, width, height),
            "max_bucket_reso": max(body.max_bucket_reso, width, height), "bucket_reso_steps": body.bucket_reso_steps,
            "bucket_no_upscale": body.bucket_no_upscale, "flip_aug": body.flip_aug,
            "shuffle_caption": body.shuffle_caption, "keep_tokens": body.keep_tokens,
            "caption_tag_dropout_rate": body.caption_tag_dropout_rate,
            "caption_dropout_rate": body.caption_dropout_rate, "seed": body.seed}


def _run_config(body: _TrainBody) -> dict:
    """The body's optimisation fields -> the trainers' shared config fields."""
    return {"learning_rate": body.learning_rate, "lr_scheduler": body.lr_scheduler,
            "lr_warmup_steps": body.lr_warmup_steps, "lr_scheduler_num_cycles": body.lr_scheduler_num_cycles,
            "lr_scheduler_power": body.lr_scheduler_power, "max_train_steps": body.max_train_steps,
            "max_train_epochs": body.max_train_epochs, "batch_size": body.train_batch_size,
            "min_snr_gamma": body.min_snr_gamma, "noise_offset": body.noise_offset,
            "mixed_precision": body.mixed_precision, "gradient_checkpointing": body.gradient_checkpointing,
            "optimizer": body.optimizer_type, "max_grad_norm": body.max_grad_norm, "seed": body.seed,
            "save_every_n_steps": body.save_every_n_steps, "clip_skip": body.clip_skip,
            "cache_latents": body.cache_latents, "sample_every_n_steps": body.sample_every_n_steps}


def lora_job(service: JobService, body: LoraTrainBody, model: str | None) -> dict:
    """The body -> a checked ``train_lora`` job (:meth:`JobService.prepare_train_lora`); the folder is
    already known to lie inside the data dir."""
    dataset = _dataset_options(body)
    if body.network_train_unet_only and body.network_train_text_encoder_only:
        raise HTTPException(422, "network_train_unet_only and network_train_text_encoder_only: nothing to train")
    config = {**_run_config(body), "network_dim": body.network_dim, "network_alpha": body.network_alpha,
              "conv_dim": body.conv_dim, "conv_alpha": body.conv_alpha if body.conv_dim else None,
              "train_unet": not body.network_train_text_encoder_only,
              "train_text_encoder": not body.network_train_unet_only, "unet_lr": body.unet_lr,
              "text_encoder_lr": body.text_encoder_lr, "training_comment": body.training_comment}
    try:
        job = service.prepare_train_lora(dataset=body.train_data_dir, model=model, output_name=body.output_name,
                                         resume=body.resume, dataset_options=dataset, config=config)
    except JobError as exc:
        raise HTTPException(http_status(exc.kind), str(exc)) from None
    return {**job, "caption_missing": body.caption_missing,
            "sample_prompts": [p for p in body.sample_prompts if p.strip()]}


def dreambooth_job(service: JobService, body: DreamboothTrainBody, model: str | None) -> dict:
    """The body -> a checked ``train_dreambooth`` job (:func:`sdstudio.training.dreambooth.prepare_job`); the
    folders are already known to lie inside the data dir."""
    from ..training import DatasetError, TrainingError
    from ..training.dreambooth import prepare_job

    config = {**_run_config(body), "train_text_encoder": body.train_text_encoder,
              "text_encoder_lr": body.learning_rate_te, "prior_loss_weight": body.prior_loss_weight,
              "save_precision": body.save_precision}
    class_options = {"num_class_images": body.num_class_images, "class_prompt": body.class_prompt,
                     "class_negative_prompt": body.class_negative_prompt, "class_infer_steps": body.class_infer_steps,
                     "class_guidance_scale": body.class_guidance_scale, "class_sampler_name": body.class_sampler_name,
                     "class_seed": body.class_seed, "class_batch_size": body.class_batch_size}
    try:
        return prepare_job(service.engine.registry, dataset=body.train_data_dir, model=model,
                           output_name=body.output_name, resume=body.resume, dataset_options=_dataset_options(body),
                           class_dir=body.reg_data_dir, class_options=class_options, config=config,
                           sample_prompts=body.sample_prompts, caption_missing=body.caption_missing)
    except (TrainingError, DatasetError, ModelNotFoundError) as exc:
        raise HTTPException(422, str(exc)) from None


def make_router(service: JobService, options: dict) -> APIRouter:
    outer = APIRouter()
    outer.include_router(_a1111_router(service, options))
    outer.include_router(_own_router(service, options))
    return outer


def _own_router(service: JobService, options: dict) -> APIRouter:
    data_dir = service.engine.paths.data_dir
    r = APIRouter(prefix="/sdstudio/v1")

    def folder(value: str | None, name: str) -> str | None:
        try:
            found = inside(data_dir, value, name, "the data folder")
        except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the file system
            raise HTTPException(422, f"{name}: {exc}") from None
        return None if found is None else str(found)

    def queue(request: Request, job: dict, submit) -> dict:
        try:
            submitted = submit(client_id(request), job)
        except JobError as exc:
            raise HTTPException(http_status(exc.kind), str(exc)) from None
        return {**submitted.public(), "url": f"/sdstudio/v1/jobs/{submitted.id}"}

    @r.post("/train/lora", status_code=202)
    def train_lora(body: LoraTrainBody, request: Request):
        train_dir = folder(body.train_data_dir, "train_data_dir")
        if train_dir is None:
            raise HTTPException(422, "train_data_dir is empty")
        body = body.model_copy(update={"train_data_dir": train_dir})
        job = lora_job(service, body, body.model or options.get("sd_model_checkpoint") or None)
        return queue(request, job, service.submit_train_lora)

    @r.post("/train/dreambooth", status_code=202)
    def train_dreambooth(body: DreamboothTrainBody, request: Request):
        train_dir = folder(body.train_data_dir, "train_data_dir")
        if train_dir is None:
            raise HTTPException(422, "train_data_dir is empty")
        body = body.model_copy(update={"train_data_dir": train_dir, "reg_data_dir": folder(body.reg_data_dir,
                                                                                           "reg_data_dir")})
        job = dreambooth_job(service, body, body.model or options.get("sd_model_checkpoint") or None)
        return queue(request, job, service.submit_train_dreambooth)

    return r


def _a1111_router(service: JobService, options: dict) -> APIRouter:
    engine = service.engine
    data_dir = engine.paths.data_dir
    r = APIRouter(prefix="/sdapi/v1")

    def current_model() -> str:
        return engine.registry.checkpoint(options.get("sd_model_checkpoint") or None).title

    async def wait(request: Request, job: dict) -> tuple[dict, str | None]:
        """Queue a ``train`` job and wait for it: (its result, error text or None)."""
        submitted = await run_in_threadpool(service.submit_train, client_id(request), job)
        done = await service.wait_async(submitted.id)
        if done is None:
            return {}, "the job was removed"
        return done.result or {}, None if done.status == DONE else done.error or done.status

    async def run(request: Request, job: dict) -> tuple[str, str | None]:
        """Queue a ``train`` job and wait for it: (file written or "", error text or None)."""
        result, error = await wait(request, job)
        return str(result.get("path") or ""), error

    @r.post("/create/embedding")
    async def create_embedding(request: Request, args: dict = ANY_BODY):
        try:
            _unknown(args, CREATE_EMBEDDING, "create_embedding")
            kwargs = {"name": str(args.get("name") or ""), "num_vectors_per_token": _int(args, "num_vectors_per_token", 1),
                      "overwrite_old": _bool(args, "overwrite_old"), "init_text": str(args.get("init_text", "*") or "")}
            if not kwargs["name"]:
                raise FieldError("name is empty")
            job = {"what": "create_embedding", "model": await run_in_threadpool(current_model), "kwargs": kwargs}
        except (FieldError, StudioError, ModelNotFoundError) as exc:
            return {"info": f"create embedding error: {exc}"}
        filename, error = await run(request, job)
        if error is not None:
            return {"info": f"create embedding error: {error}"}
        return {"info": f"create embedding filename: {filename}"}

    @r.post("/create/hypernetwork")
    def create_hypernetwork(args: dict = ANY_BODY):
        try:
            _unknown(args, CREATE_HYPERNETWORK, "create_hypernetwork")
            sizes = args.get("enable_sizes")
            path = hn_training.create_hypernetwork(
                str(args.get("name") or ""), hn_training.DEFAULT_SIZES if sizes in (None, "") else sizes,
                args.get("layer_structure") or "1, 2, 1", args.get("activation_func") or "linear",
                args.get("weight_init") or "Normal", _bool(args, "add_layer_norm"), _bool(args, "use_dropout"),
                args.get("dropout_structure"), _bool(args, "overwrite_old"), folder=engine.paths.hypernetwork_dir)
        except (FieldError, StudioError) as exc:
            return {"info": f"create hypernetwork error: {exc}"}
        engine.registry.refresh()
        return {"info": f"create hypernetwork filename: {path}"}

    async def train(request: Request, args: dict, what: str, fields) -> dict:
        """A1111's train routes: the named file trained as a queue job; errors are answered in ``info``."""
        try:
            _unknown(args, fields, f"train_{what}")
            if not args.get(f"{what}_name"):
                raise FieldError(f"{what} not selected")
            kwargs = {f"{what}_name": str(args[f"{what}_name"]),
                      **train_kwargs(args, data_dir, hypernetwork=what == "hypernetwork")}
            kwargs["data_root"] = server_file(request, data_dir, kwargs["data_root"], "data_root")
            if Path(kwargs["template_file"]).is_absolute():  # else one of the listed templates
                kwargs["template_file"] = server_file(request, data_dir, kwargs["template_file"], "template_filename")
            job = {"what": what, "model": await run_in_threadpool(current_model), "kwargs": kwargs}
        except HTTPException:
            raise
        except (FieldError, StudioError, ModelNotFoundError) as exc:
            return {"info": f"train {what} error: {exc}"}
        filename, error = await run(request, job)
        return {"info": f"train {what} complete: filename: {filename} error: {error}"}

    @r.post("/preprocess")
    async def preprocess(request: Request, args: dict = ANY_BODY):
        """A1111 1.x's Preprocess images as a ``train`` queue job (captioners on the worker's device);
        /progress shows "Preprocessing [Image i/n]", interrupt stops after the current picture."""
        try:
            kwargs = preprocess_kwargs(args, data_dir)
            for key, field in (("src", "process_src"), ("dst", "process_dst")):
                kwargs[key] = server_file(request, data_dir, kwargs[key], field)
        except HTTPException:
            raise
        except (FieldError, StudioError) as exc:
            return {"info": f"preprocess error: {exc}"}
        result, error = await wait(request, {"what": "preprocess", "model": None, "kwargs": kwargs})
        if error is not None:
            return {"info": f"preprocess error: {error}"}
        skipped = result.get("skipped") or []
        info = "preprocess complete"
        if skipped:
            info += f"; skipped {len(skipped)}: " + "; ".join(f"{n} ({why})" for n, why in skipped)
        if result.get("note"):
            info += f"; {result['note']}"
        return {"info": info}

    @r.post("/train/embedding")
    async def train_embedding(request: Request, args: dict = ANY_BODY):
        return await train(request, args, "embedding", EMBEDDING_TRAIN)

    @r.post("/train/hypernetwork")
    async def train_hypernetwork(request: Request, args: dict = ANY_BODY):
        return await train(request, args, "hypernetwork", HYPERNETWORK_TRAIN)

    return r
