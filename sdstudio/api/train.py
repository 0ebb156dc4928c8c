"""A1111's training routes: ``/sdapi/v1/create/embedding``, ``/sdapi/v1/train/embedding``,
``/sdapi/v1/create/hypernetwork``, ``/sdapi/v1/train/hypernetwork``.

Bodies carry A1111's keyword arguments (its routes pass the JSON object straight to its functions, so an
unknown key is an error there too); answers are ``{"info": "..."}`` with A1111's wording, errors included
(A1111 answers 200 with "... error: ..." text). Training runs as a ``train`` queue job on the worker, on
the current checkpoint (``sd_model_checkpoint``); the call blocks until it ends, as A1111's does, while
``/sdapi/v1/progress`` shows its step and loss (``textinfo``) and ``/sdapi/v1/interrupt`` stops it with the
file saved at the step reached. Folders: ``data_root`` may be anywhere the server can read (relative paths
from the data dir); ``log_directory`` must lie inside the data dir (default ``textual_inversion``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Body, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from ..core.errors import StudioError
from ..models.errors import ModelNotFoundError
from ..service.jobs import JobService
from ..service.queue import DONE
from ..training import hypernetwork as hn_training
from .common import client_id, inside

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


def _train_kwargs(args: dict, data_dir: Path, *, hypernetwork: bool) -> dict:
    """A1111's train fields -> the trainer's keyword arguments (JSON values, for the queue)."""
    learn_rate = args.get("learn_rate", "0.00001" if hypernetwork else "0.005")
    if learn_rate in (None, "", 0, "0"):
        raise FieldError("Learning rate is empty or 0")
    data_root = str(args.get("data_root") or "")
    if not data_root:
        raise FieldError("Dataset directory is empty")
    root = Path(data_root).expanduser()
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
                                          "log_directory"))}
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


def make_router(service: JobService, options: dict) -> APIRouter:
    engine = service.engine
    data_dir = engine.paths.data_dir
    r = APIRouter(prefix="/sdapi/v1")

    def current_model() -> str:
        return engine.registry.checkpoint(options.get("sd_model_checkpoint") or None).title

    async def run(request: Request, job: dict) -> tuple[str, str | None]:
        """Queue a ``train`` job and wait for it: (file written or "", error text or None)."""
        submitted = await run_in_threadpool(service.submit_train, client_id(request), job)
        done = await service.wait_async(submitted.id)
        if done is None:
            return "", "the job was removed"
        if done.status == DONE:
            return str(done.result.get("filename") or ""), None
        return str((done.result or {}).get("filename") or ""), done.error or done.status

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

    @r.post("/train/embedding")
    async def train_embedding(request: Request, args: dict = ANY_BODY):
        try:
            _unknown(args, EMBEDDING_TRAIN, "train_embedding")
            if not args.get("embedding_name"):
                raise FieldError("embedding not selected")
            kwargs = {"embedding_name": str(args["embedding_name"]), **_train_kwargs(args, data_dir, hypernetwork=False)}
            job = {"what": "embedding", "model": await run_in_threadpool(current_model), "kwargs": kwargs}
        except HTTPException:
            raise
        except (FieldError, StudioError, ModelNotFoundError) as exc:
            return {"info": f"train embedding error: {exc}"}
        filename, error = await run(request, job)
        return {"info": f"train embedding complete: filename: {filename} error: {error}"}

    @r.post("/train/hypernetwork")
    async def train_hypernetwork(request: Request, args: dict = ANY_BODY):
        try:
            _unknown(args, HYPERNETWORK_TRAIN, "train_hypernetwork")
            if not args.get("hypernetwork_name"):
                raise FieldError("hypernetwork not selected")
            kwargs = {"hypernetwork_name": str(args["hypernetwork_name"]),
                      **_train_kwargs(args, data_dir, hypernetwork=True)}
            job = {"what": "hypernetwork", "model": await run_in_threadpool(current_model), "kwargs": kwargs}
        except HTTPException:
            raise
        except (FieldError, StudioError, ModelNotFoundError) as exc:
            return {"info": f"train hypernetwork error: {exc}"}
        filename, error = await run(request, job)
        return {"info": f"train hypernetwork complete: filename: {filename} error: {error}"}

    return r
