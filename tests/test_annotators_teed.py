"""TEED soft edges (softedge_teed): 7_model.pth written in the published layout (TEED's module names and shapes,
written out here), loaded, run through the extension's frame, and checked against a functional forward pass
written here from the paper's description; Safe Steps quantizes as the extension does. softedge_anyline
(MTEED.pth, the same network) merges in lineart_standard's faint lines as the extension does on uint8 maps.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import annotators, preprocessors
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
    p = {p.name: p for p in annotators.preprocessors(tmp_path)}["softedge_teed"]
    assert (preprocessors.detect(p, image, 64, -1, -1) == run(image, 64, 2, -1)).all()  # the unit's -1: 2


# --- softedge_anyline -----------------------------------------------------------------------------------------

def extension_anyline_merge(edges: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """The extension's steps, literally, on its H×W×3 uint8 maps: keep the line map's values in [0, 1], drop
    6-connected 3-D groups under 36 voxels (scipy's labelling, as skimage's remove_small_objects does), then
    the screen blend 1 − (1 − top)(1 − base) where the top is set, in uint8 arithmetic."""
    from scipy import ndimage

    base, top = np.repeat(edges[:, :, None], 3, 2), np.repeat(lines[:, :, None], 3, 2)
    top = np.where(top <= 1, top, 0).astype(np.uint8)
    labels, _ = ndimage.label(top.astype(bool), structure=ndimage.generate_binary_structure(3, 1))
    sizes = np.bincount(labels.ravel())
    keep = (sizes >= 36)[labels] & (labels > 0)
    top = top * keep
    mask = top.astype(bool)
    screened = (np.uint8(1) - (np.uint8(1) - top) * (np.uint8(1) - base)).astype(np.uint8)
    return (base * ~mask + screened * mask).astype(np.uint8)[:, :, 0]


def test_anyline_merge_matches_the_extensions_uint8_steps():
    rng = np.random.default_rng(5)
    edges = rng.integers(0, 256, (60, 70)).astype(np.uint8)
    lines = np.zeros((60, 70), np.uint8)
    lines[5:9, 5:8] = 1  # 12 pixels: 36 voxels over three channels, kept
    lines[20:22, 30:35] = 1  # 10 pixels: dropped
    lines[40, 10:60] = 1  # a long faint line: kept
    lines[41, 10:60] = 2  # brighter lines are not "faint": untouched
    lines[50:55, 50:55] = rng.integers(0, 3, (5, 5)).astype(np.uint8)
    merged = teed.anyline_merge(edges, lines)
    assert (merged == extension_anyline_merge(edges, lines)).all()
    assert (merged[5:9, 5:8] == 1).all() and (merged[40, 10:60] == 1).all()
    assert (merged[20:22, 30:35] == edges[20:22, 30:35]).all() and (merged[41] == edges[41]).all()


def test_anyline_runs_mteed_at_its_resolution_and_merges_the_faint_lines(tmp_path):
    p = {p.name: p for p in annotators.preprocessors(tmp_path)}["softedge_anyline"]
    assert p.control_types == ("SoftEdge",) and p.resolution.value == 1280
    assert [s.detail() for s in p.sliders()][1:] == [{"name": "Safe Steps", "value": 2, "min": 0, "max": 10, "step": 1}]
    write(tmp_path / "TEED" / "7_model.pth", random_weights(teed_layout(), seed=3))
    with pytest.raises(ControlNetError, match=f"put MTEED.pth in {tmp_path / 'TEED'}.*TheMistoAI/MistoLine"):
        p.run(picture(), 64, 2, -1)  # TEED's own file is not MTEED's
    write(tmp_path / "TEED" / "MTEED.pth", random_weights(teed_layout(), seed=4))
    image = np.full((96, 128, 3), 200, np.uint8)  # two black lines, and a patch 3 levels darker: faint lines
    cv2.line(image, (10, 10), (120, 80), (0, 0, 0), 1)
    cv2.line(image, (10, 80), (120, 15), (0, 0, 0), 1)
    image[40:90, 20:70] = 197
    padded, crop = common.resize_with_pad(image, 96)
    net = teed.load(tmp_path / "TEED" / "MTEED.pth")
    for steps in (0, 2):
        expected = crop(extension_anyline_merge(teed.detect(net, padded, steps),
                                                preprocessors.lineart_standard_map(padded)))
        got = p.run(image, 96, steps, -1)
        assert got.shape == (96, 128, 3) and (got[:, :, 0] == expected).all()
        assert (expected != crop(teed.detect(net, padded, steps))).sum() > 12  # the lines did change the map
    assert not (teed.detect(net, padded, 2) == teed.detect(teed.load(tmp_path / "TEED" / "7_model.pth"), padded, 2)).all()
    default = preprocessors.detect(p, image, -1, -1, -1)  # the unit's -1s: 1280 and 2 Safe Steps
    assert default.shape == (1280, 1707, 3)  # 1280 × 128/96
