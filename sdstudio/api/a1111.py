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

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from ..core import infotext, styles
from ..core.names import SAMPLERS, SCHEDULES
from ..core.outputs import NotAnImageError, read_infotext
from ..core.params import Txt2ImgRequest
from ..models.errors import ModelNotFoundError
from ..models.network_info import network_info
from ..service.jobs import JobError, JobService, Txt2ImgJob, a1111_info
from .common import client_id, decode_image, encode_file, inside


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
    override_settings: dict = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    do_not_save_grid: bool = False
    outpath_samples: str | None = None
    outpath_grids: str | None = None


class PngInfoBody(BaseModel):
    image: str


class OptionsBody(BaseModel):
    model_config = ConfigDict(extra="allow")


def to_request(body: Txt2ImgBody, options: dict) -> Txt2ImgRequest:
    settings = {**options, **body.override_settings}
    return Txt2ImgRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, styles=list(body.styles), seed=body.seed,
        subseed=body.subseed,
        subseed_strength=body.subseed_strength, seed_resize_from_w=max(body.seed_resize_from_w, 0),
        seed_resize_from_h=max(body.seed_resize_from_h, 0),
        sampler_name=body.sampler_name or body.sampler_index or "Euler", scheduler=body.scheduler or "Automatic",
        batch_size=body.batch_size, n_iter=body.n_iter, steps=body.steps, cfg_scale=body.cfg_scale,
        width=body.width, height=body.height, tiling=bool(body.tiling), eta=body.eta, s_churn=body.s_churn,
        s_tmin=body.s_tmin, s_tmax=body.s_tmax if body.s_tmax is not None else float("inf"), s_noise=body.s_noise,
        clip_skip=int(settings.get("CLIP_stop_at_last_layers", 1)), rng=settings.get("randn_source", "GPU"),
        emphasis=settings.get("emphasis", "Original"),
        eta_noise_seed_delta=int(settings.get("eta_noise_seed_delta", 0)),
        model=settings.get("sd_model_checkpoint") or None, vae=settings.get("sd_vae", "Automatic"),
    )


def txt2img_job(body: Txt2ImgBody, options: dict, outputs_dir) -> Txt2ImgJob:
    """The queue job an A1111 txt2img request asks for; bad fields are an HTTP 4xx naming them."""
    try:
        req = to_request(body, options)
    except (TypeError, ValueError) as exc:
        raise HTTPException(422, f"override_settings: {exc}") from None
    outdir = inside(outputs_dir, body.outpath_samples, "outpath_samples")
    inside(outputs_dir, body.outpath_grids, "outpath_grids")
    settings = {**options, **body.override_settings}
    return Txt2ImgJob(req, save_images=body.save_images, save_grid=not body.do_not_save_grid,
                      samples_format=str(settings.get("samples_format", "png")),
                      outdir=str(outdir) if outdir else None)


def check_models(engine, req: Txt2ImgRequest) -> None:
    """Unknown checkpoint or VAE: 404 at once, before the job waits in the queue."""
    try:
        file = engine.registry.checkpoint(req.model)
        engine.registry.vae_for(file, req.vae)
    except ModelNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None


def run_blocking(service: JobService, client: str, job: Txt2ImgJob, body: Txt2ImgBody) -> dict:
    """Submit, wait, answer as A1111 does: ``{images, parameters, info}``."""
    check_models(service.engine, job.request)
    try:
        submitted = service.submit_txt2img(client, job)
    except JobError as exc:
        raise HTTPException(422, str(exc)) from None
    done = service.wait(submitted.id)
    if done.status == "failed":
        status = 404 if "no checkpoint named" in (done.error or "") else 500
        raise HTTPException(status, done.error or "the job failed")
    result = done.result
    req = Txt2ImgRequest.from_dict(done.request["request"])
    info = a1111_info(req, result)
    paths = ([result["grid"]] if result.get("grid") else []) + [im["path"] for im in result.get("images", [])]
    images = [encode_file(p) for p in paths] if body.send_images else []
    return {"images": images, "parameters": body.model_dump(), "info": json.dumps(info, ensure_ascii=False)}


UPSCALERS = ("None", "Lanczos", "Nearest")
LATENT_UPSCALE_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)")


def make_router(service: JobService, options: dict, cmd_flags: dict) -> APIRouter:
    engine = service.engine
    r = APIRouter(prefix="/sdapi/v1")

    def model_entry(m) -> dict:
        return {"title": m.title, "model_name": m.name, "hash": m.short_hash, "sha256": m.sha256,
                "filename": str(m.path), "config": None}

    @r.post("/txt2img")
    def txt2img(body: Txt2ImgBody, request: Request):
        job = txt2img_job(body, options, engine.paths.outputs_dir)
        return run_blocking(service, client_id(request), job, body)

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

    @r.get("/options")
    def get_options():
        return options

    @r.post("/options")
    def set_options(body: OptionsBody):
        values = body.model_dump()
        if "sd_model_checkpoint" in values:
            try:
                values["sd_model_checkpoint"] = engine.registry.checkpoint(values["sd_model_checkpoint"]).title
            except ModelNotFoundError as exc:
                raise HTTPException(404, str(exc)) from None
        options.update(values)  # the defaults of later jobs; a queued or running job keeps its own

    @r.get("/cmd-flags")
    def get_cmd_flags():
        return cmd_flags

    @r.get("/samplers")
    def samplers():
        return [{"name": s.label, "aliases": list(s.aliases), "options": {"scheduler": s.scheduler}} for s in SAMPLERS]

    @r.get("/schedulers")
    def schedulers():
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None} for s in SCHEDULES]

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
        widths = []
        if engine.registry.checkpoints:
            _, current = engine.load(None)
            widths = [te.config["hidden_size"] for te in current.spec.text_encoders]
        usable = engine.embeddings.usable(widths) if widths else {}

        def entry(e):
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": int(e.vectors[0].shape[-1]), "vectors": e.count}

        everything = {name: engine.embeddings.get(name) for name in engine.embeddings.names()}
        return {"loaded": {n: entry(e) for n, e in everything.items() if n in usable},
                "skipped": {n: entry(e) for n, e in everything.items() if n not in usable}}

    @r.get("/upscalers")
    def upscalers():
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for n in UPSCALERS]

    @r.get("/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": n} for n in LATENT_UPSCALE_MODES]

    @r.get("/face-restorers")
    def face_restorers():
        return []  # none installed until GFPGAN/CodeFormer weights are supported

    @r.get("/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @r.get("/script-info")
    def script_info():
        return []

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
        return {"ram": ram, "cuda": cuda, "platform": platform.platform()}

    @r.post("/interrogate")
    def interrogate():
        raise HTTPException(404, "no interrogator installed: CLIP/BLIP and DeepBooru weights are not supported yet")

    @r.get("/prompt-styles")
    def prompt_styles():
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in styles.load(engine.paths.styles_file).values()]

    return r
