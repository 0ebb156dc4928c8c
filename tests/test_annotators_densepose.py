"""DensePose (densepose, densepose_parula): torchvision's nms and roi_align as we define them, checked against
scalar references written from torchvision's kernels; TorchScript files calling them load and run; a TorchScript
stand-in with the published file's interface (3×H×W uint8 in; boxes, coarse and fine segmentation, U, V out)
gives the extension's map, part by part and colour by colour."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine.annotators import densepose
from tests.test_annotators import fresh_annotator_cache, picture  # noqa: F401 (autouse)

torch.set_num_threads(1)
densepose.register_torchvision_ops()
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # writing the test files


def _bilinear(f: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's roi_align bilinear_interpolate, one point, all channels."""
    height, width = f.shape[1:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(f.shape[0], dtype=f.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * f[:, y_low, x_low] + hy * lx * f[:, y_low, x_high] + ly * hx * f[:, y_high, x_low] + \
        ly * lx * f[:, y_high, x_high]


def _roi_align_reference(x, rois, scale, ph, pw, ratio, aligned):
    out = torch.zeros(len(rois), x.shape[1], ph, pw)
    offset = 0.5 if aligned else 0.0
    for n, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        sw, sh = x1 * scale - offset, y1 * scale - offset
        rw, rh = x2 * scale - offset - sw, y2 * scale - offset - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = ratio if ratio > 0 else math.ceil(rh / ph)
        gw = ratio if ratio > 0 else math.ceil(rw / pw)
        count = max(gh * gw, 1)
        for i in range(ph):
            for j in range(pw):
                total = torch.zeros(x.shape[1])
                for iy in range(gh):
                    yy = sh + i * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        xx = sw + j * bw + (ix + 0.5) * bw / gw
                        total += _bilinear(x[int(b)], yy, xx)
                out[n, :, i, j] = total / count
    return out


def test_roi_align_is_torchvisions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 10, generator=g)
    rois = torch.tensor([[0, 1.2, 0.7, 6.3, 5.1], [1, -3.0, -2.0, 4.0, 9.5], [0, 7.5, 8.0, 14.0, 30.0],
                         [1, 2.0, 2.0, 2.2, 2.1]])
    for scale, ph, pw, ratio, aligned in ((1.0, 2, 3, 0, True), (0.5, 4, 4, 2, False), (1.0, 3, 2, 0, False),
                                          (2.0, 2, 2, 1, True)):
        ours = torch.ops.torchvision.roi_align(x, rois, scale, ph, pw, ratio, aligned)
        assert torch.allclose(ours, _roi_align_reference(x, rois, scale, ph, pw, ratio, aligned), atol=1e-5), \
            (scale, ph, pw, ratio, aligned)


def test_nms_is_torchvisions():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(40, 2, generator=g) * 20], dim=1)
    scores = torch.rand(40, generator=g)
    keep = torch.ops.torchvision.nms(boxes, scores, 0.4)
    # by definition: in score order, each kept box overlaps no earlier kept one by more than 0.4; each dropped
    # box overlaps some kept box with a higher score by more than 0.4
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    b, s = boxes.tolist(), scores.tolist()
    kept = keep.tolist()
    assert kept == sorted(kept, key=lambda i: -s[i])
    for n, i in enumerate(kept):
        assert all(iou(b[i], b[j]) <= 0.4 for j in kept[:n])
    for i in set(range(40)) - set(kept):
        assert any(iou(b[i], b[j]) > 0.4 and s[j] >= s[i] for j in kept)
    assert torch.ops.torchvision.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


class _UsesOps(torch.nn.Module):
    def forward(self, x: torch.Tensor, rois: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor):
        return torch.ops.torchvision.roi_align(x, rois, 0.5, 2, 2, 0, True), torch.ops.torchvision.nms(boxes, scores, 0.5)


def test_a_torchscript_file_calling_the_operators_loads_and_runs(tmp_path):
    path = tmp_path / "uses_ops.torchscript"
    torch.jit.save(torch.jit.script(_UsesOps()), str(path))
    model = densepose.load(path)
    x, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0, 1.0, 1.0, 9.0, 7.0]])
    boxes, scores = torch.tensor([[0, 0, 10, 10.0], [1, 1, 10, 10], [20, 20, 30, 30]]), torch.tensor([0.9, 0.8, 0.7])
    pooled, keep = model(x, rois, boxes, scores)
    assert torch.allclose(pooled, densepose.roi_align(x, rois, 0.5, 2, 2, 0, True)) and keep.tolist() == [0, 2]
    (tmp_path / "broken.torchscript").write_bytes(b"PK not really")
    from sdstudio.models.errors import ModelFileError

    with pytest.raises(ModelFileError, match="broken.torchscript: not a readable TorchScript file"):
        densepose.load(tmp_path / "broken.torchscript")


class _StandIn(torch.nn.Module):
    """The published graph's interface with fixed detections: two people, the second overlapping the first."""

    def __init__(self):
        super().__init__()
        coarse = torch.zeros(2, 2, 8, 8)
        coarse[:, 1, 2:6, 2:6] = 5.0  # body in the middle of each box
        fine = torch.zeros(2, 25, 8, 8)
        fine[0, 3] = 1.0  # person 0: part 3 everywhere
        fine[1, 14, :, :4] = 1.0  # person 1: part 14 on the left, part 24 on the right
        fine[1, 24, :, 4:] = 1.0
        self.register_buffer("boxes", torch.tensor([[10.4, 20.0, 74.9, 100.0], [50.0, 30.2, 130.0, 90.0]]))
        self.register_buffer("coarse", coarse)
        self.register_buffer("fine", fine)

    def forward(self, image: torch.Tensor):
        zero = image.float().mean() * 0.0
        uv = torch.zeros(2, 25, 8, 8) + zero
        return self.boxes + zero, self.coarse + zero, self.fine + zero, uv, uv


def _expected_colour(label: int, cmap) -> tuple[int, int, int]:
    value = np.uint8(np.clip(label * 255.0 / 24, 0, 255))
    bgr = cv2.applyColorMap(np.full((1, 1), value, np.uint8), cmap)[0, 0]
    return int(bgr[2]), int(bgr[1]), int(bgr[0])


def test_the_map_colours_each_part_as_the_extension(tmp_path):
    path = tmp_path / "densepose" / densepose.FILE.name
    path.parent.mkdir()
    torch.jit.save(torch.jit.script(_StandIn()), str(path))
    model = densepose.load(path)
    image = np.zeros((128, 160, 3), np.uint8)
    for cmap, code in (("viridis", cv2.COLORMAP_VIRIDIS), ("parula", cv2.COLORMAP_PARULA)):
        out = densepose.detect(model, image, cmap)
        assert out.shape == (128, 160, 3) and out.dtype == np.uint8
        background = (68, 1, 84) if cmap == "viridis" else (0, 0, 0)
        assert tuple(out[2, 2]) == background and tuple(out[120, 150]) == background
        # person 0's box is (10, 20, 64, 80) whole pixels; its body the middle half: part 3 where person 1 is not
        assert tuple(out[60, 30]) == _fix(_expected_colour(3, code), cmap)
        # person 1 comes second, painted over person 0 where its body is: its left part 14, right part 24
        assert tuple(out[60, 80]) == _fix(_expected_colour(14, code), cmap)
        assert tuple(out[60, 100]) == _fix(_expected_colour(24, code), cmap)
        # outside person 1's body (its box's top rows) person 0 shows through
        assert tuple(out[35, 55]) == _fix(_expected_colour(3, code), cmap)
    labels = densepose.part_labels(torch.tensor([10.4, 20.0, 74.9, 100.0]), _StandIn().coarse[0], _StandIn().fine[0])
    assert labels[0] == (10, 20, 64, 80) and labels[1].shape == (80, 64)


def _fix(rgb: tuple[int, int, int], cmap: str) -> tuple[int, int, int]:
    """The extension's viridis touch-up: a 0 channel becomes 68 / 1 / 84."""
    return tuple(v or (68, 1, 84)[i] for i, v in enumerate(rgb)) if cmap == "viridis" else rgb


def test_the_preprocessors_and_a_missing_file(tmp_path):
    from sdstudio.engine.preprocessors import builtin, detect

    registry = builtin(tmp_path)
    for name in ("densepose", "densepose_parula"):
        pre = registry.get(name)
        with pytest.raises(ControlNetError, match=rf"needs densepose_r50_fpn_dl.torchscript: put .* in "
                                                  rf"{tmp_path / 'densepose'}"):
            detect(pre, np.zeros((64, 64, 3), np.uint8), 512, -1, -1)
    (tmp_path / "densepose").mkdir()
    torch.jit.save(torch.jit.script(_StandIn()), str(tmp_path / "densepose" / densepose.FILE.name))
    out = detect(registry.get("densepose"), np.zeros((100, 200, 3), np.uint8), 128, -1, -1)
    assert out.shape == (128, 256, 3)  # at the resolution, the padding cut off
