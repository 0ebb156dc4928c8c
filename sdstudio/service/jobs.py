"""The job service: one worker per device takes jobs from the queue and runs them on the engine.

UI, API and CLI ``--server`` all call :meth:`JobService.submit`; nobody else calls the engine's
generation methods, so two callers never run at once on a device or change each other's settings
(each job carries its own checkpoint, VAE, LoRA and options).

Progress, interrupt and skip belong to the job and its client: :meth:`interrupt` stops only the
caller's running job, :meth:`progress` reports the caller's own job. Outputs reach the disk (temp
file, fsync, rename) before the queue records them; a job is marked done after its last image.
"""

from __future__ import annotations

import base64
import errno
import io
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..core import outputs
from ..core.errors import BAD_REQUEST, TOO_LARGE, TOO_MANY, StudioError, kind_of
from ..core.params import Img2ImgRequest, RequestError, Txt2ImgRequest
from ..engine.hooks import HookError
from ..models.errors import ModelFileError, ModelNotFoundError
from .queue import CANCELLED, DONE, FAILED, FINISHED, QUEUED, RUNNING, Job, JobQueue

log = logging.getLogger(__name__)


class JobError(Exception):
    """A job that cannot be submitted (bad request): the message names the problem."""

    kind = BAD_REQUEST


class QueueFullError(JobError):
    """The client already has as many jobs waiting as one client may (HTTP 429)."""

    kind = TOO_MANY


@dataclass
class Live:
    """In-memory state of the running job (the queue holds the durable part)."""

    job: Job
    job_count: int = 1
    job_no: int = 0
    step: int = 0
    steps: int = 0
    started: float = field(default_factory=time.time)
    preview: object = None  # the live preview (a PIL image), made on the worker every N steps
    preview_no: int = 0  # counts the previews made, so a page asks for a picture only when it is new
    interrupted: bool = False
    skip: bool = False
    paused_for_others: bool = False
    phase: str = ""  # a Deforum job's phase (PREPARING, GENERATING, POST_PROCESSING), for its API
    textinfo: str | None = None  # what /progress shows under the bar (a training job's loss and step)

    @property
    def progress(self) -> float:
        if not self.job_count or not self.steps:
            return 0.0
        return min(1.0, (self.job_no + self.step / self.steps) / self.job_count)

    def eta(self) -> float:
        p = self.progress
        return 0.0 if p <= 0 else (time.time() - self.started) * (1 - p) / p


def grid_entries(result: dict) -> list[dict]:
    """A job's grids, first to last: a script's own grids, or the one made of a batch's images."""
    if result.get("grids"):
        return result["grids"]
    if result.get("grid"):
        images = result.get("images", [])
        return [{"path": result["grid"], "infotext": images[0]["infotext"] if images else ""}]
    return []


def grid_paths(result: dict) -> list[str]:
    return [g["path"] for g in grid_entries(result)]


@dataclass
class Txt2ImgJob:
    """What a generation job stores: the request (seeds concrete; an :class:`Img2ImgRequest` makes it
    an img2img job) and where its images go."""

    request: Txt2ImgRequest
    save_images: bool = True  # True: outputs/txt2img-images with A1111 names; False: the job's own folder
    save_grid: bool = True
    samples_format: str = "png"
    outdir: str | None = None  # a folder inside the outputs dir (already checked)

    @property
    def kind(self) -> str:
        return "img2img" if isinstance(self.request, Img2ImgRequest) else "txt2img"

    def to_dict(self) -> dict:
        return {"request": self.request.to_dict(), "save_images": self.save_images, "save_grid": self.save_grid,
                "samples_format": self.samples_format, "outdir": self.outdir}

    @classmethod
    def from_dict(cls, data: dict, kind: str = "txt2img") -> Txt2ImgJob:
        request_type = Img2ImgRequest if kind == "img2img" else Txt2ImgRequest
        return cls(request_type.from_dict(data["request"]), data.get("save_images", True),
                   data.get("save_grid", True), data.get("samples_format", "png"), data.get("outdir"))


@dataclass
class DeforumJob:
    """What a Deforum job stores: its settings (checked, seed concrete), the options its video is made with,
    the checkpoint, and, as the caller gave them, the settings and options (the extension's API echoes them).
    The run's timestring is chosen when the job first starts and kept in its result, so a parked or
    restarted job continues the same run from the state saved beside its frames."""

    settings: dict
    options: dict = field(default_factory=dict)  # DeforumRun's options: ffmpeg_crf, ffmpeg_preset
    model: str | None = None
    batch_id: str | None = None
    given: dict | None = None  # the settings as submitted
    options_overrides: dict = field(default_factory=dict)
    outdir: str | None = None  # the run's own folder (else outputs/img2img-images/<batch name>)
    notes: list[str] = field(default_factory=list)  # what the settings file said differently (unknown keys...)
    frame_range: list[int] | None = None  # a split run's shard: these frames only (start, end), no video

    kind = "deforum"

    def to_dict(self) -> dict:
        return {"settings": self.settings, "options": self.options, "model": self.model, "batch_id": self.batch_id,
                "given": self.given, "options_overrides": self.options_overrides, "outdir": self.outdir,
                "notes": self.notes, **({"frame_range": self.frame_range} if self.frame_range else {})}

    @classmethod
    def from_dict(cls, data: dict) -> DeforumJob:
        return cls(data["settings"], dict(data.get("options") or {}), data.get("model"), data.get("batch_id"),
                   data.get("given"), dict(data.get("options_overrides") or {}), data.get("outdir"),
                   list(data.get("notes") or []), data.get("frame_range"))


@dataclass
class MergeJob:
    """What a checkpoint-merge job stores: the models as found in the model folders (path and A1111's name for
    each; requests name models, never paths), and A1111's merger options."""

    primary: list[str]  # [path, name] of each model
    secondary: list[str] | None = None
    tertiary: list[str] | None = None
    interp_method: str = "Weighted sum"
    multiplier: float = 0.3
    save_as_half: bool = False
    custom_name: str = ""
    checkpoint_format: str = "safetensors"
    config_source: int = 0
    bake_in_vae: list[str] | None = None  # [path, name] or None
    discard_weights: str = ""
    save_metadata: bool = True
    add_merge_recipe: bool = True
    copy_metadata_fields: bool = True
    metadata_json: dict = field(default_factory=dict)
    block_weights: list[float] | None = None
    loras: list[list] = field(default_factory=list)  # [path, name, weight]
    outdir: str = ""  # the checkpoint folder the result goes to

    kind = "merge"

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> MergeJob:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def prepare_merge(registry, outdir, *, primary_model_name: str, secondary_model_name: str | None = None,
                  tertiary_model_name: str | None = None, interp_method: str = "Weighted sum",
                  multiplier: float = 0.3, save_as_half: bool = False, custom_name: str = "",
                  checkpoint_format: str = "safetensors", config_source: int | str = 0,
                  bake_in_vae: str | None = "None", discard_weights: str = "", save_metadata: bool = True,
                  add_merge_recipe: bool = True, copy_metadata_fields: bool = True,
                  metadata_json: dict | str | None = None, block_weights=None, loras=None) -> MergeJob:
    """A merge job from A1111's merger fields, every name looked up in ``registry``'s model folders now (an unknown
    one, a bad option or a custom name with a path in it is a :class:`JobError` naming it)."""
    import json as _json

    from ..models import merge as merger

    registry.refresh()
    if interp_method not in merger.METHODS:
        raise JobError(f"interp_method: {interp_method!r} is not one of {', '.join(merger.METHODS)}")
    if checkpoint_format not in merger.FORMATS:
        raise JobError(f"checkpoint_format: {checkpoint_format!r} is not one of {', '.join(merger.FORMATS)}")
    custom_name = (custom_name or "").strip()
    if any(ch in custom_name for ch in "/\\\0") or custom_name in (".", ".."):
        raise JobError(f"custom_name: {custom_name!r} must be a file name, not a path")
    try:
        config_index = merger._config_source_index(config_source)
    except merger.MergeError as exc:
        raise JobError(str(exc)) from None

    def model(field_name: str, name: str | None, needed: bool) -> list[str] | None:
        if not needed:
            return None
        if not name:
            raise JobError(f"{field_name}: {interp_method} needs this model")
        try:
            found = registry.checkpoint(name)
        except ModelNotFoundError as exc:
            raise JobError(f"{field_name}: {exc}") from None
        return [str(found.path), found.filename]

    a = model("primary_model_name", primary_model_name, True)
    b = model("secondary_model_name", secondary_model_name, interp_method != "No interpolation")
    c = model("tertiary_model_name", tertiary_model_name, interp_method == "Add difference")
    vae = None
    if bake_in_vae and bake_in_vae != "None":
        try:
            found = registry.vae(bake_in_vae)
        except ModelNotFoundError as exc:
            raise JobError(f"bake_in_vae: {exc}") from None
        vae = [str(found.path), found.filename]
    if isinstance(metadata_json, str):
        try:
            metadata_json = _json.loads(metadata_json or "{}")
        except ValueError as exc:
            raise JobError(f"metadata_json: not JSON ({exc})") from None
    if metadata_json is not None and not isinstance(metadata_json, dict):
        raise JobError("metadata_json: must be a JSON object")
    weights = None
    if block_weights not in (None, "", []):
        from ..models.detect import detect
        from ..models.safe_load import open_state_dict

        try:
            sdxl = detect(open_state_dict(a[0]).shapes).is_sdxl
            weights = merger.parse_block_weights(block_weights, sdxl)
        except (merger.MergeError, ModelFileError) as exc:
            raise JobError(str(exc) if isinstance(exc, merger.MergeError) else f"primary_model_name: {exc}") from None
    lora_list = []
    for entry in loras or []:
        if isinstance(entry, dict):
            name, weight = entry.get("name"), entry.get("weight", 1.0)
        elif isinstance(entry, str):
            name, _, weight = entry.partition(":")
            weight = weight or 1.0
        else:
            name, weight = entry[0], entry[1] if len(entry) > 1 else 1.0
        try:
            found = registry.lora(str(name))
            lora_list.append([str(found.path), found.name, float(weight)])
        except ModelNotFoundError as exc:
            raise JobError(f"loras: {exc}") from None
        except (TypeError, ValueError):
            raise JobError(f"loras: weight {weight!r} of {name!r} is not a number") from None
    try:
        multiplier = float(multiplier)
    except (TypeError, ValueError):
        raise JobError(f"multiplier: {multiplier!r} is not a number") from None
    return MergeJob(a, b, c, interp_method, multiplier, bool(save_as_half), custom_name, checkpoint_format,
                    config_index, vae, discard_weights or "", bool(save_metadata), bool(add_merge_recipe),
                    bool(copy_metadata_fields), dict(metadata_json or {}), weights, lora_list,
                    str(outdir))



class MergeStopped(Exception):
    """A merge job was interrupted (nothing is left behind)."""


def run_merge(spec: MergeJob, registry, progress=None) -> dict:
    """Run a merge job: write the result into its checkpoint folder and list it in ``registry`` at once
    (``/sdapi/v1/sd-models``, the UI). The result names the new checkpoint."""
    from ..models import merge as merger
    from ..models.files import find

    plans: list = []
    models = [m for m in (spec.primary, spec.secondary, spec.tertiary) if m]
    try:
        path = merger.merge(
            spec.primary[0], spec.secondary[0] if spec.secondary else None,
            spec.tertiary[0] if spec.tertiary else None, method=spec.interp_method, multiplier=spec.multiplier,
            fp16=spec.save_as_half, out_path=spec.outdir, fmt=spec.checkpoint_format, custom_name=spec.custom_name,
            bake_vae=spec.bake_in_vae[0] if spec.bake_in_vae else None, discard=spec.discard_weights or None,
            block_weights=spec.block_weights, loras=[(p, w) for p, _, w in spec.loras],
            config_source=spec.config_source, save_metadata=spec.save_metadata,
            add_merge_recipe=spec.add_merge_recipe, copy_metadata=spec.copy_metadata_fields,
            metadata_json=spec.metadata_json, names={Path(m[0]): m[1] for m in models}, sha256=registry.hashes.sha256,
            recipe_names={"bake_in_vae": spec.bake_in_vae[1] if spec.bake_in_vae else "None"},
            progress=progress, plan_out=plans)
    except FileNotFoundError as exc:  # a model file went away while the job waited
        raise ModelNotFoundError(f"{Path(exc.filename or '').name or exc}: no such file") from None
    registry.refresh()
    found = find(registry.checkpoints, str(path.relative_to(spec.outdir)))
    plan = plans[0]
    return {"path": str(path), "filename": path.name, "model_title": found.title if found else path.name,
            "model_name": found.name if found else path.stem, "keys": len(plan.keys),
            "discarded": len(plan.discarded), "warnings": list(plan.notes), "message": f"Checkpoint saved to {path}"}


# the extension's options_overrides that change how the run's video is made -> DeforumRun's options
_DEFORUM_OPTION_NAMES = {"deforum_ffmpeg_crf": "ffmpeg_crf", "deforum_ffmpeg_preset": "ffmpeg_preset"}


def _deforum_outputs(result: dict, out) -> None:
    """A Deforum run's files and warnings in its job's result."""
    result.update({"frames": [str(p) for p in out.frames], "video": str(out.video) if out.video else None,
                   "gif": str(out.gif) if out.gif else None, "settings_file": str(out.settings_file),
                   "interrupted": out.interrupted})
    result["warnings"] = list(dict.fromkeys([*result.get("warnings", []), *out.warnings]))


def _deforum_touch(result: dict, phase: str, started: float | None) -> None:
    """The extension's status bookkeeping in a Deforum job's result: last_updated, updates, phase."""
    now = time.time()
    result["update_interval_time"] = now - result.get("last_updated", started or now)
    result["last_updated"], result["updates"], result["phase"] = now, result.get("updates", 0) + 1, phase


def _next_second(timestring: str) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(time.mktime(time.strptime(timestring, "%Y%m%d%H%M%S")) + 1))


def a1111_info(req: Txt2ImgRequest, result: dict) -> dict:
    """The ``info`` JSON A1111's API returns, from a finished job's request and result."""
    denoising = getattr(req, "denoising_strength", None)
    seeds, subseeds = result.get("all_seeds", []), result.get("all_subseeds", [])
    images = result.get("images", [])
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * len(seeds),
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(seeds),
        "seed": req.seed, "all_seeds": seeds, "subseed": req.subseed, "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height,
        "sampler_name": req.sampler_name, "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": req.batch_size, "restore_faces": req.restore_faces,
        "face_restoration_model": (req.face_restoration_model or None) if req.restore_faces else None,
        "sd_model_name": result.get("model_name"), "sd_model_hash": result.get("model_hash"),
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": req.seed_resize_from_w or -1,
        "seed_resize_from_h": req.seed_resize_from_h or -1, "denoising_strength": denoising,
        "extra_generation_params": {}, "index_of_first_image": len(grid_entries(result)),
        "infotexts": [g["infotext"] for g in grid_entries(result)] + [im["infotext"] for im in images],
        "styles": req.styles, "job_timestamp": result.get("job_timestamp", ""), "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": result.get("inpainting_model", False), "version": "sdstudio", "warnings": result.get("warnings", []),
    }


def _stored_units(records: dict) -> dict:
    """A paused script's finished units (``result["units"]``), read back for its resume."""
    from PIL import Image

    from ..engine.generate import GeneratedImage
    from ..scripts import UnitResult
    from .store import read_output

    units = {}
    for number, images in records.items():
        loaded = []
        for r in images:
            found = read_output(r["path"], r.get("url"))  # another worker's unit: its file, or the store's copy
            if found is None:
                raise FileNotFoundError(f"a finished unit's picture is gone: {r['path']} (the workers need one "
                                        "jobs folder, or an output store)")
            with Image.open(io.BytesIO(found[0])) as f:
                loaded.append(GeneratedImage(f.copy(), r["seed"], r["subseed"], r["infotext"], r.get("grid", False)))
        units[int(number)] = UnitResult(loaded)
    return units


class OutOfMemory(StudioError):
    """A job that ran out of memory (CPU or GPU): the request is too large for this machine (HTTP 413)."""

    kind = TOO_LARGE
    ADVICE = ("try a smaller size or batch, Tiled VAE (tiled_vae), or start the server with --medvram "
              "(or --lowvram) to keep less on the GPU")


def out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA, MPS) or its CPU allocator's failure."""
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in text or "out of memory" in text.lower()


def disk_full(exc: BaseException) -> bool:
    """A write that found no room: a full disk, a quota, a file-size limit."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class JobService:
    def __init__(self, engine, queue: JobQueue, *, resume: bool = False, jobs_dir: Path | None = None,
                 preview_settings: Callable[[], tuple[str, int]] | None = None, studio=None, plugins=None,
                 max_queued: Callable[[], int] | None = None, workers=None, catalog=None, lease: float = 60.0):
        from ..plugins import Plugins
        from ..scripts import Studio

        self.engine = engine
        self.studio = studio or Studio(engine)  # runs the scripts above the engine (its catalog: plug-ins' too)
        self.plugins = plugins or Plugins(catalog=self.studio.catalog)  # what the Extensions tab lists
        # (method, every N steps): "Approx cheap" maps the latent to RGB, "Full" runs the VAE; read per step
        self.preview_settings = preview_settings or (lambda: ("Approx cheap", 1))
        self.queue = queue
        self.max_queued = max_queued or (lambda: 50)  # per client, read at each submit (a setting)
        self.jobs_dir = Path(jobs_dir or engine.paths.cache_dir / "jobs")
        self.changed = threading.Condition()
        self.version = 0  # bumped on every change; waiters compare
        self.live: Live | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a queue shared by several servers: this one's running jobs' lease, renewed every lease / 4 seconds;
        # another server's expired ones are taken over (queued again once); 0: no leases
        self.lease = float(lease)
        self._lease_thread: threading.Thread | None = None
        self.recovered = queue.recover(resume=resume)
        # a WorkerPool (sdstudio.service.workers): jobs run on its workers (Ray actors...) instead of this
        # process's thread; a ModelCatalog: submitted requests are checked against it (no engine asked)
        self.pool, self.catalog = workers, catalog
        self.runners: dict[str, Callable[[Job, Live], None]] = {"txt2img": self._run_generate,
                                                                "img2img": self._run_generate,
                                                                "load": self._run_load,
                                                                "deforum": self._run_deforum,
                                                                "merge": self._run_merge,
                                                                "train": self._run_train,
                                                                "train_lora": self._run_train_lora,
                                                                "train_dreambooth": self._run_train_dreambooth}

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> JobService:
        if self.lease > 0 and self._lease_thread is None:
            self._lease_thread = threading.Thread(target=self._keep_leases, name="sdstudio-lease", daemon=True)
            self._lease_thread.start()
        if self.pool is not None:
            self.pool.start(self)
            return self
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sdstudio-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self.live is not None:
            self.live.interrupted = True
        self._notify()
        if self.pool is not None:
            self.pool.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._lease_thread is not None:
            self._lease_thread.join(timeout)
            self._lease_thread = None

    def _keep_leases(self) -> None:
        """Renew this server's leases; queue again (once) the jobs of servers whose leases ran out."""
        while True:
            try:
                self.queue.renew_leases()
                taken = self.queue.take_over(self.lease)
            except Exception:  # the database away for a moment: the next round tries again
                log.exception("renewing the queue's leases")
                taken = []
            for job_id, status in taken:
                what = "queued again" if status == QUEUED else "failed (its second lost server)"
                log.warning("job %s: the server running it stopped renewing its lease; %s", job_id, what)
            if taken:
                self._notify()
            if self._stop.wait(self.lease / 4):
                return

    def _notify(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    # ---- submitting and waiting -------------------------------------------------------------------
    def submit_load(self, client: str, model: str) -> Job:
        """Queue loading a checkpoint (the UI's checkpoint switch): it loads in its turn, on the worker, so a
        job under way keeps its model, and the next job finds the new one loaded."""
        try:
            title = self.engine.registry.checkpoint(model).title
        except ModelNotFoundError as exc:
            raise JobError(str(exc)) from None
        submitted = self.queue.submit(client, "load", {"model": title})
        self._notify()
        return submitted

    def submit(self, client: str, job: Txt2ImgJob) -> Job:
        """Queue a generation job (an :class:`Img2ImgRequest` makes it an img2img job) for ``client``."""
        try:
            job.request = self.studio.validate(job.request.with_concrete_seeds())
            if self.catalog is not None:
                self.catalog.check(job.request)
        except (RequestError, ModelNotFoundError, ModelFileError) as exc:
            raise JobError(str(exc)) from None
        self._check_room(client)
        data = job.to_dict()
        inputs = self._publish_inputs(job.request)
        if inputs:
            data["inputs"] = inputs
        submitted = self.queue.submit(client, job.kind, data)
        self._notify()
        return submitted

    def prepare_deforum(self, settings, *, options_overrides: dict | None = None, model: str | None = None,
                        batch_id: str | None = None, outdir: str | None = None) -> DeforumJob:
        """A Deforum job from a settings file's text, its parsed dict or a :class:`DeforumSettings`: every key
        checked as the run will read it (a bad one is a :class:`JobError` naming the key), the seed drawn
        now when it is -1 (the saved settings then repeat the run), files named by URL refused."""
        from ..core import deforum as spec
        from ..core.names import UnknownNameError
        from ..scripts.deforum import DeforumRun

        overrides = dict(options_overrides or {})
        try:
            loaded = settings if isinstance(settings, spec.DeforumSettings) else spec.load_settings(settings)
            seed = spec.fixed_seed(int(loaded["seed"]))
            if seed != int(loaded["seed"]):
                loaded = loaded.updated({"seed": seed})
            spec.check_files(loaded)
            DeforumRun(self.studio, loaded, self.engine.paths.outputs_dir, timestring="20000101000000")  # its checks
            model = overrides.get("sd_model_checkpoint") or model
            if model:
                model = self.engine.registry.checkpoint(model).title
        except (RequestError, ModelNotFoundError) as exc:
            raise JobError(str(exc)) from None
        except UnknownNameError as exc:  # the run's sampler
            raise JobError(f"sampler: {exc}") from None
        options = {"ffmpeg_crf": spec.DEFORUM_OPTIONS["deforum_ffmpeg_crf"],
                   "ffmpeg_preset": spec.DEFORUM_OPTIONS["deforum_ffmpeg_preset"]}
        notes = list(loaded.notes)
        for key, value in overrides.items():
            if key in _DEFORUM_OPTION_NAMES:
                options[_DEFORUM_OPTION_NAMES[key]] = value
            elif key != "sd_model_checkpoint":
                notes.append(f"options_overrides: {key} is not used by sdstudio's Deforum runs; ignored")
        if str(options["ffmpeg_preset"]) not in spec.FFMPEG_PRESETS:
            raise JobError(f"deforum_ffmpeg_preset: {options['ffmpeg_preset']!r} is not one of "
                           + ", ".join(spec.FFMPEG_PRESETS))
        try:
            options["ffmpeg_crf"] = int(options["ffmpeg_crf"])
        except (TypeError, ValueError):
            raise JobError(f"deforum_ffmpeg_crf: {options['ffmpeg_crf']!r} is not a whole number") from None
        given = settings.to_dict() if isinstance(settings, spec.DeforumSettings) else \
            (dict(settings) if isinstance(settings, dict) else loaded.to_dict())
        return DeforumJob(loaded.to_dict(), options, model, batch_id, given, overrides, outdir, notes)

    def submit_deforum(self, client: str, job: DeforumJob) -> Job:
        """Queue a Deforum animation (made by :meth:`prepare_deforum`) for ``client``."""
        self._check_room(client)
        submitted = self.queue.submit(client, "deforum", job.to_dict())
        self._notify()
        return submitted

    def prepare_merge(self, **fields) -> MergeJob:
        """A merge job from A1111's merger fields (see :func:`prepare_merge`), into the checkpoint folder."""
        return prepare_merge(self.engine.registry, self.engine.paths.ckpt_dirs[0], **fields)

    def submit_merge(self, client: str, job: MergeJob) -> Job:
        """Queue a checkpoint merge (made by :meth:`prepare_merge`) for ``client``."""
        self._check_room(client)
        submitted = self.queue.submit(client, "merge", job.to_dict())
        self._notify()
        return submitted

    def submit_train(self, client: str, request: dict) -> Job:
        """Queue a training job for ``client`` (``request``: see :func:`sdstudio.training.embedding.run_job`)."""
        self._check_room(client)
        submitted = self.queue.submit(client, "train", request)
        self._notify()
        return submitted

    def prepare_train_lora(self, *, dataset: str, model: str | None = None, output_name: str | None = None,
                           resume: bool = False, dataset_options: dict | None = None,
                           config: dict | None = None) -> dict:
        """A ``train_lora`` job (JSON) after the checks the run would make: the checkpoint exists, the folder
        holds usable images, every option is a :class:`~sdstudio.training.lora.LoraConfig` field or a
        :meth:`TrainingDataset.from_folder` argument, the scheduler is known and the output is a plain name.
        The LoRA goes to models/Lora as ``<output_name>.safetensors`` (default: the folder's name)."""
        import dataclasses

        from ..training import DatasetError, TrainingDataset
        from ..training.lora import SCHEDULERS, LoraConfig

        config = {k: v for k, v in (config or {}).items() if v is not None}
        dataset_options = {k: v for k, v in (dataset_options or {}).items() if v is not None}
        fields = {f.name for f in dataclasses.fields(LoraConfig)} - {"output_dir", "output_name", "save_dtype"}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise JobError(f"unknown LoRA option {unknown[0]!r}")
        if config.get("lr_scheduler", "constant") not in SCHEDULERS:
            raise JobError(f"lr_scheduler: {config['lr_scheduler']!r} is not one of {', '.join(SCHEDULERS)}")
        if config.get("network_module", "networks.lora") != "networks.lora":
            raise JobError(f"network_module: {config['network_module']!r}: only networks.lora is trained here "
                           "(LoCon: set conv_dim)")
        for key in ("network_dim", "max_train_steps", "max_train_epochs", "batch_size", "save_every_n_steps",
                    "conv_dim"):
            if key in config and int(config[key]) < 1:
                raise JobError(f"{key} must be at least 1, got {config[key]}")
        if "learning_rate" in config and float(config["learning_rate"]) <= 0:
            raise JobError("learning_rate must be above 0")
        try:
            title = self.engine.registry.checkpoint(model or None).title
        except ModelNotFoundError as exc:
            raise JobError(str(exc)) from None
        folder = Path(dataset)
        name = output_name or folder.name
        if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise JobError(f"output_name: {name!r} must be a plain file name")
        try:
            ds = TrainingDataset.from_folder(folder, **dataset_options)
        except DatasetError as exc:
            raise JobError(f"dataset: {exc}") from None
        except (TypeError, ValueError, OSError) as exc:  # an unknown option; a name the file system refuses
            raise JobError(f"dataset: {exc}") from None
        return {"model": title, "dataset": {"root": str(folder), **dataset_options}, "output_name": name,
                "resume": bool(resume), "config": config, "images": len(ds.items),
                "skipped_images": [list(s) for s in ds.skipped]}

    def submit_train_lora(self, client: str, job: dict) -> Job:
        """Queue a LoRA training (made by :meth:`prepare_train_lora`) for ``client``."""
        self._check_room(client)
        submitted = self.queue.submit(client, "train_lora", job)
        self._notify()
        return submitted

    def submit_train_dreambooth(self, client: str, job: dict) -> Job:
        """Queue a Dreambooth run (made by :func:`sdstudio.training.dreambooth.prepare_job`) for ``client``."""
        self._check_room(client)
        submitted = self.queue.submit(client, "train_dreambooth", job)
        self._notify()
        return submitted

    def _check_room(self, client: str) -> None:
        limit = int(self.max_queued())
        waiting = self.queue.queued_count(client)
        if waiting >= limit:
            raise QueueFullError(f"this client already has {waiting} jobs waiting in the queue, the most one client "
                                 f"may have (setting sdstudio_max_queued_per_client = {limit}); wait for some to "
                                 f"finish or cancel them")

    def store_inputs(self, images, prefix: str = "init") -> list[str]:
        """Save uploaded pictures (init images, masks) where queued jobs can read them: a job refers to
        files, so it can wait in the queue and survive a restart."""
        import uuid

        folder = self.jobs_dir / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in images:
            path = folder / f"{prefix}-{uuid.uuid4().hex}.png"
            outputs.write_image(image, path, infotext=image.info.get("parameters"))
            paths.append(str(path))
        return paths

    def _publish_inputs(self, req) -> dict[str, str]:
        """With a worker pool and an output store: the request's uploads (init images, mask) copied into the
        store, ``{path: url}``, so a worker on another machine fetches them (:meth:`_fetch_inputs`). ControlNet
        unit images travel inside the request (base64) and need nothing."""
        store = self.pool.store if self.pool is not None else None
        if store is None:
            return {}
        paths = [p for p in [*getattr(req, "init_images", []), getattr(req, "mask", None)] if isinstance(p, str)]
        inputs = (self.jobs_dir / "inputs").resolve()
        return {p: store.put(p, "inputs") for p in paths if Path(p).resolve().parent == inputs and Path(p).is_file()}

    def _fetch_inputs(self, data: dict) -> dict:
        """A generation job's stored request with its uploads on this machine: one this worker does not have
        (the API server's jobs folder is not shared with it) is fetched from its output-store copy into this
        worker's own jobs folder."""
        missing = {p: u for p, u in (data.get("inputs") or {}).items() if not Path(p).is_file()}
        if not missing:
            return data
        from .store import read_output

        folder = self.jobs_dir / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        local = {}
        for path, url in missing.items():
            target = folder / Path(path).name
            if not target.is_file():
                found = read_output(None, url)
                if found is None:
                    raise RequestError(f"the uploaded picture {Path(path).name} is neither on this worker nor in "
                                       f"the output store ({url})")
                partial = target.with_name(target.name + ".part")
                partial.write_bytes(found[0])
                partial.replace(target)
            local[path] = str(target)
        request = dict(data["request"])
        if "init_images" in request:
            request["init_images"] = [local.get(p, p) if isinstance(p, str) else p for p in request["init_images"]]
        if isinstance(request.get("mask"), str):
            request["mask"] = local.get(request["mask"], request["mask"])
        return {**data, "request": request}

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has finished (or ``timeout`` seconds passed); returns its last state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.changed:
                job = self.queue.get(job_id)
                if job is None or job.status in FINISHED:
                    return job
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return job
                self.changed.wait(0.5 if left is None else min(left, 0.5))

    async def wait_async(self, job_id: str, poll: float = 0.05) -> Job:
        """:meth:`wait` for an event loop: no thread is held while the job waits or runs (the queue is read
        only when something changed, at most every ``poll`` seconds)."""
        import asyncio

        seen = None
        while True:
            if self.version != seen:
                seen = self.version
                job = self.queue.get(job_id)
                if job is None or job.status in FINISHED:
                    return job
            await asyncio.sleep(poll)

    async def wait_for_change_async(self, since: int, timeout: float, poll: float = 0.05) -> int:
        """:meth:`wait_for_change` for an event loop: no server thread is held while nothing changes."""
        import asyncio

        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.version == since and loop.time() < end:
            await asyncio.sleep(poll)
        return self.version

    def wait_for_change(self, since: int, timeout: float) -> int:
        with self.changed:
            if self.version == since:
                self.changed.wait(timeout)
            return self.version

    # ---- control ----------------------------------------------------------------------------------
    def interrupt(self, client: str | None) -> list[str]:
        """Stop the caller's running job (its finished images are kept) and end its parked ones."""
        touched = []
        for live in self._lives_of(client):
            live.interrupted = True
            touched.append(live.job.id)
        for job in self.queue.list(client=client, statuses=(QUEUED,), limit=1000):
            if job.batches_done > 0:
                self.queue.finish(job.id, DONE, {**job.result, "interrupted": True})
                touched.append(job.id)
        self._notify()
        return touched

    def skip(self, client: str | None) -> list[str]:
        touched = []
        for live in self._lives_of(client):
            live.skip = True
            touched.append(live.job.id)
        return touched

    def cancel(self, job_id: str, client: str | None) -> Job | None:
        job = self.queue.cancel(job_id, client)
        live = self._live_of(None, job_id)
        if job is not None and live is not None:
            live.interrupted = True
        self._notify()
        return job

    def progress(self, client: str | None, job_id: str | None = None) -> dict:
        """A1111's ``/progress`` fields for the caller's running job (or its next queued one)."""
        live = self._live_of(client, job_id)
        if live is not None:
            return {"progress": live.progress, "eta_relative": live.eta(), "job_id": live.job.id,
                    "state": {"skipped": live.skip, "interrupted": live.interrupted, "job": live.job.kind,
                              "job_count": live.job_count, "job_timestamp": "", "job_no": live.job_no,
                              "sampling_step": live.step, "sampling_steps": live.steps},
                    "queue_position": 0, "textinfo": live.textinfo}
        waiting = [j for j in self.queue.list(client=client, statuses=(QUEUED,), limit=1000)
                   if job_id is None or j.id == job_id]
        position = min((self.queue.position(j.id) for j in waiting), default=-1)
        return {"progress": 0.0, "eta_relative": 0.0, "job_id": waiting[-1].id if waiting else None,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "",
                          "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
                "queue_position": position, "textinfo": f"In queue: {position} ahead" if waiting else None}

    def preview_png(self, client: str | None) -> str | None:
        """The caller's running job's live preview as a base64 PNG, or None."""
        image = self.preview_image(client)
        if image is None:
            return None
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    def preview_image(self, client: str | None, job_id: str | None = None):
        """The caller's running job's live preview (a PIL image), or None."""
        live = self._live_of(client, job_id)
        return live.preview if live is not None else None

    def preview_number(self, job_id: str) -> int | None:
        """How many previews the running job ``job_id`` has made (None: not running or none yet)."""
        live = self._live_of(None, job_id)
        return live.preview_no if live is not None and live.preview is not None else None

    def live_state(self, job_id: str, client: str | None = None) -> Live | None:
        """The live state (step, batch, preview, phase) of the running job ``job_id`` on whichever worker runs
        it, or None when it is not running (with ``client``: only when it is that client's)."""
        return self._live_of(client, job_id)

    def _live_of(self, client: str | None, job_id: str | None) -> Live | None:
        """The running job's live state if it is ``client``'s and ``job_id`` (None: any)."""
        return next((live for live in self._lives_of(client) if job_id is None or live.job.id == job_id), None)

    def _lives_of(self, client: str | None) -> list[Live]:
        """The live state of every running job (``client``'s only, unless None): this process's and the pool's."""
        lives = [self.live] if self.live is not None else []
        if self.pool is not None:
            lives += [live for live in self.pool.lives() if live is not self.live]
        return [live for live in lives if client is None or live.job.client == client]

    def running_jobs(self) -> list[Job]:
        """Every running job (one per busy worker)."""
        return [live.job for live in self._lives_of(None)]

    # ---- the worker -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.queue.claim()
            if job is None:
                with self.changed:
                    self.changed.wait(0.5)
                continue
            self._run(job)

    def _run(self, job: Job, live: Live | None = None) -> None:
        live = live or Live(job)  # a worker pool passes the live state it shows
        self.live = live
        try:
            self._guarded(job, live, self.runners[job.kind])
        finally:
            self.live = None
            self._notify()

    def assemble(self, job: Job, live: Live, queue: JobQueue) -> None:
        """Put a split script job together here from the units its shards made (``job.result["units"]``): the
        script's own run over them, making none, its grid and outputs recorded in ``queue`` (:mod:`.shards`)."""
        self._guarded(job, live, lambda j, lv: self._run_generate(j, lv, queue=queue, make_units=False))

    def _guarded(self, job: Job, live: Live, runner: Callable[[Job, Live], None]) -> None:
        """Run ``job``; whatever it raises fails it with a message naming the problem."""
        self._notify()
        try:
            runner(job, live)
        except (RequestError, ModelNotFoundError, ModelFileError) as exc:
            self._fail(job, exc, str(exc))
        except HookError as exc:  # a script's or plug-in's hook raised: this job fails, naming it
            log.error("job %s: %s\n%s", job.id, exc, traceback.format_exc())
            self.plugins.report(exc.owner, str(exc))
            self._fail(job, exc, f"{exc} (the job was stopped; other jobs go on)")
        except Exception as exc:  # noqa: BLE001 - a bug: the job fails with a message, the worker lives on
            if out_of_memory(exc):  # the request is too large for this machine: said with what helps
                log.warning("job %s ran out of memory: %s", job.id, exc)
                self._fail(job, OutOfMemory(), f"out of memory ({type(exc).__name__}: {exc}); {OutOfMemory.ADVICE}")
            elif disk_full(exc):  # files already written stay; the one being written was a temporary file
                log.error("job %s could not write a file: %s", job.id, exc)
                where = f" {Path(exc.filename).name}" if getattr(exc, "filename", None) else ""
                self._fail(job, exc, f"could not write{where}: {exc.strerror} (the disk is full, or the file is over "
                                     "a size limit); the files written before are kept")
            else:
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                self._fail(job, exc, f"{type(exc).__name__}: {exc}")

    def _fail(self, job: Job, exc: BaseException, message: str) -> None:
        """The job failed: its message, and its error's kind (``result["error_kind"]``) for the API's status."""
        current = self.queue.get(job.id)
        result = {**(current.result if current is not None else {}), "error_kind": kind_of(exc)}
        self.queue.finish(job.id, FAILED, result, error=message)

    def _run_generate(self, job: Job, live: Live, queue: JobQueue | None = None, make_units: bool = True) -> None:
        """A txt2img / img2img job; its writes go to ``queue`` (default the service's). A split script job's
        shard (``unit_range`` in the request, :mod:`.shards`) makes its units only and records them as its
        result; ``make_units=False`` makes none: the script's run over the units the result holds."""
        queue = queue or self.queue
        spec = Txt2ImgJob.from_dict(self._fetch_inputs(job.request), job.kind)
        req = spec.request
        unit_range = job.request.get("unit_range")
        live.job_count, live.steps = req.n_iter, req.steps
        result = {"images": [], "warnings": [], "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
                  **job.result}
        folder = self._folder(job, spec, f"{job.kind}-images")

        def on_progress(p) -> None:
            live.job_no, live.step, live.steps = p.job_no, p.step, p.steps
            method, every = self.preview_settings()
            if p.latent is not None and (p.step % max(1, every) == 0 or p.step == p.steps):
                from ..engine.preview import live_preview

                live.preview = live_preview(method, p)  # Full, TAESD, Approx NN; Approx cheap without their files
                live.preview_no += 1
            self._notify()

        def on_batch(batches_done: int, images) -> None:
            for g in images:
                fmt = spec.samples_format if spec.save_images else "png"
                if g.extra:  # a hook's extra picture (ControlNet's detected map): kept with the job, not an output
                    extras = self.jobs_dir / job.id / "extras"
                    extras.mkdir(parents=True, exist_ok=True)
                    path = extras / f"{len(result.get('extras', []))}.png"
                    outputs.write_image(g.image, path, infotext=None)
                    result.setdefault("extras", []).append({"path": str(path), "label": g.infotext})
                    continue
                if g.grid:  # a script's own grid (X/Y/Z plot...): with the grids, listed before the images
                    grids_folder = outputs.dated_dir(self.engine.paths.outputs_dir, f"{job.kind}-grids") \
                        if spec.save_images and not spec.outdir else folder
                    path = outputs.save_image(g.image, grids_folder, infotext=g.infotext, basename="grid", fmt=fmt)
                    result.setdefault("grids", []).append({"path": str(path), "infotext": g.infotext})
                    result.setdefault("grid", str(path))
                    continue
                path = outputs.save_image(g.image, folder, infotext=g.infotext, suffix=str(g.seed), fmt=fmt)
                result["images"].append({"path": str(path), "seed": g.seed, "subseed": g.subseed,
                                         "infotext": g.infotext})
            queue.save_progress(job.id, batches_done, result)  # after the files are on disk

        def should_skip() -> bool:
            if live.skip:
                live.skip = False
                return True
            return False

        def should_pause() -> bool:
            if queue.others_waiting(job.client):
                live.paused_for_others = True
            return live.paused_for_others

        def on_unit(number: int, images) -> None:  # a script's finished unit, kept for a resume after a pause
            records = []
            folder = self.jobs_dir / job.id / "units"
            folder.mkdir(parents=True, exist_ok=True)
            for k, g in enumerate(images):
                path = folder / f"{number}-{k}.png"
                outputs.write_image(g.image, path, infotext=g.infotext)
                records.append({"path": str(path), "seed": g.seed, "subseed": g.subseed, "infotext": g.infotext,
                                "grid": g.grid})
            result.setdefault("units", {})[str(number)] = records
            if unit_range is not None:  # a shard's progress is its units
                queue.save_progress(job.id, job.batches_done, result)

        out = self.studio.generate(req, on_progress=on_progress, should_stop=lambda: live.interrupted,
                                   should_skip=should_skip, should_pause=should_pause,
                                   first_batch=job.batches_done, on_batch=on_batch, keep_images=False,
                                   units=_stored_units(result.get("units", {})), on_unit=on_unit,
                                   unit_range=tuple(unit_range) if unit_range is not None else None,
                                   make_units=make_units)
        result.update({"all_seeds": out.all_seeds, "all_subseeds": out.all_subseeds, "model_name": out.model_name,
                       "model_hash": out.model_hash, "inpainting_model": out.inpainting_model})
        result["warnings"] = sorted(set(result["warnings"]) | set(out.warnings))
        if unit_range is not None:  # a shard: done when its range is (its units are the result, no outputs)
            result["interrupted"] = out.interrupted
            cancelled = queue.get(job.id).cancel_requested
            queue.finish(job.id, CANCELLED if cancelled else DONE, result, error="cancelled" if cancelled else None)
            return
        if out.paused:
            queue.save_progress(job.id, out.batches_done, result)
            queue.park(job.id)
            return
        if result.pop("units", None):  # only a paused script needs them
            import shutil

            shutil.rmtree(self.jobs_dir / job.id / "units", ignore_errors=True)
        result["interrupted"] = out.interrupted
        if spec.save_images and spec.save_grid and len(result["images"]) > 1 and not result.get("grids"):
            result["grid"] = str(self._grid(result["images"], req, spec, f"{job.kind}-grids"))
        cancelled = queue.get(job.id).cancel_requested
        queue.finish(job.id, CANCELLED if cancelled else DONE, result, error="cancelled" if cancelled else None)

    def deforum_timestring(self, job: Job) -> str:
        """The timestring a Deforum job's run will have (a split job's is chosen before its shards start)."""
        from ..core import deforum as spec

        spec_job = DeforumJob.from_dict(job.request)
        return job.result.get("timestring") or self._deforum_timestring(spec.load_settings(spec_job.settings),
                                                                        spec_job)

    def finish_deforum(self, job: Job, live: Live, queue: JobQueue) -> None:
        """A split Deforum job's end, here, once its shards made every frame (:class:`.shards.FrameRun`): the
        settings file and the video as a whole run makes them, recorded in ``queue``."""
        self._guarded(job, live, lambda j, lv: self._finish_deforum(j, lv, queue))

    def _finish_deforum(self, job: Job, live: Live, queue: JobQueue) -> None:
        from ..core import deforum as spec
        from ..scripts.deforum import DeforumRun

        spec_job = DeforumJob.from_dict(job.request)
        result = dict(job.result)
        live.phase = "POST_PROCESSING"
        run = DeforumRun(self.studio, spec.load_settings(spec_job.settings), self.engine.paths.outputs_dir,
                         outdir=spec_job.outdir, options=spec_job.options, model=spec_job.model,
                         timestring=result["timestring"])
        _deforum_outputs(result, run.finish(result.get("max_frames")))
        _deforum_touch(result, "DONE", job.started)
        cancelled = queue.get(job.id).cancel_requested
        queue.finish(job.id, CANCELLED if cancelled else DONE, result, error="cancelled" if cancelled else None)

    def _deforum_timestring(self, settings, spec_job: DeforumJob) -> str:
        """A new run's timestring: now, moved on a second while another Deforum job holds it or its folder
        already has a run of that name (two jobs started in one second must not share frames)."""
        from ..core import deforum as spec

        if settings["resume_from_timestring"]:
            return spec.run_timestring(settings)
        held = {j.result.get("timestring") for j in self.queue.list(statuses=(QUEUED, RUNNING), limit=10000)
                if j.kind == "deforum"}
        timestring = spec.make_timestring()
        while True:
            batch = spec.format_batch_name(settings, timestring, int(settings["seed"]))
            folder = Path(spec_job.outdir) if spec_job.outdir else self.engine.paths.outputs_dir / "img2img-images" / batch
            if timestring not in held and not (folder / spec.settings_filename(timestring)).exists():
                return timestring
            timestring = _next_second(timestring)

    def _run_deforum(self, job: Job, live: Live) -> None:
        from ..core import deforum as spec
        from ..scripts.deforum import DeforumRun

        spec_job = DeforumJob.from_dict(job.request)
        settings = spec.load_settings(spec_job.settings)
        result = dict(job.result) or {"frames": [], "warnings": list(spec_job.notes), "updates": 0}
        live.phase = "PREPARING"

        def touch(phase: str) -> None:
            _deforum_touch(result, phase, job.started)

        if not result.get("timestring"):
            result["timestring"] = self._deforum_timestring(settings, spec_job)

        def on_frame(p) -> None:
            live.step, live.steps = p.frame, p.frames
            live.phase = "POST_PROCESSING" if p.frame >= p.frames else "GENERATING"
            if p.image is not None:
                live.preview = p.image
                live.preview_no += 1
            result["frames_done"], result["max_frames"] = p.frame, p.frames
            touch(live.phase)
            self.queue.save_progress(job.id, p.frame, result)  # the frame is on disk already
            self._notify()

        def should_pause() -> bool:
            if self.queue.others_waiting(job.client):
                live.paused_for_others = True
            return live.paused_for_others

        # a split run (FrameRun) goes on by frames on one worker too, its frames on disk kept; then its video
        whole_range = spec_job.frame_range is None and result.get("split")
        frame_range = (0, spec.MAX_FRAMES_AT_ALL) if whole_range else spec_job.frame_range
        run = DeforumRun(self.studio, settings, self.engine.paths.outputs_dir, outdir=spec_job.outdir,
                         options=spec_job.options, model=spec_job.model, timestring=result["timestring"],
                         frame_range=frame_range, on_frame=on_frame, should_stop=lambda: live.interrupted,
                         should_pause=should_pause)
        live.job_count, live.steps, live.step = 1, run.max_frames, int(result.get("frames_done", 0))
        result["outdir"], result["max_frames"] = str(run.outdir), run.max_frames
        live.phase = "GENERATING"
        touch("GENERATING")
        self.queue.save_progress(job.id, job.batches_done, result)
        self._notify()
        out = run.run()
        _deforum_outputs(result, out)
        if out.paused:
            touch("GENERATING")
            # by frames: the next frame to make (the frames after it on disk are skipped when it goes on)
            done = result.get("frames_done", job.batches_done) if frame_range else max(1, len(out.frames))
            self.queue.save_progress(job.id, done, result)
            self.queue.park(job.id)
            return
        if whole_range and not out.interrupted:
            _deforum_outputs(result, run.finish(result.get("max_frames")))
        cancelled = self.queue.get(job.id).cancel_requested
        touch("DONE" if not (cancelled or out.interrupted) else result.get("phase", "GENERATING"))
        self.queue.finish(job.id, CANCELLED if cancelled else DONE, result, error="cancelled" if cancelled else None)

    def _run_merge(self, job: Job, live: Live) -> None:
        live.job_count, live.steps = 1, 1

        def progress(done: int, total: int) -> None:
            live.step, live.steps = done, total
            if live.interrupted:
                raise MergeStopped
            if done % 64 == 0 or done == total:
                self._notify()

        try:
            result = run_merge(MergeJob.from_dict(job.request), self.engine.registry, progress)
        except MergeStopped:
            self.queue.finish(job.id, CANCELLED, {"interrupted": True}, error="cancelled")
            return
        self.queue.finish(job.id, DONE, result)

    def _run_train(self, job: Job, live: Live) -> None:
        """Textual inversion / hypernetwork training or creating an embedding (:mod:`sdstudio.training`):
        A1111's textinfo (loss, step, last files) in /progress, interrupt stops it with the file saved."""
        from ..training.embedding import run_job

        live.job_count, live.textinfo = 1, "Initializing training..."
        self._notify()

        def on_progress(p) -> None:
            live.step, live.steps, live.textinfo = p.step, p.total, p.textinfo
            if p.preview is not None:
                live.preview, live.preview_no = p.preview, live.preview_no + 1
            self._notify()

        result = run_job(self.engine, job.request, on_progress=on_progress, should_stop=lambda: live.interrupted)
        self.queue.finish(job.id, DONE, result)

    def _run_train_lora(self, job: Job, live: Live) -> None:
        """A kohya-format LoRA into models/Lora (:func:`sdstudio.training.lora.run_job`: pictures without a
        caption captioned first when asked, sample pictures every N steps) on the engine's device: step, loss
        and ETA in /progress (``textinfo``) and in the job's result as it goes; interrupt (or cancel) saves the
        state, a job with ``resume`` (or one restarted after a crash) carries on from it. The new file is in
        the LoRA list when the job ends."""
        from ..training import DatasetError, TrainingError
        from ..training.lora import run_job

        live.job_count, live.textinfo = 1, "Initializing training..."
        self._notify()
        result = {**job.result, "output_name": job.request["output_name"]}
        on_progress, should_stop = self._train_callbacks(job, live, result)
        try:
            out = run_job(self.engine, job.request, resume=job.batches_done > 0, on_progress=on_progress,
                          should_stop=should_stop, on_text=self._text_setter(live))
        except DatasetError as exc:
            self._fail(job, exc, f"dataset: {exc}")
            return
        except (ModelNotFoundError, TrainingError) as exc:
            self._fail(job, exc, str(exc))
            return
        self._finish_training(job, result, out)

    def _text_setter(self, live: Live) -> Callable[[str], None]:
        """A trainer's ``on_text``: its phase (captioning, class images...) shown in /progress."""
        def on_text(text: str) -> None:
            live.textinfo = text
            self._notify()
        return on_text

    def _finish_training(self, job: Job, result: dict, out: dict) -> None:
        result.update(out)
        result.pop("eta", None)
        cancelled = self.queue.get(job.id).cancel_requested
        self.queue.finish(job.id, CANCELLED if cancelled else DONE, result, error="cancelled" if cancelled else None)

    def _train_callbacks(self, job: Job, live: Live, result: dict):
        """(on_progress, should_stop) of a LoRA / Dreambooth run: step, loss and ETA in /progress (``textinfo``)
        and, once a second, in the job's result; interrupt or cancel stops it."""
        last = {"saved": 0.0}

        def on_progress(p) -> None:
            live.step, live.steps = p.step, p.total
            live.textinfo = f"Step {p.step} of {p.total}, loss {p.loss:.4f}, ETA {p.eta:.0f} s (epoch {p.epoch})"
            result.update(step=p.step, total=p.total, loss=p.loss, eta=p.eta, epoch=p.epoch)
            now = time.time()
            if now - last["saved"] > 1.0 or p.step == p.total:  # the job's result shows it too, once a second
                last["saved"] = now
                self.queue.save_progress(job.id, p.step, result)
            self._notify()

        def should_stop() -> bool:
            if live.interrupted:
                return True
            current = self.queue.get(job.id)
            return current is not None and current.cancel_requested

        return on_progress, should_stop

    def _run_train_dreambooth(self, job: Job, live: Live) -> None:
        """A Dreambooth checkpoint into the checkpoint folder (:func:`sdstudio.training.dreambooth.run_job`): the
        missing class images generated first, then as :meth:`_run_train_lora` (progress, interrupt, resume);
        the checkpoint is in the model list when the job ends."""
        from ..training import DatasetError, TrainingError
        from ..training.dreambooth import run_job

        live.job_count, live.textinfo = 1, "Initializing training..."
        self._notify()
        result = {**job.result, "output_name": job.request["output_name"]}
        on_progress, should_stop = self._train_callbacks(job, live, result)
        try:
            out = run_job(self.engine, job.request, resume=job.batches_done > 0, on_progress=on_progress,
                          should_stop=should_stop, on_text=self._text_setter(live))
        except (DatasetError, TrainingError) as exc:
            self._fail(job, exc, str(exc))
            return
        self._finish_training(job, result, out)

    def _run_load(self, job: Job, live: Live) -> None:
        file, _ = self.engine.load(job.request["model"])
        self.queue.finish(job.id, DONE, {"model_name": file.name, "model_title": file.title})

    def _folder(self, job: Job, spec: Txt2ImgJob, kind: str) -> Path:
        if spec.outdir:
            return Path(spec.outdir)
        if spec.save_images:
            return outputs.dated_dir(self.engine.paths.outputs_dir, kind)
        return self.jobs_dir / job.id

    def _grid(self, images: list[dict], req: Txt2ImgRequest, spec: Txt2ImgJob, kind: str) -> Path:
        from PIL import Image

        pictures = []
        for im in images:
            with Image.open(im["path"]) as f:
                pictures.append(f.convert("RGB"))
        grid = outputs.image_grid(pictures, req.batch_size)
        folder = outputs.dated_dir(self.engine.paths.outputs_dir, kind)
        return outputs.save_image(grid, folder, infotext=images[0]["infotext"], basename="grid",
                                  fmt=spec.samples_format)

    def running_job(self) -> Job | None:
        lives = self._lives_of(None)
        return lives[0].job if lives else None

