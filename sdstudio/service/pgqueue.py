"""The queue of record in PostgreSQL (``--queue-db postgresql://user@host/db``), for several API servers
sharing one queue; the same rules as :class:`~sdstudio.service.queue.SQLiteJobQueue` (FIFO per client,
round-robin between clients, parking, cancel, recovery).

Several servers: every claim takes a transaction-scoped advisory lock, so the round-robin turn is computed
by one claimer at a time and a job is claimed exactly once however many servers (and their workers) claim.
A job records which server claimed it (``owner``, default the host name): at start, :meth:`recover` touches
only the jobs *this* server left running, never another live server's.

Needs psycopg 3 (``pip install 'sdstudio[postgres]'``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

from .queue import CANCELLED, FAILED, FINISHED, INTERRUPTED_BY_RESTART, QUEUED, RUNNING, Job, JobQueue

PG_MAX = 2**63 - 1
_CLAIM_LOCK = 0x5D57D10  # the advisory lock key every claimer takes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sdstudio_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    client TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    batches_done INTEGER NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS sdstudio_jobs_status ON sdstudio_jobs(status, seq);
CREATE INDEX IF NOT EXISTS sdstudio_jobs_client ON sdstudio_jobs(client, seq);
CREATE TABLE IF NOT EXISTS sdstudio_clients (
    client TEXT PRIMARY KEY,
    last_served BIGINT NOT NULL
);
"""


class QueueDatabaseError(Exception):
    """The PostgreSQL queue cannot be opened (driver missing, server unreachable, bad URL)."""


class PostgresJobQueue(JobQueue):
    def __init__(self, url: str, owner: str | None = None):
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise QueueDatabaseError("a postgresql:// queue needs psycopg: pip install 'sdstudio[postgres]'") \
                from None
        self.url, self.owner = url, owner or socket.gethostname()
        try:
            self._db = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        except psycopg.Error as exc:
            raise QueueDatabaseError(f"cannot open the queue database: {str(exc).strip()}") from None
        self._lock = threading.RLock()  # one connection, used from the dispatcher and the request threads
        with self._lock, self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_CLAIM_LOCK,))  # two servers creating it at once
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- helpers ----------------------------------------------------------------------------------
    def _tx(self):
        return _Transaction(self._db, self._lock)

    @staticmethod
    def _job(row: dict | None) -> Job | None:
        if row is None:
            return None
        return Job(id=row["id"], client=row["client"], kind=row["kind"], status=row["status"],
                   request=json.loads(row["request"]), result=json.loads(row["result"]), error=row["error"],
                   created=row["created"], started=row["started"], finished=row["finished"],
                   batches_done=row["batches_done"], cancel_requested=bool(row["cancel_requested"]))

    def _one(self, db, job_id: str) -> Job | None:
        return self._job(db.execute("SELECT * FROM sdstudio_jobs WHERE id = %s", (job_id,)).fetchone())

    # ---- interface --------------------------------------------------------------------------------
    def submit(self, client: str, kind: str, request: dict) -> Job:
        job_id = uuid.uuid4().hex
        with self._tx() as db:
            db.execute("INSERT INTO sdstudio_jobs (id, client, kind, status, request, created) "
                       "VALUES (%s, %s, %s, %s, %s, %s)", (job_id, client, kind, QUEUED, json.dumps(request), time.time()))
            return self._one(db, job_id)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._one(self._db, job_id)

    def list(self, client: str | None = None, offset: int = 0, limit: int = 50,
             statuses: tuple[str, ...] | None = None) -> list[Job]:
        where, args = [], []
        if client is not None:
            where.append("client = %s")
            args.append(client)
        if statuses:
            where.append("status = ANY(%s)")
            args.append(list(statuses))
        sql = "SELECT * FROM sdstudio_jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq DESC LIMIT %s OFFSET %s"
        with self._lock:
            rows = self._db.execute(sql, (*args, min(max(0, limit), PG_MAX), min(max(0, offset), PG_MAX)))
            return [self._job(r) for r in rows]

    def claim(self) -> Job | None:
        with self._tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_CLAIM_LOCK,))  # one claimer at a time, all servers
            row = db.execute(
                "SELECT j.* FROM sdstudio_jobs j LEFT JOIN sdstudio_clients c ON c.client = j.client "
                "WHERE j.status = %s ORDER BY COALESCE(c.last_served, 0), j.seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            turn = db.execute("SELECT COALESCE(MAX(last_served), 0) + 1 AS t FROM sdstudio_clients").fetchone()["t"]
            db.execute("INSERT INTO sdstudio_clients (client, last_served) VALUES (%s, %s) "
                       "ON CONFLICT (client) DO UPDATE SET last_served = EXCLUDED.last_served", (row["client"], turn))
            db.execute("UPDATE sdstudio_jobs SET status = %s, started = COALESCE(started, %s), owner = %s WHERE id = %s",
                       (RUNNING, time.time(), self.owner, row["id"]))
            return self._one(db, row["id"])

    def save_progress(self, job_id: str, batches_done: int, result: dict) -> None:
        with self._tx() as db:
            db.execute("UPDATE sdstudio_jobs SET batches_done = %s, result = %s WHERE id = %s",
                       (batches_done, json.dumps(result), job_id))

    def park(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE sdstudio_jobs SET status = %s WHERE id = %s AND status = %s", (QUEUED, job_id, RUNNING))

    def finish(self, job_id: str, status: str, result: dict | None = None, error: str | None = None) -> None:
        if status not in FINISHED:
            raise ValueError(f"not a final status: {status}")
        with self._tx() as db:
            if result is None:
                db.execute("UPDATE sdstudio_jobs SET status = %s, error = %s, finished = %s WHERE id = %s",
                           (status, error, time.time(), job_id))
            else:
                db.execute("UPDATE sdstudio_jobs SET status = %s, error = %s, finished = %s, result = %s WHERE id = %s",
                           (status, error, time.time(), json.dumps(result), job_id))

    def cancel(self, job_id: str, client: str | None) -> Job | None:
        with self._tx() as db:
            job = self._job(db.execute("SELECT * FROM sdstudio_jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone())
            if job is None or (client is not None and job.client != client):
                return None
            if job.status == QUEUED:
                db.execute("UPDATE sdstudio_jobs SET status = %s, finished = %s, error = %s WHERE id = %s",
                           (CANCELLED, time.time(), "cancelled", job_id))
            elif job.status == RUNNING:
                db.execute("UPDATE sdstudio_jobs SET cancel_requested = TRUE WHERE id = %s", (job_id,))
            return self._one(db, job_id)

    def queued_count(self, client: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) AS n FROM sdstudio_jobs WHERE status = %s AND client = %s",
                                    (QUEUED, client)).fetchone()["n"]

    def others_waiting(self, client: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM sdstudio_jobs WHERE status = %s AND client != %s LIMIT 1",
                                    (QUEUED, client)).fetchone() is not None

    def position(self, job_id: str) -> int:
        with self._lock:
            job = self.get(job_id)
            if job is None or job.status != QUEUED:
                return -1
            rows = self._db.execute(
                "SELECT j.id, j.client, COALESCE(c.last_served, 0) AS served FROM sdstudio_jobs j "
                "LEFT JOIN sdstudio_clients c ON c.client = j.client WHERE j.status = %s ORDER BY j.seq",
                (QUEUED,)).fetchall()
        pending: dict[str, list[str]] = {}
        served: dict[str, int] = {}
        for r in rows:
            pending.setdefault(r["client"], []).append(r["id"])
            served[r["client"]] = r["served"]
        first_seq = {c: i for i, c in enumerate(pending)}
        n = 0
        while pending:
            client = min(pending, key=lambda c: (served[c], first_seq[c]))
            if pending[client].pop(0) == job_id:
                return n
            n += 1
            served[client] = max(served.values()) + 1
            if not pending[client]:
                del pending[client]
        return -1

    def recover(self, resume: bool = False) -> list[str]:
        """This server's jobs left ``running`` (another server's running jobs are its own business)."""
        with self._tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM sdstudio_jobs WHERE status = %s AND owner = %s",
                                               (RUNNING, self.owner))]
            if resume:
                db.execute("UPDATE sdstudio_jobs SET status = %s WHERE status = %s AND owner = %s "
                           "AND NOT cancel_requested", (QUEUED, RUNNING, self.owner))
            db.execute("UPDATE sdstudio_jobs SET status = %s, error = %s, finished = %s WHERE status = %s AND owner = %s",
                       (FAILED, INTERRUPTED_BY_RESTART, time.time(), RUNNING, self.owner))
            return ids


class _Transaction:
    def __init__(self, db, lock: threading.RLock):
        self.db, self.lock = db, lock

    def __enter__(self):
        self.lock.acquire()
        self._tx = self.db.transaction()
        self._tx.__enter__()
        return self.db

    def __exit__(self, exc_type, exc, tb):
        try:
            return self._tx.__exit__(exc_type, exc, tb)
        finally:
            self.lock.release()


def open_queue(spec: str | None, default_path) -> JobQueue:
    """``--queue-db``: a ``postgresql://`` (or ``postgres://``) URL, else an SQLite file (default: in the data dir)."""
    from .queue import SQLiteJobQueue

    if spec and spec.split("://", 1)[0] in ("postgresql", "postgres"):
        return PostgresJobQueue(spec)
    return SQLiteJobQueue(spec or default_path)
