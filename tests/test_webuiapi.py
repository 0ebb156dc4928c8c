"""Drive a real sdstudio server with the ``webuiapi`` client exactly as its README does."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
import uvicorn
import webuiapi
from PIL import Image, ImageDraw

from sdstudio.cli import build_parser
from sdstudio.core import infotext
from sdstudio.server import create_app


@pytest.fixture
def server(data_dir, free_port):
    port = free_port()
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui",
                                      "--api-auth", "user:secret"])
    app = create_app(args)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    yield port, app
    srv.should_exit = True
    thread.join(10)
    app.state.service.stop()


@pytest.fixture
def api(server):
    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    api.set_auth("user", "secret")
    return api


def picture() -> Image.Image:
    im = Image.new("RGB", (64, 64), (20, 40, 200))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    return im


def test_txt2img(api):
    result = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=1003, cfg_scale=7, width=64,
                         height=64, batch_size=2)
    assert len(result.images) == 2 and result.image.size == (64, 64)
    assert result.info["all_seeds"] == [1003, 1004] and result.info["sampler_name"] == "Euler a"
    assert infotext.parse(result.info["infotexts"][0])["Seed"] == "1003"


def test_img2img_keeps_size_and_reports_strength(api):
    result = api.img2img(images=[picture()], prompt="a red circle", seed=5, cfg_scale=6.5, denoising_strength=0.5,
                         width=64, height=64)
    assert result.image.size == (64, 64)
    assert result.info["denoising_strength"] == 0.5
    assert infotext.parse(result.info["infotexts"][0])["Denoising strength"] == "0.5"


def test_inpaint_changes_only_the_mask(api):
    original = picture()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    result = api.img2img(images=[original], mask_image=mask, inpainting_fill=1, inpaint_full_res=False,
                         mask_blur=0, denoising_strength=1.0, prompt="a star", seed=1, width=64, height=64)
    out, ref = np.asarray(result.image.convert("RGB")), np.asarray(original)
    assert np.array_equal(out[:, 32:], ref[:, 32:])  # outside the mask: the original, to the last pixel
    assert not np.array_equal(out[:, :32], ref[:, :32])


def test_soft_inpainting_through_alwayson_scripts(api):
    original = picture()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    result = api.img2img(images=[original], mask_image=mask, inpaint_full_res=False, mask_blur=8, prompt="a star",
                         denoising_strength=1.0, seed=1, width=64, height=64,
                         alwayson_scripts={"Soft Inpainting": {"args": [True, 1, 0.75, 4, 0, 0.5, 2]}})
    text = infotext.parse(result.info["infotexts"][0])
    assert text["Soft inpainting enabled"] == "True" and text["Soft inpainting preservation strength"] == "0.75"
    with pytest.raises(RuntimeError, match="soft inpainting takes up to 7 args"):
        api.img2img(images=[original], mask_image=mask, prompt="x", width=64, height=64,
                    alwayson_scripts={"soft inpainting": {"args": [True] * 8}})


def test_png_info_options_models(api):
    result = api.txt2img(prompt="x", seed=7, width=64, height=64)
    info = api.png_info(result.image)
    assert info.info == result.info["infotexts"][0] and info.parameters["Seed"] == "7"
    models = api.get_sd_models()
    assert models[0]["model_name"] == "tiny-sd1"
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    assert "Clip skip: 2" in api.txt2img(prompt="x", seed=7, width=64, height=64).info["infotexts"][0]
    assert [s["name"] for s in api.get_samplers()][:2] and api.get_upscalers()[0]["name"] == "None"


def test_interrupt_from_a_second_thread(api, server):
    _port, app = server
    done = {}

    def long_job():
        done["result"] = api.txt2img(prompt="x", seed=1, width=64, height=64, steps=400)

    worker = threading.Thread(target=long_job)
    worker.start()
    service = app.state.service
    deadline = time.time() + 60
    while service.live is None or service.live.step < 1:
        assert time.time() < deadline
        time.sleep(0.02)
    progress = api.get_progress()
    assert progress["state"]["sampling_steps"] == 400 and 0 < progress["progress"] < 1
    api.interrupt()
    worker.join(60)
    assert not worker.is_alive()
    assert done["result"].images == []  # interrupted in its only batch: no image, and no error


def test_another_client_cannot_interrupt(server):
    port, app = server
    auth = ("user", "secret")
    base = f"http://127.0.0.1:{port}"
    job = requests.post(f"{base}/sdstudio/v1/jobs", auth=auth, headers={"X-Sdstudio-Client": "alice"},
                        json={"request": {"prompt": "x", "steps": 300, "width": 64, "height": 64}}).json()
    service = app.state.service
    deadline = time.time() + 60
    while service.live is None or service.live.step < 1:
        assert time.time() < deadline
        time.sleep(0.02)
    assert requests.post(f"{base}/sdapi/v1/interrupt", auth=auth, headers={"X-Sdstudio-Client": "bob"}).json() == \
        {"interrupted": []}
    assert not service.live.interrupted
    r = requests.post(f"{base}/sdstudio/v1/jobs/{job['id']}/cancel", auth=auth, headers={"X-Sdstudio-Client": "bob"})
    assert r.status_code == 403
    r = requests.post(f"{base}/sdstudio/v1/jobs/{job['id']}/cancel", auth=auth,
                      headers={"X-Sdstudio-Client": "alice"})
    assert r.status_code == 200
    assert service.wait(job["id"], 60).status == "cancelled"


def test_cli_queues_on_a_running_server(server, capsys, data_dir):
    from sdstudio.cli import main

    port, _ = server
    code = main(["txt2img", "a red circle", "--steps", "2", "--size", "64x64", "--seed", "4", "--batch-size", "2",
                 "--clip-skip", "2", "--server", f"http://127.0.0.1:{port}", "--server-auth", "user:secret"])
    out = capsys.readouterr()
    assert code == 0, out.err
    paths = out.out.split()
    assert [p.split("/")[-1] for p in paths[:2]] == ["00000-4.png", "00001-5.png"] and "grid-" in paths[2]
    assert all(str(data_dir) in p for p in paths)  # written by the server, in its outputs folder
    assert "Clip skip: 2" in Image.open(paths[0]).info["parameters"]
    assert main(["txt2img", "x", "--steps", "2", "--size", "64x64", "--server", f"http://127.0.0.1:{port}"]) == 2
    assert "401" in capsys.readouterr().err
