"""A1111-compatible routes under ``/sdapi/v1``: field names, shapes and status codes as A1111's.

Generation routes submit a job to the queue and wait for it, as A1111's blocking API does; the job
belongs to the caller (see :func:`~sdstudio.api.common.client_id`), so ``/progress``, ``/interrupt``
and ``/skip`` act on the caller's own job, never on another client's. ``override_settings`` are part
of the job: the model, VAE and options of one request never change under another.
"""

from __future__ import annotations

import json
import os
import platform
import re

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..core import infotext, styles
from ..core.errors import http_status
from ..core.names import LATENT_UPSCALE_MODES, get_sampler, get_schedule, sampler_labels, schedule_labels
from ..core.outputs import NotAnImageError, png_base64, read_infotext
from ..core.params import Img2ImgRequest, RequestError, Txt2ImgRequest, option_fields
from ..core.scripts import ScriptCatalog, ScriptError
from ..core.settings import SettingError, Settings, eta_for
from ..engine import extras
from ..engine.extras import ExtrasRequest
from ..models.errors import ModelFileError, ModelNotFoundError
from ..models.network_info import network_info
from ..service.jobs import JobError, JobService, Txt2ImgJob, a1111_info, grid_paths
from ..service.queue import QUEUED
from .common import client_id, decode_image, encode_file, inside, server_file


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None
    s_noise: float = 1.0
    s_min_uncond: float | None = None  # A1111's top-level NGMS (beats the setting when given)
    override_settings: dict = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    do_not_save_grid: bool = False
    outpath_samples: str | None = None
    outpath_grids: str | None = None
    tiled_vae: bool = False  # sdstudio: decode in tiles (big images in little memory)
    script_name: str | None = None
    script_args: list | dict = Field(default_factory=list)  # A1111's positional list, or our dict
    alwayson_scripts: dict = Field(default_factory=dict)  # {"soft inpainting": {"args": [...]}} (img2img)
    distilled_cfg_scale: float = 3.5  # Forge's: Flux.1 dev's distilled guidance
    refiner_checkpoint: str | None = None  # A1111's refiner: "" / None / "None" for none
    refiner_switch_at: float | None = None  # None: the UI's default, 0.8
    # Hires. fix (txt2img)
    enable_hr: bool = False
    denoising_strength: float | None = None
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class ExtrasBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str = ""
    resize_mode: int = 0  # 0: scale by upscaling_resize, 1: to upscaling_resize_w x upscaling_resize_h
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchBody(ExtrasBody):
    imageList: list[FileData] = Field(default_factory=list)  # A1111 spells it so


class PngInfoBody(BaseModel):
    image: str


class InterrogateBody(BaseModel):
    image: str
    model: str = "clip"  # or "deepdanbooru"


class OptionsBody(BaseModel):
    model_config = ConfigDict(extra="allow")


def setting(settings: dict, key: str, default, convert=lambda v: v):
    """One option from ``override_settings`` (else the server's options), converted; a value that cannot
    be is a 422 naming the key."""
    value = settings.get(key, default)
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise HTTPException(422, f"override_settings: {key} = {value!r} is not usable ({exc})") from None


def _hires_fields(body: Txt2ImgBody) -> dict:
    """A1111's hires parameters ("Use same sampler"/"Use same scheduler" mean the first pass's)."""
    same = ("", "Use same sampler", "Use same scheduler")
    return {"enable_hr": body.enable_hr, "hr_scale": body.hr_scale, "hr_upscaler": body.hr_upscaler or "Latent",
            "hr_second_pass_steps": body.hr_second_pass_steps, "hr_resize_x": body.hr_resize_x,
            "hr_resize_y": body.hr_resize_y,
            "hr_sampler_name": "" if (body.hr_sampler_name or "") in same else body.hr_sampler_name,
            "hr_scheduler": "" if (body.hr_scheduler or "") in same else body.hr_scheduler,
            "hr_prompt": body.hr_prompt, "hr_negative_prompt": body.hr_negative_prompt, "hr_cfg": body.hr_cfg,
            **({"denoising_strength": body.denoising_strength} if body.denoising_strength is not None else {})}


def to_request(body: Txt2ImgBody, options: dict, request_type=Txt2ImgRequest, **more) -> Txt2ImgRequest:
    settings = {**options, **body.override_settings}
    sampler = body.sampler_name or body.sampler_index or "Euler"
    try:
        eta = eta_for(settings, sampler, body.eta)
    except SettingError as exc:
        raise HTTPException(422, f"override_settings: {exc}") from None
    if request_type is Txt2ImgRequest:
        more = {**_hires_fields(body), **more}
    return request_type(**more, tiled_vae=bool(body.tiled_vae),
        prompt=body.prompt, negative_prompt=body.negative_prompt, styles=list(body.styles), seed=body.seed,
        subseed=body.subseed,
        subseed_strength=body.subseed_strength, seed_resize_from_w=max(body.seed_resize_from_w, 0),
        seed_resize_from_h=max(body.seed_resize_from_h, 0),
        sampler_name=sampler, scheduler=body.scheduler or "Automatic",
        batch_size=body.batch_size, n_iter=body.n_iter, steps=body.steps, cfg_scale=body.cfg_scale,
        width=body.width, height=body.height, tiling=bool(body.tiling),
        restore_faces=bool(body.restore_faces), face_restoration_model=settings.get("face_restoration_model", ""),
        code_former_weight=setting(settings, "code_former_weight", 0.5, float), eta=eta, s_churn=body.s_churn,
        s_tmin=body.s_tmin, s_tmax=body.s_tmax or float("inf"), s_noise=body.s_noise,
        clip_skip=setting(settings, "CLIP_stop_at_last_layers", 1, int), rng=settings.get("randn_source", "GPU"),
        emphasis=settings.get("emphasis", "Original"),
        eta_noise_seed_delta=setting(settings, "eta_noise_seed_delta", 0, int),
        uni_pc_variant=setting(settings, "uni_pc_variant", "bh1", str),
        uni_pc_skip_type=setting(settings, "uni_pc_skip_type", "time_uniform", str),
        uni_pc_order=setting(settings, "uni_pc_order", 3, int),
        uni_pc_lower_order_final=setting(settings, "uni_pc_lower_order_final", True, bool),
        model=settings.get("sd_model_checkpoint") or None, vae=settings.get("sd_vae", "Automatic"),
        distilled_cfg_scale=body.distilled_cfg_scale, refiner_checkpoint=body.refiner_checkpoint or "",
        refiner_switch_at=0.8 if body.refiner_switch_at is None else body.refiner_switch_at,
        **{**_options(settings), **({"s_min_uncond": body.s_min_uncond} if body.s_min_uncond is not None else {})},
    )


def _options(settings: dict) -> dict:
    try:
        return option_fields(settings)
    except SettingError as exc:
        raise HTTPException(422, f"override_settings: {exc}") from None


PENDING_UPLOAD = "(upload)"


def script_fields(body: Txt2ImgBody, catalog: ScriptCatalog, upscaler_names: list[str], kind: str) -> dict:
    """``script_name`` (matched without regard to case, as A1111 does) and its arguments as our dict, and
    the ``alwayson_scripts`` (``{title: {"args": [...]}}``, positional as A1111's, or our dict): an always-on
    script with request fields (soft inpainting) sets them, the others go to ``alwayson_scripts``."""
    out: dict = {}
    context = {"upscalers": upscaler_names}
    if body.script_name:
        try:
            script = catalog.get(body.script_name, kind, alwayson=False)
        except ScriptError:
            raise HTTPException(422, f"script_name: {body.script_name!r} is not a {kind} script here; "
                                     f"available: {', '.join(catalog.names_for(kind))}") from None
        try:
            args = catalog.parse(script.name, body.script_args, kind) if isinstance(body.script_args, dict) else \
                catalog.from_a1111_list(script.name, body.script_args, context, kind)
        except ScriptError as exc:
            raise HTTPException(422, f"script_args: {exc}") from None
        out.update(script_name=script.name, script_args=dict(args))
    alwayson: dict[str, dict] = {}
    for key, entry in body.alwayson_scripts.items():
        try:
            script = catalog.get(key, kind, alwayson=True)
        except ScriptError as exc:
            raise HTTPException(422, f"alwayson_scripts: {exc}") from None
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        positions = [p.a1111 for p in script.params if p.a1111 is not None]
        if isinstance(args, list) and script.from_a1111 is None and len(args) > max(positions, default=-1) + 1:
            raise HTTPException(422, f"alwayson_scripts: {key} takes up to {len(positions)} args: "
                                     + ", ".join(p.name for p in script.params if p.a1111 is not None))
        if isinstance(args, dict) and script.enabled is not None:
            args = {script.enabled: True, **args}  # named in alwayson_scripts with our dict: on unless told
        try:
            parsed = catalog.parse(script.name, args, kind) if isinstance(args, dict) else \
                catalog.from_a1111_list(script.name, args, context, kind)
        except ScriptError as exc:
            raise HTTPException(422, f"alwayson_scripts: {key}: {exc}") from None
        if script.request_fields:
            out.update(parsed)
        else:
            alwayson[script.name] = dict(parsed)
    if alwayson:
        out["alwayson_scripts"] = alwayson
    return out


def img2img_request(body: Img2ImgBody, options: dict, upscaler_names: list[str], catalog: ScriptCatalog
                    ) -> tuple[Img2ImgRequest, list, object]:
    """A1111's img2img fields, and the decoded uploads (stored by :func:`store_uploads` once the request
    has passed every check, so a refused request leaves no files behind)."""
    if not body.init_images:
        raise HTTPException(422, "init_images: img2img needs at least one init image")
    if len(body.init_images) > 64:
        raise HTTPException(413, "init_images: at most 64 images per request")
    inits = [decode_image(b64, f"init_images[{i}]") for i, b64 in enumerate(body.init_images)]
    mask = decode_image(body.mask, "mask") if body.mask else None
    settings = {**options, **body.override_settings}
    blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
    noise = body.initial_noise_multiplier
    req = to_request(
        body, options, Img2ImgRequest, init_images=[PENDING_UPLOAD] * len(inits),
        mask=PENDING_UPLOAD if mask is not None else None,
        denoising_strength=0.75 if body.denoising_strength is None else body.denoising_strength,
        resize_mode=body.resize_mode, mask_blur=blur, inpainting_fill=body.inpainting_fill,
        inpaint_full_res=body.inpaint_full_res, inpaint_full_res_padding=body.inpaint_full_res_padding,
        inpainting_mask_invert=body.inpainting_mask_invert,
        initial_noise_multiplier=setting(settings, "initial_noise_multiplier", 1.0, float) if noise is None else noise,
        inpainting_mask_weight=setting(settings, "inpainting_mask_weight", 1.0, float),
        fix_steps=setting(settings, "img2img_fix_steps", False, bool),
        **script_fields(body, catalog, upscaler_names, "img2img"))
    return req, inits, mask


def store_uploads(service: JobService, job: Txt2ImgJob, inits: list, mask) -> None:
    """Write the checked request's uploads where the queued job reads them (it may wait, or outlive a restart)."""
    job.request = job.request.replace(
        init_images=service.store_inputs(inits),
        mask=service.store_inputs([mask], "mask")[0] if mask is not None else None)


def check_limits(req: Txt2ImgRequest, limits: dict | None) -> None:
    """The server's own limits (``--limit-steps``, ``--limit-pixels``, ``--limit-images``): 422 naming them."""
    if not limits:
        return
    if req.steps > limits["steps"]:
        raise HTTPException(422, f"steps: {req.steps} is over this server's limit of {limits['steps']} (--limit-steps)")
    if req.width * req.height > limits["pixels"]:
        raise HTTPException(422, f"width x height: {req.width}x{req.height} is over this server's limit of "
                                 f"{limits['pixels']} pixels (--limit-pixels)")
    if req.n_iter * req.batch_size > limits["images"]:
        raise HTTPException(422, f"n_iter x batch_size: {req.n_iter * req.batch_size} images is over this server's "
                                 f"limit of {limits['images']} (--limit-images)")


def queue_job(body: Txt2ImgBody, req: Txt2ImgRequest, options: dict, service: JobService, limits=None,
              request: Request | None = None) -> Txt2ImgJob:
    """The queue job an A1111 txt2img or img2img request asks for, checked before it may wait in the
    queue: bad fields, the server's limits, paths and unknown models are an HTTP 4xx naming them. The server
    folders its scripts name (ControlNet's batch folders) may be anywhere for a caller on this machine, only
    inside the data dir for one from the network (``request``: who asks; None: an in-process caller)."""
    engine = service.engine
    try:
        req = service.studio.validate(req)
        named = service.studio.server_paths(req)
    except RequestError as exc:
        raise HTTPException(422, str(exc)) from None
    if request is not None:
        for field, path in named.items():
            server_file(request, engine.paths.data_dir, path, field)
    check_limits(req, limits)
    outdir = inside(engine.paths.outputs_dir, body.outpath_samples, "outpath_samples")
    inside(engine.paths.outputs_dir, body.outpath_grids, "outpath_grids")
    check_models(service, req)
    settings = {**options, **body.override_settings}
    return Txt2ImgJob(req, save_images=body.save_images, save_grid=not body.do_not_save_grid,
                      samples_format=str(settings.get("samples_format", "png")),
                      outdir=str(outdir) if outdir else None)


def check_models(service: JobService, req: Txt2ImgRequest) -> None:
    """Unknown checkpoint, VAE or Hires. fix upscaler: 404 at once, before the job waits in the queue."""
    engine = service.engine
    try:
        file = engine.registry.checkpoint(req.model)
        engine.registry.vae_for(file, req.vae)
        if req.enable_hr and req.hr_upscaler not in LATENT_UPSCALE_MODES:
            engine.upscalers.get(req.hr_upscaler)
        if req.restore_faces:
            engine.faces.check(req.face_restoration_model)
        service.studio.precheck(req)
    except (RequestError, ModelNotFoundError) as exc:
        raise HTTPException(http_status(exc), str(exc)) from None


def submit(service: JobService, client: str, job: Txt2ImgJob):
    try:
        return service.submit(client, job)
    except JobError as exc:  # 422 for a bad request, 429 when the client's queue is full
        raise HTTPException(http_status(exc.kind), str(exc)) from None


async def run_blocking(service: JobService, client: str, prepare, body: Txt2ImgBody, options: dict | None = None,
                       request: Request | None = None) -> dict:
    """A1111's blocking call: check and queue (``prepare()`` -> the job, in the thread pool), wait without
    holding a thread (any number of clients may wait; the other routes keep answering), then answer as A1111
    does: ``{images, parameters, info}``.

    A client that hangs up while its job still waits in the queue has its job cancelled (A1111 clients retry
    on a timeout; orphans must not pile up); a job already running finishes and keeps its images. A body with
    ``"sdstudio_keep_on_disconnect": true`` keeps its job either way."""
    import asyncio

    submitted = await run_in_threadpool(lambda: submit(service, client, prepare()))
    keep = bool((body.model_extra or {}).get("sdstudio_keep_on_disconnect", False))
    waiting = asyncio.ensure_future(service.wait_async(submitted.id))
    while not waiting.done():
        await asyncio.wait({waiting}, timeout=0.5)
        if waiting.done() or keep or request is None or not await request.is_disconnected():
            continue
        job = service.queue.get(submitted.id)
        if job is not None and job.status == QUEUED:
            service.cancel(submitted.id, None)
            waiting.cancel()
            return {"images": [], "parameters": {}, "info": "cancelled: the client disconnected"}
        keep = True  # running: it finishes for the outputs folder; nobody reads this answer
    return await run_in_threadpool(answer, waiting.result(), body, options)


def detected_map_paths(result: dict, settings: dict) -> list[str]:
    """The job's ControlNet detected maps (``result["extras"]``), which the extension appends after the images
    unless "Do not append detectmap to output" (``control_net_no_detectmap``) is on; a unit with
    ``save_detected_map`` false left its map out already."""
    if str(settings.get("control_net_no_detectmap", False)).strip().lower() in ("true", "1", "yes"):
        return []
    return [extra["path"] for extra in result.get("extras", [])]


def answer(done, body: Txt2ImgBody, options: dict | None = None) -> dict:
    if done.status == "failed":  # the status its error's kind says (core.errors), as if refused at once
        raise HTTPException(http_status(done.result.get("error_kind")), done.error or "the job failed")
    result = done.result
    req = Txt2ImgJob.from_dict(done.request, done.kind).request
    info = a1111_info(req, result)
    paths = grid_paths(result) + [im["path"] for im in result.get("images", [])]
    paths += detected_map_paths(result, {**(options or {}), **body.override_settings})
    images = [encode_file(p) for p in paths] if body.send_images else []
    if getattr(body, "include_init_images", False) and body.send_images:
        images += list(body.init_images)
    return {"images": images, "parameters": body.model_dump(), "info": json.dumps(info, ensure_ascii=False)}


def extras_request(body: ExtrasBody) -> ExtrasRequest:
    return ExtrasRequest(scale=body.upscaling_resize, crop=body.upscaling_crop,
                         resize_to=(body.upscaling_resize_w, body.upscaling_resize_h) if body.resize_mode == 1 else None,
                         upscaler_1=body.upscaler_1, upscaler_2=body.upscaler_2,
                         upscaler_2_visibility=min(1.0, max(0.0, body.extras_upscaler_2_visibility)),
                         gfpgan_visibility=body.gfpgan_visibility, codeformer_visibility=body.codeformer_visibility,
                         codeformer_weight=body.codeformer_weight)


def extras_upscale(image, body: ExtrasBody, engine):
    # an unknown upscaler (404), a bad field or an unusable file (422): the server maps our errors' kinds
    return extras.run(image, extras_request(body), engine.upscalers, engine.faces)


def _scale_from_name(name: str) -> float:
    """A1111 guesses a model upscaler's scale from its name (``4x-UltraSharp``, ``RealESRGAN_x2plus``)."""
    found = re.search(r"(?:^|[^0-9])([1-8])x|x([1-8])(?:[^0-9]|$)", name)
    return float(found.group(1) or found.group(2)) if found else 4.0



def make_router(service: JobService, settings: Settings, cmd_flags: dict, limits: dict | None = None) -> APIRouter:
    engine = service.engine
    catalog = service.studio.catalog
    options = settings.values
    r = APIRouter(prefix="/sdapi/v1")

    def model_entry(m) -> dict:
        return {"title": m.title, "model_name": m.name, "hash": m.short_hash, "sha256": m.sha256,
                "filename": str(m.path), "config": None}

    @r.post("/txt2img")
    async def txt2img(body: Txt2ImgBody, request: Request):
        def prepare():
            req = to_request(body, options, **script_fields(body, catalog, [], "txt2img"))
            return queue_job(body, req, options, service, limits, request)

        return await run_blocking(service, client_id(request), prepare, body, options, request)

    @r.post("/img2img")
    async def img2img(body: Img2ImgBody, request: Request):
        def prepare():
            upscalers = [u.name for u in engine.upscalers.available()]
            req, inits, mask = img2img_request(body, options, upscalers, catalog)
            job = queue_job(body, req, options, service, limits, request)
            store_uploads(service, job, inits, mask)
            return job

        return await run_blocking(service, client_id(request), prepare, body, options, request)

    @r.post("/extra-single-image")
    def extra_single_image(body: ExtrasBody):
        return {"html_info": "", "image": png_base64(extras_upscale(decode_image(body.image), body, engine))}

    @r.post("/extra-batch-images")
    def extra_batch_images(body: ExtrasBatchBody):
        if len(body.imageList) > 256:
            raise HTTPException(413, "imageList: at most 256 images per request")
        images = [decode_image(item.data, f"imageList[{i}]") for i, item in enumerate(body.imageList)]
        return {"html_info": "", "images": [png_base64(extras_upscale(im, body, engine)) for im in images]}

    @r.post("/png-info")
    def png_info(body: PngInfoBody):
        image = decode_image(body.image)
        try:
            text = read_infotext(image)
        except NotAnImageError as exc:
            raise HTTPException(422, str(exc)) from None
        parsed = infotext.parse(text) if text else {}
        return {"info": text or "", "items": {"parameters": text} if text else {}, "parameters": parsed}

    @r.get("/progress")
    def progress(request: Request, skip_current_image: bool = False):
        """The caller's job: its step and ETA, or its place in the queue; a live preview when enabled."""
        client = client_id(request)
        out = service.progress(client)
        show = options.get("live_previews_enable", True) and not skip_current_image
        out["current_image"] = service.preview_png(client) if show else None
        return out

    @r.post("/interrupt")
    def interrupt(request: Request):
        return {"interrupted": service.interrupt(client_id(request))}

    @r.post("/skip")
    def skip(request: Request):
        return {"skipped": service.skip(client_id(request))}

    # the status and listing routes below only read memory: run on the event loop, never queued behind the
    # thread pool's blocking handlers (issue 17's soak: /options p99 289 ms as a thread-pool route)
    @r.get("/options")
    async def get_options():
        return dict(options)  # a copy: a POST /options may update it meanwhile

    @r.post("/options")
    def set_options(body: OptionsBody):
        try:  # the defaults of later jobs (a queued or running job keeps its own), saved to config.json
            settings.update(body.model_dump())
        except ModelNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except SettingError as exc:
            raise HTTPException(422, str(exc)) from None

    @r.get("/cmd-flags")
    async def get_cmd_flags():
        return cmd_flags

    @r.get("/samplers")
    async def samplers():
        return [{"name": s.label, "aliases": list(s.aliases), "options": {"scheduler": s.scheduler}}
                for s in map(get_sampler, sampler_labels())]  # plug-ins' samplers too

    @r.get("/schedulers")
    async def schedulers():
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None}
                for s in map(get_schedule, schedule_labels())]

    @r.get("/sd-models")
    def sd_models():
        return [model_entry(m) for m in engine.registry.checkpoints]

    @r.get("/sd-vae")
    def sd_vae():
        return [{"model_name": v.name, "filename": str(v.path)} for v in engine.registry.vaes]

    @r.post("/refresh-checkpoints")
    def refresh_checkpoints():
        engine.registry.refresh()

    @r.post("/refresh-vae")
    def refresh_vae():
        engine.registry.refresh()

    @r.post("/refresh-loras")
    def refresh_loras():
        engine.registry.refresh()

    @r.post("/refresh-embeddings")
    def refresh_embeddings():
        engine.embeddings.refresh()

    @r.get("/loras")
    def loras():
        """A1111's fields (name, alias, path, metadata) plus trigger words, preferred weight and preview."""
        out = []
        for m in engine.registry.loras:
            info = network_info(m.path)
            out.append({"name": m.name, "alias": info.alias, "path": str(m.path), "metadata": info.metadata,
                        "trigger_words": info.trigger_words, "preferred_weight": info.preferred_weight,
                        "preview": str(info.preview) if info.preview else None})
        return out

    @r.get("/hypernetworks")
    def hypernetworks():
        return [{"name": m.name, "path": str(m.path)} for m in engine.registry.hypernetworks]

    @r.get("/embeddings")
    def embeddings():
        """A1111's shape: embeddings that fit the current model are "loaded", the others "skipped"."""
        from ..models.detect import detect
        from ..models.safe_load import open_state_dict

        widths = []
        if engine.registry.checkpoints:  # the default model's text encoders, read from the file header only
            file = engine.registry.checkpoint(options.get("sd_model_checkpoint"))
            try:
                spec = detect(open_state_dict(file.path).shapes)
            except (ModelFileError, OSError, ValueError):  # e.g. a diffusers folder: load it
                spec = engine.load(file.name)[1].spec
            widths = [te.config["hidden_size"] for te in spec.text_encoders]
        usable = engine.embeddings.usable(widths) if widths else {}

        def entry(e):
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": int(e.vectors[0].shape[-1]), "vectors": e.count}

        everything = {name: engine.embeddings.get(name) for name in engine.embeddings.names()}
        return {"loaded": {n: entry(e) for n, e in everything.items() if n in usable},
                "skipped": {n: entry(e) for n, e in everything.items() if n not in usable}}

    @r.get("/upscalers")
    def upscalers():
        return [{"name": u.name, "model_name": u.path.stem if u.path else None,
                 "model_path": str(u.path) if u.path else None, "model_url": None,
                 "scale": _scale_from_name(u.name)} for u in engine.upscalers.available()]

    @r.get("/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": n} for n in LATENT_UPSCALE_MODES]

    @r.get("/face-restorers")
    def face_restorers():
        return [{"name": name, "cmd_dir": str(engine.faces.folders[name])} for name in engine.faces.available()]

    @r.get("/scripts")
    def scripts():
        return catalog.a1111_scripts()

    @r.get("/script-info")
    def script_info():
        from ..core.xyz import axis_names

        return catalog.a1111_script_info({"upscalers": [u.name for u in engine.upscalers.available()],
                                          "xyz axes": axis_names("txt2img", catalog.axes())})

    @r.get("/extensions")
    def extensions():
        return [info.to_a1111() for info in service.plugins.infos]

    @r.get("/memory")
    def memory():
        import torch

        ram = {"error": "unknown"}
        try:
            pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            avail = os.sysconf("SC_AVPHYS_PAGES") * size
            ram = {"free": avail, "used": pages * size - avail, "total": pages * size}
        except (ValueError, OSError, AttributeError):
            pass
        cuda = {"error": "unavailable"}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            cuda = {"system": {"free": free, "used": total - free, "total": total},
                    "active": {"current": stats.get("active_bytes.all.current", 0),
                               "peak": stats.get("active_bytes.all.peak", 0)}}
        plan = engine.plan  # sdstudio: where the model runs and in which precision (and why)
        device = {"type": plan.device.type, "dtype": str(plan.dtype).removeprefix("torch."),
                  "vae_dtype": str(plan.vae_dtype).removeprefix("torch."), "reason": plan.reason,
                  "description": plan.describe()}
        return {"ram": ram, "cuda": cuda, "platform": platform.platform(), "device": device}

    @r.post("/interrogate")
    def interrogate(body: InterrogateBody):
        image = decode_image(body.image, "image")
        return {"caption": engine.interrogators.interrogate(image, body.model)}  # errors: by their kind

    @r.get("/prompt-styles")
    def prompt_styles():
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in styles.load(engine.paths.styles_file).values()]

    return r
