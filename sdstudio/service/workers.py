"""Execution apart from storage: the queue of record decides *which* job runs next; a :class:`Worker` runs it.

:class:`~sdstudio.service.jobs.JobService` alone runs its jobs on its own thread (one process, one device).
Given a :class:`WorkerPool`, it hands them to the pool instead: the pool's dispatcher claims the next job by
the queue's round-robin rule whenever a worker is free (so fairness between clients and the per-client limits
hold however many workers there are), and places it by *affinity*: the free worker that has the job's
checkpoint, LoRAs and ControlNets loaded already, else the least loaded one.

A worker is anything that can run one claimed job to its end and report as it goes:

* :class:`LocalWorker`: in this process, through a :class:`JobService`'s own runners (the in-process
  thread's code path, with its engine and model cache).
* :class:`~sdstudio.service.ray_workers.RayWorker`: a Ray actor on some GPU of a cluster, with its own engine
  and model cache; its progress, previews and queue writes travel back over actor calls.

The pool keeps one :class:`~sdstudio.service.jobs.Live` per running job: the service's progress, previews,
interrupt, skip and cancel read and set it whichever worker runs the job. A worker that dies mid-job
(:class:`WorkerLost`) has its job queued again exactly once, to resume from its last recorded batch on
another worker; a second loss fails the job, naming both workers. The count is the queue of record's
(:meth:`~sdstudio.service.queue.JobQueue.worker_lost`), so a restarted API server, or another one sharing a
PostgreSQL queue, does not queue a job again that was queued again once already.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from .queue import CANCELLED, FAILED, RUNNING, Job, JobQueue

log = logging.getLogger(__name__)

LOST_TWICE = "the workers running this job died twice ({first}, then {second}); it is not queued again"


class WorkerLost(Exception):
    """The worker went away while it ran a job (its process or machine died, or it was killed)."""


@dataclass
class Link:
    """What a worker needs from the API side while it runs a job: the queue of record (its writes go there),
    a way to wake the service's waiters, and the live-preview settings of the moment."""

    queue: JobQueue
    notify: Callable[[], None]
    preview_settings: Callable[[], tuple[str, int]]


class Worker(ABC):
    """Runs claimed jobs, one at a time (a device)."""

    name: str = "worker"
    alive: bool = True
    shardable: bool = False  # whether its queue writes go where ``link.queue`` says (a job's batches can split)

    @abstractmethod
    def run(self, job: Job, live, link: Link) -> None:
        """Run ``job`` (already ``running`` in the queue) to its end: by the time this returns, the queue
        holds its outcome (done, failed, cancelled or parked). ``live`` is the API side's view of the job:
        the worker keeps its step, batch and preview current and obeys its ``interrupted`` and ``skip``.
        Raises :class:`WorkerLost` when the worker died on the way."""

    def resources(self) -> set[str]:
        """The model files (resolved paths) this worker has loaded now (affinity)."""
        return set()

    def check(self) -> bool:
        """Whether the worker still answers (after a :class:`WorkerLost`); sets :attr:`alive`."""
        return self.alive

    def close(self) -> None:
        """Release the worker (its process, its models)."""

    def describe(self) -> dict:
        return {"name": self.name, "alive": self.alive}


def loaded_resources(engine) -> set[str]:
    """The model files an engine holds in its caches: checkpoints, parsed LoRAs, ControlNet models."""
    from pathlib import Path

    out: set[str] = set()
    for key in list(getattr(engine.models, "_items", {})):
        out.add(str(Path(key[0]).resolve()))
    for key in list(getattr(engine, "_loras", {})):
        out.add(str(Path(key[0]).resolve()))
    cache = getattr(getattr(engine, "controlnets", None), "_cache", None)
    for key in list(getattr(cache, "_items", {}) if cache is not None else {}):
        out.add(str(Path(key[0]).resolve()))
    return out


# accelerate's init_empty_weights (the loaders build modules on the meta device) patches torch for the whole
# process while a checkpoint loads: two in-process workers must not load at the same time
_LOAD_LOCK = threading.Lock()


class LocalWorker(Worker):
    """In this process: ``executor``'s runners on its engine (the code the service's own thread runs). The
    executor writes to its own queue, which must be the queue of record. Several local workers in one
    process share its cores and load their checkpoints one at a time; devices of their own (and no shared
    process state) are what Ray workers give."""

    def __init__(self, executor, name: str = "local"):
        self.executor, self.name = executor, name

    def run(self, job: Job, live, link: Link) -> None:
        if job.kind in ("txt2img", "img2img"):
            req = job.request.get("request", {})
            with _LOAD_LOCK:
                try:
                    self.executor.engine.load(req.get("model"), req.get("model_hash"))
                except Exception as exc:  # noqa: BLE001 - the job's own run reports it
                    log.debug("job %s: preloading its checkpoint: %s", job.id, exc)
        self.executor._run(job, live)

    def resources(self) -> set[str]:
        return loaded_resources(self.executor.engine)


@dataclass
class _Slot:
    worker: Worker
    running: dict[str, object] = field(default_factory=dict)  # job id -> Live
    done: int = 0  # jobs finished on this worker (least loaded: fewer running, then fewer done)
    resources: set[str] = field(default_factory=set)


class WorkerPool:
    """Runs a service's queue on several workers. ``catalog`` (a :class:`~sdstudio.service.catalog.
    ModelCatalog`) names each job's model files for the affinity; without it jobs go to the least loaded
    worker. ``respawn`` makes a new worker in place of one that died (None: the pool goes on with fewer).
    ``on_close`` runs after the workers are closed (a local Ray cluster's shutdown)."""

    def __init__(self, workers: list[Worker], *, catalog=None, capacity: int = 1,
                 on_close: Callable[[], None] | None = None, respawn: Callable[[Worker], Worker] | None = None,
                 split_batches: bool = False, store=None):
        if not workers:
            raise ValueError("a worker pool needs at least one worker")
        self.slots = [_Slot(w) for w in workers]
        self.catalog, self.capacity, self.on_close, self.respawn = catalog, capacity, on_close, respawn
        # split_batches: a job of several batches, or a script's independent units (X/Y/Z cells, prompt-file
        # lines), runs on every free (shardable) worker at once (shards.py);
        # store: where the pool's own files (a split job's grid) are published
        self.split_batches, self.store = split_batches, store
        self.replaced: list[tuple[str, str]] = []  # (dead worker, its replacement)
        self.placements: list[tuple[str, str]] = []  # (job id, worker name), in dispatch order
        # job id -> the worker that died running it here (the durable record is the queue's: Job.lost_worker)
        self.losses: dict[str, str] = {}
        self.assembling: dict[str, object] = {}  # job id -> Live: split script jobs being put together here
        self._service = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._dispatcher: threading.Thread | None = None
        self._closed = False

    @property
    def workers(self) -> list[Worker]:
        return [s.worker for s in self.slots]

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, service) -> WorkerPool:
        """Start dispatching ``service``'s queue."""
        self._service = service
        if self._dispatcher is None:
            self._stop.clear()
            self._dispatcher = threading.Thread(target=self._loop, name="sdstudio-dispatcher", daemon=True)
            self._dispatcher.start()
        return self

    def stop(self, timeout: float = 30.0, close: bool = True) -> None:
        """Stop dispatching, interrupt the running jobs and wait for them; then close the workers."""
        self._stop.set()
        for live in self.lives():
            live.interrupted = True
        if self._service is not None:
            self._service._notify()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
            self._dispatcher = None
        end = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))
        if close and not self._closed:
            self._closed = True
            for w in self.workers:
                try:
                    w.close()
                except Exception:
                    log.exception("closing worker %s", w.name)
            if self.on_close is not None:
                on_close, self.on_close = self.on_close, None
                on_close()

    # ---- what the service reads -----------------------------------------------------------------
    def lives(self) -> list:
        with self._lock:
            return [live for s in self.slots for live in s.running.values()] + list(self.assembling.values())

    def describe(self) -> list[dict]:
        with self._lock:
            return [{**s.worker.describe(), "running": list(s.running), "jobs_done": s.done} for s in self.slots]

    # ---- dispatching ----------------------------------------------------------------------------
    def choose(self, job: Job, free: list[_Slot]) -> _Slot:
        """The free worker for ``job``: most of its model files loaded, then fewest running, then fewest done."""
        return self.ranked(job, free)[0]

    def ranked(self, job: Job, free: list[_Slot]) -> list[_Slot]:
        """``free`` best first for ``job`` (see :meth:`choose`)."""
        needs = self.catalog.resources(job.kind, job.request) if self.catalog is not None else set()
        order = {id(s): i for i, s in enumerate(self.slots)}
        return sorted(free, key=lambda s: (-len(needs & s.resources), len(s.running), s.done, order[id(s)]))

    def _free(self) -> list[_Slot]:
        with self._lock:
            return [s for s in self.slots if s.worker.alive and len(s.running) < self.capacity]

    def _loop(self) -> None:
        from .jobs import Live

        service = self._service
        while not self._stop.is_set():
            free = self._free()
            job = service.queue.claim() if free else None
            if job is None:
                with service.changed:
                    if not self._stop.is_set():
                        service.changed.wait(0.5)
                continue
            if self._split(job, free):
                continue
            slot = self.choose(job, free)
            live = Live(job)
            with self._lock:
                slot.running[job.id] = live
                self.placements.append((job.id, slot.worker.name))
            t = threading.Thread(target=self._run_on, args=(slot, job, live), daemon=True,
                                 name=f"sdstudio-job-{slot.worker.name}")
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()
            service._notify()

    def _split(self, job: Job, free: list[_Slot]) -> bool:
        """Start ``job`` as shards over the free workers when it splits (several batches or independent script
        units left, several workers free)."""
        from .jobs import Live
        from .shards import FrameRun, Shard, ShardedRun, UnitRun, split_of, split_ranges

        usable = [s for s in free if s.worker.shardable]
        if not self.split_batches or len(usable) < 2:
            return False
        split = split_of(job, self._service.studio)
        if split is None:
            return False
        slots = self.ranked(job, usable)[:split.end - split.start]
        assignments = [(slot, Shard(a, b)) for slot, (a, b) in zip(slots, split_ranges(split.start, split.end,
                                                                                      len(slots)))]
        run_type = {"units": UnitRun, "frames": FrameRun}.get(split.mode, ShardedRun)
        with self._lock:
            for slot, shard in assignments:
                slot.running[job.id] = Live(job)
                shard.worker = slot.worker.name
                self.placements.append((job.id, slot.worker.name))
        t = threading.Thread(target=self._run_sharded, args=(job, assignments, run_type), daemon=True,
                             name=f"sdstudio-split-{job.id[:8]}")
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        self._service._notify()
        return True

    def _run_sharded(self, job: Job, assignments, run_type) -> None:
        from .shards import ShardQueue

        service = self._service
        run = run_type(self, job, [shard for _, shard in assignments])
        lost: list = []

        def one(slot: _Slot, shard) -> None:
            link = Link(ShardQueue(service.queue, shard, run.record, parks=run.parks), service._notify,
                        service.preview_settings)
            try:
                slot.worker.run(run.job_for(shard), slot.running[job.id], link)
            except WorkerLost as exc:
                log.warning("worker %s died running batches %d-%d of job %s: %s", slot.worker.name, shard.done,
                            shard.end - 1, job.id, exc)
                if not slot.worker.check():
                    self._replace(slot)
                lost.append((shard, slot.worker))
            except Exception as exc:
                log.exception("job %s (batches %d-%d) on worker %s", job.id, shard.start, shard.end - 1,
                              slot.worker.name)
                shard.status, shard.error = FAILED, f"{type(exc).__name__}: {exc}"
            finally:
                self._release(slot, job.id)

        try:
            threads = [threading.Thread(target=one, args=a, daemon=True) for a in assignments]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            lost_worker = None
            while lost:
                shard, worker = lost.pop(0)
                if service.queue.worker_lost(job.id, worker.name, requeue=False) is not None:
                    lost_worker = worker  # the job's second loss: it fails (finish -> _lost)
                    break
                self.losses[job.id] = worker.name
                slot = self._take_slot(job)
                if slot is None:  # the pool is stopping: what is done is kept, the job waits for a restart
                    run.record()
                    service.queue.park(job.id)
                    return
                shard.worker = slot.worker.name
                one(slot, shard)  # its remaining batches, elsewhere
            run.finish(lost_worker)
        except Exception as exc:
            log.exception("split job %s", job.id)
            current = service.queue.get(job.id)
            if current is not None and current.status == RUNNING:
                service.queue.finish(job.id, FAILED, current.result, error=f"{type(exc).__name__}: {exc}")
        finally:
            service._notify()

    def _take_slot(self, job: Job) -> _Slot | None:
        """A free worker for ``job`` (waiting for one), marked busy with it; None when the pool stops."""
        from .jobs import Live

        while not self._stop.is_set():
            free = [s for s in self._free() if s.worker.shardable]
            if free:
                slot = self.choose(job, free)
                with self._lock:
                    if len(slot.running) < self.capacity and slot.worker.alive:
                        slot.running[job.id] = Live(job)
                        self.placements.append((job.id, slot.worker.name))
                        return slot
            with self._service.changed:
                self._service.changed.wait(0.5)
        return None

    def _release(self, slot: _Slot, job_id: str) -> None:
        try:
            resources = slot.worker.resources() if slot.worker.alive else set()
        except Exception:  # noqa: BLE001 - a worker that cannot say has nothing we can count on
            resources = set()
        with self._lock:
            slot.running.pop(job_id, None)
            slot.done += 1
            slot.resources = resources
        self._service._notify()

    def _run_on(self, slot: _Slot, job: Job, live) -> None:
        service = self._service
        link = Link(service.queue, service._notify, service.preview_settings)
        try:
            slot.worker.run(job, live, link)
        except WorkerLost as exc:
            log.warning("worker %s died running job %s: %s", slot.worker.name, job.id, exc)
            if not slot.worker.check():
                self._replace(slot)
            self._lost(job, slot.worker)
        except Exception as exc:
            log.exception("job %s on worker %s", job.id, slot.worker.name)
            current = service.queue.get(job.id)
            if current is not None and current.status == RUNNING:
                service.queue.finish(job.id, FAILED, current.result, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._release(slot, job.id)

    def _replace(self, slot: _Slot) -> None:
        """A new worker in the dead one's place, made on a thread of its own (loading takes a while)."""
        if self.respawn is None or self._stop.is_set():
            return
        dead = slot.worker

        def make() -> None:
            try:
                new = self.respawn(dead)
            except Exception:
                log.exception("no replacement for worker %s", dead.name)
                return
            if self._stop.is_set():
                new.close()
                return
            with self._lock:
                slot.worker, slot.resources = new, set()
                self.replaced.append((dead.name, new.name))
            log.warning("worker %s replaces %s", new.name, dead.name)
            self._service._notify()

        threading.Thread(target=make, name=f"sdstudio-respawn-{dead.name}", daemon=True).start()

    def _lost(self, job: Job, worker: Worker) -> None:
        """The worker died mid-job: queue it again (keeping its finished batches) once; a second time, fail it."""
        queue = self._service.queue
        current = queue.get(job.id)
        if current is None or current.status != RUNNING:  # it ended before the worker did
            return
        if current.cancel_requested:
            queue.finish(job.id, CANCELLED, current.result, error="cancelled")
            return
        first = queue.worker_lost(job.id, worker.name)  # the first time: back to queued, batches_done kept
        if first is not None:
            queue.finish(job.id, FAILED, {**current.result, "error_kind": "worker_lost"},
                         error=LOST_TWICE.format(first=first, second=worker.name))
            return
        self.losses[job.id] = worker.name  # it resumes from its last recorded batch on another worker
