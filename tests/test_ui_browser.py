"""The web UI in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

A server on the tiny model runs in its own process, built from ``serve`` flags as users start it (by
``step_hold.py``, which can hold one prompt's job at a known step). Each test drives the page as a user
would and checks what the page shows; screenshots of each tab go to ``artifacts/ui/`` (look at them: they
are the test run's pictures of the UI). Playwright is a test dependency (missing, the file fails to import);
Chromium is a system package (``./test.sh`` installs it with apt-get as root): missing, the tests skip,
saying why.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import playwright.sync_api
import pytest
from step_hold import held_server, wait_for_file

from sdstudio.testing.headless import chromium_path, launch

CHROMIUM = chromium_path()
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (./test.sh installs it)"),
              pytest.mark.xdist_group("browser")]

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("SDSTUDIO_ARTIFACTS", ROOT / "artifacts")) / "ui"
FIRST = "first window: a red circle"  # the server holds this prompt's job at its first step (step_hold.py)
INFOTEXT = ("a pasted prompt\nNegative prompt: pasted negative\nSteps: 17, Sampler: Euler a, Schedule type: Karras, "
            "CFG scale: 6.5, Seed: 42, Size: 96x64, Clip skip: 2")


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory):
    """Where the server says it holds the job of the prompt ``FIRST`` (``held``) and waits for ``release``."""
    return tmp_path_factory.mktemp("hold")


@pytest.fixture(scope="module")
def server(make_data_root, free_port, hold_dir):
    """``sdstudio serve --api`` (as create_app builds it from those flags, run by step_hold.py)."""
    root = make_data_root("ui-browser")
    import shutil  # the example plug-in, as a user drops it into extensions/ (test_a_plugins_script_...)

    shutil.copytree(ROOT / "examples" / "plugins" / "sdstudio-vignette" / "sdstudio_vignette",
                    root / "extensions" / "sdstudio_vignette")
    with held_server(root, free_port(), ["--hold-dir", str(hold_dir), "--hold-at", "0:1", "--hold-prompt", FIRST]) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_api.sync_playwright() as p:
        b = launch(p, CHROMIUM)
        yield b
        b.close()


def open_page(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#txt2img_generate", timeout=60_000)
    return page


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def generate(page, tab: str, prompt: str, steps: int = 6, size: int = 64, timeout: float = 120,
             running_shot: str | None = None):
    """Type, click Generate, and watch: returns the progress seen ((state, text, a live preview is shown)
    triples) and the infotext shown. ``running_shot``: a screenshot's name, taken once the preview shows."""
    page.locator(f"#{tab}_prompt textarea").fill(prompt)
    set_number(page, f"{tab}_width", size)
    set_number(page, f"{tab}_height", size)
    set_number(page, f"{tab}_steps", steps)
    before = page.locator(f"#{tab}_gallery img").count()
    page.click(f"#{tab}_generate")
    seen, deadline = [], time.time() + timeout
    info = page.locator(f"#{tab}_html_info textarea")
    while time.time() < deadline:
        bar = page.evaluate(f"(() => {{ const b = document.querySelector('#{tab}_progressbar .sd-progress');"
                            f" const p = document.querySelector('#{tab}_preview img');"
                            " return b ? [b.dataset.state, b.innerText, !!(p && p.complete && p.naturalWidth)]"
                            " : null; })()")  # one read: the bar may go
        if bar:
            seen.append(tuple(bar))
            if running_shot and bar[2]:
                shot(page, running_shot)
                running_shot = None
        if page.locator(f"#{tab}_gallery img").count() > before and prompt in info.input_value():
            return seen, info.input_value()
        time.sleep(0.05)
    raise AssertionError(f"no image after {timeout} s; progress seen: {seen[-5:]}")


def test_generate_shows_progress_then_the_image(server, browser):
    page = open_page(browser, server)
    shot(page, "txt2img-empty")
    # (a job long enough to be seen running: the page polls its progress every 250 ms)
    seen, info = generate(page, "txt2img", "a red circle on a blue background", steps=30, size=128,
                          running_shot="txt2img-running")
    assert any(state == "running" and "Step" in text and "%" in text for state, text, _ in seen), seen[:10]
    assert any(state == "running" and preview for state, _, preview in seen), seen[:10]  # the live preview
    steps = [int(text.split("Step")[1].split("/")[0]) for state, text, _ in seen if state == "running"]
    assert steps == sorted(steps) and len(set(steps)) > 1, steps  # the bar moved forwards
    assert "Steps: 30" in info and "Size: 128x128" in info and "Model: tiny-sd1" in info
    assert page.inner_text("#txt2img_token_counter").strip() == "7/75"
    shot(page, "txt2img")
    # send to img2img: the picture and its parameters arrive, the img2img tab opens
    page.click("#txt2img_send_to_img2img")
    page.wait_for_selector("#img2img_image img", timeout=30_000)
    assert page.locator("#img2img_prompt textarea").input_value() == "a red circle on a blue background"
    assert page.locator("#img2img_steps input[type=number]").input_value() == "30"
    shot(page, "img2img")
    _, info2 = generate(page, "img2img", "a green square", steps=4, size=64)
    assert "Denoising strength: 0.75" in info2 and "Size: 64x64" in info2


def test_a_plugins_always_on_script_from_the_page(server, browser):
    """The example plug-in's accordion (made from its declaration) switches its script on for the job; the
    Extensions tab lists it."""
    page = open_page(browser, server)
    page.click("#txt2img_script_vignette .label-wrap")
    page.locator("#txt2img_script_vignette_enabled input[type=checkbox]").check()
    set_number(page, "txt2img_script_vignette_strength", 0.9)
    shot(page, "txt2img-vignette")
    _, info = generate(page, "txt2img", "a plug-in's vignette", steps=3)
    assert "Vignette: True" in info and "Vignette strength: 0.9" in info and "Vignette radius: 0.5" in info
    page.get_by_role("tab", name="Extensions").click()
    table = page.locator("#extensions_installed_html")
    table.wait_for()
    assert "sdstudio_vignette" in table.inner_text() and "loaded" in table.inner_text()
    shot(page, "extensions")


def test_paste_fills_the_fields(server, browser):
    page = open_page(browser, server)
    page.locator("#txt2img_prompt textarea").fill(INFOTEXT)
    page.click("#paste")
    page.wait_for_function("document.querySelector('#txt2img_steps input[type=number]').value === '17'", timeout=20_000)
    assert page.locator("#txt2img_prompt textarea").input_value() == "a pasted prompt"
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "pasted negative"
    assert page.locator("#txt2img_seed input").input_value() == "42"
    assert page.locator("#txt2img_width input[type=number]").input_value() == "96"
    assert page.locator("#txt2img_sampling input").input_value() == "Euler a"
    assert page.locator("#txt2img_scheduler input").input_value() == "Karras"
    assert page.locator("#setting_CLIP_stop_at_last_layers input[type=number]").input_value() == "2"


def test_tabs_and_a_checkpoint_card(server, browser):
    page = open_page(browser, server)
    page.click("#txt2img_extra_networks_accordion button.label-wrap", no_wait_after=True)
    card = page.locator("#txt2img_extra_networks .sd-card[data-kind=Checkpoints]").first
    card.wait_for(timeout=20_000)
    card.click(no_wait_after=True)  # switches the checkpoint: a load job, its state shown beside the dropdown
    page.wait_for_selector("#sd_checkpoint_status:has-text('Model loaded')", timeout=60_000)
    shot(page, "extra-networks")
    for tab in ("img2img", "extras", "pnginfo", "settings"):
        page.click(f"#tab_{tab}-button")
        page.wait_for_selector(f"#tab_{tab}", state="visible", timeout=20_000)
        shot(page, tab)


def test_switch_language_in_settings(server, browser):
    page = open_page(browser, server)
    try:
        page.click("#tab_settings-button")
        choose(page, "setting_localization", "zh_CN")
        page.click("#settings_submit")
        page.wait_for_selector("#settings_result:has-text('localization')", timeout=20_000)
        page.click("#settings_restart_gradio")
        page.wait_for_function("document.querySelector('#txt2img_generate')?.innerText.trim() === '生成'",
                               timeout=60_000)
        assert page.locator("#txt2img_prompt textarea").get_attribute("placeholder").startswith("提示词")
        assert "文生图" in page.inner_text("#tabs") and "图生图" in page.inner_text("#tabs")
        assert page.locator("#txt2img_prompt textarea").input_value() == ""  # the user's text is never translated
        # names that translate to themselves ("Lora") must not set off endless re-translation (a hung page)
        page.click("#txt2img_extra_networks_accordion button.label-wrap", no_wait_after=True)
        page.wait_for_selector("#txt2img_extra_networks button:has-text('Lora')", timeout=20_000)
        assert page.evaluate("1 + 1") == 2  # the page still answers
        shot(page, "txt2img-zh_CN")
        # long enough to be seen running (30 steps at 128² took under one 250 ms poll on a warm model)
        seen, _info = generate(page, "txt2img", "a red circle", steps=150, size=128)
        assert any("步" in text for state, text, _ in seen if state == "running"), seen[:5]
    finally:
        body = json.dumps({"localization": "None"}).encode()
        urllib.request.urlopen(urllib.request.Request(server + "/sdapi/v1/options", data=body,
                                                      headers={"Content-Type": "application/json"}), timeout=10)


def test_three_windows_share_the_queue(server, browser, hold_dir):
    """Two windows queue a job each while a third's runs: all three finish, each shows its own images."""
    pages = [open_page(browser, server) for _ in range(3)]
    prompts = [FIRST, "second window: a blue square", "third window: a star"]
    for page, prompt in zip(pages, prompts):
        page.locator("#txt2img_prompt textarea").fill(prompt)
        set_number(page, "txt2img_width", 64)
        set_number(page, "txt2img_height", 64)
        set_number(page, "txt2img_steps", 3)
    set_number(pages[0], "txt2img_batch_count", 2)
    pages[0].click("#txt2img_generate")
    # the server holds the first window's job at its first step until the other two are queued and seen
    wait_for_file(hold_dir / "held")
    pages[0].wait_for_selector("#txt2img_progressbar .sd-progress[data-state=running]", timeout=60_000)
    pages[1].click("#txt2img_generate")
    pages[2].click("#txt2img_generate")
    for page in pages[1:]:
        page.wait_for_selector("#txt2img_queue_list table.sd-queue", timeout=60_000)  # its job listed, waiting
    shot(pages[1], "queue-panel")
    # a fourth window queues a job and takes it back with its row's ✕: the panel empties, nothing is shown
    fourth = open_page(browser, server)
    # the page's load gives both of its panels the window's token (so jobs other events queue show too)
    fourth.wait_for_selector("#txt2img_queue_list .sd-queue-live[data-token]", state="attached", timeout=30_000)
    fourth.get_by_role("tab", name="img2img", exact=True).click()  # (gradio draws a tab when it is first shown)
    fourth.wait_for_selector("#img2img_queue_list .sd-queue-live[data-token]", state="attached", timeout=30_000)
    fourth.get_by_role("tab", name="txt2img", exact=True).click()
    fourth.locator("#txt2img_prompt textarea").fill("fourth window: never drawn")
    fourth.click("#txt2img_generate")
    fourth.wait_for_selector("#txt2img_queue_list .sd-queue-cancel", timeout=60_000)
    fourth.click("#txt2img_queue_list .sd-queue-cancel")
    fourth.wait_for_selector("#txt2img_queue_list .sd-queue-empty", timeout=30_000)
    (hold_dir / "release").touch()
    for page, prompt, count in zip(pages, prompts, (2, 1, 1)):
        page.wait_for_function(f"document.querySelectorAll('#txt2img_gallery img').length >= {count}",
                               timeout=180_000)
        info = page.locator("#txt2img_html_info textarea").input_value()
        assert info.startswith(prompt), (prompt, info)
        assert not any(other in info for other in prompts if other != prompt)
    assert fourth.locator("#txt2img_gallery img").count() == 0 and fourth.locator(".toast-body").count() == 0
