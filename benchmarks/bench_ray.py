"""Ray workers: throughput with 1 and 2 (or more) CPU workers on the demo model, against the in-process worker
thread measured in the same run, and the scheduler's overhead per job.

Each configuration runs the same ``--jobs`` txt2img jobs (distinct seeds) through one SQLite queue of record:
``in-process`` is JobService's own thread (one engine, this process's math threads), ``ray xN`` a local Ray
cluster with N CPU workers (one core and one math thread each). Printed: jobs/s, the ratio to in-process,
scaling efficiency (throughput(N) / (N x throughput(1))), and the overhead per job: ``load`` jobs of a
checkpoint that is loaded already (no work but the round trip: claim, dispatch, actor calls, recording),
in-process vs on a Ray worker; one job of ``--jobs`` batches, and one X/Y/Z plot of ``--jobs`` cells, which
the pool splits across its free workers (the plot put together in the API process). The pictures of every
configuration are compared with the in-process ones.

On this machine the cores are few and shared: efficiency beyond the core count, or under other load, says
little about a GPU box, where each worker has its own GPU.

Usage: python benchmarks/bench_ray.py [--workers 1,2] [--jobs 8] [--size 64] [--steps 4] [--model demo|tiny]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import DEMO_MODEL, demo_data_root


def data_root(model: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    if model == "demo" and DEMO_MODEL.exists():
        return demo_data_root(root)
    from sdstudio.testing.synthetic import write_checkpoint

    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    write_checkpoint(folder / "tiny-sd1.safetensors", "sd1", "tiny", seed=7)
    return root


def run_jobs(service, count: int, size: int, steps: int) -> tuple[float, list[str]]:
    """Wall time of ``count`` jobs submitted at once, and their pictures' digests (in seed order)."""
    from sdstudio.core.params import Txt2ImgRequest
    from sdstudio.service.jobs import Txt2ImgJob

    start = time.perf_counter()
    jobs = [service.submit("bench", Txt2ImgJob(Txt2ImgRequest(prompt="a red circle", steps=steps, width=size,
                                                              height=size, seed=1000 + i), save_images=False))
            for i in range(count)]
    done = [service.wait(j.id, 3600) for j in jobs]
    wall = time.perf_counter() - start
    bad = [d.error for d in done if d.status != "done"]
    assert not bad, bad
    digests = [hashlib.sha256(Path(d.result["images"][0]["path"]).read_bytes()).hexdigest()[:16] for d in done]
    return wall, digests


def workers_free(service) -> None:
    """Wait until every worker of the service's pool is free (a job splits over the free ones)."""
    while service.pool is not None and any(w["running"] for w in service.pool.describe()):
        time.sleep(0.02)


def workers_used(service, job_id: str) -> int:
    return len({w for j, w in service.pool.placements if j == job_id}) if service.pool is not None else 1


def one_split_job(service, batches: int, size: int, steps: int) -> tuple[float, str, int]:
    """Wall time of one job of ``batches`` batches (split across the free workers), its pictures' digest and
    how many workers ran it."""
    from sdstudio.core.params import Txt2ImgRequest
    from sdstudio.service.jobs import Txt2ImgJob

    workers_free(service)
    start = time.perf_counter()
    job = service.submit("bench", Txt2ImgJob(Txt2ImgRequest(prompt="a red circle", steps=steps, width=size,
                                                            height=size, seed=2000, n_iter=batches), save_images=False))
    done = service.wait(job.id, 3600)
    assert done.status == "done", done.error
    digest = hashlib.sha256(b"".join(Path(im["path"]).read_bytes() for im in done.result["images"])).hexdigest()
    return time.perf_counter() - start, digest[:16], workers_used(service, job.id)


def one_plot_job(service, cells: int, size: int, steps: int) -> tuple[float, str, int]:
    """Wall time of one X/Y/Z plot of ``cells`` cells (split across the free workers), its outputs' digest and
    how many workers ran it."""
    from PIL import Image

    from sdstudio.core.params import Txt2ImgRequest
    from sdstudio.service.jobs import Txt2ImgJob

    args = {"x_type": "Seed", "x_values": ", ".join(str(3000 + i) for i in range(cells)), "include_lone_images": True}
    workers_free(service)
    start = time.perf_counter()
    job = service.submit("bench", Txt2ImgJob(Txt2ImgRequest(prompt="a red circle", steps=steps, width=size,
                                                            height=size, seed=3000, subseed=1, script_name="X/Y/Z plot",
                                                            script_args=args), save_images=False))
    done = service.wait(job.id, 3600)
    assert done.status == "done", done.error
    files = [g["path"] for g in done.result["grids"]] + [im["path"] for im in done.result["images"]]
    digest = hashlib.sha256(b"".join(Image.open(f).convert("RGB").tobytes() for f in files)).hexdigest()
    return time.perf_counter() - start, digest[:16], workers_used(service, job.id)


def overhead(service, count: int) -> float:
    """Seconds per ``load`` job of the loaded checkpoint (the scheduling round trip alone)."""
    title = service.engine.registry.checkpoints[0].title
    service.wait(service.submit_load("bench", title).id, 600)  # loaded on (some) worker first
    start = time.perf_counter()
    for _ in range(count):
        assert service.wait(service.submit_load("bench", title).id, 600).status == "done"
    return (time.perf_counter() - start) / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", choices=["demo", "tiny"], default="demo")
    ap.add_argument("--overhead-jobs", type=int, default=20)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from sdstudio.core.paths import DeviceOptions, Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.service.catalog import ModelCatalog
    from sdstudio.service.jobs import JobService
    from sdstudio.service.queue import SQLiteJobQueue
    from sdstudio.service.ray_workers import WorkerSpec, start_ray_pool

    root = data_root(a.model)
    device = DeviceOptions(precision="full")
    counts = [int(n) for n in a.workers.split(",")]
    print(f"bench_ray: {a.jobs} jobs of {a.size}² x {a.steps} steps on the {a.model} model; "
          f"{os.cpu_count()} cores; in-process math threads: {torch.get_num_threads()}")
    rows = []
    try:
        # the in-process worker thread (the baseline), warmed up with one job
        svc = JobService(Engine(Paths(root), device), SQLiteJobQueue(root / "inproc.sqlite3")).start()
        run_jobs(svc, 1, a.size, a.steps)
        base_wall, base_digests = run_jobs(svc, a.jobs, a.size, a.steps)
        base_overhead = overhead(svc, a.overhead_jobs)
        split_base, split_digest, _ = one_split_job(svc, a.jobs, a.size, a.steps)
        plot_base, plot_digest, _ = one_plot_job(svc, a.jobs, a.size, a.steps)
        svc.stop()
        rows.append(("in-process", base_wall, base_overhead, True))
        splits = [("in-process", split_base, True, 1)]
        plots = [("in-process", plot_base, True, 1)]
        ray.init(num_cpus=max(counts), include_dashboard=False, object_store_memory=80 * 1024 * 1024,
                 log_to_driver=False)
        for n in counts:
            t0 = time.perf_counter()
            pool = start_ray_pool(WorkerSpec(Paths(root), device), cpu_workers=n, catalog=ModelCatalog(Paths(root)))
            startup = time.perf_counter() - t0
            svc = JobService(Engine(Paths(root), device), SQLiteJobQueue(root / f"ray{n}.sqlite3"), workers=pool).start()
            run_jobs(svc, n, a.size, a.steps)  # every worker loads the model once
            wall, digests = run_jobs(svc, a.jobs, a.size, a.steps)
            per_job = overhead(svc, a.overhead_jobs)
            split_wall, digest, used = one_split_job(svc, a.jobs, a.size, a.steps)
            plot_wall, got, plot_used = one_plot_job(svc, a.jobs, a.size, a.steps)
            plots.append((f"ray x{n}", plot_wall, got == plot_digest, plot_used))
            svc.stop()
            rows.append((f"ray x{n}", wall, per_job, digests == base_digests))
            splits.append((f"ray x{n}", split_wall, digest == split_digest, used))
            print(f"  ray x{n}: workers up in {startup:.1f} s")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    one = next((r for r in rows if r[0] == "ray x1"), None)
    print(f"{'config':<12} {'jobs/s':>8} {'x in-proc':>10} {'efficiency':>11} {'overhead/job':>13}  same pictures")
    for name, wall, per_job, same in rows:
        tput = a.jobs / wall
        ratio = tput / (a.jobs / base_wall)
        eff = ""
        if one is not None and name.startswith("ray x"):
            n = int(name[5:])
            eff = f"{tput / (n * a.jobs / one[1]):.2f}"
        print(f"{name:<12} {tput:8.2f} {ratio:10.2f} {eff:>11} {per_job * 1000:10.1f} ms  {same}")
    print(f"one job of {a.jobs} batches (split across the free workers):")
    for name, wall, same, used in splits:
        print(f"  {name:<12} {wall:6.2f} s  x{split_base / wall:.2f} vs in-process  on {used} worker(s)  "
              f"same pictures: {same}")
    print(f"one X/Y/Z plot of {a.jobs} cells (split across the free workers, put together here):")
    for name, wall, same, used in plots:
        print(f"  {name:<12} {wall:6.2f} s  x{plot_base / wall:.2f} vs in-process  on {used} worker(s)  "
              f"same grid and pictures: {same}")
    print("(efficiency = throughput(N) / (N x throughput(1)); this machine's cores are shared with other work)")


if __name__ == "__main__":
    main()
