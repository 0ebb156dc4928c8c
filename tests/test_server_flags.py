"""Launch flags through the server as ``sdstudio serve`` builds it: ``build_parser`` parses the flags,
``create_app`` / ``serve`` turn them into the app, and the checks go over HTTP (a TestClient, or uvicorn on
a free port for the UI's own protocol). Nothing is switched on by setting attributes by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from sdstudio.cli import build_parser
from sdstudio.server import create_app


def build(data_dir, *flags):
    return create_app(build_parser().parse_args(["serve", "--data-dir", str(data_dir), *flags]))


@pytest.fixture
def client(data_dir):
    """``client(*flags)``: a TestClient on the app those flags build; its job worker is stopped afterwards."""
    apps = []

    def make(*flags):
        apps.append(build(data_dir, *flags))
        return TestClient(apps[-1])

    yield make
    for app in apps:
        app.state.service.stop()


# ---- --gradio-auth / --gradio-auth-path ------------------------------------------------------------------


def login(client, user, password):
    return client.post("/login", data={"username": user, "password": password})


def test_gradio_auth_login(client, tmp_path):
    """--gradio-auth's users and --gradio-auth-path's (A1111's file: one user:password per line or
    comma-separated) may log in; nobody else, and nothing of the page is served before."""
    path = tmp_path / "users.txt"
    path.write_text("ann:one\n\n  bob:two,cid:three  \n", encoding="utf-8")
    ui = client("--gradio-auth", "admin:hunter2,guest:pass:with:colons", "--gradio-auth-path", str(path))
    assert ui.get("/config").status_code == 401  # the page's layout and events need a login
    assert ui.get("/gradio_api/info").status_code == 401
    assert ui.post("/gradio_api/call/run", json={"data": []}).status_code == 401
    assert '"auth_required":true' in ui.get("/").text.replace(" ", "")  # the page itself is the login form
    for user, password in (("admin", "wrong"), ("nobody", "hunter2"), ("guest", "pass"), ("ann", "two"),
                           ("ann", "")):
        assert login(ui, user, password).status_code in (400, 422), (user, password)  # 422: an empty field
        assert ui.get("/config").status_code == 401
    for user, password in (("admin", "hunter2"), ("guest", "pass:with:colons"), ("ann", "one"), ("bob", "two"),
                           ("cid", "three")):
        ui.cookies.clear()
        assert ui.get("/config").status_code == 401
        assert login(ui, user, password).status_code == 200, user
        assert ui.get("/config").status_code == 200 and ui.get("/gradio_api/info").status_code == 200
        assert ui.get("/gradio_api/user").json() == user


def test_gradio_auth_guards_the_pages_own_routes(client, data_dir):
    """A checkpoint's preview picture (the page's /sdstudio/preview route) is part of the UI: behind its login."""
    Image.new("RGB", (8, 8), (1, 2, 3)).save(data_dir / "models" / "Stable-diffusion" / "tiny-sd1.png")
    ui = client("--gradio-auth", "admin:hunter2")
    preview = {"kind": "Checkpoints", "name": "tiny-sd1"}
    assert login(ui, "admin", "hunter2").status_code == 200
    assert ui.get("/sdstudio/preview", params=preview).status_code == 200
    ui.cookies.clear()
    assert ui.get("/sdstudio/preview", params=preview).status_code == 401


def test_no_gradio_auth_no_login(client):
    ui = client()
    assert ui.get("/config").status_code == 200


# ---- --cors-allow-origins / --cors-allow-origins-regex ---------------------------------------------------


def preflight(api, origin):
    return api.options("/sdapi/v1/txt2img", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "content-type"})


@pytest.mark.parametrize("flags, allowed, refused", [
    (["--cors-allow-origins", "https://a.example, https://b.example:8443"],
     ["https://a.example", "https://b.example:8443"], ["https://c.example", "https://b.example", "http://a.example"]),
    (["--cors-allow-origins-regex", r"https://[a-z]+\.example\.org"],
     ["https://app.example.org", "https://x.example.org"], ["https://example.org", "https://app.example.org.evil.com",
                                                           "http://app.example.org", "https://a1.example.org"]),
    (["--cors-allow-origins", "https://a.example", "--cors-allow-origins-regex", r"https://.*\.b\.example"],
     ["https://a.example", "https://x.b.example"], ["https://b.example", "https://evil.example"]),
])
def test_cors_origins(client, flags, allowed, refused):
    api = client("--api", "--nowebui", *flags)
    for origin in allowed:
        r = preflight(api, origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, origin
        assert r.headers["access-control-allow-credentials"] == "true"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = api.get("/sdapi/v1/samplers", headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    for origin in refused:
        assert preflight(api, origin).status_code == 400, origin
        r = api.get("/sdapi/v1/samplers", headers={"Origin": origin})
        assert "access-control-allow-origin" not in r.headers, origin


def test_no_cors_flag_no_cors_headers(client):
    api = client("--api", "--nowebui")
    assert "access-control-allow-origin" not in api.get("/sdapi/v1/samplers",
                                                        headers={"Origin": "https://a.example"}).headers
    assert preflight(api, "https://a.example").status_code == 405  # no CORS layer: OPTIONS is not a route


# ---- --share --------------------------------------------------------------------------------------------


def test_share_is_refused(data_dir, free_port):
    """``sdstudio serve --share`` exits with 2 and says why, before it opens the queue or a port (were it
    served, the command would run until the timeout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "sdstudio", "serve", "--share", "--api", "--data-dir", str(data_dir),
               "--port", str(free_port())]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--share is not available" in done.stderr
    assert not (data_dir / "jobs.sqlite3").exists()


# ---- --listen: folders typed into the page are the server's disk ----------------------------------------


@pytest.fixture
def ui_server(data_dir, free_port):
    """``ui_server(*flags)``: the UI as those flags build it, served by uvicorn on 127.0.0.1; a gradio_client
    on it (its own session, as one browser window)."""
    started = []

    def start(*flags):
        app = build(data_dir, *flags)
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                            timeout_graceful_shutdown=2))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        started.append((srv, thread, app))
        deadline = time.time() + 60
        while not srv.started:
            assert thread.is_alive() and time.time() < deadline, "the server did not come up"
            time.sleep(0.05)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        clients.append(client)
        return client

    clients = []
    yield start
    for client in clients:
        client.close()  # its open event stream would hold the server's shutdown
    for srv, thread, app in started:
        srv.should_exit = True
        thread.join(30)
        app.state.service.stop()


def extras_from_folder(ui: Client, folder, out):
    """Extras > Batch from Directory, as the page does it: the tab's select event sets the mode (a State
    of this session), then Generate runs the tab's function with the typed folders."""
    config = ui.config
    tab = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "extras_batch_directory_tab")
    select = next(d for d in config["dependencies"] if [tab, "select"] in [list(t) for t in d["targets"]])
    ui.predict(api_name="/" + select["api_name"])
    return ui.predict(None, None, str(folder), str(out), 1, 512, 512, True, "None", "None", 0, 0, 0, 0,
                      api_name="/run")


@pytest.mark.parametrize("flags", [["--listen"], ["--server-name", "0.0.0.0"], ["--server-name", "192.168.1.20"]])
def test_network_server_refuses_folders(ui_server, tmp_path, flags):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(folder / "a.png")
    ui = ui_server(*flags)
    with pytest.raises(AppError, match="only available when the server is not shared over the network"):
        extras_from_folder(ui, folder, out)
    assert not out.exists()


@pytest.mark.parametrize("flags", [[], ["--server-name", "localhost"]])
def test_local_server_reads_folders(ui_server, tmp_path, flags):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(folder / "a.png")
    ui = ui_server(*flags)
    extras_from_folder(ui, folder, out)
    assert [p.name for p in out.iterdir()] == ["00000-a.png"]
    assert Image.open(out / "00000-a.png").getpixel((3, 3)) == (200, 0, 0)
