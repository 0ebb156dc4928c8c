"""Surface normals with Bae et al.'s network (``scannet.pt``), the extension's ``normal_bae``: an EfficientNet-B5
encoder (geffnet's TensorFlow-compatible "tf_efficientnet_b5_ap", built here without timm/geffnet) and a decoder
that upsamples with skip connections and refines its prediction at 1/8, 1/4, 1/2 and full size.

The encoder's blocks are read from the file's shapes (which blocks expand, their kernels and channels); only the
strides are fixed (EfficientNet's: stages 2, 3, 4 and 6 start with stride 2). Convolutions pad as TensorFlow's
"SAME" (stride 2: the extra pixel on the bottom/right), batch norms use eps 1e-3, activations are swish. The
decoder runs as in its test mode: every pixel is refined (no point sampling). The picture goes in RGB, in
[0, 1], ImageNet-normalized; the map is the first three channels of the full-size output (a unit normal),
mapped from [-1, 1] to 0-255.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network

FILE = AnnotatorFile("scannet.pt", "normal_bae")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # EfficientNet's first-block stride per stage
_BN_EPS = 1e-3
_PREFIX = "encoder.original_model."


def _same_pad(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" padding for a k×k convolution at ``stride``: total max((⌈n/s⌉-1)s + k - n, 0), the odd
    pixel after."""
    h, w = x.shape[-2:]
    ph = max((-(h // -stride) - 1) * stride + k - h, 0)
    pw = max((-(w // -stride) - 1) * stride + k - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class _Conv(nn.Conv2d):
    """A bias-free convolution padded as "SAME" (symmetric k//2 at stride 1, TensorFlow's rule at stride 2)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, k // 2 if stride == 1 else 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = _same_pad(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS)


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.conv_expand(s))


class _Block(nn.Module):
    """EfficientNet's MBConv: an optional 1×1 expansion (the inverted-residual blocks; the first stage's
    depthwise-separable ones have none), a depthwise k×k, squeeze-excite, a 1×1 projection; a residual when
    the shape is kept."""

    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, reduced: int, expand: bool):
        super().__init__()
        self.expand = expand
        if expand:
            self.conv_pw = _Conv(cin, mid, 1)
            self.bn1 = _bn(mid)
            self.conv_dw = _Conv(mid, mid, k, stride, groups=mid)
            self.bn2 = _bn(mid)
            self.se = _SqueezeExcite(mid, reduced)
            self.conv_pwl = _Conv(mid, cout, 1)
            self.bn3 = _bn(cout)
        else:
            self.conv_dw = _Conv(cin, cin, k, stride, groups=cin)
            self.bn1 = _bn(cin)
            self.se = _SqueezeExcite(cin, reduced)
            self.conv_pw = _Conv(cin, cout, 1)
            self.bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand:
            y = F.silu(self.bn1(self.conv_pw(x)))
            y = self.se(F.silu(self.bn2(self.conv_dw(y))))
            y = self.bn3(self.conv_pwl(y))
        else:
            y = self.se(F.silu(self.bn1(self.conv_dw(x))))
            y = self.bn2(self.conv_pw(y))
        return y + x if self.residual else y


class EfficientNet(nn.Module):
    """The encoder; :meth:`forward` returns what the decoder reads: stages 1, 2, 3 and 5 and the head
    convolution's output (before its batch norm)."""

    def __init__(self, stages: list[list[tuple[int, int, int, int, int, bool]]], stem: int, head: int):
        super().__init__()
        self.conv_stem = _Conv(3, stem, 3, 2)
        self.bn1 = _bn(stem)
        blocks = []
        for s, stage in enumerate(stages):
            blocks.append(nn.Sequential(*[_Block(cin, mid, cout, k, STAGE_STRIDES[s] if i == 0 else 1, red, exp)
                                          for i, (cin, mid, cout, k, red, exp) in enumerate(stage)]))
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = _Conv(stages[-1][-1][2], head, 1)
        self.bn2 = _bn(head)  # in the file, unused by the decoder

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.silu(self.bn1(self.conv_stem(x)))
        taps = []
        for stage in self.blocks:
            x = stage(x)
            taps.append(x)
        return [taps[0], taps[1], taps[2], taps[4], self.conv_head(x)]


class _Encoder(nn.Module):
    def __init__(self, net: EfficientNet):
        super().__init__()
        self.original_model = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.original_model(x)


class _Up(nn.Module):
    """Upsample to the skip's size (bilinear, corners aligned), concatenate, two conv-BN-LeakyReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self._net = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU())

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([x, skip], dim=1))


def _refiner(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, 128, 1), nn.ReLU(), nn.Conv1d(128, 128, 1), nn.ReLU(),
                         nn.Conv1d(128, 128, 1), nn.ReLU(), nn.Conv1d(128, 4, 1))


def normalize_normals(out: torch.Tensor) -> torch.Tensor:
    """Channels 0-2 to a unit vector (+1e-10 in the norm), channel 3 (the concentration) to elu + 1.01."""
    x, y, z, kappa = torch.split(out, 1, dim=1)
    norm = torch.sqrt(x ** 2 + y ** 2 + z ** 2) + 1e-10
    return torch.cat([x / norm, y / norm, z / norm, F.elu(kappa) + 1.0 + 0.01], dim=1)


class _Decoder(nn.Module):
    def __init__(self, skips: tuple[int, int, int, int], head: int):
        super().__init__()
        self.conv2 = nn.Conv2d(head, head, 1)
        self.up1 = _Up(head + skips[3], 1024)
        self.up2 = _Up(1024 + skips[2], 512)
        self.up3 = _Up(512 + skips[1], 256)
        self.up4 = _Up(256 + skips[0], 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4 = _refiner(512 + 4)
        self.out_conv_res2 = _refiner(256 + 4)
        self.out_conv_res1 = _refiner(128 + 4)

    @staticmethod
    def _refine(refiner: nn.Module, features: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Every pixel of the 2× upsampled features and previous prediction through the 1×1 refiner."""
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)
        stacked = torch.cat([up(features), up(previous)], dim=1)
        b, c, h, w = stacked.shape
        return normalize_normals(refiner(stacked.view(b, c, -1))).view(b, 4, h, w)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        b0, b1, b2, b3, b4 = taps
        d1 = self.up1(self.conv2(b4), b3)
        d2 = self.up2(d1, b2)
        d3 = self.up3(d2, b1)
        d4 = self.up4(d3, b0)
        out = normalize_normals(self.out_conv_res8(d2))
        out = self._refine(self.out_conv_res4, d2, out)
        out = self._refine(self.out_conv_res2, d3, out)
        return self._refine(self.out_conv_res1, d4, out)


class NormalBae(nn.Module):
    """Module names as in ``scannet.pt``'s ``model`` (``encoder.original_model.*``, ``decoder.*``)."""

    def __init__(self, net: EfficientNet, skips: tuple[int, int, int, int], head: int):
        super().__init__()
        self.encoder = _Encoder(net)
        self.decoder = _Decoder(skips, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1×4×H×W: unit normal and concentration at full size."""
        return self.decoder(self.encoder(x))


def layout_from(weights: dict[str, torch.Tensor]) -> NormalBae:
    """The network the file's shapes describe."""
    try:
        stem = weights[f"{_PREFIX}conv_stem.weight"].shape[0]
        head = weights[f"{_PREFIX}conv_head.weight"].shape[0]
        found: dict[int, set[int]] = {}
        for key in weights:
            m = re.match(re.escape(_PREFIX) + r"blocks\.(\d+)\.(\d+)\.", key)
            if m:
                found.setdefault(int(m[1]), set()).add(int(m[2]))
        stages = []
        for s in range(len(found)):
            stage = []
            for i in range(len(found[s])):
                p = f"{_PREFIX}blocks.{s}.{i}."
                dw = weights[p + "conv_dw.weight"]
                reduced = weights[p + "se.conv_reduce.weight"].shape[0]
                if p + "conv_pwl.weight" in weights:  # inverted residual: expansion, depthwise, projection
                    pw = weights[p + "conv_pw.weight"]
                    stage.append((pw.shape[1], pw.shape[0], weights[p + "conv_pwl.weight"].shape[0], dw.shape[-1],
                                  reduced, True))
                else:
                    stage.append((dw.shape[0], dw.shape[0], weights[p + "conv_pw.weight"].shape[0], dw.shape[-1],
                                  reduced, False))
            stages.append(stage)
        if len(stages) != len(STAGE_STRIDES):
            raise ValueError(f"{len(stages)} stages, expected {len(STAGE_STRIDES)}")
        skips = tuple(stages[s][-1][2] for s in (0, 1, 2, 4))
    except (KeyError, ValueError, IndexError) as exc:
        raise ModelFileError(f"{FILE.name}: not the normal_bae network ({exc})") from None
    return NormalBae(EfficientNet(stages, stem, head), skips, head)


def load(path) -> NormalBae:
    return cached_network(path, "normal_bae", layout_from, wrappers=("model",))


@torch.no_grad()
def detect(net: NormalBae, image: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 normals of an RGB uint8 picture (sides multiples of 32)."""
    param = next(net.parameters())
    x = torch.from_numpy(np.ascontiguousarray(image)).float().to(param.device) / 255.0
    x = x.permute(2, 0, 1)[None]
    x = (x - torch.tensor(MEAN, device=x.device)[:, None, None]) / torch.tensor(STD, device=x.device)[:, None, None]
    normal = net(x.to(param.dtype))[:, :3]
    normal = ((normal + 1) * 0.5).clip(0, 1)
    return (normal[0].permute(1, 2, 0).float().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
