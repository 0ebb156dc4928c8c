"""kill -9 the server in the middle of a job: after a restart every job is accounted for, none twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from step_hold import wait_for_file

HELD = Path(__file__).with_name("step_hold.py")


def _call(port: int, path: str, body: dict | None = None, method: str | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", "X-Sdstudio-Client": "crash-test"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def _start(data_dir: Path, port: int, *flags: str, hold: list[str] | None = None) -> subprocess.Popen:
    """``sdstudio serve``; with ``hold``, the same server run by step_hold.py, its worker held at a step."""
    command = [sys.executable, "-m", "sdstudio", "serve"] if hold is None else [sys.executable, str(HELD), *hold, "--"]
    proc = subprocess.Popen([*command, "--api", "--nowebui", "--port", str(port), "--data-dir", str(data_dir), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while True:
        try:
            _call(port, "/sdstudio/v1/queue")
            return proc
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)


def _run_crash(data_dir: Path, resume: bool, free_port, tmp_path: Path) -> tuple[list[dict], str]:
    port = free_port()
    tmp_path.mkdir()
    # the worker stops at the first step of a job's second batch (the first job's), and is killed there
    proc = _start(data_dir, port, hold=["--hold-dir", str(tmp_path), "--hold-at", "1:1"])
    ids = []
    for n in range(5):  # two batches each, so a job can be cut off half-way
        body = {"request": {"prompt": f"job {n}", "steps": 3, "width": 64, "height": 64, "seed": n * 10,
                            "n_iter": 2, "save_images": True}}
        ids.append(_call(port, "/sdstudio/v1/jobs", body)["id"])
    assert wait_for_file(tmp_path / "held", proc) == ids[0]
    job = _call(port, f"/sdstudio/v1/jobs/{ids[0]}")
    assert job["batches_done"] == 1 and job["status"] == "running", job  # one batch written, the second running
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)

    port = free_port()
    proc = _start(data_dir, port, *(["--resume-queue"] if resume else []))
    try:
        deadline = time.time() + 300
        while True:
            jobs = [_call(port, f"/sdstudio/v1/jobs/{i}") for i in ids]
            if all(j["status"] in ("done", "failed", "cancelled") for j in jobs):
                break
            assert time.time() < deadline, [j["status"] for j in jobs]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    return jobs, out


def test_killed_job_is_marked_failed_and_the_rest_run(data_dir, free_port, tmp_path):
    jobs, log = _run_crash(data_dir, resume=False, free_port=free_port, tmp_path=tmp_path / "hold")
    assert jobs[0]["status"] == "failed" and "interrupted" in jobs[0]["error"]
    assert len(jobs[0]["result"]["images"]) == 1  # its finished first batch is kept and listed
    assert [j["status"] for j in jobs[1:]] == ["done"] * 4
    assert "1 job(s) were running when the server stopped" in log
    _check_files(data_dir, jobs)


def test_resume_queue_finishes_the_killed_job_without_duplicates(data_dir, free_port, tmp_path):
    jobs, _ = _run_crash(data_dir, resume=True, free_port=free_port, tmp_path=tmp_path / "hold")
    assert [j["status"] for j in jobs] == ["done"] * 5
    assert [im["seed"] for im in jobs[0]["result"]["images"]] == [0, 1]  # batch 1 kept, batch 2 run once
    _check_files(data_dir, jobs)


def _check_files(data_dir: Path, jobs: list[dict]) -> None:
    listed = [Path(im["path"]) for j in jobs for im in j["result"]["images"]]
    assert all(p.is_file() for p in listed) and len(set(listed)) == len(listed)
    on_disk = list((data_dir / "outputs" / "txt2img-images").rglob("*.png"))
    # every file on disk is listed by exactly one job: nothing lost, nothing made twice
    assert sorted(on_disk) == sorted(listed)
    assert not list((data_dir / "outputs").rglob("*.tmp"))
