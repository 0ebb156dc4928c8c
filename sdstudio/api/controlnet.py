"""The sd-webui-controlnet extension's HTTP API under ``/controlnet``, with its request and response shapes, so
webuiapi's ``controlnet_*`` calls and tools written for the extension work unchanged.

- ``GET /controlnet/version`` -> ``{"version": 3}``;
- ``GET /controlnet/model_list?update=true`` -> ``{"model_list": ["name [hash]", ...]}`` (rescanned first unless
  ``update=false``; "None" is not in this list, as in the extension);
- ``GET /controlnet/module_list?alias_names=false`` -> ``{"module_list": [...], "module_detail": {module:
  {"model_free", "sliders": [{"name", "value", "min", "max", "step"}]}}}`` (the UI labels with ``alias_names``);
- ``GET /controlnet/control_types`` -> ``{"control_types": {type: {"module_list", "model_list",
  "default_option", "default_model"}}}``;
- ``GET /controlnet/settings`` -> ``{"control_net_unit_count": N}``;
- ``POST /controlnet/detect`` runs a preprocessor on images: ``controlnet_module``, ``controlnet_input_images``
  (webuiapi's ``controlnet_images`` too), ``controlnet_processor_res``, ``controlnet_threshold_a/b`` (-1 or
  out of a slider's range: its default), ``controlnet_masks`` -> ``{"info": "Success", "images": [PNG base64]}``.

Detection runs in the thread pool, one request at a time (a preprocessor may load a network: two at once would
load it twice); clients waiting for their turn hold no thread.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import APIRouter, HTTPException
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..core.controlnet import DEFAULT_UNIT_COUNT, VERSION
from ..core.errors import StudioError, http_status
from ..core.outputs import png_base64
from ..service.jobs import JobService
from .common import decode_image

MAX_DETECT_IMAGES = 64
# modules whose output is an embedding, not a picture: the extension's detect refuses these by name, and the
# IP-Adapter / InstantID embedders give it tensors, which we do not serialize
NOT_SUPPORTED = ("clip_vision", "revision_clipvision", "revision_ignore_prompt", "ip-adapter-auto")
EMBEDDING_PREFIXES = ("ip-adapter", "instant_id_face_embedding", "clip_vision", "revision")


class DetectBody(BaseModel):
    """``/controlnet/detect``'s fields; values are checked by hand so a bad one is a 422 naming it."""

    model_config = ConfigDict(extra="ignore")
    controlnet_module: Any = "none"
    controlnet_input_images: Any = None
    controlnet_images: Any = None  # what webuiapi's controlnet_detect sends
    controlnet_processor_res: Any = -1
    controlnet_threshold_a: Any = -1
    controlnet_threshold_b: Any = -1
    controlnet_masks: Any = None
    low_vram: Any = False  # accepted; our preprocessors free their networks themselves


def number(value: Any, field: str, whole: bool = False) -> float:
    """A finite number (a whole one with ``whole``), or a 422 naming ``field``."""
    if isinstance(value, bool) or value is None:
        raise HTTPException(422, f"{field}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise HTTPException(422, f"{field}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise HTTPException(422, f"{field}: expected a finite number, got {value!r}")
    if whole and not out.is_integer():
        raise HTTPException(422, f"{field}: expected a whole number, got {value!r}")
    return out


def image_list(value: Any, field: str) -> list[str]:
    """A list of base64 images (a single string is taken as a list of one)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise HTTPException(422, f"{field}: expected a list of base64-encoded images, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise HTTPException(422, f"{field}[{i}]: expected a base64-encoded image, got {item!r:.40}")
    if len(value) > MAX_DETECT_IMAGES:
        raise HTTPException(413, f"{field}: at most {MAX_DETECT_IMAGES} images per request, got {len(value)}")
    return value


def make_router(service: JobService, options: dict) -> APIRouter:
    """``options``: the server's settings values (read at each call: a saved change shows at once)."""
    engine = service.engine
    r = APIRouter(prefix="/controlnet")
    one_at_a_time = asyncio.Semaphore(1)

    def preprocessors():
        return engine.controlnets.preprocessors

    @r.get("/version")
    def version():
        return {"version": VERSION}

    @r.get("/model_list")
    def model_list(update: bool = True):
        if update:
            engine.registry.refresh()
        return {"model_list": engine.registry.controlnet_titles()}

    @r.get("/module_list")
    def module_list(alias_names: bool = False):
        registry = preprocessors()
        return {"module_list": registry.names(labels=alias_names),
                "module_detail": registry.module_detail(labels=alias_names)}

    @r.get("/control_types")
    def control_types():
        return preprocessors().control_types(engine.registry.controlnet_titles())

    @r.get("/settings")
    def settings():
        return {"control_net_unit_count": int(options.get("control_net_unit_count", DEFAULT_UNIT_COUNT))}

    def check(body: DetectBody):
        """The preprocessor and the values, checked before any image is decoded."""
        from ..core.controlnet import ControlNetError

        if not isinstance(body.controlnet_module, str) or not body.controlnet_module.strip():
            raise HTTPException(422, f"controlnet_module: expected a preprocessor's name, got "
                                     f"{body.controlnet_module!r}")
        try:
            pre = preprocessors().get(body.controlnet_module)
        except ControlNetError as exc:
            raise HTTPException(422, f"controlnet_module: {exc}") from None
        if pre.name in NOT_SUPPORTED or (pre.run is None and pre.name.startswith(EMBEDDING_PREFIXES)):
            raise HTTPException(422, f"controlnet_module: {pre.name} gives an embedding, not an image; "
                                     "/controlnet/detect does not support it")
        given = image_list(body.controlnet_input_images, "controlnet_input_images")
        theirs = image_list(body.controlnet_images, "controlnet_images")
        if given and theirs and given != theirs:
            raise HTTPException(422, "controlnet_input_images and controlnet_images (webuiapi's name) are both "
                                     "given and differ: send one")
        images, field = (given, "controlnet_input_images") if given else (theirs, "controlnet_images")
        if not images:
            raise HTTPException(422, "controlnet_input_images: no image given")
        masks = image_list(body.controlnet_masks, "controlnet_masks")
        if len(masks) > len(images):
            raise HTTPException(422, f"controlnet_masks: {len(masks)} masks for {len(images)} images")
        if pre.needs_mask and len(masks) != len(images):
            raise HTTPException(422, f"controlnet_masks: the {pre.name} preprocessor needs one mask per image "
                                     f"({len(images)} images, {len(masks)} masks)")
        res = number(body.controlnet_processor_res, "controlnet_processor_res", whole=True)
        a = number(body.controlnet_threshold_a, "controlnet_threshold_a")
        b = number(body.controlnet_threshold_b, "controlnet_threshold_b")
        return pre, images, field, masks, res, a, b

    def run(body: DetectBody) -> dict:
        from ..engine.controlnet import _mask_array, _rgb_array
        from ..engine.preprocessors import detect as run_preprocessor
        from ..engine.preprocessors import inpaint_display

        pre, images, field, masks, res, a, b = check(body)
        out = []
        for i, data in enumerate(images):
            source = _rgb_array(ImageOps.exif_transpose(decode_image(data, f"{field}[{i}]")))
            mask = None
            if i < len(masks):
                mask_image = ImageOps.exif_transpose(decode_image(masks[i], f"controlnet_masks[{i}]"))
                mask = _mask_array(mask_image, (source.shape[1], source.shape[0]))
            try:
                detected = run_preprocessor(pre, source, res, a, b, mask)
            except StudioError as exc:  # a missing annotator file, a damaged one: the status its kind says
                raise HTTPException(http_status(exc), f"{field}[{i}]: {exc}") from None
            out.append(png_base64(Image.fromarray(inpaint_display(detected))))
        return {"info": "Success", "images": out}

    @r.post("/detect")
    async def detect(body: DetectBody):
        async with one_at_a_time:
            return await run_in_threadpool(run, body)

    return r
