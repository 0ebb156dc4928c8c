"""The server: the web UI and/or the A1111-compatible API on one FastAPI app, with A1111's launch flags.

``--listen`` (bind 0.0.0.0), ``--port``, ``--api``, ``--nowebui`` (API only, port 7861 by default as in
A1111), ``--api-auth user:pass[,user2:pass2]`` (HTTP basic auth on the API), ``--gradio-auth`` /
``--gradio-auth-path`` (login for the UI), ``--cors-allow-origins``, ``--share`` (refused: sdstudio
works offline). All generation goes through one durable job queue (``--queue-db``, ``--resume-queue``).

The Deforum extension's flags: ``--deforum-api`` serves its ``/deforum_api`` routes (also without ``--api``;
``--api`` serves them too, since its runs are ordinary queue jobs behind the same ``--api-auth``),
``--deforum-run-now FILE[,FILE]`` queues those settings files' runs at start, and
``--deforum-terminate-after-run-now`` stops the server once they are done (exit status 0 when each succeeded).
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
    g.add_argument("--gradio-auth-path", help="file with user:password lines (or comma-separated) for the UI")
    g.add_argument("--cors-allow-origins", help="comma-separated origins allowed to call the API from a browser")
    g.add_argument("--cors-allow-origins-regex", help="regular expression of origins allowed (CORS)")
    g.add_argument("--queue-db", help="the job queue's SQLite file (default: jobs.sqlite3 in the data dir), or a "
                                      "postgresql://user@host/db URL shared by several API servers")
    g.add_argument("--resume-queue", action="store_true",
                   help="re-run jobs that were running when the server stopped (default: mark them failed)")
    g.add_argument("--queue-owner", help="this server's name in a shared queue (default: the host name; give each "
                                         "server on one host its own)")
    g.add_argument("--queue-lease", type=float, default=60.0,
                   help="seconds after which a shared queue's running job whose server stopped renewing it is "
                        "queued again by another server (once; default 60, 0: never)")
    from .flags import add_worker_flags

    add_worker_flags(g)  # --ray, --workers, --ray-cpu-workers, --output-store
    g.add_argument("--limit-steps", type=int, default=1000, help="most sampling steps one request may ask for")
    g.add_argument("--limit-pixels", type=int, default=4096 * 4096, help="largest width x height a request may ask for")
    g.add_argument("--limit-images", type=int, default=10000, help="most images (batch count x size) per request")
    g.add_argument("--max-request-mb", type=float, default=200.0, help="largest request body accepted (MB)")
    g.add_argument("--localization", help="UI language for this run (e.g. zh_CN; default: the one in Settings)")
    g.add_argument("--deforum-api", action="store_true",
                   help="serve the Deforum extension's /deforum_api routes (--api serves them too)")
    g.add_argument("--deforum-run-now", metavar="FILE[,FILE]",
                   help="comma-separated Deforum settings files to run at start")
    g.add_argument("--deforum-terminate-after-run-now", action="store_true",
                   help="stop the server once the --deforum-run-now runs are done")
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


def credentials_match(users: dict[str, str], user: str, password: str) -> bool:
    """Constant-time password check (the same for the API and the UI)."""
    return user in users and secrets.compare_digest(users[user].encode(), password.encode())


def read_auth_file(path: str | None) -> str:
    """``--gradio-auth-path``: credentials one per line or comma-separated, as A1111 reads them."""
    if not path:
        return ""
    with open(path, encoding="utf-8") as f:
        return ",".join(line.strip() for line in f if line.strip())


def make_settings(engine, path, args: argparse.Namespace):
    """``config.json`` with checks that need the engine (checkpoint and VAE names must exist);
    ``--localization`` overrides the saved language for this run."""
    from .core.settings import SettingError, Settings
    from .models.errors import ModelNotFoundError

    def checkpoint(name):
        return engine.registry.checkpoint(name).title

    def vae(name):
        if name not in ("Automatic", "None"):
            engine.registry.vae(name)  # the lookup jobs use: an unknown name is refused now, not at the next job
        return name

    def language(name):
        from .ui.localization import available

        if name != "None" and name not in available(engine.paths):
            raise SettingError(f"localization: no localization named {name!r}; available: None, "
                               + ", ".join(available(engine.paths)))
        return name

    overrides = {"localization": args.localization} if getattr(args, "localization", None) else {}
    settings = Settings(path, overrides, checks={"sd_model_checkpoint": checkpoint, "sd_vae": vae,
                                                 "localization": language})
    if overrides:
        settings.check(overrides)
    try:
        settings.values["sd_model_checkpoint"] = checkpoint(settings.values["sd_model_checkpoint"] or None)
    except ModelNotFoundError:  # the saved one is gone (or there is none yet): the first one, or nothing
        settings.values["sd_model_checkpoint"] = engine.registry.checkpoints[0].title \
            if engine.registry.checkpoints else None
    return settings


class BodyLimit:
    """Refuses a body over ``max_body`` bytes (by its Content-Length) with 413. A plain ASGI middleware, not
    starlette's BaseHTTPMiddleware: that one hides a client's disconnect from the routes, and the blocking
    txt2img/img2img calls cancel a waiting job when its client hangs up."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
            if length.isdigit() and int(length) > self.max_body:
                from fastapi.responses import JSONResponse

                response = JSONResponse({"error": "RequestTooLarge",
                                         "detail": f"request body of {int(length)} bytes is over the limit of "
                                                   f"{self.max_body} (--max-request-mb)"}, status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(args: argparse.Namespace):
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    from .api import jobs as jobs_api
    from .api.a1111 import make_router
    from .core.errors import StudioError, http_status
    from .engine.generate import Engine
    from .flags import device_options_from, paths_from, studio_from, worker_pool_from
    from .service.catalog import ModelCatalog
    from .service.jobs import JobService
    from .service.pgqueue import open_queue
    from .service.store import PublishingQueue, open_store

    paths = paths_from(args)
    paths.create_layout()
    engine = Engine(paths, device_options_from(args))
    queue = open_queue(args.queue_db, paths.data_dir / "jobs.sqlite3", owner=args.queue_owner)
    settings = make_settings(engine, paths.data_dir / "config.json", args)
    studio, plugins = studio_from(args, engine, list(settings.get("disabled_extensions") or []))
    for info in plugins.infos:
        if info.status == "failed":
            print(f"sdstudio: plug-in {info.name} ({info.path}) left out: {info.error}", file=sys.stderr)
    # --ray / --workers: generation on Ray workers, requests checked against the model catalogue here
    catalog = ModelCatalog(engine.registry)
    pool = worker_pool_from(args, engine, catalog)
    store = open_store(getattr(args, "output_store", None), paths.data_dir)
    if store is not None and pool is None:  # the Ray workers copy their own files into the store
        queue = PublishingQueue(queue, store)
    if pool is not None:
        import atexit

        atexit.register(pool.stop)
    # live previews follow the Settings (also without the UI: /sdapi/v1/progress's current_image)
    service = JobService(engine, queue, resume=args.resume_queue, studio=studio, plugins=plugins,
                         preview_settings=lambda: (settings.get("show_progress_type", "Approx cheap"),
                                                   int(settings.get("show_progress_every_n_steps", 1))),
                         max_queued=lambda: int(settings.get("sdstudio_max_queued_per_client", 50)),
                         workers=pool, catalog=catalog if pool is not None else None, lease=args.queue_lease)
    if service.recovered:
        what = "queued again" if args.resume_queue else "marked failed (use --resume-queue to re-run them)"
        print(f"sdstudio: {len(service.recovered)} job(s) were running when the server stopped: {what}",
              file=sys.stderr)
    service.start()
    limits = {"steps": args.limit_steps, "pixels": args.limit_pixels, "images": args.limit_images}
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
            if credentials_match(api_users, user, password):
                request.state.api_user = user
                return
        raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    app = FastAPI(title="sdstudio", version="0.1.0")
    app.state.service = service
    max_body = int(args.max_request_mb * 1024 * 1024)

    app.add_middleware(BodyLimit, max_body=max_body)

    if args.cors_allow_origins or args.cors_allow_origins_regex:
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=args.cors_allow_origins_regex,
                           allow_methods=["*"], allow_headers=["*"], allow_credentials=True)

    @app.exception_handler(StudioError)
    async def studio_error(request: Request, exc: StudioError):  # our errors: the status their kind says
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=http_status(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # one line, never a traceback to clients
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=500)

    if args.api or args.nowebui:
        from .api import controlnet as controlnet_api
        from .api import merge as merge_api
        from .api import styles as styles_api
        from .api import train as train_api

        guarded = [Depends(check_api_auth)]
        app.include_router(make_router(service, settings, cmd_flags, limits), dependencies=guarded)
        app.include_router(jobs_api.make_router(service, settings.values, limits), dependencies=guarded)
        app.include_router(styles_api.make_router(paths), dependencies=guarded)
        app.include_router(controlnet_api.make_router(service, settings.values), dependencies=guarded)
        app.include_router(train_api.make_router(service, settings.values), dependencies=guarded)
        app.include_router(merge_api.make_router(service), dependencies=guarded)
        for factory in plugins.routes:  # a plug-in's own routes (a broken factory: reported, left out)
            try:
                app.include_router(factory(service), dependencies=guarded)
            except Exception as exc:  # noqa: BLE001
                print(f"sdstudio: a plug-in's API routes were left out: {type(exc).__name__}: {exc}", file=sys.stderr)
    if args.api or args.nowebui or getattr(args, "deforum_api", False):
        from .api import deforum as deforum_api

        app.include_router(deforum_api.make_router(service, settings.values, limits), dependencies=[Depends(check_api_auth)])
    app.state.deforum_run_now = []
    if getattr(args, "deforum_run_now", None):
        from .api import deforum as deforum_api

        files = [f.strip() for f in args.deforum_run_now.split(",") if f.strip()]
        app.state.deforum_run_now = deforum_api.run_now(service, files, settings.get("sd_model_checkpoint") or None)
        print(f"sdstudio: --deforum-run-now queued {len(files)} Deforum run(s)", file=sys.stderr)
    if not args.nowebui:
        import gradio as gr
        from starlette.routing import Mount

        from .ui import app as ui_app

        ui_users = parse_credentials(",".join(filter(None, [args.gradio_auth, read_auth_file(args.gradio_auth_path)])))
        auth = (lambda u, p: credentials_match(ui_users, u, p)) if ui_users else None
        local = not args.listen and (args.server_name or "127.0.0.1") in ("127.0.0.1", "localhost", "::1")
        ui = ui_app.StudioUI(service, settings, limits, allow_folders=local)
        mounted: dict[str, object] = {}

        def check_ui_login(request: Request) -> None:
            """The page's own routes sit behind the UI's login as the page does (gradio's session cookie)."""
            gradio_app = mounted.get("app")
            if auth is None or gradio_app is None:
                return
            cookie = gradio_app.cookie_id
            token = request.cookies.get(f"access-token-{cookie}") or \
                request.cookies.get(f"access-token-unsecure-{cookie}")
            if gradio_app.tokens.get(token) is None:
                raise HTTPException(401, "log in to the web UI first (--gradio-auth)")

        # the page's own small JSON routes (localization, previews, its jobs' progress)
        app.include_router(ui.router(), dependencies=[Depends(check_ui_login)])
        app = gr.mount_gradio_app(app, ui.build(), path="/", auth=auth, **ui_app.page_assets())
        mounted["app"] = next(r.app for r in app.routes if isinstance(r, Mount) and r.path in ("", "/"))
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
    if host not in ("127.0.0.1", "localhost", "::1"):
        if (args.api or args.nowebui) and not args.api_auth:
            print("warning: the API is open to the network without --api-auth: anyone who can reach this "
                  "machine can use it", file=sys.stderr)
        if not args.nowebui and not (args.gradio_auth or args.gradio_auth_path):
            print("warning: the UI is open to the network without --gradio-auth", file=sys.stderr)
    port = args.port or (7861 if args.nowebui else 7860)
    from .core.settings import SettingError
    from .service.jobs import JobError
    from .service.pgqueue import QueueDatabaseError
    from .service.ray_workers import WorkerSetupError
    from .service.store import StoreError

    try:
        app = create_app(args)
    except (SettingError, JobError, WorkerSetupError, StoreError, QueueDatabaseError, ValueError) as exc:
        print(f"sdstudio: {exc}", file=sys.stderr)
        return 2
    what = "API" if args.nowebui else "UI" + (" and API" if args.api else "")
    print(f"sdstudio: serving the {what} at http://{host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    outcome = {"ok": True}
    run_now = app.state.deforum_run_now
    if run_now and args.deforum_terminate_after_run_now:
        import threading

        from .api.deforum import wait_all

        def stop_when_done() -> None:
            outcome["ok"] = wait_all(app.state.service, run_now)
            print("sdstudio: the --deforum-run-now runs are done; stopping (--deforum-terminate-after-run-now)",
                  file=sys.stderr, flush=True)
            server.should_exit = True

        threading.Thread(target=stop_when_done, name="deforum-run-now", daemon=True).start()
    server.run()
    return 0 if outcome["ok"] else 1
