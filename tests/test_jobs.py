"""The job service on the tiny model: jobs run in queue order, belong to their client, survive parking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from step_hold import StepHold

from sdstudio.core import infotext
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.service.jobs import JobError, JobService, Txt2ImgJob
from sdstudio.service.queue import CANCELLED, DONE, FAILED, SQLiteJobQueue


def small(**kw) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3,
                             "sampler_name": "Euler", **kw})


@pytest.fixture
def idle(data_dir):
    """A service whose worker is not started yet: tests queue jobs first, then start it."""
    svc = JobService(Engine(Paths(data_dir)), SQLiteJobQueue(data_dir / "jobs.sqlite3"))
    yield svc
    svc.stop()
    svc.queue.close()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_job_writes_its_images_before_it_is_done(service):
    job = service.submit("a", Txt2ImgJob(small(batch_size=2, n_iter=2)))
    done = service.wait(job.id, timeout=120)
    assert done.status == DONE
    images = done.result["images"]
    assert [im["seed"] for im in images] == [3, 4, 5, 6] and all(Path(im["path"]).is_file() for im in images)
    assert infotext.parse(images[2]["infotext"])["Seed"] == "5"
    assert Path(done.result["grid"]).name.startswith("grid-") and done.result["all_seeds"] == [3, 4, 5, 6]


def test_random_seed_is_fixed_at_submit(service):
    job = service.submit("a", Txt2ImgJob(small(seed=-1)))
    stored = job.request["request"]["seed"]
    assert stored != -1
    assert service.wait(job.id, 120).result["images"][0]["seed"] == stored


def test_bad_requests_are_refused_at_submit(service):
    with pytest.raises(JobError, match="steps must be"):
        service.submit("a", Txt2ImgJob(small(steps=0)))
    assert service.queue.list() == []


def test_a_failing_job_fails_alone(service):
    bad = service.submit("a", Txt2ImgJob(small(model="missing-model")))
    good = service.submit("a", Txt2ImgJob(small()))
    assert service.wait(bad.id, 120).status == FAILED and "missing-model" in service.queue.get(bad.id).error
    assert service.wait(good.id, 120).status == DONE


def test_long_job_is_parked_so_another_client_goes_first(idle, data_dir):
    long = idle.submit("a", Txt2ImgJob(small(n_iter=3, seed=100), save_images=False))
    short = idle.submit("b", Txt2ImgJob(small(seed=7), save_images=False))
    idle.start()
    a, b = idle.wait(long.id, 120), idle.wait(short.id, 120)
    assert a.status == b.status == DONE
    assert b.finished < a.finished  # b's single image did not wait for a's three batches
    assert [im["seed"] for im in a.result["images"]] == [100, 101, 102]
    # the parked-and-resumed job made the pictures an uninterrupted run makes
    alone = Engine(Paths(data_dir)).txt2img(small(n_iter=3, seed=100))
    for im, ref in zip(a.result["images"], alone.images):
        assert np.array_equal(pixels(im["path"]), np.asarray(ref.image))
        assert im["infotext"] == ref.infotext


def test_interrupt_touches_only_the_callers_job(idle):
    a = idle.submit("a", Txt2ImgJob(small(steps=4, n_iter=2)))
    b = idle.submit("b", Txt2ImgJob(small()))
    with StepHold(idle, batch=0, step=1) as hold:  # a's first step of its first batch
        idle.start()
        assert hold.wait().id == a.id
        assert idle.interrupt("b") == []  # b's job is not running: nothing of a's is touched
        assert idle.live is not None and not idle.live.interrupted
        assert idle.interrupt("a") == [a.id]
    done = idle.wait(a.id, 120)
    assert done.status == DONE and done.result["interrupted"] and done.result["images"] == []
    assert idle.wait(b.id, 120).status == DONE and len(idle.queue.get(b.id).result["images"]) == 1


def test_progress_is_per_client(idle):
    a = idle.submit("a", Txt2ImgJob(small(steps=8)))
    b = idle.submit("b", Txt2ImgJob(small()))
    assert idle.progress("b")["queue_position"] == 1 and idle.progress("a")["queue_position"] == 0
    with StepHold(idle, batch=0, step=2) as hold:
        idle.start()
        assert hold.wait().id == a.id
        mine = idle.progress("a")
        assert mine["job_id"] == a.id and mine["state"]["sampling_step"] == 2
        assert mine["state"]["sampling_steps"] == 8 and mine["progress"] == 2 / 8
        theirs = idle.progress("b")
        assert theirs["job_id"] == b.id and theirs["state"]["sampling_step"] == 0 and theirs["queue_position"] == 0
        assert idle.preview_png("a") is not None and idle.preview_png("b") is None  # step 1's preview
        idle.interrupt("a")


def test_cancel_queued_and_running(idle):
    a = idle.submit("a", Txt2ImgJob(small(steps=4)))
    later = idle.submit("a", Txt2ImgJob(small()))
    assert idle.cancel(later.id, "b") is None  # not b's
    assert idle.cancel(later.id, "a").status == CANCELLED
    with StepHold(idle, batch=0, step=1) as hold:
        idle.start()
        assert hold.wait().id == a.id
        assert idle.cancel(a.id, "b") is None
        idle.cancel(a.id, "a")
    assert idle.wait(a.id, 120).status == CANCELLED


def test_skip_drops_the_current_batch(idle):
    a = idle.submit("a", Txt2ImgJob(small(steps=4, n_iter=2, seed=50)))
    with StepHold(idle, batch=0, step=1) as hold:
        idle.start()
        assert hold.wait().id == a.id
        assert idle.skip("b") == []
        assert idle.skip("a") == [a.id]
    done = idle.wait(a.id, 120)
    assert done.status == DONE and [im["seed"] for im in done.result["images"]] == [51]


def test_progress_says_which_latent_space(tmp_path, tiny_dir):
    """Live previews map SDXL latents to RGB with their own coefficients: progress must say which."""
    import os

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    os.link(tiny_dir / "tiny-sdxl.safetensors", folder / "tiny-sdxl.safetensors")
    seen = []
    Engine(Paths(tmp_path)).txt2img(small(steps=1), on_progress=lambda p: seen.append(p.sdxl))
    assert seen == [True]
