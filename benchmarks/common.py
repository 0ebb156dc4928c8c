"""Shared helpers for benchmarks: the full-size random-weight checkpoint and fresh-process timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / "results" / "cache"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"


def demo_data_root(root: Path) -> Path:
    """``root`` as a data dir holding the bundled demo model (hard-linked: no copy)."""
    folder = Path(root) / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    os.link(DEMO_MODEL, folder / DEMO_MODEL.name)
    return Path(root)


def full_sd15(dtype: torch.dtype = torch.float16) -> Path:
    """A full-size SD 1.5-layout random-weight checkpoint (written once, ~2 GB in fp16)."""
    from sdstudio.testing.synthetic import write_checkpoint

    path = CACHE / f"full-sd15-{str(dtype).split('.')[-1]}.safetensors"
    if not path.exists():
        write_checkpoint(path, "sd1", "full", seed=0, dtype=dtype)
    return path


def config_folder(path: Path) -> Path:
    """The local diffusers config folder describing ``path`` (what from_single_file needs offline)."""
    from sdstudio.models.detect import detect
    from sdstudio.models.diffusers_layout import write_config_folder
    from sdstudio.models.safe_load import open_state_dict

    folder = path.with_suffix(".config")
    if not folder.exists():
        write_config_folder(detect(open_state_dict(path).shapes), folder)
    return folder


def in_fresh_process(code: str) -> dict:
    """Run ``code`` in a new interpreter; it must print one JSON object as its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(torch.get_num_threads()),
                              **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}})
    return json.loads(out.stdout.strip().splitlines()[-1])
