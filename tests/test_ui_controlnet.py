"""The ControlNet accordion (sdstudio/ui/controlnet.py): the extension's unit tabs and element ids, the
tabs' values as the request's ``alwayson_scripts["ControlNet"]`` (images as base64 PNG), a pasted infotext's
``ControlNet N`` back into the tabs, the quick filter, the sliders that follow the preprocessor, the
preview; and the same in a real browser (marked as the other browser tests), screenshots under
``artifacts/ui/``."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from step_hold import held_server

from sdstudio.core import controlnet as cn
from sdstudio.core import infotext
from sdstudio.core.errors import RequestError
from sdstudio.core.settings import Settings
from sdstudio.ui import localization
from sdstudio.ui.app import StudioUI
from sdstudio.ui.controlnet import image_and_mask, unit_key, unit_prefix
from sdstudio.ui.generation import gallery_entries
from sdstudio.ui.progress import finished

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("SDSTUDIO_ARTIFACTS", ROOT / "artifacts")) / "ui"
CANNY_FILE = "control_v11p_sd15_canny"
PASTED = ('a pasted prompt\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, '
          'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [0123abcd], Weight: 0.6, '
          'Resize Mode: Just Resize, Processor Res: 384, Threshold A: 90.0, Threshold B: 180.0, Guidance Start: 0.1, '
          'Guidance End: 0.8, Pixel Perfect: False, Control Mode: My prompt is more important"')


def square(size: int = 64, box: int = 16) -> Image.Image:
    """A white square on black: its canny map is the square's outline."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    image.paste((255, 255, 255), (box, box, size - box, size - box))
    return image


def editor(image: Image.Image, painted: tuple[int, int, int, int] | None = None) -> dict:
    """An image editor's value: the upload, and a brush layer painted white over ``painted``."""
    layers = []
    if painted is not None:
        layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
        layer.paste((255, 255, 255, 255), painted)
        layers.append(layer)
    return {"background": image.convert("RGBA"), "layers": layers, "composite": image.convert("RGBA")}


def decoded(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def plain(value):
    """A fill value as the control will hold it (an update's value)."""
    if isinstance(value, gr.components.Component):
        return value.value
    return value


@pytest.fixture(scope="module")
def data_root(make_data_root):
    """A data dir with the tiny SD1 checkpoint and a tiny ControlNet of its layout (and a second name for it)."""
    from sdstudio.testing.controlnet_files import write_controlnet

    root = make_data_root("ui-controlnet")
    folder = root / "models" / "ControlNet"
    folder.mkdir(parents=True)
    write_controlnet(folder / f"{CANNY_FILE}.safetensors", "sd1", "tiny", seed=7)
    os.link(folder / f"{CANNY_FILE}.safetensors", folder / "control_sd15_depth.safetensors")
    return root


@pytest.fixture(scope="module")
def service(data_root):
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.service.jobs import JobService
    from sdstudio.service.queue import SQLiteJobQueue

    svc = JobService(Engine(Paths(data_root)), SQLiteJobQueue(data_root / "jobs.sqlite3")).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def ui(service, data_root):
    title = service.engine.registry.checkpoint(None).title
    studio = StudioUI(service, Settings(data_root / "config.json", {"sd_model_checkpoint": title}))
    studio.page = studio.build()
    return studio


def values_of(tab) -> dict:
    return {name: getattr(c, "value", None) for name, c in tab.form.controls.items()}


def blocks_by_id(ui) -> dict:
    return {getattr(b, "elem_id", None): b for b in ui.page.blocks.values()}


def test_unit_tabs_have_the_extensions_element_ids_and_translations(ui):
    page = ui.page
    blocks = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    for kind in ("txt2img", "img2img"):
        assert f"{kind}_controlnet" in blocks and f"{kind}_controlnet_tabs" in blocks
        for i in range(3):  # control_net_unit_count's default
            p = f"{kind}_controlnet_ControlNet-{i}"
            assert blocks[f"{p}_tab"].label == f"ControlNet Unit {i}"
            for suffix, label in (("controlnet_enable_checkbox", "Enable"), ("controlnet_low_vram_checkbox", "Low VRAM"),
                                  ("controlnet_pixel_perfect_checkbox", "Pixel Perfect"),
                                  ("controlnet_preprocessor_preview_checkbox", "Allow Preview"),
                                  ("controlnet_type_filter_radio", "Control Type"),
                                  ("controlnet_preprocessor_dropdown", "Preprocessor"),
                                  ("controlnet_model_dropdown", "Model"),
                                  ("controlnet_control_weight_slider", "Control Weight"),
                                  ("controlnet_start_control_step_slider", "Starting Control Step"),
                                  ("controlnet_ending_control_step_slider", "Ending Control Step"),
                                  ("controlnet_control_mode_radio", "Control Mode"),
                                  ("controlnet_resize_mode_radio", "Resize Mode"),
                                  ("controlnet_hr_option_radio", "Hires-Fix Option"),
                                  ("controlnet_pulid_mode_radio", "PuLID Mode"),
                                  ("generated_image", "Preprocessor Preview")):
                assert blocks[f"{p}_{suffix}"].label == label, (p, suffix)
            for suffix in ("input_image", "controlnet_trigger_preprocessor", "controlnet_refresh_models",
                           "controlnet_preprocessor_resolution_slider", "controlnet_threshold_A_slider",
                           "controlnet_threshold_B_slider"):
                assert f"{p}_{suffix}" in blocks, (p, suffix)
        weight = blocks[f"{kind}_controlnet_ControlNet-0_controlnet_control_weight_slider"]
        assert (weight.minimum, weight.maximum, weight.value) == (0.0, 2.0, 1.0)
        # the structured argument is not drawn as the generic script textbox
        assert f"{kind}_script_controlnet_units" not in blocks
    types = blocks["txt2img_controlnet_ControlNet-0_controlnet_type_filter_radio"]
    names = [c[0] if isinstance(c, (tuple, list)) else c for c in types.choices]
    assert names[0] == "All" and "Canny" in names
    models = blocks["txt2img_controlnet_ControlNet-0_controlnet_model_dropdown"]
    titles = [c[1] if isinstance(c, (tuple, list)) else c for c in models.choices]
    assert titles[0] == "None" and any(t.startswith(f"{CANNY_FILE} [") for t in titles)
    assert unit_prefix("txt2img", 0, 1) == "txt2img_controlnet_ControlNet"  # one unit: the extension's id, no tabs


def test_every_preprocessor_slider_name_is_translated(ui):
    """The sliders take the chosen preprocessor's names after the page is built: each must be in both files."""
    pre = ui.service.engine.controlnets.preprocessors
    for language in ("en", "zh_CN"):
        strings = json.loads((localization.PACKAGE_DIR / f"{language}.json").read_text(encoding="utf-8"))
        names = {s.name for p in pre.sorted() for s in p.sliders()}
        assert names - set(strings) == set(), language
        assert {*ui.txt2img.controlnet.control_types()} - set(strings) == set(), language
    zh = localization.load("zh_CN")
    assert (zh["Enable"], zh["Preprocessor"], zh["Control Weight"], zh["Starting Control Step"]) == \
        ("启用", "预处理器", "控制权重", "引导介入时机")
    assert (zh["Pixel Perfect"], zh["Low VRAM"], zh["Allow Preview"], zh["Control Mode"]) == \
        ("完美像素模式", "低显存模式", "允许预览", "控制模式")


def test_the_tabs_values_become_alwayson_scripts(ui):
    tab = ui.txt2img
    values = values_of(tab)
    assert "ControlNet" not in tab.form.request(values, {}).alwayson_scripts  # all units off: no script
    picture = square()
    values.update({unit_key(1, "enabled"): True, unit_key(1, "image"): editor(picture, (0, 0, 8, 64)),
                   unit_key(1, "module"): "canny", unit_key(1, "model"): f"{CANNY_FILE} [x]",
                   unit_key(1, "weight"): 0.55, unit_key(1, "guidance_start"): 0.2, unit_key(1, "guidance_end"): 0.9,
                   unit_key(1, "processor_res"): 256.0, unit_key(1, "threshold_a"): 50.0,
                   unit_key(1, "threshold_b"): 150.0, unit_key(1, "control_mode"): "ControlNet is more important",
                   unit_key(1, "resize_mode"): "Resize and Fill", unit_key(1, "hr_option"): "Low res only",
                   unit_key(1, "low_vram"): True, unit_key(1, "pixel_perfect"): True,
                   unit_key(2, "image"): editor(picture)})  # unit 2: a picture but off
    req = tab.form.request(values, {})
    units = req.alwayson_scripts["ControlNet"]["units"]
    assert len(units) == 3 and [u["enabled"] for u in units] == [False, True, False]
    u = units[1]
    expected = cn.ControlUnit(enabled=True, module="canny", model=f"{CANNY_FILE} [x]", weight=0.55,
                              guidance_start=0.2, guidance_end=0.9, processor_res=256, threshold_a=50.0,
                              threshold_b=150.0, control_mode="ControlNet is more important",
                              resize_mode="Resize and Fill", hr_option="Low res only", low_vram=True,
                              pixel_perfect=True).to_dict()
    assert {k: v for k, v in u.items() if k not in ("image", "mask")} == \
        {k: v for k, v in expected.items() if k not in ("image", "mask")}
    assert type(u["processor_res"]) is int
    assert np.array_equal(decoded(u["image"]), np.asarray(picture))  # the upload, as base64 PNG
    mask = decoded(u["mask"])[:, :, 0]
    assert mask[:, :8].min() == 255 and mask[:, 8:].max() == 0  # white where the brush painted
    assert units[2]["image"] is None and units[0]["image"] is None  # an off unit's picture is not sent
    parsed = ui.service.studio.catalog.parse("ControlNet", req.alwayson_scripts["ControlNet"], "txt2img", alwayson=True)
    assert parsed["units"] == units  # the script's own parse takes what the accordion made as it is
    # a preprocessor without sliders sends -1 (its defaults) instead of the hidden sliders' stale values
    values.update({unit_key(1, "module"): "invert", unit_key(1, "pixel_perfect"): False})
    u = tab.form.request(values, {}).alwayson_scripts["ControlNet"]["units"][1]
    assert (u["processor_res"], u["threshold_a"], u["threshold_b"]) == (-1, -1.0, -1.0)
    # a model-free preprocessor sends no model; a label the extension shows selects its module
    values.update({unit_key(1, "module"): "reference_only", unit_key(1, "threshold_a"): 0.7})
    u = tab.form.request(values, {}).alwayson_scripts["ControlNet"]["units"][1]
    assert (u["module"], u["model"], u["threshold_a"]) == ("reference_only", "None", 0.7)
    values[unit_key(1, "module")] = "t2ia_color_grid"
    assert tab.form.request(values, {}).alwayson_scripts["ControlNet"]["units"][1]["module"] == "color"
    values[unit_key(1, "weight")] = 2.5
    with pytest.raises(RequestError, match=r"unit 1\.weight"):
        tab.form.request(values, {})
    # PuLID Mode: sent as chosen, and shown only while the model is a PuLID one (the extension's rule)
    values.update({unit_key(1, "weight"): 1.0, unit_key(1, "module"): "ip-adapter_pulid",
                   unit_key(1, "model"): "ip-adapter_pulid_sdxl_fp16 [x]", unit_key(1, "pulid_mode"): "Extremely style"})
    assert tab.form.request(values, {}).alwayson_scripts["ControlNet"]["units"][1]["pulid_mode"] == "Extremely style"
    pulid = blocks_by_id(ui)["txt2img_controlnet_ControlNet-1_controlnet_pulid_mode_radio"]
    assert pulid.visible is False and pulid.value == "Fidelity"
    from sdstudio.ui.controlnet import is_pulid
    assert is_pulid("ip-adapter_PuLID_sdxl_fp16 [abc]") and not is_pulid("ip-adapter_sd15") and not is_pulid(None)


def test_the_batch_tab_sends_a_folder_and_is_refused_when_shared(ui, tmp_path):
    blocks = {getattr(b, "elem_id", None): b for b in ui.page.blocks.values()}
    p = "img2img_controlnet_ControlNet-1"
    assert blocks[f"{p}_batch_image_dir"].label == "Input Directory"
    loop = blocks[f"{p}_controlnet_automatically_send_generated_images_checkbox"]
    assert loop.label.startswith("[Batch Loopback]") and loop.visible is False  # shown on the Batch tab only
    tab = ui.txt2img
    values = values_of(tab)
    values.update({unit_key(0, "enabled"): True, unit_key(0, "module"): "canny", unit_key(0, "input_mode"): "batch",
                   unit_key(0, "batch_images"): f" {tmp_path} ", unit_key(0, "loopback"): True})
    unit = tab.form.request(values, {}).alwayson_scripts["ControlNet"]["units"][0]
    assert (unit["input_mode"], unit["batch_images"], unit["loopback"], unit["image"]) == \
        ("batch", str(tmp_path), True, None)
    ui.allow_folders = False  # served with --listen: the page may not name the server's folders
    try:
        with pytest.raises(RequestError, match="only available when the server is not shared"):
            tab.form.request(values, {})
    finally:
        ui.allow_folders = True


def test_strokes_on_an_empty_canvas_are_the_image():
    strokes = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    strokes.paste((0, 0, 0, 255), (10, 0, 12, 32))
    image, mask = image_and_mask({"background": None, "layers": [strokes], "composite": strokes})
    arr = np.asarray(image)
    assert mask is None and arr[:, 10:12].max() == 0 and arr[:, :10].min() == 255  # black lines on white paper
    assert image_and_mask(None) == (None, None)
    assert image_and_mask({"background": None, "layers": [], "composite": None}) == (None, None)


def test_a_pasted_infotext_fills_the_unit_but_not_its_image(ui):
    tab = ui.txt2img
    filled = dict(zip([*tab.form.names, "clip_skip", "extra"], tab.fill_from_text(PASTED)))
    assert filled[unit_key(0, "enabled")] is True
    assert plain(filled[unit_key(0, "module")]) == "canny"
    assert plain(filled[unit_key(0, "model")]) == "control_v11p_sd15_canny [0123abcd]"
    assert (filled[unit_key(0, "weight")], filled[unit_key(0, "guidance_start")],
            filled[unit_key(0, "guidance_end")]) == (0.6, 0.1, 0.8)
    assert (filled[unit_key(0, "resize_mode")], filled[unit_key(0, "control_mode")]) == \
        ("Just Resize", "My prompt is more important")
    low, high = filled[unit_key(0, "threshold_a")], filled[unit_key(0, "threshold_b")]
    assert (low.value, low.label, low.minimum, low.maximum) == (90.0, "Low Threshold", 1, 255)  # canny's sliders
    assert (high.value, high.label) == (180.0, "High Threshold")
    assert filled[unit_key(0, "processor_res")].value == 384
    assert filled[unit_key(0, "type_filter")] == "All"
    assert isinstance(filled[unit_key(0, "image")], type(gr.skip()))  # the picture is left as it is
    assert filled[unit_key(1, "enabled")] is False and filled[unit_key(2, "enabled")] is False
    # read back: the same unit (the image aside), numbered as the infotext numbers it
    values = {**values_of(tab), **{k: plain(v) for k, v in filled.items()
                                   if k.startswith("controlnet:") and v != gr.skip()}}
    values[unit_key(0, "image")] = editor(square())
    unit = tab.form.request(values, {}).alwayson_scripts["ControlNet"]["units"][0]
    pasted = cn.unit_from_infotext(infotext.parse(PASTED)["ControlNet 0"])
    assert {k: v for k, v in unit.items() if k not in ("image", "mask")} == \
        {k: v for k, v in pasted.to_dict().items() if k not in ("image", "mask")}
    # an infotext without ControlNet switches the units off
    plain_text = "x\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64"
    filled = dict(zip(tab.form.names, tab.fill_from_text(plain_text)))
    assert [filled[unit_key(i, "enabled")] for i in range(3)] == [False, False, False]


def test_sliders_follow_the_preprocessor_and_the_filter_narrows_the_lists(ui):
    acc = ui.txt2img.controlnet
    res, a, b, model = acc.module_picked("canny", False)
    assert (a.label, a.value, a.minimum, a.maximum, b.label, b.value) == ("Low Threshold", 100, 1, 255,
                                                                          "High Threshold", 200)
    assert res.visible is True and res.label == "Resolution" and model.visible is True
    res, a, b, _ = acc.module_picked("canny", True)
    assert res.visible is False and a.visible is True  # pixel perfect: no resolution slider
    res, a, b, _ = acc.module_picked("invert", False)
    assert (res.visible, a.visible, b.visible) == (False, False, False)  # no sliders at all
    *_, model = acc.module_picked("reference_only", False)
    assert model.visible is False  # a model-free preprocessor hides the model
    module, model, _res, low, _high, union = acc.type_picked("Canny", False)
    assert union == "Hard Edge"  # the union control type the filter stands for, as the extension sets it
    names = [c[1] for c in module.choices]
    assert names[0] == "none" and "canny" in names and "invert" in names and "reference_only" not in names
    assert module.value == "canny" and low.label == "Low Threshold"
    assert model.choices[0][0] == "None" and [c[0] for c in model.choices[1:]] == \
        [t for t in acc.model_titles() if "canny" in t]
    assert model.value.startswith(CANNY_FILE)  # the type's default model
    module, model, *_, union = acc.type_picked("All", False)
    assert union == "Unknown"
    assert len(module.choices) == len(acc.preprocessors.sorted()) and len(model.choices) == 3


def test_the_preview_runs_the_preprocessor(ui):
    acc = ui.txt2img.controlnet
    detected = acc.preview(editor(square()), "canny", 64, 100, 200, False, "Crop and Resize", 64, 64)
    assert detected.shape == (64, 64, 3)
    edges = detected[:, :, 0] > 127
    assert edges[15:17, 20:44].any(axis=0).all() and edges[20:44, 15:17].any(axis=1).all()  # the outline
    assert not edges[20:44, 20:44].any() and not edges[:12].any()  # nothing inside or around it
    inpaint = acc.preview(editor(square(), (0, 0, 32, 64)), "inpaint_only", 512, 0, 0, False, "Just Resize", 64, 64)
    assert inpaint.shape == (64, 64, 4) and np.array_equal(inpaint[:, :, :3], np.asarray(square()))
    assert inpaint[:, :32, 3].max() < 200 and inpaint[:, 32:, 3].min() == 255  # the painted half shown see-through
    with pytest.raises(RequestError, match="upload a control image"):
        acc.preview(None, "canny", 512, 100, 200, False, "Just Resize", 64, 64)
    with pytest.raises(RequestError, match="needs a mask"):
        acc.preview(editor(square()), "inpaint_only", 512, 0, 0, False, "Just Resize", 64, 64)


def test_generate_from_the_tabs_values_runs_the_unit(ui, service):
    """The accordion's request through the queue: the engine reads the base64 image, the infotext names the
    unit, the detected map comes back beside the image."""
    tab = ui.txt2img
    values = {**values_of(tab), "prompt": "a square", "negative_prompt": "", "steps": 2, "width": 64, "height": 64,
              unit_key(0, "enabled"): True, unit_key(0, "image"): editor(square()), unit_key(0, "module"): "canny",
              unit_key(0, "model"): acc_title(ui), unit_key(0, "processor_res"): 64.0,
              unit_key(0, "threshold_a"): 100.0, unit_key(0, "threshold_b"): 200.0}
    [job] = tab.jobs_for(values, [])
    done = finished(service, service.submit("ui:test", job))
    assert done is not None and done.status == "done", done and done.error
    text = done.result["images"][0]["infotext"]
    params = infotext.parse(text)
    unit = cn.unit_from_infotext(params["ControlNet 0"])
    assert (unit.module, unit.model, unit.processor_res) == ("canny", acc_title(ui), 64)
    shown = gallery_entries(done.result)  # the image, then its detected map (with the image's parameters)
    assert [e["path"] for e in shown] == [done.result["images"][0]["path"], done.result["extras"][0]["path"]]
    assert shown[1]["infotext"] == text and Image.open(shown[1]["path"]).size == (64, 64)
    assert len(gallery_entries(done.result, detected_maps=False)) == 1  # "Do not append detectmap to output"


def acc_title(ui) -> str:
    return next(t for t in ui.txt2img.controlnet.model_titles() if t.startswith(CANNY_FILE))


# ---- in a real browser ---------------------------------------------------------------------------------
def _chromium():
    try:
        from sdstudio.testing.headless import chromium_path
    except ImportError:
        return None
    return chromium_path()


@pytest.fixture(scope="module")
def server(data_root, free_port, tmp_path_factory):
    """``sdstudio serve --api`` on the data dir with the tiny ControlNet (as test_ui_browser starts it)."""
    hold = ["--hold-dir", str(tmp_path_factory.mktemp("cn-hold")), "--hold-prompt", "(never held)"]
    with held_server(data_root, free_port(), hold) as url:
        yield url


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (./test.sh installs it)")
@pytest.mark.xdist_group("browser-controlnet")  # its own server: runs beside test_ui_browser
def test_controlnet_accordion_in_the_browser(server, tmp_path):
    import playwright.sync_api

    from sdstudio.testing.headless import launch

    picture = tmp_path / "square.png"
    square(128, 32).save(picture)
    p = "txt2img_controlnet_ControlNet-0"
    with playwright.sync_api.sync_playwright() as pw:
        browser = launch(pw, _chromium())
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            SHOTS.mkdir(parents=True, exist_ok=True)
            # paste: an infotext's ControlNet 0 fills unit 0
            page.goto(server)
            page.wait_for_selector("#txt2img_generate", timeout=60_000)
            page.locator("#txt2img_prompt textarea").fill(PASTED)
            page.click("#paste")
            page.click("#txt2img_script_controlnet .label-wrap")
            page.wait_for_function(f"document.querySelector('#{p}_controlnet_enable_checkbox input')?.checked",
                                   timeout=20_000)
            assert page.locator(f"#{p}_tab-button").inner_text().strip() == "ControlNet Unit 0"
            assert page.locator(f"#{p}_controlnet_preprocessor_dropdown input").input_value() == "canny"
            assert page.locator(f"#{p}_controlnet_control_weight_slider input[type=number]").input_value() == "0.6"
            page.wait_for_selector(f"#{p}_controlnet_threshold_A_slider:has-text('Low Threshold')", timeout=20_000)
            assert page.locator(f"#{p}_controlnet_threshold_A_slider input[type=number]").input_value() == "90"
            page.locator("#txt2img_script_controlnet").screenshot(path=str(SHOTS / "txt2img-controlnet-pasted.png"))
            # in Simplified Chinese (the page's language setting), the extension's terms
            _set_options(server, {"localization": "zh_CN"})
            try:
                page.goto(server)
                page.wait_for_function("document.querySelector('#txt2img_generate')?.innerText.trim() === '生成'",
                                       timeout=60_000)
                page.click("#txt2img_script_controlnet .label-wrap")
                page.wait_for_selector(f"#{p}_controlnet_enable_checkbox:has-text('启用')", timeout=20_000)
                for elem, text in (("controlnet_preprocessor_dropdown", "预处理器"),
                                   ("controlnet_control_weight_slider", "控制权重"),
                                   ("controlnet_start_control_step_slider", "引导介入时机"),
                                   ("controlnet_pixel_perfect_checkbox", "完美像素模式"),
                                   ("controlnet_low_vram_checkbox", "低显存模式"),
                                   ("controlnet_preprocessor_preview_checkbox", "允许预览")):
                    page.wait_for_selector(f"#{p}_{elem}:has-text('{text}')", timeout=20_000)
                assert "ControlNet 单元 1" in page.inner_text("#txt2img_controlnet_tabs")
                page.locator("#txt2img_script_controlnet").screenshot(path=str(SHOTS / "txt2img-controlnet-zh_CN.png"))
            finally:
                _set_options(server, {"localization": "None"})
            # a fresh page: upload, the quick filter, the preview
            page.goto(server)
            page.wait_for_selector("#txt2img_generate", timeout=60_000)
            page.click("#txt2img_script_controlnet .label-wrap")
            page.wait_for_selector(f"#{p}_controlnet_enable_checkbox", state="visible", timeout=20_000)
            page.locator(f"#{p}_input_image input[type=file]").set_input_files(str(picture))
            page.wait_for_selector(f"#{p}_input_image canvas", timeout=20_000)
            page.locator(f"#{p}_controlnet_enable_checkbox input[type=checkbox]").check()
            # Canny picks canny and the canny model, and the sliders take canny's names
            page.locator(f"#{p}_controlnet_type_filter_radio label:has-text('Canny')").first.click()
            page.wait_for_function(f"document.querySelector('#{p}_controlnet_preprocessor_dropdown input')"
                                   ".value === 'canny'", timeout=20_000)
            page.wait_for_selector(f"#{p}_controlnet_threshold_A_slider:has-text('Low Threshold')", timeout=20_000)
            model = page.locator(f"#{p}_controlnet_model_dropdown input").input_value()
            assert model.startswith(CANNY_FILE), model
            page.locator(f"#{p}_controlnet_preprocessor_preview_checkbox input[type=checkbox]").check()
            page.click(f"#{p}_controlnet_trigger_preprocessor")
            page.wait_for_selector(f"#{p}_generated_image img", timeout=60_000)
            page.locator("#txt2img_script_controlnet").screenshot(path=str(SHOTS / "txt2img-controlnet.png"))
            hr_option = page.locator(f"#{p}_controlnet_hr_option_radio")
            assert not hr_option.is_visible()  # shown only with Hires. fix on, as the extension shows it
            page.locator("#txt2img_enable_hr input[type=checkbox]").check()
            hr_option.wait_for(state="visible", timeout=20_000)
            page.locator("#txt2img_enable_hr input[type=checkbox]").uncheck()
            hr_option.wait_for(state="hidden", timeout=20_000)
            # generate with the unit: its infotext comes back
            page.locator("#txt2img_prompt textarea").fill("a controlled square")
            for name, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 2)):
                box = page.locator(f"#{name} input[type=number]")
                box.fill(str(value))
                box.press("Enter")
            page.click("#txt2img_generate")
            info = page.locator("#txt2img_html_info textarea")
            deadline = time.time() + 180
            while "ControlNet 0" not in info.input_value():
                errors = page.locator(".toast-body").all_inner_texts()
                assert not errors, f"the job failed: {errors}"
                assert time.time() < deadline, info.input_value()
                time.sleep(0.2)
            assert "Module: canny" in info.input_value() and f"Model: {CANNY_FILE} [" in info.input_value()
            # the Batch tab: a folder of two control pictures gives two images
            folder = tmp_path / "batch"
            folder.mkdir()
            square(64, 16).save(folder / "one.png")
            square(64, 40).save(folder / "two.png")
            loopback = page.locator(f"#{p}_controlnet_automatically_send_generated_images_checkbox")
            assert not loopback.is_visible()
            page.locator(f"#{p}_tab .cnet-input-tabs button[role=tab]:has-text('Batch')").click()
            page.locator(f"#{p}_batch_image_dir textarea").fill(str(folder))
            loopback.wait_for(state="visible", timeout=20_000)
            page.locator("#txt2img_script_controlnet").screenshot(path=str(SHOTS / "txt2img-controlnet-batch.png"))
            before = page.locator("#txt2img_gallery img").count()
            page.click("#txt2img_generate")
            deadline = time.time() + 180
            while page.locator("#txt2img_gallery img").count() < 2 or info.input_value().count("ControlNet 0") != 1 \
                    or page.locator("#txt2img_gallery img").count() == before:
                errors = page.locator(".toast-body").all_inner_texts()
                assert not errors, f"the job failed: {errors}"
                assert time.time() < deadline, (page.locator("#txt2img_gallery img").count(), info.input_value())
                time.sleep(0.2)
        finally:
            browser.close()


def _set_options(server: str, values: dict) -> None:
    body = json.dumps(values).encode()
    urllib.request.urlopen(urllib.request.Request(server + "/sdapi/v1/options", data=body,
                                                  headers={"Content-Type": "application/json"}), timeout=10)
