"""Where a job's output files are kept: the worker's own folder, or any fsspec URL (``s3://bucket/sdstudio``,
``gs://…``, ``file:///srv/outputs``, ``memory://…``).

A worker writes its pictures to its local outputs folder first (temp file, fsync, rename), as one process
does. With a store URL it then copies each new file into the store *before* the queue records the file, and
the job's result says where: ``result["store"]`` is the store's URL and every image / grid entry gets a
``url`` beside its ``path``. The API serves a file from its ``path`` when that is on its own disk, else from
its ``url`` (an API server on another machine than the worker). Keys inside the store mirror the worker's
data dir (``outputs/txt2img-images/2026-01-01/00001-3.png``), so a store shared by many workers keeps
A1111's layout; a file outside the data dir goes under ``jobs/<job id>/``. The copies of a split script job's
units are deleted from the store once the job is put together (its outputs are then the job's files).

No torch here: the API process uses this module.
"""

from __future__ import annotations

import logging
import mimetypes
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path

from .queue import Job, JobQueue

log = logging.getLogger(__name__)


class StoreError(Exception):
    """The store URL cannot be used (unknown protocol, missing fsspec driver, unreachable)."""


class OutputStore:
    """An fsspec file system at ``url``; keys are relative to ``root`` (the worker's data dir)."""

    def __init__(self, url: str, root: Path | str):
        try:
            import fsspec
            from fsspec.core import url_to_fs
        except ImportError:  # pragma: no cover - fsspec comes with huggingface_hub
            raise StoreError("an output store URL needs the fsspec package (pip install fsspec)") from None
        self.url = url.rstrip("/")
        self.root = Path(root).resolve()
        try:
            self.fs, self.base = url_to_fs(self.url)
        except (ImportError, ValueError) as exc:  # s3:// without s3fs, gs:// without gcsfs, a bad URL
            raise StoreError(f"output store {url!r}: {exc}") from None
        self._fsspec = fsspec
        try:
            self.fs.makedirs(self.base, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"output store {url!r}: {exc}") from None

    def key(self, path: Path | str, job_id: str) -> str:
        """Where ``path`` goes in the store: its place under the data dir, or ``jobs/<job id>/<name>``."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return f"jobs/{job_id}/{path.name}"

    def put(self, path: Path | str, job_id: str) -> str:
        """Copy a local file into the store; its URL."""
        key = self.key(path, job_id)
        target = posixpath.join(self.base, key)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        self.fs.put_file(str(path), target)
        return f"{self.url}/{key}"

    def publish(self, job_id: str, result: dict) -> dict:
        """Copy the files ``result`` names that have no ``url`` yet into the store and note their URLs (in
        place: an entry already copied is not copied again). Returns ``result``."""
        result["store"] = self.url
        for entry in _file_entries(result):
            if "url" not in entry and entry.get("path") and Path(entry["path"]).is_file():
                entry["url"] = self.put(entry["path"], job_id)
        grid = result.get("grid")
        if grid and result.get("grid_url") is None and Path(grid).is_file():
            same = next((g for g in result.get("grids", []) if g.get("path") == grid and g.get("url")), None)
            result["grid_url"] = same["url"] if same else self.put(grid, job_id)
        return result

    def remove(self, urls: Iterable[str]) -> None:
        """Delete the store's copies at ``urls`` (those of this store; one already gone is no error)."""
        for url in urls:
            if url.startswith(self.url + "/"):
                try:
                    self.fs.rm_file(posixpath.join(self.base, url[len(self.url) + 1:]))
                except FileNotFoundError:
                    pass
                except OSError as exc:  # the job's outputs are fine: a copy left behind is only disk space
                    log.warning("output store: could not remove %s: %s", url, exc)


def unit_urls(result: dict) -> list[str]:
    """The store URLs of a split script job's unit files (``result["units"]``)."""
    return [e["url"] for records in (result.get("units") or {}).values() for e in records
            if isinstance(e, dict) and e.get("url")]


def _file_entries(result: dict) -> Iterator[dict]:
    for name in ("images", "grids", "extras"):
        for entry in result.get(name) or []:
            if isinstance(entry, dict):
                yield entry
    for records in (result.get("units") or {}).values():  # a script's finished units (a split job's shards')
        for entry in records:
            if isinstance(entry, dict):
                yield entry


def open_store(url: str | None, root: Path | str) -> OutputStore | None:
    """The store for ``--output-store`` (None: files stay in the worker's outputs folder only)."""
    return OutputStore(url, root) if url else None


def read_output(path: str | None, url: str | None) -> tuple[bytes, str] | None:
    """A job's file as (bytes, media type): from ``path`` when this machine has it, else from ``url`` (the
    store); None when neither is there."""
    if path and Path(path).is_file():
        data = Path(path).read_bytes()
        name = path
    elif url:
        import fsspec

        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except (OSError, ValueError, ImportError):
            return None
        name = url
    else:
        return None
    return data, mimetypes.guess_type(name)[0] or "application/octet-stream"


class PublishingQueue(JobQueue):
    """A queue whose recorded results name store URLs: every :meth:`save_progress` and :meth:`finish`
    copies the result's new files into ``store`` first (the in-process worker with ``--output-store``)."""

    def __init__(self, queue: JobQueue, store: OutputStore):
        self.inner, self.store = queue, store

    def __getattr__(self, name):  # close(), path... of the queue underneath
        return getattr(self.inner, name)

    def submit(self, client, kind, request):
        return self.inner.submit(client, kind, request)

    def get(self, job_id):
        return self.inner.get(job_id)

    def list(self, client=None, offset=0, limit=50, statuses=None):
        return self.inner.list(client, offset, limit, statuses)

    def claim(self) -> Job | None:
        return self.inner.claim()

    def save_progress(self, job_id, batches_done, result):
        self.inner.save_progress(job_id, batches_done, self.store.publish(job_id, result))

    def park(self, job_id):
        self.inner.park(job_id)

    def finish(self, job_id, status, result=None, error=None):
        self.inner.finish(job_id, status, None if result is None else self.store.publish(job_id, result), error)

    def cancel(self, job_id, client):
        return self.inner.cancel(job_id, client)

    def queued_count(self, client):
        return self.inner.queued_count(client)

    def others_waiting(self, client):
        return self.inner.others_waiting(client)

    def position(self, job_id):
        return self.inner.position(job_id)

    def recover(self, resume=False):
        return self.inner.recover(resume)

    def worker_lost(self, job_id, worker, requeue=True):
        return self.inner.worker_lost(job_id, worker, requeue)

    def renew_leases(self):
        self.inner.renew_leases()

    def take_over(self, lease):
        return self.inner.take_over(lease)
