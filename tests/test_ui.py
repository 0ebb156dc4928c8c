"""The web UI's Python side: the page builds with A1111's ids, every text has a translation, the form and
the request object agree both ways, settings persist, and page events queue real jobs."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from sdstudio.core import infotext
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.settings import SettingError, Settings
from sdstudio.models.loader import clip_tokenizer
from sdstudio.service.jobs import Txt2ImgJob
from sdstudio.ui import localization
from sdstudio.ui.app import StudioUI
from sdstudio.ui.generation import token_counter
from sdstudio.ui.progress import finished, follow, live_html, progress_html, queue_html

A1111_IDS = ["tab_txt2img", "tab_img2img", "tab_extras", "tab_pnginfo", "tab_settings", "txt2img_prompt",
             "txt2img_neg_prompt", "txt2img_generate", "txt2img_interrupt", "txt2img_skip", "txt2img_gallery",
             "txt2img_steps", "txt2img_cfg_scale", "txt2img_seed", "txt2img_width", "txt2img_height",
             "txt2img_batch_count", "txt2img_batch_size", "txt2img_sampling", "txt2img_enable_hr", "img2img_prompt",
             "img2img_generate", "img2img_denoising_strength", "setting_sd_model_checkpoint", "img2img_neg_prompt",
             "img2img_steps", "img2img_seed", "img2img_gallery", "img2img_interrupt", "txt2img_token_counter",
             "txt2img_styles", "paste", "txt2img_hr_upscaler", "txt2img_hires_steps", "txt2img_hr_scale",
             "resize_mode", "img2img_mask_blur", "img2img_inpainting_fill", "img2maskimg", "extras_image",
             "extras_upscaler_1", "pnginfo_image", "settings_submit", "txt2img_subseed", "txt2img_subseed_strength"]


@pytest.fixture
def ui(service, data_dir):
    title = service.engine.registry.checkpoint(None).title
    return StudioUI(service, Settings(data_dir / "config.json", {"sd_model_checkpoint": title}))


@pytest.fixture
def page(ui):
    return ui.build()


def test_page_has_a1111_element_ids(page):
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert set(A1111_IDS) <= ids, sorted(set(A1111_IDS) - ids)
    dupes = [i for i in ids if i and sum(getattr(b, "elem_id", None) == i for b in page.blocks.values()) > 1]
    assert not dupes, f"element ids used twice: {dupes}"


@pytest.mark.parametrize("language", ["en", "zh_CN"])
def test_every_ui_text_has_a_translation(page, language):
    """Fails when a label, button, choice or message of the page is missing from a shipped language file:
    add it to sdstudio/ui/localizations/en.json and zh_CN.json."""
    strings = json.loads((localization.PACKAGE_DIR / f"{language}.json").read_text(encoding="utf-8"))
    missing = sorted(localization.ui_strings(page) - set(strings))
    assert not missing, f"{language}.json lacks: {missing}"
    if language == "zh_CN":  # a translation, not a copy: the key terms read as the community writes them
        assert strings["Prompt"] == "提示词" and strings["Negative prompt"] == "反向提示词"
        assert strings["Sampling method"] == "采样方法" and strings["Seed"] == "随机数种子"
        assert strings["Hires. fix"] == "高分辨率修复" and strings["Denoising strength"] == "重绘幅度"
        # left as they are only where the community writes them so: names of products, formats and parameters
        names = {"BLIP", "BLIP + DeepBooru", "CodeFormer", "DeepBooru", "Eta", "GFPGAN", "Lora", "Sigma Churn", "Stable Diffusion", "bh1", "bh2", "ckpt",
                 "safetensors", "vary_coeff", "time_uniform", "time_quadratic", "logSNR"}
        untranslated = {k for k, v in strings.items() if k == v}
        assert untranslated <= names, f"not translated: {sorted(untranslated - names)}"


def test_localizations_from_the_data_dir(tmp_path, ui):
    (tmp_path / "localizations").mkdir()
    (tmp_path / "localizations" / "de_DE.json").write_text(json.dumps({"Prompt": "Eingabe"}), encoding="utf-8")

    class P:
        data_dir = tmp_path

    assert "de_DE" in localization.available(P) and "zh_CN" in localization.available(P)
    assert localization.load("de_DE", P) == {"Prompt": "Eingabe"}
    (tmp_path / "localizations" / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        localization.load("bad", P)


def test_form_and_request_agree_both_ways(page, ui):
    """Filling the txt2img form from a request and reading it back gives the same request."""
    tab = ui.txt2img
    req = Txt2ImgRequest(prompt="a (red:1.2) circle", negative_prompt="blue", sampler_name="Euler a",
                         scheduler="Karras", steps=13, width=96, height=64, n_iter=2, batch_size=3, cfg_scale=5.5,
                         seed=1234, subseed=99, subseed_strength=0.25, tiling=True, enable_hr=True, hr_scale=1.5,
                         hr_upscaler="Latent (nearest)", hr_second_pass_steps=4, denoising_strength=0.45,
                         hr_sampler_name="Euler", hr_cfg=3.0, script_name="X/Y/Z plot",
                         script_args={"x_type": "Steps", "x_values": "1,2"}, model="tiny-sd1 [abc]")
    filled = tab.form.fill(req)
    values = {name: filled.get(name, getattr(c, "value", None)) for name, c in tab.form.controls.items()}
    back = tab.form.request(values, {"sd_model_checkpoint": "tiny-sd1 [abc]"})
    for name in ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "width", "height", "n_iter",
                 "batch_size", "cfg_scale", "seed", "subseed", "subseed_strength", "tiling", "enable_hr", "hr_scale",
                 "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_sampler_name", "hr_cfg",
                 "hr_scheduler", "script_name", "model"):
        assert getattr(back, name) == getattr(req, name), name
    assert back.script_args["x_type"] == "Steps" and back.script_args["x_values"] == "1,2"
    assert type(back.steps) is int and type(back.cfg_scale) is float


def test_paste_fills_every_field_from_an_a1111_infotext(page, ui):
    text = ("a cat, <lora:style:0.8>\nNegative prompt: ugly\nSteps: 17, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 6.5, Seed: 42, Size: 96x64, Clip skip: 2, Denoising strength: 0.5, Hires upscale: 2, "
            "Hires upscaler: Latent, Hires steps: 5, Variation seed: 7, Variation seed strength: 0.3")
    out = dict(zip([*ui.txt2img.form.names, "clip_skip", "extra"], ui.txt2img.fill_from_text(text)))
    assert out["prompt"] == "a cat, <lora:style:0.8>" and out["negative_prompt"] == "ugly"
    assert (out["steps"], out["sampler_name"], out["scheduler"], out["cfg_scale"], out["seed"]) == \
        (17, "DPM++ 2M", "Karras", 6.5, 42)
    assert (out["width"], out["height"], out["enable_hr"], out["hr_scale"], out["hr_second_pass_steps"]) == \
        (96, 64, True, 2.0, 5)
    assert out["clip_skip"] == 2 and out["subseed"] == 7 and out["extra"] is True
    with pytest.raises(gr.Error, match="no generation parameters"):
        ui.txt2img.fill_from_text("just a prompt")


def test_settings_persist_and_keep_unknown_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"samples_format": "jpg", "some_a1111_option": [1, 2], "CLIP_stop_at_last_layers": "x"}))
    s = Settings(path)
    assert s["samples_format"] == "jpg" and s["CLIP_stop_at_last_layers"] == 1  # an unusable value: the default
    assert s.update({"CLIP_stop_at_last_layers": 2, "localization": "zh_CN"}) == ["CLIP_stop_at_last_layers",
                                                                                 "localization"]
    stored = json.loads(path.read_text())
    assert stored["some_a1111_option"] == [1, 2] and stored["CLIP_stop_at_last_layers"] == 2
    with pytest.raises(SettingError, match="samples_format"):
        s.update({"samples_format": "bmp"})
    with pytest.raises(SettingError, match="show_progress_every_n_steps"):
        s.update({"show_progress_every_n_steps": 0})
    assert Settings(path)["localization"] == "zh_CN"
    path.write_text("{broken")
    with pytest.raises(SettingError, match="config.json"):
        Settings(path)


def test_token_counter_as_a1111():
    tok = clip_tokenizer()
    assert token_counter(tok, {}, "a red circle") == '<span class="sd-token-count">3/75</span>'
    long = ", ".join(["red circle"] * 40)
    used, limit = token_counter(tok, {}, long).split(">")[1].split("<")[0].split("/")
    assert int(used) > 75 and limit == "150"
    # a schedule counts its longest variant; network tags do not count
    assert token_counter(tok, {}, "[a:a b c d e:5] <lora:x:1>") == '<span class="sd-token-count">5/75</span>'


def test_token_counter_sees_embeddings_without_rescanning_per_keystroke(ui, data_dir, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from sdstudio.ui import app

    first = ui.embedding_lookup()
    assert ui.embedding_lookup() is first  # the next keystroke: the same lookup, nothing re-read
    folder = data_dir / "embeddings"
    folder.mkdir(exist_ok=True)
    save_file({"emb_params": torch.randn(4, 32)}, str(folder / "fourvec.safetensors"))
    assert ui.embedding_lookup() is first  # within the recheck period the counter keeps its view
    monkeypatch.setattr(app, "EMBEDDINGS_RECHECK_S", 0.0)
    lookup = ui.embedding_lookup()
    assert lookup is not first
    assert token_counter(clip_tokenizer(), lookup, "a fourvec circle") == '<span class="sd-token-count">6/75</span>'


def test_following_a_job_shows_it_running_at_its_step_then_done(service, ui, page):
    """The progress the page shows for a queued job: held at step 2 of 3, the bar says running at that step;
    once it is let go, the last tick carries the finished job and its image."""
    from step_hold import StepHold

    client = "ui:test"
    req = Txt2ImgRequest(prompt="a red circle", steps=3, width=64, height=64, seed=5, model="tiny-sd1")
    with StepHold(service, batch=0, step=2) as hold:
        job = service.submit(client, Txt2ImgJob(req))
        hold.wait()
        ticks = follow(service, client, job)
        running = next(ticks)
        assert running.job is None and 'data-state="running"' in running.html
        assert service.progress(client, job.id)["state"]["sampling_step"] == 2
        hold.release()
        rest = list(ticks)
    assert rest[-1].job is not None and rest[-1].job.status == "done"
    image = rest[-1].job.result["images"][0]
    assert Path(image["path"]).is_file() and infotext.parse(image["infotext"])["Seed"] == "5"
    assert "No jobs waiting" in queue_html(service, client)


def test_the_page_follows_a_generation_through_its_own_route(service, ui):
    """What the page's script polls while a generation runs: the bar, then preview pictures, then done."""
    app = FastAPI()
    app.include_router(ui.router())
    http = TestClient(app)
    req = Txt2ImgRequest(prompt="a red circle", steps=40, width=64, height=64, seed=5, model="tiny-sd1")
    job = service.submit("ui:test", Txt2ImgJob(req))
    area = live_html("txt2img", job, previews=True)
    assert f'data-job="{job.id}"' in area and 'id="txt2img_preview"' in area
    bars, previews, numbers = [], [], []
    while True:
        snap = http.get(f"/sdstudio/progress/{job.id}").json()
        if snap["done"]:
            break
        bars.append(snap["html"])
        if snap["preview"] is not None:
            numbers.append(snap["preview"])
            answer = http.get(f"/sdstudio/progress/{job.id}/preview")
            if answer.status_code == 200:  # (the job may end between the two reads)
                previews.append(Image.open(io.BytesIO(answer.content)))
        time.sleep(0.005)
    assert finished(service, job).status == "done"
    assert any('data-state="running"' in b and "/40" in b for b in bars), bars[-3:]
    assert previews and previews[-1].size == (8, 8) and numbers == sorted(numbers)  # "Approx cheap": latent size
    assert http.get(f"/sdstudio/progress/{job.id}").json() == {"done": True, "html": "", "info": "", "preview": None}
    assert http.get(f"/sdstudio/progress/{job.id}/preview").status_code == 404
    # an API client's job and an unknown id are not the page's to read
    api_job = service.submit("api", Txt2ImgJob(req))
    assert http.get(f"/sdstudio/progress/{api_job.id}").status_code == 404
    assert http.get("/sdstudio/progress/0123").status_code == 404
    service.wait(api_job.id)


def test_the_page_has_no_timer(page):
    """A gr.Timer's every tick re-sends the loading status of each component the page has updated: once a
    picture has been sent to img2img, a 2 s timer kept a core of Chromium busy and took it from the job
    (the page's own script polls instead: progress.py)."""
    import gradio as gr

    assert not [b for b in page.blocks.values() if isinstance(b, gr.Timer)]


def test_the_queue_panel_polls_and_cancels_through_its_own_route(service, ui):
    """What the page's script does with a window's queue panel: the token names that window only; the panel
    is busy while it has jobs; a row's ✕ cancels its job; another window's token cannot touch it."""
    from step_hold import StepHold

    app = FastAPI()
    app.include_router(ui.router())
    http = TestClient(app)
    req = Txt2ImgRequest(prompt="a queued circle", steps=3, width=64, height=64, seed=5, model="tiny-sd1")
    assert 'data-busy="0"' in ui.queue_panel(None) and "data-token" not in ui.queue_panel(None)
    with StepHold(service, batch=0, step=1) as hold:
        running = service.submit("ui:one", Txt2ImgJob(req))
        hold.wait()
        waiting = service.submit("ui:one", Txt2ImgJob(req))
        token, other = ui.queue_token("ui:one"), ui.queue_token("ui:two")
        panel = ui.queue_panel("ui:one")
        assert f'data-token="{token}"' in panel and 'data-busy="1"' in panel
        state = http.get(f"/sdstudio/queue/{token}").json()
        assert state["busy"] and f'data-job="{waiting.id}"' in state["html"] and "a queued circle" in state["html"]
        assert "No jobs waiting" in http.get(f"/sdstudio/queue/{other}").json()["html"]
        # a made-up or altered token is refused; another window's token cancels nothing of this one's
        name = token.partition(".")[0]
        for forged in (f"{name}.0123", token[:-1] + ("0" if token[-1] != "0" else "1"), name, "!!.00",
                       f"{name}.{'é' * 32}", f"{name}.{token.partition('.')[2].upper()}"):
            assert http.get(f"/sdstudio/queue/{forged}").status_code == 404
        http.post(f"/sdstudio/queue/{other}/cancel/{waiting.id}")
        assert service.queue.get(waiting.id).status == "queued"
        state = http.post(f"/sdstudio/queue/{token}/cancel/{waiting.id}").json()
        assert service.queue.get(waiting.id).status == "cancelled"
        assert f'data-job="{waiting.id}"' not in state["html"] and f'data-job="{running.id}"' in state["html"]
    assert finished(service, running).status == "done"
    assert http.get(f"/sdstudio/queue/{token}").json() == {"html": queue_html(service, "ui:one"), "busy": False}
    assert "No jobs waiting" in queue_html(service, "ui:one")


def test_progress_html_words_are_translatable():
    running = {"progress": 0.5, "eta_relative": 3.2, "job_id": "x", "queue_position": 0,
               "state": {"sampling_step": 5, "sampling_steps": 10, "job_no": 0, "job_count": 1, "job": "txt2img"}}
    html = progress_html(running)
    assert "<span>Step</span> 5/10" in html and "50%" in html and "<span>ETA</span> 3s" in html
    queued = {**running, "queue_position": 2, "state": {**running["state"], "sampling_steps": 0}}
    assert "<span>In queue</span>: 2 <span>ahead</span>" in progress_html(queued)


def test_checkpoint_switch_is_a_queued_load(service, ui, page):
    job = service.submit_load("ui:x", "tiny-sd1")
    done = service.wait(job.id, timeout=120)
    assert done.status == "done" and done.result["model_name"] == "tiny-sd1"
    from sdstudio.service.jobs import JobError

    with pytest.raises(JobError, match="no checkpoint named"):
        service.submit_load("ui:x", "nope")


def test_network_cards_and_metadata_editing(service, ui, data_dir):
    from sdstudio.models.network_info import network_info, save_user_metadata
    from sdstudio.ui import networks

    lora_dir = data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora_dir / "stripes.safetensors"))
    (lora_dir / "stripes.json").write_text(json.dumps({"sd version": "SD1", "activation text": "old"}))
    service.engine.registry.refresh()
    save_user_metadata(lora_dir / "stripes.safetensors", "striped, zebra", 0.7, "my note")
    stored = json.loads((lora_dir / "stripes.json").read_text())
    assert stored["sd version"] == "SD1" and stored["activation text"] == "striped, zebra"  # other keys kept
    info = network_info(lora_dir / "stripes.safetensors")
    assert info.trigger_words == ["striped", "zebra"] and info.preferred_weight == 0.7
    html = networks.cards(ui, "Lora", "txt2img")
    assert 'data-prompt="&lt;lora:stripes:0.7&gt;, striped, zebra"' in html
    assert "No items" in networks.cards(ui, "Hypernetworks", "txt2img")
    assert networks.preview_file(ui, "Lora", "stripes") is None
    (lora_dir / "stripes.preview.png").write_bytes(b"\x89PNG")
    assert networks.preview_file(ui, "Lora", "stripes").name == "stripes.preview.png"
    assert networks.preview_file(ui, "Lora", "../../etc/passwd") is None


def test_img2img_modes_make_the_right_request(ui, page, tmp_path):
    """Each img2img sub-tab turns its pictures into the init image and mask the engine expects."""
    from PIL import Image

    from sdstudio.core.params import RequestError

    tab = ui.img2img
    values = {name: getattr(c, "value", None) for name, c in tab.form.controls.items()}
    values.update(prompt="a cat", steps=4, width=64, height=64)
    red = Image.new("RGB", (64, 64), (200, 0, 0))
    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), (10, 10, 30, 30))
    sketched = red.copy()
    sketched.paste((0, 0, 255), (10, 10, 30, 30))
    editor = {"background": red, "layers": [strokes], "composite": sketched}
    empty = [None] * 14

    def images(mode, **kw):
        slots = dict(zip(["mode", "init", "sketch", "inpaint", "inpaint_sketch", "mask_alpha", "up_base", "up_mask",
                          "resize_by", "scale", "batch_in", "batch_out", "batch_masks", "batch_png"], empty))
        slots.update({"mode": mode, "mask_alpha": 0, "resize_by": False, "scale": 1.0, **kw})
        return list(slots.values())

    def one(mode, **kw):
        (job,) = tab.jobs_for(values, images(mode, **kw))
        req = job.request
        init = Image.open(req.init_images[0]).convert("RGB")
        mask = Image.open(req.mask).convert("L") if req.mask else None
        return req, init, mask

    req, init, mask = one("img2img", init=red)
    assert mask is None and init.getpixel((0, 0)) == (200, 0, 0) and req.kind == "img2img"
    _, init, mask = one("Sketch", sketch=editor)
    assert mask is None and init.getpixel((15, 15)) == (0, 0, 255)  # the sketch is the init
    _, init, mask = one("Inpaint", inpaint=editor)
    assert init.getpixel((15, 15)) == (200, 0, 0) and mask.getpixel((15, 15)) == 255 and mask.getpixel((50, 50)) == 0
    _, init, mask = one("Inpaint sketch", inpaint_sketch=editor)
    assert mask.getpixel((15, 15)) == 255 and mask.getpixel((50, 50)) == 0
    _, _, mask = one("Inpaint upload", up_base=red, up_mask=Image.new("L", (64, 64), 255))
    assert mask.getpixel((0, 0)) == 255
    req, _, _ = one("img2img", init=Image.new("RGB", (200, 121)), resize_by=True, scale=0.8)
    assert (req.width, req.height) == (160, 96)  # "Resize by": the init's size × scale, to multiples of 8
    with pytest.raises(RequestError, match="Inpaint: draw or upload a mask"):
        tab.jobs_for(values, images("Inpaint", inpaint={"background": red, "layers": [], "composite": red}))
    with pytest.raises(RequestError, match="upload an image first"):
        tab.jobs_for(values, images("img2img"))
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        red.save(folder / f"{i}.png")
    jobs = tab.jobs_for(values, images("Batch", batch_in=str(folder), batch_out=str(tmp_path / "out")))
    assert len(jobs) == 2 and all(j.outdir == str(tmp_path / "out") for j in jobs)
    ui.allow_folders = False
    with pytest.raises(RequestError, match="--listen"):
        tab.jobs_for(values, images("Batch", batch_in=str(folder)))


def test_default_size_from_the_checkpoint(ui, page, data_dir):
    """``modelspec.resolution`` in a checkpoint's metadata (SAI's files, our demo model) sets the page's
    default width and height; without it, A1111's 512×512."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    assert ui.model_size() == (512, 512)
    path = ui.service.engine.registry.checkpoint(None).path
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    path.unlink()  # a hard link to the shared fixture: write a new file instead of changing that one
    save_file(tensors, str(path), metadata={"modelspec.resolution": "128x192"})
    assert ui.model_size() == (128, 192)
    assert ui._current_settings()[-4:] == [128, 192, 128, 192]
    # a page built for this model: the load event leaves the fields alone (it would undo early typing)
    ui.build()
    assert ui._current_settings()[1:] == [gr.skip()] * (len(ui._settings_outputs()) - 1)
