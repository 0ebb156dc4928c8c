"""InsightFace's face analysis, as sd-webui-controlnet runs it for IP-Adapter FaceID and InstantID: find the faces
with an SCRFD detector, align each by its five keypoints and embed it with an ArcFace network.

The two ONNX graphs of a model pack run through :class:`~.dwpose.OnnxGraph` (onnxruntime, else OpenCV's dnn);
the ``insightface`` package is not needed. Packs, as the extension asks for them:

* ``buffalo_l`` (IP-Adapter FaceID): ``det_10g.onnx``, ``w600k_r50.onnx``;
* ``antelopev2`` (InstantID): ``scrfd_10g_bnkps.onnx``, ``glintr100.onnx``.

They are looked for in ``models/insightface/models/<pack>/`` (where InsightFace-based A1111 extensions keep
them) and in ``<annotators>/insightface/models/<pack>/`` (the extension's ``annotator/downloads`` layout).

Steps, as insightface 0.7's ``FaceAnalysis`` with ``det_size=(640, 640)``:

* detection: the BGR picture scaled to fit 640×640 (its aspect kept, ``int`` sizes, linear) into the top-left
  of a black canvas, ``(x - 127.5) / 128`` with red and blue swapped; the graph's 9 outputs are scores, box
  distances and keypoint distances (× stride) for strides 8, 16 and 32, two anchors per cell at
  ``(column, row) × stride``; scores of at least 0.5 kept, boxes ``centre -/+ distance``, non-maximum
  suppression at IoU 0.4 (pixel-inclusive areas), all divided by the scale;
* recognition: the face warped to 112×112 by the similarity (Umeyama, with scale) taking its keypoints to
  ArcFace's template, ``(x - 127.5) / 127.5`` with red and blue swapped, the graph's 512 outputs the
  ``embedding``; ``normed_embedding`` is it over its length.

The extension keeps the largest face (by box area) when there are several, and fails when there is none.
InstantID's two preprocessors first bring the picture's short side to 512 (and pad it to multiples of 64, as
the other annotators): ``instant_id_face_embedding`` gives that face's embedding (not normed), and
``instant_id_face_keypoints`` draws its five keypoints as the extension's ``draw_kps`` does (four sticks from
the nose to the eyes and the mouth corners at 60 % of their colour, then a dot of radius 10 for each point, on
black), the padding cut off again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ...core.controlnet import ControlNetError
from ...models.errors import ModelFileError
from .common import cached
from .dwpose import OnnxGraph, nms

SOURCE = "the insightface model packs (deepinsight/insightface releases, or their copies on the Hugging Face hub)"
PACKS = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"), "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx")}
DET_SIZE = (640, 640)  # (width, height)
DET_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
DET_MEAN, DET_STD = 127.5, 128.0
REC_MEAN, REC_STD = 127.5, 127.5
REC_SIZE = 112
# where ArcFace's 112×112 crop puts the eyes, the nose tip and the mouth corners
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float32)


@dataclass
class Face:
    """One detected face: its box (x1, y1, x2, y2) and score, five keypoints (x, y) and its embedding."""

    bbox: np.ndarray
    score: float
    kps: np.ndarray
    embedding: np.ndarray | None = None

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))

    @property
    def normed_embedding(self) -> np.ndarray:
        return self.embedding / np.linalg.norm(self.embedding)


INSTANT_ID_RESOLUTION = 512
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
KPS_STICK = 4
KPS_RADIUS = 10


def pack_folders(models_dir: Path, annotators_dir: Path, pack: str) -> list[Path]:
    return [Path(models_dir) / "insightface" / "models" / pack, Path(annotators_dir) / "insightface" / "models" / pack]


def find_pack(models_dir: Path, annotators_dir: Path, pack: str, module: str) -> tuple[Path, Path]:
    """The pack's detection and recognition graphs; a missing one is a :class:`ControlNetError` saying where
    to put it."""
    folders = pack_folders(models_dir, annotators_dir, pack)
    found = []
    for name in PACKS[pack]:
        path = next((f / name for f in folders if (f / name).is_file()), None)
        if path is None:
            raise ControlNetError(f"{module} needs InsightFace's {pack} pack: put {name} (with the pack's other "
                                  f"files) in {folders[0]} (or in {folders[1]}); get it from {SOURCE}")
        found.append(path)
    return found[0], found[1]


# ---- detection ---------------------------------------------------------------------------------------------

def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    return np.stack([points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
                     points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]], axis=-1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    out = [points[:, i % 2] + distance[:, i] for i in range(distance.shape[1])]
    return np.stack(out, axis=-1)


def det_input(image_bgr: np.ndarray, size: tuple[int, int] = DET_SIZE) -> tuple[np.ndarray, float]:
    """The detector's 1×3×H×W input and the picture's scale into it."""
    h, w = image_bgr.shape[:2]
    if h / w > size[1] / size[0]:
        new_h = size[1]
        new_w = int(new_h / (h / w))
    else:
        new_w = size[0]
        new_h = int(new_w * (h / w))
    scale = new_h / h
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image_bgr, (new_w, new_h))
    blob = (canvas[:, :, ::-1].astype(np.float32) - DET_MEAN) / DET_STD
    return np.ascontiguousarray(blob.transpose(2, 0, 1)[None]), scale


def decode_scrfd(outputs: list[np.ndarray], height: int, width: int, threshold: float = DET_THRESHOLD
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (N), boxes (N×4) and keypoints (N×5×2) over ``threshold`` from SCRFD's 9 outputs, in the input's
    pixels (before NMS)."""
    if len(outputs) != 9:
        raise ModelFileError(f"an SCRFD face detector with keypoints has 9 outputs, this graph {len(outputs)}")
    scores, boxes, points = [], [], []
    for i, stride in enumerate((8, 16, 32)):
        s, b, k = (np.asarray(outputs[i + 3 * j], np.float32) for j in range(3))
        if s.ndim == 3:  # batched graphs: the first picture
            s, b, k = s[0], b[0], k[0]
        rows, cols = height // stride, width // stride
        centres = (np.stack(np.mgrid[:rows, :cols][::-1], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
        centres = np.repeat(centres, 2, axis=0)  # two anchors per cell
        if len(s) != len(centres):
            raise ModelFileError(f"SCRFD stride {stride}: {len(s)} anchors, expected {len(centres)} for "
                                 f"{width}×{height}")
        keep = np.where(s.reshape(-1) >= threshold)[0]
        scores.append(s.reshape(-1)[keep])
        boxes.append(distance2bbox(centres, b * stride)[keep])
        points.append(distance2kps(centres, k * stride).reshape(len(centres), -1, 2)[keep])
    return np.concatenate(scores), np.concatenate(boxes), np.concatenate(points)


# ---- alignment and recognition -----------------------------------------------------------------------------

def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3×3 similarity (rotation, uniform scale, translation) taking ``src`` points nearest to ``dst`` in
    least squares (Umeyama 1991, as scikit-image's ``SimilarityTransform.estimate``)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(dim)
    if np.linalg.det(cov) < 0:
        d[dim - 1] = -1
    out = np.eye(dim + 1)
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        return np.full((dim + 1, dim + 1), np.nan)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            out[:dim, :dim] = u @ vt
        else:
            keep = d[dim - 1]
            d[dim - 1] = -1
            out[:dim, :dim] = u @ np.diag(d) @ vt
            d[dim - 1] = keep
    else:
        out[:dim, :dim] = u @ np.diag(d) @ vt
    scale = 1.0 / src_c.var(0).sum() * (s @ d)
    out[:dim, dim] = dst_mean - scale * (out[:dim, :dim] @ src_mean)
    out[:dim, :dim] *= scale
    return out


def align(image_bgr: np.ndarray, kps: np.ndarray, size: int = REC_SIZE) -> np.ndarray:
    """The face as ArcFace sees it: ``size``×``size``, its keypoints on the template (insightface's
    ``norm_crop``)."""
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    else:
        ratio, shift = size / 128.0, 8.0 * size / 128.0
    template = ARCFACE_TEMPLATE * ratio
    template[:, 0] += shift
    matrix = umeyama(kps, template)[:2]
    return cv2.warpAffine(image_bgr, matrix, (size, size), borderValue=0.0)


class FaceAnalysis:
    """A model pack's detector and recognizer (see the module's docstring)."""

    def __init__(self, detector: Path, recognizer: Path):
        self.detector = cached(Path(detector), "onnx", OnnxGraph)
        self.recognizer = cached(Path(recognizer), "onnx", OnnxGraph)

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        blob, scale = det_input(image_bgr)
        scores, boxes, points = decode_scrfd(self.detector(blob), blob.shape[2], blob.shape[3])
        if not len(scores):
            return []
        order = scores.argsort()[::-1]
        scores, boxes, points = scores[order], boxes[order] / scale, points[order] / scale
        keep = nms(boxes, scores, NMS_THRESHOLD)
        return [Face(boxes[i], float(scores[i]), points[i]) for i in keep]

    def embed(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        crop = align(image_bgr, face.kps)
        blob = (crop[:, :, ::-1].astype(np.float32) - REC_MEAN) / REC_STD
        out = self.recognizer(np.ascontiguousarray(blob.transpose(2, 0, 1)[None]))[0]
        return np.asarray(out, np.float32).reshape(-1)

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        """Every face of an RGB picture, with its embedding."""
        bgr = cv2.cvtColor(np.ascontiguousarray(image_rgb[:, :, :3]), cv2.COLOR_RGB2BGR)
        found = self.detect(bgr)
        for face in found:
            face.embedding = self.embed(bgr, face)
        return found


def largest_face(faces: list[Face], where: str) -> Face:
    """The face the extension uses: the largest box; none is a :class:`ControlNetError`."""
    if not faces:
        raise ControlNetError(f"{where}: InsightFace found no face in the picture")
    return max(faces, key=lambda f: f.area)


def face_analysis(models_dir: Path, annotators_dir: Path, pack: str, module: str) -> FaceAnalysis:
    return FaceAnalysis(*find_pack(models_dir, annotators_dir, pack, module))


# ---- InstantID's preprocessors -------------------------------------------------------------------------------

def draw_kps(size: tuple[int, int], kps: np.ndarray) -> np.ndarray:
    """The extension's InstantID keypoint map (``draw_kps``) on a black H×W canvas, RGB uint8."""
    h, w = size
    out = np.zeros((h, w, 3), np.float64)
    kps = np.asarray(kps, np.float64)
    for a, b in KPS_LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = float(np.hypot(x[0] - x[1], y[0] - y[1]))
        angle = int(np.degrees(np.arctan2(y[0] - y[1], x[0] - x[1])))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), KPS_STICK), angle, 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), polygon, KPS_COLORS[a])
    out = (out * 0.6).astype(np.uint8)
    for (x, y), color in zip(kps, KPS_COLORS, strict=False):
        out = cv2.circle(out.copy(), (int(x), int(y)), KPS_RADIUS, color, -1)
    return out


def instant_id_face(analysis: FaceAnalysis, image_rgb: np.ndarray, where: str) -> tuple[Face, tuple, object]:
    """The largest face of the picture as InstantID's preprocessors see it (short side at 512, padded), the
    padded size and the function cutting the padding off."""
    from ..preprocessors import resize_with_pad

    padded, remove_pad = resize_with_pad(np.asarray(image_rgb)[:, :, :3], INSTANT_ID_RESOLUTION)
    return largest_face(analysis.faces(padded), where), padded.shape[:2], remove_pad


def instant_id_keypoints(analysis: FaceAnalysis, image_rgb: np.ndarray, where: str) -> np.ndarray:
    face, size, remove_pad = instant_id_face(analysis, image_rgb, where)
    return remove_pad(draw_kps(size, face.kps))
