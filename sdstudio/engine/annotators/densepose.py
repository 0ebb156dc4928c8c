"""DensePose, the extension's ``densepose`` / ``densepose_parula``: the published TorchScript file
(``densepose_r50_fpn_dl.torchscript``, detectron2's R50-FPN DensePose exported with its pre- and post-processing)
finds the people and each body part; the map colours the parts' index as the extension's visualizer does.

The file calls torchvision's ``nms`` and ``roi_align`` operators, and PyTorch's CPU torchvision cannot be installed
beside this project's torch. :func:`register_torchvision_ops` defines both under their torchvision names (only
where torchvision has not), computed as torchvision's kernels compute them: NMS over boxes sorted by score, IoU of
plain areas ``(x2 - x1) × (y2 - y1)``, suppression above the threshold; RoIAlign's sampling grid
(``sampling_ratio``, or ``ceil(roi size / pooled size)`` points per bin), the half-pixel offset of ``aligned``,
the minimum size of 1 without it, and its bilinear rule (0 outside ``[-1, size]``, clamped at the edges), each bin
the mean of its samples.

Steps, as the extension's ``apply_densepose``: the picture's short side at the resolution, padded to multiples of
64; the graph gets it as a 3×H×W uint8 tensor and gives boxes (x1, y1, x2, y2), coarse and fine segmentation and
U, V per box; per box (in the graph's order), the part index is the argmax of the fine segmentation resized
bilinearly to the box's whole-pixel size, where the coarse segmentation's argmax is not background; the indices
× 255 / 24 go through OpenCV's colour map (viridis, or parula) where they are not 0, over a black canvas; the
viridis map's zero channels become 68 / 1 / 84 (its purple background), channel by channel, as the extension does.
"""

from __future__ import annotations

import math
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...core.controlnet import ControlNetError
from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached

FILE = AnnotatorFile("densepose_r50_fpn_dl.torchscript", "densepose",
                     "LayerNorm/DensePose-TorchScript-with-hint-image on the Hugging Face hub", safetensors=False)
PART_LABELS = 24
VIRIDIS_BACKGROUND = (68, 1, 84)  # RGB: what the extension puts where a viridis channel is 0
_LOCK = threading.Lock()
_LIBRARY: list = []  # keeps the operator library alive once defined


# ---- torchvision's operators ---------------------------------------------------------------------------------

def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's ``nms``: the indices kept, highest score first."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _axis(start: float, bin_size: float, pooled: int, grid: int, size: int, dtype, device):
    """One axis of RoIAlign's samples: low / high indices and their weights (0 for samples outside)."""
    p = torch.arange(pooled, dtype=dtype, device=device)[:, None]
    g = torch.arange(grid, dtype=dtype, device=device)[None, :]
    c = (start + p * bin_size + (g + 0.5) * bin_size / grid).reshape(-1)
    valid = ((c >= -1.0) & (c <= size)).to(dtype)
    c = c.clamp(min=0.0)
    low = c.floor().long()
    end = low >= size - 1
    low = torch.where(end, torch.full_like(low, size - 1), low)
    high = torch.where(end, low, low + 1)
    c = torch.where(end, low.to(dtype), c)
    frac = c - low.to(dtype)
    return low, high, (1.0 - frac) * valid, frac * valid


def roi_align(features: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int,
              pooled_width: int, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """torchvision's ``roi_align`` (see the module's docstring): rois K×5 (batch index, x1, y1, x2, y2) ->
    K×C×pooled_height×pooled_width."""
    k = rois.shape[0]
    c, height, width = features.shape[1:]
    out = features.new_zeros((k, c, pooled_height, pooled_width))
    offset = 0.5 if aligned else 0.0
    for n in range(k):
        b, x1, y1, x2, y2 = rois[n].tolist()
        sx, sy = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        rw, rh = x2 * spatial_scale - offset - sx, y2 * spatial_scale - offset - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / pooled_height, rw / pooled_width
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / pooled_height)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pooled_width)
        count = max(gh * gw, 1)
        if gh <= 0 or gw <= 0:
            continue
        ylo, yhi, wylo, wyhi = _axis(sy, bh, pooled_height, gh, height, features.dtype, features.device)
        xlo, xhi, wxlo, wxhi = _axis(sx, bw, pooled_width, gw, width, features.dtype, features.device)
        f = features[int(b)]
        value = sum(f[:, ys][:, :, xs] * wy[None, :, None] * wx[None, None, :]
                    for ys, wy in ((ylo, wylo), (yhi, wyhi)) for xs, wx in ((xlo, wxlo), (xhi, wxhi)))
        out[n] = value.reshape(c, pooled_height, gh, pooled_width, gw).sum(dim=(2, 4)) / count
    return out


def _defined(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_torchvision_ops() -> None:
    """``torchvision::nms`` and ``torchvision::roi_align`` for TorchScript files that call them, unless
    torchvision (or an earlier call) defined them already."""
    with _LOCK:
        align = ("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                 "int sampling_ratio, bool aligned) -> Tensor")
        wanted = {"nms": ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor", nms),
                  "roi_align": (align, roi_align)}
        missing = {name: spec for name, spec in wanted.items() if not _defined(name)}
        if not missing:
            return
        library = torch.library.Library("torchvision", "FRAGMENT")
        for name, (schema, function) in missing.items():
            library.define(schema)
            library.impl(name, function, "CompositeExplicitAutograd")
        _LIBRARY.append(library)


# ---- the map ---------------------------------------------------------------------------------------------------

def load(path: Path):
    def read(p: Path):
        register_torchvision_ops()
        try:
            with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; the published file is one
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(p), map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelFileError(f"{p.name}: not a readable TorchScript file ({str(exc).strip()[:200]})") from None

    return cached(Path(path), "torchscript", read)


def part_labels(box: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor) -> tuple[tuple[int, int, int, int],
                                                                                      np.ndarray]:
    """A detection's whole-pixel box (x, y, w, h) and its part index per box pixel (h×w uint8)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x, y, w, h = (int(v) for v in torch.tensor([x1, y1, x2 - x1, y2 - y1]).long().tolist())
    size = (max(h, 1), max(w, 1))
    body = F.interpolate(coarse[None].float(), size, mode="bilinear", align_corners=False).argmax(dim=1)
    parts = F.interpolate(fine[None].float(), size, mode="bilinear", align_corners=False).argmax(dim=1)
    return (x, y, w, h), (parts * (body > 0).long())[0].to(torch.uint8).numpy()


def draw(size: tuple[int, int], detections: list[tuple[tuple[int, int, int, int], np.ndarray]],
         cmap: str = "viridis") -> np.ndarray:
    """The extension's DensePose map (RGB uint8) of ``detections`` on an H×W canvas."""
    canvas = np.zeros((*size, 3), np.uint8)  # BGR, as the extension's visualizer works
    colormap = cv2.COLORMAP_VIRIDIS if cmap == "viridis" else cv2.COLORMAP_PARULA
    for (x, y, w, h), labels in detections:
        if w <= 0 or h <= 0:
            continue
        scaled = (labels.astype(np.float32) * (255.0 / PART_LABELS)).clip(0, 255).astype(np.uint8)
        colours = cv2.applyColorMap(scaled, colormap)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, size[1]), min(y + h, size[0])
        if x1 <= x0 or y1 <= y0:
            continue
        patch = colours[y0 - y:y1 - y, x0 - x:x1 - x]
        keep = labels[y0 - y:y1 - y, x0 - x:x1 - x] == 0
        region = canvas[y0:y1, x0:x1]
        patch[keep] = region[keep]
        canvas[y0:y1, x0:x1] = patch
    out = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
    if cmap == "viridis":
        for channel, value in enumerate(VIRIDIS_BACKGROUND):
            plane = out[:, :, channel]
            plane[plane == 0] = value
    return out


def detect(model, image: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """The DensePose map of an RGB H×W×3 uint8 picture (already at its resolution)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    try:
        with torch.no_grad():
            boxes, coarse, fine, _u, _v = model(x)  # U and V do not show in the map
    except (RuntimeError, ValueError) as exc:
        raise ControlNetError(f"densepose: the TorchScript file failed on a {image.shape[1]}×{image.shape[0]} "
                              f"picture ({str(exc).strip().splitlines()[0][:200]})") from None
    detections = [part_labels(boxes[i], coarse[i], fine[i]) for i in range(len(boxes))]
    return draw(image.shape[:2], detections, cmap)
