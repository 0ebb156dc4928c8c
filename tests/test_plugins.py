"""Plug-ins: found as extensions folders and entry points, broken ones reported without taking the server
down, and the example plug-in (examples/plugins/sdstudio-vignette) end to end through the studio, the API,
the CLI and the UI's form."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdstudio.cli import build_parser, main
from sdstudio.core import infotext
from sdstudio.core.params import Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.plugins import API_VERSION, load
from sdstudio.scripts import Studio
from sdstudio.server import create_app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "sdstudio-vignette" / "sdstudio_vignette"
BASE = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "seed": 4, "sampler_name": "Euler"}


def with_example(root: Path) -> Path:
    """The example plug-in copied into the data dir's extensions folder (A1111's place)."""
    shutil.copytree(EXAMPLE, root / "extensions" / "sdstudio_vignette")
    return root


def write_plugin(root: Path, name: str, source: str) -> None:
    folder = root / "extensions" / name
    folder.mkdir(parents=True)
    (folder / "sdstudio_plugin.py").write_text(textwrap.dedent(source), encoding="utf-8")


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(int)


def corner_detail(image: np.ndarray) -> float:
    """Mean absolute difference of neighbouring pixels in the four 12-pixel corners."""
    h, w = image.shape[:2]
    parts = [image[:12, :12], image[:12, w - 12:], image[h - 12:, :12], image[h - 12:, w - 12:]]
    return float(np.mean([np.abs(np.diff(p, axis=1)).mean() for p in parts]))


@pytest.fixture(scope="module")
def studio(make_data_root):
    root = with_example(make_data_root("plugins"))
    plugins = load(root / "extensions")
    return Studio(Engine(Paths(root)), plugins.catalog), plugins


def test_the_example_loads_from_the_extensions_folder(studio):
    _, plugins = studio
    (info,) = plugins.infos
    assert (info.name, info.status, info.api, info.version) == ("sdstudio_vignette", "loaded", API_VERSION, "1.0.0")
    assert info.scripts == ["Vignette"] and plugins.localizations["zh_CN"]["Vignette"] == "暗角"
    assert plugins.catalog.get("vignette").owner == "sdstudio_vignette"  # the alias finds it


def test_the_vignette_fades_the_corners_and_round_trips_its_infotext(studio):
    s, _ = studio
    plain = s.generate(Txt2ImgRequest(**BASE))
    off = s.generate(Txt2ImgRequest(**BASE, alwayson_scripts={"Vignette": {"enabled": False}}))
    on = s.generate(Txt2ImgRequest(**BASE, alwayson_scripts={"vignette": {"strength": 1.0, "radius": 0.3}}))
    assert np.array_equal(pixels(plain), pixels(off))  # switched off: not a pixel changes
    assert corner_detail(pixels(on)) < 0.7 * corner_detail(pixels(plain))
    centre = (slice(24, 40), slice(24, 40))
    assert np.abs(pixels(on)[centre] - pixels(plain)[centre]).mean() < \
        np.abs(pixels(on)[:12, :12] - pixels(plain)[:12, :12]).mean()
    text = on.images[0].infotext
    fields = infotext.parse(text)
    assert fields["Vignette"] == "True" and fields["Vignette strength"] == "1" and fields["Vignette radius"] == "0.3"
    again = s.generate(from_infotext(text, catalog=s.catalog))
    assert np.array_equal(pixels(again), pixels(on))


def test_a_hook_that_raises_fails_its_job_naming_the_plugin_and_the_server_goes_on(data_dir):
    write_plugin(data_dir, "broken_hook", """
        SDSTUDIO_API = 1

        def register(api):
            from sdstudio.core.scripts import Param, Script
            from sdstudio.engine.hooks import StepHook

            class Boom(StepHook):
                def after_step(self, step, x):
                    raise ZeroDivisionError("the hook broke")

            api.add_script(Script("Boom", alwayson=True, params=(Param("on", True, a1111=0),),
                                  hooks=lambda args, req: [Boom()]))
        """)
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    with TestClient(create_app(args)) as client:
        bad = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": {"Boom": {"args": [True]}}})
        assert bad.status_code == 500
        assert "Boom (broken_hook)" in bad.json()["detail"] and "the hook broke" in bad.json()["detail"]
        good = client.post("/sdapi/v1/txt2img", json=BASE)
        assert good.status_code == 200 and len(good.json()["images"]) == 1
        (ext,) = client.get("/sdapi/v1/extensions").json()
        assert ext["name"] == "broken_hook" and "the hook broke" in ext["error"]


def test_broken_plugins_are_reported_and_left_out(data_dir):
    write_plugin(data_dir, "a_syntax", "def register(api:\n")
    write_plugin(data_dir, "b_old_api", "SDSTUDIO_API = 0\ndef register(api):\n    pass\n")
    write_plugin(data_dir, "c_raises", "SDSTUDIO_API = 1\ndef register(api):\n    raise RuntimeError('no way')\n")
    write_plugin(data_dir, "d_clash", """
        SDSTUDIO_API = 1
        def register(api):
            from sdstudio.core.scripts import Script
            api.add_script(Script("X/Y/Z plot"))
        """)
    (data_dir / "extensions" / "e_a1111" / "scripts").mkdir(parents=True)  # an A1111 extension: not ours
    with_example(data_dir)
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    with TestClient(create_app(args)) as client:
        listed = {e["name"]: e for e in client.get("/sdapi/v1/extensions").json()}
        assert listed["a_syntax"]["status"] == "failed" and "SyntaxError" in listed["a_syntax"]["error"]
        assert "API version 0" in listed["b_old_api"]["error"]
        assert "no way" in listed["c_raises"]["error"]
        assert "already declared" in listed["d_clash"]["error"]
        assert listed["e_a1111"]["status"] == "not a plug-in" and not listed["e_a1111"]["enabled"]
        assert listed["sdstudio_vignette"]["enabled"] and listed["sdstudio_vignette"]["status"] == "loaded"
        assert "vignette" in [s["name"] for s in client.get("/sdapi/v1/script-info").json()]
        assert client.get("/vignette/version").json() == {"version": "1.0.0"}  # the plug-in's own route
        done = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": {"Vignette": {"args": [True, 0.9]}}})
        assert done.status_code == 200
        assert "Vignette strength: 0.9" in json.loads(done.json()["info"])["infotexts"][0]
        unknown = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": {"Nope": {"args": []}}})
        assert unknown.status_code == 422 and "Nope" in unknown.json()["detail"]


def test_disabled_plugins_stay_out(data_dir):
    with_example(data_dir)
    (data_dir / "config.json").write_text(json.dumps({"disabled_extensions": ["sdstudio_vignette"]}))
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    with TestClient(create_app(args)) as client:
        (ext,) = client.get("/sdapi/v1/extensions").json()
        assert ext["status"] == "disabled" and not ext["enabled"]
        refused = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": {"Vignette": {"args": [True]}}})
        assert refused.status_code == 422
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui",
                                      "--disable-all-extensions"])
    (data_dir / "config.json").write_text("{}")
    with TestClient(create_app(args)) as client:
        assert client.get("/sdapi/v1/extensions").json()[0]["status"] == "disabled"


def test_the_cli_runs_a_plugins_script(data_dir, tmp_path, capsys):
    with_example(data_dir)
    flags = ["txt2img", "a red circle", "--data-dir", str(data_dir), "--size", "64x64", "--steps",
             "3", "--seed", "4", "--sampler", "Euler", "--outdir"]
    assert main([*flags, str(tmp_path / "plain")]) == 0
    assert main([*flags, str(tmp_path / "on"), "--alwayson", "vignette", "strength=1", "radius=0.3"]) == 0
    capsys.readouterr()
    plain, on = (next((tmp_path / d).glob("*.png")) for d in ("plain", "on"))
    with Image.open(on) as im:
        assert "Vignette strength: 1" in im.info["parameters"]
        faded = np.asarray(im.convert("RGB")).astype(int)
    with Image.open(plain) as im:
        assert corner_detail(faded) < 0.7 * corner_detail(np.asarray(im.convert("RGB")).astype(int))


def test_the_ui_form_builds_the_plugins_controls(studio):
    from sdstudio.ui.forms import Form, script_key

    s, _ = studio
    form = Form("txt2img", s.catalog)
    values = {"prompt": "x", script_key("Vignette", "enabled"): True, script_key("Vignette", "strength"): 0.8,
              script_key("Vignette", "radius"): 0.5}
    req = form.request(values, {})
    assert req.alwayson_scripts == {"Vignette": {"enabled": True, "strength": 0.8, "radius": 0.5}}
    assert form.request({**values, script_key("Vignette", "enabled"): False}, {}).alwayson_scripts == {}



def test_a_plugins_sampler_and_schedule_type(data_dir):
    """A plug-in's sampler (here: Euler under another name) and schedule type (Karras by another name) run
    as the built-in ones do; a sampler name that is taken fails only that plug-in."""
    write_plugin(data_dir, "more_samplers", """
        SDSTUDIO_API = 1

        def register(api):
            from sdstudio.core.names import SamplerInfo, ScheduleInfo
            from sdstudio.engine.samplers import sample_euler
            from sdstudio.engine.schedules import get_sigmas

            api.add_sampler(SamplerInfo("Plug-in Euler", "plugin_euler", ("plugin_euler",)), sample_euler)
            api.add_scheduler(ScheduleInfo("plugin_karras", "Plug-in Karras"),
                              lambda steps, schedule, sdxl: get_sigmas("karras", steps, schedule))
        """)
    write_plugin(data_dir, "taken_name", """
        SDSTUDIO_API = 1

        def register(api):
            from sdstudio.core.names import SamplerInfo
            api.add_sampler(SamplerInfo("Euler", "not_euler"), lambda *a, **k: None)
        """)
    from sdstudio.flags import studio_from

    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir)])
    studio, plugins = studio_from(args, Engine(Paths(data_dir)))
    assert plugins.info("more_samplers").status == "loaded"
    assert plugins.info("taken_name").status == "failed" and "taken" in plugins.info("taken_name").error
    ours = studio.generate(Txt2ImgRequest(**{**BASE, "sampler_name": "Plug-in Euler", "scheduler": "Plug-in Karras"}))
    builtin = studio.generate(Txt2ImgRequest(**{**BASE, "sampler_name": "Euler", "scheduler": "Karras"}))
    assert np.array_equal(pixels(ours), pixels(builtin))
    fields = infotext.parse(ours.images[0].infotext)
    assert fields["Sampler"] == "Plug-in Euler" and fields["Schedule type"] == "Plug-in Karras"


def test_the_example_installed_as_a_package_is_found_by_its_entry_point(tmp_path, monkeypatch):
    """``pip install examples/plugins/sdstudio-vignette`` (here into a folder put on sys.path): the plug-in is
    found through its ``sdstudio.plugins`` entry point, with the package's version."""
    import subprocess
    import sys

    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(EXAMPLE.parent)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    monkeypatch.syspath_prepend(str(target))
    plugins = load(tmp_path / "no-extensions-folder")
    (info,) = [i for i in plugins.infos if i.name == "vignette"]
    assert info.origin == "entry point sdstudio-vignette" and info.version == "1.0.0" and info.status == "loaded"
    assert plugins.catalog.get("Vignette").owner == "vignette"


def test_a_plugins_upscaler_serves_extras_and_hires_fix(data_dir):
    write_plugin(data_dir, "inverter", """
        SDSTUDIO_API = 1

        def register(api):
            from PIL import ImageOps
            api.add_upscaler("Inverted", lambda image, w, h: ImageOps.invert(image.resize((w, h))))
        """)
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"])
    with TestClient(create_app(args)) as client:
        assert "Inverted" in [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
        hires = client.post("/sdapi/v1/txt2img", json={**BASE, "enable_hr": True, "hr_upscaler": "Inverted",
                                                        "hr_scale": 1.5, "denoising_strength": 0.3})
        assert hires.status_code == 200 and "Hires upscaler: Inverted" in json.loads(hires.json()["info"])["infotexts"][0]
    engine = client.app.state.service.engine
    picture = Image.new("RGB", (16, 8), (10, 200, 30))
    out = engine.upscalers.upscale(picture, 32, 16, "Inverted")
    assert out.size == (32, 16) and out.getpixel((5, 5)) == (245, 55, 225)


def test_installing_a_plugin_folder_from_this_machine(tmp_path):
    from sdstudio.plugins.install import InstallError, install

    target = tmp_path / "extensions"
    where = install(str(EXAMPLE), target)
    assert Path(where) == target / "sdstudio_vignette" and (target / "sdstudio_vignette" / "__init__.py").is_file()
    assert [i.status for i in load(target).infos] == ["loaded"]
    for source, words in ((str(EXAMPLE), "exists already"), (str(tmp_path / "nope"), "no such"),
                          (str(EXAMPLE / "__init__.py"), "a folder or a .whl"), (str(tmp_path), "not a plug-in")):
        with pytest.raises(InstallError, match=words):
            install(source, target)


def test_a_plugins_controlnet_preprocessor(data_dir):
    """A plug-in's preprocessor is in the engine's list beside the built-in ones and runs as they do."""
    write_plugin(data_dir, "posterize", """
        SDSTUDIO_API = 1

        def register(api):
            from sdstudio.core.controlnet import Preprocessor, Slider
            api.add_preprocessor(Preprocessor(
                "posterize_demo", run=lambda image, res, a, b, mask: (image // int(a) * int(a)),
                resolution=Slider("Preprocessor Resolution", 64, 64, 2048, 8),
                threshold_a=Slider("Step", 64, 1, 128)))
        """)
    from sdstudio.engine.preprocessors import detect
    from sdstudio.flags import studio_from

    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir)])
    studio, plugins = studio_from(args, Engine(Paths(data_dir)))
    assert plugins.info("posterize").status == "loaded"
    registry = studio.engine.controlnets.preprocessors
    p = registry.get("posterize_demo")
    assert p.owner == "posterize" and "canny" in registry.names() and "posterize_demo" in registry.names()
    image = np.full((64, 64, 3), 200, np.uint8)
    assert int(detect(p, image, -1, -1, -1).max()) == 192  # 200 // 64 * 64, the slider's default step
