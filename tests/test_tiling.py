"""Seamless tiling (``tiling=True``): the picture wraps around, so its left and right edges (and its top
and bottom) meet like neighbouring columns (rows) inside it.

Reference: with circular padding in every convolution of the UNet and the VAE, the whole pipeline is
equivariant to circular shifts (by its downsampling factor), so the column pair across the wrap
(last | first) is distributed like any pair inside, and in particular like the pair across the middle
(the same phase of the downsampling grid). Without tiling the two edges are unrelated. Measured on the
shipped demo model at 128x128, averaged over several seeds so that an object edge falling on one seam
does not decide the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine

DEMO = Path(__file__).parents[1] / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"
SEEDS = range(6)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not DEMO.is_file():
        pytest.skip("the demo model is not in models/Stable-diffusion")
    root = tmp_path_factory.mktemp("tiling")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    target = root / "models" / "Stable-diffusion" / DEMO.name
    try:
        os.link(DEMO, target)
    except OSError:
        target.symlink_to(DEMO)
    return Engine(Paths(root))


def jumps(engine, tiling: bool) -> dict[str, float]:
    """Mean absolute step between pixel columns (x) and rows (y): across the wrap, across the middle,
    and over all neighbouring pairs inside; summed over the seeds."""
    out = dict.fromkeys(("seam_x", "mid_x", "inner_x", "seam_y", "mid_y", "inner_y"), 0.0)
    for seed in SEEDS:
        r = engine.generate(Txt2ImgRequest(prompt="a red circle", steps=8, width=128, height=128, seed=seed,
                                           tiling=tiling))
        a = np.asarray(r.images[0].image).astype(float)
        for axis, name in ((1, "x"), (0, "y")):
            b = np.moveaxis(a, axis, 0)  # the axis across which we step comes first
            n = b.shape[0]
            out[f"seam_{name}"] += np.abs(b[0] - b[-1]).mean()
            out[f"mid_{name}"] += np.abs(b[n // 2] - b[n // 2 - 1]).mean()
            out[f"inner_{name}"] += np.abs(np.diff(b, axis=0)).mean()
    return out


def test_tiled_pictures_wrap_around(engine):
    tiled, plain = jumps(engine, True), jumps(engine, False)
    print("tiled", {k: round(v / len(SEEDS), 2) for k, v in tiled.items()})
    print("plain", {k: round(v / len(SEEDS), 2) for k, v in plain.items()})
    for axis in ("x", "y"):
        seam, mid, inner = tiled[f"seam_{axis}"], tiled[f"mid_{axis}"], tiled[f"inner_{axis}"]
        assert seam < 2.5 * inner and seam < 2 * mid, (axis, tiled)  # the wrap is like a pair inside
        # without tiling the edges do not meet: a jump many times the inner ones
        assert plain[f"seam_{axis}"] > 5 * plain[f"inner_{axis}"], (axis, plain)
        assert seam / inner < plain[f"seam_{axis}"] / plain[f"inner_{axis}"] / 3
        assert seam < 0.75 * plain[f"seam_{axis}"]


def test_tiling_leaves_the_model_as_it_was(engine):
    engine.generate(Txt2ImgRequest(prompt="a red circle", steps=2, width=64, height=64, seed=1, tiling=True))
    _, model = engine.load(None)
    convs = [m for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.padding_mode == "zeros" for m in convs)
