"""The async job API, limits on requests and paths, and the A1111 img2img/extras routes."""

from __future__ import annotations

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdstudio.cli import build_parser
from sdstudio.server import create_app


@pytest.fixture
def client(data_dir):
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    app = create_app(args)
    with TestClient(app) as c:
        yield c
    app.state.service.stop()


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


SMALL = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 11}


def test_submit_returns_at_once_then_events_and_images(client):
    r = client.post("/sdstudio/v1/jobs", json={"request": {**SMALL, "batch_size": 2}})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running") and len(job["id"]) == 32
    with client.stream("GET", f"/sdstudio/v1/jobs/{job['id']}/events") as stream:
        events = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: end"
    done = client.get(f"/sdstudio/v1/jobs/{job['id']}").json()
    assert done["status"] == "done" and done["progress"] == 1.0 and len(done["images"]) == 2
    png = client.get(done["images"][1])
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).info["parameters"].count("Seed: 12") == 1
    assert client.get(f"/sdstudio/v1/jobs/{job['id']}/images/5").status_code == 404
    listed = client.get("/sdstudio/v1/jobs?limit=1").json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert client.get(f"/sdstudio/v1/jobs?offset={2**70}").status_code == 422  # found by the fuzzer: was a 500
    assert client.get("/sdstudio/v1/jobs/nope").status_code == 404


def test_jobs_belong_to_their_client(client):
    job = client.post("/sdstudio/v1/jobs", json={"request": SMALL}, headers={"X-Sdstudio-Client": "a"}).json()
    assert client.get("/sdstudio/v1/jobs", headers={"X-Sdstudio-Client": "b"}).json()["jobs"] == []
    assert len(client.get("/sdstudio/v1/jobs", headers={"X-Sdstudio-Client": "a"}).json()["jobs"]) == 1
    assert client.delete(f"/sdstudio/v1/jobs/{job['id']}", headers={"X-Sdstudio-Client": "b"}).status_code == 403


@pytest.mark.parametrize("body, status, words", [
    ({"steps": 1_000_000}, 422, "steps must be"),
    ({"batch_size": 10_000}, 422, "batch_size must be"),
    ({"n_iter": 10_000}, 422, "n_iter must be"),
    ({"width": 8192, "height": 8192}, 422, "megapixels"),
    ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 422, "is a path"),
    ({"override_settings": {"sd_vae": "/etc/passwd"}}, 422, "is a path"),
    ({"save_images": True, "outpath_samples": "../../elsewhere"}, 403, "outside the outputs folder"),
    ({"save_images": True, "outpath_samples": "/tmp"}, 403, "outside the outputs folder"),
    ({"steps": "many"}, 422, "steps"),
])
def test_bad_requests_are_4xx_naming_the_field(client, body, status, words):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **body})
    assert r.status_code == status, r.text
    assert words in json.dumps(r.json())


def test_malformed_json_and_huge_bodies(client, data_dir):
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/sdapi/v1/png-info", content=b"x", headers={"Content-Length": str(10**12),
                                                                  "Content-Type": "application/json"})
    assert r.status_code == 413


def test_giant_images_are_refused_before_decoding(client):
    huge = Image.new("1", (10_000, 10_000))  # 100 MP, small as a PNG
    r = client.post("/sdapi/v1/png-info", json={"image": b64png(huge)})
    assert r.status_code == 413 and "megapixels" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": ["not base64 at all!"]})
    assert r.status_code == 422


def test_img2img_route_and_outputs_folder(client, data_dir):
    init = Image.new("RGB", (96, 64), (200, 10, 10))
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64png(init)], "denoising_strength": 0.4,
                                               "resize_mode": 1, "save_images": True})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.4 and "Resize mode: Crop and resize" in info["infotexts"][0]
    saved = list((data_dir / "outputs" / "img2img-images").rglob("*.png"))
    assert [p.name for p in saved] == ["00000-11.png"]


def test_extras_upscale(client):
    image = Image.new("RGB", (32, 16), (1, 2, 3))
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64png(image), "upscaling_resize": 2,
                                                          "upscaler_1": "Lanczos"})
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
    assert out.size == (64, 32)
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": b64png(image), "name": "a"}],
                                                          "resize_mode": 1, "upscaling_resize_w": 40,
                                                          "upscaling_resize_h": 40, "upscaler_1": "Nearest"})
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (40, 40)
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64png(image), "upscaler_1": "R-ESRGAN 4x+"})
    assert r.status_code == 404 and "not found; available: None, Lanczos, Nearest" in r.json()["detail"]


def test_extras_and_hires_with_a_model_upscaler(client, data_dir):
    from sdstudio.testing.synthetic import write_upscaler

    write_upscaler(data_dir / "models" / "ESRGAN" / "4x-tiny.safetensors", "esrgan", 4)
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "4x-tiny"] and listed[3]["scale"] == 4
    image = Image.new("RGB", (32, 16), (200, 20, 20))
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64png(image), "upscaling_resize": 3,
                                                          "upscaler_1": "4x-tiny", "upscaler_2": "Lanczos",
                                                          "extras_upscaler_2_visibility": 0.5})
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).size == (96, 48)
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "4x-tiny",
                                               "denoising_strength": 0.4, "hr_sampler_name": "Use same sampler"})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (96, 96)
    info = json.loads(r.json()["info"])
    assert "Hires upscaler: 4x-tiny" in info["infotexts"][0] and "Denoising strength: 0.4" in info["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, "hr_upscaler": "4x-nope"})
    assert r.status_code == 404 and "4x-nope" in r.json()["detail"]


def test_utility_routes(client):
    assert client.get("/sdapi/v1/memory").json()["ram"]["total"] > 0
    # A1111's order (its script files' names); the always-on ones are not in this list
    assert client.get("/sdapi/v1/scripts").json() == {
        "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot"],
        "img2img": ["loopback", "outpainting mk2", "poor man's outpainting", "prompt matrix",
                    "prompts from file or textbox", "sd upscale", "x/y/z plot"]}
    info = {(s["name"], s["is_img2img"]): s for s in client.get("/sdapi/v1/script-info").json()}
    upscale = info[("sd upscale", True)]
    assert not upscale["is_alwayson"] and [a["label"] for a in upscale["args"]] == ["Tile overlap", "Upscaler",
                                                                                    "Scale Factor"]
    assert upscale["args"][0] == {"label": "Tile overlap", "value": 64, "minimum": 0, "maximum": 256, "step": 16,
                                  "choices": None}
    assert "None" in upscale["args"][1]["choices"] and ("sd upscale", False) not in info
    assert info[("soft inpainting", True)]["is_alwayson"]
    assert "CFG Scale" in info[("x/y/z plot", False)]["args"][0]["choices"]
    assert client.post("/sdapi/v1/interrogate", json={}).status_code == 422  # no image
    assert client.get("/sdapi/v1/progress").json()["state"]["job"] == ""
    assert client.get("/docs").status_code == 200


def test_refused_img2img_leaves_no_files(client, data_dir):
    init = b64png(Image.new("RGB", (64, 64)))
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init], "steps": 0})
    assert r.status_code == 422
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init],
                                               "override_settings": {"sd_model_checkpoint": "missing"}})
    assert r.status_code == 404
    assert not list((data_dir / "cache" / "jobs").rglob("*.png"))


def test_img2img_scripts_over_the_a1111_api(client):
    init = b64png(Image.new("RGB", (64, 64), (30, 60, 200)))
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init], "width": 32 * 2, "height": 64,
                                               "script_name": "sd upscale", "script_args": ["", 16, 1, 2]})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (128, 128)
    assert "SD upscale upscaler: Lanczos" in json.loads(r.json()["info"])["infotexts"][0]
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init], "script_name": "ultimate sd upscale"})
    assert r.status_code == 422 and "available: Loopback, Outpainting mk2" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init], "script_name": "SD upscale",
                                               "script_args": {"upscaler": "4x-nope"}})
    assert r.status_code == 404
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "restore_faces": True})
    assert r.status_code == 404 and "face restoration (CodeFormer) is not installed: put" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "sd upscale"})
    assert r.status_code == 422 and "not a txt2img script" in r.json()["detail"]


def test_xyz_plot_over_the_a1111_api_with_positional_args(client):
    args = [6, "3,7", [], 4, "1,2", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "x/y/z plot", "script_args": args})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 5  # the grid first, then the 4 cells ("include sub images")
    info = json.loads(body["info"])
    assert "X Type: CFG Scale" in info["infotexts"][0] and info["index_of_first_image"] == 1
    grid = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert grid.width > 128 and grid.height > 128
    job = client.post("/sdstudio/v1/jobs", json={"request": {**SMALL, "script_name": "Prompt matrix",
                                                             "prompt": "a|b|c", "script_args": {}}}).json()
    with client.stream("GET", f"/sdstudio/v1/jobs/{job['id']}/events") as stream:
        list(stream.iter_lines())
    done = client.get(f"/sdstudio/v1/jobs/{job['id']}").json()
    assert len(done["grids"]) == 1 and len(done["images"]) == 4
    assert client.get(done["grids"][0]).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "x/y/z plot",
                                               "script_args": [6, "3,x", []]})
    assert r.status_code == 422 and "CFG Scale: 'x'" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "x/y/z plot",
                                               "script_args": ["Checkpoint name", "tiny-sd1, missing", []]})
    assert r.status_code == 422 and "'missing'" in r.json()["detail"]
    assert client.get("/sdstudio/v1/queue").json()["queued"] == 0  # refused before it queued


def test_the_cli_server_body_carries_every_request_field(client):
    """``txt2img --server`` sends the request as it serializes itself: a field changed from its default (any
    of them, scripts and always-on scripts included) arrives in the queued job unchanged."""
    import dataclasses

    from sdstudio.cli import job_body
    from sdstudio.core.params import Txt2ImgRequest

    changed = dict(prompt="a red circle", negative_prompt="blue", styles=[], seed=5, subseed=6,  # noqa: C408
                   subseed_strength=0.25, seed_resize_from_w=64, seed_resize_from_h=64, sampler_name="Euler",
                   scheduler="Karras", batch_size=1, n_iter=1, steps=2, cfg_scale=6.5, width=64, height=64,
                   tiling=True, restore_faces=False, face_restoration_model="GFPGAN", code_former_weight=0.3,
                   clip_skip=2, emphasis="No norm", novelai_braces=True, rng="CPU", eta_noise_seed_delta=31337,
                   eta=0.5, s_churn=0.1, s_tmin=0.2, s_tmax=9.0, s_noise=0.9, always_discard_next_to_last_sigma=True,
                   uni_pc_variant="bh2", uni_pc_skip_type="logSNR", uni_pc_order=2, uni_pc_lower_order_final=False,
                   extra_noise=0.1, model="tiny-sd1", model_hash="abc", vae="None", tiled_vae=True, enable_hr=False,
                   denoising_strength=0.6, hr_scale=1.5, hr_resize_x=0, hr_resize_y=0, hr_upscaler="Latent (bicubic)",
                   hr_second_pass_steps=3, hr_sampler_name="Heun", hr_scheduler="Exponential", hr_prompt="hp",
                   hr_negative_prompt="hn", hr_cfg=4.0, distilled_cfg_scale=2.5, refiner_checkpoint="tiny-sd1",
                   refiner_switch_at=0.6, sdxl_crop_top=8, sdxl_crop_left=16, sdxl_refiner_low_aesthetic_score=2.0,
                   sdxl_refiner_high_aesthetic_score=6.5, hires_fix_refiner_pass="both passes",
                   refiner_switch_by_sample_steps=True, s_min_uncond=0.5, s_min_uncond_all=True,
                   pad_cond_uncond=True, pad_cond_uncond_v0=True, token_merging_ratio=0.3, token_merging_ratio_hr=0.4,
                   token_merging_ratio_img2img=0.2, deepcache_interval=3, controlnet_increment_seed_during_batch=True,
                   script_name="X/Y/Z plot",
                   script_args={"x_type": "Steps", "x_values": "1,2"},
                   alwayson_scripts={}, extra={"Some key": "kept"})
    assert set(changed) == {f.name for f in dataclasses.fields(Txt2ImgRequest)}  # a new field must be listed here
    req = Txt2ImgRequest(**changed)
    r = client.post("/sdstudio/v1/jobs", json=job_body(req))
    assert r.status_code == 202, r.text
    stored = Txt2ImgRequest.from_dict(client.app.state.service.queue.get(r.json()["id"]).request["request"])
    want = {**changed, "script_args": {**stored.script_args, **changed["script_args"]}}  # defaults filled in
    assert dataclasses.asdict(stored) == want
