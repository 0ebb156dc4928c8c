"""LeReS relative depth (AdelaiDepth's ``res101.pth``: a ResNeXt-101 32×8d encoder and its fusion decoder), the
extension's ``depth_leres``. The ResNeXt is built here (no torchvision) with the module names the file uses.

As the extension runs it: the picture goes in BGR, as 0-255 values normalized with the ImageNet mean and
deviation (torchvision's ``ToTensor`` leaves a float array unscaled), and the prediction is min-max stretched to
16 bits, brought to 8 (``convertScaleAbs``), cut below "Remove Near %" of 255, inverted (near is white), and cut
below "Remove Background %" of 255. The extension never puts this network in eval mode, so its batch norms
normalize with the picture's own statistics rather than the stored running ones (which also makes the unscaled
input harmless); :class:`_BatchStatNorm` does the same, without changing the stored statistics.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import AnnotatorFile, cached_network

FILE = AnnotatorFile("res101.pth", "leres")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LAYERS = (3, 4, 23, 3)  # ResNeXt-101
GROUPS, WIDTH_PER_GROUP = 32, 8


class _BatchStatNorm(nn.BatchNorm2d):
    """BatchNorm normalizing with the batch's statistics (training-mode arithmetic) in eval too; the file's
    running statistics are loaded and kept, unused, as they are in the extension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        width = planes * WIDTH_PER_GROUP // 64 * GROUPS
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = _BatchStatNorm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=GROUPS, bias=False)
        self.bn2 = _BatchStatNorm(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = _BatchStatNorm(planes * 4)
        self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                        _BatchStatNorm(planes * 4)) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNeXt(nn.Module):
    """The encoder: features after each of the four stages (strides 4, 8, 16, 32; 256-2048 channels)."""

    def __init__(self, layers: tuple[int, ...] = LAYERS):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = _BatchStatNorm(64)
        cin = 64
        for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512)), 1):
            stride = 1 if i == 1 else 2
            stage = [_Bottleneck(cin, planes, stride, downsample=True)]
            stage += [_Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            cin = planes * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        features = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            features.append(x)
        return features


class _FTB(nn.Module):
    """Feature transfer block: 3×3 to ``mid`` channels plus a residual ReLU-conv-BN-ReLU-conv branch, ReLU. The
    branch's first ReLU works in place in the original, so the residual it is added to is rectified too."""

    def __init__(self, cin: int, mid: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1)
        self.conv_branch = nn.Sequential(nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1), _BatchStatNorm(mid),
                                         nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return torch.relu(x + self.conv_branch(x))


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _FFM(nn.Module):
    """Feature fusion: the skip through an FTB, plus the deeper map, through another FTB, upsampled 2×."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.ftb1 = _FTB(cin, mid)
        self.ftb2 = _FTB(mid, cout)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return _up2(self.ftb2(self.ftb1(low) + high))


class _AO(nn.Module):
    """Adaptive output: 3×3 to half the channels, BN, ReLU, 3×3 to one channel, upsampled 2×."""

    def __init__(self, cin: int):
        super().__init__()
        self.adapt_conv = nn.Sequential(nn.Conv2d(cin, cin // 2, 3, padding=1), _BatchStatNorm(cin // 2), nn.ReLU(),
                                        nn.Conv2d(cin // 2, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _up2(self.adapt_conv(x))


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _FTB(2048, 512)
        self.conv1 = nn.Conv2d(512, 256, 3, padding=1)
        self.ffm2 = _FFM(1024, 256, 256)
        self.ffm1 = _FFM(512, 256, 256)
        self.ffm0 = _FFM(256, 256, 256)
        self.outconv = _AO(256)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = _up2(self.conv1(self.conv(features[3])))
        x = self.ffm2(features[2], x)
        x = self.ffm1(features[1], x)
        x = self.ffm0(features[0], x)
        return self.outconv(x)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ResNeXt()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)


class _DepthModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_modules = _Encoder()
        self.decoder_modules = _Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_modules(self.encoder_modules(x))


class LeReS(nn.Module):
    """Module names as in ``res101.pth``'s ``depth_model`` (``depth_model.encoder_modules.encoder.layer1.0…``)."""

    def __init__(self):
        super().__init__()
        self.depth_model = _DepthModel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depth_model(x)


def load(path) -> LeReS:
    return cached_network(path, "leres", lambda weights: LeReS(), wrappers=("depth_model",))


@torch.no_grad()
def predict(net: LeReS, image: np.ndarray) -> np.ndarray:
    """The raw H×W prediction for an RGB uint8 picture (sides multiples of 32)."""
    param = next(net.parameters())
    bgr = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1]).astype(np.float32)).permute(2, 0, 1)
    x = (bgr - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    depth = net(x[None].to(param.device, param.dtype))[0, 0].float().cpu().numpy()
    if depth.shape != image.shape[:2]:
        depth = cv2.resize(depth, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)
    return depth


def depth_map(depth: np.ndarray, remove_near: float = 0.0, remove_background: float = 0.0) -> np.ndarray:
    """The extension's 8-bit map of a prediction: 16-bit min-max stretch (truncated), scaled to 8 bits
    (rounded), values at or under ``remove_near`` % of 255 zeroed, inverted, then those at or under
    ``remove_background`` % zeroed."""
    low, high = depth.min(), depth.max()
    if high - low > np.finfo("float").eps:
        stretched = 65535 * (depth - low) / (high - low)
    else:
        stretched = np.zeros(depth.shape)
    out = cv2.convertScaleAbs(stretched.astype("uint16"), alpha=255.0 / 65535.0)
    if remove_near != 0:
        out = cv2.threshold(out, remove_near / 100 * 255, 255, cv2.THRESH_TOZERO)[1]
    out = cv2.bitwise_not(out)
    if remove_background != 0:
        out = cv2.threshold(out, remove_background / 100 * 255, 255, cv2.THRESH_TOZERO)[1]
    return out


def detect(net: LeReS, image: np.ndarray, remove_near: float = 0.0, remove_background: float = 0.0) -> np.ndarray:
    return depth_map(predict(net, image), remove_near, remove_background)
