"""A1111-compatible routes under ``/sdapi/v1``: field names, shapes and status codes as A1111's.

This issue's subset: txt2img, png-info, progress, interrupt, options, cmd-flags, samplers, schedulers,
sd-models, sd-vae, refresh-checkpoints. Requests become a :class:`Txt2ImgRequest`; A1111 fields we
do not implement yet are accepted and ignored, as A1111 ignores unknown ones.
"""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..core import infotext, styles
from ..core.names import SAMPLERS, SCHEDULES
from ..core.outputs import NotAnImageError, dated_dir, read_infotext, save_image
from ..core.params import RequestError, Txt2ImgRequest
from ..models.errors import ModelFileError, ModelNotFoundError
from ..models.network_info import network_info
from ..service.state import JobState


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
    send_images: bool = True
    save_images: bool = False


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


def encode_png(image, text: str | None) -> str:
    buf = io.BytesIO()
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("parameters", text)
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def decode_image_b64(data: str) -> io.BytesIO:
    if data.startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        return io.BytesIO(base64.b64decode(data, validate=False))
    except ValueError:
        raise HTTPException(422, "image is not valid base64") from None


def make_router(engine, state: JobState, options: dict, cmd_flags: dict) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1")

    def model_entry(m) -> dict:
        return {"title": m.title, "model_name": m.name, "hash": m.short_hash, "sha256": m.sha256,
                "filename": str(m.path), "config": None}

    @r.post("/txt2img")
    def txt2img(body: Txt2ImgBody):
        try:
            req = to_request(body, options).validate()
            state.begin("txt2img", req.n_iter, req.steps)
            result = engine.txt2img(
                req, on_progress=lambda p: state.update(p.job_no, p.step, p.steps),
                should_stop=lambda: state.interrupted)
        except RequestError as exc:
            raise HTTPException(422, str(exc)) from None
        except ModelNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except ModelFileError as exc:
            raise HTTPException(500, str(exc)) from None
        finally:
            state.end()
        if body.save_images:
            folder = dated_dir(engine.paths.outputs_dir, "txt2img-images")
            for g in result.images:
                save_image(g.image, folder, infotext=g.infotext, suffix=str(g.seed))
        req = result.request
        info = {
            "prompt": req.prompt, "all_prompts": [req.prompt] * len(result.all_seeds),
            "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(result.all_seeds),
            "seed": req.seed, "all_seeds": result.all_seeds, "subseed": req.subseed, "all_subseeds": result.all_subseeds,
            "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height,
            "sampler_name": req.sampler_name, "cfg_scale": req.cfg_scale, "steps": req.steps,
            "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": result.model_name, "sd_model_hash": result.model_hash, "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": req.seed_resize_from_w or -1,
            "seed_resize_from_h": req.seed_resize_from_h or -1, "denoising_strength": None,
            "extra_generation_params": {}, "index_of_first_image": 0,
            "infotexts": [g.infotext for g in result.images], "styles": body.styles,
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"), "clip_skip": req.clip_skip,
            "is_using_inpainting_conditioning": False, "version": "sdstudio", "warnings": result.warnings,
        }
        images = [encode_png(g.image, g.infotext) for g in result.images] if body.send_images else []
        return {"images": images, "parameters": body.model_dump(), "info": json.dumps(info, ensure_ascii=False)}

    @r.post("/png-info")
    def png_info(body: PngInfoBody):
        try:
            text = read_infotext(decode_image_b64(body.image))
        except NotAnImageError as exc:
            raise HTTPException(422, str(exc)) from None
        parsed = infotext.parse(text) if text else {}
        return {"info": text or "", "items": {"parameters": text} if text else {}, "parameters": parsed}

    @r.get("/progress")
    def progress(skip_current_image: bool = False):
        return {"progress": state.progress, "eta_relative": state.eta(),
                "state": {"skipped": state.skipped, "interrupted": state.interrupted, "job": state.job,
                          "job_count": state.job_count, "job_timestamp": "", "job_no": state.job_no,
                          "sampling_step": state.sampling_step, "sampling_steps": state.sampling_steps},
                "current_image": None, "textinfo": None}

    @r.post("/interrupt")
    def interrupt():
        state.interrupted = True
        return {}

    @r.post("/skip")
    def skip():
        state.skipped = True
        return {}

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
        options.update(values)

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

    @r.get("/prompt-styles")
    def prompt_styles():
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in styles.load(engine.paths.styles_file).values()]

    return r
