"""The server: the web UI and/or the A1111-compatible API on one FastAPI app, with A1111's launch flags.

``--listen`` (bind 0.0.0.0), ``--port``, ``--api``, ``--nowebui`` (API only, port 7861 by default as in
A1111), ``--api-auth user:pass[,user2:pass2]`` (HTTP basic auth on the API), ``--gradio-auth`` (login
for the UI), ``--share`` (refused: sdstudio works offline).
"""

import argparse
import base64
import logging
import os
import secrets
import sys

from starlette.requests import Request

log = logging.getLogger(__name__)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server (A1111 names)")
    g.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 so other machines can connect")
    g.add_argument("--server-name", help="host name or address to bind")
    g.add_argument("--port", type=int, help="port (default 7860, or 7861 with --nowebui)")
    g.add_argument("--api", action="store_true", help="serve the /sdapi/v1 API beside the UI")
    g.add_argument("--nowebui", action="store_true", help="serve only the API")
    g.add_argument("--api-auth", help="user:password[,user2:password2] required for the API")
    g.add_argument("--gradio-auth", help="user:password[,user2:password2] required for the UI")
    g.add_argument("--share", action="store_true", help="(not available: sdstudio works offline)")
    g.add_argument("--autolaunch", action="store_true", help="(ignored)")
    g.add_argument("--enable-insecure-extension-access", action="store_true", help="(ignored)")


def parse_credentials(text: str | None) -> dict[str, str]:
    creds: dict[str, str] = {}
    for pair in (text or "").split(","):
        pair = pair.strip()
        if not pair:
            continue
        if ":" not in pair:
            raise ValueError(f"credentials must look like user:password, got {pair!r}")
        user, password = pair.split(":", 1)
        creds[user] = password
    return creds


def create_app(args: argparse.Namespace):
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    from .api.a1111 import make_router
    from .cli import device_options_from, paths_from
    from .engine.txt2img import Engine
    from .service.state import JobState

    paths = paths_from(args)
    paths.create_layout()
    engine = Engine(paths, device_options_from(args))
    state = JobState()
    first = engine.registry.checkpoints[0].title if engine.registry.checkpoints else None
    options = {"sd_model_checkpoint": first, "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
               "samples_format": "png", "randn_source": "GPU", "eta_noise_seed_delta": 0}
    secret = {"api_auth", "gradio_auth"}  # never echoed back by /cmd-flags
    cmd_flags = {k: ("***" if k in secret and v else v) for k, v in vars(args).items() if k != "func"}
    api_users = parse_credentials(args.api_auth)

    def check_api_auth(request: Request) -> None:
        if not api_users:
            return
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                user, password = "", ""
            if user in api_users and secrets.compare_digest(api_users[user], password):
                return
        raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    app = FastAPI(title="sdstudio", version="0.1.0")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # one line, never a traceback to clients
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=500)

    if args.api or args.nowebui:
        from .api import styles as styles_api

        app.include_router(make_router(engine, state, options, cmd_flags), dependencies=[Depends(check_api_auth)])
        app.include_router(styles_api.make_router(paths), dependencies=[Depends(check_api_auth)])
    if not args.nowebui:
        import gradio as gr

        from .ui.txt2img_page import build

        ui_users = parse_credentials(args.gradio_auth)
        auth = (lambda u, p: u in ui_users and secrets.compare_digest(ui_users[u], p)) if ui_users else None
        app = gr.mount_gradio_app(app, build(engine, state), path="/", auth=auth)
    return app


def serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.share:
        print("--share is not available: sdstudio works offline. Use --listen to serve your local network.",
              file=sys.stderr)
        return 2
    import uvicorn

    host = args.server_name or ("0.0.0.0" if args.listen else "127.0.0.1")
    port = args.port or (7861 if args.nowebui else 7860)
    app = create_app(args)
    what = "API" if args.nowebui else "UI" + (" and API" if args.api else "")
    print(f"sdstudio: serving the {what} at http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
