"""Anime face segmentation, the extension's ``anime_face_segment`` (label ``seg_anime_face``): the published
``UNet.pth`` is a U-Net whose encoder is torchvision's MobileNetV2 ``features[0:17]`` (split into
``en_block0``-``en_block4``) and whose decoder upsamples ×2 (nearest), convolves, instance-normalizes and
LeakyReLUs back up with skip connections, ending in a 7-class softmax. Built here without torchvision, in its
key layout.

As the extension: the picture (RGB) is resized with PIL's bicubic so its short side is 512 (torchvision's
``Resize(512)``; nothing changes at the default resolution), scaled to [0, 1], segmented, and each pixel takes
the palette colour of its most likely class. The map stays at that size (the extension's frame then cuts it as
if it were at the preprocessor resolution, which only matters away from 512).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .common import AnnotatorFile, cached_network

FILE = AnnotatorFile("UNet.pth", "anime_face_segment",
                     "bdsqlsz/qinglong_controlnet-lllite (Annotators/) on the Hugging Face hub")
SHORT_SIDE = 512
# background, hair, eye, mouth, face, skin, clothes
PALETTE = np.array([(255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255), (0, 255, 0), (0, 255, 255),
                    (255, 0, 255)], np.uint8)
# MobileNetV2 (width 1.0): expansion, channels, repeats, first stride; features 1-16 (17 and the head unused)
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]
_BLOCKS = [(0, 2), (2, 4), (4, 7), (7, 14), (14, 17)]  # features ranges of en_block0-4


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: convolution without bias, batch norm, ReLU6."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = [_conv_bn(cin, hidden, 1)] if expansion != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_features() -> list[nn.Module]:
    """MobileNetV2's features 0-16."""
    features: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
    cin = 32
    for expansion, cout, repeats, stride in _SETTINGS:
        for i in range(repeats):
            features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
            cin = cout
    return features


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1),
                         nn.InstanceNorm2d(cout), nn.LeakyReLU(0.1), nn.Dropout(p=0.2))


class AnimeFaceUNet(nn.Module):
    def __init__(self, classes: int = len(PALETTE)):
        super().__init__()
        features = mobilenet_features()
        for i, (a, b) in enumerate(_BLOCKS):
            setattr(self, f"en_block{i}", nn.Sequential(*features[a:b]))
        self.de_block4 = _up(160, 96)
        self.de_block3 = _up(96 * 2, 32)
        self.de_block2 = _up(32 * 2, 24)
        self.de_block1 = _up(24 * 2, 16)
        self.de_block0 = nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2), nn.Conv2d(16 * 2, classes, 3, padding=1),
                                       nn.Softmax2d())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(5):
            x = getattr(self, f"en_block{i}")(x)
            skips.append(x)
        y = skips[4]
        for i in (4, 3, 2, 1):
            y = getattr(self, f"de_block{i}")(y)
            skip = skips[i - 1]
            y = torch.cat((F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=True), skip), 1)
        return self.de_block0(y)


def load(path) -> AnimeFaceUNet:
    return cached_network(path, "anime_face_segment", lambda weights: AnimeFaceUNet())


def working_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) with the short side at 512 and the long side ``int(512 × long / short)`` (torchvision)."""
    if width <= height:
        return int(SHORT_SIDE * height / width), SHORT_SIDE
    return SHORT_SIDE, int(SHORT_SIDE * width / height)


@torch.no_grad()
def detect(net: AnimeFaceUNet, image: np.ndarray) -> np.ndarray:
    """The palette map of an RGB uint8 picture, at the 512-short-side size."""
    h, w = image.shape[:2]
    size = working_size(h, w)
    if size != (h, w):
        image = np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))
    param = next(net.parameters())
    x = torch.from_numpy(np.ascontiguousarray(image)).to(param.device, torch.float32).permute(2, 0, 1)[None] / 255.0
    scores = net(x)[0].float().cpu().numpy()
    return np.ascontiguousarray(PALETTE[np.argmax(scores, axis=0)])
