"""Per-client limit on jobs waiting in the queue (setting ``sdstudio_max_queued_per_client``, default 50):
the next job of a client at the limit is refused with 429 and a message naming the setting; other clients
and the client's running job are not counted."""

from __future__ import annotations

import contextlib

from fastapi.testclient import TestClient

from sdstudio.cli import build_parser
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.core.settings import BY_KEY
from sdstudio.engine.generate import Engine
from sdstudio.server import create_app
from sdstudio.service.jobs import JobService, QueueFullError, Txt2ImgJob
from sdstudio.service.queue import SQLiteJobQueue
from tests.step_hold import StepHold

SMALL = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1}


def test_the_limit_counts_a_clients_waiting_jobs(data_dir):
    service = JobService(Engine(Paths(data_dir)), SQLiteJobQueue(data_dir / "q.sqlite3"), max_queued=lambda: 2)
    # the worker is not started: every job stays queued
    for _ in range(2):
        service.submit("alice", Txt2ImgJob(Txt2ImgRequest(**SMALL)))
    try:
        service.submit("alice", Txt2ImgJob(Txt2ImgRequest(**SMALL)))
        raise AssertionError("a third waiting job was accepted")
    except QueueFullError as exc:
        assert "2 jobs waiting" in str(exc) and "sdstudio_max_queued_per_client = 2" in str(exc)
    service.submit("bob", Txt2ImgJob(Txt2ImgRequest(**SMALL)))  # another client has room of its own
    assert service.queue.queued_count("alice") == 2 and service.queue.queued_count("bob") == 1
    assert BY_KEY["sdstudio_max_queued_per_client"].default == 50


@contextlib.contextmanager
def _stopped_after(service):
    """The app's job thread must not outlive the test: one still inside torch at interpreter exit can abort
    the process after every test passed."""
    try:
        yield
    finally:
        service.stop()


def test_the_api_answers_429_and_the_running_job_does_not_count(data_dir):
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    with TestClient(create_app(args)) as client:
        assert client.post("/sdapi/v1/options", json={"sdstudio_max_queued_per_client": 1}).status_code == 200
        service = client.app.state.service
        with _stopped_after(service), StepHold(service, batch=0, step=1) as hold:
            first = client.post("/sdstudio/v1/jobs", json={"request": SMALL})
            assert first.status_code == 202
            hold.wait()  # running, not waiting
            second = client.post("/sdstudio/v1/jobs", json={"request": SMALL})
            assert second.status_code == 202  # one waiting: at the limit now
            third = client.post("/sdstudio/v1/jobs", json={"request": SMALL})
            assert third.status_code == 429 and "sdstudio_max_queued_per_client" in third.json()["detail"]
            other = client.post("/sdstudio/v1/jobs", json={"request": SMALL}, headers={"X-Sdstudio-Client": "other"})
            assert other.status_code == 202
