"""Deforum runs through the queue, the extension's /deforum_api, the launch flags and the CLI, on the demo model:
a batch runs to a video and reports as the extension does, bad settings are refused naming the key, cancel
really stops, a run parks for another client's job and resumes with the same frames, a crashed run resumes
after a restart (--resume-queue), --deforum-run-now with --deforum-terminate-after-run-now, and
``sdstudio deforum`` locally and into a server's queue."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from sdstudio.api.deforum import make_router
from sdstudio.cli import build_parser, main
from sdstudio.core import deforum as spec
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine import video
from sdstudio.engine.generate import Engine
from sdstudio.scripts.deforum import DeforumRun
from sdstudio.scripts.studio import Studio
from sdstudio.service.jobs import JobService, Txt2ImgJob
from sdstudio.service.queue import SQLiteJobQueue

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"
TINY = {"max_frames": 4, "diffusion_cadence": 1, "W": 128, "H": 128, "steps": 3, "seed": 11, "sampler": "Euler a",
        "prompts": {"0": "a red circle", "2": "a blue square"}, "negative_prompts": "", "fps": 10,
        "zoom": "0:(1.04)", "angle": "0:(3)", "strength_schedule": "0:(0.5)"}
FAST = {"deforum_ffmpeg_preset": "ultrafast"}


def data_root(base: Path) -> Path:
    (base / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    target = base / "models" / "Stable-diffusion" / DEMO.name
    if not target.exists():
        os.link(DEMO, target)
    return base


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(Paths(data_root(tmp_path_factory.mktemp("deforum-api"))))


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    """TINY's frames from an uninterrupted run, straight through the run loop."""
    out = tmp_path_factory.mktemp("reference")
    r = DeforumRun(Studio(engine), spec.load_settings(TINY), out, outdir=out / "run",
                   options={"ffmpeg_preset": "ultrafast"}).run()
    return [np.asarray(Image.open(p)) for p in r.frames]


class Crash(BaseException):
    """As if the process were killed: nothing catches it, the job stays 'running' in the queue."""


class Gate(Studio):
    """The real studio, recording each generation's prompt; it can hold before generation ``hold_at`` (1-based)
    until released, or crash at ``crash_at``."""

    def __init__(self, engine, hold_at: int | None = None, crash_at: int | None = None):
        super().__init__(engine)
        self.prompts: list[str] = []
        self.hold_at, self.crash_at = hold_at, crash_at
        self.reached, self.go = threading.Event(), threading.Event()

    def generate(self, req, **kw):
        self.prompts.append(req.prompt)
        if len(self.prompts) == self.hold_at:
            self.reached.set()
            assert self.go.wait(120)
        if len(self.prompts) == self.crash_at:
            raise Crash
        return super().generate(req, **kw)


def make_service(engine, db: Path, studio=None, resume: bool = False) -> JobService:
    return JobService(engine, SQLiteJobQueue(db), studio=studio or Studio(engine), resume=resume)


def api(service, limits=None) -> TestClient:
    app = FastAPI()
    app.include_router(make_router(service, {}, limits or {"steps": 150, "pixels": 1024 * 1024}))
    return TestClient(app)


def wait_status(http, job_id, timeout=120.0) -> dict:
    deadline = time.time() + timeout
    while True:
        status = http.get(f"/deforum_api/jobs/{job_id}").json()
        if status["status"] != "ACCEPTED":
            return status
        assert time.time() < deadline, status
        time.sleep(0.1)


def frames_of(status) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in status["frames"]]


def test_a_batch_runs_to_a_video_and_reports_as_the_extension(engine, tmp_path, reference):
    service = make_service(engine, tmp_path / "q.sqlite3").start()
    try:
        http = api(service)
        second = {**TINY, "seed": -1, "max_frames": 2, "make_gif": True, "some_future_key": 1}
        answer = http.post("/deforum_api/batches", json={"deforum_settings": [TINY, second], "options_overrides": FAST})
        assert answer.status_code == 202
        body = answer.json()
        assert body["message"] == "Job(s) accepted" and body["batch_id"].startswith("batch(")
        first_id, second_id = body["job_ids"]
        queued = http.get(f"/deforum_api/jobs/{second_id}").json()
        assert (queued["status"], queued["phase"]) == ("ACCEPTED", "QUEUED")
        one, two = wait_status(http, first_id), wait_status(http, second_id)
        assert (one["status"], one["phase"], one["phase_progress"], one["error_type"]) == ("SUCCEEDED", "DONE", 1.0,
                                                                                         "NONE")
        assert one["updates"] >= 5 and one["last_updated"] >= one["started_at"] and one["execution_time"] > 0
        assert one["deforum_settings"] == TINY and one["options_overrides"] == FAST  # echoed as given
        outdir = Path(one["outdir"])
        assert outdir.name == f"Deforum_{one['timestring']}" and outdir.parent.name == "img2img-images"
        assert Path(one["video"]) == outdir / f"{one['timestring']}.mp4"
        info = video.probe(one["video"])
        assert (info.frames, info.fps, info.width, info.height) == (4, 10.0, 128, 128)
        assert all(np.array_equal(a, b) for a, b in zip(frames_of(one), reference, strict=True))
        # two jobs of one batch never share a run, even when they start in the same second
        assert two["timestring"] != one["timestring"] and len(two["frames"]) == 2 and Path(two["gif"]).is_file()
        saved = spec.load_settings(Path(two["outdir"]) / f"{two['timestring']}_settings.txt")
        assert saved["seed"] != -1  # drawn when queued: the saved settings repeat the run
        assert any("some_future_key" in w for w in two["warnings"])
        assert http.get("/deforum_api/batches").json() == {body["batch_id"]: [first_id, second_id]}
        assert [s["id"] for s in http.get(f"/deforum_api/batches/{body['batch_id']}").json()] == [first_id, second_id]
        assert set(http.get("/deforum_api/jobs").json()) == {first_id, second_id}
        assert http.get("/deforum_api/jobs/nope").status_code == 404
        assert http.get("/deforum_api/batches/batch(1)").json() == {"id": "batch(1)", "status": "NOT FOUND"}
        # another client lists only its own
        assert http.get("/deforum_api/jobs", headers={"X-Sdstudio-Client": "other"}).json() == {}
    finally:
        service.stop()


def test_bad_settings_are_refused_naming_the_key(engine, tmp_path):
    service = make_service(engine, tmp_path / "q.sqlite3")  # not started: nothing runs
    http = api(service, {"steps": 50, "pixels": 256 * 256})

    def refused(settings, overrides=None):
        answer = http.post("/deforum_api/batches", json={"deforum_settings": settings, "options_overrides": overrides})
        assert answer.status_code == 422, answer.json()
        return answer.json()["detail"]

    assert "zoom" in refused({**TINY, "zoom": "0:(1.0), 10:(foo)"})
    assert refused([TINY, {**TINY, "max_frames": "many"}]).startswith("deforum_settings[1]: max_frames")
    assert "sampler" in refused({**TINY, "sampler": "No such sampler"})
    assert "never downloaded" in refused({**TINY, "animation_mode": "Video Input"})  # the default is a web URL
    assert "--limit-steps" in refused({**TINY, "steps": 80})
    assert "--limit-pixels" in refused({**TINY, "W": 512, "H": 512})
    assert "deforum_ffmpeg_preset" in refused(TINY, {"deforum_ffmpeg_preset": "warp9"})
    assert "missing" in refused(TINY, {"sd_model_checkpoint": "missing"})
    assert http.post("/deforum_api/batches", json={"deforum_settings": []}).status_code == 400
    assert service.queue.list() == []  # a batch with a bad member queues nothing


def test_cancel_stops_queued_and_running_jobs(engine, tmp_path):
    gate = Gate(engine, hold_at=2)  # inside frame 1 of the first job
    service = make_service(engine, tmp_path / "q.sqlite3", gate).start()
    try:
        http = api(service)
        first = http.post("/deforum_api/batches", json={"deforum_settings": TINY, "options_overrides": FAST}).json()
        second = http.post("/deforum_api/batches", json={"deforum_settings": [TINY, TINY]}).json()
        assert gate.reached.wait(60)
        running = first["job_ids"][0]
        assert http.get(f"/deforum_api/jobs/{running}").json()["phase"] == "GENERATING"
        assert http.delete(f"/deforum_api/jobs/{running}", headers={"X-Sdstudio-Client": "other"}).status_code == 403
        assert http.delete(f"/deforum_api/jobs/{running}").json() == {"id": running, "message": "Job cancelled."}
        cancelled = http.delete(f"/deforum_api/batches/{second['batch_id']}").json()
        assert cancelled == {"ids": second["job_ids"], "message": "2 job(s) cancelled."}
        assert http.get(f"/deforum_api/jobs/{second['job_ids'][0]}").json()["status"] == "CANCELLED"
        gate.go.set()
        status = wait_status(http, running)
        assert status["status"] == "CANCELLED" and status["message"] == "Cancelled due to user request."
        assert len(status["frames"]) == 1 and status["video"] is None  # frame 0 kept; frame 1 was stopped
        assert len(gate.prompts) == 2  # the queued ones never ran
        assert http.delete(f"/deforum_api/jobs/{running}").status_code == 400  # finished: not cancellable
        assert http.delete("/deforum_api/jobs/nope").status_code == 404
    finally:
        gate.go.set()
        service.stop()


def test_a_run_parks_for_another_client_and_resumes_with_the_same_frames(engine, tmp_path, reference):
    gate = Gate(engine, hold_at=2)
    service = make_service(engine, tmp_path / "q.sqlite3", gate).start()
    try:
        http = api(service)
        job_id = http.post("/deforum_api/batches", json={"deforum_settings": TINY, "options_overrides": FAST}
                           ).json()["job_ids"][0]
        assert gate.reached.wait(60)
        other = service.submit("b", Txt2ImgJob(Txt2ImgRequest(prompt="another client", steps=2, width=64, height=64,
                                                              seed=1)))
        gate.go.set()
        status = wait_status(http, job_id)
        assert service.wait(other.id).status == "done"
        # frames 0 and 1, then the other client's image, then frames 2 and 3 of the same run
        assert gate.prompts == ["a red circle", "a red circle", "another client", "a blue square", "a blue square"]
        assert status["status"] == "SUCCEEDED" and video.probe(status["video"]).frames == 4
        assert len(list(Path(status["outdir"]).glob("*_settings.txt"))) == 1  # one run, continued
        assert all(np.array_equal(a, b) for a, b in zip(frames_of(status), reference, strict=True))
    finally:
        gate.go.set()
        service.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the Crash, on purpose
def test_a_crashed_run_resumes_after_a_restart_with_resume_queue(engine, tmp_path, reference):
    db = tmp_path / "q.sqlite3"
    crashing = Gate(engine, crash_at=3)
    first = make_service(engine, db, crashing)
    job = first.submit_deforum("c", first.prepare_deforum(TINY, options_overrides=FAST))
    first.start()
    deadline = time.time() + 60
    while first._thread.is_alive():  # the Crash ends the worker thread, as a kill ends the process
        assert time.time() < deadline
        time.sleep(0.05)
    left = first.queue.get(job.id)
    assert left.status == "running" and left.result["frames_done"] == 2 and left.result["timestring"]
    first.queue.close()
    again = Gate(engine)
    second = make_service(engine, db, again, resume=True).start()
    try:
        done = second.wait(job.id, timeout=120)
        assert done.status == "done" and done.result["timestring"] == left.result["timestring"]
        assert again.prompts == ["a blue square", "a blue square"]  # only frames 2 and 3 were made again
        frames = [np.asarray(Image.open(p)) for p in done.result["frames"]]
        assert all(np.array_equal(a, b) for a, b in zip(frames, reference, strict=True))
        assert video.probe(done.result["video"]).frames == 4
    finally:
        second.stop()


def test_run_now_terminates_after_its_runs_and_the_api_sits_behind_api_auth(tmp_path, free_port):
    from sdstudio.server import create_app, serve

    root = data_root(tmp_path / "data")
    settings = tmp_path / "run.txt"
    settings.write_text(spec.load_settings({**TINY, "max_frames": 2}).to_json(), encoding="utf-8")
    args = build_parser().parse_args(["serve", "--data-dir", str(root), "--nowebui", "--port", str(free_port()),
                                      "--deforum-run-now", str(settings), "--deforum-terminate-after-run-now"])
    assert serve(args) == 0  # returns once the run is done
    runs = list((root / "outputs" / "img2img-images").glob("Deforum_*/*.mp4"))
    assert len(runs) == 1 and video.probe(runs[0]).frames == 2
    app = create_app(build_parser().parse_args(["serve", "--data-dir", str(root), "--nowebui", "--deforum-api",
                                                "--api-auth", "u:p"]))
    try:
        http = TestClient(app)
        assert http.get("/deforum_api/jobs").status_code == 401
        listed = http.get("/deforum_api/jobs", auth=("u", "p")).json()
        assert listed == {}  # the run-now job is the server's own client's, not this caller's
        job = app.state.service.queue.list()[0]
        status = http.get(f"/deforum_api/jobs/{job.id}", auth=("u", "p")).json()
        assert status["status"] == "SUCCEEDED" and status["video"] == str(runs[0])
    finally:
        app.state.service.stop()


def test_cli_runs_locally_and_into_a_servers_queue(tmp_path, free_port, capsys):
    import uvicorn

    from sdstudio.server import create_app

    root = data_root(tmp_path / "data")
    settings = tmp_path / "s.txt"
    settings.write_text('{"W": 128, "H": 128, "steps": 3, "seed": 4, "prompts": {"0": "a red circle"}, "fps": 10}')
    common = ["--data-dir", str(root), "--ffmpeg-preset", "ultrafast", "--set", "max_frames=3",
              "--set", "diffusion_cadence=1", "--set", "zoom=0:(1.05)"]
    assert main(["deforum", str(settings), *common]) == 0
    out = capsys.readouterr()
    outdir, mp4 = (Path(line) for line in out.out.split())
    assert mp4.parent == outdir and video.probe(mp4).frames == 3
    assert "frame 3/3" in out.err and spec.load_settings(next(outdir.glob("*_settings.txt")))["zoom"] == "0:(1.05)"
    assert main(["deforum", str(settings), "--data-dir", str(root), "--set", "zoom=0:(foo"]) == 2
    assert "zoom" in capsys.readouterr().err
    port = free_port()
    app = create_app(build_parser().parse_args(["serve", "--data-dir", str(root), "--nowebui"]))  # --api's routes
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        assert main(["deforum", str(settings), *common, "--server", f"http://127.0.0.1:{port}"]) == 0
        out = capsys.readouterr()
        outdir, mp4 = (Path(line) for line in out.out.split())
        assert video.probe(mp4).frames == 3 and outdir.parent == root / "outputs" / "img2img-images"
        assert "queued job" in out.err
    finally:
        server.should_exit = True
        thread.join(30)
        app.state.service.stop()
