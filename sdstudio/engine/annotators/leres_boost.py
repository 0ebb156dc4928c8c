"""``depth_leres++``: LeReS with the boosting of Miangoleh et al. ("Boosting Monocular Depth Estimation Models to
High-Resolution via Content-Adaptive Multi-Resolution Merging"), as the extension runs it (its ``estimateboost``
with LeReS, R_max 1600, the merge network at 1024²).

- :func:`processing_resolution`: the largest square size (multiples of 32 from 448, at most min(1600, 3 × the
  picture's long side)) at which at most 20 % of the picture lies farther than the network's receptive field
  (448) from an edge, and the share of the picture near edges at the next finer scale (the "patch scale").
- :func:`double_estimate`: LeReS at 448² and at that size, both brought to 1024² and merged by the pix2pix
  network (``latest_net_G.pth``: a 10-level U-Net, 2 channels in, 1 out, no normalization), min-max stretched.
- When the picture is smaller than that size, that is the result. Otherwise the picture is enlarged (twice
  the size over ``factor``), cut into 896² patches on a 336-pixel grid, each kept only where its edge density
  reaches the picture's and grown while it stays so (:func:`select_patches`), and patch by patch, largest
  first, the patch's own double estimate is merged with the base estimate's patch by the merge network, fitted
  to the base values by a straight line, and blended in with a Gaussian-edged mask.

Resizes follow the extension's code, including its ``cv2.resize(img, size, cv2.INTER_AREA)`` calls, which pass
the flag as the output argument and so resize bilinearly. Two cases that fail in the extension work here: a
picture too small for the resolution search (under 160 pixels: the search's loop does not run and the extension
reads an unset variable) takes the base size, and a flat estimate (max = min) merges as zeros, not NaN.

The merge network is built here under the file's module names (nested ``model.model.1.model.3…``, the indices
of pix2pix's ``UnetSkipConnectionBlock`` with its identity norms), its width and depth read from the file.
Its skip connections carry the LeakyReLU of their input, as the original's in-place activation makes them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import AnnotatorFile, cached_network

FILE = AnnotatorFile("latest_net_G.pth", "leres")
RECEPTIVE_FIELD = 448  # LeReS
PATCH_SIZE = 2 * RECEPTIVE_FIELD
MERGE_SIZE = 1024
R_MAX = 1600  # whole_size_threshold
CONFIDENCE = 0.2
SCALE_LIMIT = 3
SPEED_SCALE = 32

Estimate = Callable[[np.ndarray, int], np.ndarray]  # (RGB uint8 picture, square size) -> depth at the picture's size


# ---- the merge network ---------------------------------------------------------------------------------------

class _Level(nn.Module):
    """One level of pix2pix's U-Net (module indices as in ``UnetSkipConnectionBlock`` with identity norms)."""

    def __init__(self, outer: int, inner: int, cin: int | None = None, sub: nn.Module | None = None,
                 kind: str = "middle"):
        super().__init__()
        cin = cin or outer
        down = nn.Conv2d(cin, inner, 4, 2, 1, bias=False)
        self.outermost = kind == "outermost"
        if kind == "outermost":
            layers = [down, sub, nn.ReLU(), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
        elif kind == "innermost":
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=False),
                      nn.Identity()]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.Identity(), sub, nn.ReLU(),
                      nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=False), nn.Identity()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([F.leaky_relu(x, 0.2), self.model(x)], 1)  # the original's in-place LeakyReLU


class MergeNet(nn.Module):
    """pix2pix's ``UnetGenerator(2, 1, levels, ngf)`` (unet_1024: 10 levels, ngf 64)."""

    def __init__(self, levels: int = 10, ngf: int = 64, cin: int = 2, cout: int = 1):
        super().__init__()
        if levels < 5:
            raise ValueError(f"a pix2pix U-Net has at least 5 levels, not {levels}")
        block = _Level(ngf * 8, ngf * 8, kind="innermost")
        for _ in range(levels - 5):
            block = _Level(ngf * 8, ngf * 8, sub=block)
        for outer, inner in ((ngf * 4, ngf * 8), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
            block = _Level(outer, inner, sub=block)
        self.model = _Level(cout, ngf, cin, block, kind="outermost")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _levels_and_width(weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(levels, ngf) of a generator file: the innermost level's convolutions are nested deepest
    (``model.`` once per level), the outermost down convolution has ngf filters."""
    first = weights.get("model.model.0.weight")
    if first is None:
        raise ValueError("no model.model.0.weight: not pix2pix's U-Net generator")
    return max(k.count(".model.") for k in weights if k.endswith(".weight")), int(first.shape[0])


def load(path) -> MergeNet:
    return cached_network(path, "leres_merge", lambda w: MergeNet(*_levels_and_width(w)))


def _stretched(x: np.ndarray) -> torch.Tensor:
    """An estimate min-max stretched to -1…1 (a flat one: zeros), as ``set_input`` normalizes."""
    t = torch.from_numpy(np.asarray(x, np.float32))
    span = t.max() - t.min()
    return (t - t.min()) / span * 2 - 1 if span > 0 else torch.zeros_like(t)


@torch.no_grad()
def merge(net: MergeNet, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The merge network's output in 0…1 (``(fake_B + 1) / 2``) for two MERGE_SIZE² estimates."""
    param = next(net.parameters())
    x = torch.stack([_stretched(low), _stretched(high)])[None].to(param.device, param.dtype)
    return ((net(x)[0, 0].float().cpu() + 1) / 2).numpy()


# ---- the boosting ---------------------------------------------------------------------------------------------

def _gray(rgb: np.ndarray) -> np.ndarray:
    return np.dot(rgb[..., :3].astype(np.float64), [0.2989, 0.5870, 0.1140])


def _gradient(rgb: np.ndarray) -> np.ndarray:
    gray = _gray(rgb)
    return np.abs(cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3)) + np.abs(cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3))


def _max_pool(x: np.ndarray, size: int) -> np.ndarray:
    """skimage's ``block_reduce(x, (n, n), np.max)`` with ``n = floor(side / size)`` (padded with zeros)."""
    n = max(1, int(np.floor(x.shape[0] / size)))
    h, w = -(-x.shape[0] // n) * n, -(-x.shape[1] // n) * n
    padded = np.zeros((h, w), x.dtype)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded.reshape(h // n, n, w // n, n).max(axis=(1, 3))


def processing_resolution(rgb: np.ndarray, base: int = RECEPTIVE_FIELD, confidence: float = CONFIDENCE,
                          scale_limit: int = SCALE_LIMIT, r_max: int = R_MAX) -> tuple[int, float]:
    """The R_x size and the patch scale (see the module's docstring)."""
    side = int(min(rgb.shape[:2]))
    grad = cv2.resize(_gradient(rgb), (side, side))  # bilinear, as the extension's call resizes
    low, high = grad.min(), grad.max()
    edges = (grad >= low + 0.4 * (high - low)).astype(np.float64)
    kernel = np.ones((base // SPEED_SCALE, base // SPEED_SCALE))
    kernel_quarter = np.ones((base // (4 * SPEED_SCALE), base // (4 * SPEED_SCALE)))
    limit = min(r_max, scale_limit * max(rgb.shape[:2]))
    best = base // SPEED_SCALE
    pooled = None
    for size in range(base // SPEED_SCALE, int(limit / SPEED_SCALE), base // (2 * SPEED_SCALE)):
        pooled = cv2.resize(_max_pool(edges, size), (size, size))
        pooled = (pooled >= 0.5).astype(np.float64)
        if (1 - cv2.dilate(pooled, kernel, iterations=1)).mean() > confidence:
            break
        best = size
    if pooled is None:  # too small a picture for the search (the extension fails here): the base size
        pooled = (cv2.resize(_max_pool(edges, best), (best, best)) >= 0.5).astype(np.float64)
    patch_scale = float(cv2.dilate(pooled, kernel_quarter, iterations=1).mean())
    return int(best * SPEED_SCALE), patch_scale


def double_estimate(rgb: np.ndarray, low: int, high: int, estimate: Estimate, net: MergeNet) -> np.ndarray:
    """The merged estimate at MERGE_SIZE², stretched to 0…1."""
    a = cv2.resize(estimate(rgb, low), (MERGE_SIZE, MERGE_SIZE), interpolation=cv2.INTER_CUBIC)
    b = cv2.resize(estimate(rgb, high), (MERGE_SIZE, MERGE_SIZE), interpolation=cv2.INTER_CUBIC)
    out = merge(net, a, b)
    span = out.max() - out.min()
    return (out - out.min()) / span if span > 0 else np.zeros_like(out)


def _grid(block: int, stride: int, height: int, width: int) -> list[list[int]]:
    """The initial patches [x, y, w, h] of side 2·block on a grid, column by column."""
    return [[k - block, j - block, 2 * block, 2 * block]
            for k in range(block, width - block, stride) for j in range(block, height - block, stride)]


def _density(integral: np.ndarray, rect: list[int]) -> float:
    x, y, w, h = rect
    total = integral[y + h, x + w] - integral[y, x + w] - integral[y + h, x] + integral[y, x]
    return float(total) / (w * h)


def select_patches(rgb: np.ndarray, factor: float, base: int = PATCH_SIZE) -> list[list[int]]:
    """The patches [x, y, w, h] worth refining, largest first (see the module's docstring)."""
    grad = _gradient(rgb)
    positive = grad[grad > 0]
    if positive.size:
        grad[grad < positive.mean()] = 0
    overall = grad.sum() / grad.size
    integral = cv2.integral(grad)
    height, width = integral.shape
    block = round(base / 2)
    step = int(32 / factor)
    chosen = []
    for rect in _grid(block, round(block * 0.75), rgb.shape[0], rgb.shape[1]):
        if _density(integral, rect) < overall:
            continue
        while True:
            grown = [rect[0] - step // 2, rect[1] - step // 2, rect[2] + step, rect[3] + step]
            if grown[0] < 0 or grown[1] < 0 or grown[1] + grown[3] >= height or grown[0] + grown[2] >= width:
                break
            if _density(integral, grown) < overall:
                break
            rect = grown
        chosen.append(rect)
    return sorted(chosen, key=lambda r: r[2], reverse=True)  # stable: equal sizes keep the grid's order


@functools.lru_cache(maxsize=1)
def _mask_template(size: int = 3000) -> np.ndarray:
    """The extension's blending mask: ones inside a 15 % margin, Gaussian-blurred (σ = size/16), stretched."""
    mask = np.zeros((size, size), np.float32)
    margin = int(0.15 * size)
    mask[margin: size - margin, margin: size - margin] = 1
    sigma = int(size / 16)
    k = int(2 * np.ceil(2 * sigma) + 1)
    mask = cv2.GaussianBlur(mask, (k, k), sigma)
    return ((mask - mask.min()) / (mask.max() - mask.min())).astype(np.float32)


def boost(rgb: np.ndarray, estimate: Estimate, net: MergeNet, max_res: int | None = None) -> np.ndarray:
    """The boosted depth of an RGB uint8 picture at its size; ``max_res`` defaults to its long side, as the
    extension passes it."""
    height, width = rgb.shape[:2]
    max_res = max(height, width) if max_res is None else max_res
    whole_size, patch_scale = processing_resolution(rgb)
    whole = double_estimate(rgb, RECEPTIVE_FIELD, whole_size, estimate, net)
    if max_res < whole_size:
        return cv2.resize(whole, (width, height), interpolation=cv2.INTER_CUBIC)
    factor = max(min(1.0, 4 * patch_scale * whole_size / R_MAX), 0.2)
    if height > width:
        a, b = 2 * whole_size, round(2 * whole_size * width / height)
    else:
        a, b = round(2 * whole_size * height / width), 2 * whole_size
    a, b = round(a / factor), round(b / factor)
    large = cv2.resize(rgb, (b, a), interpolation=cv2.INTER_CUBIC)
    patches = select_patches(large, factor)
    scale = height / large.shape[0]
    size = (round(large.shape[1] * scale), round(large.shape[0] * scale))
    picture = cv2.resize(large, size, interpolation=cv2.INTER_CUBIC)
    base = cv2.resize(whole, size, interpolation=cv2.INTER_CUBIC)
    updated = base.copy()
    mask = None
    for rect in patches:
        x, y, w, h = np.round(np.asarray(rect) * scale).astype(int)
        patch_rgb = picture[y: y + h, x: x + w]
        patch_base = base[y: y + h, x: x + w]
        shape = patch_base.shape
        if patch_rgb.size == 0 or min(shape) == 0:
            continue
        refined = double_estimate(patch_rgb, RECEPTIVE_FIELD, PATCH_SIZE, estimate, net)
        base_large = cv2.resize(patch_base, (MERGE_SIZE, MERGE_SIZE), interpolation=cv2.INTER_CUBIC)
        mapped = merge(net, base_large, refined)
        line = np.polyfit(mapped.reshape(-1), base_large.reshape(-1), deg=1)
        merged = cv2.resize(np.polyval(line, mapped.reshape(-1)).reshape(mapped.shape), (shape[1], shape[0]),
                            interpolation=cv2.INTER_CUBIC)
        if mask is None or mask.shape != shape:
            mask = cv2.resize(_mask_template(), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        region = updated[y: y + h, x: x + w]
        updated[y: y + h, x: x + w] = region * (1 - mask) + merged * mask
    return cv2.resize(updated, (width, height), interpolation=cv2.INTER_CUBIC)
