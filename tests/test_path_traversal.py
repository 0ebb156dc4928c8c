"""No request reads or writes a file outside the folders it may use, whatever it puts in a path-like field or a
route parameter: output folders, model / VAE / upscaler / LoRA / ControlNet names, merge and training names and
folders, styles, Deforum's files and run names, job ids, the page's preview and static routes.

The world: a data dir, and beside it an ``outside`` folder with secrets (a text file, a picture, a loadable
checkpoint), reachable from the data dir by ``..``, by absolute paths and by symlinks inside the data dir. Every
test checks that ``outside`` is unchanged and that no answer carries the secret's text. Callers come from the
network (192.168.1.20) unless a test says otherwise: files a request names for reading (Deforum's init files,
A1111's training data_root) may be anywhere for a caller on the server's own machine, as in A1111, and must lie
inside the data dir for one from the network."""

from __future__ import annotations

import base64
import os
import urllib.parse
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdstudio.cli import build_parser
from sdstudio.server import create_app

SECRET = "TOPSECRET-7f3a"
NETWORK, LOCAL = ("192.168.1.20", 40000), ("127.0.0.1", 40000)
SMALL = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd1):
    base = tmp_path_factory.mktemp("traversal")
    data, outside = base / "data", base / "outside"
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    os.link(tiny_sd1, data / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    outside.mkdir()
    os.link(tiny_sd1, outside / "secret.safetensors")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(outside / "secret.png")
    (outside / "secret.txt").write_text(SECRET)
    (outside / "secret.json").write_text(f'{{"x": "{SECRET}"}}')
    (outside / "data").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i, 2, 3)).save(outside / "data" / f"{i}.png")
        (outside / "data" / f"{i}.txt").write_text(SECRET)
    (data / "outputs").mkdir()
    os.symlink(outside, data / "outputs" / "escape")  # symlinks inside the data dir that lead out of it
    os.symlink(outside, data / "escape")
    (data / "inside").mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data / "inside" / "init.png")
    app = create_app(build_parser().parse_args(["serve", "--data-dir", str(data), "--api"]))
    yield {"base": base, "data": data, "outside": outside, "app": app,
           "net": TestClient(app, raise_server_exceptions=False, client=NETWORK),
           "local": TestClient(app, raise_server_exceptions=False, client=LOCAL)}
    app.state.service.stop()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def outside_untouched(world):
    """Nothing is written in ``outside`` or beside the data dir, in any test of this file."""
    before, beside = snapshot(world["outside"]), sorted(p.name for p in world["base"].iterdir())
    yield
    assert snapshot(world["outside"]) == before
    assert sorted(p.name for p in world["base"].iterdir()) == beside


def paths_to(world, name: str) -> list[str]:
    """Every spelling of a path to ``outside/name`` a request might use."""
    target = world["outside"] / name
    return [str(target), f"../outside/{name}", f"../../outside/{name}", f"../../../outside/{name}",
            f"../../../../outside/{name}", f"escape/{name}", f"x/../../../outside/{name}",
            "/" + "../" * 12 + str(target).lstrip("/"), f"{target}/.", f"~/../../{str(target).lstrip('/')}",
            f"..\\outside\\{name}", f"file://{target}", f"%2e%2e/outside/{name}", f"{target}\x00.png"]


def no_secret(r) -> None:
    assert r.status_code < 500, r.text
    assert SECRET not in r.text


def refused(r) -> None:
    no_secret(r)
    assert 400 <= r.status_code < 500, r.text


def test_output_folders_stay_inside_outputs(world):
    """outpath_samples / outpath_grids: a path that leaves outputs (by .., absolute, or a symlink) is a 403, a NUL
    byte a 422; what stays inside is used (a backslash or %2e is a plain character on this system)."""
    net, outputs = world["net"], (world["data"] / "outputs").resolve()
    for path in paths_to(world, "w"):
        r = net.post("/sdapi/v1/txt2img", json={**SMALL, "outpath_samples": path, "outpath_grids": path})
        no_secret(r)
        target = outputs / path
        try:
            leaves = not target.resolve().is_relative_to(outputs)
        except ValueError:  # the NUL byte
            assert r.status_code == 422 and "not a usable path" in r.json()["detail"], path
            continue
        if leaves:
            assert r.status_code == 403 and "outside the outputs folder" in r.json()["detail"], path
        else:
            assert r.status_code == 200, (path, r.text)
            assert any(target.resolve().rglob("*.png")), path


def test_model_names_are_looked_up_never_opened(world):
    """Checkpoint, VAE, refiner, upscalers, ControlNet model and the merger's inputs are names from the model
    lists: a path to a real checkpoint outside is not found (404/422), in the body, in override_settings, in
    /options and in a job's sdstudio_request."""
    net = world["net"]
    png = base64.b64encode((world["outside"] / "secret.png").read_bytes()).decode()
    for path in paths_to(world, "secret.safetensors") + paths_to(world, "secret"):
        unit = {"enabled": True, "model": path, "image": png, "module": "none"}
        for route, body in (
                ("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": path}}),
                ("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"sd_vae": path}}),
                ("/sdapi/v1/txt2img", {**SMALL, "refiner_checkpoint": path, "refiner_switch_at": 0.5}),
                ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": path}),
                ("/sdapi/v1/txt2img", {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}}),
                ("/sdapi/v1/extra-single-image", {"image": png, "upscaler_1": path}),
                ("/sdapi/v1/options", {"sd_model_checkpoint": path}),
                ("/sdstudio/v1/merge", {"primary_model_name": path}),
                ("/sdstudio/v1/merge", {"primary_model_name": "tiny-sd1", "secondary_model_name": path}),
                ("/sdstudio/v1/jobs", {"request": SMALL, "sdstudio_request": {**SMALL, "model": path}})):
            refused(net.post(route, json=body))


def test_network_tags_are_names(world):
    """``<lora:PATH:1>`` / ``<hypernet:PATH:1>``: an unknown name (the image is made without it, as A1111 does);
    the checkpoint outside is never read as a LoRA."""
    net = world["net"]
    for path in paths_to(world, "secret.safetensors")[:8]:
        r = net.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": f"x <lora:{path}:1> <hypernet:{path}:1>"})
        no_secret(r)
        assert r.status_code == 200 and "Lora hashes" not in r.json()["info"], path


def test_names_of_written_files_stay_in_their_folder(world):
    """Create embedding / hypernetwork, the merger's custom_name, a LoRA's output_name, a style's name: whatever
    the name holds, the file is written in its own folder or the request is refused."""
    net, data = world["net"], world["data"]
    for name in paths_to(world, "w"):
        for route, body in (("/sdapi/v1/create/embedding", {"name": name}),
                            ("/sdapi/v1/create/hypernetwork", {"name": name, "enable_sizes": [320]}),
                            ("/sdstudio/v1/merge", {"primary_model_name": "tiny-sd1", "secondary_model_name": "tiny-sd1",
                                                    "custom_name": name, "multiplier": 0.5}),
                            ("/sdstudio/v1/train/lora", {"train_data_dir": "inside", "output_name": name,
                                                        "max_train_steps": 1}),
                            ("/sdstudio/v1/styles", {"name": name, "prompt": "a"})):
            no_secret(net.post(route, json=body))
        no_secret(net.delete("/sdstudio/v1/styles/" + urllib.parse.quote(name, safe="")))
    service = world["app"].state.service
    for job in service.queue.list(limit=1000):  # the merges and trainings queued: none may have run outside
        service.cancel(job.id, job.client)
    written = [p for p in data.rglob("*") if p.is_file() and p.suffix in (".pt", ".safetensors")]
    assert all(p.resolve().is_relative_to(data.resolve()) for p in written)
    assert len(list((data / "embeddings").glob("*.pt"))) >= 10 and len(list((data / "models" / "hypernetworks").glob("*.pt"))) >= 10


def test_training_folders(world):
    """A1111's train routes: data_root (read) and an absolute template_filename from the network must lie in the
    data dir, log_directory (written) always; LoRA / Dreambooth folders always lie in the data dir."""
    net, local = world["net"], world["local"]
    train = {"embedding_name": "nope", "steps": 1}
    for path in paths_to(world, "data"):
        r = net.post("/sdapi/v1/train/embedding", json={**train, "data_root": path})
        no_secret(r)
        assert r.status_code in (403, 422) or "Dataset directory doesn't exist" in r.text, (path, r.text)
        r = net.post("/sdapi/v1/train/embedding", json={**train, "data_root": "inside", "log_directory": path})
        no_secret(r)
        if "\0" in path or not (world["data"] / path).resolve().is_relative_to(world["data"].resolve()):
            assert r.status_code in (403, 422), (path, r.text)
        for route in ("/sdstudio/v1/train/lora", "/sdstudio/v1/train/dreambooth"):
            refused(net.post(route, json={"train_data_dir": path, "max_train_steps": 1}))
        refused(net.post("/sdstudio/v1/train/dreambooth", json={"train_data_dir": "inside", "reg_data_dir": path,
                                                                "max_train_steps": 1}))
    r = net.post("/sdapi/v1/train/embedding", json={**train, "data_root": "inside",
                                                    "template_filename": str(world["outside"] / "secret.txt")})
    assert r.status_code == 403 and "shared over the network" in r.json()["detail"]
    # on the server's own machine data_root may be anywhere (A1111): the check passes, the embedding is missing
    r = local.post("/sdapi/v1/train/embedding", json={**train, "data_root": str(world["outside"] / "data")})
    assert r.status_code == 200 and "embedding 'nope' not found" in r.json()["info"]


def deforum(**settings) -> dict:
    return {"deforum_settings": {"max_frames": 1, "W": 64, "H": 64, "steps": 1, **settings}}


def test_deforum_files_and_names(world):
    """Deforum from the network: init image, mask, videos, soundtrack, ControlNet videos must be files in the data
    dir; a resume_timestring or batch name never makes a path (the run's files are named by them)."""
    net, local = world["net"], world["local"]
    for path in paths_to(world, "secret.png"):
        for settings in ({"use_init": True, "init_image": path}, {"use_mask": True, "mask_file": path},
                         {"animation_mode": "Video Input", "video_init_path": path},
                         {"add_soundtrack": "File", "soundtrack_path": path},
                         {"cn_1_enabled": True, "cn_1_vid_path": path},
                         {"resume_from_timestring": True, "resume_timestring": path}):
            refused(net.post("/deforum_api/batches", json=deforum(**settings)))
    inside = str(world["data"] / "inside" / "init.png")
    r = net.post("/deforum_api/batches", json=deforum(use_init=True, init_image=inside))
    assert r.status_code == 202, r.text
    r2 = local.post("/deforum_api/batches", json=deforum(use_init=True, init_image=str(world["outside"] / "secret.png")))
    assert r2.status_code == 202, r2.text  # the server's own machine: as A1111
    for batch in (r.json()["batch_id"], r2.json()["batch_id"]):
        assert net.delete(f"/deforum_api/batches/{urllib.parse.quote(batch)}").status_code == 200 or \
            local.delete(f"/deforum_api/batches/{urllib.parse.quote(batch)}").status_code == 200


def test_deforum_batch_names():
    from sdstudio.core import deforum

    for name in ("..", ".", "", "{nothing}/..", "../../x", "a/../../b"):
        made = deforum.format_batch_name(deforum.load_settings({"batch_name": name}), "20240101000000", 1)
        assert made not in (".", "..", "") and "/" not in made and "\\" not in made, name
    with pytest.raises(deforum.DeforumSettingsError, match="resume_timestring"):
        deforum.load_settings({"resume_from_timestring": True, "resume_timestring": "../../x"})


def test_route_parameters(world):
    """Job ids, preview names and the UI's static and file routes: nothing outside is served, and neither are the
    data dir's own files (config, queue database, models)."""
    net, data = world["net"], world["data"]
    targets = paths_to(world, "secret.txt")[:-1] + [str(data / "config.json"), str(data / "jobs.sqlite3"),
                                                   str(data / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")]
    for path in targets:
        quoted = urllib.parse.quote(path, safe="")
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/", "/static/", "/assets/",
                      "/gradio_api/static/", "/sdstudio/"):
            for spelled in (path, quoted, urllib.parse.quote(path)):
                r = net.get(route + spelled)
                no_secret(r)
                assert r.status_code >= 400 or "text/html" in r.headers.get("content-type", ""), (route, path)
        for kind in ("Checkpoints", "Lora", "Hypernetworks", "Textual Inversion"):
            refused(net.get("/sdstudio/preview", params={"kind": kind, "name": path}))
        for route in (f"/sdstudio/v1/jobs/{quoted}", f"/sdstudio/v1/jobs/{quoted}/images/0",
                      f"/sdstudio/v1/jobs/{quoted}/grids/0", f"/sdstudio/progress/{quoted}",
                      f"/sdstudio/progress/{quoted}/preview", f"/deforum_api/jobs/{quoted}",
                      f"/deforum_api/batches/{quoted}"):
            refused(net.get(route))


def test_a_network_server_refuses_folders_typed_into_the_page(service, tmp_path):
    """Served to the network (--listen: allow_folders off, wired in tests/test_server_flags.py), the page's features
    that read or write a folder of the server's disk are refused before they touch it: img2img's batch folders,
    Extensions > Install from a folder (it installs code), Extras' batch folders."""
    from sdstudio.core.errors import RequestError
    from sdstudio.core.settings import Settings
    from sdstudio.ui.app import StudioUI
    from sdstudio.ui.generation import GenerationTab
    from sdstudio.ui.tabs import ExtensionsTab

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    (folder / "__init__.py").write_text("")
    ui = StudioUI(service, Settings(tmp_path / "config.json"), allow_folders=False)
    shared = "only available when the server is not shared over the network"
    with pytest.raises(RequestError, match=shared):
        GenerationTab(ui, "img2img")._batch_jobs({}, str(folder), str(tmp_path / "out"), "", False, "png")
    with pytest.raises(RequestError, match=shared):
        ExtensionsTab(ui).install_from(str(folder))
    assert not (tmp_path / "out").exists() and not (service.engine.paths.data_dir / "extensions" / "in").exists()
