"""Where an unsafe pickled checkpoint shows: the UI's checkpoint dropdown labels it as A1111's picklescan warns,
and a worker pool's API process refuses a job naming it before it is queued (the worker's safe loader would
refuse it anyway). The scan itself is tested in test_pickle_scan.py."""

from __future__ import annotations

import pytest

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.core.settings import Settings
from sdstudio.service.catalog import ModelCatalog
from sdstudio.service.jobs import JobError, JobService, Txt2ImgJob
from sdstudio.service.queue import SQLiteJobQueue
from sdstudio.testing.hostile import payloads, torch_zip


@pytest.fixture
def with_unsafe(data_dir, tmp_path):
    marker = tmp_path / "MARKER"
    evil = data_dir / "models" / "Stable-diffusion" / "evil.ckpt"
    evil.write_bytes(torch_zip(payloads(marker)["os.system (GLOBAL + REDUCE)"]))
    return data_dir, marker


def test_the_dropdown_labels_an_unsafe_checkpoint(with_unsafe):
    from sdstudio.engine.generate import Engine
    from sdstudio.ui.app import StudioUI

    data_dir, marker = with_unsafe
    service = JobService(Engine(Paths(data_dir)), SQLiteJobQueue(":memory:"))
    ui = StudioUI(service, Settings(data_dir / "config.json", {}))
    choices = {title: label for label, title in ui.checkpoint_choices()}
    evil = next(t for t in choices if t.startswith("evil.ckpt"))
    good = next(t for t in choices if t.startswith("tiny-sd1"))
    assert choices[evil] == f"{evil} ⚠ may be malicious" and choices[good] == good
    assert not marker.exists()


def test_a_pools_api_process_refuses_a_job_on_it(with_unsafe):
    from sdstudio.engine.generate import Engine

    data_dir, marker = with_unsafe
    catalog = ModelCatalog(Paths(data_dir))
    service = JobService(Engine(Paths(data_dir)), SQLiteJobQueue(":memory:"), catalog=catalog)
    evil = next(m.title for m in catalog.registry.checkpoints if m.title.startswith("evil.ckpt"))
    with pytest.raises(JobError, match="evil.ckpt.*malicious"):
        service.submit("a", Txt2ImgJob(Txt2ImgRequest(prompt="x", model=evil, steps=1, width=64, height=64)))
    service.submit("a", Txt2ImgJob(Txt2ImgRequest(prompt="x", model="tiny-sd1", steps=1, width=64, height=64)))
    assert not marker.exists()
