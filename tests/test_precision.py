"""The CPU's bfloat16 path: when it is chosen, what runs in which dtype, and that pictures stay right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.core.params import Img2ImgRequest, Txt2ImgRequest
from sdstudio.core.paths import DeviceOptions, Paths, default_precision
from sdstudio.engine.devices import cpu_bf16_feature, plan_devices
from sdstudio.engine.generate import Engine

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
X86_AMX = "flags\t\t: fpu avx512f amx_tile amx_int8 amx_bf16\n"
X86_PLAIN = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
NATIVE = cpu_bf16_feature() is not None
needs_bf16 = pytest.mark.skipif(not NATIVE, reason="this CPU has no native bfloat16 (avx512_bf16 / amx_bf16)")
CPU = {"use_cpu": True}  # on a GPU machine these tests are about its CPU


def test_the_cpu_feature_giving_native_bfloat16_is_read_from_cpuinfo():
    assert cpu_bf16_feature(X86_BF16) == "avx512_bf16"
    assert cpu_bf16_feature(X86_AMX) == "amx_bf16"
    assert cpu_bf16_feature(X86_PLAIN) is None  # avx512 alone only emulates bfloat16: slower than float32
    assert cpu_bf16_feature("") is None
    assert cpu_bf16_feature("flags\t: fpu my_avx512_bf16_x\n") is None  # whole flags only


@pytest.mark.parametrize("cpuinfo", [X86_BF16, X86_AMX])
def test_bfloat16_is_the_default_on_such_cpus_and_float32_on_request(cpuinfo):
    plan = plan_devices(DeviceOptions(precision="autocast", **CPU), cpuinfo)
    assert (plan.dtype, plan.vae_dtype, plan.aux_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert plan.describe().startswith("cpu, bfloat16 (the CPU has ") and cpu_bf16_feature(cpuinfo) in plan.describe()
    assert plan_devices(DeviceOptions(precision="half", **CPU), cpuinfo).dtype == torch.bfloat16
    for flags in ({"precision": "full"}, {"precision": "autocast", "no_half": True}):
        plan = plan_devices(DeviceOptions(**flags, **CPU), cpuinfo)
        assert (plan.dtype, plan.vae_dtype) == (torch.float32, torch.float32)
        assert ("--precision full" if flags["precision"] == "full" else "--no-half") in plan.describe()


def test_cpus_without_native_bfloat16_keep_float32():
    plan = plan_devices(DeviceOptions(precision="autocast", **CPU), X86_PLAIN)
    assert plan.dtype == torch.float32 and "no native bfloat16" in plan.describe()


def test_the_environment_gives_the_default_precision(monkeypatch):
    monkeypatch.setenv("SDSTUDIO_PRECISION", "full")
    assert DeviceOptions().precision == "full" and default_precision() == "full"
    monkeypatch.setenv("SDSTUDIO_PRECISION", "nonsense")
    assert DeviceOptions().precision == "autocast"
    monkeypatch.delenv("SDSTUDIO_PRECISION")
    assert DeviceOptions().precision == "autocast"


def test_the_launch_flag_defaults_to_the_environment(monkeypatch):
    import argparse

    from sdstudio.flags import add_common_flags, device_options_from

    monkeypatch.setenv("SDSTUDIO_PRECISION", "full")
    parser = argparse.ArgumentParser()
    add_common_flags(parser)
    assert device_options_from(parser.parse_args([])).precision == "full"
    assert device_options_from(parser.parse_args(["--precision", "autocast"])).precision == "autocast"


BASE = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 6, "width": 64, "height": 64, "seed": 11,
        "cfg_scale": 6, "sampler_name": "DPM++ 2M"}


@pytest.fixture(scope="module")
def engines(make_data_root):
    root = make_data_root("precision", {"tiny-sd1": "sd1", "tiny-sdxl": "sdxl"})
    return (Engine(Paths(root), DeviceOptions(precision="full", **CPU)),
            Engine(Paths(root), DeviceOptions(precision="autocast", **CPU)))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(np.int16)


@needs_bf16
@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_bfloat16_runs_the_unet_and_text_encoders_and_keeps_the_vae_in_float32(engines, model):
    full, half = engines
    _, loaded = half.load(model)
    assert loaded.unet.dtype == torch.bfloat16
    assert all(te.dtype == torch.bfloat16 for te in loaded.text_encoders)
    assert loaded.vae.dtype == torch.float32
    a, b = full.generate(Txt2ImgRequest(**BASE, model=model)), half.generate(Txt2ImgRequest(**BASE, model=model))
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() > 0, "bfloat16 gave bit-identical pixels: it did not run in bfloat16"
    assert diff.mean() < 4, f"bfloat16 strays from float32 by {diff.mean():.2f} of 255 on average"
    # the same parameters re-create the picture: the precision is not part of the infotext
    assert a.images[0].infotext == b.images[0].infotext


@needs_bf16
def test_bfloat16_pictures_repeat_exactly_and_img2img_and_hires_work(engines, tmp_path):
    _, half = engines
    first, again = half.generate(Txt2ImgRequest(**BASE)), half.generate(Txt2ImgRequest(**BASE))
    assert np.array_equal(pixels(first), pixels(again))
    init = tmp_path / "init.png"
    first.images[0].image.save(init)
    out = half.generate(Img2ImgRequest(**BASE, init_images=[str(init)], denoising_strength=0.5))
    assert out.images[0].image.size == (64, 64)
    hires = half.generate(Txt2ImgRequest(**BASE, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                                         denoising_strength=0.5, hr_second_pass_steps=2))
    assert hires.images[0].image.size == (128, 128)
    assert np.asarray(hires.images[0].image).std() > 0
