"""Following a queued job from a page event: the progress bar, the live preview, the queue panel.

A page event submits its job to the same :class:`~sdstudio.service.jobs.JobService` the API uses and then
follows it, yielding a :class:`Tick` at every change (queue place, step, preview) and a last one with the
finished job. Each browser window is its own queue client, so Interrupt, Skip and the queue panel act on
that window's jobs only.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..service.jobs import JobService
from ..service.queue import FINISHED, QUEUED, RUNNING, Job


def client_of(request) -> str:
    """Each browser window (gradio session) is its own queue client."""
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"ui:{session or 'anonymous'}"


@dataclass
class Tick:
    html: str  # the progress bar
    preview: object = None  # a new live preview (a PIL image), or None when it has not changed
    job: Job | None = None  # set on the last tick: the finished job


def _fmt_eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


def progress_html(p: dict, kind: str = "") -> str:
    """A1111's progress bar: step, percent and ETA, or the place in the queue. Words are in their own
    spans so the page's localization can translate them."""
    state = p["state"]
    if kind == "load" or state.get("job") == "load":
        return ('<div class="sd-progress" data-state="loading"><span class="sd-progress-text">'
                '<span>Loading model</span>…</span></div>')
    if state["sampling_steps"]:
        percent = round(100 * p["progress"])
        return (f'<div class="sd-progress" data-state="running" data-percent="{percent}">'
                f'<div class="sd-progress-bar" style="width:{percent}%"></div>'
                f'<span class="sd-progress-text"><span>Step</span> {state["sampling_step"]}/{state["sampling_steps"]}'
                + (f' · {state["job_no"] + 1}/{state["job_count"]}' if state["job_count"] > 1 else "")
                + f' · {percent}% · <span>ETA</span> {_fmt_eta(p["eta_relative"])}</span></div>')
    ahead = max(p.get("queue_position", 0), 0)
    if ahead or p.get("job_id"):
        return (f'<div class="sd-progress" data-state="queued"><span class="sd-progress-text"><span>In queue</span>: '
                f'{ahead} <span>ahead</span></span></div>')
    return '<div class="sd-progress" data-state="waiting"><span class="sd-progress-text"><span>Waiting</span>…</span></div>'


def follow(service: JobService, client: str, job: Job, previews: bool = True, preview_period: float = 1.0, bar_period: float = 0.25) -> Iterator[Tick]:
    """Ticks for ``job`` until it has finished (the last tick carries it). The bar is updated at most every
    ``bar_period`` seconds and a new preview at most every ``preview_period`` (A1111's refresh period):
    each update is work for the server and the page while the job computes on the same machine."""
    last, shown_preview, preview_at, bar_at = None, None, 0.0, 0.0
    while True:
        current = service.wait(job.id, timeout=bar_period)  # returns at once when the job ends
        if current is None or current.status in FINISHED:
            yield Tick("", None, current)
            return
        p = service.progress(client, job.id)
        preview = service.preview_image(client, job.id) if previews else None
        if preview is shown_preview or time.monotonic() - preview_at < preview_period:
            preview = None
        else:
            shown_preview, preview_at = preview, time.monotonic()
        state = (p["state"]["sampling_step"], p["state"]["job_no"], p.get("queue_position"))
        if preview is not None or (state != last and time.monotonic() - bar_at >= bar_period):
            last, bar_at = state, time.monotonic()
            yield Tick(progress_html(p, current.kind), preview)


def queue_html(service: JobService, client: str) -> str:
    """The window's own waiting and running jobs, with the number of other clients' jobs ahead."""
    mine = service.queue.list(client=client, statuses=(QUEUED, RUNNING), limit=50)
    if not mine:
        return '<div class="sd-queue sd-queue-empty"><span>No jobs waiting</span></div>'
    rows = []
    for job in sorted(mine, key=lambda j: j.created):
        request = _request_of(job)
        prompt = str(request.get("prompt", request.get("model", "")))[:60]
        size = f'{request.get("width", "")}×{request.get("height", "")}' if "width" in request else ""
        place = "" if job.status == RUNNING else f" ({max(service.queue.position(job.id), 0)} <span>ahead</span>)"
        rows.append(f'<tr data-job="{job.id}"><td class="sd-notranslate">{job.id[:8]}</td><td>{html.escape(job.kind)}'
                    f'</td><td><span>{job.status}</span>{place}</td><td class="sd-notranslate">{html.escape(prompt)}'
                    f'</td><td>{size}</td></tr>')
    return ('<table class="sd-queue"><thead><tr><th>Job</th><th>Kind</th><th>Status</th><th>Prompt</th>'
            '<th>Size</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def cancellable(service: JobService, client: str) -> list[tuple[str, str]]:
    """(label, job id) of the window's jobs that Cancel can stop."""
    jobs = service.queue.list(client=client, statuses=(QUEUED, RUNNING), limit=50)
    out = []
    for job in sorted(jobs, key=lambda j: j.created):
        request = _request_of(job)
        out.append((f'{job.id[:8]} · {job.kind} · {str(request.get("prompt", ""))[:30]}', job.id))
    return out


def _request_of(job: Job) -> dict:
    """A queued job's request fields (a generation job stores them under "request"; a load job is flat)."""
    return job.request.get("request", job.request) if isinstance(job.request, dict) else {}

