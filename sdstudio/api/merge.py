"""The checkpoint merger over HTTP (A1111 has no merge route): ``POST /sdstudio/v1/merge`` queues a merge job.

The body takes A1111's merger field names (``primary_model_name``, ``secondary_model_name``,
``tertiary_model_name``, ``interp_method``, ``multiplier``, ``save_as_half``, ``custom_name``,
``checkpoint_format``, ``config_source``, ``bake_in_vae``, ``discard_weights``, ``save_metadata``,
``add_merge_recipe``, ``copy_metadata_fields``, ``metadata_json``) and sdstudio's ``block_weights`` (26 values
for SD 1.x/2.x, 20 for SDXL, or a comma-separated string) and ``loras`` (``[{"name", "weight"}]`` or
``"name:weight"`` strings). Models are named as in ``/sdapi/v1/sd-models`` (title, file name or hash); paths are
never taken. The answer is 202 with the job (``/sdstudio/v1/jobs/{id}`` follows it); when it is done its result
has the new checkpoint's ``model_title``, and ``/sdapi/v1/sd-models`` lists it without a refresh.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel
from starlette.requests import Request

from ..core.errors import http_status
from ..service.jobs import JobError, JobService
from ..service.queue import FINISHED, QUEUED
from .common import client_id


class MergeBody(BaseModel):
    primary_model_name: str
    secondary_model_name: str | None = None
    tertiary_model_name: str | None = None
    interp_method: str = "Weighted sum"
    multiplier: float = 0.3
    save_as_half: bool = False
    custom_name: str = ""
    checkpoint_format: str = "safetensors"
    config_source: int | str = 0
    bake_in_vae: str | None = "None"
    discard_weights: str = ""
    save_metadata: bool = True
    add_merge_recipe: bool = True
    copy_metadata_fields: bool = True
    metadata_json: dict[str, Any] | str | None = None
    block_weights: list[float] | str | None = None
    loras: list[dict[str, Any] | str] | None = None


def describe(service: JobService, job) -> dict:
    out = job.public()
    out["queue_position"] = service.queue.position(job.id) if job.status == QUEUED else -1
    if any(running.id == job.id for running in service.running_jobs()):  # on any worker
        p = service.progress(None, job.id)
        out["progress"], out["eta_relative"] = p["progress"], p["eta_relative"]
    else:
        out["progress"] = 1.0 if job.status in FINISHED else 0.0
    return out


def make_router(service: JobService) -> APIRouter:
    r = APIRouter(prefix="/sdstudio/v1")

    @r.post("/merge", status_code=202)
    def merge(body: MergeBody, request: Request):
        try:
            job = service.prepare_merge(**body.model_dump())
            submitted = service.submit_merge(client_id(request), job)
        except JobError as exc:  # 422 for a bad request, 429 when the client's queue is full
            raise HTTPException(http_status(exc.kind), str(exc)) from None
        return describe(service, submitted)

    return r
