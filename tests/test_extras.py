"""Extras' upscaler 2 visibility against its definition.

Reference: A1111's postprocessing upscale blends the two upscalers' results with
``Image.blend(upscaled_1, upscaled_2, visibility)``, i.e. per pixel ``a + visibility * (b - a)``; here
``a`` and ``b`` are each upscaler's own output for the same request (upscaler 2 alone as upscaler 1),
and the blend is computed in numpy. A1111 skips the step (upscaler 2 too) when upscaler 1 is None.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdstudio.engine import extras
from sdstudio.engine.extras import ExtrasRequest
from sdstudio.engine.upscalers import Upscalers
from sdstudio.testing.synthetic import write_upscaler


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory):
    root = tmp_path_factory.mktemp("extras")
    write_upscaler(root / "ESRGAN" / "2x-tiny.safetensors", "esrgan", 2, seed=3)
    return Upscalers([root / "ESRGAN"])


def picture(w=36, h=28) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(1)
    arr = np.stack([xx * 7 % 256, yy * 9 % 256, (xx * yy) % 256], -1) + rng.integers(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


_OWN: dict = {}


def own_output(upscalers, name, **geometry) -> np.ndarray:
    """The upscaler's result for this geometry when it is the only one."""
    key = (name, tuple(sorted(geometry.items())))
    if key not in _OWN:
        _OWN[key] = np.asarray(extras.run(picture(), ExtrasRequest(upscaler_1=name, **geometry), upscalers))
    return _OWN[key].astype(float)


GEOMETRIES = [{"scale": 2.0}, {"scale": 1.5}, {"resize_to": (80, 48), "crop": True}]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("first,second", [("2x-tiny", "Lanczos"), ("Lanczos", "Nearest"), ("Nearest", "2x-tiny")])
@pytest.mark.parametrize("visibility", [0.2, 0.85])
def test_upscaler_2_is_blended_by_its_visibility(upscalers, first, second, visibility, geometry):
    a, b = own_output(upscalers, first, **geometry), own_output(upscalers, second, **geometry)
    assert a.shape == b.shape and np.abs(a - b).mean() > 5  # two really different pictures
    req = ExtrasRequest(upscaler_1=first, upscaler_2=second, upscaler_2_visibility=visibility, **geometry)
    got = np.asarray(extras.run(picture(), req, upscalers)).astype(float)
    want = a + visibility * (b - a)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1.0  # PIL truncates the blend to whole values


def test_visibility_ends(upscalers):
    a, b = own_output(upscalers, "2x-tiny", scale=2.0), own_output(upscalers, "Nearest", scale=2.0)
    for v, want in ((0.0, a), (1.0, b)):
        req = ExtrasRequest(upscaler_1="2x-tiny", upscaler_2="Nearest", upscaler_2_visibility=v, scale=2.0)
        assert np.array_equal(np.asarray(extras.run(picture(), req, upscalers)), want)


def test_no_upscaler_1_means_no_upscale_step(upscalers):
    req = ExtrasRequest(upscaler_1="None", upscaler_2="Lanczos", upscaler_2_visibility=0.7)
    assert np.array_equal(np.asarray(extras.run(picture(), req, upscalers)), np.asarray(picture()))
