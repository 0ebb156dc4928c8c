"""API overhead and queue throughput on the bundled demo model.

1. Overhead: the same 20-step txt2img request run (a) by calling the engine directly and (b) through
   ``POST /sdapi/v1/txt2img`` of a live server (HTTP, JSON, the SQLite queue, the worker, PNG files,
   base64). Alternating, median of the repeats; goal: ratio (b)/(a) <= 1.03.
2. Throughput: 4 clients submit jobs at once through ``/sdstudio/v1/jobs``; every job must finish
   (none lost), each client's jobs in the order it sent them, and the clients served in turn. Printed:
   jobs per second through the queue vs. the same jobs run back to back on the engine.
Usage: python benchmarks/bench_api.py [--size 256] [--steps 20] [--repeats 5] [--jobs-per-client 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict, client: str = "bench") -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Sdstudio-Client": client})
    return json.loads(urllib.request.urlopen(req, timeout=600).read())


def _get(port: int, path: str) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60).read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--jobs-per-client", type=int, default=3)
    a = ap.parse_args()

    import uvicorn

    from sdstudio.cli import build_parser
    from sdstudio.core.params import Txt2ImgRequest
    from sdstudio.server import create_app

    data = Path(tempfile.mkdtemp(prefix="sdstudio-bench-api-"))
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    for f in (ROOT / "models" / "Stable-diffusion").glob("*.safetensors"):
        shutil.copy(f, data / "models" / "Stable-diffusion" / f.name)
    args = build_parser().parse_args(["serve", "--data-dir", str(data), "--api", "--nowebui"])
    app = create_app(args)
    engine = app.state.service.engine
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    body = {"prompt": "a red circle on a blue background", "negative_prompt": "blurry", "steps": a.steps,
            "width": a.size, "height": a.size, "seed": 1, "sampler_name": "Euler a", "cfg_scale": 7}
    req = Txt2ImgRequest(prompt=body["prompt"], negative_prompt=body["negative_prompt"], steps=a.steps, width=a.size,
                         height=a.size, seed=1, sampler_name="Euler a")
    engine.generate(req)
    _post(port, "/sdapi/v1/txt2img", body)  # warm both paths
    direct, api = [], []
    for _ in range(a.repeats):
        t = time.perf_counter()
        engine.generate(req)
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        _post(port, "/sdapi/v1/txt2img", body)
        api.append(time.perf_counter() - t)
    d, p = statistics.median(direct), statistics.median(api)
    print(f"overhead   {a.size}x{a.size}, {a.steps} steps: engine {d:.3f} s, API {p:.3f} s, "
          f"ratio {p / d:.3f} (goal <= 1.03), +{(p - d) * 1000:.0f} ms per request")

    # throughput: 4 clients at once
    clients = ["c0", "c1", "c2", "c3"]
    small = {**body, "steps": max(4, a.steps // 4)}
    t = time.perf_counter()
    for _ in range(len(clients) * a.jobs_per_client):
        engine.generate(req.replace(steps=small["steps"]))
    sequential = time.perf_counter() - t
    submitted: dict[str, list[str]] = {c: [] for c in clients}

    def submit(client: str) -> None:
        for n in range(a.jobs_per_client):
            job = _post(port, "/sdstudio/v1/jobs", {"request": {**small, "seed": n}}, client)
            submitted[client].append(job["id"])

    t = time.perf_counter()
    threads = [threading.Thread(target=submit, args=(c,)) for c in clients]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ids = [i for c in clients for i in submitted[c]]
    for i in ids:  # block on each job's event stream until it ends (no polling load on the CPU)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdstudio/v1/jobs/{i}/events", timeout=600) as stream:
            for _ in stream:
                pass
    queued = time.perf_counter() - t
    jobs = {i: _get(port, f"/sdstudio/v1/jobs/{i}") for i in ids}
    done = sum(j["status"] == "done" for j in jobs.values())
    fifo = all([jobs[i]["started"] for i in submitted[c]] == sorted(jobs[i]["started"] for i in submitted[c])
               for c in clients)
    order = sorted(ids, key=lambda i: jobs[i]["started"])
    owner = {i: c for c in clients for i in submitted[c]}
    first_round = {owner[i] for i in order[:len(clients)]}
    print(f"throughput {len(ids)} jobs from {len(clients)} clients: {done} done (lost {len(ids) - done}), "
          f"FIFO per client {fifo}, every client in the first {len(clients)} jobs {first_round == set(clients)}; "
          f"queue {len(ids) / queued:.2f} jobs/s vs back-to-back engine {len(ids) / sequential:.2f} jobs/s "
          f"(ratio {sequential / queued:.3f})")
    server.should_exit = True
    app.state.service.stop()
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
