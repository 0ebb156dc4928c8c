"""Hires. fix: geometry, both upscaler kinds, the second pass's own settings, infotext round trip."""

from __future__ import annotations

import numpy as np
import pytest

from sdstudio.core import infotext
from sdstudio.core.params import RequestError, Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.models.errors import ModelNotFoundError
from sdstudio.testing.synthetic import write_upscaler

BASE = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64, "seed": 3,
        "sampler_name": "Euler", "enable_hr": True, "denoising_strength": 0.5}


@pytest.mark.parametrize("w, h, scale, rx, ry, size, cut", [
    (512, 512, 2.0, 0, 0, (1024, 1024), (0, 0)),
    (512, 768, 1.5, 0, 0, (768, 1152), (0, 0)),
    (520, 512, 1.5, 0, 0, (780, 768), (0, 0)),  # not a multiple of 8: A1111 truncates to int
    (512, 768, 2.0, 1024, 0, (1024, 1536), (0, 0)),  # one side given: the other keeps the ratio
    (512, 768, 2.0, 0, 1024, (682, 1024), (0, 0)),
    (512, 512, 2.0, 1024, 768, (1024, 1024), (0, 32)),  # both given, other aspect: upscale to cover, crop
    (512, 768, 2.0, 1024, 1024, (1024, 1536), (0, 64)),
    (768, 512, 2.0, 1024, 1024, (1536, 1024), (64, 0)),
])
def test_hires_geometry_is_a1111s(w, h, scale, rx, ry, size, cut):
    req = Txt2ImgRequest(width=w, height=h, enable_hr=True, hr_scale=scale, hr_resize_x=rx, hr_resize_y=ry)
    assert req.hires_size() == (size, cut)


def test_bad_hires_requests_name_the_field():
    for changes, word in [({"hr_scale": 20.0}, "hr_scale"), ({"denoising_strength": 1.5}, "denoising_strength"),
                          ({"hr_resize_x": -8}, "hr_resize_x"), ({"hr_second_pass_steps": 5000}, "hr_second_pass_steps"),
                          ({"hr_sampler_name": "Nope"}, "hires"), ({"hr_upscaler": "../x"}, "hr_upscaler"),
                          ({"width": 4096, "height": 4096, "hr_scale": 2.0}, "Hires. fix to 8192x8192")]:
        with pytest.raises(RequestError, match=word):
            Txt2ImgRequest(**{**BASE, **changes}).validate()


@pytest.fixture(scope="module")
def engine(make_data_root):
    root = make_data_root("hires")
    write_upscaler(root / "models" / "ESRGAN" / "4x-tiny.safetensors", "esrgan", 4)
    write_upscaler(root / "models" / "RealESRGAN" / "2x-compact.safetensors", "compact", 2)
    return Engine(Paths(root))


def run(engine, **kw):
    steps = []
    result = engine.generate(Txt2ImgRequest(**{**BASE, **kw}), on_progress=lambda p: steps.append((p.step, p.steps)))
    return result, steps


def px(result, i=0):
    return np.asarray(result.images[0 if i is None else i].image)


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)", "None",
                                      "Lanczos", "Nearest", "4x-tiny", "2x-compact"])
def test_every_upscaler_runs_and_the_infotext_recreates_the_image(engine, upscaler):
    result, steps = run(engine, hr_upscaler=upscaler, hr_scale=1.5)
    assert result.images[0].image.size == (96, 96)
    assert steps[-1] == (4 + 3, 7)  # 4 first-pass steps + int(4 × 0.5) + 1 hires steps, one count
    fields = infotext.parse(result.images[0].infotext)
    assert fields["Size"] == "64x64" and fields["Hires upscale"] == "1.5" and fields["Hires upscaler"] == upscaler
    assert fields["Denoising strength"] == "0.5" and "Hires steps" not in fields
    again = engine.generate(from_infotext(result.images[0].infotext))
    assert np.array_equal(px(again), px(result))


def test_the_second_pass_changes_the_upscaled_image(engine):
    light, _ = run(engine, hr_upscaler="Lanczos", denoising_strength=0.2)
    strong, _ = run(engine, hr_upscaler="Lanczos", denoising_strength=0.9)
    first = engine.generate(Txt2ImgRequest(**{**BASE, "enable_hr": False}))
    plain = np.asarray(first.images[0].image.resize((128, 128)), dtype=float)  # Lanczos, no second pass
    d_light = np.abs(px(light).astype(float) - plain).mean()
    d_strong = np.abs(px(strong).astype(float) - plain).mean()
    assert 0 < d_light < d_strong


def test_second_pass_settings_and_crop(engine):
    kw = {"hr_resize_x": 128, "hr_resize_y": 80, "hr_second_pass_steps": 6, "hr_sampler_name": "DPM++ 2M",
              "hr_prompt": "a blue [square:circle:0.5]", "hr_negative_prompt": "red", "hr_cfg": 4.0}
    result, steps = run(engine, **kw)
    assert result.images[0].image.size == (128, 80)
    assert steps[-1] == (4 + 4, 8)  # int(6 × 0.5) + 1 = 4 hires steps
    fields = infotext.parse(result.images[0].infotext)
    assert fields["Hires resize"] == "128x80" and "Hires upscale" not in fields
    assert fields["Hires steps"] == "6" and fields["Hires sampler"] == "DPM++ 2M"
    assert fields["Hires schedule type"] == "Karras"  # "Automatic" for DPM++ 2M, written down resolved
    assert fields["Hires prompt"] == "a blue [square:circle:0.5]" and fields["Hires CFG Scale"] == "4"
    again = engine.generate(from_infotext(result.images[0].infotext))
    assert np.array_equal(px(again), px(result))
    for change in ({"hr_prompt": ""}, {"hr_cfg": None}, {"hr_sampler_name": ""}):
        other, _ = run(engine, **{**kw, **change})
        assert not np.array_equal(px(other), px(result)), change


def test_batches_and_seeds(engine):
    result, _ = run(engine, batch_size=2, n_iter=2, hr_upscaler="Latent")
    assert [g.seed for g in result.images] == [3, 4, 5, 6]
    alone = engine.generate(from_infotext(result.images[3].infotext))
    diff = np.abs(px(alone).astype(int) - px(result, 3).astype(int))
    # exact on the CPU (batch-invariant); on CUDA batched fp16 GEMMs round differently (see test_txt2img)
    assert diff.max() == 0 if engine.plan.device.type == "cpu" else diff.mean() < 1


def test_unknown_upscaler_fails_before_sampling(engine):
    steps = []
    with pytest.raises(ModelNotFoundError, match="4x-UltraSharp"):
        engine.generate(Txt2ImgRequest(**{**BASE, "hr_upscaler": "4x-UltraSharp"}),
                       on_progress=lambda p: steps.append(p))
    assert steps == []


def test_a1111_infotext_with_hires_is_read():
    text = ("a cat\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
            "Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.45, "
            "Hires upscale: 2, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+, Version: v1.10.1")
    req = from_infotext(text)
    assert req.enable_hr and req.hr_scale == 2.0 and req.hr_second_pass_steps == 10
    assert req.hr_upscaler == "R-ESRGAN 4x+" and req.denoising_strength == 0.45
    plain = from_infotext("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512")
    assert not plain.enable_hr
