"""Installing a plug-in from this machine (sdstudio works offline): a folder is copied into the data dir's
``extensions/``; a wheel is installed into the running Python with pip, without fetching anything."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


class InstallError(ValueError):
    """The source cannot be installed; the message says why."""


def install(source: str, extensions_dir: Path) -> str:
    """Install ``source`` (a plug-in folder or a ``.whl``); returns where it went."""
    path = Path(source.strip()).expanduser()
    if not source.strip() or not path.exists():
        raise InstallError(f"{source!r}: no such folder or file")
    if path.is_dir():
        if not ((path / "sdstudio_plugin.py").is_file() or (path / "__init__.py").is_file()):
            raise InstallError(f"{path}: not a plug-in folder (it needs sdstudio_plugin.py or __init__.py with "
                               "register(api))")
        target = Path(extensions_dir) / path.name
        if target.exists():
            raise InstallError(f"{target} exists already; remove it first to reinstall")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
        return str(target)
    if path.suffix != ".whl":
        raise InstallError(f"{path}: a plug-in is a folder or a .whl file")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise InstallError(f"pip could not install {path.name}: {done.stderr.strip().splitlines()[-1:]}")
    return f"{path.name} (Python package)"
