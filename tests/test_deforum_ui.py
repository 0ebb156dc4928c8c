"""The Deforum tab: it builds with its sub-tabs in both languages, a settings file goes in and comes back out
whole (unknown, ControlNet and hybrid keys included), a bad value is refused naming its key, and Generate
queues a real run on the demo model, showing "Frame i of N", the current frame, then the video."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from sdstudio.core import deforum as spec
from sdstudio.core.paths import Paths
from sdstudio.core.settings import Settings
from sdstudio.engine import video
from sdstudio.engine.generate import Engine
from sdstudio.service.jobs import JobService
from sdstudio.service.queue import SQLiteJobQueue
from sdstudio.ui import localization
from sdstudio.ui.app import StudioUI
from sdstudio.ui.progress import snapshot

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"
TINY = {"max_frames": 3, "diffusion_cadence": 1, "W": 128, "H": 128, "steps": 3, "seed": 3, "prompts": {"0": "a red circle"},
        "fps": 10, "zoom": "0:(1.05)", "cn_1_enabled": False, "cn_1_weight": "0:(0.5)", "hybrid_composite": "None",
        "hybrid_comp_alpha_schedule": "0:(0.3)", "a_key_from_the_future": [1, 2]}
SUB_TABS = ["deforum_run_tab", "deforum_keyframes_tab", "deforum_prompts_tab", "deforum_init_tab",
            "deforum_controlnet_tab", "deforum_hybrid_tab", "deforum_output_tab"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("deforum-ui")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    os.link(DEMO, root / "models" / "Stable-diffusion" / DEMO.name)
    service = JobService(Engine(Paths(root)), SQLiteJobQueue(root / "jobs.sqlite3")).start()
    title = service.engine.registry.checkpoint(None).title
    studio_ui = StudioUI(service, Settings(root / "config.json", {"sd_model_checkpoint": title}))
    studio_ui.page = studio_ui.build()
    yield studio_ui
    service.stop()


@pytest.fixture
def settings_file(tmp_path):
    path = tmp_path / "tiny_settings.txt"
    path.write_text(json.dumps(TINY), encoding="utf-8")
    return path


def test_the_tab_builds_with_its_sub_tabs_in_both_languages(ui):
    ids = {getattr(b, "elem_id", None) for b in ui.page.blocks.values()}
    assert {"tab_deforum", "deforum_generate", "deforum_load_settings", "deforum_save_settings", "deforum_video",
            "deforum_current_frame", "deforum_progress", *SUB_TABS} <= ids
    strings = localization.ui_strings(ui.page)
    for language in ("en", "zh_CN"):
        shipped = json.loads((localization.PACKAGE_DIR / f"{language}.json").read_text(encoding="utf-8"))
        assert not sorted(strings - set(shipped)), language
    zh = json.loads((localization.PACKAGE_DIR / "zh_CN.json").read_text(encoding="utf-8"))
    assert zh["Keyframes"] == "关键帧" and zh["Load settings"] == "载入设置" and zh["Frame"] == "帧"


def test_a_settings_file_goes_in_and_comes_back_whole(ui, settings_file):
    tab = ui.deforum
    values = tab.load_file(str(settings_file))
    *inputs, notes = values
    assert "a_key_from_the_future" in notes  # the file's notes are shown
    shown = dict(zip(tab.controls, inputs[3:], strict=True))
    assert shown["zoom"] == "0:(1.05)" and shown["max_frames"] == 3 and json.loads(shown["prompts"]) == TINY["prompts"]
    assert json.loads(inputs[1])["cn_1_weight"] == "0:(0.5)"  # the ControlNet sub-tab's JSON
    assert json.loads(inputs[2])["hybrid_comp_alpha_schedule"] == "0:(0.3)"
    saved = spec.load_settings(Path(tab.save_file(*inputs)))
    assert saved.to_dict() == spec.load_settings(settings_file).to_dict()  # unknown keys and all
    inputs[3 + list(tab.controls).index("zoom")] = "0:(1.2)"  # the user edits the zoom schedule
    hybrid = json.loads(inputs[2])
    inputs[2] = json.dumps({**hybrid, "hybrid_comp_alpha_schedule": "0:(0.9)"})
    saved = spec.load_settings(Path(tab.save_file(*inputs)))
    assert saved["zoom"] == "0:(1.2)" and saved["hybrid_comp_alpha_schedule"] == "0:(0.9)"
    inputs[3 + list(tab.controls).index("zoom")] = "0:(1.0), 10:(foo)"
    with pytest.raises(gr.Error, match="zoom"):
        tab.save_file(*inputs)
    inputs[1] = "{not json"
    with pytest.raises(gr.Error, match="ControlNet units"):
        tab.save_file(*inputs)


def test_generate_queues_a_run_and_shows_frames_then_the_video(ui, settings_file):
    tab = ui.deforum
    *inputs, _ = tab.load_file(str(settings_file))
    run = tab.run("ui:deforum-test", 17, "ultrafast", *inputs)
    live, *_ = next(run)  # the progress area the page's script polls: no gradio update until the run ends
    job_id = re.search(r'class="sd-live" data-job="([^"]+)"', live).group(1)
    assert 'class="sd-live-preview"' in live
    bars, pictures = [], []
    while not (state := snapshot(ui.service, job_id))["done"]:  # what /sdstudio/progress/JOB answers
        bars.append(state["html"])
        if state["preview"] is not None:
            pictures.append(ui.service.preview_image(None, job_id))  # what .../preview sends
        time.sleep(0.05)
    assert any("<span>Frame</span>" in b and "<span>of</span> 3" in b for b in bars), bars
    # the frame just made, while the run goes on
    assert pictures and isinstance(pictures[-1], Image.Image) and pictures[-1].size == (128, 128)
    updates = list(run)
    assert len(updates) == 1
    bar, last, mp4, info = updates[-1]
    assert bar == "" and "<span>Done</span>: 3 <span>frames</span>" in info
    assert Path(last).name.endswith("_000000002.png") and Path(mp4).parent == Path(last).parent
    probe = video.probe(mp4)
    assert (probe.frames, probe.fps, probe.width, probe.height) == (3, 10.0, 128, 128)
    job = ui.service.queue.list(client="ui:deforum-test")[0]  # an ordinary queue job of that window
    assert job.kind == "deforum" and job.status == "done" and job.request["model"] == ui.settings["sd_model_checkpoint"]
    inputs[3 + list(tab.controls).index("sampler")] = "No such sampler"
    with pytest.raises(gr.Error, match="sampler"):
        next(tab.run("ui:deforum-test", 17, "ultrafast", *inputs))


# ---- in a real browser ---------------------------------------------------------------------------------
def _chromium():
    try:
        from sdstudio.testing.headless import chromium_path
    except ImportError:
        return None
    return chromium_path()


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (./test.sh installs it)")
@pytest.mark.xdist_group("browser-deforum")  # its own server: runs beside test_ui_browser
def test_the_tab_in_a_browser_loads_a_file_and_shows_the_video(tmp_path, free_port, settings_file):
    import playwright.sync_api
    from step_hold import held_server

    from sdstudio.testing.headless import launch

    root = tmp_path / "data"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    os.link(DEMO, root / "models" / "Stable-diffusion" / DEMO.name)
    shots = Path(os.environ.get("SDSTUDIO_ARTIFACTS", ROOT / "artifacts")) / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    hold = ["--hold-dir", str(tmp_path), "--hold-prompt", "(never held)"]
    with held_server(root, free_port(), hold) as url, playwright.sync_api.sync_playwright() as p:
        browser = launch(p, _chromium())
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
            page.goto(url)
            page.wait_for_selector("#tab_deforum-button, button:has-text('Deforum')", timeout=60_000)
            page.get_by_role("tab", name="Deforum").click()
            with page.expect_file_chooser() as chooser:
                page.locator("#deforum_load_settings").click()
            chooser.value.set_files(str(settings_file))
            page.wait_for_function("() => document.querySelector('#deforum_settings_notes')?.innerText"
                                   ".includes('a_key_from_the_future')", timeout=30_000)
            page.get_by_role("tab", name="Keyframes").click()
            assert page.locator("#deforum_max_frames input[type=number]").input_value() == "3"
            # what the progress area shows while the run goes on (the page's script swaps it in)
            page.evaluate("""() => { window.seenBars = []; new MutationObserver(() => window.seenBars.push(
                document.querySelector('#deforum_progress')?.innerText || '')).observe(document.querySelector(
                '#deforum_progress'), {childList: true, subtree: true, characterData: true}); }""")
            page.locator("#deforum_generate").click()
            page.wait_for_selector("#deforum_video video", timeout=120_000)
            assert any("Frame" in text and "of 3" in text for text in page.evaluate("window.seenBars"))
            page.wait_for_function("() => document.querySelector('#deforum_info')?.innerText.includes('Done')",
                                   timeout=30_000)
            assert "3" in page.locator("#deforum_info").inner_text()
            assert page.locator("#deforum_current_frame img").count() == 1
            page.screenshot(path=str(shots / "deforum.png"), full_page=True)
        finally:
            browser.close()
    assert len(list((root / "outputs" / "img2img-images").glob("Deforum_*/*.mp4"))) == 1
