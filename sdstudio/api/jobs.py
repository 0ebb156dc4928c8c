"""sdstudio's asynchronous job API (beyond A1111): ``/sdstudio/v1/jobs``.

``POST /sdstudio/v1/jobs`` queues a job and answers at once with its id; ``GET .../jobs/{id}`` tells
its state, ``GET .../jobs/{id}/events`` streams its progress as server-sent events, ``GET
.../jobs/{id}/images/{n}`` serves its pictures, ``POST .../jobs/{id}/cancel`` (or ``DELETE``) cancels
it, and ``GET .../jobs`` lists the caller's jobs with paging.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import Request

from ..core.errors import http_status
from ..core.params import RequestError, Txt2ImgRequest
from ..service.jobs import JobError, JobService, grid_entries, grid_paths
from ..service.queue import FINISHED, QUEUED
from ..service.store import read_output
from .a1111 import Txt2ImgBody, queue_job, script_fields, to_request
from .common import client_id


class JobBody(BaseModel):
    kind: Literal["txt2img"] = "txt2img"
    request: Txt2ImgBody  # A1111's fields (and where the images go)
    # sdstudio's own request (Txt2ImgRequest.to_dict(), what the CLI's --server sends): when given, it is
    # the request, every field as it is; ``request`` then only says where the images go
    sdstudio_request: dict | None = None


def serve_file(path: str, url: str | None, what: str):
    """A job's file from this machine's disk, else from the output store (a worker on another machine)."""
    if Path(path).is_file():
        return FileResponse(path)
    found = read_output(None, url) if url else None
    if found is None:
        raise HTTPException(410, f"the {what} file is gone: {Path(path).name}")
    return Response(found[0], media_type=found[1])


def make_router(service: JobService, options: dict, limits: dict | None = None) -> APIRouter:
    r = APIRouter(prefix="/sdstudio/v1")

    def describe(job) -> dict:
        out = job.public()
        out["queue_position"] = service.queue.position(job.id) if job.status == QUEUED else -1
        out["images"] = [f"/sdstudio/v1/jobs/{job.id}/images/{i}" for i in range(len(job.result.get("images", [])))]
        out["grids"] = [f"/sdstudio/v1/jobs/{job.id}/grids/{i}" for i in range(len(grid_paths(job.result)))]
        if any(running.id == job.id for running in service.running_jobs()):  # on any worker
            p = service.progress(None, job.id)
            out["progress"], out["eta_relative"], out["state"] = p["progress"], p["eta_relative"], p["state"]
            out["textinfo"] = p.get("textinfo")  # e.g. a training job's "Step i of N, loss x"
        else:
            out["progress"] = 1.0 if job.status in FINISHED else 0.0
        return out

    def found(job_id: str):
        job = service.queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @r.post("/jobs", status_code=202)
    def submit(body: JobBody, request: Request):
        if body.sdstudio_request is not None:
            try:
                req = Txt2ImgRequest.from_dict(body.sdstudio_request)
            except (RequestError, TypeError) as exc:
                raise HTTPException(422, f"sdstudio_request: {exc}") from None
        else:
            req = to_request(body.request, options,
                             **script_fields(body.request, service.studio.catalog, [], "txt2img"))
        job = queue_job(body.request, req, options, service, limits, request)
        try:
            submitted = service.submit(client_id(request), job)
        except JobError as exc:  # 422 for a bad request, 429 when the client's queue is full
            raise HTTPException(http_status(exc.kind), str(exc)) from None
        return describe(submitted)

    @r.get("/jobs")
    def list_jobs(request: Request, offset: int = Query(0, ge=0, le=2**62), limit: int = Query(50, ge=1, le=500),
                  status: str | None = None):
        statuses = tuple(s.strip() for s in status.split(",")) if status else None
        jobs = service.queue.list(client_id(request), offset, limit, statuses)
        return {"jobs": [describe(j) for j in jobs], "offset": offset, "limit": limit}

    @r.get("/jobs/{job_id}")
    def get_job(job_id: str):
        return describe(found(job_id))

    @r.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str, request: Request):
        found(job_id)
        job = service.cancel(job_id, client_id(request))
        if job is None:
            raise HTTPException(403, "only the client that submitted a job can cancel it")
        return describe(job)

    @r.delete("/jobs/{job_id}")
    def delete(job_id: str, request: Request):
        return cancel(job_id, request)

    @r.get("/jobs/{job_id}/images/{n}")
    def image(job_id: str, n: int):
        images = found(job_id).result.get("images", [])
        if not 0 <= n < len(images):
            raise HTTPException(404, f"job {job_id} has {len(images)} image(s); no image {n}")
        return serve_file(images[n]["path"], images[n].get("url"), "image")

    @r.get("/jobs/{job_id}/grids/{n}")
    def grid(job_id: str, n: int):
        result = found(job_id).result
        grids = grid_entries(result)
        if not 0 <= n < len(grids):
            raise HTTPException(404, f"job {job_id} has {len(grids)} grid(s); no grid {n}")
        url = grids[n].get("url") or (result.get("grid_url") if not result.get("grids") else None)
        return serve_file(grids[n]["path"], url, "grid")

    @r.get("/jobs/{job_id}/events")
    def events(job_id: str):
        """Server-sent events: a ``progress`` event whenever the job's state changes, ``end`` when done."""
        found(job_id)

        async def stream():  # async: a waiting stream holds no server thread (50 streams would fill the pool)
            version, last = -1, None
            while True:
                version = await service.wait_for_change_async(version, 15.0)
                job = service.queue.get(job_id)
                state = describe(job)
                if state != last:
                    last = state
                    kind = "end" if job.status in FINISHED else "progress"
                    yield f"event: {kind}\ndata: {json.dumps(state)}\n\n"
                    if kind == "end":
                        return
                else:
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @r.get("/queue")
    def queue_summary(request: Request):
        mine = client_id(request)
        waiting = service.queue.list(statuses=(QUEUED,), limit=10000)
        running = service.running_jobs()
        out = {"queued": len(waiting), "queued_mine": sum(j.client == mine for j in waiting),
               "running": bool(running), "running_mine": any(j.client == mine for j in running),
               "running_count": len(running)}
        if service.pool is not None:  # --ray / --workers: each worker, what it runs and what it has loaded
            out["workers"] = service.pool.describe()
        return out

    return r
