"""Generation workers as Ray actors: one per GPU of a Ray cluster (or N CPU workers), each with its own engine
and model cache, fed by the API process's queue of record (``--ray`` / ``--workers ray://HEAD:PORT``).

What runs where:

* The API process (FastAPI, the UI, the queue of record, the dispatcher of
  :class:`~sdstudio.service.workers.WorkerPool`) claims jobs and sends each to a :class:`GenerationActor`.
* Each actor runs the job with the code the in-process worker runs (a :class:`~sdstudio.service.jobs.JobService`
  of its own over a :class:`RelayQueue`), on its own device, and writes the pictures to its outputs folder
  (and to the output store, ``--output-store``).
* The actor's queue writes (finished batches, park, finish) are events the API side fetches with a long-poll
  actor call and applies to the queue of record in order; the actor waits until each is applied before it
  goes on, so a batch the queue records is on disk (and in the store) and a worker's death loses at most the
  batch it was making. The same call carries the live state (step, batch, preview PNG) back and the
  interrupt / skip / cancel flags and the live-preview settings out.

Ray is optional (``pip install 'sdstudio[ray]'``): nothing here imports it until a pool is started.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.paths import DeviceOptions, Paths
from .queue import QUEUED, Job, JobQueue
from .workers import Link, Worker, WorkerLost, WorkerPool, loaded_resources

log = logging.getLogger(__name__)

ACK_TIMEOUT = 120.0  # how long an actor waits for the API side to record a write before it goes on anyway


class WorkerSetupError(Exception):
    """Ray or its workers cannot be started as asked (the message says why and what to do)."""


@dataclass
class WorkerSpec:
    """What a worker builds its engine from. The model folders must be at the same paths on every node
    (shared storage, or the same files copied); outputs go to the node's outputs folder and the store."""

    paths: Paths
    device: DeviceOptions = field(default_factory=DeviceOptions)
    plugin_flags: dict = field(default_factory=dict)  # extensions_dir, disable_all_extensions, disabled...
    store_url: str | None = None
    cache_size: int = 1  # checkpoints each worker keeps loaded
    setup: Callable | None = None  # called with the worker's JobService once built (a test's step hold)


class RelayQueue(JobQueue):
    """The queue a worker's :class:`JobService` sees: the one job it runs. Writes become numbered events for
    the API side (each waits until it is acknowledged); cancel and "others waiting" come from the API side."""

    def __init__(self, store=None):
        self.store = store
        self.cond = threading.Condition()
        self.on_change: Callable[[], None] = lambda: None
        self.job: Job | None = None
        self.events: list[dict] = []
        self.next_seq = 0
        self.acked = 0
        self.cancel_requested = False
        self.others = False

    def begin(self, job: Job) -> None:
        with self.cond:
            self.job = dataclasses.replace(job)
            self.cancel_requested, self.others = job.cancel_requested, False

    def ack(self, since: int) -> None:
        with self.cond:
            if since > self.acked:
                self.acked = since
                self.events = [e for e in self.events if e["seq"] >= since]
                self.cond.notify_all()

    def pending(self, since: int) -> list[dict]:
        with self.cond:
            return [e for e in self.events if e["seq"] >= since]

    def _emit(self, op: str, **data) -> None:
        with self.cond:
            seq = self.next_seq
            self.next_seq += 1
            self.events.append({"seq": seq, "op": op, **json.loads(json.dumps(data))})
        self.on_change()
        with self.cond:
            if not self.cond.wait_for(lambda: self.acked > seq, ACK_TIMEOUT):
                log.warning("job %s: the API side did not record its %s within %.0f s; going on",
                            data.get("job_id"), op, ACK_TIMEOUT)

    def _mine(self, job_id: str) -> Job | None:
        job = self.job
        if job is None or job.id != job_id:
            return None
        return dataclasses.replace(job, cancel_requested=self.cancel_requested)

    # ---- JobQueue -------------------------------------------------------------------------------
    def submit(self, client, kind, request):
        raise RuntimeError("a worker does not queue jobs; the API process does")

    def get(self, job_id):
        return self._mine(job_id)

    def list(self, client=None, offset=0, limit=50, statuses=None):
        job = self._mine(self.job.id) if self.job is not None else None
        if job is None or (client is not None and job.client != client) or (statuses and job.status not in statuses):
            return []
        return [job][offset:offset + limit]

    def claim(self):
        return None

    def save_progress(self, job_id, batches_done, result):
        if self.store is not None:
            self.store.publish(job_id, result)
        if self.job is not None and self.job.id == job_id:
            self.job.batches_done, self.job.result = batches_done, result
        self._emit("progress", job_id=job_id, batches_done=batches_done, result=result)

    def park(self, job_id):
        if self.job is not None and self.job.id == job_id:
            self.job.status = QUEUED
        self._emit("park", job_id=job_id)

    def finish(self, job_id, status, result=None, error=None):
        if self.store is not None and result is not None:
            self.store.publish(job_id, result)
        if self.job is not None and self.job.id == job_id:
            self.job.status = status
        self._emit("finish", job_id=job_id, status=status, result=result, error=error)

    def cancel(self, job_id, client):
        return None

    def queued_count(self, client):
        return 0

    def others_waiting(self, client):
        return self.others

    def position(self, job_id):
        return -1

    def recover(self, resume=False):
        return []

    def worker_lost(self, job_id, worker, requeue=True):
        raise RuntimeError("a worker's loss is recorded by the API process")


def _snapshot(live) -> dict:
    if live is None:
        return {}
    return {"job_no": live.job_no, "job_count": live.job_count, "step": live.step, "steps": live.steps,
            "phase": live.phase, "textinfo": live.textinfo, "preview_no": live.preview_no,
            "paused_for_others": live.paused_for_others, "interrupted": live.interrupted, "skip": live.skip}


class GenerationActor:
    """One worker (the class Ray runs as an actor): an engine on this actor's device, a job service over a
    :class:`RelayQueue`, and the calls the API side makes: :meth:`run`, :meth:`events`, :meth:`ping`."""

    def __init__(self, spec: WorkerSpec):
        from ..engine.generate import Engine
        from .jobs import JobService
        from .store import open_store

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.spec = spec
        engine = Engine(spec.paths, spec.device, cache_size=spec.cache_size)
        studio, plugins = None, None
        if spec.plugin_flags:
            from ..flags import studio_from

            flags = dict(spec.plugin_flags)
            disabled = flags.pop("disabled", None)
            studio, plugins = studio_from(argparse.Namespace(**flags), engine, disabled)
        self.relay = RelayQueue(open_store(spec.store_url, spec.paths.data_dir))
        self.preview = ("Approx cheap", 1)
        self.service = JobService(engine, self.relay, studio=studio, plugins=plugins,
                                  preview_settings=lambda: self.preview)
        self.relay.on_change = self.service._notify
        self.controls: dict[str, dict] = {}  # job id -> the API side's last flags (may come before run)
        self.lives: dict[str, object] = {}
        self.running: str | None = None
        self.ended: list[str] = []  # the last jobs run here (an events call for one returns at once)
        if spec.setup is not None:
            spec.setup(self.service)

    def ping(self) -> dict:
        import socket

        plan = self.service.engine.plan
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(plan.device),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "resources": sorted(self.resources())}

    def resources(self) -> set[str]:
        return loaded_resources(self.service.engine)

    def state(self, job_id: str) -> dict:
        """The live state of ``job_id`` here ({} when it is not running here), with the flags received."""
        return _snapshot(self.lives.get(job_id))

    def run(self, job: dict, preview: tuple) -> None:
        from .jobs import Live

        job = Job(**job)
        self.preview = tuple(preview)
        self.service.engine.registry.refresh()  # a checkpoint another worker merged or trained since
        self.relay.begin(job)
        live = Live(job)
        self.lives[job.id] = live
        self._apply(job.id)
        self.running = job.id
        try:
            self.service._run(job, live)
        finally:
            self.running = None
            self.ended = [*self.ended[-99:], job.id]
            self.lives.pop(job.id, None)
            self.controls.pop(job.id, None)
            self.service._notify()

    def _apply(self, job_id: str) -> None:
        c = self.controls.get(job_id)
        live = self.lives.get(job_id)
        if c is None:
            return
        self.relay.cancel_requested = bool(c.get("cancel_requested"))
        self.relay.others = bool(c.get("others_waiting"))
        if c.get("preview"):
            self.preview = tuple(c["preview"])
        if live is not None:
            if c.get("interrupted"):
                live.interrupted = True
            if c.pop("skip", False):
                live.skip = True

    def events(self, job_id: str, since: int, preview_seen: int, controls: dict, timeout: float) -> dict:
        """Acknowledge the events before ``since``, take the API side's flags, and return (at once when
        there are events, else after the live state changed, at most ``timeout`` s later) the events from
        ``since``, the live state, and the live preview when it is newer than ``preview_seen``."""
        svc = self.service
        c = self.controls.setdefault(job_id, {})
        c.update({k: v for k, v in controls.items() if k != "skip"})
        if controls.get("skip"):
            c["skip"] = True
        if job_id in self.lives:
            self._apply(job_id)
        self.relay.ack(since)
        start = time.monotonic()
        deadline = start + timeout
        version = svc.version
        while True:
            now = time.monotonic()
            if self.relay.pending(since) or now >= deadline or job_id in self.ended:
                break
            if self.running == job_id and svc.version != version and now - start >= 0.05:
                break  # the live state changed (a step): at most 20 replies a second
            svc.wait_for_change(svc.version, min(deadline - now, 0.05))
        live = self.lives.get(job_id)
        reply = {"events": self.relay.pending(since), "live": _snapshot(live), "running": self.running == job_id,
                 "preview": None}
        if live is not None and live.preview is not None and live.preview_no > preview_seen:
            buf = io.BytesIO()
            live.preview.save(buf, format="PNG")
            reply["preview"] = [live.preview_no, buf.getvalue()]
        if not reply["running"]:
            reply["resources"] = sorted(self.resources())
        return reply


class RayWorker(Worker):
    """The API side of one :class:`GenerationActor`."""

    shardable = True  # its writes are applied to link.queue

    def __init__(self, actor, name: str, poll: float = 0.25):
        self.actor, self.name, self.poll = actor, name, poll
        self.info: dict = {}
        self._resources: set[str] = set()

    def run(self, job: Job, live, link: Link) -> None:
        import ray
        from ray.exceptions import RayActorError

        ref = self.actor.run.remote(dataclasses.asdict(job), list(link.preview_settings()))
        since, preview_seen = 0, 0
        while True:
            ready = bool(ray.wait([ref], timeout=0)[0])
            current = link.queue.get(job.id)
            controls = {"interrupted": live.interrupted, "skip": live.skip,
                        "cancel_requested": bool(current and current.cancel_requested),
                        "others_waiting": link.queue.others_waiting(job.client),
                        "preview": list(link.preview_settings())}
            if live.skip:
                live.skip = False  # handed over: the worker resets its own after the batch
            try:
                reply = ray.get(self.actor.events.remote(job.id, since, preview_seen, controls,
                                                         0.0 if ready else self.poll))
            except RayActorError as exc:
                raise WorkerLost(f"{self.name}: {exc}") from None
            for event in reply["events"]:
                _apply_event(link.queue, event)
                since = event["seq"] + 1
            self._mirror(live, reply)
            if reply["preview"] is not None:
                from PIL import Image

                preview_seen = reply["preview"][0]
                live.preview = Image.open(io.BytesIO(reply["preview"][1]))
                live.preview.load()
                live.preview_no += 1
            if "resources" in reply:
                self._resources = set(reply["resources"])
            link.notify()
            if ready and not reply["events"]:
                break
            if not reply["running"] and not reply["events"]:  # it ended here: its return is on the way
                ray.wait([ref], timeout=self.poll)
        try:
            ray.get(ref)
        except RayActorError as exc:
            raise WorkerLost(f"{self.name}: {exc}") from None
        except ray.exceptions.RayTaskError as exc:  # a bug in the worker (a job's own errors fail the job there)
            raise RuntimeError(f"worker {self.name}: {exc}") from None

    @staticmethod
    def _mirror(live, reply: dict) -> None:
        state = reply.get("live") or {}
        for key in ("job_no", "job_count", "step", "steps", "phase", "textinfo", "paused_for_others"):
            if key in state:
                setattr(live, key, state[key])
        request = live.job.request.get("request", {}) if live.job.kind in ("txt2img", "img2img") else {}
        if request and not request.get("script_name"):  # a shard runs up to its own end: the job's count shows
            live.job_count = int(request.get("n_iter", live.job_count))

    def resources(self) -> set[str]:
        return set(self._resources)

    def check(self) -> bool:
        import ray

        try:
            self.info = ray.get(self.actor.ping.remote(), timeout=600)  # a restarting worker loads first
            self.alive = True
        except Exception:  # noqa: BLE001 - gone, or not answering: not given jobs any more
            self.alive = False
        return self.alive

    def close(self) -> None:
        import ray

        if not ray.is_initialized():  # Ray is shut down already (its workers with it); a call would start one
            self.alive = False
            return
        try:
            ray.kill(self.actor)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("worker %s: %s", self.name, exc)
        self.alive = False

    def describe(self) -> dict:
        return {"name": self.name, "alive": self.alive, **{k: v for k, v in self.info.items() if k != "resources"},
                "loaded": sorted(Path(p).name for p in self._resources)}


def _apply_event(queue: JobQueue, event: dict) -> None:
    op = event["op"]
    if op == "progress":
        queue.save_progress(event["job_id"], event["batches_done"], event["result"])
    elif op == "park":
        queue.park(event["job_id"])
    elif op == "finish":
        queue.finish(event["job_id"], event["status"], event["result"], event["error"])


def worker_env(threads: int = 1) -> dict[str, str]:
    """The environment of a worker process: ``threads`` math threads (a CPU worker owns one core), offline."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}


def start_ray_pool(spec: WorkerSpec, *, address: str | None = None, cpu_workers: int | None = None,
                   catalog=None, object_store_mb: int = 128, poll: float = 0.25,
                   split_batches: bool = True) -> WorkerPool:
    """A pool of :class:`GenerationActor` workers. ``address`` None: a local Ray started here (shut down when
    the pool closes); ``ray://HEAD:10001`` (Ray Client) or ``HEAD:6379`` / ``auto``: an existing cluster.
    One worker per GPU of the cluster, or ``cpu_workers`` CPU workers (one core and one math thread each).
    ``split_batches``: a job of several batches runs on every free worker at once (:mod:`.shards`)."""
    try:
        import ray
    except ImportError:
        raise WorkerSetupError("Ray is not installed: pip install 'sdstudio[ray]' (or pip install ray)") from None
    if cpu_workers is not None and cpu_workers < 1:
        raise WorkerSetupError(f"--ray-cpu-workers must be at least 1, got {cpu_workers}")
    started = False
    if not ray.is_initialized():
        try:
            if address is None:
                kw = {"num_cpus": cpu_workers} if cpu_workers else {}
                ray.init(include_dashboard=False, object_store_memory=object_store_mb * 1024 * 1024,
                         log_to_driver=False, configure_logging=False, **kw)
                started = True
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - Ray's own errors name the address and the cause
            raise WorkerSetupError(f"cannot start or reach Ray ({address or 'local'}): {type(exc).__name__}: {exc}") \
                from None
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cpu_workers:
        count, options = cpu_workers, {"num_cpus": 1, "num_gpus": 0}
        env = worker_env(1)
    elif gpus:
        count, options = gpus, {"num_cpus": 0, "num_gpus": 1}
        env = worker_env(int(os.environ.get("SDSTUDIO_WORKER_THREADS", "4")))
    else:
        if started:
            ray.shutdown()
        raise WorkerSetupError("the Ray cluster has no GPU: give --ray-cpu-workers N to run N CPU workers")
    # max_restarts: a worker process that crashes (out of memory...) comes back by itself, with a fresh model
    # cache; one killed for good (ray.kill) is replaced by the pool
    remote = ray.remote(GenerationActor).options(max_concurrency=4, max_restarts=2,
                                                 runtime_env={"env_vars": env}, **options)
    actors = [remote.remote(spec) for _ in range(count)]
    workers = [RayWorker(a, f"ray-{i}", poll) for i, a in enumerate(actors)]
    made = [count]

    def respawn(dead: Worker) -> Worker:
        worker = RayWorker(remote.remote(spec), f"ray-{made[0]}", poll)
        made[0] += 1
        if not worker.check():
            worker.close()
            raise WorkerSetupError(f"{worker.name} did not start")
        return worker

    try:
        infos = ray.get([a.ping.remote() for a in actors], timeout=600)
    except Exception as exc:  # noqa: BLE001 - a worker that cannot build its engine
        for w in workers:
            w.close()
        if started:
            ray.shutdown()
        raise WorkerSetupError(f"the Ray workers did not start: {type(exc).__name__}: {exc}") from None
    for w, info in zip(workers, infos):
        w.info = info
    from .store import open_store

    return WorkerPool(workers, catalog=catalog, on_close=ray.shutdown if started else None, respawn=respawn,
                      split_batches=split_batches, store=open_store(spec.store_url, spec.paths.data_dir))
