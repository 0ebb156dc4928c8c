"""M-LSD straight lines (``mlsd_large_512_fp32.pth``, the MobileNetV2 "large" model), the extension's ``mlsd``.

The network reads RGB and a constant fourth channel, all scaled to [-1, 1], and answers at half the input size:
a line-centre score map and, per pixel, the offsets to the segment's two ends. Centres are the 3×3 local
maxima of the sigmoid score among the 200 best; a centre gives a line when its score is over the value
threshold (slider A) and its segment is longer than the distance threshold (slider B, in half-size pixels).
Lines are drawn white, 1 px, on black.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import AnnotatorFile, cached_network

FILE = AnnotatorFile("mlsd_large_512_fp32.pth", "mlsd", "lllyasviel/Annotators (or lllyasviel/ControlNet, "
                     "annotator/ckpts) on the Hugging Face hub")
TOP_K = 200


class _ConvBNReLU(nn.Sequential):
    """Conv, BN, ReLU6; a stride-2 one pads only right and bottom first (TFLite's "same" padding)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, 0 if stride == 2 else (k - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU6())
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [_ConvBNReLU(cin, hidden, k=1)] if expand != 1 else []
        layers += [_ConvBNReLU(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# MobileNetV2's first five stages: expansion, channels, repeats, stride
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
_TAPS = (1, 3, 6, 10, 13)  # the feature indices the decoder reads (strides 2, 4, 8, 16, 16)


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        features: list[nn.Module] = [_ConvBNReLU(4, 32, stride=2)]
        cin = 32
        for expand, cout, repeats, stride in _STAGES:
            for i in range(repeats):
                features.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.features = nn.Sequential(*features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, f in enumerate(self.features):
            x = f(x)
            if i in _TAPS:
                taps.append(x)
        return taps


def _cbr(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation), nn.BatchNorm2d(cout), nn.ReLU())


class _Merge(nn.Module):
    """1×1 projections of a skip (``conv2``) and the deeper map (``conv1``, upsampled 2× unless told not to),
    concatenated."""

    def __init__(self, c_skip: int, c_deep: int, out_skip: int, out_deep: int, upscale: bool = True):
        super().__init__()
        self.conv1 = _cbr(c_deep, out_deep, 1)
        self.conv2 = _cbr(c_skip, out_skip, 1)
        self.upscale = upscale

    def forward(self, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        deep, skip = self.conv1(deep), self.conv2(skip)
        if self.upscale:
            deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((skip, deep), dim=1)


class _Refine(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _cbr(cin, cin, 3)
        self.conv2 = _cbr(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class _Head(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _cbr(cin, cin, 3, dilation=5)
        self.conv2 = _cbr(cin, cin, 3)
        self.conv3 = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDLarge(nn.Module):
    """Module names as in ``mlsd_large_512_fp32.pth`` (``backbone.features.*``, ``block15`` … ``block23``)."""

    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.block15 = _Merge(64, 96, 64, 64, upscale=False)
        self.block16 = _Refine(128, 64)
        self.block17 = _Merge(32, 64, 64, 64)
        self.block18 = _Refine(128, 64)
        self.block19 = _Merge(24, 64, 64, 64)
        self.block20 = _Refine(128, 64)
        self.block21 = _Merge(16, 64, 64, 64)
        self.block22 = _Refine(128, 64)
        self.block23 = _Head(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]


def load(path) -> MLSDLarge:
    return cached_network(path, "mlsd", lambda weights: MLSDLarge())


def decode_lines(maps: torch.Tensor, score_threshold: float, distance_threshold: float) -> np.ndarray:
    """Segments (x0, y0, x1, y1) in input pixels from the network's 1×9×h×w output (channel 0 the centre
    logits, 1-4 the start and end offsets)."""
    w = maps.shape[3]
    heat = torch.sigmoid(maps[:, 0])
    peak = F.max_pool2d(heat, 3, stride=1, padding=1)
    heat = (heat * (peak == heat).float()).reshape(-1)
    scores, indices = torch.topk(heat, min(TOP_K, heat.numel()))
    ys, xs = (indices // w).cpu().numpy(), (indices % w).cpu().numpy()
    scores = scores.cpu().numpy()
    offsets = maps[0, 1:5].float().cpu().numpy().transpose(1, 2, 0)
    lengths = np.sqrt(((offsets[:, :, :2] - offsets[:, :, 2:]) ** 2).sum(-1))
    segments = []
    for y, x, score in zip(ys, xs, scores):
        if score > score_threshold and lengths[y, x] > distance_threshold:
            dx0, dy0, dx1, dy1 = offsets[y, x]
            segments.append([x + dx0, y + dy0, x + dx1, y + dy1])
    return 2 * np.array(segments, dtype=np.float64).reshape(-1, 4)  # half-size → input pixels


@torch.no_grad()
def detect(net: MLSDLarge, image: np.ndarray, score_threshold: float, distance_threshold: float) -> np.ndarray:
    """H×W uint8 white lines of an RGB uint8 picture."""
    h, w = image.shape[:2]
    x = np.concatenate([image.astype(np.float32), np.ones((h, w, 1), np.float32)], axis=2) / 127.5 - 1.0
    param = next(net.parameters())
    maps = net(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()).to(param.device, param.dtype))
    out = np.zeros((h, w), np.uint8)
    for x0, y0, x1, y1 in decode_lines(maps, score_threshold, distance_threshold):
        cv2.line(out, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return out
