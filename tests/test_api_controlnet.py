"""The sd-webui-controlnet HTTP API on a real server: the /controlnet routes' shapes, /controlnet/detect against
opencv, its refusals, and webuiapi's ControlNetUnit through txt2img and img2img (tiny checkpoint, tiny ControlNet,
64x64, 3 steps)."""

from __future__ import annotations

import base64
import io
import threading
import time

import cv2
import numpy as np
import pytest
import requests
import uvicorn
import webuiapi
from PIL import Image, ImageDraw

from sdstudio.cli import build_parser
from sdstudio.core import infotext
from sdstudio.models.files import legacy_model_hash
from sdstudio.server import create_app

CONTROLNET = "control_tiny_canny"


@pytest.fixture(scope="module")
def server(make_data_root, free_port):
    """One API server for the module: the tiny SD1 checkpoint, a tiny ControlNet made for it in
    models/ControlNet, no annotator files."""
    from sdstudio.testing.controlnet_files import write_controlnet

    root = make_data_root("cnapi")
    path = root / "models" / "ControlNet" / f"{CONTROLNET}.safetensors"
    write_controlnet(path, "sd1", "tiny", seed=3)
    port = free_port()
    args = build_parser().parse_args(["serve", "--data-dir", str(root), "--api", "--nowebui"])
    app = create_app(args)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "root": root,
           "title": f"{CONTROLNET} [{legacy_model_hash(path)}]"}
    srv.should_exit = True
    thread.join(10)
    app.state.service.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server["port"], sampler="Euler", steps=3)


def get(server, path: str, **params):
    r = requests.get(server["url"] + path, params=params, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def detect(server, **body) -> requests.Response:
    return requests.post(server["url"] + "/controlnet/detect", json=body, timeout=120)


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unb64(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def shapes(width: int = 64, height: int = 64) -> Image.Image:
    """Edges at many angles and contrasts, so a threshold or resize mistake changes the canny map."""
    im = Image.new("RGB", (width, height), (30, 60, 200))
    d = ImageDraw.Draw(im)
    d.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(220, 40, 40))
    d.rectangle((2, 2, width // 3, height // 5), fill=(90, 200, 90))
    d.polygon([(width - 4, 4), (width - 20, height // 2), (width - 2, height - 6)], fill=(140, 120, 100))
    # a faint patch: an edge for canny's 50/150, none for its 100/200
    d.rectangle((2, height - 14, width // 5, height - 2), fill=(60, 90, 230))
    return im


# ---- the read-only routes ----------------------------------------------------------------------------------
def test_version(server, api):
    assert get(server, "/controlnet/version") == {"version": 3}
    assert api.controlnet_version() == 3


def test_model_list_has_titles_without_none_and_rescans(server, api):
    title = server["title"]
    assert get(server, "/controlnet/model_list") == {"model_list": [title]}
    assert api.controlnet_model_list() == [title]
    added = server["root"] / "models" / "ControlNet" / "another.safetensors"
    added.write_bytes((server["root"] / "models" / "ControlNet" / f"{CONTROLNET}.safetensors").read_bytes())
    try:
        assert get(server, "/controlnet/model_list", update="false") == {"model_list": [title]}  # not rescanned
        assert get(server, "/controlnet/model_list")["model_list"] == [f"another [{legacy_model_hash(added)}]", title]
    finally:
        added.unlink()
        assert get(server, "/controlnet/model_list") == {"model_list": [title]}


def test_module_list_and_details(server, api):
    out = get(server, "/controlnet/module_list")
    assert set(out) == {"module_list", "module_detail"}
    modules = out["module_list"]
    assert modules[0] == "none" and "canny" in modules and "inpaint_only" in modules
    assert list(out["module_detail"]) == modules
    assert out["module_detail"]["canny"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]}
    assert out["module_detail"]["reference_only"]["model_free"] is True
    assert api.controlnet_module_list() == modules
    labels = get(server, "/controlnet/module_list", alias_names="true")
    assert "invert (from white bg & black line)" in labels["module_list"] and "invert" not in labels["module_list"]
    assert "t2ia_color_grid" in labels["module_list"] and "color" not in labels["module_list"]
    assert list(labels["module_detail"]) == labels["module_list"]
    assert len(labels["module_list"]) == len(modules)


def test_control_types(server):
    types = get(server, "/controlnet/control_types")["control_types"]
    assert "All" in types and "Canny" in types
    for entry in types.values():
        assert set(entry) == {"module_list", "model_list", "default_option", "default_model"}
        assert entry["module_list"][0] == "none" and entry["model_list"][0] == "None"
    assert types["All"]["model_list"] == ["None", server["title"]]
    assert types["All"]["default_option"] == "none" and types["All"]["default_model"] == "None"
    canny = types["Canny"]  # the tiny model's name says canny: it is the type's model
    assert canny["model_list"] == ["None", server["title"]] and canny["default_model"] == server["title"]
    assert canny["default_option"] == "canny" and "canny" in canny["module_list"]
    assert types["Lineart"]["model_list"] == ["None"] and types["Lineart"]["default_model"] == "None"


def test_settings_follow_the_options(server):
    assert get(server, "/controlnet/settings") == {"control_net_unit_count": 3}
    url = server["url"] + "/sdapi/v1/options"
    assert requests.post(url, json={"control_net_unit_count": 5}, timeout=30).status_code == 200
    try:
        assert get(server, "/controlnet/settings") == {"control_net_unit_count": 5}
    finally:
        requests.post(url, json={"control_net_unit_count": 3}, timeout=30)


# ---- detect ------------------------------------------------------------------------------------------------
def test_detect_canny_is_opencv_canny_at_the_resolution_asked(server):
    im = shapes(128, 96)
    r = detect(server, controlnet_module="canny", controlnet_input_images=[b64(im)], controlnet_processor_res=64,
               controlnet_threshold_a=30, controlnet_threshold_b=90)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"info", "images"} and out["info"] == "Success" and len(out["images"]) == 1
    got = unb64(out["images"][0])
    # the extension's canny: the short side (96) to the resolution, edge-padded to a multiple of 64, cut back
    small = cv2.resize(np.asarray(im), (85, 64), interpolation=cv2.INTER_AREA)
    padded = np.pad(small, [[0, 0], [0, 128 - 85], [0, 0]], mode="edge")
    want = cv2.Canny(padded, 30, 90)[:, :85]
    assert got.shape == (64, 85, 3)
    assert np.array_equal(got[:, :, 0], want) and np.array_equal(got[:, :, 2], want)
    assert not np.array_equal(want, cv2.Canny(padded, 100, 200)[:, :85])  # the thresholds asked for count


def test_detect_defaults_and_webuiapi_spelling(server, api):
    im = shapes()
    arr = np.asarray(im)
    # -1 (and values out of a slider's range): the slider's default, 100/200 for canny
    r = detect(server, controlnet_module="canny", controlnet_input_images=[b64(im), b64(im.transpose(0))],
               controlnet_processor_res=64, controlnet_threshold_a=-1, controlnet_threshold_b=999)
    assert r.status_code == 200, r.text
    first, second = (unb64(x)[:, :, 0] for x in r.json()["images"])
    assert np.array_equal(first, cv2.Canny(arr, 100, 200))
    assert np.array_equal(second, cv2.Canny(np.ascontiguousarray(arr[:, ::-1]), 100, 200))
    assert not np.array_equal(first, cv2.Canny(arr, 50, 150))  # the defaults were really used
    # webuiapi posts controlnet_images (the extension reads controlnet_input_images): both work
    result = api.controlnet_detect([im], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    assert np.array_equal(np.asarray(result.image)[:, :, 0], first)


def test_detect_none_gives_the_image_and_inpaint_uses_the_mask(server):
    im = shapes()
    r = detect(server, controlnet_input_images=[b64(im)])  # controlnet_module defaults to "none"
    assert r.status_code == 200, r.text
    assert np.array_equal(unb64(r.json()["images"][0]), np.asarray(im))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    r = detect(server, controlnet_module="inpaint_only", controlnet_input_images=[b64(im)],
               controlnet_masks=[b64(mask)])
    assert r.status_code == 200, r.text
    out = unb64(r.json()["images"][0])  # RGBA: the masked half shown half transparent, as the extension does
    assert out.shape == (64, 64, 4)
    assert (out[:, :32, 3] == 128).all() and (out[:, 32:, 3] == 255).all()


@pytest.mark.parametrize("body, status, named", [
    ({"controlnet_module": "no_such_module", "controlnet_input_images": ["x"]}, 422, "controlnet_module"),
    ({"controlnet_module": 5, "controlnet_input_images": ["x"]}, 422, "controlnet_module"),
    ({"controlnet_module": "canny"}, 422, "controlnet_input_images"),
    ({"controlnet_module": "canny", "controlnet_input_images": []}, 422, "controlnet_input_images"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["not an image!"]}, 422,
     "controlnet_input_images[0]"),
    ({"controlnet_module": "canny", "controlnet_images": [base64.b64encode(b"plain text").decode()]}, 422,
     "controlnet_images[0]"),
    ({"controlnet_module": "canny", "controlnet_input_images": [7]}, 422, "controlnet_input_images[0]"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["IMAGE"], "controlnet_processor_res": "big"}, 422,
     "controlnet_processor_res"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["IMAGE"], "controlnet_processor_res": 64.5}, 422,
     "controlnet_processor_res"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["IMAGE"], "controlnet_threshold_a": "NaN"}, 422,
     "controlnet_threshold_a"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["IMAGE"], "controlnet_threshold_b": True}, 422,
     "controlnet_threshold_b"),
    ({"controlnet_module": "inpaint_only", "controlnet_input_images": ["IMAGE"]}, 422, "controlnet_masks"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["IMAGE"], "controlnet_masks": ["IMAGE", "IMAGE"]},
     422, "controlnet_masks"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["IMAGE"] * 65}, 413, "controlnet_input_images"),
])
def test_detect_refusals_name_the_field(server, body, status, named):
    image = b64(shapes())
    body = {k: [image if x == "IMAGE" else x for x in v] if isinstance(v, list) else v for k, v in body.items()}
    r = detect(server, **body)
    assert r.status_code == status, r.text
    assert named in r.json()["detail"]


def test_detect_with_a_missing_annotator_file_says_where_to_put_it(server):
    r = detect(server, controlnet_module="softedge_hed", controlnet_input_images=[b64(shapes())],
               controlnet_processor_res=64)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "put " in detail and str(server["root"] / "models" / "ControlNet" / "annotators") in detail


def test_detect_waits_its_turn_without_blocking_other_routes(server):
    """Several detects at once all answer, and the event loop keeps serving meanwhile."""
    big = b64(shapes(1024, 1024))
    results: list[int] = []

    def one() -> None:
        results.append(detect(server, controlnet_module="scribble_xdog", controlnet_input_images=[big],
                              controlnet_processor_res=1024).status_code)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    started = time.time()
    assert get(server, "/controlnet/version") == {"version": 3}
    answered = time.time() - started
    for t in threads:
        t.join(120)
    assert results == [200, 200, 200]
    assert answered < 5


# ---- units through txt2img / img2img ------------------------------------------------------------------------
def unit_infotext(title: str, res: int = 64, a: float = 100.0, b: float = 200.0,
                  resize: str = "Resize and Fill") -> str:
    return (f"Module: canny, Model: {title}, Weight: 1.0, Resize Mode: {resize}, Processor Res: {res}, "
            f"Threshold A: {a}, Threshold B: {b}, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
            "Control Mode: Balanced")


def test_webuiapi_controlnet_unit_txt2img(server, api):
    control = shapes()
    unit = webuiapi.ControlNetUnit(image=control, module="canny", model=server["title"], processor_res=64,
                                   threshold_a=100, threshold_b=200)
    common = {"prompt": "shapes", "seed": 11, "cfg_scale": 5, "width": 64, "height": 64, "steps": 3}
    plain = api.txt2img(**common, alwayson_scripts={})
    # a fresh alwayson_scripts each call: webuiapi's default {} is shared and its ControlNet entry would
    # ride along in every later call of this process (other test files' too)
    controlled = api.txt2img(**common, controlnet_units=[unit], alwayson_scripts={})
    assert len(plain.images) == 1 and len(controlled.images) == 2  # the image, then the detected map
    a = np.asarray(plain.images[0].convert("RGB"), dtype=np.int16)
    b = np.asarray(controlled.images[0].convert("RGB"), dtype=np.int16)
    assert np.abs(a - b).mean() > 0.5  # the ControlNet changed the picture
    detected = np.asarray(controlled.images[1].convert("RGB"))
    assert np.array_equal(detected[:, :, 0], cv2.Canny(np.asarray(control), 100, 200))
    assert len(controlled.info["infotexts"]) == 1  # maps carry no infotext, as in A1111
    params = infotext.parse(controlled.info["infotexts"][0])
    assert params["ControlNet 0"] == unit_infotext(server["title"])
    assert "ControlNet 0" not in infotext.parse(plain.info["infotexts"][0])
    again = api.txt2img(**common, controlnet_units=[unit], alwayson_scripts={})  # the same request, the same picture
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(controlled.images[0]))


def test_detected_maps_follow_the_setting_and_save_detected_map(server):
    unit = webuiapi.ControlNetUnit(image=shapes(), module="canny", model=server["title"], processor_res=64).to_dict()
    body = {"prompt": "shapes", "seed": 11, "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler"}
    url = server["url"] + "/sdapi/v1/txt2img"

    def images(**more) -> list[str]:
        r = requests.post(url, json={**body, **more}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["images"]

    # the title without regard to case, as A1111 matches it
    with_map = images(alwayson_scripts={"controlnet": {"args": [unit]}})
    assert len(with_map) == 2
    assert len(images(alwayson_scripts={"controlnet": {"args": [unit]}},
                      override_settings={"control_net_no_detectmap": True})) == 1
    assert len(images(alwayson_scripts={"CONTROLNET": {"args": [{**unit, "save_detected_map": False}]}})) == 1
    disabled = images(alwayson_scripts={"ControlNet": {"args": [{**unit, "enabled": False}]}})
    assert len(disabled) == 1 and disabled[0] != with_map[0]
    assert len(images(alwayson_scripts={"ControlNet": {"args": [unit]}}, send_images=False)) == 0
    # two units: both maps, in the units' order, after the image
    two = images(alwayson_scripts={"ControlNet": {"args": [unit, {**unit, "module": "invert"}]}})
    assert len(two) == 3 and two[1] == with_map[1]
    assert np.array_equal(unb64(two[2]), 255 - np.asarray(shapes()))


def test_the_batch_tab_over_http(server, tmp_path):
    """A webuiapi unit switched to the batch tab: one image per control picture, each the one its picture gives
    alone (same seed), no detected maps, and the output folder named after the pictures."""
    folder, out = tmp_path / "pictures", tmp_path / "made"
    folder.mkdir()
    shapes(64, 64).save(folder / "a.png")
    shapes(64, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "b.png")
    unit = {**webuiapi.ControlNetUnit(module="canny", model=server["title"], processor_res=64).to_dict(),
            "input_mode": "batch", "batch_images": str(folder), "output_dir": str(out)}
    body = {"prompt": "shapes", "seed": 11, "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler"}
    url = server["url"] + "/sdapi/v1/txt2img"
    r = requests.post(url, json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}}, timeout=300)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 2 and sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    single = {**unit, "input_mode": "simple", "image": b64(Image.open(folder / "b.png")), "batch_images": None,
              "output_dir": ""}
    r = requests.post(url, json={**body, "alwayson_scripts": {"controlnet": {"args": [single]}}}, timeout=300)
    assert r.status_code == 200, r.text
    assert np.array_equal(unb64(images[1]), unb64(r.json()["images"][0]))
    r = requests.post(url, json={**body, "alwayson_scripts": {"controlnet": {"args": [
        {**unit, "batch_images": str(tmp_path / "nowhere")}]}}}, timeout=60)
    assert r.status_code == 422 and "unit 0.batch_images: cannot read the folder" in r.text


def test_webuiapi_controlnet_unit_img2img_uses_the_init_image(server, api):
    init = shapes()
    unit = webuiapi.ControlNetUnit(module="canny", model=server["title"], processor_res=64, threshold_a=100,
                                   threshold_b=200)  # no image: the unit takes the init image
    assert unit.to_dict()["image"] == ""
    common = {"images": [init], "prompt": "shapes", "seed": 5, "cfg_scale": 5, "denoising_strength": 0.8, "width": 64,
                  "height": 64, "steps": 3}
    plain = api.img2img(**common, alwayson_scripts={})
    controlled = api.img2img(**common, controlnet_units=[unit], alwayson_scripts={})
    assert len(plain.images) == 1 and len(controlled.images) == 2
    a = np.asarray(plain.images[0].convert("RGB"), dtype=np.int16)
    b = np.asarray(controlled.images[0].convert("RGB"), dtype=np.int16)
    assert np.abs(a - b).mean() > 0.5
    detected = np.asarray(controlled.images[1].convert("RGB"))
    assert np.array_equal(detected[:, :, 0], cv2.Canny(np.asarray(init), 100, 200))
    params = infotext.parse(controlled.info["infotexts"][0])
    assert params["ControlNet 0"] == unit_infotext(server["title"])


def test_unit_errors_are_422_naming_the_unit_and_field(server):
    url = server["url"] + "/sdapi/v1/txt2img"
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    good = webuiapi.ControlNetUnit(image=shapes(), module="canny", model=server["title"]).to_dict()
    r = requests.post(url, json={**body, "alwayson_scripts": {"ControlNet": {"args": [{**good, "weight": 3}]}}},
                      timeout=60)
    assert r.status_code == 422 and "unit 0" in r.text and "weight" in r.text
    r = requests.post(url, json={**body, "alwayson_scripts": {"ControlNet": {"args": [{**good, "image": ""}]}}},
                      timeout=60)
    assert r.status_code == 422 and "unit 0" in r.text and "image" in r.text  # txt2img has no init image
    r = requests.post(url, json={**body, "alwayson_scripts": {"ControlNet": {"args": [
        {**good, "model": "no_such_controlnet"}]}}}, timeout=60)
    # an unknown model is found out when the job prepares its units; the message names it and the folder (the
    # status is 422 while Studio.alwayson turns a hook factory's ModelNotFoundError into a ScriptError)
    assert r.status_code in (404, 422) and "no_such_controlnet" in r.text
    assert str(server["root"] / "models" / "ControlNet") in r.json()["detail"]


def test_routes_need_the_api_login_when_set(make_data_root):
    from fastapi.testclient import TestClient

    root = make_data_root("cnauth")
    app = create_app(build_parser().parse_args(["serve", "--data-dir", str(root), "--api", "--nowebui",
                                                "--api-auth", "user:secret"]))
    try:
        client = TestClient(app)
        for path in ("/controlnet/version", "/controlnet/model_list", "/controlnet/settings"):
            assert client.get(path).status_code == 401
        assert client.post("/controlnet/detect", json={}).status_code == 401
        assert client.get("/controlnet/version", auth=("user", "secret")).json() == {"version": 3}
        assert client.get("/controlnet/model_list", auth=("user", "secret")).json() == {"model_list": []}
    finally:
        app.state.service.stop()
