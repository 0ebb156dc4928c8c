"""What the training tests share: small picture folders, the fixed-noise loss probe, a data dir holding the
demo model, and the API client with its job waiting (imported as ``from train_fixtures import ...``, like
step_hold)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdstudio.eval import shapes

REPO = Path(__file__).parents[1]
DEMO = REPO / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"


def squares(folder: Path, colours, captions: str | list[str] | None = None, *, background: int = 30,
            broken: bool = False) -> Path:
    """64² pictures of a coloured square, ``i.png`` each (the square taller the later the picture), with a
    ``.caption`` beside each: ``captions`` one text for all or one per picture; ``broken`` adds a file that
    is not a picture."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colours):
        a = np.full((64, 64, 3), background, np.uint8)
        a[12 + 4 * i:44, 16:48] = c
        Image.fromarray(a).save(folder / f"{i}.png")
        if captions is not None:
            (folder / f"{i}.caption").write_text(captions if isinstance(captions, str) else captions[i])
    if broken:
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


def plain_colours(folder: Path, names: list[str], caption: str | None = None) -> Path:
    """64² pictures of one plain colour each (red, green, blue...), a ``.txt`` caption beside each when
    ``caption``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        a = np.zeros((64, 64, 3), np.uint8)
        a[:, :, i % 3] = 200
        Image.fromarray(a).save(folder / name)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def fixed_loss(model, ds, draws: int = 3, lora_file=None) -> float:
    """The loss over every batch (of 4) of epoch 0 with fixed noise, several draws, a LoRA file applied when
    given: lower after training means the model learnt its pictures."""
    from sdstudio.engine import lora as lora_ops
    from sdstudio.training.loop import batch_loss

    total, n = 0.0, 0
    nets = [(lora_ops.LoraFile(lora_file, model), 1.0, 1.0)] if lora_file else []
    with torch.no_grad(), lora_ops.applied(model, nets):
        for draw in range(draws):
            gen = torch.Generator().manual_seed(100 + draw)
            for b, indices in enumerate(ds.epoch_batches(0, 4)):
                total += float(batch_loss(model, ds.load_batch(indices, 0, b), gen))
                n += 1
    return total / n


def demo_root(tmp_path_factory, name: str) -> Path:
    """A data dir whose checkpoint folder holds the shipped demo model (linked, or copied)."""
    root = tmp_path_factory.mktemp(name)
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    try:
        os.link(DEMO, root / "models" / "Stable-diffusion" / DEMO.name)
    except OSError:
        shutil.copy(DEMO, root / "models" / "Stable-diffusion" / DEMO.name)
    return root


def demo_engine(root: Path):
    """(engine, file, model): an Engine over ``root`` with the demo model loaded."""
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine

    engine = Engine(Paths(root))
    file, model = engine.load("sdstudio-demo")
    return engine, file, model


def red_circles(folder: Path, names: list[str], caption: str | None = None) -> Path:
    """A large red circle on white at the centre, left, right, top... one picture per name (64²), with a
    ``.txt`` caption beside each when ``caption``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, place in zip(names, ["center", "left", "right", "top"]):
        scene = shapes.Scene("white", (shapes.Thing("red", "circle", "large", place),))
        shapes.render(scene, 64).save(folder / name)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def api_client(data_dir: Path):
    """The API of a server over ``data_dir`` (``--api --nowebui``, user u:p: send ``AUTH``)."""
    from tests.test_server import make_client

    return make_client(data_dir, "--api", "--nowebui", "--api-auth", "u:p")


def wait_job(client, job_id: str, headers: dict, timeout: float = 90.0) -> dict:
    """The job once it is done, failed or cancelled (an AssertionError after ``timeout`` seconds)."""
    deadline = time.time() + timeout
    job = None
    while time.time() < deadline:
        job = client.get(f"/sdstudio/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")
