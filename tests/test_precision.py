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
    assert (plan.dtype, plan.vae_dtype, plan.aux_dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert plan.vae_dtype_for(320) == torch.bfloat16 and plan.vae_dtype_for(32) == torch.float32  # narrow: float32
    kept = plan_devices(DeviceOptions(precision="autocast", no_half_vae=True, **CPU), cpuinfo)
    assert (kept.dtype, kept.vae_dtype, kept.vae_dtype_for(320)) == (torch.bfloat16, torch.float32, torch.float32)
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


def test_narrow_unets_stay_float32_under_autocast_and_half_forces_bfloat16():
    auto = plan_devices(DeviceOptions(precision="autocast", **CPU), X86_BF16)
    half = plan_devices(DeviceOptions(precision="half", **CPU), X86_BF16)
    assert auto.dtype_for(320) == auto.dtype_for(None) == torch.bfloat16  # SD 1.x/2.x/XL; DiT files
    assert auto.dtype_for(32) == torch.float32  # the demo model: too narrow for bfloat16 to pay
    assert half.dtype_for(32) == torch.bfloat16
    assert plan_devices(DeviceOptions(precision="full", **CPU), X86_BF16).dtype_for(320) == torch.float32


@pytest.fixture(scope="module")
def engines(make_data_root):
    """float32, and bfloat16 forced (``--precision half``: the tiny models are too narrow for autocast's)."""
    root = make_data_root("precision", {"tiny-sd1": "sd1", "tiny-sdxl": "sdxl"})
    return (Engine(Paths(root), DeviceOptions(precision="full", **CPU)),
            Engine(Paths(root), DeviceOptions(precision="half", **CPU)))


@needs_bf16
def test_autocast_loads_a_narrow_checkpoint_in_float32(make_data_root):
    engine = Engine(Paths(make_data_root("precision-auto")), DeviceOptions(precision="autocast", **CPU))
    assert engine.plan.dtype == torch.bfloat16
    _, model = engine.load(None)
    assert model.unet.dtype == model.dtype == torch.float32
    assert engine.generate(Txt2ImgRequest(**BASE)).images[0].image.size == (64, 64)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(np.int16)


@needs_bf16
@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_bfloat16_runs_the_unet_text_encoders_and_vae(engines, model):
    full, half = engines
    _, loaded = half.load(model)
    assert loaded.unet.dtype == torch.bfloat16
    assert all(te.dtype == torch.bfloat16 for te in loaded.text_encoders)
    assert loaded.vae.dtype == torch.bfloat16
    a, b = full.generate(Txt2ImgRequest(**BASE, model=model)), half.generate(Txt2ImgRequest(**BASE, model=model))
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() > 0, "bfloat16 gave bit-identical pixels: it did not run in bfloat16"
    assert diff.mean() < 4, f"bfloat16 strays from float32 by {diff.mean():.2f} of 255 on average"
    # the same parameters re-create the picture: the precision is not part of the infotext
    assert a.images[0].infotext == b.images[0].infotext


@needs_bf16
def test_the_vae_decodes_in_bfloat16_close_to_float32_and_no_half_vae_keeps_float32(engines, make_data_root):
    """The decode alone: the same latents through the float32 and the bfloat16 VAE (PSNR over 40 dB), and
    --no-half-vae loading the VAE in float32 beside a bfloat16 UNet."""
    from sdstudio.engine.vae import decode

    full, half = engines
    vae32, vae16 = full.load("tiny-sd1")[1].vae, half.load("tiny-sd1")[1].vae
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    a, b = (decode(v, latents, torch.device("cpu")) * 255 for v in (vae32, vae16))
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    psnr = 10 * torch.log10(255 ** 2 / ((a - b) ** 2).mean())
    assert psnr > 40, f"the bfloat16 decode is {psnr:.1f} dB from float32"
    kept = Engine(Paths(make_data_root("precision-vae")), DeviceOptions(precision="half", no_half_vae=True, **CPU))
    _, loaded = kept.load(None)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float32


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


@needs_bf16
def test_the_bfloat16_unet_runs_in_channels_last_memory(engines):
    _, half = engines
    assert half.plan.channels_last and not engines[0].plan.channels_last
    half.generate(Txt2ImgRequest(**BASE))
    _, loaded = half.load("tiny-sd1")
    convs = [m.weight for m in loaded.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert loaded.vae.decoder.conv_in.weight.is_contiguous()  # the VAE keeps the default layout


@needs_bf16
@pytest.mark.parametrize("precision", ["half", "autocast"])
def test_controlnet_and_ip_adapter_follow_the_unets_dtype(make_data_root, precision):
    # a bfloat16 UNet gets bfloat16 add-ons; autocast's float32 narrow UNet gets float32 ones
    import base64
    import io

    from PIL import Image, ImageDraw

    from sdstudio.scripts import Studio
    from sdstudio.testing.controlnet_files import write_controlnet
    from sdstudio.testing.ip_adapter_files import write_clip_vision, write_ip_adapter

    root = make_data_root(f"precision-cn-{precision}")
    write_controlnet(root / "models" / "ControlNet" / "tiny-canny.safetensors", "sd1", "tiny", seed=3)
    write_ip_adapter(root / "models" / "ControlNet" / "ip-adapter_tiny.safetensors")
    write_clip_vision(root / "models" / "clip_vision" / "clip_h.safetensors")
    picture = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(picture).rectangle((16, 16, 48, 48), outline="white", width=2)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    studio = Studio(Engine(Paths(root), DeviceOptions(precision=precision, **CPU)))
    units = [{"enabled": True, "module": "none", "model": "tiny-canny", "image": image},
             {"enabled": True, "module": "ip-adapter_clip_h", "model": "ip-adapter_tiny", "image": image}]
    out = studio.generate(Txt2ImgRequest(**BASE, alwayson_scripts={"ControlNet": {"units": units}}))
    assert out.images[0].image.size == (64, 64)
    _, model = studio.engine.load(None)
    assert model.dtype == (torch.bfloat16 if precision == "half" else torch.float32)


@pytest.mark.full
def test_compile_gives_the_same_picture(make_data_root):
    # --compile: the UNet runs through torch.compile (minutes of compiling on a CPU: behind --full)
    root = make_data_root("compile")
    plain = Engine(Paths(root), DeviceOptions(precision="full", **CPU))
    compiled = Engine(Paths(root), DeviceOptions(precision="full", compile=True, **CPU))
    req = Txt2ImgRequest(**{**BASE, "steps": 2})
    a, b = pixels(plain.generate(req)), pixels(compiled.generate(req))
    assert compiled.load(None)[1].unet._compiled_call_impl is not None
    assert np.abs(a - b).max() <= 2  # compiled kernels may round differently in the last bit


def test_a_vae_that_gives_nans_is_a_model_error_not_a_crash(tiny_sd1):
    from sdstudio.core.errors import MODEL_UNFIT, kind_of
    from sdstudio.engine import vae as vae_ops
    from sdstudio.models.loader import load_checkpoint

    broken = load_checkpoint(tiny_sd1, torch.float32).vae
    with torch.no_grad():
        broken.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(vae_ops.VAENaNError) as info:
        vae_ops.decode(broken, torch.zeros(1, 4, 8, 8), torch.device("cpu"))
    assert kind_of(info.value) == MODEL_UNFIT


def test_fp8_stores_the_unet_weights_in_float8_and_lora_leaves_them_as_they_were(make_data_root):
    """--fp8: the UNet's Linear / Conv weights kept in float8 e4m3fn (diffusers' layerwise casting), each layer
    computed in the model's dtype; pictures close to float32's, not equal; a LoRA job runs and gives the
    stored weights back bit for bit."""
    from tests.test_lora import make_lora

    root = make_data_root("fp8")
    full = Engine(Paths(root), DeviceOptions(precision="full", **CPU))
    fp8 = Engine(Paths(root), DeviceOptions(precision="full", fp8=True, **CPU))
    assert "--fp8" in fp8.plan.describe() and fp8.plan.fp8 and not full.plan.fp8
    a, b = full.generate(Txt2ImgRequest(**BASE)), fp8.generate(Txt2ImgRequest(**BASE))
    _, model = fp8.load(None)
    convs = [m for m in model.unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert convs and all(m.weight.dtype == torch.float8_e4m3fn for m in convs)
    norms = [m for m in model.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # norms are not stored in float8
    assert all(te.dtype == torch.float32 for te in model.text_encoders)  # only the diffusion model
    diff = np.abs(pixels(a) - pixels(b))
    assert 0 < diff.mean() < 6, diff.mean()
    assert a.images[0].infotext == b.images[0].infotext
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    (root / "models" / "Lora").mkdir(parents=True, exist_ok=True)
    make_lora(fp8, root / "models" / "Lora" / "net.safetensors", te=False)
    fp8.registry.refresh()
    styled = fp8.generate(Txt2ImgRequest(**{**BASE, "prompt": "a red circle <lora:net:1>"}))
    assert not np.array_equal(pixels(styled), pixels(b))
    after = model.unet.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8) if before[k].dtype == torch.float8_e4m3fn else before[k],
                           after[k].view(torch.uint8) if after[k].dtype == torch.float8_e4m3fn else after[k])
               for k in before)
