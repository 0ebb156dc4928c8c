"""Driving the UI in headless Chromium (browser tests, the UI benchmark, the README's screenshots).

Debian's ``chromium`` is used through Playwright's ``executable_path`` (nothing is downloaded). The
flags keep Chromium from reaching out: on a closed network its background connections are refused,
many at a time, and it spends CPU on them that the server beside it needs.
"""

from __future__ import annotations

import shutil

CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium_path() -> str | None:
    """The installed Chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright, executable: str | None = None):
    """A headless Chromium browser from a ``sync_playwright()`` handle."""
    path = executable or chromium_path()
    if path is None:
        raise RuntimeError("chromium is not installed (scripts/setup-browser.sh installs it)")
    return playwright.chromium.launch(executable_path=path, args=list(CHROMIUM_ARGS))
