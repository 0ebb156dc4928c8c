"""Execution apart from storage: the model catalogue (no torch), the output store (fsspec URLs) and the worker
pool (affinity, least loaded, a lost worker's job queued again exactly once), with in-process workers on the
tiny SD1 model. The Ray workers are in test_ray_workers.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from step_hold import StepHold

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.models.errors import ModelNotFoundError
from sdstudio.service.catalog import ModelCatalog
from sdstudio.service.jobs import JobError, JobService, Txt2ImgJob
from sdstudio.service.queue import DONE, FAILED, SQLiteJobQueue
from sdstudio.service.store import OutputStore, PublishingQueue, read_output
from sdstudio.service.workers import LOST_TWICE, LocalWorker, Worker, WorkerLost, WorkerPool


def small(**kw) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3,
                             "sampler_name": "Euler", **kw})


def test_the_catalog_and_store_import_no_torch():
    code = ("import sys; import sdstudio.service.catalog, sdstudio.service.store, sdstudio.service.workers, "
            "sdstudio.service.ray_workers; print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.fixture
def two_models(make_data_root):
    root = make_data_root("two", {"alpha": "sd1", "beta": "sd1"})
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "models" / "Lora" / "shiny.safetensors").write_bytes(b"")  # listed by name, never read here
    return root


def test_the_catalog_checks_names_and_lists_a_jobs_files(two_models):
    catalog = ModelCatalog(Paths(two_models))
    assert [t.split(" ")[0] for t in catalog.listing()["checkpoints"]] == ["alpha.safetensors", "beta.safetensors"]
    catalog.check(small(model="beta"))
    with pytest.raises(ModelNotFoundError, match="no checkpoint named 'gamma'; available: alpha, beta"):
        catalog.check(small(model="gamma"))
    ckpt = two_models / "models" / "Stable-diffusion"
    job = Txt2ImgJob(small(model="beta", prompt="x <lora:shiny:0.5> <lora:missing:1>")).to_dict()
    assert catalog.resources("txt2img", job) == {str((ckpt / "beta.safetensors").resolve()),
                                                 str((two_models / "models/Lora/shiny.safetensors").resolve())}
    assert catalog.resources("txt2img", Txt2ImgJob(small()).to_dict()) == {str((ckpt / "alpha.safetensors").resolve())}
    assert catalog.resources("load", {"model": "beta"}) == {str((ckpt / "beta.safetensors").resolve())}


def test_a_service_with_a_catalog_refuses_unknown_models_at_submit(data_dir):
    engine = Engine(Paths(data_dir))
    service = JobService(engine, SQLiteJobQueue(":memory:"), catalog=ModelCatalog(engine.registry))
    with pytest.raises(JobError, match="no checkpoint named 'nope'"):
        service.submit("a", Txt2ImgJob(small(model="nope")))
    assert service.queue.list() == []


def test_outputs_go_to_an_fsspec_store_and_the_job_says_where(data_dir):
    import fsspec

    engine = Engine(Paths(data_dir))
    store = OutputStore("memory://sdstudio-test-outputs", data_dir)
    service = JobService(engine, PublishingQueue(SQLiteJobQueue(":memory:"), store)).start()
    try:
        done = service.wait(service.submit("a", Txt2ImgJob(small(batch_size=2))).id, 120)
    finally:
        service.stop()
    assert done.status == DONE and done.result["store"] == "memory://sdstudio-test-outputs"
    for entry in done.result["images"]:
        rel = Path(entry["path"]).relative_to(data_dir).as_posix()
        assert rel.startswith("outputs/txt2img-images/") and entry["url"] == f"memory://sdstudio-test-outputs/{rel}"
        assert fsspec.open(entry["url"], "rb").open().read() == Path(entry["path"]).read_bytes()
    grid = done.result["grid"]
    assert done.result["grid_url"].endswith(Path(grid).relative_to(data_dir).as_posix())
    # the API side reads a file from the store when its path is not on this machine
    Path(grid).unlink()
    data, media = read_output(grid, done.result["grid_url"])
    assert media == "image/png" and Image.open(__import__("io").BytesIO(data)).size == (128, 64)
    assert read_output("/nowhere.png", None) is None


def test_a_store_url_without_its_driver_is_refused_naming_it(tmp_path):
    from sdstudio.service.store import StoreError

    with pytest.raises(StoreError, match="output store 'nosuchproto://x'"):
        OutputStore("nosuchproto://x", tmp_path)


def test_the_store_removes_its_own_copies_only(tmp_path):
    from sdstudio.service.store import unit_urls

    store = OutputStore(f"file://{tmp_path / 'store'}", tmp_path)
    (tmp_path / "cache").mkdir()
    kept, gone = tmp_path / "kept.txt", tmp_path / "cache" / "0-0.png"
    for p in (kept, gone):
        p.write_text(p.name)
    urls = [store.put(kept, "j"), store.put(gone, "j")]
    result = {"units": {"0": [{"path": str(gone), "url": urls[1]}, {"path": "no url"}]}}
    assert unit_urls(result) == [urls[1]]
    store.remove([*unit_urls(result), urls[1], "file:///etc/hostname", f"{store.url}-other/kept.txt"])
    assert (tmp_path / "store" / "kept.txt").read_text() == "kept.txt"
    assert not (tmp_path / "store" / "cache" / "0-0.png").exists() and Path("/etc/hostname").exists()


def pool_service(data_root: Path, workers: int, **kw):
    """A head service over one SQLite queue and ``workers`` in-process workers (each its own engine)."""
    queue = SQLiteJobQueue(data_root / "jobs.sqlite3")
    engines = [Engine(Paths(data_root)) for _ in range(workers)]
    executors = [JobService(e, queue) for e in engines]
    head_engine = engines[0]
    pool = WorkerPool([LocalWorker(x, f"w{i}") for i, x in enumerate(executors)],
                      catalog=ModelCatalog(head_engine.registry), **kw)
    return JobService(head_engine, queue, workers=pool), executors


def test_affinity_sends_a_job_to_the_worker_with_its_checkpoint(two_models):
    service, executors = pool_service(two_models, 2)
    service.start()
    try:
        ids = []
        for model in ("alpha", "beta", "alpha", "beta", "beta"):
            ids.append(service.submit("a", Txt2ImgJob(small(model=model), save_images=False)).id)
            assert service.wait(ids[-1], 120).status == DONE  # one at a time: both workers are free each time
    finally:
        service.stop()
    # alpha -> w0 (both empty: the first); beta -> w1 (neither has it: the one that ran fewer); then each
    # model back to the worker that holds it
    assert [w for _, w in service.pool.placements] == ["w0", "w1", "w0", "w1", "w1"]
    assert [x.engine.models.loads for x in executors] == [1, 1]


def test_choose_prefers_loaded_files_then_the_least_loaded(two_models):
    service, _ = pool_service(two_models, 3)
    pool = service.pool
    a, b, c = pool.slots
    ckpt = two_models / "models" / "Stable-diffusion"
    job = service.queue.submit("x", "txt2img", Txt2ImgJob(small(model="beta")).to_dict())
    assert pool.choose(job, [a, b, c]) is a
    a.done, b.done = 2, 1
    assert pool.choose(job, [a, b, c]) is c
    b.resources = {str((ckpt / "beta.safetensors").resolve())}
    assert pool.choose(job, [a, b, c]) is b and pool.choose(job, [a, c]) is c


class Dying(Worker):
    """A worker whose process dies as it starts its next job (the first ``deaths`` times), as a killed
    machine does; otherwise it runs jobs with an in-process executor."""

    def __init__(self, executor, name: str, deaths: int):
        self.inner, self.name, self.deaths = LocalWorker(executor, name), name, deaths

    def run(self, job, live, link):
        if self.deaths:
            self.deaths -= 1
            raise WorkerLost(f"{self.name} went away")
        self.inner.run(job, live, link)


def test_a_lost_workers_job_runs_again_once_then_fails(data_dir):
    queue = SQLiteJobQueue(data_dir / "jobs.sqlite3")
    x = JobService(Engine(Paths(data_dir)), queue)
    pool = WorkerPool([Dying(x, "flaky", deaths=1), Dying(x, "steady", deaths=0)])
    service = JobService(x.engine, queue, workers=pool).start()
    try:
        job = service.submit("a", Txt2ImgJob(small(), save_images=False))
        assert service.wait(job.id, 120).status == DONE
        assert [w for _, w in pool.placements] == ["flaky", "steady"] and pool.losses == {job.id: "flaky"}
    finally:
        service.stop()
    queue2 = SQLiteJobQueue(data_dir / "jobs2.sqlite3")
    pool2 = WorkerPool([Dying(x, "one", deaths=1), Dying(x, "two", deaths=1)])
    service2 = JobService(x.engine, queue2, workers=pool2).start()
    try:
        job = service2.submit("a", Txt2ImgJob(small(), save_images=False))
        failed = service2.wait(job.id, 120)
        assert failed.status == FAILED and failed.error == LOST_TWICE.format(first="one", second="two")
        assert failed.result["error_kind"] == "worker_lost"
    finally:
        service2.stop()


class DiesOnce(Dying):
    """A :class:`Dying` worker that, once dead, answers no more (the pool gives it no jobs)."""

    def run(self, job, live, link):
        try:
            super().run(job, live, link)
        except WorkerLost:
            self.alive = False
            raise


def test_a_restarted_server_does_not_queue_a_lost_job_again(data_dir):
    """The job's loss is the queue's record: after a restart its second loss fails it (not a third run)."""
    path = data_dir / "jobs.sqlite3"
    queue = SQLiteJobQueue(path)
    x = JobService(Engine(Paths(data_dir)), queue)
    pool = WorkerPool([DiesOnce(x, "first", deaths=1)])
    service = JobService(x.engine, queue, workers=pool).start()
    job = service.submit("a", Txt2ImgJob(small(), save_images=False))
    try:
        deadline = time.monotonic() + 120
        while (waiting := queue.get(job.id)).requeues == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.status == "queued" and waiting.lost_worker == "first"  # its only worker is gone
    finally:
        service.stop()
    queue.close()
    queue = SQLiteJobQueue(path)  # the API server restarts, with a new worker that dies too
    x = JobService(Engine(Paths(data_dir)), queue)
    service = JobService(x.engine, queue, workers=WorkerPool([DiesOnce(x, "second", deaths=1)])).start()
    try:
        failed = service.wait(job.id, 120)
    finally:
        service.stop()
    assert failed.status == FAILED and failed.error == LOST_TWICE.format(first="first", second="second")
    assert failed.requeues == 1


def test_progress_interrupt_and_cancel_reach_a_pool_worker(two_models):
    service, executors = pool_service(two_models, 2)
    held = service.submit("a", Txt2ImgJob(small(steps=4, n_iter=2, model="alpha"), save_images=False))
    other = service.submit("b", Txt2ImgJob(small(steps=4, model="beta"), save_images=False))
    holds = [StepHold(x, batch=0, step=1) for x in executors]
    try:
        service.start()
        for h in holds:
            h.wait()  # both workers busy, one job each
        assert {j.id for j in service.running_jobs()} == {held.id, other.id}
        mine = service.progress("a")
        assert mine["job_id"] == held.id and mine["state"]["sampling_step"] == 1 and mine["queue_position"] == 0
        assert service.progress("b")["job_id"] == other.id
        assert service.interrupt("a") == [held.id]
        assert service.cancel(other.id, "b") is not None
    finally:
        for h in holds:
            h.release()
    a, b = service.wait(held.id, 120), service.wait(other.id, 120)
    service.stop()
    assert a.status == DONE and a.result["interrupted"] and a.result["images"] == []
    assert b.status == "cancelled"


def test_pool_results_match_the_single_process_run(data_dir):
    service, _ = pool_service(data_dir, 2)
    service.start()
    try:
        jobs = [service.submit("a", Txt2ImgJob(small(seed=10 + i, n_iter=2), save_images=False)) for i in range(4)]
        done = [service.wait(j.id, 120) for j in jobs]
    finally:
        service.stop()
    alone = Engine(Paths(data_dir))
    for i, d in enumerate(done):
        assert d.status == DONE
        ref = alone.txt2img(small(seed=10 + i, n_iter=2)).images
        assert [im["seed"] for im in d.result["images"]] == [10 + i, 11 + i]
        for im, r in zip(d.result["images"], ref, strict=True):
            assert np.array_equal(np.asarray(Image.open(im["path"]).convert("RGB")), np.asarray(r.image))
    assert sorted({w for _, w in service.pool.placements}) == ["w0", "w1"]


def test_uploads_reach_a_worker_that_lacks_the_api_servers_jobs_folder(data_dir):
    """An img2img job's init image and mask are files in the API server's jobs folder; with a pool and an
    output store they are copied into the store at submit, and a worker without the file fetches it."""
    from sdstudio.core.params import Img2ImgRequest

    store = OutputStore("memory://sdstudio-test-inputs", data_dir)
    queue = SQLiteJobQueue(data_dir / "jobs.sqlite3")
    x = JobService(Engine(Paths(data_dir)), queue, jobs_dir=data_dir / "worker-jobs")  # the worker's own folder
    service = JobService(x.engine, queue, workers=WorkerPool([LocalWorker(x, "w")], store=store))
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    init, stored_mask = service.store_inputs([picture]) + service.store_inputs([mask], "mask")
    req = Img2ImgRequest(**{**small().to_dict(), "denoising_strength": 0.6}, init_images=[init], mask=stored_mask)
    job = service.submit("a", Txt2ImgJob(req, save_images=False))
    assert set(job.request["inputs"]) == {init, stored_mask}
    assert all(u.startswith("memory://sdstudio-test-inputs/cache/jobs/inputs/") for u in job.request["inputs"].values())
    Path(init).unlink()  # as on a worker on another machine
    Path(stored_mask).unlink()
    service.start()
    try:
        done = service.wait(job.id, 120)
    finally:
        service.stop()
    assert done.status == DONE, done.error
    assert sorted(p.name for p in (data_dir / "worker-jobs" / "inputs").iterdir()) == sorted(
        Path(p).name for p in (init, stored_mask))
    ref = Engine(Paths(data_dir)).img2img(req.replace(init_images=[picture], mask=mask)).images[0].image
    assert np.array_equal(np.asarray(Image.open(done.result["images"][0]["path"]).convert("RGB")), np.asarray(ref))


def test_split_ranges_are_contiguous_and_even():
    from sdstudio.service.shards import split_ranges

    assert split_ranges(0, 8, 2) == [(0, 4), (4, 8)]
    assert split_ranges(1, 8, 3) == [(1, 4), (4, 6), (6, 8)]
    assert split_ranges(0, 2, 5) == [(0, 1), (1, 2)]  # never an empty range
    assert split_ranges(3, 4, 2) == [(3, 4)]


def test_worker_flags_parse_and_a_lone_cpu_worker_count_is_refused():
    from sdstudio.cli import build_parser
    from sdstudio.flags import worker_pool_from

    args = build_parser().parse_args(["serve", "--workers", "ray://head:10001", "--ray-cpu-workers", "3",
                                      "--output-store", "s3://bucket/out"])
    assert (args.workers, args.ray_cpu_workers, args.output_store, args.ray) == ("ray://head:10001", 3,
                                                                                 "s3://bucket/out", False)
    assert worker_pool_from(build_parser().parse_args(["serve"]), None, None) is None  # in-process
    with pytest.raises(ValueError, match="--ray-cpu-workers needs --ray or --workers"):
        worker_pool_from(build_parser().parse_args(["serve", "--ray-cpu-workers", "2"]), None, None)
