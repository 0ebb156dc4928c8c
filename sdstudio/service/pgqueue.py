"""The queue of record in PostgreSQL (``--queue-db postgresql://user@host/db``), for several API servers
sharing one queue; the same rules as :class:`~sdstudio.service.queue.SQLiteJobQueue` (FIFO per client,
round-robin between clients, parking, cancel, recovery).

Several servers: every claim takes a transaction-scoped advisory lock, so the round-robin turn is computed
by one claimer at a time and a job is claimed exactly once however many servers (and their workers) claim.
A job records which server claimed it (``owner``, default the host name, ``--queue-owner``): at start,
:meth:`recover` touches only the jobs *this* server left running, never another live server's. A running
server renews its jobs' leases; one that dies and stays away has its running jobs queued again (once) by
another server after ``--queue-lease`` seconds (:meth:`~sdstudio.service.queue.JobQueue.take_over`).

Needs psycopg 3 (``pip install 'sdstudio[postgres]'``).
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from typing import ClassVar

from .queue import JobQueue, SQLJobQueue

_CLAIM_LOCK = 0x5D57D10  # the advisory lock key every claimer takes


class QueueDatabaseError(Exception):
    """The PostgreSQL queue cannot be opened (driver missing, server unreachable, bad URL)."""


class PostgresJobQueue(SQLJobQueue):
    """The statements of :class:`~sdstudio.service.queue.SQLJobQueue` in PostgreSQL's dialect: ``%s``
    placeholders, ``sdstudio_``-prefixed tables, its column types, row locks, an advisory lock per claim,
    and recovery of this server's jobs only."""

    placeholder = "%s"
    tables: ClassVar[dict[str, str]] = {"jobs": "sdstudio_jobs", "clients": "sdstudio_clients"}
    types: ClassVar[dict[str, str]] = {"serial": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION",
                                       "bool": "BOOLEAN", "false": "FALSE", "bigint": "BIGINT"}
    for_update = " FOR UPDATE"
    own_jobs_only = True

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
        self._create()

    @contextmanager
    def _begin(self):
        with self._db.transaction():
            yield self._db

    def _lock_claims(self, db) -> None:
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_CLAIM_LOCK,))  # held until the transaction ends

    def _columns(self, db) -> set[str]:
        return {r["column_name"] for r in db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (self.tables["jobs"],))}


def open_queue(spec: str | None, default_path, owner: str | None = None) -> JobQueue:
    """``--queue-db``: a ``postgresql://`` (or ``postgres://``) URL, else an SQLite file (default: in the data
    dir). ``owner`` (``--queue-owner``): this server's name in a shared queue (default: the host name)."""
    from .queue import SQLiteJobQueue

    if spec and spec.split("://", 1)[0] in ("postgresql", "postgres"):
        return PostgresJobQueue(spec, owner=owner)
    return SQLiteJobQueue(spec or default_path)
