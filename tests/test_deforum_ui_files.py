"""The Deforum tab's file fields (init image, video init, mask, soundtrack, ...) follow the API's rule
(api/common.server_file): anywhere for a page opened on the server's machine, as in A1111; for one opened from the
network, a full path inside the data dir, else Generate is refused naming the field and nothing is queued."""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image
from starlette.requests import Request

from sdstudio.core import deforum as spec
from sdstudio.core.paths import Paths
from sdstudio.core.settings import Settings
from sdstudio.engine.generate import Engine
from sdstudio.service.jobs import JobService
from sdstudio.service.queue import SQLiteJobQueue
from sdstudio.ui.app import StudioUI

DEMO = Path(__file__).resolve().parents[1] / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"


def page_request(host: str) -> gr.Request:
    return gr.Request(request=Request({"type": "http", "method": "POST", "path": "/", "headers": [],
                                       "client": (host, 50000), "query_string": b""}))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("deforum-files")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    os.link(DEMO, root / "models" / "Stable-diffusion" / DEMO.name)
    service = JobService(Engine(Paths(root)), SQLiteJobQueue(root / "jobs.sqlite3")).start()
    studio_ui = StudioUI(service, Settings(root / "config.json", {}))
    studio_ui.page = studio_ui.build()
    yield studio_ui
    service.stop()


@pytest.fixture(scope="module")
def files(ui, tmp_path_factory):
    inside = ui.service.engine.paths.data_dir / "inputs" / "init.png"
    inside.parent.mkdir(parents=True, exist_ok=True)
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    for path in (inside, outside):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return inside, outside


NETWORK, LOCAL = "10.1.2.3", "127.0.0.1"
CASES = [  # the settings that make the run read a file, and the key it is read by
    ("init_image", {"use_init": True}),
    ("video_init_path", {"animation_mode": "Video Input"}),
    ("soundtrack_path", {"add_soundtrack": "File"}),
]


@pytest.mark.parametrize("key, use", CASES, ids=[c[0] for c in CASES])
def test_a_page_from_the_network_reads_files_only_inside_the_data_dir(ui, files, key, use):
    inside, outside = files
    tab = ui.deforum

    def check(host: str, path: str) -> None:
        settings = spec.load_settings({"max_frames": 1, **use, key: path})
        assert key in spec.check_files(settings)  # the run would read it
        tab.check_files(settings, page_request(host))

    check(NETWORK, str(inside))
    with pytest.raises(gr.Error, match=rf"{key}: .* is outside the data folder"):
        check(NETWORK, str(outside))
    with pytest.raises(gr.Error, match=rf"{key}: .* is outside the data folder"):
        check(NETWORK, str(inside.parent / ".." / ".." / outside.relative_to("/")))
    with pytest.raises(gr.Error, match=rf"{key}: 'inputs/init.png': give the file's full path inside the data"):
        check(NETWORK, "inputs/init.png")
    check(LOCAL, str(outside))  # on the server's own machine: anywhere, as in A1111
    check(LOCAL, "inputs/init.png")


def test_generate_from_the_network_is_refused_before_anything_is_queued(ui, files):
    _, outside = files
    tab = ui.deforum
    settings = spec.load_settings({"max_frames": 1, "W": 64, "H": 64, "steps": 1, "use_init": True,
                                   "init_image": str(outside), "prompts": {"0": "x"}})
    inputs = tab.values_of(settings)
    with pytest.raises(gr.Error, match="init_image"):
        next(tab.run("ui:net", 17, "ultrafast", *inputs, request=page_request(NETWORK)))
    assert ui.service.queue.list(client="ui:net") == []
