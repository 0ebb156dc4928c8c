"""SD 3.x and Flux.1 through the whole engine, on reduced random-weight files in the published layouts: an
SD3 single file with its encoders bundled, a Flux.1 dev transformer with its text encoders and VAE in the
folders Forge and ComfyUI use. Seeds, infotext round trips, img2img, Hires. fix, and clear refusals."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.core import infotext
from sdstudio.core.errors import RequestError
from sdstudio.core.params import Img2ImgRequest, Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine import vae as vae_ops
from sdstudio.engine.generate import Engine
from sdstudio.models.errors import ModelFileError
from sdstudio.testing import dit_files as DF
from sdstudio.testing import lora_files as LF

SD3_PREFIX = "model.diffusion_model."
BASE = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64, "seed": 5,
        "sampler_name": "Euler"}


def tiny_sd3_state():
    width = DF.CLIP_SIZES["clip_l"]["tiny"][0] + DF.CLIP_SIZES["clip_g"]["tiny"][0]
    shapes = DF.sd3_shapes(2, pos_embed_max=16, context_dim=DF.T5_SIZES["tiny"]["d_model"], pooled_dim=width,
                           prefix="")
    return DF.random_state(shapes, seed=2)


def tiny_flux_state():
    shapes = DF.flux_shapes(1, 1, hidden=256, context_dim=DF.T5_SIZES["tiny"]["d_model"],
                            pooled_dim=DF.CLIP_SIZES["clip_l"]["tiny"][0], guidance=True)
    return DF.random_state(shapes, seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    models = root / "models"
    sd3 = DF.with_prefix(tiny_sd3_state(), SD3_PREFIX) | DF.dit_vae_state(prefix="first_stage_model.", levels=4)
    for kind in ("clip_l", "clip_g", "t5xxl"):
        sd3 |= DF.with_prefix(DF.encoder_state(kind), f"text_encoders.{kind}.transformer.")
    DF.save(sd3, models / "Stable-diffusion" / "sd3-tiny.safetensors")
    DF.save(tiny_flux_state(), models / "Stable-diffusion" / "flux-tiny.safetensors")
    DF.save(DF.encoder_state("clip_l", projection=False), models / "text_encoder" / "clip_l.safetensors")
    DF.save({k: v.half() for k, v in DF.encoder_state("t5xxl").items()}, models / "clip" / "t5xxl_fp16.safetensors")
    DF.save(DF.dit_vae_state(seed=4, levels=4), models / "VAE" / "ae.safetensors")
    flux_shapes = {k: tuple(v.shape) for k, v in tiny_flux_state().items()}
    DF.save(LF.kohya(LF.factors(flux_shapes, seed=9)), models / "Lora" / "fluxstyle.safetensors")
    return root


@pytest.fixture(scope="module")
def engine(root):
    return Engine(Paths(root))


def gen(engine, **kw):
    return engine.generate(Txt2ImgRequest(**{**BASE, **kw}))


def px(result, i=0):
    return np.asarray(result.images[i].image)


@pytest.mark.parametrize("model", ["sd3-tiny", "flux-tiny"])
def test_generates_and_recreates_from_infotext(engine, model):
    r = gen(engine, model=model, n_iter=2)
    assert r.images[0].image.size == (64, 64) and px(r).std() > 0
    assert not np.array_equal(px(r, 0), px(r, 1))  # seeds 5 and 6
    for i, image in enumerate(r.images):
        assert np.array_equal(px(engine.generate(from_infotext(image.infotext))), px(r, i))
    assert engine.load(model)[1].spec.describe() == ("Flux.1 dev" if model == "flux-tiny" else "SD 3")


def test_flux_distilled_guidance_is_a_parameter_with_forges_infotext(engine):
    r = gen(engine, model="flux-tiny", cfg_scale=1.0, distilled_cfg_scale=2.5)
    p = infotext.parse(r.images[0].infotext)
    assert p["Distilled CFG Scale"] == "2.5"
    assert from_infotext(r.images[0].infotext).distilled_cfg_scale == 2.5
    assert not np.array_equal(px(r), px(gen(engine, model="flux-tiny", cfg_scale=1.0, distilled_cfg_scale=5.0)))
    assert "Distilled CFG Scale" not in infotext.parse(gen(engine, model="sd3-tiny").images[0].infotext)


def test_flux_found_its_encoders_and_vae_in_the_folders(engine, root):
    model = engine.load("flux-tiny")[1]
    assert model.vae_source == str(root / "models" / "VAE" / "ae.safetensors")
    assert model.vae.config.shift_factor == pytest.approx(0.1159)
    assert set(model.extras["encoders"]) == {"clip_l", "t5xxl"}
    sd3 = engine.load("sd3-tiny")[1]
    assert sd3.vae.config.scaling_factor == pytest.approx(1.5305) and sd3.vae_source == "checkpoint"


@pytest.mark.parametrize("model", ["sd3-tiny", "flux-tiny"])
def test_img2img_and_hires_fix(engine, model):
    init = Image.new("RGB", (64, 64), (40, 60, 200))  # not the model's own picture: its flow is near straight
    init.paste((230, 200, 30), (16, 16, 48, 48))
    low = engine.generate(Img2ImgRequest(**BASE, model=model, init_images=[init], denoising_strength=0.2))
    high = engine.generate(Img2ImgRequest(**BASE, model=model, init_images=[init], denoising_strength=0.9))
    vae = engine.load(model)[1].vae  # a random VAE does not give its input back: compare with its round trip
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    round_trip = vae_ops.to_pil(vae_ops.decode(vae, vae_ops.encode(vae, pixels, engine.plan.device),
                                               engine.plan.device))[0]
    a, b, c = (np.asarray(x, dtype=float) for x in (round_trip, low.images[0].image, high.images[0].image))
    assert np.abs(b - a).mean() < np.abs(c - a).mean()  # less denoising stays nearer the init image
    hires = gen(engine, model=model, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5)
    assert hires.images[0].image.size == (96, 96)


def test_other_samplers_and_schedules_run(engine):
    for sampler, scheduler in (("DPM++ 2M", "Karras"), ("Euler a", "Simple"), ("Heun", "Beta")):
        r = gen(engine, model="sd3-tiny", sampler_name=sampler, scheduler=scheduler)
        assert np.isfinite(px(r)).all() and px(r).std() > 0


def test_refusals_name_the_problem(engine):
    with pytest.raises(RequestError, match="multiples of 16"):
        gen(engine, model="flux-tiny", width=72)
    with pytest.raises(RequestError, match="timestep samplers"):
        gen(engine, model="sd3-tiny", sampler_name="DDIM")
    with pytest.raises(RequestError, match="align_your_steps|Align"):
        gen(engine, model="sd3-tiny", scheduler="Align Your Steps")
    r = gen(engine, model="sd3-tiny", prompt="a red circle <lora:someone:0.8> <hypernet:h:1>")
    assert any("LoRA left out" in w for w in r.warnings) and any("hypernetworks" in w for w in r.warnings)


def test_a_kohya_flux_lora_applies_through_the_engine(engine):
    plain = gen(engine, model="flux-tiny")
    styled = gen(engine, model="flux-tiny", prompt="a red circle <lora:fluxstyle:0.8>")
    assert styled.warnings == [] and not np.array_equal(px(styled), px(plain))
    assert "fluxstyle: " in infotext.parse(styled.images[0].infotext)["Lora hashes"]
    assert np.array_equal(px(gen(engine, model="flux-tiny", prompt="a red circle <lora:fluxstyle:0>")), px(plain))
    assert np.array_equal(px(engine.generate(from_infotext(styled.images[0].infotext))), px(styled))
    assert np.array_equal(px(gen(engine, model="flux-tiny")), px(plain))  # the weights are restored after the job


def test_flux_without_t5_says_where_to_put_it(root, tmp_path):
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    (tmp_path / "models" / "Stable-diffusion" / "flux.safetensors").hardlink_to(
        root / "models" / "Stable-diffusion" / "flux-tiny.safetensors")
    (tmp_path / "models" / "VAE").mkdir(parents=True)
    (tmp_path / "models" / "VAE" / "ae.safetensors").hardlink_to(root / "models" / "VAE" / "ae.safetensors")
    (tmp_path / "models" / "clip").mkdir(parents=True)  # ComfyUI's folder: read too
    (tmp_path / "models" / "clip" / "clip_l.safetensors").hardlink_to(root / "models" / "text_encoder" / "clip_l.safetensors")
    with pytest.raises(ModelFileError, match="T5-XXL.*text_encoder"):
        Engine(Paths(tmp_path)).generate(Txt2ImgRequest(**BASE, model="flux"))


def test_controlnet_on_flux_is_refused_before_any_work(engine):
    from sdstudio.scripts.studio import Studio

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    req = Txt2ImgRequest(**BASE, model="flux-tiny", alwayson_scripts={"ControlNet": {"units": [
        {"enabled": True, "module": "reference_only", "model": "None",
         "image": base64.b64encode(buffer.getvalue()).decode()}]}})
    with pytest.raises(RequestError, match="ControlNet unit 0: not available for Flux.1 dev"):
        Studio(engine).generate(req.validate())


def test_api_and_cli_take_forges_distilled_cfg_scale(root, capsys):
    from fastapi.testclient import TestClient

    from sdstudio.cli import build_parser, main
    from sdstudio.core.outputs import read_infotext
    from sdstudio.server import create_app

    args = build_parser().parse_args(["serve", "--data-dir", str(root), "--api", "--nowebui"])
    body = {**BASE, "distilled_cfg_scale": 2.0, "override_settings": {"sd_model_checkpoint": "flux-tiny"}}
    r = TestClient(create_app(args)).post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "Distilled CFG Scale: 2.0" in json.loads(r.json()["info"])["infotexts"][0]
    code = main(["txt2img", "a red circle", "--model", "flux-tiny", "--distilled-cfg", "4.5", "--steps", "2",
                 "--size", "64x64", "--data-dir", str(root)])
    out = capsys.readouterr().out
    png = next(line.strip() for line in out.splitlines() if line.strip().endswith(".png"))
    assert code == 0 and "Distilled CFG Scale: 4.5" in read_infotext(png)
