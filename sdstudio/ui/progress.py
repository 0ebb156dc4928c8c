"""Following a queued job from a page event: the progress bar, the live preview, the queue panel.

A page event submits its job to the same :class:`~sdstudio.service.jobs.JobService` the API uses. For a
generation the event then shows :func:`live_html` (an empty bar and preview naming the job) and waits
for the job without sending anything more; the page's script polls ``/sdstudio/progress/JOB`` (a
:func:`snapshot`) and swaps the bar's text and the preview picture itself, as A1111's page does. Each
update through gradio instead costs the browser tens of milliseconds of CPU (the event's status machinery
on every output), which on a small machine is taken from the job. Short jobs (a model load) use
:func:`follow`, which yields a :class:`Tick` at every change. Each browser window is its own queue client,
so Interrupt, Skip and the queue panel act on that window's jobs only.

The queue panel (:func:`queue_panel`) works the same way: while the window has jobs waiting or running,
the page's script polls ``/sdstudio/queue/TOKEN`` every two seconds and swaps the table, and a row's ✕
posts its cancel there. A ``gr.Timer`` did this before and cost more than the job it watched: each tick
re-sends the loading status of every component the page has updated (hundreds once a picture has been
sent to img2img), about a CPU core's worth in Chromium.
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
    job: Job | None = None  # set on the last tick: the finished job


def _fmt_eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


def progress_html(p: dict, kind: str = "") -> str:
    """A1111's progress bar: step, percent and ETA ("Frame i of N" for a Deforum run), or the place in the
    queue. Words are in their own spans so the page's localization can translate them."""
    state = p["state"]
    if kind == "load" or state.get("job") == "load":
        return ('<div class="sd-progress" data-state="loading"><span class="sd-progress-text">'
                '<span>Loading model</span>…</span></div>')
    if state["sampling_steps"] and kind == "deforum":  # a Deforum run counts its frames
        done, total = state["sampling_step"], state["sampling_steps"]
        percent = round(100 * done / total)
        return (f'<div class="sd-progress" data-state="running" data-percent="{percent}">'
                f'<div class="sd-progress-bar" style="width:{percent}%"></div>'
                f'<span class="sd-progress-text"><span>Frame</span> {done} <span>of</span> {total} · {percent}%'
                '</span></div>')
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


def follow(service: JobService, client: str, job: Job, bar_period: float = 0.25) -> Iterator[Tick]:
    """Ticks for ``job`` until it has finished (the last tick carries it); the bar at most every
    ``bar_period`` seconds."""
    last, bar_at = None, 0.0
    while True:
        current = service.wait(job.id, timeout=bar_period)  # returns at once when the job ends
        if current is None or current.status in FINISHED:
            yield Tick("", current)
            return
        p = service.progress(client, job.id)
        state = (p["state"]["sampling_step"], p["state"]["job_no"], p.get("queue_position"))
        if state != last and time.monotonic() - bar_at >= bar_period:
            last, bar_at = state, time.monotonic()
            yield Tick(progress_html(p, current.kind))


def finished(service: JobService, job: Job) -> Job | None:
    """Wait for ``job`` to finish (None if it vanished from the queue)."""
    while True:
        current = service.wait(job.id, timeout=5.0)
        if current is None or current.status in FINISHED:
            return current


def live_html(tab: str, job: Job, previews: bool, period: float = 1.0, info: bool = False) -> str:
    """The progress area of a running or queued job: the page's script polls it (see the module's text).
    ``period``: seconds between preview pictures (A1111's "live preview refresh period"); ``info``: a line
    under the bar for the job's textinfo (a training run's step and loss)."""
    preview = (f'<div id="{tab}_preview" class="sd-live-preview"></div>' if previews else "")
    line = '<div class="sd-live-info sd-notranslate"></div>' if info else ""
    return (f'<div class="sd-live" data-job="{html.escape(job.id)}" data-period="{period:g}">'
            '<div class="sd-progress" data-state="waiting"><span class="sd-progress-text"><span>Waiting</span>…'
            f'</span></div>{line}{preview}</div>')


def snapshot(service: JobService, job_id: str) -> dict:
    """What the page's poll of a job shows: the bar, its textinfo line, the number of the newest preview, and
    whether it is over."""
    job = service.queue.get(job_id)
    if job is None or job.status in FINISHED:
        return {"done": True, "html": "", "info": "", "preview": None}
    p = service.progress(None, job_id)
    return {"done": False, "html": progress_html(p, job.kind), "info": p.get("textinfo") or "",
            "preview": service.preview_number(job_id)}


EMPTY_QUEUE = '<div class="sd-queue sd-queue-empty"><span>No jobs waiting</span></div>'


def queue_state(service: JobService, client: str) -> tuple[str, bool]:
    """The window's own waiting and running jobs as a table, with the number of other clients' jobs ahead
    (each row's ✕ cancels its job: the page's script posts it), and whether there are any (the page polls its
    panel more often then); one listing of the queue for both."""
    mine = service.queue.list(client=client, statuses=(QUEUED, RUNNING), limit=50)
    if not mine:
        return EMPTY_QUEUE, False
    rows = []
    for job in sorted(mine, key=lambda j: j.created):
        request = _request_of(job)
        prompt = str(request.get("prompt", request.get("model", "")))[:60]
        size = f'{request.get("width", "")}×{request.get("height", "")}' if "width" in request else ""
        place = "" if job.status == RUNNING else f" ({max(service.queue.position(job.id), 0)} <span>ahead</span>)"
        rows.append(f'<tr data-job="{job.id}"><td class="sd-notranslate">{job.id[:8]}</td><td>{html.escape(job.kind)}'
                    f'</td><td><span>{job.status}</span>{place}</td><td class="sd-notranslate">{html.escape(prompt)}'
                    f'</td><td>{size}</td><td><button class="sd-queue-cancel" data-job="{job.id}" title="Cancel">'
                    '✕</button></td></tr>')
    return ('<table class="sd-queue"><thead><tr><th>Job</th><th>Kind</th><th>Status</th><th>Prompt</th>'
            '<th>Size</th><th></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"), True


def queue_html(service: JobService, client: str) -> str:
    """The window's queue table (:func:`queue_state`)."""
    return queue_state(service, client)[0]


def queue_panel_empty() -> str:
    """A panel with no window yet: nothing to poll (the page's load gives it the window's token)."""
    return f'<div class="sd-queue-live" data-busy="0">{EMPTY_QUEUE}</div>'


def queue_panel(service: JobService, client: str, token: str) -> str:
    """The queue panel as a page event shows it: the table inside the element the page's script polls.
    ``token`` names the window to ``/sdstudio/queue/TOKEN`` (see ``StudioUI.queue_token``)."""
    table, busy = queue_state(service, client)
    return (f'<div class="sd-queue-live" data-token="{html.escape(token)}" data-busy="{int(busy)}">'
            f'{table}</div>')


def _request_of(job: Job) -> dict:
    """A queued job's request fields (a generation job stores them under "request"; a load job is flat)."""
    return job.request.get("request", job.request) if isinstance(job.request, dict) else {}

