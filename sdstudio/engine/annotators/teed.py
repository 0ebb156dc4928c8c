"""TEED soft edges (Soria et al., "Tiny and Efficient Edge Detector", 2023; about 58,000 weights), the network
behind the extension's ``softedge_teed``, from its published file ``7_model.pth``.

The network reads RGB in 0-255 as it is (no normalization). Three stages at 1/2, 1/2 and 1/4 of the size
(two convolutions with stride 2, two more, then a max-pool and one dense layer fed by a strided side path);
each stage is brought back to full size by 1×1 convolutions and transposed convolutions to one logit map; a
"double fusion" of depthwise convolutions over the three maps makes the fourth. All four maps are averaged
and passed through a sigmoid as for HED (:func:`hed.soft_edges`); "Safe Steps" (threshold A, default 2, 0 to
turn it off) quantizes the result. The activation is Smish, ``x · tanh(ln(1 + sigmoid(x)))``.

MTEED (``MTEED.pth``, TheMistoAI's retraining of the same network for their "Anyline") drives the extension's
``softedge_anyline``: its soft edges, merged by :func:`anyline_merge` with the faintest lines of
``lineart_standard``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from .common import AnnotatorFile, cached_network, image_tensor
from .hed import soft_edges

FILE = AnnotatorFile("7_model.pth", "TEED")
MTEED_FILE = AnnotatorFile("MTEED.pth", "TEED", source="TheMistoAI/MistoLine (Anyline/MTEED.pth) on the Hugging Face hub")
ANYLINE_MIN_PIXELS = 36  # the extension's remove_small_objects(min_size=36, connectivity=1)


def smish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(torch.log1p(torch.sigmoid(x)))


class _TwoConvs(nn.Module):
    """conv1 (3×3, optional stride) → Smish → conv2 (3×3) → Smish unless ``last_act`` is False."""

    def __init__(self, cin: int, cout: int, stride: int = 1, last_act: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.last_act = last_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(smish(self.conv1(x)))
        return smish(x) if self.last_act else x


class _OneByOne(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _DenseLayer(nn.Module):
    """Smish of the first input → 3×3 (padding 2) → Smish → 3×3 (no padding); averaged with the second input."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=2)
        self.conv2 = nn.Conv2d(cout, cout, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.conv2(smish(self.conv1(smish(x)))) + skip)


class _DenseBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.denselayer1 = _DenseLayer(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.denselayer1(x, skip)


class _Smish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smish(x)


class _Up(nn.Module):
    """``doublings`` × (1×1 conv → Smish → transposed conv, stride 2): 16 channels, then one logit map."""

    def __init__(self, cin: int, doublings: int):
        super().__init__()
        kernel, pad = 2 ** doublings, (0, 0, 1, 3, 7)[doublings]
        layers: list[nn.Module] = []
        for i in range(doublings):
            cout = 1 if i == doublings - 1 else 16
            layers += [nn.Conv2d(cin, cout, 1), _Smish(), nn.ConvTranspose2d(cout, cout, kernel, stride=2, padding=pad)]
            cin = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _DoubleFusion(nn.Module):
    """The fourth map: two depthwise 3×3 convolutions over the three (×8 channels, then 24 → 24), summed."""

    def __init__(self):
        super().__init__()
        self.DWconv1 = nn.Conv2d(3, 24, 3, padding=1, groups=3)
        self.DWconv2 = nn.Conv2d(24, 24, 3, padding=1, groups=24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.DWconv1(smish(x))
        return smish((self.DWconv2(smish(a)) + a).sum(1, keepdim=True))


class TEED(nn.Module):
    """Module names as in ``7_model.pth`` (``block_1.conv1``, ``dblock_3.denselayer1.conv2``,
    ``up_block_3.features.3``, ``block_cat.DWconv1``…)."""

    def __init__(self):
        super().__init__()
        self.block_1 = _TwoConvs(3, 16, stride=2)
        self.block_2 = _TwoConvs(16, 32, last_act=False)
        self.dblock_3 = _DenseBlock(32, 48)
        self.side_1 = _OneByOne(16, 32, 2)
        self.pre_dense_3 = _OneByOne(32, 48, 1)
        self.up_block_1, self.up_block_2, self.up_block_3 = _Up(16, 1), _Up(32, 1), _Up(48, 2)
        self.block_cat = _DoubleFusion()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b1 = self.block_1(x)
        b2 = self.block_2(b1)
        down = torch.nn.functional.max_pool2d(b2, 3, stride=2, padding=1)
        b3 = self.dblock_3(down + self.side_1(b1), self.pre_dense_3(down))
        maps = [self.up_block_1(b1), self.up_block_2(b2), self.up_block_3(b3)]
        return [*maps, self.block_cat(torch.cat(maps, 1))]


def load(path) -> TEED:
    return cached_network(path, "teed", lambda weights: TEED())


@torch.no_grad()
def detect(net: TEED, image: np.ndarray, safe_steps: int = 2) -> np.ndarray:
    """H×W uint8 soft edges of an H×W×3 RGB uint8 picture (sides multiples of 8); ``safe_steps`` 0: unquantized."""
    param = next(net.parameters())
    maps = net(image_tensor(image).to(param.device, param.dtype))
    return soft_edges([m[0, 0].float().cpu().numpy() for m in maps], max(0, int(safe_steps)))


def anyline_merge(edges: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """The extension's Anyline merge of an H×W uint8 MTEED map with an H×W uint8 ``lineart_standard`` map.

    As the extension computes it on uint8 pictures: the line map's pixels of value 0..1 are kept (so only
    the value-1 ones count), those in 4-connected groups too small are dropped, and the rest are "screened"
    over the edges, which on uint8 sets those pixels to 1. The extension labels the three identical channels
    of its RGB map together, so a group counts three times: groups of ``ANYLINE_MIN_PIXELS / 3`` pixels or
    more stay. Everywhere else the MTEED map is unchanged.
    """
    faint = lines == 1
    count, labels, stats, _ = cv2.connectedComponentsWithStats(faint.astype(np.uint8), connectivity=4)
    big = np.zeros(count, dtype=bool)
    big[1:] = 3 * stats[1:, cv2.CC_STAT_AREA] >= ANYLINE_MIN_PIXELS
    out = edges.copy()
    out[big[labels] & faint] = 1
    return out
