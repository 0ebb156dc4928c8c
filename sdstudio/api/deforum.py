"""The Deforum extension's API (``/deforum_api``), so tools written for it work here; its runs are queue jobs.

``POST /deforum_api/batches`` takes ``{"deforum_settings": {...} or [{...}, ...], "options_overrides": {...}}``
(each settings object is a saved ``settings.txt``) and answers 202 ``{"message": "Job(s) accepted", "batch_id",
"job_ids"}``; ``GET /deforum_api/batches`` maps the caller's batch ids to their job ids, ``GET .../batches/{id}``
lists a batch's job statuses, ``GET .../jobs`` maps the caller's job ids to their statuses and ``GET
.../jobs/{id}`` is one status, in the extension's shape (``DeforumJobStatus``: status ACCEPTED / SUCCEEDED /
FAILED / CANCELLED, phase QUEUED / PREPARING / GENERATING / POST_PROCESSING / DONE, phase_progress, outdir,
timestring...; sdstudio adds frames, video, gif, warnings, batch_id, queue_position). ``DELETE .../jobs/{id}``
and ``DELETE .../batches/{id}`` cancel for real: a queued job leaves the queue, a running one stops after the
frame under way, keeping the frames made (the extension answers a running job with a flag it cannot honour).

Differences from the extension, on purpose: the jobs are in the durable queue (they survive a restart and
resume with ``--resume-queue``), take turns with other clients' jobs, and belong to the caller (listing shows
the caller's own; any job can be read by id, only its client cancels it). A bad settings object is refused
at once (422, naming the index and the key) instead of failing later. Job ids are the queue's ids, so
``/sdstudio/v1/jobs/{id}`` shows the same job.
"""

from __future__ import annotations

import random
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import Request

from ..core import deforum as spec
from ..core.errors import BAD_REQUEST, INTERNAL, http_status
from ..service.jobs import DeforumJob, JobError, JobService
from ..service.queue import CANCELLED, DONE, QUEUED, RUNNING, Job
from .common import client_id, server_file

ACCEPTED, SUCCEEDED = "ACCEPTED", "SUCCEEDED"


class Batch(BaseModel):
    deforum_settings: dict[str, Any] | list[dict[str, Any]] | None = None
    options_overrides: dict[str, Any] | None = None


def make_batch_id() -> str:
    """The extension's batch id form: ``batch(123456789)``."""
    return f"batch({random.randint(0, 10**9)})"


def prepare_batch(service: JobService, settings: list, options_overrides: dict | None, *, model: str | None = None,
                  limits: dict | None = None, batch_id: str | None = None) -> list[DeforumJob]:
    """Every settings object of a batch checked before any is queued; a bad one raises :class:`JobError`
    naming its index and key."""
    batch_id = batch_id or make_batch_id()
    jobs = []
    for i, data in enumerate(settings):
        label = f"deforum_settings[{i}]" if len(settings) > 1 else "deforum_settings"
        try:
            job = service.prepare_deforum(data, options_overrides=options_overrides, model=model, batch_id=batch_id)
        except JobError as exc:
            raise JobError(f"{label}: {exc}") from None
        check_limits(job.settings, limits or {}, label)
        jobs.append(job)
    return jobs


def check_limits(settings: dict, limits: dict, label: str) -> None:
    """The server's --limit-steps and --limit-pixels apply to each frame as to any generation."""
    steps, pixels = limits.get("steps"), limits.get("pixels")
    if steps and int(settings["steps"]) > steps:
        raise JobError(f"{label}: steps {settings['steps']} is over this server's limit of {steps} (--limit-steps)")
    if pixels and int(settings["W"]) * int(settings["H"]) > pixels:
        raise JobError(f"{label}: {settings['W']}x{settings['H']} is over this server's limit of {pixels} pixels "
                       "(--limit-pixels)")


def job_status(service: JobService, job: Job) -> dict:
    """A queue job in the extension's ``DeforumJobStatus`` shape (and sdstudio's extra fields)."""
    result, request = job.result, job.request
    live = service.live_state(job.id)  # this process's worker or a pool's
    frames, total = int(result.get("frames_done", 0)), int(result.get("max_frames") or request["settings"]["max_frames"])
    error_type, message = "NONE", None
    if job.status in (QUEUED, RUNNING):
        status = ACCEPTED
        phase = (live.phase or "PREPARING") if live is not None else ("PREPARING" if job.status == RUNNING else "QUEUED")
    elif job.status == DONE:
        status, phase = SUCCEEDED, "DONE"
        if result.get("interrupted"):
            phase = result.get("phase", "GENERATING")
            message = f"Interrupted: {len(result.get('frames', []))} frame(s) kept, no video made."
    elif job.status == CANCELLED:
        status, phase, message = "CANCELLED", result.get("phase", "QUEUED"), "Cancelled due to user request."
    else:
        status, phase, message = "FAILED", result.get("phase", "PREPARING"), job.error
        error_type = "TERMINAL" if result.get("error_kind", INTERNAL) == BAD_REQUEST else "RETRYABLE"
    progress = 1.0 if phase == "DONE" else (frames / total if total and phase in ("GENERATING", "POST_PROCESSING",
                                                                                    "QUEUED") else 0.0)
    last = job.finished or result.get("last_updated") or job.started or job.created
    return {
        "id": job.id, "status": status, "phase": phase, "error_type": error_type, "phase_progress": progress,
        "started_at": job.created, "last_updated": last, "execution_time": last - job.created,
        "update_interval_time": result.get("update_interval_time", 0.0), "updates": int(result.get("updates", 0)),
        "message": message, "outdir": result.get("outdir"), "timestring": result.get("timestring"),
        "deforum_settings": request.get("given") or request["settings"],
        "options_overrides": request.get("options_overrides") or None,
        # sdstudio's own
        "batch_id": request.get("batch_id"), "frames": result.get("frames", []), "video": result.get("video"),
        "gif": result.get("gif"), "warnings": result.get("warnings", []), "frames_done": frames, "max_frames": total,
        "queue_position": service.queue.position(job.id) if job.status == QUEUED else -1,
    }


def make_router(service: JobService, options: dict, limits: dict | None = None) -> APIRouter:
    """``options``: the server's settings (``sd_model_checkpoint`` is the checkpoint a batch runs on unless its
    ``options_overrides`` name one)."""
    r = APIRouter(prefix="/deforum_api", tags=["deforum"])

    def deforum_jobs(client: str | None = None) -> list[Job]:
        return [j for j in service.queue.list(client=client, limit=100000) if j.kind == "deforum"]

    def batch_jobs(batch_id: str) -> list[Job]:
        return sorted((j for j in deforum_jobs() if j.request.get("batch_id") == batch_id), key=lambda j: j.created)

    def found(job_id: str) -> Job | None:
        job = service.queue.get(job_id)
        return job if job is not None and job.kind == "deforum" else None

    @r.post("/batches", status_code=202)
    def run_batch(batch: Batch, request: Request):
        data = batch.deforum_settings
        if not data:
            return JSONResponse({"message": "No settings files provided. Please provide an element "
                                            "'deforum_settings' of type list in the request JSON payload."}, 400)
        settings = data if isinstance(data, list) else [data]
        try:
            jobs = prepare_batch(service, settings, batch.options_overrides, limits=limits,
                                 model=options.get("sd_model_checkpoint") or None)
            for job in jobs:  # the files a run reads: inside the data dir for a caller from the network
                for key, path in spec.check_files(spec.load_settings(job.settings)).items():
                    server_file(request, service.engine.paths.data_dir, path, key)
            submitted = [service.submit_deforum(client_id(request), job) for job in jobs]
        except JobError as exc:  # 422 naming the key, 429 when the caller's queue is full
            raise HTTPException(http_status(exc.kind), str(exc)) from None
        return {"message": "Job(s) accepted", "batch_id": jobs[0].batch_id, "job_ids": [j.id for j in submitted]}

    @r.get("/batches")
    def list_batches(request: Request):
        out: dict[str, list[str]] = {}
        for job in sorted(deforum_jobs(client_id(request)), key=lambda j: j.created):
            out.setdefault(job.request.get("batch_id") or job.id, []).append(job.id)
        return out

    @r.get("/batches/{batch_id}")
    def get_batch(batch_id: str):
        jobs = batch_jobs(batch_id)
        if not jobs:
            return JSONResponse({"id": batch_id, "status": "NOT FOUND"}, 404)
        return [job_status(service, j) for j in jobs]

    @r.delete("/batches/{batch_id}")
    def cancel_batch(batch_id: str, request: Request):
        jobs = batch_jobs(batch_id)
        if not jobs:
            return JSONResponse({"id": batch_id, "status": "NOT FOUND"}, 404)
        cancelled = [j.id for j in jobs if j.status in (QUEUED, RUNNING)
                     and service.cancel(j.id, client_id(request)) is not None]
        return {"ids": cancelled, "message": f"{len(cancelled)} job(s) cancelled."}

    @r.get("/jobs")
    def list_jobs(request: Request):
        return {j.id: job_status(service, j) for j in sorted(deforum_jobs(client_id(request)), key=lambda j: j.created)}

    @r.get("/jobs/{job_id}")
    def get_job(job_id: str):
        job = found(job_id)
        if job is None:
            return JSONResponse({"id": job_id, "status": "NOT FOUND"}, 404)
        return job_status(service, job)

    @r.delete("/jobs/{job_id}")
    def cancel_job(job_id: str, request: Request):
        job = found(job_id)
        if job is None:
            return JSONResponse({"id": job_id, "message": f"Job with ID {job_id} not found."}, 404)
        if job.status not in (QUEUED, RUNNING):
            return JSONResponse({"id": job_id, "message": f"Job with ID {job_id} not in a cancellable state. "
                                                          "Has it already finished?"}, 400)
        if service.cancel(job_id, client_id(request)) is None:
            return JSONResponse({"id": job_id, "message": "Only the client that submitted a job can cancel it."}, 403)
        return {"id": job_id, "message": "Job cancelled."}

    return r


def run_now(service: JobService, files: list[str], model: str | None = None) -> list[Job]:
    """``--deforum-run-now FILE[,FILE]``: the files' runs queued when the server starts (one batch)."""
    from pathlib import Path

    settings = []
    for name in files:
        path = Path(name).expanduser()
        try:
            settings.append(path.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            raise JobError(f"--deforum-run-now {name}: {exc.strerror or exc}") from None
    jobs = prepare_batch(service, settings, None, model=model)
    return [service.submit_deforum("deforum-run-now", job) for job in jobs]


def wait_all(service: JobService, jobs: list[Job]) -> bool:
    """Block until every job has finished; True when each succeeded (``--deforum-terminate-after-run-now``)."""
    ok = True
    for job in jobs:
        done = service.wait(job.id)
        ok = ok and done is not None and done.status == DONE and not done.result.get("interrupted")
    return ok

