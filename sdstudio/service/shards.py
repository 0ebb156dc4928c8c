"""One job on several workers at once: a txt2img / img2img job that a pool finds with several free workers is
split into contiguous ranges, one per worker, and reassembled in order: its batches (batch count > 1), or the
units of its script when they do not depend on each other (X/Y/Z cells, prompt-file lines, prompt-matrix
combinations: ``Script.independent_units``); a Deforum job, its frames when they stand alone (Video Input and
Interpolation runs without frame-to-frame colour matching).

Batches:

Each batch's seeds follow from its index (``seed + index``), and a worker runs a range as a resumed job does
(``first_batch`` = the range's start, batch count = its end), so the pictures are those one worker makes.
A shard's queue writes go to its :class:`ShardQueue`, not the queue of record; the coordinator records the
job's contiguous prefix of finished batches as they come (a restart resumes from there) and, when every
range is done, the whole result (images in batch order, the grid of them all, the seeds of the whole job).

A shard whose worker dies is run again from its own last finished batch on another free worker, once per
job (the pool's rule); the other ranges' pictures are kept, so no batch is made twice.

Script units: a shard is the job run with ``unit_range`` (:meth:`sdstudio.scripts.Studio.generate`): its worker
makes those units only, each stored as the pause / resume mechanism stores a unit (a picture file per image,
``result["units"]``), and reports them as they finish; the coordinator records all units made so far in the
queue of record. When every range is done, the API process runs the script once over the stored units
(:meth:`~sdstudio.service.jobs.JobService.assemble`): it makes no picture, and draws the grid and gives the
outputs exactly as one worker's uninterrupted run does. The unit files must be readable where the job is put
together: one jobs folder shared by the workers and the API server (a local cluster, NFS), or an output store
(``--output-store``), which gets a copy of each. Scripts whose units depend on each other (Loopback) are not split.

Deforum frames: a shard is the run with ``frame_range`` (:class:`sdstudio.scripts.deforum.DeforumRun`): its
worker writes those frames into the run's folder (the timestring is chosen before the shards start), skipping
any already there, and makes no video. When every range is done the API process makes the video from the
folder, as a whole run's end does; so that folder must be shared by the workers and the API server (a local
cluster, NFS). A frame missing there fails the job, saying so.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from dataclasses import dataclass, field

from .queue import CANCELLED, DONE, FAILED, RUNNING, Job, JobQueue

log = logging.getLogger(__name__)


def split_ranges(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` in ``parts`` contiguous ranges as even as can be (earlier ones a batch longer)."""
    parts = max(1, min(parts, end - start))
    size, extra = divmod(end - start, parts)
    out, at = [], start
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        out.append((at, at + n))
        at += n
    return out


@dataclass
class Split:
    """What of a job splits: ``mode`` "batches" or "units", numbered ``start`` to ``end`` (exclusive)."""

    mode: str
    start: int
    end: int


def split_of(job: Job, studio=None) -> Split | None:
    """The part of ``job`` left to split (None: it does not split, or has fewer than two left). A script job's
    units are counted by ``studio`` (:meth:`~sdstudio.scripts.Studio.count_units`; none without it); a
    Deforum job's frames split when they stand alone (:func:`sdstudio.core.deforum.independent_frames`)."""
    if job.kind == "deforum":
        from ..core import deforum

        try:
            total = deforum.independent_frames(deforum.load_settings(job.request["settings"]))
        except Exception as exc:  # noqa: BLE001 - settings the run refuses fail on its worker, saying why
            log.debug("job %s: not split: %s", job.id, exc)
            return None
        return Split("frames", job.batches_done, total) if total - job.batches_done >= 2 else None
    if job.kind not in ("txt2img", "img2img"):
        return None
    req = job.request.get("request", {})
    if not req.get("script_name"):
        end = int(req.get("n_iter", 1))
        return Split("batches", job.batches_done, end) if end - job.batches_done >= 2 else None
    if studio is None:
        return None
    from .jobs import Txt2ImgJob

    try:
        total = studio.count_units(Txt2ImgJob.from_dict(job.request, job.kind).request)
    except Exception as exc:  # noqa: BLE001 - a request the script refuses fails on its worker, saying why
        log.debug("job %s: not split: %s", job.id, exc)
        return None
    stored = {int(n) for n in job.result.get("units", {})}
    left = [n for n in range(total) if n not in stored]
    return Split("units", left[0], total) if len(left) >= 2 else None


@dataclass
class Shard:
    start: int
    end: int
    done: int = 0  # batches finished (absolute index: start..end)
    result: dict = field(default_factory=dict)
    status: str | None = None
    error: str | None = None
    worker: str = ""

    def __post_init__(self) -> None:
        self.done = self.start


class ShardQueue(JobQueue):
    """What one shard's worker writes to: its own progress; reads of the job go to the queue of record."""

    def __init__(self, real: JobQueue, shard: Shard, on_change, parks: bool = False):
        # parks: its worker stops between units or frames when another client waits (they are kept)
        self.real, self.shard, self.on_change, self.parks = real, shard, on_change, parks

    def submit(self, client, kind, request):
        raise RuntimeError("a shard queues no jobs")

    def get(self, job_id):
        return self.real.get(job_id)

    def list(self, client=None, offset=0, limit=50, statuses=None):
        return self.real.list(client, offset, limit, statuses)

    def claim(self):
        return None

    def save_progress(self, job_id, batches_done, result):
        self.shard.done, self.shard.result = batches_done, result
        self.on_change()

    def park(self, job_id):  # stopped for another client: the coordinator parks the job when all have ended
        self.shard.status = "parked"

    def finish(self, job_id, status, result=None, error=None):
        if result is not None:
            self.shard.result = result
        self.shard.status, self.shard.error = status, error
        self.on_change()

    def cancel(self, job_id, client):
        return self.real.cancel(job_id, client)

    def queued_count(self, client):
        return self.real.queued_count(client)

    def others_waiting(self, client):
        return self.parks and self.real.others_waiting(client)

    def position(self, job_id):
        return -1

    def recover(self, resume=False):
        return []

    def worker_lost(self, job_id, worker, requeue=True):
        return self.real.worker_lost(job_id, worker, requeue)


def shard_job(job: Job, shard: Shard) -> Job:
    """The job a worker runs for ``shard``: batches ``shard.done`` .. ``shard.end``, no grid of its own; a shard
    run again carries on from its own recorded result."""
    request = copy.deepcopy(job.request)
    request["request"]["n_iter"] = shard.end
    request["save_grid"] = False
    return dataclasses.replace(job, request=request, batches_done=shard.done, result=copy.deepcopy(shard.result))


class ShardedRun:
    """Runs ``job``'s batch shards on the pool's slots and records the job in the queue of record. Batch shards
    do not park for other clients (only the contiguous prefix of batches is kept, so a park would make the
    later ranges' batches again)."""

    parks = False

    def __init__(self, pool, job: Job, shards: list[Shard]):
        self.pool, self.job, self.shards = pool, job, shards
        self.queue = pool._service.queue
        self.base = dict(job.result) or {}
        self.lock = threading.Lock()

    def job_for(self, shard: Shard) -> Job:
        return shard_job(self.job, shard)

    def warnings(self) -> list[str]:
        """The warnings of the job so far and of every shard, once each."""
        return sorted({w for s in self.shards for w in s.result.get("warnings", [])} | set(self.base.get("warnings", [])))

    def images(self, prefix_only: bool) -> tuple[int, list[dict]]:
        """(batches done from the job's start, their images in order): the contiguous prefix, or all."""
        batches, images = self.job.batches_done, list(self.base.get("images", []))
        for s in self.shards:
            images += s.result.get("images", [])
            batches = s.done
            if s.done < s.end and prefix_only:
                break
        return batches, images

    def record(self) -> None:
        with self.lock:
            batches, images = self.images(prefix_only=True)
            first = next((s.result for s in self.shards if s.result), {})
            result = {**self.base, "images": images,
                      "warnings": self.warnings(),
                      "job_timestamp": self.base.get("job_timestamp") or first.get("job_timestamp", "")}
            self.queue.save_progress(self.job.id, batches, result)

    def finish(self, lost_worker) -> None:
        """Every shard has ended: the job's outcome in the queue of record."""
        job, service = self.job, self.pool._service
        current = self.queue.get(job.id)
        if current is None or current.status != RUNNING:
            return
        failed = next((s for s in self.shards if s.status == FAILED), None)
        if failed is not None:
            self.record()
            self.queue.finish(job.id, FAILED, {**self.queue.get(job.id).result,
                                               "error_kind": failed.result.get("error_kind", "error")},
                              error=failed.error)
            return
        if lost_worker is not None or any(s.status is None or s.status == "parked" for s in self.shards):
            self.record()  # what is done is kept; the rest runs again from there
            if lost_worker is not None:
                self.pool._lost(job, lost_worker)
            else:
                self.queue.park(job.id)
            return
        last = self.shards[-1].result
        _, images = self.images(prefix_only=False)
        result = {**self.base, **{k: v for k, v in last.items() if k not in ("images", "grid", "extras", "units")},
                  "images": images, "job_timestamp": self.base.get("job_timestamp")
                  or self.shards[0].result.get("job_timestamp", "")}
        result["warnings"] = sorted({w for s in self.shards for w in s.result.get("warnings", [])})
        result["interrupted"] = any(s.result.get("interrupted") for s in self.shards)
        extras = next((s.result["extras"] for s in self.shards if s.result.get("extras")), None)
        if extras:
            result["extras"] = extras
        from .jobs import Txt2ImgJob

        spec = Txt2ImgJob.from_dict(job.request, job.kind)
        if spec.save_images and spec.save_grid and len(images) > 1:
            result["grid"] = str(service._grid(images, spec.request, spec, f"{job.kind}-grids"))
        if self.pool.store is not None:
            self.pool.store.publish(job.id, result)
        cancelled = self.queue.get(job.id).cancel_requested
        self.queue.finish(job.id, CANCELLED if cancelled else DONE, result, error="cancelled" if cancelled else None)


def unit_shard_job(job: Job, shard: Shard) -> Job:
    """The job a worker runs for a script shard: units ``shard.start`` .. ``shard.end`` only, with those of them
    already made (the job's before a pause, or the shard's own before its worker died) stored."""
    request = copy.deepcopy(job.request)
    request["unit_range"] = [shard.start, shard.end]
    request["save_grid"] = False
    made = shard.result.get("units") or {n: r for n, r in job.result.get("units", {}).items()
                                         if shard.start <= int(n) < shard.end}
    return dataclasses.replace(job, request=request, result={"units": copy.deepcopy(made)})


class UnitRun(ShardedRun):
    """Runs a script job's unit shards, then puts the job together in the API process. Its shards stop between
    units when another client waits: every unit made is kept, the job is parked and split again later."""

    parks = True

    def job_for(self, shard: Shard) -> Job:
        return unit_shard_job(self.job, shard)

    def record(self) -> None:
        """Every unit made so far, in the queue of record (a restart or a park resumes from them)."""
        with self.lock:
            units = dict(self.base.get("units", {}))
            for s in self.shards:
                units.update(s.result.get("units", {}))
            first = next((s.result for s in self.shards if s.result.get("job_timestamp")), {})
            result = {**self.base, "units": units,
                      "warnings": self.warnings(),
                      "job_timestamp": self.base.get("job_timestamp") or first.get("job_timestamp", "")}
            self.queue.save_progress(self.job.id, self.job.batches_done, result)

    def finish(self, lost_worker) -> None:
        job, pool = self.job, self.pool
        current = self.queue.get(job.id)
        if current is None or current.status != RUNNING:
            return
        self.record()
        failed = next((s for s in self.shards if s.status == FAILED), None)
        if failed is not None:
            self.queue.finish(job.id, FAILED, {**self.queue.get(job.id).result,
                                               "error_kind": failed.result.get("error_kind", "error")},
                              error=failed.error)
            return
        if lost_worker is not None or any(s.status is None or s.status == "parked" for s in self.shards):
            if lost_worker is not None:  # what is made is kept; the rest is made when it runs again
                pool._lost(job, lost_worker)
            else:
                self.queue.park(job.id)
            return
        from .jobs import Live
        from .store import PublishingQueue, unit_urls

        whole = self.queue.get(job.id)  # its units all recorded: put together here
        live = Live(whole)
        queue = PublishingQueue(self.queue, pool.store) if pool.store is not None else self.queue
        with pool._lock:
            pool.assembling[job.id] = live
        try:
            self.put_together(whole, live, queue)
        finally:
            with pool._lock:
                pool.assembling.pop(job.id, None)
        ended = self.queue.get(job.id)
        if pool.store is not None and ended is not None and ended.status in (DONE, CANCELLED, FAILED):
            pool.store.remove(unit_urls(whole.result))  # the store's unit copies: the job's files replace them

    def put_together(self, whole: Job, live, queue: JobQueue) -> None:
        """The script's own run over the recorded units, making none."""
        self.pool._service.assemble(whole, live, queue)


def frame_shard_job(job: Job, shard: Shard, timestring: str) -> Job:
    """The job a worker runs for a Deforum shard: frames ``shard.done`` .. ``shard.end`` of the run named by
    ``timestring``, into its folder (frames already there are skipped)."""
    request = copy.deepcopy(job.request)
    request["frame_range"] = [shard.done, shard.end]
    return dataclasses.replace(job, request=request, batches_done=shard.done, result={"timestring": timestring})


class FrameRun(UnitRun):
    """Runs a Deforum job's frame ranges, then makes its video in the API process (:meth:`~sdstudio.service.
    jobs.JobService.finish_deforum`). The frames folder must be one the workers and this server share."""

    def __init__(self, pool, job: Job, shards: list[Shard]):
        super().__init__(pool, job, shards)
        if not self.base.get("timestring"):  # every shard writes into the same run
            self.base["timestring"] = pool._service.deforum_timestring(job)
        self.base["split"] = True  # run again on one worker, it goes on by frames (those on disk are kept)
        self.queue.save_progress(job.id, job.batches_done, dict(self.base))

    def job_for(self, shard: Shard) -> Job:
        return frame_shard_job(self.job, shard, self.base["timestring"])

    def record(self) -> None:
        """Frames made so far, and the contiguous prefix as the job's progress (a restart resumes there)."""
        with self.lock:
            prefix = self.job.batches_done
            for s in self.shards:
                prefix = s.done
                if s.done < s.end:
                    break
            counts = [s.result["max_frames"] for s in self.shards if s.result.get("max_frames") is not None]
            result = {**self.base, "frames_done": self.job.batches_done + sum(s.done - s.start for s in self.shards),
                      "warnings": self.warnings()}
            if counts:  # Video Input: the shards read the video's length; the fewest is right
                result["max_frames"] = min(counts)
            outdir = next((s.result["outdir"] for s in self.shards if s.result.get("outdir")), None)
            if outdir:
                result["outdir"] = outdir
            self.queue.save_progress(self.job.id, prefix, result)

    def put_together(self, whole: Job, live, queue: JobQueue) -> None:
        if any(s.result.get("interrupted") for s in self.shards):  # interrupted: its frames, no video
            cancelled = self.queue.get(whole.id).cancel_requested
            queue.finish(whole.id, CANCELLED if cancelled else DONE, {**whole.result, "interrupted": True},
                         error="cancelled" if cancelled else None)
            return
        self.pool._service.finish_deforum(whole, live, queue)
