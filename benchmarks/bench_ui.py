"""The web UI's own cost: page load to interactive, and a txt2img job through the page vs the same job
through the API, on one running server (the demo model, or --model).

- load: from navigation until Generate is clickable (gradio has fetched its config and drawn the page).
- first preview: from the Generate click until the live preview shows a picture.
- UI job: from the click until the gallery shows the image and its infotext.
- API job: POST /sdapi/v1/txt2img with the same parameters (and seed), from the request until the answer.
Prints each as the median of N runs and the ratio UI job / API job (goal: overhead <= 10 %, ratio <= 1.10),
and where each job's time went (the queue's own timestamps).

On a small CPU-only machine the browser drawing the page takes CPU from the job itself. ``--pin`` puts the
server (one math thread) on the first core and this script with its browser on the others, for both the UI
and the API runs: what is left is the UI's own cost, as on a machine whose GPU does the work.
Needs Chromium and Playwright (./test.sh installs both).

Usage: python benchmarks/bench_ui.py [--runs 5] [--steps 20] [--size 256] [--model NAME] [--pin]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from sdstudio.testing.headless import chromium_path, launch, set_options, start_server

ROOT = Path(__file__).resolve().parents[1]


def api_job(url: str, params: dict) -> float:
    body = json.dumps(params).encode()
    t = time.perf_counter()
    req = urllib.request.Request(url + "/sdapi/v1/txt2img", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=600).read()
    return time.perf_counter() - t


def job_parts(data_dir: Path, sent: float, shown: float) -> tuple[float, float, float]:
    """Where a job's time went, from the queue's own timestamps: (sent to queued + queue wait, the
    worker's run, finished to the result shown)."""
    db = sqlite3.connect(str(data_dir / "jobs.sqlite3"))
    try:
        started, finished = db.execute("SELECT started, finished FROM jobs ORDER BY created DESC LIMIT 1").fetchone()
    finally:
        db.close()
    return started - sent, finished - started, shown - finished


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--model", help="checkpoint (default: the first in the data dir)")
    ap.add_argument("--data-dir", default=str(ROOT))
    ap.add_argument("--port", type=int, default=7893)
    ap.add_argument("--no-previews", action="store_true", help="turn live previews off (Settings) for the run")
    ap.add_argument("--pin", action="store_true", help="server on core 0, this script and the browser on the rest")
    args = ap.parse_args()
    server_cores = None
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            raise SystemExit("--pin needs at least two cores")
        server_cores = {cores[0]}
        os.sched_setaffinity(0, set(cores[1:]))  # the browser, started below, inherits it
    from playwright.sync_api import sync_playwright

    chromium = chromium_path()
    if chromium is None:
        raise SystemExit("chromium is not installed (./scripts/setup-browser.sh installs it)")
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)  # outputs of the benchmark go to a scratch data dir that links the models
        (data_dir / "models").symlink_to(Path(args.data_dir).resolve() / "models")
        proc = start_server(args.port, data_dir, server_cores)
        try:
            options = {**({"sd_model_checkpoint": args.model} if args.model else {}),
                       **({"live_previews_enable": False} if args.no_previews else {})}
            if options:
                set_options(url, options)
            params = {"prompt": "a red circle on a blue background", "steps": args.steps, "width": args.size,
                      "height": args.size, "seed": 1, "sampler_name": "DPM++ 2M"}
            api_job(url, params)  # warm-up: loads the model
            loads, previews, ui_jobs, api_jobs, ui_parts, api_parts = [], [], [], [], [], []
            with sync_playwright() as p:
                browser = launch(p, chromium)
                for _ in range(args.runs):
                    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                    t = time.perf_counter()
                    page.goto(url)
                    page.wait_for_selector("#txt2img_generate:not([disabled])")
                    loads.append(time.perf_counter() - t)
                    page.locator("#txt2img_prompt textarea").fill(params["prompt"])
                    for elem, value in (("width", args.size), ("height", args.size), ("steps", args.steps)):
                        box = page.locator(f"#txt2img_{elem} input[type=number]")
                        box.fill(str(value))
                        box.press("Enter")
                    seed = page.locator("#txt2img_seed input")
                    seed.fill("1")
                    seed.press("Enter")
                    time.sleep(0.3)
                    t, wall = time.perf_counter(), time.time()
                    page.click("#txt2img_generate")
                    if not args.no_previews:
                        page.wait_for_selector("#txt2img_preview img", timeout=600_000)
                        previews.append(time.perf_counter() - t)
                    page.wait_for_function("document.querySelector('#txt2img_html_info textarea').value"
                                           ".includes('Seed: 1,')", timeout=600_000, polling=50)
                    info = page.locator("#txt2img_html_info textarea").input_value()
                    if f"Size: {args.size}x{args.size}," not in info:  # the page changed a field after we typed
                        raise SystemExit(f"the UI job did not run as typed: {info!r}")
                    ui_jobs.append(time.perf_counter() - t)
                    ui_parts.append(job_parts(data_dir, wall, time.time()))
                    page.context.close()
                    wall = time.time()
                    api_jobs.append(api_job(url, params))
                    api_parts.append(job_parts(data_dir, wall, time.time()))
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    med = statistics.median
    if args.pin:
        print(f"pinned: server on core {sorted(server_cores)}, browser on {sorted(os.sched_getaffinity(0))}")
    print(f"page load to interactive: {med(loads):.2f} s (median of {args.runs})")
    if previews:
        print(f"Generate click to first live preview: {med(previews):.2f} s")
    print(f"txt2img {args.size}x{args.size}, {args.steps} steps: UI {med(ui_jobs):.2f} s, API {med(api_jobs):.2f} s, "
          f"ratio UI/API {med(ui_jobs) / med(api_jobs):.3f} (goal <= 1.10)")
    for name, parts in (("UI", ui_parts), ("API", api_parts)):
        before, run, after = (med(p[i] for p in parts) for i in range(3))
        print(f"{name}: sent to started {before:.2f} s, worker run {run:.2f} s, finished to shown {after:.2f} s")
    print("all runs (s): UI " + " ".join(f"{x:.2f}" for x in ui_jobs) + " | API " + " ".join(f"{x:.2f}" for x in api_jobs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
