"""Driving the UI in headless Chromium (browser tests, the UI benchmark, the README's screenshots): a server
to drive, its options, and the browser.

Debian's ``chromium`` is used through Playwright's ``executable_path`` (nothing is downloaded). The
flags keep Chromium from reaching out: on a closed network its background connections are refused,
many at a time, and it spends CPU on them that the server beside it needs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium_path() -> str | None:
    """The installed Chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright, executable: str | None = None):
    """A headless Chromium browser from a ``sync_playwright()`` handle."""
    path = executable or chromium_path()
    if path is None:
        raise RuntimeError("chromium is not installed (scripts/setup-browser.sh installs it)")
    return playwright.chromium.launch(executable_path=path, args=list(CHROMIUM_ARGS))


def start_server(port: int, data_dir: Path, cores: set[int] | None = None) -> subprocess.Popen:
    """``sdstudio serve --api`` on ``port`` over ``data_dir``, once it answers. ``cores``: the CPUs it may use
    (its math threads too); the rest stay free for the browser."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    if cores:
        env["OMP_NUM_THREADS"] = str(len(cores))
    proc = subprocess.Popen([sys.executable, "-m", "sdstudio", "serve", "--api", "--port", str(port), "--data-dir",
                             str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    if cores:
        os.sched_setaffinity(proc.pid, cores)  # before it imports torch: its threads inherit the mask
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/samplers", timeout=2)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def set_options(url: str, options: dict) -> None:
    """POST ``options`` to the server's ``/sdapi/v1/options``."""
    request = urllib.request.Request(url + "/sdapi/v1/options", data=json.dumps(options).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).read()
