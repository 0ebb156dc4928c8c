"""The job queue: every job from the UI, the API and the CLI goes through it.

:class:`JobQueue` is the interface the service uses. :class:`SQLJobQueue` writes its rules once in SQL;
:class:`SQLiteJobQueue` runs them on an embedded SQLite file in the data dir and
:class:`~sdstudio.service.pgqueue.PostgresJobQueue` on a PostgreSQL server that several API servers share
(each only a dialect: placeholders, table names, column types, locking). A job is a kind (``txt2img``...), the caller's request as JSON and, when it ends, its result
as JSON (paths of the written images, infotexts, seeds).

Order: jobs of one client run first-in first-out; between clients the queue goes round-robin, so a
client's 100-image job does not starve another's single image. A job of several batches can be
*parked* between batches (status back to ``queued`` with ``batches_done`` kept) so the next client
is served, and it resumes where it stopped.

Durability: every change is a committed transaction. A job found ``running`` when the queue opens
was cut off by a crash: :meth:`recover` marks it ``failed`` ("interrupted"), or queues it again to
resume from its last finished batch when asked to (``--resume-queue``).

Leases (a queue several API servers share): a server renews the lease of the jobs it runs every few
seconds (:meth:`JobQueue.renew_leases`); a running job whose lease another server finds expired
(:meth:`JobQueue.take_over`) belonged to a server that died and is not coming back soon: it is queued
again, once, to resume from its last finished batch, as when one of its workers dies; a second time it
fails, naming both servers.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
INTERRUPTED_BY_RESTART = "interrupted: the server stopped while this job ran"
SERVER_LOST_TWICE = ("the servers running this job stopped renewing its lease twice ({first}, then {second}); "
                     "it is not queued again")



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
    requeues: int = 0  # times a worker died running it and it was queued again (at most once)
    lost_worker: str | None = None  # the worker whose death queued it again

    def public(self) -> dict:
        """The job as the API shows it (without the request's large fields such as init images)."""
        return {"id": self.id, "client": self.client, "kind": self.kind, "status": self.status,
                "error": self.error, "created": self.created, "started": self.started, "finished": self.finished,
                "batches_done": self.batches_done, "requeues": self.requeues, "lost_worker": self.lost_worker,
                "result": self.result}


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

    def renew_leases(self) -> None:
        """This server still runs its running jobs (a queue only one server uses needs no leases)."""

    def take_over(self, lease: float) -> list[tuple[str, str]]:
        """Running jobs of other servers whose lease is older than ``lease`` seconds: each queued again once
        (the first time) or failed; returns (job id, new status) pairs."""
        return []

    @abstractmethod
    def worker_lost(self, job_id: str, worker: str, requeue: bool = True) -> str | None:
        """A worker died running ``job_id``. The first time: the loss is recorded with the job (a restart of
        the API server keeps it) and, with ``requeue``, the job goes back to ``queued`` keeping its progress;
        returns None. Any later time: returns the worker recorded the first time and changes nothing (the
        caller fails the job: it is queued again exactly once)."""


# One schema and one set of statements for every SQL backend: ``{jobs}`` / ``{clients}`` are the backend's
# table names, ``{serial}``... its column types, and ``?`` its placeholder (see SQLJobQueue._sql).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {jobs} (
    seq {serial},
    id TEXT UNIQUE NOT NULL,
    client TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{{}}',
    error TEXT,
    created {real} NOT NULL,
    started {real},
    finished {real},
    batches_done INTEGER NOT NULL DEFAULT 0,
    cancel_requested {bool} NOT NULL DEFAULT {false},
    owner TEXT,
    requeues INTEGER NOT NULL DEFAULT 0,
    lost_worker TEXT,
    heartbeat {real}
);
CREATE INDEX IF NOT EXISTS {jobs}_status ON {jobs}(status, seq);
CREATE INDEX IF NOT EXISTS {jobs}_client ON {jobs}(client, seq);
CREATE TABLE IF NOT EXISTS {clients} (
    client TEXT PRIMARY KEY,
    last_served {bigint} NOT NULL
)
"""

# columns added since the first schema: a queue file made before gets them when it opens (name, type)
_ADDED_COLUMNS = (("owner", "TEXT"), ("requeues", "INTEGER NOT NULL DEFAULT 0"), ("lost_worker", "TEXT"),
                  ("heartbeat", "{real}"))


class SQLJobQueue(JobQueue):
    """The queue's rules in SQL that SQLite and PostgreSQL both run. A backend gives the connection
    (``self._db``, whose ``execute`` returns rows readable by column name), its transactions (:meth:`_begin`),
    and its dialect: the placeholder, the table names, the column types, row locking, and whether
    :meth:`recover` touches only the jobs this server claimed (several servers sharing one database)."""

    placeholder = "?"
    tables: ClassVar[dict[str, str]] = {"jobs": "jobs", "clients": "clients"}
    types: ClassVar[dict[str, str]] = {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL",
                                       "bool": "INTEGER", "false": "0", "bigint": "INTEGER"}
    for_update = ""  # appended to a SELECT that reads a row before changing it (PostgreSQL: FOR UPDATE)
    own_jobs_only = False  # recover(): only the jobs whose owner is this server
    max_int = 2**63 - 1  # the databases' BIGINT range; a larger LIMIT / OFFSET would overflow
    owner: str | None = None  # who claims (recorded on every claimed job)

    _lock: threading.RLock
    _db: object

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- the dialect ------------------------------------------------------------------------------
    def _sql(self, text: str) -> str:
        """``text`` in this backend's dialect (cached: every statement is translated once)."""
        cache = self.__dict__.setdefault("_sql_cache", {})
        if text not in cache:
            cache[text] = text.format(**self.tables, **self.types).replace("?", self.placeholder)
        return cache[text]

    def _run(self, db, text: str, args: tuple = ()):
        return db.execute(self._sql(text), args)

    def _begin(self):
        """A context manager: one transaction on ``self._db``, committed on success (the lock is held)."""
        raise NotImplementedError

    @contextmanager
    def _tx(self):
        with self._lock, self._begin() as db:
            yield db

    def _columns(self, db) -> set[str]:
        """The jobs table's column names now."""
        raise NotImplementedError

    def _create(self) -> None:
        """The tables (and any column a queue made by an older version lacks)."""
        with self._tx() as db:
            self._lock_claims(db)  # two servers creating them at once
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._run(db, statement)
            have = self._columns(db)
            for name, kind in _ADDED_COLUMNS:
                if name not in have:
                    self._run(db, f"ALTER TABLE {{jobs}} ADD COLUMN {name} {kind}")

    def _lock_claims(self, db) -> None:
        """Inside a transaction: make every other claimer wait for its end (one connection: nothing to do)."""

    # ---- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _job(row) -> Job | None:
        if row is None:
            return None
        return Job(id=row["id"], client=row["client"], kind=row["kind"], status=row["status"],
                   request=json.loads(row["request"]), result=json.loads(row["result"]), error=row["error"],
                   created=row["created"], started=row["started"], finished=row["finished"],
                   batches_done=row["batches_done"], cancel_requested=bool(row["cancel_requested"]),
                   requeues=row["requeues"], lost_worker=row["lost_worker"])

    def _one(self, db, job_id: str, lock: bool = False) -> Job | None:
        sql = "SELECT * FROM {jobs} WHERE id = ?" + (self.for_update if lock else "")
        return self._job(self._run(db, sql, (job_id,)).fetchone())

    def _bounded(self, n: int) -> int:
        return min(max(0, n), self.max_int)

    # ---- interface --------------------------------------------------------------------------------
    def submit(self, client: str, kind: str, request: dict) -> Job:
        job_id = uuid.uuid4().hex
        with self._tx() as db:
            self._run(db, "INSERT INTO {jobs} (id, client, kind, status, request, created) VALUES (?, ?, ?, ?, ?, ?)",
                      (job_id, client, kind, QUEUED, json.dumps(request), time.time()))
            return self._one(db, job_id)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._one(self._db, job_id)

    def list(self, client: str | None = None, offset: int = 0, limit: int = 50,
             statuses: tuple[str, ...] | None = None) -> list[Job]:
        where, args = [], []
        if client is not None:
            where.append("client = ?")
            args.append(client)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        sql = "SELECT * FROM {jobs}" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._run(self._db, sql, (*args, self._bounded(limit), self._bounded(offset))).fetchall()
            return [self._job(r) for r in rows]

    def claim(self) -> Job | None:
        with self._tx() as db:
            self._lock_claims(db)  # one claimer at a time (all servers): the round-robin turn is computed once
            # the client served longest ago (never = first) goes next; within a client, oldest job first
            row = self._run(db, "SELECT j.* FROM {jobs} j LEFT JOIN {clients} c ON c.client = j.client "
                                "WHERE j.status = ? ORDER BY COALESCE(c.last_served, 0), j.seq LIMIT 1",
                            (QUEUED,)).fetchone()
            if row is None:
                return None
            turn = self._run(db, "SELECT COALESCE(MAX(last_served), 0) + 1 AS turn FROM {clients}").fetchone()["turn"]
            self._run(db, "INSERT INTO {clients} (client, last_served) VALUES (?, ?) "
                          "ON CONFLICT (client) DO UPDATE SET last_served = excluded.last_served", (row["client"], turn))
            now = time.time()
            self._run(db, "UPDATE {jobs} SET status = ?, started = COALESCE(started, ?), owner = ?, heartbeat = ? "
                          "WHERE id = ?", (RUNNING, now, self.owner, now, row["id"]))
            return self._one(db, row["id"])

    def save_progress(self, job_id: str, batches_done: int, result: dict) -> None:
        with self._tx() as db:
            self._run(db, "UPDATE {jobs} SET batches_done = ?, result = ? WHERE id = ?",
                      (batches_done, json.dumps(result), job_id))

    def park(self, job_id: str) -> None:
        with self._tx() as db:
            self._run(db, "UPDATE {jobs} SET status = ? WHERE id = ? AND status = ?", (QUEUED, job_id, RUNNING))

    def finish(self, job_id: str, status: str, result: dict | None = None, error: str | None = None) -> None:
        if status not in FINISHED:
            raise ValueError(f"not a final status: {status}")
        with self._tx() as db:
            if result is None:
                self._run(db, "UPDATE {jobs} SET status = ?, error = ?, finished = ? WHERE id = ?",
                          (status, error, time.time(), job_id))
            else:
                self._run(db, "UPDATE {jobs} SET status = ?, error = ?, finished = ?, result = ? WHERE id = ?",
                          (status, error, time.time(), json.dumps(result), job_id))

    def cancel(self, job_id: str, client: str | None) -> Job | None:
        with self._tx() as db:
            job = self._one(db, job_id, lock=True)
            if job is None or (client is not None and job.client != client):
                return None
            if job.status == QUEUED:
                self._run(db, "UPDATE {jobs} SET status = ?, finished = ?, error = ? WHERE id = ?",
                          (CANCELLED, time.time(), "cancelled", job_id))
            elif job.status == RUNNING:
                self._run(db, "UPDATE {jobs} SET cancel_requested = TRUE WHERE id = ?", (job_id,))
            return self._one(db, job_id)

    def queued_count(self, client: str) -> int:
        with self._lock:
            return self._run(self._db, "SELECT COUNT(*) AS n FROM {jobs} WHERE status = ? AND client = ?",
                             (QUEUED, client)).fetchone()["n"]

    def others_waiting(self, client: str) -> bool:
        with self._lock:
            return self._run(self._db, "SELECT 1 AS one FROM {jobs} WHERE status = ? AND client != ? LIMIT 1",
                             (QUEUED, client)).fetchone() is not None

    def position(self, job_id: str) -> int:
        with self._lock:
            job = self.get(job_id)
            if job is None or job.status != QUEUED:
                return -1
            # simulate the round-robin rule over what is queued now
            rows = self._run(self._db, "SELECT j.id, j.client, COALESCE(c.last_served, 0) AS served FROM {jobs} j "
                                       "LEFT JOIN {clients} c ON c.client = j.client WHERE j.status = ? ORDER BY j.seq",
                             (QUEUED,)).fetchall()
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
        """The jobs left ``running`` (with :attr:`own_jobs_only`, this server's only: another live server's
        running jobs are its own business) become failed-interrupted, or queued again."""
        mine, args = (" AND owner = ?", (self.owner,)) if self.own_jobs_only else ("", ())
        with self._tx() as db:
            ids = [r["id"] for r in self._run(db, "SELECT id FROM {jobs} WHERE status = ?" + mine,
                                              (RUNNING, *args)).fetchall()]
            if resume:
                self._run(db, "UPDATE {jobs} SET status = ? WHERE status = ? AND NOT cancel_requested" + mine,
                          (QUEUED, RUNNING, *args))
            self._run(db, "UPDATE {jobs} SET status = ?, error = ?, finished = ? WHERE status = ?" + mine,
                      (FAILED, INTERRUPTED_BY_RESTART, time.time(), RUNNING, *args))
            return ids

    def renew_leases(self) -> None:
        if not self.own_jobs_only:
            return
        with self._tx() as db:
            self._run(db, "UPDATE {jobs} SET heartbeat = ? WHERE status = ? AND owner = ?",
                      (time.time(), RUNNING, self.owner))

    def take_over(self, lease: float) -> list[tuple[str, str]]:
        if not self.own_jobs_only:  # one server: its restart recovers its jobs (recover)
            return []
        out = []
        with self._tx() as db:
            rows = self._run(db, "SELECT * FROM {jobs} WHERE status = ? AND (owner IS NULL OR owner != ?) "
                                 "AND COALESCE(heartbeat, started, created) < ?" + self.for_update,
                             (RUNNING, self.owner, time.time() - lease)).fetchall()
            for row in rows:
                job, server = self._job(row), f"server {row['owner'] or '?'}"
                if job.requeues:
                    error = SERVER_LOST_TWICE.format(first=job.lost_worker or "a server", second=server)
                    self._run(db, "UPDATE {jobs} SET status = ?, error = ?, finished = ? WHERE id = ?",
                              (FAILED, error, time.time(), job.id))
                    out.append((job.id, FAILED))
                else:
                    self._run(db, "UPDATE {jobs} SET status = ?, requeues = requeues + 1, lost_worker = ?, "
                                  "owner = NULL WHERE id = ?", (QUEUED, server, job.id))
                    out.append((job.id, QUEUED))
        return out

    def worker_lost(self, job_id: str, worker: str, requeue: bool = True) -> str | None:
        with self._tx() as db:
            job = self._one(db, job_id, lock=True)
            if job is None:
                return None
            if job.requeues:
                return job.lost_worker or "a worker"
            self._run(db, "UPDATE {jobs} SET requeues = requeues + 1, lost_worker = ? WHERE id = ?", (worker, job_id))
            if requeue:
                self._run(db, "UPDATE {jobs} SET status = ? WHERE id = ? AND status = ?", (QUEUED, job_id, RUNNING))
            return None


class SQLiteJobQueue(SQLJobQueue):
    """The queue in one SQLite file (WAL mode: readers never wait for the worker)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.owner = socket.gethostname()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()  # one connection, used from the worker and the request threads
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._create()

    @contextmanager
    def _begin(self):
        self._db.execute("BEGIN IMMEDIATE")  # the write lock now: no other process writes in between
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _columns(self, db) -> set[str]:
        return {r["name"] for r in db.execute("SELECT name FROM pragma_table_info('jobs')")}
