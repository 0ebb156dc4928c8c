"""The job queue: every job from the UI, the API and the CLI goes through it.

:class:`JobQueue` is the interface the service uses; :class:`SQLiteJobQueue` backs it with an
embedded SQLite file in the data dir (a later backend hands jobs to Ray workers behind the same
methods). A job is a kind (``txt2img``...), the caller's request as JSON and, when it ends, its result
as JSON (paths of the written images, infotexts, seeds).

Order: jobs of one client run first-in first-out; between clients the queue goes round-robin, so a
client's 100-image job does not starve another's single image. A job of several batches can be
*parked* between batches (status back to ``queued`` with ``batches_done`` kept) so the next client
is served, and it resumes where it stopped.

Durability: every change is a committed transaction. A job found ``running`` when the queue opens
was cut off by a crash: :meth:`recover` marks it ``failed`` ("interrupted"), or queues it again to
resume from its last finished batch when asked to (``--resume-queue``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
INTERRUPTED_BY_RESTART = "interrupted: the server stopped while this job ran"


SQLITE_MAX = 2**63 - 1  # SQLite's INTEGER range; a larger offset would raise OverflowError


@dataclass
class Job:
    id: str
    client: str
    kind: str
    status: str
    request: dict
    result: dict = field(default_factory=dict)
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    batches_done: int = 0
    cancel_requested: bool = False

    def public(self) -> dict:
        """The job as the API shows it (without the request's large fields such as init images)."""
        return {"id": self.id, "client": self.client, "kind": self.kind, "status": self.status,
                "error": self.error, "created": self.created, "started": self.started, "finished": self.finished,
                "batches_done": self.batches_done, "result": self.result}


class JobQueue(ABC):
    """What the service needs from a queue; SQLite today, a Ray-backed queue later."""

    @abstractmethod
    def submit(self, client: str, kind: str, request: dict) -> Job: ...

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def list(self, client: str | None = None, offset: int = 0, limit: int = 50,
             statuses: tuple[str, ...] | None = None) -> list[Job]: ...

    @abstractmethod
    def claim(self) -> Job | None:
        """The next job by the round-robin rule, now ``running``; None when nothing waits."""

    @abstractmethod
    def save_progress(self, job_id: str, batches_done: int, result: dict) -> None:
        """Record finished batches and the result so far (outputs are on disk before this)."""

    @abstractmethod
    def park(self, job_id: str) -> None:
        """A running job goes back to ``queued`` keeping its progress, to resume later."""

    @abstractmethod
    def finish(self, job_id: str, status: str, result: dict | None = None, error: str | None = None) -> None: ...

    @abstractmethod
    def cancel(self, job_id: str, client: str | None) -> Job | None:
        """Cancel a queued job at once; flag a running one (its worker stops it). ``client`` None = any."""

    @abstractmethod
    def queued_count(self, client: str) -> int:
        """How many of ``client``'s jobs wait (queued, not running)."""

    @abstractmethod
    def others_waiting(self, client: str) -> bool:
        """Whether a queued job of another client waits (the worker then parks a long job)."""

    @abstractmethod
    def position(self, job_id: str) -> int:
        """How many jobs run before this queued one (0 = next); -1 when it is not queued."""

    @abstractmethod
    def recover(self, resume: bool = False) -> list[str]:
        """After a restart: jobs left ``running`` become failed-interrupted, or queued again."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    client TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    batches_done INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_client ON jobs(client, seq);
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY,
    last_served INTEGER NOT NULL
);
"""


class SQLiteJobQueue(JobQueue):
    """The queue in one SQLite file (WAL mode: readers never wait for the worker)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()  # one connection, used from the worker and the request threads
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- helpers ----------------------------------------------------------------------------------
    def _tx(self):
        return _Transaction(self._db, self._lock)

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        return Job(id=row["id"], client=row["client"], kind=row["kind"], status=row["status"],
                   request=json.loads(row["request"]), result=json.loads(row["result"]), error=row["error"],
                   created=row["created"], started=row["started"], finished=row["finished"],
                   batches_done=row["batches_done"], cancel_requested=bool(row["cancel_requested"]))

    # ---- interface --------------------------------------------------------------------------------
    def submit(self, client: str, kind: str, request: dict) -> Job:
        job_id = uuid.uuid4().hex
        with self._tx() as db:
            db.execute("INSERT INTO jobs (id, client, kind, status, request, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, client, kind, QUEUED, json.dumps(request), time.time()))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._job(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list(self, client: str | None = None, offset: int = 0, limit: int = 50,
             statuses: tuple[str, ...] | None = None) -> list[Job]:
        where, args = [], []
        if client is not None:
            where.append("client = ?")
            args.append(client)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, min(max(0, limit), SQLITE_MAX), min(max(0, offset), SQLITE_MAX)))
            return [self._job(r) for r in rows]

    def _next_row(self, db) -> sqlite3.Row | None:
        # the client served longest ago (never = first) goes next; within a client, oldest job first
        return db.execute(
            "SELECT j.* FROM jobs j LEFT JOIN clients c ON c.client = j.client WHERE j.status = ? "
            "ORDER BY COALESCE(c.last_served, 0), j.seq LIMIT 1", (QUEUED,)).fetchone()

    def claim(self) -> Job | None:
        with self._tx() as db:
            row = self._next_row(db)
            if row is None:
                return None
            turn = db.execute("SELECT COALESCE(MAX(last_served), 0) + 1 FROM clients").fetchone()[0]
            db.execute("INSERT INTO clients (client, last_served) VALUES (?, ?) "
                       "ON CONFLICT(client) DO UPDATE SET last_served = excluded.last_served", (row["client"], turn))
            db.execute("UPDATE jobs SET status = ?, started = COALESCE(started, ?) WHERE id = ?",
                       (RUNNING, time.time(), row["id"]))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def save_progress(self, job_id: str, batches_done: int, result: dict) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET batches_done = ?, result = ? WHERE id = ?",
                       (batches_done, json.dumps(result), job_id))

    def park(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = ? WHERE id = ? AND status = ?", (QUEUED, job_id, RUNNING))

    def finish(self, job_id: str, status: str, result: dict | None = None, error: str | None = None) -> None:
        if status not in FINISHED:
            raise ValueError(f"not a final status: {status}")
        with self._tx() as db:
            if result is None:
                db.execute("UPDATE jobs SET status = ?, error = ?, finished = ? WHERE id = ?",
                           (status, error, time.time(), job_id))
            else:
                db.execute("UPDATE jobs SET status = ?, error = ?, finished = ?, result = ? WHERE id = ?",
                           (status, error, time.time(), json.dumps(result), job_id))

    def cancel(self, job_id: str, client: str | None) -> Job | None:
        with self._tx() as db:
            job = self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            if job is None or (client is not None and job.client != client):
                return None
            if job.status == QUEUED:
                db.execute("UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                           (CANCELLED, time.time(), "cancelled", job_id))
            elif job.status == RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def queued_count(self, client: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND client = ?",
                                    (QUEUED, client)).fetchone()[0]

    def others_waiting(self, client: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE status = ? AND client != ? LIMIT 1",
                                    (QUEUED, client)).fetchone() is not None

    def position(self, job_id: str) -> int:
        with self._lock:
            job = self.get(job_id)
            if job is None or job.status != QUEUED:
                return -1
            # simulate the round-robin rule over what is queued now
            rows = self._db.execute(
                "SELECT j.id, j.client, COALESCE(c.last_served, 0) AS served FROM jobs j "
                "LEFT JOIN clients c ON c.client = j.client WHERE j.status = ? ORDER BY j.seq", (QUEUED,)).fetchall()
        pending: dict[str, list[str]] = {}
        served: dict[str, int] = {}
        for r in rows:
            pending.setdefault(r["client"], []).append(r["id"])
            served[r["client"]] = r["served"]
        first_seq = {c: i for i, c in enumerate(pending)}
        turn = max(served.values(), default=0)
        n = 0
        while pending:
            client = min(pending, key=lambda c: (served[c], first_seq[c]))
            if pending[client].pop(0) == job_id:
                return n
            n += 1
            turn += 1
            served[client] = turn
            if not pending[client]:
                del pending[client]
        return -1

    def recover(self, resume: bool = False) -> list[str]:
        with self._tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = ?", (RUNNING,))]
            if resume:
                db.execute("UPDATE jobs SET status = ? WHERE status = ? AND cancel_requested = 0", (QUEUED, RUNNING))
            db.execute("UPDATE jobs SET status = ?, error = ?, finished = ? WHERE status = ?",
                       (FAILED, INTERRUPTED_BY_RESTART, time.time(), RUNNING))
            return ids


class _Transaction:
    """``with`` block = one ``BEGIN IMMEDIATE`` transaction, committed on success."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
