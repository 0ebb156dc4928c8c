"""Soak: many concurrent API clients for a while against one server on the demo model (loopback only).

A server runs in its own process (so its memory is measured alone). ``--clients`` threads each loop for
``--minutes`` on a small txt2img (64x64, 2 steps, Euler): even-numbered clients call A1111's blocking
``POST /sdapi/v1/txt2img``, odd-numbered ones queue through ``POST /sdstudio/v1/jobs`` and wait on the job's
event stream (``--mode a1111`` or ``jobs`` for all alike). Every request has its own seed. Beside them, one thread
polls ``/sdapi/v1/progress`` every 0.1 s and others ``/sdapi/v1/options``, ``/sdapi/v1/samplers`` and
``/sdstudio/v1/jobs`` the whole time.

Printed (issue 17's goals): every job accounted for (per client, the jobs the server lists against the answers
the client got: none lost, none run twice, every seed once), the server's RSS growth after warm-up (goal <= 5 %;
mean of the first three samples after the first fifth of the run against the last three), p50 / p99 queue
latency (created -> started) and job latency (request -> answer), and the status routes' p50 / p99 (goal: under
100 ms with any number of waiting clients). A benchmark, not a test.

Usage: python benchmarks/bench_soak.py [--clients 50] [--minutes 10] [--size 64] [--steps 2] [--mode mixed]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
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

FINISHED = ("done", "failed", "cancelled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, path: str, body: dict | None = None, client: str = "soak", timeout: float = 900):
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


def _server_jobs(port: int, client: str) -> list[dict]:
    """Every job the server lists for ``client``, all pages."""
    jobs: list[dict] = []
    while True:
        page = _call(port, f"/sdstudio/v1/jobs?offset={len(jobs)}&limit=500", client=client)["jobs"]
        jobs += page
        if len(page) < 500:
            return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--mode", choices=["mixed", "a1111", "jobs"], default="mixed")
    ap.add_argument("--pollers", type=int, default=3, help="threads polling options / samplers / jobs (besides progress)")
    a = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="sdstudio-soak-"))
    demo_data_root(data)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sdstudio", "serve", "--data-dir", str(data), "--api",
                               "--nowebui", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(900):
            try:
                _call(port, "/sdapi/v1/samplers", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None:
                    raise SystemExit(f"the server stopped: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        proc = psutil.Process(server.pid)
        body = {"prompt": "a red circle on a blue background", "steps": a.steps, "width": a.size,
                "height": a.size, "sampler_name": "Euler", "seed": 1, "save_images": False}
        _call(port, "/sdapi/v1/txt2img", body, client="warm-up")  # load the model
        began = time.time()
        end = began + a.minutes * 60
        answered: dict[int, list[int]] = {n: [] for n in range(a.clients)}  # client -> seeds answered
        failures: list[str] = []
        job_latency: dict[str, list[float]] = {"a1111": [], "jobs": []}
        route_latency: dict[str, list[float]] = {}
        rss: list[tuple[float, int]] = []
        lock = threading.Lock()

        def mode_of(n: int) -> str:
            return a.mode if a.mode != "mixed" else ("a1111", "jobs")[n % 2]

        def client(n: int) -> None:
            mode, k = mode_of(n), 0
            while time.time() < end:
                seed = 1_000_000 * (n + 1) + k
                k += 1
                try:
                    t = time.time()
                    if mode == "a1111":
                        out = _call(port, "/sdapi/v1/txt2img", {**body, "seed": seed}, f"c{n}")
                        assert len(out["images"]) == 1 and json.loads(out["info"])["seed"] == seed, out["info"][:200]
                    else:
                        job = _call(port, "/sdstudio/v1/jobs", {"request": {**body, "seed": seed}}, f"c{n}")
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdstudio/v1/jobs/{job['id']}/events",
                                                    timeout=900) as stream:
                            for _ in stream:
                                pass
                        status = _call(port, f"/sdstudio/v1/jobs/{job['id']}", client=f"c{n}")["status"]
                        assert status == "done", status
                    with lock:
                        job_latency[mode].append(time.time() - t)
                        answered[n].append(seed)
                except Exception as exc:  # noqa: BLE001 - a benchmark counts what went wrong
                    with lock:
                        failures.append(f"client {n} ({mode}): {type(exc).__name__}: {str(exc)[:200]}")

        def poll(routes: list[str], pause: float) -> None:
            i = 0
            while time.time() < end:
                route = routes[i % len(routes)]
                t = time.perf_counter()
                try:
                    _call(port, route, timeout=60)
                    with lock:
                        route_latency.setdefault(route, []).append(time.perf_counter() - t)
                except Exception as exc:  # noqa: BLE001
                    with lock:
                        failures.append(f"{route}: {type(exc).__name__}: {exc}")
                i += 1
                time.sleep(pause)

        def sample_memory() -> None:
            while time.time() < end:
                rss.append((time.time() - began, proc.memory_info().rss))
                time.sleep(5)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(a.clients)]
        threads.append(threading.Thread(target=poll, args=(["/sdapi/v1/progress"], 0.1)))
        threads += [threading.Thread(target=poll, args=(["/sdapi/v1/options", "/sdapi/v1/samplers",
                                                         "/sdstudio/v1/jobs"], 0.2)) for _ in range(a.pollers)]
        threads.append(threading.Thread(target=sample_memory))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rss.append((time.time() - began, proc.memory_info().rss))

        # every job accounted for: what the server lists per client against the answers each client got
        listed = {n: _server_jobs(port, f"c{n}") for n in range(a.clients)}
        all_jobs = [j for jobs in listed.values() for j in jobs]
        seeds = {n: sorted(im.get("seed") for j in jobs if j["status"] == "done"
                           for im in j["result"].get("images", [])) for n, jobs in listed.items()}
        lost = sum(len(set(answered[n]) - set(seeds[n])) for n in answered)
        twice = sum(len(s) - len(set(s)) for s in seeds.values())
        unanswered = sum(len(set(seeds[n]) - set(answered[n])) for n in answered)
        by_status: dict[str, int] = {}
        for j in all_jobs:
            by_status[j["status"]] = by_status.get(j["status"], 0) + 1
        requeued = sum(j.get("requeues") or 0 for j in all_jobs)
        queue_latency = [j["started"] - j["created"] for j in all_jobs if j.get("started") and j.get("created")]
        after = [m for t, m in rss if t >= a.minutes * 60 * 0.2] or [m for _, m in rss]
        first, last = after[:3], after[-3:]
        growth = (sum(last) / len(last) - sum(first) / len(first)) / (sum(first) / len(first)) * 100

        answers = sum(len(v) for v in answered.values())
        print(f"soak: {a.clients} clients ({a.mode}) x {a.minutes:g} min, {a.size}x{a.size} {a.steps} steps Euler "
              f"on the demo model; {answers} answers ({answers / (a.minutes * 60):.1f}/s)")
        print(f"jobs: {len(all_jobs)} on the server ({', '.join(f'{v} {k}' for k, v in sorted(by_status.items()))}); "
              f"answered but not listed done: {lost}; run twice: {twice}; done but never answered (a client's "
              f"request in flight at the end, or lost answers): {unanswered}; requeued: {requeued}; "
              f"{len(failures)} client errors{(': ' + failures[0]) if failures else ''}")
        print(f"queue latency (created -> started): p50 {_pct(queue_latency, 0.5):.2f} s, "
              f"p99 {_pct(queue_latency, 0.99):.2f} s")
        for mode, values in job_latency.items():
            if values:
                print(f"job latency, {mode}: p50 {_pct(values, 0.5):.2f} s, p99 {_pct(values, 0.99):.2f} s "
                      f"({len(values)} answers)")
        for route, values in sorted(route_latency.items()):
            print(f"{route}: p50 {_pct(values, 0.5) * 1000:.0f} ms, p99 {_pct(values, 0.99) * 1000:.0f} ms, "
                  f"max {max(values) * 1000:.0f} ms ({len(values)} calls; goal < 100 ms)")
        print(f"server RSS after warm-up: {sum(first) / len(first) / 2**20:.0f} -> {sum(last) / len(last) / 2**20:.0f}"
              f" MiB ({growth:+.1f} %, goal <= 5 %); peak {max(m for _, m in rss) / 2**20:.0f} MiB, "
              f"{len(rss)} samples")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
