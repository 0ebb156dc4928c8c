"""The A1111-compatible API and the launch script, as existing clients use them."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdstudio.cli import build_parser
from sdstudio.core import infotext
from sdstudio.server import create_app

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}


def make_client(data_dir, *flags):
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), *flags])
    return TestClient(create_app(args))


@pytest.fixture
def api(data_dir):
    return make_client(data_dir, "--api", "--nowebui", "--api-auth", "u:p")


def test_auth_required(api):
    assert api.get("/sdapi/v1/sd-models").status_code == 401
    bad = {"Authorization": "Basic " + base64.b64encode(b"u:wrong").decode()}
    assert api.get("/sdapi/v1/sd-models", headers=bad).status_code == 401
    assert api.get("/sdapi/v1/sd-models", headers=AUTH).status_code == 200


def test_cmd_flags_hide_passwords(data_dir):
    client = make_client(data_dir, "--api", "--gradio-auth", "admin:hunter2")
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["gradio_auth"] == "***" and "hunter2" not in str(flags) and flags["api"] is True


def test_override_settings_reach_the_request(api):
    body = {"prompt": "a (red:1.5) circle", "steps": 1, "width": 64, "height": 64, "seed": 5,
            "override_settings": {"emphasis": "No norm", "randn_source": "CPU"}}
    info = json.loads(api.post("/sdapi/v1/txt2img", json=body, headers=AUTH).json()["info"])
    p = infotext.parse(info["infotexts"][0])
    assert p["Emphasis"] == "No norm" and p["RNG"] == "CPU"


def test_lists(api):
    models = api.get("/sdapi/v1/sd-models", headers=AUTH).json()
    assert models[0]["model_name"] == "tiny-sd1" and models[0]["title"].startswith("tiny-sd1.safetensors [")
    assert len(models[0]["hash"]) == 10 and len(models[0]["sha256"]) == 64
    samplers = [s["name"] for s in api.get("/sdapi/v1/samplers", headers=AUTH).json()]
    assert "Euler a" in samplers and "DPM++ 2M" in samplers
    labels = [s["label"] for s in api.get("/sdapi/v1/schedulers", headers=AUTH).json()]
    assert "Karras" in labels
    assert api.get("/sdapi/v1/options", headers=AUTH).json()["sd_model_checkpoint"] == models[0]["title"]


def test_txt2img_shape_as_a1111(api):
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 42, "steps": 2, "width": 64, "height": 64,
            "batch_size": 2, "sampler_name": "Euler a", "override_settings": {"CLIP_stop_at_last_layers": 2},
            "some_extension_field": {"x": 1}}
    r = api.post("/sdapi/v1/txt2img", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["images"]) == 2 and data["parameters"]["prompt"] == "a red circle"
    info = json.loads(data["info"])
    assert info["all_seeds"] == [42, 43] and info["seed"] == 42 and info["sd_model_name"] == "tiny-sd1"
    p = infotext.parse(info["infotexts"][1])
    assert p["Seed"] == "43" and p["Clip skip"] == "2" and p["Sampler"] == "Euler a"
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][1])))
    assert image.size == (64, 64) and image.info["parameters"] == info["infotexts"][1]
    # png-info reads it back
    back = api.post("/sdapi/v1/png-info", json={"image": data["images"][1]}, headers=AUTH).json()
    assert back["info"] == info["infotexts"][1] and back["parameters"]["Seed"] == "43"


def test_errors_are_clear(api):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 500, "steps": 1}, headers=AUTH)
    assert r.status_code == 422 and "width must be a multiple of 8" in r.json()["detail"]
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                            "override_settings": {"sd_model_checkpoint": "nope"}}, headers=AUTH)
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = api.post("/sdapi/v1/txt2img", json={"steps": "many"}, headers=AUTH)
    assert r.status_code == 422 and isinstance(r.json()["detail"], list)
    r = api.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"hello").decode()}, headers=AUTH)
    assert r.status_code == 422
    r = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, headers=AUTH)
    assert r.status_code == 404


def test_ui_page_is_served(data_dir):
    client = make_client(data_dir, "--api")
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/sdapi/v1/samplers").status_code == 200  # no --api-auth: open


def test_webui_sh_with_a1111_flags(data_dir, free_port):
    """``./webui.sh --api --nowebui --port P --api-auth u:p`` serves the API (setup is a no-op once installed)."""
    port = free_port()
    proc = subprocess.Popen([str(ROOT / "webui.sh"), "--api", "--nowebui", "--port", str(port), "--api-auth", "u:p",
                             "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", headers=AUTH)
                models = json.loads(urllib.request.urlopen(req, timeout=5).read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.5)
        assert models[0]["model_name"] == "tiny-sd1"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=5)
        assert e.value.code == 401
        body = json.dumps({"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": 1}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", data=body,
                                     headers={**AUTH, "Content-Type": "application/json"})
        data = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert np.asarray(Image.open(io.BytesIO(base64.b64decode(data["images"][0])))).shape == (64, 64, 3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_extra_network_listings(data_dir):
    import torch
    from safetensors.torch import save_file

    (data_dir / "models" / "Lora").mkdir(parents=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(data_dir / "models" / "Lora" / "style.safetensors"))
    (data_dir / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(2, 64)}, str(data_dir / "embeddings" / "good.safetensors"))
    save_file({"emb_params": torch.zeros(1, 768)}, str(data_dir / "embeddings" / "other-model.safetensors"))
    (data_dir / "styles.csv").write_text("name,prompt,negative_prompt\nBlue,{prompt} in blue,red\n")
    api = make_client(data_dir, "--api", "--nowebui")
    assert [x["name"] for x in api.get("/sdapi/v1/loras").json()] == ["style"]
    emb = api.get("/sdapi/v1/embeddings").json()
    assert emb["loaded"]["good"]["vectors"] == 2 and "other-model" in emb["skipped"]
    assert api.get("/sdapi/v1/prompt-styles").json() == [{"name": "Blue", "prompt": "{prompt} in blue",
                                                          "negative_prompt": "red"}]
    assert api.get("/sdapi/v1/hypernetworks").json() == []
    assert api.post("/sdapi/v1/refresh-loras").status_code == 200


def test_options_are_settings_saved_in_config_json(data_dir):
    client = make_client(data_dir, "--api")
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "samples_format": "jpg"}).status_code == 200
    saved = json.loads((data_dir / "config.json").read_text())
    assert saved["CLIP_stop_at_last_layers"] == 2 and saved["samples_format"] == "jpg"
    r = client.post("/sdapi/v1/options", json={"samples_format": "bmp"})
    assert r.status_code == 422 and "samples_format" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 404
    r = client.post("/sdapi/v1/options", json={"sd_vae": "nope"})
    assert r.status_code == 404 and "no VAE named 'nope'" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 200
    # a restart reads them back; the page gets its language from the same settings
    again = make_client(data_dir, "--api")
    assert again.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    assert again.get("/sdstudio/localization.json").json() == {"language": "None", "strings": {}}
    assert again.post("/sdapi/v1/options", json={"localization": "zh_CN"}).status_code == 200
    assert again.get("/sdstudio/localization.json").json()["strings"]["Prompt"] == "提示词"
    assert again.post("/sdapi/v1/options", json={"localization": "xx_XX"}).status_code == 422


def test_bad_localization_flag_is_a_clear_error(data_dir, capsys):
    from sdstudio.server import serve

    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--localization", "xx_XX"])
    assert serve(args) == 2
    assert "no localization named 'xx_XX'" in capsys.readouterr().err
