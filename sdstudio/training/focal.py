"""A1111's "Auto focal point crop" of Preprocess images: a picture scaled to cover the target size, then cut
to it around the weighted mean of its points of interest.

Three kinds of points, each weighted by its option, a kind that finds nothing leaving its share to the
others (the weights are normalised over the kinds that found points):

- edges: up to 100 Shi-Tomasi corners (OpenCV's ``goodFeaturesToTrack``, quality 0.04, at least 6 % of the
  short side apart), found on the greyscale picture with its bottom tenth painted grey so that watermarks do
  not draw the crop; their centroid;
- entropy: the target-sized window, slid along the spare length in steps of 4 pixels, whose greyscale
  histogram has the most Shannon entropy (-Σ p·log2 p), the middle one of neighbouring equals; its centre.
  A1111 scores the dithered 1-bit window with -Σ log2 p instead, which favours windows holding the *least*
  detail; Shannon's is the measure its function's name and commented-out greyscale line mean. A flat picture
  has no entropy point (A1111's would be its first window);
- faces: the faces a detector finds, each marked at its box's centre across and a third of the way down (the
  eyes, as A1111 marks its DNN detector's faces); their centroid. A1111 downloads OpenCV's YuNet model or
  falls back to OpenCV's Haar cascades; the OpenCV here (5.x) ships neither, so the detector is the RetinaFace
  that face restoration uses (facexlib's ``detection_Resnet50_Final.pth`` or ``detection_mobilenet0.25_Final
  .pth`` in models/GFPGAN or models/Codeformer), when installed; without it faces are not scored.

The picture is scaled to cover the target (A1111 scales its short side to the target's, which leaves a
strip of black when the target is relatively wider than the picture) and the crop, centred on the focal
point, is moved back inside the picture. ``debug`` adds A1111's annotated picture: the points of each kind,
circles sized by their kind's weight, the focal point and the crop's rectangle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]
FaceBox = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
FaceDetector = Callable[[Image.Image], list[FaceBox]]

COLOURS = {"edges": "#00F", "entropy": "#ff0", "faces": "#F00"}
LABELS = {"edges": "Edge", "entropy": "Entropy", "faces": "Face"}


@dataclass
class FocalPoint:
    """Where the crop centres (``x``, ``y``), from the points each kind found and the kinds' shares."""

    x: int
    y: int
    points: dict[str, list[Point]] = field(default_factory=dict)  # kind -> its points (only kinds that found any)
    shares: dict[str, float] = field(default_factory=dict)  # kind -> its normalised weight


def edge_points(picture: Image.Image) -> list[Point]:
    """Shi-Tomasi corners of the greyscale picture (the bottom tenth painted grey first), as A1111 finds them."""
    import cv2

    grey = picture.convert("L")
    ImageDraw.Draw(grey).rectangle([0, picture.height * 0.9, picture.width, picture.height], fill="#999")
    found = cv2.goodFeaturesToTrack(np.asarray(grey), maxCorners=100, qualityLevel=0.04,
                                    minDistance=min(grey.width, grey.height) * 0.06, useHarrisDetector=False)
    return [] if found is None else [(float(x), float(y)) for x, y in found.reshape(-1, 2)]


def window_entropies(picture: Image.Image, width: int, height: int, step: int = 4) -> tuple[list[int], np.ndarray]:
    """(start offsets, Shannon entropy in bits) of the ``width`` x ``height`` windows slid along the picture's
    spare length (the side longer than the window's; a picture scaled to cover the target has one) in
    ``step``-pixel steps, the last one flush with the end. Histograms come from per-line cumulative counts,
    so each window costs 256 subtractions."""
    grey = np.asarray(picture.convert("L"))
    along_x = picture.width - width >= picture.height - height
    window = width if along_x else height
    lines = grey.T if along_x else grey  # one row per position along the slid side
    n = lines.shape[0]
    per_line = np.bincount((np.arange(n)[:, None] * 256 + lines).reshape(-1), minlength=n * 256).reshape(n, 256)
    counts = np.vstack([np.zeros((1, 256), np.int64), per_line.cumsum(axis=0)])
    last = max(0, n - window)
    starts = list(range(0, last + 1, step))
    if starts[-1] != last:
        starts.append(last)
    first = np.array(starts)
    hist = counts[np.minimum(first + window, n)] - counts[first]
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    return starts, entropy


def entropy_point(picture: Image.Image, width: int, height: int) -> Point | None:
    """The centre of the window of most entropy (of neighbouring equals, the middle one: a detailed region
    smaller than the window is centred); None when the picture has no spare length to slide along, or is
    flat."""
    if picture.width <= width and picture.height <= height:
        return None
    starts, entropy = window_entropies(picture, width, height)
    top = float(entropy.max())
    if top <= 0:
        return None
    ties = np.flatnonzero(entropy >= top - 1e-9)
    breaks = np.flatnonzero(np.diff(ties) != 1)
    run = ties[: breaks[0] + 1] if len(breaks) else ties  # the first run of equal windows
    best = int(run[len(run) // 2])
    if picture.width - width >= picture.height - height:
        return starts[best] + width / 2, picture.height / 2
    return picture.width / 2, starts[best] + height / 2


def face_points(picture: Image.Image, detect: FaceDetector | None) -> list[Point]:
    """Each face's centre across, a third of the way down its box (where A1111 puts a face's focus)."""
    if detect is None:
        return []
    return [((x0 + x1) / 2, y0 + (y1 - y0) * 0.33) for x0, y0, x1, y1 in detect(picture)]


def _centroid(points: list[Point]) -> Point:
    return sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)


@dataclass
class FocalCrop:
    """A1111's focal point crop to ``width`` x ``height`` (the Preprocess fields ``process_focal_crop_*``)."""

    width: int
    height: int
    face_weight: float = 0.9
    entropy_weight: float = 0.15
    edges_weight: float = 0.5
    debug: bool = False
    faces: FaceDetector | None = None

    def focal_point(self, picture: Image.Image) -> FocalPoint:
        """The weighted mean of the kinds' centroids (the picture's centre when no kind found anything)."""
        weights = {"edges": self.edges_weight, "entropy": self.entropy_weight, "faces": self.face_weight}
        found: dict[str, list[Point]] = {}
        if self.edges_weight > 0:
            found["edges"] = edge_points(picture)
        if self.entropy_weight > 0:
            point = entropy_point(picture, self.width, self.height)
            found["entropy"] = [point] if point is not None else []
        if self.face_weight > 0:
            found["faces"] = face_points(picture, self.faces)
        found = {kind: points for kind, points in found.items() if points}
        if not found:
            return FocalPoint(picture.width // 2, picture.height // 2)
        total = sum(weights[k] for k in found)
        shares = {k: weights[k] / total for k in found}
        x = sum(_centroid(found[k])[0] * shares[k] for k in found)
        y = sum(_centroid(found[k])[1] * shares[k] for k in found)
        return FocalPoint(round(x), round(y), found, shares)

    def scaled(self, picture: Image.Image) -> Image.Image:
        """The picture scaled (bicubic) to the smallest size that covers the target."""
        scale = max(self.width / picture.width, self.height / picture.height)
        size = (max(self.width, round(picture.width * scale)), max(self.height, round(picture.height * scale)))
        return picture if size == picture.size else picture.resize(size, Image.Resampling.BICUBIC)

    def box(self, picture: Image.Image, focus: FocalPoint) -> tuple[int, int, int, int]:
        """The target-sized box centred on the focal point, moved back inside the (scaled) picture."""
        x0 = min(max(0, focus.x - self.width // 2), picture.width - self.width)
        y0 = min(max(0, focus.y - self.height // 2), picture.height - self.height)
        return x0, y0, x0 + self.width, y0 + self.height

    def crop(self, picture: Image.Image) -> list[Image.Image]:
        """The crop, then (``debug``) the annotated scaled picture."""
        picture = self.scaled(picture.convert("RGB"))
        focus = self.focal_point(picture)
        box = self.box(picture, focus)
        out = [picture.crop(box)]
        if self.debug:
            out.append(annotate(picture, focus, box))
        return out


def annotate(picture: Image.Image, focus: FocalPoint, box: tuple[int, int, int, int]) -> Image.Image:
    """A1111's debug picture: each kind's points (small squares) and centroid (a circle sized by its share,
    labelled with it), the focal point (green circle) and the crop (green rectangle)."""
    shown = picture.copy()
    d = ImageDraw.Draw(shown)
    most = min(picture.width, picture.height) * 0.07
    for kind, points in focus.points.items():
        colour, share = COLOURS[kind], focus.shares[kind]
        cx, cy = _centroid(points)
        r = max(1.0, most * share / 2)
        d.text((cx - r, cy - r - 15), f"{LABELS[kind]}: {share:.02f}", fill=colour)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour)
        if len(points) > 1:
            for x, y in points:
                d.rectangle([x - 2, y - 2, x + 2, y + 2], outline=colour)
    d.ellipse([focus.x - most / 2, focus.y - most / 2, focus.x + most / 2, focus.y + most / 2], outline="#0F0")
    d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline="#0F0")
    return shown


def retinaface_detector(path, device=None, threshold: float = 0.9) -> FaceDetector:
    """Faces by the RetinaFace file face restoration uses (read with the safe loader), boxes scoring over
    ``threshold`` (A1111's face detector threshold)."""
    import torch

    from ..engine import retinaface
    from ..models.errors import ModelFileError
    from ..models.safe_load import open_state_dict

    try:
        model = retinaface.RetinaFace.from_state_dict(dict(open_state_dict(path))).eval()
    except (KeyError, RuntimeError, IndexError, ValueError) as exc:
        raise ModelFileError(f"{path.name}: not a RetinaFace detector ({exc})") from None
    device = device or torch.device("cpu")
    model = model.to(device, torch.float32)

    def detect(picture: Image.Image) -> list[FaceBox]:
        return [face.box for face in retinaface.detect(model, picture, threshold=threshold, device=device)]

    return detect
