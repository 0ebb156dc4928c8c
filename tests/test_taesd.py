"""TAESD / Approx NN live previews: madebyollin's file layout, the shipped demo decoder, fallbacks, the setting.

The reference network is madebyollin's TAESD decoder as his files describe it (``sdstudio.testing.taesd_files``,
random weights): the loader must give the same pixels from such a file.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.core.settings import SettingError, Settings
from sdstudio.engine import preview
from sdstudio.engine.generate import Engine
from sdstudio.models.errors import ModelFileError
from sdstudio.models.taesd import VAEApprox, load_approx_nn, load_decoder, vae_fingerprint
from sdstudio.testing.taesd_files import reference_decoder
from sdstudio.testing.taesd_files import write_state as write

REPO = Path(__file__).parents[1]
DEMO = REPO / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"
DEMO_TAESD = REPO / "models" / "VAE-approx" / "sdstudio-demo-taesd.safetensors"
PREVIEW_LOG = "sdstudio.engine.preview"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A data dir with the demo model and its shipped preview decoder (hard-linked)."""
    root = tmp_path_factory.mktemp("demo-taesd")
    for src, rel in ((DEMO, "models/Stable-diffusion"), (DEMO_TAESD, "models/VAE-approx")):
        (root / rel).mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, root / rel / src.name)
        except OSError:
            shutil.copy(src, root / rel / src.name)
    return root


@pytest.fixture(scope="module")
def demo_engine(demo_root) -> Engine:
    return Engine(Paths(demo_root))


def demo_request(**kw) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a red circle on a blue background", "steps": 8, "width": 128, "height": 128,
                             "seed": 11, "sampler_name": "Euler a", "cfg_scale": 7.0, "model": "sdstudio-demo", **kw})


def as_array(image: Image.Image, size: int | None = None) -> np.ndarray:
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255 ** 2 / max(float(np.mean((a - b) ** 2)), 1e-10))


# ---- the file layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_madebyollin_layout_loads_and_decodes_like_the_reference(tmp_path, suffix):
    ref = reference_decoder()
    path = write(tmp_path / f"taesd_decoder{suffix}", ref.state_dict())
    assert sorted(ref.state_dict())[:3] == ["1.bias", "1.weight", "10.conv.0.bias"]  # madebyollin's key names
    decoder = load_decoder(path)
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        out = decoder(z)
        expected = ref(z) * 2 - 1  # diffusers' DecoderTiny gives [-1, 1]
    assert out.shape == (1, 3, 64, 96)
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


def test_flux_layout_with_16_channels_and_a_diffusers_file(tmp_path):
    ref = reference_decoder(latent_channels=16, width=16, seed=3)
    decoder = load_decoder(write(tmp_path / "taef1_decoder.safetensors", ref.state_dict()))
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.allclose(decoder(z), ref(z) * 2 - 1, atol=1e-5)
    # diffusers' AutoencoderTiny keys (decoder.layers.N, no clamp in the numbering) read as they are
    diffusers_keys = {f"decoder.layers.{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v
                      for k, v in ref.state_dict().items()}
    again = load_decoder(write(tmp_path / "diffusers.safetensors", diffusers_keys))
    with torch.no_grad():
        assert torch.allclose(again(z), ref(z) * 2 - 1, atol=1e-5)


def test_broken_files_say_which_file_and_why(tmp_path):
    good = reference_decoder(width=8, blocks=(1, 1, 1, 1)).state_dict()
    truncated = write(tmp_path / "taesd_decoder.safetensors", good)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    garbage = tmp_path / "taesdxl_decoder.pth"
    garbage.write_bytes(b"\x80\x04 not a pickle at all" * 10)
    encoder = write(tmp_path / "taesd_encoder.pth", {"0.weight": torch.zeros(64, 3, 3, 3), "0.bias": torch.zeros(64)})
    nan = write(tmp_path / "nan.safetensors", {k: v * float("nan") for k, v in good.items()})
    missing = write(tmp_path / "short.safetensors", {k: v for k, v in good.items() if k != "1.bias"})
    cases = {truncated: "truncated", garbage: "refused", encoder: "encoder", nan: "NaN", missing: "1.bias"}
    for path, words in cases.items():
        with pytest.raises(ModelFileError) as err:
            load_decoder(path)
        message = str(err.value)
        assert message.startswith(path.name) and words in message and "\n" not in message, message


# ---- the engine's choice of file ------------------------------------------------------------------------------
def test_demo_decoder_is_matched_to_the_demo_vae_only(tmp_path, demo_engine, tiny_sd1):
    from sdstudio.models.loader import load_checkpoint

    previews = demo_engine.previews
    _, demo = demo_engine.load("sdstudio-demo")
    assert previews.find("TAESD", "sd1", demo.vae) == demo_engine.paths.vae_approx_dir / DEMO_TAESD.name
    tiny = load_checkpoint(tiny_sd1)  # a real SD 1.x layout with another VAE: not the demo decoder's latents
    assert previews.find("TAESD", "sd1", tiny.vae) is None
    # madebyollin's SD 1.x decoder serves any SD 1.x VAE, but the demo VAE still gets its own
    folder = tmp_path / "VAE-approx"
    folder.mkdir()
    shutil.copy(DEMO_TAESD, folder / DEMO_TAESD.name)
    write(folder / "taesd_decoder.pth", reference_decoder(width=8, blocks=(1, 1, 1, 1)).state_dict())
    both = preview.PreviewDecoders(folder)
    assert both.find("TAESD", "sd1", tiny.vae).name == "taesd_decoder.pth"
    assert both.find("TAESD", "sd1", demo.vae).name == DEMO_TAESD.name
    assert both.find("TAESD", "sdxl", tiny.vae) is None
    # the fingerprint survives half precision (a GPU's VAE)
    half = [float(torch.tensor(v).half()) for v in vae_fingerprint(demo.vae)]
    assert preview.taesd.same_fingerprint(half, vae_fingerprint(demo.vae))
    assert not preview.taesd.same_fingerprint(vae_fingerprint(tiny.vae), vae_fingerprint(demo.vae))


def test_taesd_preview_of_a_demo_generation_is_close_to_the_full_decode(demo_engine):
    seen = []

    def keep(p):
        if p.step in (4, 8):
            seen.append((p.step, p.decode(p.latent), p.approx("TAESD", p.latent), preview.cheap_preview(p.latent)))

    demo_engine.txt2img(demo_request(), on_progress=keep)
    assert [s for s, *_ in seen] == [4, 8]
    for step, full, taesd, cheap in seen:
        assert taesd.size == full.size == (128, 128) and cheap.size == (16, 16)
        ref = as_array(full)
        ours, base = psnr(as_array(taesd), ref), psnr(as_array(cheap, 128), ref)
        mad = float(np.abs(as_array(taesd) - ref).mean())
        print(f"step {step}: TAESD {ours:.1f} dB (mean abs diff {mad:.1f}/255), Approx cheap {base:.1f} dB")
        # the shipped decoder: 26.4 / 24.8 dB (mean abs diff 6.8 / 8.6 of 255); Approx cheap 6.8 dB (the SD 1.x
        # colour map does not fit the demo VAE's latents)
        assert ours >= 22.0 and mad <= 11.0, (ours, mad)
        assert ours >= base + 12.0, (ours, base)


def test_missing_file_falls_back_to_approx_cheap_with_one_warning(data_dir, caplog):
    engine = Engine(Paths(data_dir))  # the tiny SD 1.x model, no models/VAE-approx
    shown = []
    with caplog.at_level(logging.WARNING, logger=PREVIEW_LOG):
        for _ in range(2):
            engine.txt2img(Txt2ImgRequest(prompt="x", steps=3, width=64, height=64, seed=1),
                           on_progress=lambda p: shown.append(preview.live_preview("TAESD", p)))
    assert [im.size for im in shown] == [(8, 8)] * 6  # the latent's size: Approx cheap
    warnings = [r.getMessage() for r in caplog.records if r.name == PREVIEW_LOG]
    assert len(warnings) == 1 and "TAESD" in warnings[0] and "taesd_decoder" in warnings[0], warnings
    assert "Approx cheap" in warnings[0] and str(engine.paths.vae_approx_dir) in warnings[0]


def test_broken_file_in_the_folder_falls_back_with_its_message(data_dir, caplog):
    folder = data_dir / "models" / "VAE-approx"
    folder.mkdir(parents=True)
    (folder / "taesd_decoder.pth").write_bytes(b"PK\x03\x04 truncated zip")
    engine = Engine(Paths(data_dir))
    shown = []
    with caplog.at_level(logging.WARNING, logger=PREVIEW_LOG):
        engine.txt2img(Txt2ImgRequest(prompt="x", steps=2, width=64, height=64, seed=1),
                       on_progress=lambda p: shown.append(preview.live_preview("TAESD", p)))
    assert [im.size for im in shown] == [(8, 8)] * 2
    warnings = [r.getMessage() for r in caplog.records if r.name == PREVIEW_LOG]
    assert len(warnings) == 1 and "taesd_decoder.pth:" in warnings[0], warnings


def test_approx_nn_reads_a1111_files(tmp_path, data_dir):
    torch.manual_seed(0)
    net = VAEApprox()
    folder = data_dir / "models" / "VAE-approx"
    write(folder / "model.pt", net.state_dict())  # A1111's name for the SD 1.x Approx NN
    assert isinstance(load_approx_nn(folder / "model.pt"), VAEApprox)
    engine = Engine(Paths(data_dir))
    shown = []
    engine.txt2img(Txt2ImgRequest(prompt="x", steps=1, width=64, height=64, seed=1),
                   on_progress=lambda p: shown.append((preview.live_preview("Approx NN", p), p.latent)))
    image, latent = shown[0]
    assert image.size == (16, 16)  # twice the latent's size
    with torch.no_grad():
        expected = net(latent[:1].float())[0]
    expected = ((expected + 1) / 2).clamp(0, 1).mul(255).round().permute(1, 2, 0).numpy()
    assert np.abs(as_array(image) - expected).max() <= 1
    with pytest.raises(ModelFileError, match="not an Approx NN file"):
        load_approx_nn(write(tmp_path / "x.pt", {"conv1.weight": torch.zeros(8, 4, 7, 7)}))


# ---- the setting -------------------------------------------------------------------------------------------
def test_the_setting_reaches_the_jobs_preview(demo_root, tmp_path):
    from step_hold import StepHold

    from sdstudio.service.jobs import JobService, Txt2ImgJob
    from sdstudio.service.queue import SQLiteJobQueue

    settings = Settings(tmp_path / "config.json")
    assert settings["show_progress_type"] == "Approx cheap"  # A1111's default
    with pytest.raises(SettingError):
        settings.update({"show_progress_type": "Approx expensive"})
    sizes, taesd_loaded = {}, {}
    engine = Engine(Paths(demo_root))
    svc = JobService(engine, SQLiteJobQueue(tmp_path / "jobs.sqlite3"), jobs_dir=tmp_path / "jobs",
                     preview_settings=lambda: (settings.get("show_progress_type"), 1))
    try:
        for n, method in enumerate(("Approx cheap", "Full", "TAESD")):
            settings.update({"show_progress_type": method})
            job = svc.submit("a", Txt2ImgJob(demo_request(steps=3)))
            with StepHold(svc, batch=0, step=2) as hold:  # step 1's preview is there
                if n == 0:
                    svc.start()
                assert hold.wait().id == job.id
                sizes[method] = svc.preview_image("a").size
                taesd_loaded[method] = len(engine.previews._modules)
            svc.wait(job.id, 300)
    finally:
        svc.stop()
        svc.queue.close()
    assert sizes == {"Approx cheap": (16, 16), "Full": (128, 128), "TAESD": (128, 128)}
    assert taesd_loaded == {"Approx cheap": 0, "Full": 0, "TAESD": 1}
