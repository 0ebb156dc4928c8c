"""Shared fixtures: tiny random-weight checkpoints of each family, written once per test worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# float32 everywhere unless a test asks for another precision: the reference comparisons are float32
# (on a CPU with native bfloat16 the default would be bfloat16). Servers the tests start inherit it.
os.environ.setdefault("SDSTUDIO_PRECISION", "full")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one math thread each, or OpenMP threads spin against each other
    # (a 128² job ran ~100x slower in CI that way). The environment carries it to servers the tests start.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from sdstudio.testing.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    for family in ("sd1", "sd2", "sdxl", "sdxl_refiner"):
        write_checkpoint(root / f"tiny-{family}.safetensors", family, "tiny", seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_sd1(tiny_dir) -> Path:
    return tiny_dir / "tiny-sd1.safetensors"


@pytest.fixture(scope="session")
def make_data_root(tmp_path_factory, tiny_dir):
    """A function making a fresh A1111-style data dir with tiny checkpoints hard-linked in (no copies):
    ``make_data_root("x", {"a": "sd1"})`` gives ``models/Stable-diffusion/a.safetensors``."""

    def make(name: str, checkpoints: dict[str, str] | None = None) -> Path:
        root = tmp_path_factory.mktemp(name)
        folder = root / "models" / "Stable-diffusion"
        folder.mkdir(parents=True)
        for stem, family in (checkpoints or {"tiny-sd1": "sd1"}).items():
            os.link(tiny_dir / f"tiny-{family}.safetensors", folder / f"{stem}.safetensors")
        return root

    return make


@pytest.fixture
def data_dir(tmp_path, tiny_sd1) -> Path:
    """A fresh A1111-style data dir holding the tiny SD1 checkpoint (hard-linked, no copy)."""
    ckpt = tmp_path / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    os.link(tiny_sd1, ckpt / "tiny-sd1.safetensors")
    return tmp_path


@pytest.fixture(scope="session")
def session_engine(make_data_root):
    """One engine over a read-only data dir, shared by tests that only generate."""
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine

    return Engine(Paths(make_data_root("engine")))


@pytest.fixture(scope="session")
def controlnet_studio(make_data_root):
    """A Studio over a read-only data dir with the tiny SD 1.x checkpoint, a tiny ControlNet (``tiny-canny``),
    a tiny IP-Adapter (``ip-adapter_tiny``) and its CLIP vision encoder, for tests that only generate."""
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.scripts import Studio
    from sdstudio.testing.controlnet_files import write_controlnet
    from sdstudio.testing.ip_adapter_files import write_clip_vision, write_ip_adapter

    root = make_data_root("controlnet-units")
    folder = root / "models" / "ControlNet"
    write_controlnet(folder / "tiny-canny.safetensors", "sd1", "tiny", seed=3)
    write_ip_adapter(folder / "ip-adapter_tiny.safetensors")
    write_clip_vision(root / "models" / "clip_vision" / "clip_h.safetensors")
    return Studio(Engine(Paths(root)))


@pytest.fixture
def service(data_dir):
    """A running job service (queue in the data dir, one worker) on the tiny SD1 checkpoint."""
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.service.jobs import JobService
    from sdstudio.service.queue import SQLiteJobQueue

    svc = JobService(Engine(Paths(data_dir)), SQLiteJobQueue(data_dir / "jobs.sqlite3")).start()
    yield svc
    svc.stop()
    svc.queue.close()


@pytest.fixture(scope="session")
def free_port():
    """A function giving a TCP port that is free on 127.0.0.1 right now (for tests that start servers)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def inpaint_files():
    """A function writing the inpainting tests' pictures into a folder: ``init.png`` (a red disc on blue,
    ``width``×64) and one mask per name, white inside its box: ``inpaint_files(root, 64, mask=(0, 0, 31, 63))``."""
    from PIL import Image, ImageDraw

    def make(root: Path, width: int = 64, **masks: tuple[int, int, int, int]) -> Path:
        im = Image.new("RGB", (width, 64), (30, 60, 200))
        ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
        im.save(root / "init.png")
        for name, box in masks.items():
            mask = Image.new("L", (width, 64), 0)
            ImageDraw.Draw(mask).rectangle(box, fill=255)
            mask.save(root / f"{name.replace('_', '-')}.png")
        return root

    return make


# The planted detector's one face on a 32² picture: the stride-32 cell's first anchor (256 px), landmarks
# at these offsets (in anchor units: 0.1 × 256 px) from the picture's centre.
REPO = Path(__file__).resolve().parents[1]


def link_shipped(root: Path, files: list[str]) -> Path:
    """A data dir holding the repository's shipped model files (paths relative to it), hard-linked where
    the file system allows, copied otherwise."""
    import shutil

    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(REPO / rel, root / rel)
        except OSError:
            shutil.copy(REPO / rel, root / rel)
    return root


PLANTED_OFFSETS = [(-6, -4), (6, -4), (0, 1), (-4, 5), (4, 5)]


def planted_detector():
    """A small RetinaFace (facexlib's layout) whose heads ignore the picture: only the coarsest level's
    256 px anchors score as faces, with fixed landmark offsets, so a 32² picture has exactly one face."""
    import torch

    from sdstudio.engine.retinaface import RetinaFace

    torch.manual_seed(0)
    model = RetinaFace("resnet50", width=16, base=8, blocks=(1, 1, 1, 1))
    with torch.no_grad():
        for heads in (model.ClassHead, model.BboxHead, model.LandmarkHead):
            for head in heads:
                head.conv1x1.weight.zero_()
                head.conv1x1.bias.zero_()
        for level, head in enumerate(model.ClassHead):  # channels: anchor × (background, face)
            head.conv1x1.bias.copy_(torch.tensor([10.0, -10.0, 10.0, -10.0] if level < 2 else [-10.0, 10.0, 10.0, -10.0]))
        model.LandmarkHead[2].conv1x1.bias[:10] = torch.tensor([v / 25.6 for p in PLANTED_OFFSETS for v in p])
    return model


@pytest.fixture(scope="session")
def face_models():
    """A function writing tiny random-weight face restoration files into a data dir, as users have them:
    ``models/GFPGAN/GFPGANv1.4.pth`` (a pickle with ``params_ema``), ``models/GFPGAN/detection_Resnet50_Final.pth``
    (keys prefixed ``module.``, the planted detector) and ``models/Codeformer/codeformer-v0.1.0.pth``."""
    import torch

    from sdstudio.engine.codeformer import CodeFormer
    from sdstudio.engine.gfpgan import GFPGAN, channels

    def make(root: Path, gfpgan: bool = True, codeformer: bool = True) -> Path:
        folder = root / "models" / "GFPGAN"
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1)
        if gfpgan:
            net = GFPGAN(*channels(512, 2, 1 / 32), style=16, mlp=2)
            torch.save({"params_ema": net.state_dict()}, folder / "GFPGANv1.4.pth")
        torch.save({f"module.{k}": v for k, v in planted_detector().state_dict().items()},
                   folder / "detection_Resnet50_Final.pth")
        if codeformer:
            (root / "models" / "Codeformer").mkdir(parents=True, exist_ok=True)
            net = CodeFormer(nf=8, emb=16, codebook=32, dim=32, heads=8, layers=1)
            torch.save({"params_ema": net.state_dict()}, root / "models" / "Codeformer" / "codeformer-v0.1.0.pth")
        return root

    return make
