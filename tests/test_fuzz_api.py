"""Fuzz every API route from its OpenAPI schema (schemathesis): no input may cause a 5xx."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from sdstudio.cli import build_parser
from sdstudio.server import create_app

EXAMPLES = int(os.environ.get("SDSTUDIO_FUZZ_EXAMPLES", "15"))


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    os.link(tiny_sd1, root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    args = build_parser().parse_args(["serve", "--data-dir", str(root), "--api", "--nowebui", "--limit-steps", "3",
                                      "--limit-pixels", str(128 * 128), "--limit-images", "4"])
    app = create_app(args)
    yield app
    app.state.service.stop()


def operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_no_server_errors(app):
    failures = []
    tried = 0
    for op in operations(app):
        if op.path.endswith("/events"):
            continue  # a long-lived stream; tested in test_api_jobs

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            nonlocal tried
            tried += 1
            try:
                response = case.call(timeout=120)
            except Exception as exc:  # noqa: BLE001 - a hang or a dropped connection is a failure too
                failures.append(f"{case.method} {case.path} {case.body!r:.300}: {type(exc).__name__} {exc}")
                return
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.300}: {response.status_code} "
                                f"{response.text[:300]}")

        fuzz()
    assert tried > 100
    assert not failures, "\n".join(failures[:10])
