"""The quality harness's ControlNet row (``python -m sdstudio.eval --only controlnet``) on the shipped demo
model and demo ControlNet, at a small size: the row's shape, weight 0 giving exactly the pictures of no unit,
the unit at weight 1 placing the objects where the control scene has them far better than no unit, and the
row saying so when the demo ControlNet is not installed."""

from __future__ import annotations

from argparse import Namespace

import pytest
from conftest import REPO, link_shipped

from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.eval.__main__ import DEMO_CONTROLNET, controlnet_rows

DEMO = "models/Stable-diffusion/sdstudio-demo.safetensors"
CONTROLNET = f"models/ControlNet/{DEMO_CONTROLNET}.safetensors"


ARGS = Namespace(size=128, steps=10, sampler="Euler a", cfg=7.0, model=None)


@pytest.mark.skipif(not (REPO / CONTROLNET).is_file(), reason="the demo ControlNet is not trained yet")
def test_the_controlnet_row_on_the_demo_model(tmp_path):
    engine = Engine(Paths(link_shipped(tmp_path, [DEMO, CONTROLNET])))
    (label, value, note), = controlnet_rows(engine, ARGS, n=4, log=lambda *_: None)
    assert label.startswith("ControlNet (demo canny): object IoU") and note.startswith("4 scenes")
    none, zero, half, full = (float(v) for v in value.split(" / "))
    assert all(0.0 <= v <= 1.0 for v in (none, zero, half, full))
    assert zero == none  # weight 0 is no unit: the same pictures
    assert full > none + 0.2, value  # the edges say where and how big (0.07 vs 0.53 over 24 scenes)


def test_the_row_says_when_the_demo_controlnet_is_missing(tmp_path):
    engine = Engine(Paths(link_shipped(tmp_path, [DEMO])))
    (_, value, note), = controlnet_rows(engine, ARGS, n=1)
    assert value == "n/a" and DEMO_CONTROLNET in note and "not installed" in note
