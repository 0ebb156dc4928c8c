"""Clients waiting in A1111's blocking calls hold no server thread: with more of them than the thread pool has
threads (40), the other routes still answer, and every waiting client gets its images."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient
from step_hold import StepHold

from sdstudio.cli import build_parser
from sdstudio.server import create_app

WAITING = 48  # more than anyio's default thread pool of 40
BODY = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 3}


def threads_waiting_for_jobs() -> int:
    """Threads whose stack is inside JobService.wait (a blocking wait that holds its thread)."""
    import sys

    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("service/jobs.py"):
                count += 1
                break
            frame = frame.f_back
    return count


def answers_while_others_wait(call) -> object:
    """``call()`` on its own thread; None if it has not answered in 120 s (with the pool held by waiting
    clients it would not answer until they are served: that is the deadlock this catches, not a speed)."""
    out = []
    t = threading.Thread(target=lambda: out.append(call()), daemon=True)
    t.start()
    t.join(120)
    return out[0] if out else None


def test_waiting_clients_do_not_starve_the_other_routes(data_dir):
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    app = create_app(args)
    service = app.state.service
    answers: list[int] = []
    with TestClient(app) as client, StepHold(service, batch=0, step=1) as hold:
        first = threading.Thread(target=lambda: answers.append(client.post("/sdapi/v1/txt2img", json=BODY).status_code))
        first.start()
        hold.wait()  # the worker holds the first job: every other one waits in the queue
        clients = [threading.Thread(target=lambda i=i: answers.append(
            client.post("/sdapi/v1/txt2img", json={**BODY, "seed": 10 + i}).status_code)) for i in range(WAITING)]
        for c in clients:
            c.start()
        for _ in range(6000):  # until all are queued (each waits in its blocking call), or the pool is theirs
            if len(service.queue.list(None, limit=100)) >= WAITING + 1 or threads_waiting_for_jobs() >= 30:
                break
            threading.Event().wait(0.05)
        # 49 clients wait, yet no thread is held by their waiting, and sync routes still answer
        held_threads = threads_waiting_for_jobs()
        if held_threads:
            hold.release()
        assert held_threads == 0, f"{held_threads} server threads are held by clients waiting for their jobs"
        assert len(service.queue.list(None, limit=100)) == WAITING + 1
        samplers = answers_while_others_wait(lambda: client.get("/sdapi/v1/samplers"))
        options = answers_while_others_wait(lambda: client.get("/sdapi/v1/options"))
        hold.release()
        assert samplers is not None and samplers.status_code == 200
        assert options is not None and options.status_code == 200
        for c in [first, *clients]:
            c.join(600)
    assert answers == [200] * (WAITING + 1)
    service.stop()


def _post_and_hang_up(port: int, body: dict) -> None:
    """A client that sends a blocking txt2img and closes the connection without reading the answer."""
    import json
    import socket

    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        threading.Event().wait(1.0)  # long enough for the job to be queued


def test_a_client_that_hangs_up_has_its_waiting_job_cancelled(data_dir, free_port):
    """Its job still waiting in the queue is cancelled; with sdstudio_keep_on_disconnect it is kept; the running
    job of a client that hung up finishes."""
    import httpx
    import uvicorn

    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    app = create_app(args)
    service = app.state.service
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    try:
        for _ in range(400):
            if server.started:
                break
            threading.Event().wait(0.05)
        with StepHold(service, batch=0, step=1) as hold:
            threading.Thread(target=_post_and_hang_up, args=(port, {**BODY, "seed": 1}), daemon=True).start()
            hold.wait()  # the first client's job runs (held), then that client hangs up too
            _post_and_hang_up(port, {**BODY, "seed": 2})
            _post_and_hang_up(port, {**BODY, "seed": 3, "sdstudio_keep_on_disconnect": True})
            by_seed = {}
            for _ in range(200):  # the server notices within a second or so
                by_seed = {j.request["request"]["seed"]: j.status for j in service.queue.list(None, limit=10)}
                if by_seed.get(2) == "cancelled":
                    break
                threading.Event().wait(0.05)
            assert by_seed.get(2) == "cancelled" and by_seed.get(3) == "queued", by_seed
        for _ in range(600):  # released: the held job and the kept one finish
            by_seed = {j.request["request"]["seed"]: j.status for j in service.queue.list(None, limit=10)}
            if by_seed.get(1) == "done" and by_seed.get(3) == "done":
                break
            threading.Event().wait(0.1)
        assert by_seed == {1: "done", 2: "cancelled", 3: "done"}, by_seed
        assert httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/samplers").status_code == 200
    finally:
        server.should_exit = True
        runner.join(30)
        service.stop()
