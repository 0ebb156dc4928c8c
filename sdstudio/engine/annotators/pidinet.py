"""PiDiNet soft edges (``table5_pidinet.pth``: the "carv4" network, 60 base channels, dilation module 24,
spatial attention), behind the extension's ``softedge_pidinet``, ``softedge_pidisafe``, ``scribble_pidinet`` and
``t2ia_sketch_pidi``.

PiDiNet's pixel-difference convolutions are stored as plain 3×3 kernels and mean different operators:
central ("cd": the kernel's response minus the centre pixel times the kernel's sum), angular ("ad": each tap
minus its clockwise neighbour) and radial ("rd": the eight outer taps of a 5×5 ring minus the inner ring). Each
is a linear operator, so :func:`pdc_kernel` turns the stored kernel into the equivalent ordinary one (3×3, or 5×5
for "rd") once, and the network runs plain convolutions.

The input is BGR in [0, 1] (the extension flips the RGB picture); the fused output's sigmoid is the edge map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import AnnotatorFile, cached_network, image_tensor, safe_step, to_uint8

FILE = AnnotatorFile("table5_pidinet.pth", "pidinet")
CARV4 = ("cd", "ad", "rd", "cv") * 4  # the operator of layers 0-15
BASE = 60
DILATION = 24
# the angular difference pairs each tap of the flattened 3×3 kernel with its clockwise neighbour
_CLOCKWISE = [3, 0, 1, 6, 4, 2, 7, 8, 5]
_RING_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]  # the 5×5 positions the radial operator reads at distance 2
_RING_INNER = [6, 7, 8, 11, 13, 16, 17, 18]  # and at distance 1


def pdc_kernel(op: str, weight: torch.Tensor) -> torch.Tensor:
    """The ordinary kernel equal to pixel-difference operator ``op`` with stored 3×3 ``weight`` (stride 1;
    padding 1 for a 3×3 result, 2 for the 5×5 "rd" one)."""
    if op == "cv":
        return weight
    out_c, in_c = weight.shape[:2]
    flat = weight.reshape(out_c, in_c, 9)
    if op == "cd":
        kernel = flat.clone()
        kernel[:, :, 4] -= flat.sum(dim=2)
        return kernel.reshape(weight.shape)
    if op == "ad":
        return (flat - flat[:, :, _CLOCKWISE]).reshape(weight.shape)
    if op == "rd":
        kernel = weight.new_zeros(out_c, in_c, 25)
        kernel[:, :, _RING_OUTER] = flat[:, :, 1:]
        kernel[:, :, _RING_INNER] = -flat[:, :, 1:]
        return kernel.reshape(out_c, in_c, 5, 5)
    raise ValueError(f"unknown pixel-difference operator {op!r}")


class PDCConv(nn.Module):
    """A pixel-difference convolution holding the stored 3×3 ``weight`` (the file's parameter)."""

    def __init__(self, op: str, cin: int, cout: int, groups: int = 1, bias: bool = False):
        super().__init__()
        self.op, self.groups = op, groups
        self.weight = nn.Parameter(torch.zeros(cout, cin // groups, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = pdc_kernel(self.op, self.weight)
        return F.conv2d(x, kernel, self.bias, padding=kernel.shape[-1] // 2, groups=self.groups)


class _Block(nn.Module):
    def __init__(self, op: str, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(cin, cout, 1)
        self.conv1 = PDCConv(op, cin, cin, groups=cin)
        self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, 2, 2)
        y = self.conv2(torch.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class _Dilations(nn.Module):
    """Compact dilation module: 1×1 to ``dil`` channels, then four 3×3 convolutions dilated 5, 7, 9, 11, summed."""

    def __init__(self, cin: int, dil: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, dil, 1)
        for i, d in enumerate((5, 7, 9, 11), 1):
            self.add_module(f"conv2_{i}", nn.Conv2d(dil, dil, 3, dilation=d, padding=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(torch.relu(x))
        return sum(getattr(self, f"conv2_{i}")(x) for i in range(1, 5))


class _Attention(nn.Module):
    """Compact spatial attention: a 1-channel sigmoid mask from a 4-channel bottleneck, multiplied in."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(torch.relu(x))))


class _Reduce(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


STAGES = ((1, 3), (2, 4), (3, 4), (4, 4))  # stage, blocks; stages 2-4 start with a stride-2 block


class PiDiNet(nn.Module):
    """Module names as in ``table5_pidinet.pth`` once its ``module.`` prefix is dropped."""

    def __init__(self, ops: tuple[str, ...] = CARV4, base: int = BASE, dil: int = DILATION):
        super().__init__()
        self.init_block = PDCConv(ops[0], 3, base)
        widths = (base, base * 2, base * 4, base * 4)
        layer, cin = 1, base
        self.names: list[list[str]] = []
        for (stage, blocks), width in zip(STAGES, widths):
            names = []
            for b in range(1, blocks + 1):
                stride = 2 if stage > 1 and b == 1 else 1
                name = f"block{stage}_{b}"
                self.add_module(name, _Block(ops[layer], cin, width, stride))
                names.append(name)
                cin, layer = width, layer + 1
            self.names.append(names)
        self.dilations = nn.ModuleList(_Dilations(w, dil) for w in widths)
        self.attentions = nn.ModuleList(_Attention(dil) for _ in widths)
        self.conv_reduces = nn.ModuleList(_Reduce(dil) for _ in widths)
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused edge probability, 1×1×H×W."""
        h, w = x.shape[2:]
        x = self.init_block(x)
        edges = []
        for i, names in enumerate(self.names):
            for name in names:
                x = getattr(self, name)(x)
            e = self.conv_reduces[i](self.attentions[i](self.dilations[i](x)))
            edges.append(F.interpolate(e, (h, w), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(edges, dim=1)))


def load(path) -> PiDiNet:
    return cached_network(path, "pidinet", lambda weights: PiDiNet())


@torch.no_grad()
def detect(net: PiDiNet, image: np.ndarray, safe: bool = False, binary: bool = False) -> np.ndarray:
    """H×W uint8 edges of an H×W×3 RGB uint8 picture; ``binary``: edges above 0.5 only (the T2I sketch)."""
    param = next(net.parameters())
    x = image_tensor(image[:, :, ::-1]).to(param.device, param.dtype) / 255.0
    edge = net(x)[0, 0].float().cpu().numpy()
    if binary:
        edge = (edge > 0.5).astype(np.float32)
    if safe:
        edge = safe_step(edge)
    return to_uint8(edge)
