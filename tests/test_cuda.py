"""What only a CUDA machine can show: fp16 generation, the GPU/NV noise sources against real CUDA draws,
CPU-noise images that match the CPU's, and the memory-saving placements giving the same pixels.

Skipped where there is no CUDA device (the rest of the suite also runs on CUDA when one is present:
every Engine picks CUDA and fp16 by itself).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.core.params import Img2ImgRequest, Txt2ImgRequest
from sdstudio.core.paths import DeviceOptions, Paths
from sdstudio.engine.generate import Engine
from sdstudio.engine.rng import NoiseGenerator, randn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BASE = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 6, "width": 64, "height": 64, "seed": 42,
        "sampler_name": "DPM++ 2M"}


def px(engine, cls=Txt2ImgRequest, **kw) -> np.ndarray:
    return np.asarray(engine.generate(cls(**{**BASE, **kw})).images[0].image).astype(np.int16)


@pytest.fixture(scope="module")
def root(make_data_root):
    return make_data_root("cuda", {"tiny-sd1": "sd1", "tiny-sdxl": "sdxl"})


def engine(root, **flags) -> Engine:
    """An engine with the launcher's default precision (the suite's environment says ``full``)."""
    return Engine(Paths(root), DeviceOptions(**{"precision": "autocast", **flags}))


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1, 2**32 + 5, 3_000_000_000])
@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 64, 64), (4, 128, 96), (7,)])
def test_nv_source_equals_torch_randn_on_cuda(seed, shape):
    # A1111's "NV" source re-implements CUDA's Philox so that CPU users get the GPU's noise.
    got = randn(seed, shape, "NV")
    cuda = torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda").cpu()
    assert torch.allclose(got, cuda, atol=1e-5), (got - cuda).abs().max()


def test_gpu_source_draws_on_cuda_and_nv_follows_its_stream():
    cuda_gen = torch.Generator("cuda").manual_seed(7)
    gpu, nv = NoiseGenerator(7, "GPU", torch.device("cuda")), NoiseGenerator(7, "NV")
    for _ in range(3):  # ancestral samplers keep drawing from the stream: later draws must match too
        expected = torch.randn((4, 32, 32), generator=cuda_gen, device="cuda").cpu()
        assert torch.equal(gpu.randn((4, 32, 32)).cpu(), expected)
        assert torch.allclose(nv.randn((4, 32, 32)), expected, atol=1e-5)


def test_fp16_by_default_and_full_precision_on_request(root):
    assert engine(root).plan.dtype == torch.float16
    assert engine(root, no_half=True).plan.dtype == torch.float32
    assert engine(root, precision="full").plan.vae_dtype == torch.float32
    assert engine(root, no_half_vae=True).plan.vae_dtype == torch.float32


def test_fp16_images_are_reproducible_and_close_to_fp32(root):
    half, full = engine(root), engine(root, no_half=True)
    a, b = px(half), px(half)
    assert np.array_equal(a, b)  # the same request twice: the same pixels
    assert a.std() > 1  # a real image, not a flat one from NaNs
    f = px(full)
    diff = np.abs(a - f).mean()
    print(f"fp16 vs fp32 mean abs pixel difference: {diff:.3f}")
    assert diff < 6


def test_cpu_noise_source_on_cuda_matches_the_cpu(root):
    # The reason A1111 has an RNG source setting: the same seed gives the same picture on any device.
    cpu = px(engine(root, use_cpu=True, no_half=True), rng="CPU")
    cuda = px(engine(root, no_half=True), rng="CPU")
    diff = np.abs(cpu - cuda).mean()
    print(f"CPU vs CUDA (fp32, CPU noise) mean abs pixel difference: {diff:.3f}")
    assert diff < 2


@pytest.mark.parametrize("flag", ["medvram", "lowvram"])
def test_memory_saving_modes_give_the_same_pixels(root, flag):
    plain = px(engine(root, no_half=True))
    saving = px(engine(root, no_half=True, **{flag: True}))
    assert np.abs(plain - saving).max() <= 1


def test_sdxl_in_fp16_and_img2img(root, tmp_path):
    e = engine(root)
    image = px(e, model="tiny-sdxl")
    assert image.std() > 1
    from PIL import Image

    Image.fromarray(image.astype(np.uint8)).save(tmp_path / "init.png")
    out = px(e, Img2ImgRequest, model="tiny-sdxl", init_images=[str(tmp_path / "init.png")], denoising_strength=0.5)
    assert out.std() > 1 and not np.array_equal(out, image)


@pytest.mark.parametrize("flags", [{}, {"medvram": True}, {"lowvram": True}])
def test_lora_under_every_placement_and_no_trace_after(make_data_root, flags):
    from test_lora import make_lora

    tmp_path = make_data_root("cuda-lora")
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    reference = engine(tmp_path, no_half=True)
    make_lora(reference, tmp_path / "models" / "Lora" / "net.safetensors")
    reference.registry.refresh()
    plain, styled = px(reference), px(reference, prompt="a red circle <lora:net:1>")
    e = engine(tmp_path, no_half=True, **flags)
    for _ in range(2):  # the second round finds the weights wherever the first one left them
        assert np.abs(px(e, prompt="a red circle <lora:net:1>") - styled).max() <= 1
        assert np.abs(px(e) - plain).max() <= 1
    assert np.abs(styled - plain).max() > 5


def test_tiled_vae_in_fp16_matches_whole_and_hires_runs(root):
    from sdstudio.engine import tiled_vae
    from sdstudio.models.loader import load_checkpoint

    vae = load_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors").vae.to("cuda", torch.float16)
    z = torch.randn(2, 4, 40, 56, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        whole = vae.decode(z).sample.float().cpu()
        tiled = tiled_vae.decode(vae, z, core=16)
    diff = (tiled - whole).abs().max().item() * 127.5
    print(f"fp16 tiled vs whole decode: max {diff:.4f} of 255")
    assert diff < 3  # fp16 rounding: the whole-image decode differs from an fp32 one by as much
    image = px(engine(root), enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", denoising_strength=0.5,
               tiled_vae=True)
    assert image.shape == (128, 128, 3) and image.std() > 1


def test_fp8_weights_on_cuda_keep_pictures_close_in_less_memory(root):
    """--fp8 on the GPU: the UNet's weights in float8 (half the fp16 weight memory once prepared), the picture
    close to fp16's."""
    plain, fp8 = engine(root), engine(root, fp8=True)
    a, b = px(plain), px(fp8)
    assert 0 < np.abs(a - b).mean() < 8
    _, m16 = plain.load(None)
    _, m8 = fp8.load(None)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.unet.parameters())
    assert size(m8) < 0.7 * size(m16)


def test_a_low_vram_controlnet_unit_stays_on_the_cpu_between_steps(root):
    """The extension's "Low VRAM": the ControlNet goes to the GPU for its own call only, the picture the same."""
    import base64
    import io

    from PIL import Image, ImageDraw

    from sdstudio.core.paths import Paths as _Paths
    from sdstudio.testing.controlnet_files import write_controlnet

    folder = _Paths(root).controlnet_dir
    folder.mkdir(parents=True, exist_ok=True)
    write_controlnet(folder / "tiny-canny.safetensors", "sd1", "tiny", seed=3)
    hint = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(hint).rectangle((16, 16, 48, 48), outline="white", width=2)
    buf = io.BytesIO()
    hint.save(buf, format="PNG")
    e = engine(root, no_half=True)

    def run(low_vram: bool) -> tuple[np.ndarray, str]:
        unit = {"enabled": True, "module": "none", "model": "tiny-canny", "low_vram": low_vram,
                "image": base64.b64encode(buf.getvalue()).decode()}
        from sdstudio.scripts import Studio

        out = Studio(e).generate(Txt2ImgRequest(**BASE, alwayson_scripts={"ControlNet": {"units": [unit]}}))
        module = e.controlnets.model("tiny-canny")[1].module
        return np.asarray(out.images[0].image).astype(np.int16), next(module.parameters()).device.type

    low, where_low = run(True)
    normal, where_normal = run(False)
    assert (where_low, where_normal) == ("cpu", "cuda")
    assert np.abs(low - normal).max() <= 1
