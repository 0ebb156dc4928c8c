"""Soak: many concurrent API clients for a while against one server on the demo model (loopback only).

A server runs in its own process (so its memory is measured alone). ``--clients`` threads each loop for
``--minutes``: queue a small txt2img job through ``POST /sdstudio/v1/jobs``, wait for its end on the
job's event stream, check it; a few threads hit the status routes (``/sdapi/v1/progress``,
``/sdapi/v1/options``, ``/sdapi/v1/samplers``, ``/sdstudio/v1/jobs``) the whole time. Printed (issue 17's
goals): every job accounted for (submitted = done, none lost or run twice), the server's RSS growth after
warm-up (goal <= 5 %), p50 / p99 queue latency (created -> started) and job latency, and the status
routes' p50 / p99 (goal: under 100 ms with any number of waiting clients). A benchmark, not a test.

Usage: python benchmarks/bench_soak.py [--clients 50] [--minutes 10] [--size 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from common import demo_data_root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, path: str, body: dict | None = None, client: str = "soak", timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json", "X-Sdstudio-Client": client})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--pollers", type=int, default=3)
    a = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="sdstudio-soak-"))
    demo_data_root(data)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sdstudio", "serve", "--data-dir", str(data), "--api",
                               "--nowebui", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                _call(port, "/sdapi/v1/samplers", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        proc = psutil.Process(server.pid)
        body = {"prompt": "a red circle on a blue background", "steps": a.steps, "width": a.size,
                "height": a.size, "sampler_name": "Euler", "seed": 1, "save_images": False}
        _call(port, "/sdapi/v1/txt2img", body)  # warm the model
        end = time.time() + a.minutes * 60
        submitted: list[str] = []
        failures: list[str] = []
        job_latency: list[float] = []
        route_latency: dict[str, list[float]] = {}
        rss: list[tuple[float, int]] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            k = 0
            while time.time() < end:
                try:
                    t = time.time()
                    job = _call(port, "/sdstudio/v1/jobs", {"request": {**body, "seed": 1000 * n + k}}, f"c{n}")
                    with lock:
                        submitted.append(job["id"])
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdstudio/v1/jobs/{job['id']}/events",
                                                timeout=900) as stream:
                        for _ in stream:
                            pass
                    with lock:
                        job_latency.append(time.time() - t)
                except Exception as exc:  # noqa: BLE001 - a benchmark counts what went wrong
                    with lock:
                        failures.append(f"client {n}: {type(exc).__name__}: {exc}")
                k += 1

        def poller() -> None:
            routes = ["/sdapi/v1/progress", "/sdapi/v1/options", "/sdapi/v1/samplers", "/sdstudio/v1/jobs"]
            i = 0
            while time.time() < end:
                route = routes[i % len(routes)]
                t = time.perf_counter()
                try:
                    _call(port, route, timeout=30)
                    with lock:
                        route_latency.setdefault(route, []).append(time.perf_counter() - t)
                except Exception as exc:  # noqa: BLE001
                    with lock:
                        failures.append(f"{route}: {type(exc).__name__}: {exc}")
                i += 1
                time.sleep(0.2)

        def sampler() -> None:
            start = time.time()
            while time.time() < end:
                rss.append((time.time() - start, proc.memory_info().rss))
                time.sleep(5)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(a.clients)]
        threads += [threading.Thread(target=poller) for _ in range(a.pollers)]
        threads.append(threading.Thread(target=sampler))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        jobs = [_call(port, f"/sdstudio/v1/jobs/{i}") for i in submitted]
        done = sum(j["status"] == "done" for j in jobs)
        queue_latency = [j["started"] - j["created"] for j in jobs if j.get("started") and j.get("created")]
        warm = [m for t, m in rss if t >= a.minutes * 60 * 0.2] or [m for _, m in rss]
        growth = (warm[-1] - warm[0]) / warm[0] * 100 if len(warm) > 1 else 0.0
        print(f"soak: {a.clients} clients x {a.minutes:g} min, {a.size}² {a.steps} steps on the demo model")
        print(f"jobs: {len(submitted)} submitted, {done} done, {len(submitted) - done} not done; "
              f"{len(failures)} client errors{(': ' + failures[0]) if failures else ''}")
        print(f"queue latency p50 {_pct(queue_latency, 0.5):.2f} s, p99 {_pct(queue_latency, 0.99):.2f} s; "
              f"job latency p50 {_pct(job_latency, 0.5):.2f} s, p99 {_pct(job_latency, 0.99):.2f} s")
        for route, values in sorted(route_latency.items()):
            print(f"{route}: p50 {_pct(values, 0.5) * 1000:.0f} ms, p99 {_pct(values, 0.99) * 1000:.0f} ms "
                  f"({len(values)} calls; goal < 100 ms)")
        print(f"server RSS after warm-up: {warm[0] / 2**20:.0f} -> {warm[-1] / 2**20:.0f} MiB ({growth:+.1f} %, "
              f"goal <= 5 %); median {statistics.median(m for _, m in rss) / 2**20:.0f} MiB")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
