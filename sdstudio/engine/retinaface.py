"""RetinaFace, the face detector that GFPGAN and CodeFormer users have in ``models/GFPGAN``.

The networks are built here with the module names of the files users have (facexlib's
``detection_Resnet50_Final.pth`` and ``detection_mobilenet0.25_Final.pth``, themselves the Pytorch_Retinaface
layout), so those files load strictly, without torchvision: a ResNet-50 or MobileNet-0.25 body whose
strides 8, 16 and 32 feed a feature pyramid, one SSH context module per level and 1×1 heads giving, for
each of 2 anchors per cell, face/background scores, a box and five landmarks (eyes, nose, mouth corners).

:func:`detect` runs the detector on a picture at its own size (BGR, mean-subtracted, as the weights were
trained) and decodes anchors into boxes and landmarks in pixels, then removes overlapping boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

MEAN_BGR = (104.0, 117.0, 123.0)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # anchor sides (pixels) for the levels at strides 8, 16, 32
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, leaky: float | None = 0.0, groups: int = 1):
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return nn.Sequential(*layers)


def _depthwise(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNet's depthwise 3×3 then pointwise 1×1, each with norm and leaky ReLU (0.1)."""
    dw, pw = _conv_bn(cin, cin, 3, stride, 0.1, groups=cin), _conv_bn(cin, cout, 1, 1, 0.1)
    return nn.Sequential(*dw, *pw)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.downsample = None
        if stride != 1 or cin != width * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Body(nn.Module):
    """ResNet-50 up to its last stage; returns the outputs of stages 2, 3 and 4 (strides 8, 16, 32).
    ``base`` and ``blocks`` give other widths and depths of the same layout (tests build small ones)."""

    def __init__(self, base: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base)
        cin = base
        for i, n in enumerate(blocks):
            width = base * 2 ** i
            layer = [_Bottleneck(cin if j == 0 else width * 4, width, (1 if i == 0 else 2) if j == 0 else 1)
                     for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = width * 4
        self.out_channels = [base * 8, base * 16, base * 32]

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class MobileNetBody(nn.Module):
    """MobileNet-0.25 in three stages (strides 8, 16, 32)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(_conv_bn(3, 8, 3, 2, 0.1), _depthwise(8, 16, 1), _depthwise(16, 32, 2),
                                    _depthwise(32, 32, 1), _depthwise(32, 64, 2), _depthwise(64, 64, 1))
        self.stage2 = nn.Sequential(_depthwise(64, 128, 2), *[_depthwise(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_depthwise(128, 256, 2), _depthwise(256, 256, 1))
        self.out_channels = [64, 128, 256]

    def forward(self, x):
        a = self.stage1(x)
        b = self.stage2(a)
        return [a, b, self.stage3(b)]


class _FPN(nn.Module):
    def __init__(self, channels: list[int], out: int, leaky: float):
        super().__init__()
        for i, c in enumerate(channels):
            setattr(self, f"output{i + 1}", _conv_bn(c, out, 1, 1, leaky))
        self.merge1, self.merge2 = _conv_bn(out, out, 3, 1, leaky), _conv_bn(out, out, 3, 1, leaky)

    def forward(self, feats):
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class _SSH(nn.Module):
    """Context module: a 3×3 branch and stacked 3×3s standing for 5×5 and 7×7, concatenated."""

    def __init__(self, c: int, leaky: float):
        super().__init__()
        self.conv3X3 = _conv_bn(c, c // 2, leaky=None)
        self.conv5X5_1 = _conv_bn(c, c // 4, leaky=leaky)
        self.conv5X5_2 = _conv_bn(c // 4, c // 4, leaky=None)
        self.conv7X7_2 = _conv_bn(c // 4, c // 4, leaky=leaky)
        self.conv7x7_3 = _conv_bn(c // 4, c // 4, leaky=None)

    def forward(self, x):
        mid = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], 1))


class _Head(nn.Module):
    def __init__(self, c: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(c, anchors * per_anchor, 1)

    def forward(self, x):
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    def __init__(self, backbone: str = "resnet50", width: int | None = None, base: int = 64,
                 blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.backbone = backbone
        self.body = ResNet50Body(base, blocks) if backbone == "resnet50" else MobileNetBody()
        out = width or (256 if backbone == "resnet50" else 64)
        leaky = 0.1 if out <= 64 else 0.0
        self.fpn = _FPN(self.body.out_channels, out, leaky)
        self.ssh1, self.ssh2, self.ssh3 = (_SSH(out, leaky) for _ in range(3))
        self.ClassHead = nn.ModuleList(_Head(out, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(out, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(out, 10) for _ in range(3))

    def forward(self, x):
        feats = self.fpn(self.body(x))
        feats = [self.ssh1(feats[0]), self.ssh2(feats[1]), self.ssh3(feats[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1).softmax(-1)
        landmarks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], 1)
        return loc, conf, landmarks

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> RetinaFace:
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        width = sd["fpn.output1.0.weight"].shape[0] if "fpn.output1.0.weight" in sd else None
        if "body.conv1.weight" in sd and width:
            blocks = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"body.layer{i}.")}) for i in range(1, 5))
            model = cls("resnet50", width, sd["body.conv1.weight"].shape[0], blocks)
        elif "body.stage1.0.0.weight" in sd and width:
            model = cls("mobilenet0.25", width=width)
        else:
            raise KeyError("not a RetinaFace detector (no ResNet-50 or MobileNet-0.25 body and feature pyramid)")
        # the backbone's ImageNet classifier (MobileNet's fc) is not part of the detector
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("body.fc.")}, strict=True)
        return model.eval()


def priors(height: int, width: int) -> torch.Tensor:
    """Anchors (centre x, centre y, width, height as fractions of the picture), in the heads' order."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        for i, j in product(range(-(-height // step)), range(-(-width // step))):
            for s in sizes:
                out.append(((j + 0.5) * step / width, (i + 0.5) * step / height, s / width, s / height))
    return torch.tensor(out, dtype=torch.float32)


def decode(loc: torch.Tensor, landmarks: torch.Tensor, anchors: torch.Tensor, width: int, height: int):
    """Boxes (x0, y0, x1, y1) and landmarks (5 × (x, y)) in pixels from the heads' offsets."""
    centre = anchors[:, :2] + loc[:, :2] * VARIANCE[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCE[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1) * torch.tensor([width, height] * 2)
    points = anchors[:, None, :2] + landmarks.view(-1, 5, 2) * VARIANCE[0] * anchors[:, None, 2:]
    return boxes, points * torch.tensor([width, height])


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Indices of the boxes kept, best first, dropping any box overlapping a kept one by more than
    ``threshold`` (intersection over union; sides counted inclusively, +1, as the detector's own code)."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return keep


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray  # 5 × 2: left eye, right eye, nose, left and right mouth corner (pixels)

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks[0] - self.landmarks[1]))


@torch.no_grad()
def detect(model: RetinaFace, image: Image.Image, threshold: float = 0.97, nms_threshold: float = 0.4,
           device: torch.device | None = None) -> list[Face]:
    """The faces in ``image``, most confident first."""
    device = device or next(model.parameters()).device
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    bgr = torch.from_numpy(rgb[..., ::-1] - np.array(MEAN_BGR, dtype=np.float32)).permute(2, 0, 1)[None]
    dtype = next(model.parameters()).dtype
    loc, conf, landmarks = model(bgr.to(device, dtype))
    h, w = rgb.shape[:2]
    boxes, points = decode(loc[0].float().cpu(), landmarks[0].float().cpu(), priors(h, w), w, h)
    scores = conf[0, :, 1].float().cpu().numpy()
    keep = np.flatnonzero(scores > threshold)
    boxes, points, scores = boxes.numpy()[keep], points.numpy()[keep], scores[keep]
    return [Face(tuple(float(v) for v in boxes[i]), float(scores[i]), points[i]) for i in nms(boxes, scores, nms_threshold)]
