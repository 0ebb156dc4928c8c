"""HED soft edges with lllyasviel's Apache-2.0 retrained network (``ControlNetHED.pth``), the one behind the
extension's ``softedge_hed``, ``softedge_hedsafe`` and ``scribble_hed``.

A VGG-like stack of five blocks (2, 2, 3, 3, 3 convolutions; 64-512 channels; 2× max-pool before blocks 2-5),
each block projecting its features to one edge logit map. The input is RGB in 0-255 minus a learnt
per-channel offset (``norm``). The five maps are resized to the picture (bilinear), averaged and passed
through a sigmoid; "safe" quantizes the result to three levels so that the ControlNet cannot read hidden
detail from faint edges.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from .common import AnnotatorFile, cached_network, image_tensor, safe_step, to_uint8

FILE = AnnotatorFile("ControlNetHED.pth", "hed")
BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # in, out, convolutions


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, h: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            h = torch.nn.functional.max_pool2d(h, 2, 2)
        for conv in self.convs:
            h = torch.relu(conv(h))
        return h, self.projection(h)


class HED(nn.Module):
    """Module names as in ``ControlNetHED.pth`` (``norm``, ``block1.convs.0``, ``block1.projection``…)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (cin, cout, layers) in enumerate(BLOCKS, 1):
            self.add_module(f"block{i}", _Block(cin, cout, layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        maps = []
        for i in range(1, len(BLOCKS) + 1):
            h, projection = getattr(self, f"block{i}")(h, pool=i > 1)
            maps.append(projection)
        return maps


def soft_edges(maps: list[np.ndarray], safe_steps: int = 0) -> np.ndarray:
    """The logit maps (any sizes) to the uint8 edge map at the first one's size: bilinear resize, mean,
    sigmoid (float64), the safe step with ``safe_steps`` (0: none; HED's safe variant: 2), ×255."""
    h, w = maps[0].shape
    stacked = np.stack([cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) for m in maps], 2)
    edge = 1.0 / (1.0 + np.exp(-np.mean(stacked, axis=2).astype(np.float64)))
    if safe_steps:
        edge = safe_step(edge, safe_steps)
    return to_uint8(edge)


def load(path) -> HED:
    return cached_network(path, "hed", lambda weights: HED())


@torch.no_grad()
def detect(net: HED, image: np.ndarray, safe: bool = False) -> np.ndarray:
    """H×W uint8 soft edges of an H×W×3 RGB uint8 picture."""
    param = next(net.parameters())
    maps = net(image_tensor(image).to(param.device, param.dtype))
    return soft_edges([m[0, 0].float().cpu().numpy() for m in maps], 2 if safe else 0)
