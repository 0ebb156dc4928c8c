"""TEED soft edges (softedge_teed): 7_model.pth written in the published layout (TEED's module names and shapes,
written out here), loaded, run through the extension's frame, and checked against a functional forward pass
written here from the paper's description; Safe Steps quantizes as the extension does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import annotators
from sdstudio.engine.annotators import common, teed
from tests.test_annotators import fresh_annotator_cache, picture, random_weights, write  # noqa: F401 (autouse)

torch.set_num_threads(1)


def teed_layout() -> dict:
    """7_model.pth: every convolution has a bias; transposed convolutions are (in, out, k, k)."""
    convs = {"block_1.conv1": (16, 3, 3), "block_1.conv2": (16, 16, 3), "block_2.conv1": (32, 16, 3),
             "block_2.conv2": (32, 32, 3), "dblock_3.denselayer1.conv1": (48, 32, 3),
             "dblock_3.denselayer1.conv2": (48, 48, 3), "side_1.conv": (32, 16, 1), "pre_dense_3.conv": (48, 32, 1),
             "up_block_1.features.0": (1, 16, 1), "up_block_1.features.2": (1, 1, 2),
             "up_block_2.features.0": (1, 32, 1), "up_block_2.features.2": (1, 1, 2),
             "up_block_3.features.0": (16, 48, 1), "up_block_3.features.2": (16, 16, 4),
             "up_block_3.features.3": (1, 16, 1), "up_block_3.features.5": (1, 1, 4),
             "block_cat.DWconv1": (24, 1, 3), "block_cat.DWconv2": (24, 1, 3)}
    out = {}
    for name, (a, b, k) in convs.items():
        out[f"{name}.weight"] = (a, b, k, k)
        out[f"{name}.bias"] = (b if name.endswith((".2", ".5")) and "up_block" in name else a,)
    return out


def reference_maps(w: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """TEED's forward pass from the paper, on the raw state dict: Smish = x·tanh(ln(1 + σ(x)))."""
    def act(t):
        return t * torch.tanh(torch.log(1 + torch.sigmoid(t)))

    def conv(name, t, stride=1, padding=0, groups=1):
        return F.conv2d(t, w[f"{name}.weight"], w[f"{name}.bias"], stride, padding, groups=groups)

    def up(name, t, n):
        for i in range(n):
            t = act(conv(f"{name}.features.{3 * i}", t))
            t = F.conv_transpose2d(t, w[f"{name}.features.{3 * i + 2}.weight"], w[f"{name}.features.{3 * i + 2}.bias"],
                                   stride=2, padding=(0, 0, 1)[n])
        return t

    b1 = act(conv("block_1.conv2", act(conv("block_1.conv1", x, 2, 1)), 1, 1))
    b2 = conv("block_2.conv2", act(conv("block_2.conv1", b1, 1, 1)), 1, 1)
    down = F.max_pool2d(b2, 3, 2, 1)
    dense_in = down + conv("side_1.conv", b1, 2)
    new = conv("dblock_3.denselayer1.conv2", act(conv("dblock_3.denselayer1.conv1", act(dense_in), 1, 2)))
    b3 = 0.5 * (new + conv("pre_dense_3.conv", down))
    maps = [up("up_block_1", b1, 1), up("up_block_2", b2, 1), up("up_block_3", b3, 2)]
    a = conv("block_cat.DWconv1", act(torch.cat(maps, 1)), 1, 1, groups=3)
    fused = act((conv("block_cat.DWconv2", act(a), 1, 1, groups=24) + a).sum(1, keepdim=True))
    return [*maps, fused]


def test_declared_with_the_extensions_slider_and_file(tmp_path):
    p = {p.name: p for p in annotators.preprocessors(tmp_path)}["softedge_teed"]
    assert p.control_types == ("SoftEdge",) and p.aliases == ()
    assert [s.detail() for s in p.sliders()][1:] == [{"name": "Safe Steps", "value": 2, "min": 0, "max": 10, "step": 1}]
    with pytest.raises(ControlNetError, match=f"put 7_model.pth in {tmp_path / 'TEED'}"):
        p.run(picture(), 64, -1, -1)


def test_the_network_has_the_papers_size_and_the_published_names():
    names = {k: tuple(v.shape) for k, v in teed.TEED().state_dict().items()}
    assert names == teed_layout()
    assert sum(math.prod(s) for s in names.values()) == 58_910  # "TEED: 58K parameters"


def test_loads_the_published_layout_and_matches_the_papers_forward_pass(tmp_path):
    weights = random_weights(teed_layout(), seed=3)
    write(tmp_path / "TEED" / "7_model.pth", weights)
    image = picture()
    padded, crop = common.resize_with_pad(image, 64)
    x = torch.from_numpy(padded).float().permute(2, 0, 1)[None]  # 0-255 as it is: TEED normalizes nothing
    ref = reference_maps(weights, x)
    net = teed.load(tmp_path / "TEED" / "7_model.pth")
    with torch.no_grad():
        ours = net(x)
    assert [tuple(m.shape) for m in ours] == [(1, 1, *padded.shape[:2])] * 4
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the map: the four logits averaged, sigmoid, ×255 truncated; Safe Steps n: ⌊σ·(n+1)⌋/n, clipped
    logits = torch.cat(ref, 1).mean(1)[0].double().numpy()
    sigma = 1 / (1 + np.exp(-logits))
    run = {p.name: p for p in annotators.preprocessors(tmp_path)}["softedge_teed"].run
    soft = run(image, 64, 0, -1)
    assert soft.shape == (64, 80, 3) and (soft[:, :, 0] == soft[:, :, 2]).all()
    expected = crop((sigma * 255).clip(0, 255).astype(np.uint8))
    assert np.abs(soft[:, :, 0].astype(int) - expected).max() <= 1
    for steps in (1, 2, 5):
        quantized = crop(((np.floor(sigma * (steps + 1)) / steps) * 255).clip(0, 255).astype(np.uint8))
        got = run(image, 64, steps, -1)[:, :, 0]
        assert np.mean(got == quantized) > 0.99 and len(np.unique(got)) <= steps + 1
    assert (run(image, 64, -1, -1) == run(image, 64, 2, -1)).all()  # the unit's -1: the default, 2
