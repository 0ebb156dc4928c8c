"""Generation on Ray actors: a local Ray cluster with 2 CPU workers (one core, one math thread each) on tiny SD1
checkpoints, fed by one SQLite queue of record. Affinity, progress and previews from a remote worker,
interrupt / skip / cancel reaching it, a worker killed mid-job (its job runs again exactly once, from its
last recorded batch, on the other worker; a replacement worker comes up) and every picture identical to the
one a single process makes from the same seeds (batches, script units and animation frames split across the
workers included); the files also land in a file:// output store."""

from __future__ import annotations

import functools
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import step_hold
import torch
from PIL import Image
from step_hold import StepHold, wait_for_file

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import DeviceOptions, Paths
from sdstudio.engine.generate import Engine
from sdstudio.service.catalog import ModelCatalog
from sdstudio.service.jobs import JobService, Txt2ImgJob
from sdstudio.service.queue import CANCELLED, DONE, SQLiteJobQueue
from sdstudio.service.ray_workers import WorkerSpec, start_ray_pool

pytestmark = pytest.mark.xdist_group("ray")  # one Ray cluster: every test here on one test worker

# a job whose prompt is one of these is held on whichever worker runs it, once per worker, at (batch, step)
HOLDS = {"hold interrupt": (0, 2), "hold cancel": (0, 1), "hold skip": (0, 1), "hold kill": (1, 1),
         "hold kill full": (1, 1), "hold split kill": (1, 1)}


def install_holds(folder: Path, service) -> None:
    """The workers' setup: a file hold (step_hold.py) per prompt; the test reads ``held``, writes ``release``."""
    for prompt, (batch, step) in HOLDS.items():
        StepHold(service, batch=batch, step=step, prompt=prompt, folder=hold_dir(folder, prompt))


def hold_dir(folder: Path, prompt: str) -> Path:
    path = folder / prompt.replace(" ", "-")
    path.mkdir(parents=True, exist_ok=True)
    return path


def held_job(folder: Path) -> str:
    """The id of the job held in ``folder`` (``held`` exists a moment before its text is written)."""
    wait_for_file(folder / "held")
    return until(lambda: (folder / "held").read_text(), "the held job's id")


def small(**kw) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 3,
                             "sampler_name": "Euler", **kw})


@dataclass
class Cluster:
    service: JobService
    root: Path
    holds: Path
    store: Path

    @property
    def pool(self):
        return self.service.pool

    def worker_of(self, job_id: str):
        name = [w for j, w in self.pool.placements if j == job_id][-1]
        return next(w for w in self.pool.workers if w.name == name)


@pytest.fixture(scope="module")
def cluster(make_data_root, tmp_path_factory):
    # the hold helpers travel to the workers by value (the workers need not import the tests)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(step_hold)
    root = make_data_root("ray", {"alpha": "sd1", "beta": "sd1"})
    holds = tmp_path_factory.mktemp("holds")
    store = tmp_path_factory.mktemp("store")
    paths = Paths(root)
    spec = WorkerSpec(paths, DeviceOptions(precision="full"), store_url=f"file://{store}",
                      setup=functools.partial(install_holds, holds))
    service = None
    try:
        # a small Ray: 3 cores' worth of slots (2 workers, and 1 for the server test's own), no dashboard
        ray.init(num_cpus=3, include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False)
        pool = start_ray_pool(spec, cpu_workers=2, catalog=ModelCatalog(paths))
        service = JobService(Engine(paths), SQLiteJobQueue(root / "jobs.sqlite3"), workers=pool,
                             catalog=pool.catalog).start()
        yield Cluster(service, root, holds, store)
    finally:
        for prompt in HOLDS:  # a failed test must not leave a worker held
            (hold_dir(holds, prompt) / "release").touch()
        if service is not None:
            service.stop()
        if ray.is_initialized():
            ray.shutdown()


def reference(root: Path, req: Txt2ImgRequest) -> list[np.ndarray]:
    """The pictures one process makes from the same request (one math thread, as each worker has)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [np.asarray(g.image) for g in Engine(Paths(root), DeviceOptions(precision="full")).txt2img(req).images]
    finally:
        torch.set_num_threads(threads)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def until(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_affinity_puts_each_checkpoint_on_its_own_worker(cluster):
    svc = cluster.service
    for model in ("alpha", "beta", "alpha", "beta"):
        job = svc.submit("aff", Txt2ImgJob(small(model=model, steps=2), save_images=False))
        assert svc.wait(job.id, 300).status == DONE
    names = [w for _, w in cluster.pool.placements[-4:]]
    assert names[0] != names[1] and names[2] == names[0] and names[3] == names[1]
    loaded = {w.name: {Path(p).name for p in w.resources()} for w in cluster.pool.workers}
    assert loaded == {names[0]: {"alpha.safetensors"}, names[1]: {"beta.safetensors"}}


def test_progress_previews_interrupt_skip_and_cancel_reach_remote_workers(cluster):
    cluster.pool.split_batches = False  # each job on one worker here (split jobs: the tests below)
    try:
        remote_controls(cluster)
    finally:
        cluster.pool.split_batches = True


def remote_controls(cluster):
    svc, holds = cluster.service, cluster.holds
    job = svc.submit("i", Txt2ImgJob(small(prompt="hold interrupt", steps=4, n_iter=2), save_images=False))
    folder = hold_dir(holds, "hold interrupt")
    assert held_job(folder) == job.id
    # the API side's view of the remote job: its step, its batch and the preview made on the worker
    until(lambda: svc.progress("i")["state"]["sampling_step"] == 2 and svc.preview_png("i"), "the remote progress")
    p = svc.progress("i")
    assert p["job_id"] == job.id and p["state"]["sampling_steps"] == 4 and p["state"]["job_count"] == 2
    assert p["progress"] == pytest.approx(2 / 8) and svc.progress("other")["job_id"] is None
    assert svc.interrupt("other") == [] and svc.interrupt("i") == [job.id]
    actor = cluster.worker_of(job.id).actor
    until(lambda: ray.get(actor.state.remote(job.id)).get("interrupted"), "the interrupt on the worker")
    (folder / "release").touch()
    done = svc.wait(job.id, 300)
    assert done.status == DONE and done.result["interrupted"] and done.result["images"] == []

    job = svc.submit("s", Txt2ImgJob(small(prompt="hold skip", n_iter=2, seed=50), save_images=False))
    folder = hold_dir(holds, "hold skip")
    assert held_job(folder) == job.id
    actor = cluster.worker_of(job.id).actor
    assert svc.skip("s") == [job.id]
    until(lambda: ray.get(actor.state.remote(job.id)).get("skip"), "the skip on the worker")
    (folder / "release").touch()
    done = svc.wait(job.id, 300)
    assert done.status == DONE and [im["seed"] for im in done.result["images"]] == [51]

    job = svc.submit("c", Txt2ImgJob(small(prompt="hold cancel", n_iter=2), save_images=False))
    folder = hold_dir(holds, "hold cancel")
    assert held_job(folder) == job.id
    actor = cluster.worker_of(job.id).actor
    assert svc.cancel(job.id, "someone else") is None and svc.cancel(job.id, "c") is not None
    until(lambda: ray.get(actor.state.remote(job.id)).get("interrupted"), "the cancel on the worker")
    (folder / "release").touch()
    assert svc.wait(job.id, 300).status == CANCELLED


def test_a_jobs_batches_split_across_the_workers_give_one_workers_pictures(cluster):
    from sdstudio.core import outputs

    svc = cluster.service
    req = small(seed=500, n_iter=4, batch_size=2)
    # a worker is free a moment after its last job is recorded
    until(lambda: all(w["running"] == [] for w in cluster.pool.describe()), "both workers free")
    job = svc.submit("split", Txt2ImgJob(req))  # both workers free: batches 0-1 on one, 2-3 on the other
    done = svc.wait(job.id, 300)
    assert done.status == DONE
    assert len({w for j, w in cluster.pool.placements if j == job.id}) == 2
    images = done.result["images"]
    assert [im["seed"] for im in images] == list(range(500, 508)) and done.result["all_seeds"] == list(range(500, 508))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = Engine(Paths(cluster.root), DeviceOptions(precision="full")).txt2img(req).images
    finally:
        torch.set_num_threads(threads)
    for im, r in zip(images, ref, strict=True):
        assert np.array_equal(pixels(im["path"]), np.asarray(r.image)) and im["infotext"] == r.infotext
    # one grid of all eight, in order, as one worker makes it
    grid = pixels(done.result["grid"])
    assert np.array_equal(grid, np.asarray(outputs.image_grid([Image.open(im["path"]).convert("RGB")
                                                                  for im in images], 2)))
    assert Path(done.result["grid_url"].removeprefix("file://")).read_bytes() == Path(done.result["grid"]).read_bytes()


def test_x_y_z_cells_and_prompt_lines_split_across_the_workers_give_one_workers_outputs(cluster):
    from sdstudio.scripts import Studio

    svc = cluster.service
    plot = small(seed=800, subseed=5, steps=2, script_name="X/Y/Z plot",
                 script_args={"x_type": "Seed", "x_values": "-1, 801", "y_type": "Steps", "y_values": "1, 2",
                              "include_lone_images": True})
    lines = small(seed=900, subseed=6, steps=2, script_name="Prompts from file or textbox",
                  script_args={"prompt_txt": 'a blue square\n--prompt "a green dot" --steps 1\na star'})
    for req in (plot, lines):
        until(lambda: all(w["running"] == [] for w in cluster.pool.describe()), "both workers free")
        job = svc.submit("units", Txt2ImgJob(req))  # its cells / lines in two ranges, one per worker
        done = svc.wait(job.id, 300)
        assert done.status == DONE and len({w for j, w in cluster.pool.placements if j == job.id}) == 2
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ref = Studio(Engine(Paths(cluster.root), DeviceOptions(precision="full"))).generate(req).images
        finally:
            torch.set_num_threads(threads)
        made = done.result.get("grids", []) + done.result["images"]  # as one worker gives them: grid first
        assert len(made) == len(ref) and [m["infotext"] for m in made] == [r.infotext for r in ref]
        for m, r in zip(made, ref, strict=True):
            assert np.array_equal(pixels(m["path"]), np.asarray(r.image))
            assert m["url"].startswith(f"file://{cluster.store}/outputs/")  # put together here, then stored
        assert "units" not in done.result and not (cluster.root / "cache" / "jobs" / job.id / "units").exists()
        assert not list((cluster.store / "cache" / "jobs" / job.id).glob("units/*"))  # nor the store's copies


def test_an_animations_frames_split_across_the_workers_give_one_runs_frames_and_video(cluster, tmp_path):
    from sdstudio.core import deforum as spec
    from sdstudio.engine import video
    from sdstudio.scripts import Studio
    from sdstudio.scripts.deforum import DeforumRun

    svc = cluster.service
    settings = {"animation_mode": "Interpolation", "max_frames": 5, "W": 64, "H": 64, "steps": 2, "seed": 21,
                "sampler": "Euler", "prompts": {"0": "a red circle", "3": "a blue square"}, "negative_prompts": "",
                "fps": 10, "color_coherence": "None"}
    until(lambda: all(w["running"] == [] for w in cluster.pool.describe()), "both workers free")
    job = svc.submit_deforum("anim", svc.prepare_deforum(settings, model="alpha",
                                                         options_overrides={"deforum_ffmpeg_preset": "ultrafast"}))
    done = svc.wait(job.id, 300)
    assert done.status == DONE, done.error
    assert len({w for j, w in cluster.pool.placements if j == job.id}) == 2  # frames 0-2 on one, 3-4 on the other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = DeforumRun(Studio(Engine(Paths(cluster.root), DeviceOptions(precision="full"))),
                         spec.load_settings(settings), tmp_path, outdir=tmp_path / "one", model=job.request["model"],
                         options={"ffmpeg_preset": "ultrafast"}).run()
    finally:
        torch.set_num_threads(threads)
    assert len(done.result["frames"]) == 5 and done.result["frames_done"] == 5
    for made, one in zip(done.result["frames"], ref.frames, strict=True):
        assert np.array_equal(pixels(made), pixels(one))
    assert video.probe(done.result["video"]).frames == 5 and Path(done.result["settings_file"]).is_file()
    assert done.result["phase"] == "DONE" and not done.result["interrupted"]


def test_a_split_animation_parks_for_another_client_and_goes_on_with_the_same_frames(cluster, tmp_path):
    from sdstudio.core import deforum as spec
    from sdstudio.scripts import Studio
    from sdstudio.scripts.deforum import DeforumRun

    svc = cluster.service
    settings = {"animation_mode": "Interpolation", "max_frames": 12, "W": 64, "H": 64, "steps": 3, "seed": 31,
                "sampler": "Euler", "prompts": {"0": "a green field"}, "negative_prompts": "", "fps": 10,
                "color_coherence": "None", "skip_video_creation": True}
    until(lambda: all(w["running"] == [] for w in cluster.pool.describe()), "both workers free")
    job = svc.submit_deforum("film", svc.prepare_deforum(settings, model="alpha"))
    until(lambda: svc.queue.get(job.id).result.get("frames_done", 0) >= 1, "the animation under way")
    other = svc.submit("someone else", Txt2ImgJob(small(seed=41, steps=2), save_images=False))
    assert svc.wait(other.id, 300).status == DONE
    done = svc.wait(job.id, 600)
    assert done.status == DONE, done.error
    assert done.finished > svc.queue.get(other.id).finished  # the other client's picture came first
    placed = [w for j, w in cluster.pool.placements if j == job.id]
    assert len(placed) >= 3  # split over both, parked between frames, then claimed again
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = DeforumRun(Studio(Engine(Paths(cluster.root), DeviceOptions(precision="full"))),
                         spec.load_settings(settings), tmp_path, outdir=tmp_path / "one",
                         model=job.request["model"]).run()
    finally:
        torch.set_num_threads(threads)
    assert len(done.result["frames"]) == 12 and done.result["video"] is None
    for made, one in zip(done.result["frames"], ref.frames, strict=True):
        assert np.array_equal(pixels(made), pixels(one))


def test_an_img2img_jobs_uploads_reach_a_worker_from_the_output_store(cluster):
    from sdstudio.core.params import Img2ImgRequest

    svc = cluster.service
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (8, 8, 40, 40))
    init, stored_mask = svc.store_inputs([picture]) + svc.store_inputs([mask], "mask")
    req = Img2ImgRequest(**{**small(seed=31, subseed=4).to_dict(), "denoising_strength": 0.5}, init_images=[init],
                         mask=stored_mask)
    urls = svc._publish_inputs(req)  # what submit records: the uploads' copies in the store
    assert sorted(urls) == sorted([init, stored_mask])
    for path in urls:  # the worker does not see the API server's jobs folder
        Path(path).unlink()
    job = svc.queue.submit("up", "img2img", {**Txt2ImgJob(req, save_images=False).to_dict(), "inputs": urls})
    svc._notify()
    done = svc.wait(job.id, 300)
    assert done.status == DONE, done.error
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = Engine(Paths(cluster.root), DeviceOptions(precision="full")).img2img(
            req.replace(init_images=[picture], mask=mask)).images[0].image
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(pixels(done.result["images"][0]["path"]), np.asarray(ref))


def test_the_server_runs_its_jobs_on_ray_workers_behind_the_same_api(cluster, tmp_path):
    from fastapi.testclient import TestClient

    from sdstudio.cli import build_parser
    from sdstudio.server import create_app

    store = tmp_path / "store"
    args = build_parser().parse_args(["serve", "--data-dir", str(cluster.root), "--api", "--nowebui",
                                      "--queue-db", str(tmp_path / "q.sqlite3"), "--workers", "auto",
                                      "--ray-cpu-workers", "1", "--output-store", f"file://{store}"])
    app = create_app(args)  # joins the running Ray: one more CPU worker
    service = app.state.service
    try:
        with TestClient(app) as http:
            body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 9, "sampler_name": "Euler"}
            a1111 = http.post("/sdapi/v1/txt2img", json=body)  # A1111's blocking route, unchanged
            assert a1111.status_code == 200 and len(a1111.json()["images"]) == 1
            job = http.post("/sdstudio/v1/jobs", json={"request": {**body, "save_images": True}}).json()
            until(lambda: http.get(f"/sdstudio/v1/jobs/{job['id']}").json()["status"] == "done", "the job")
            done = http.get(f"/sdstudio/v1/jobs/{job['id']}").json()
            entry = done["result"]["images"][0]
            assert entry["url"].startswith(f"file://{store}/outputs/txt2img-images/")
            local = http.get(done["images"][0]).content
            Path(entry["path"]).unlink()  # as on an API server that is not the worker's machine
            assert http.get(done["images"][0]).content == local  # served from the store
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(local)).convert("RGB")),
                                  reference(cluster.root, small(**body))[0])
            summary = http.get("/sdstudio/v1/queue").json()
            assert [w["name"] for w in summary["workers"]] == ["ray-0"] and summary["workers"][0]["alive"]
            bad = http.post("/sdstudio/v1/jobs",
                            json={"request": {**body, "override_settings": {"sd_model_checkpoint": "gamma"}}})
            assert bad.status_code == 404 and "no checkpoint named 'gamma'" in bad.json()["detail"]
    finally:
        service.stop()


def holder(cluster, job_id: str, batch: int, step: int):
    """The worker whose run of ``job_id`` is held at (batch, step)."""
    return next(w for w in cluster.pool.workers if w.alive and
                {k: v for k, v in ray.get(w.actor.state.remote(job_id)).items() if k in ("job_no", "step")}
                == {"job_no": batch, "step": step})


def test_a_split_jobs_lost_shard_runs_again_elsewhere_and_no_batch_twice(cluster):
    svc, pool = cluster.service, cluster.pool
    until(lambda: all(w["running"] == [] for w in pool.describe()), "both workers free")
    req = small(prompt="hold split kill", seed=700, n_iter=4)
    job = svc.submit("sk", Txt2ImgJob(req, save_images=False))  # batches 0-1 on one worker, 2-3 on the other
    folder = hold_dir(cluster.holds, "hold split kill")
    assert held_job(folder) == job.id
    victim = holder(cluster, job.id, 1, 1)
    other = next(w for w in pool.workers if w is not victim)
    until(lambda: ray.get(other.actor.state.remote(job.id)) == {}, "the other half done")
    assert svc.queue.get(job.id).batches_done == 1  # the prefix: batch 0 (2 and 3 wait for 1)
    ray.kill(victim.actor)
    (folder / "release").touch()
    done = svc.wait(job.id, 600)
    assert done.status == DONE and pool.losses[job.id] == victim.name
    images = done.result["images"]
    assert [im["seed"] for im in images] == [700, 701, 702, 703]
    jobs_dir = cluster.root / "cache" / "jobs" / job.id
    assert sorted(p.name for p in jobs_dir.glob("*.png")) == sorted(Path(im["path"]).name for im in images)
    for im, ref in zip(images, reference(cluster.root, req), strict=True):
        assert np.array_equal(pixels(im["path"]), ref)
    until(lambda: sum(w.alive for w in pool.workers) == 2, "a replacement worker", timeout=600)


def run_with_a_kill(cluster, count: int, kill_prompt: str):
    """``count`` jobs of two clients (one of them held at its second batch); the worker holding it is killed."""
    svc, pool = cluster.service, cluster.pool
    lost_before = dict(pool.losses)
    reqs = []
    for i in range(count):
        prompt = kill_prompt if i == 2 else f"job {i}"
        reqs.append(small(prompt=prompt, seed=100 + 10 * i, n_iter=3 if i == 2 else 1 + i % 2,
                          batch_size=2 if i % 3 == 0 else 1))
    jobs = [svc.submit("ab"[i % 2], Txt2ImgJob(r, save_images=False)) for i, r in enumerate(reqs)]
    folder = hold_dir(cluster.holds, kill_prompt)
    held = held_job(folder)
    assert held == jobs[2].id
    victim = holder(cluster, held, 1, 1)  # its second batch's worker (the job may be split)
    assert svc.queue.get(held).batches_done == 1  # its first batch is recorded before the second begins
    ray.kill(victim.actor)
    (folder / "release").touch()  # the job's second run (another worker) passes the hold
    done = [svc.wait(j.id, 900) for j in jobs]
    assert [d.status for d in done] == [DONE] * count
    assert {k: v for k, v in pool.losses.items() if k not in lost_before} == {held: victim.name}
    assert [w for j, w in pool.placements if j == held][-1] != victim.name
    jobs_dir = cluster.root / "cache" / "jobs"
    for d, req in zip(done, reqs, strict=True):
        images = d.result["images"]
        assert [im["seed"] for im in images] == [req.seed + k for k in range(req.n_iter * req.batch_size)]
        # exactly once: the job's folder holds its pictures and nothing else (no batch written twice)
        assert sorted(p.name for p in (jobs_dir / d.id).glob("*.png")) == sorted(Path(im["path"]).name for im in images)
        for im, ref in zip(images, reference(cluster.root, req), strict=True):
            assert np.array_equal(pixels(im["path"]), ref)
            # and the same file in the output store, under its place in the data dir
            stored = Path(im["url"].removeprefix("file://"))
            assert stored == cluster.store / Path(im["path"]).relative_to(cluster.root)
            assert stored.read_bytes() == Path(im["path"]).read_bytes()
    # the dead worker is replaced: two workers answer again
    until(lambda: sum(w.alive for w in cluster.pool.workers) == 2, "a replacement worker", timeout=600)
    return done


def test_a_killed_worker_s_job_runs_again_once_and_every_job_finishes_once(cluster):
    run_with_a_kill(cluster, 8, "hold kill")


@pytest.mark.full
def test_thirty_jobs_with_a_killed_worker(cluster):
    run_with_a_kill(cluster, 30, "hold kill full")
