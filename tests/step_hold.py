"""Hold a job service's worker at a known sampling step, so that a test acts mid-job at the same point on
a fast GPU as on a slow CPU (instead of racing a job made long enough).

The seam: :class:`~sdstudio.service.jobs.JobService` calls its ``preview_settings`` on the worker thread at
every sampling step, after it has set ``live.job_no`` and ``live.step``; wrapping it stops the worker right
there until the test releases it. In-process: ``with StepHold(service, batch=0, step=1) as hold:
hold.wait(); ...``. For a server in its own process, run this file as the server command
(``python tests/step_hold.py --hold-dir D --hold-at 1:1 [--hold-prompt P] -- <sdstudio serve flags>``):
on reaching the step it writes ``D/held`` (the job's id) and holds until ``D/release`` exists.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path


class StepHold:
    """Holds the first job that reaches sampling ``step`` (1-based) of batch ``batch`` (0-based) and whose
    prompt is ``prompt`` (None: any), once."""

    def __init__(self, service, *, batch: int = 0, step: int = 1, prompt: str | None = None,
                 folder: Path | None = None):
        self.service, self.batch, self.step, self.prompt, self.folder = service, batch, step, prompt, folder
        self.plain = service.preview_settings
        self.reached, self.released = threading.Event(), threading.Event()
        self.job = None  # the held job (a queue Job), once reached
        service.preview_settings = self

    def __call__(self):
        live = self.service.live
        if not self.reached.is_set() and live is not None and (live.job_no, live.step) == (self.batch, self.step) \
                and (self.prompt is None or live.job.request["request"]["prompt"] == self.prompt):
            self.job = live.job
            self.reached.set()
            if self.folder is not None:
                (self.folder / "held.tmp").write_text(live.job.id)
                (self.folder / "held.tmp").replace(self.folder / "held")  # appears whole: never read empty
                while not (self.folder / "release").exists():
                    time.sleep(0.02)
            else:
                self.released.wait(300)
        return self.plain()

    def wait(self, timeout: float = 600.0):
        """Until the worker is held; returns the held job."""
        assert self.reached.wait(timeout), f"no job reached batch {self.batch} step {self.step}"
        return self.job

    def release(self) -> None:
        self.released.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()  # also when the test failed: the worker must not stay held


def wait_for_file(path: Path, proc=None, timeout: float = 600.0) -> str:
    """The text of ``path`` once it exists (a held server's ``held``); fails if ``proc`` exits first. The
    timeout is only there so a hold that never comes fails: jobs ahead may take long on loaded cores."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc is None or proc.poll() is None, proc.stdout.read() if proc.stdout else "the server exited"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)
    return path.read_text()


@contextlib.contextmanager
def held_server(data_root: Path, port: int, hold: list[str]):
    """``sdstudio serve --api`` on ``data_root`` in its own process, run by this file with the ``hold`` flags
    (``--hold-dir D ...``); yields its URL once it answers, stops it afterwards."""
    import os
    import subprocess
    import urllib.request

    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, __file__, *hold, "--", "--data-dir", str(data_root), "--port", str(port),
                             "--api"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/sdapi/v1/samplers", timeout=5)
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str]) -> None:
    """The server as ``sdstudio serve`` builds it from its flags (``create_app``), with a hold on its worker."""
    import uvicorn

    from sdstudio.cli import build_parser
    from sdstudio.server import create_app

    parser = argparse.ArgumentParser()
    parser.add_argument("--hold-dir", type=Path, required=True)
    parser.add_argument("--hold-at", default="0:1", help="BATCH:STEP")
    parser.add_argument("--hold-prompt")
    own, rest = parser.parse_known_args(argv)
    args = build_parser().parse_args(["serve", *[a for a in rest if a != "--"]])
    app = create_app(args)
    batch, step = (int(v) for v in own.hold_at.split(":"))
    StepHold(app.state.service, batch=batch, step=step, prompt=own.hold_prompt, folder=own.hold_dir)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
