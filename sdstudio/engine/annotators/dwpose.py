"""DWPose whole-body keypoints, the extension's ``dw_openpose_full``: YOLOX-L finds the people
(``yolox_l.onnx``), RTMPose-style DWPose puts 133 COCO-WholeBody keypoints on each (``dw-ll_ucoco_384.onnx``),
and the result is drawn as an OpenPose map (body, hands, face) with :mod:`.openpose`'s drawing.

The two published ONNX graphs run through onnxruntime when it is installed (the ``dwpose`` extra), else through
OpenCV's dnn module, which is what the extension itself uses; both on the CPU as in the extension (onnxruntime
takes CUDA when its GPU build is installed). Each graph runs one picture at a time.

Steps, as the extension's ``Wholebody``:

* detection: the picture (RGB, as the extension passes it) scaled by ``min(640 / h, 640 / w)`` (linear) into the
  top-left of a 640×640 canvas of 114, raw 0-255 values; YOLOX's outputs decoded on the 8/16/32 grids
  (centre ``(p + cell) × stride``, size ``exp(p) × stride``), scores objectness × class, boxes over 0.1 kept by
  non-maximum suppression at IoU 0.45 (pixel-inclusive areas), then people (class 0) over 0.3. No box of any
  class over 0.1: nobody (a black map). Boxes of other classes only: the whole picture is one box (the
  extension's fallback);
* pose: each box's centre and 1.25× size, widened to the 288:384 aspect, cut out by an affine warp (linear),
  normalized with ImageNet's mean/std in 0-255; SimCC decoding: the argmax of each axis over the split ratio 2,
  the score the smaller of the two maxima (a location of -1 where it is not positive), mapped back through the
  box;
* assembly: a neck (the shoulders' mean, scored 1 when both shoulders score over 0.3, else 0) is inserted as
  keypoint 17 and the first 18 are reordered to OpenPose's body order; keypoints scoring under 0.3 are dropped;
  body 0-17, face 24-91 (plus the two eyes, OpenPose's 69th and 70th points), left hand 92-112, right hand
  113-133. Keypoints stay in pixels (the drawing tells pixels from fractions).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached
from .openpose import Keypoint, Pose

_SOURCE = "yzd-v/DWPose on the Hugging Face hub"
DETECTOR = AnnotatorFile("yolox_l.onnx", "openpose", _SOURCE, safetensors=False)
POSE = AnnotatorFile("dw-ll_ucoco_384.onnx", "openpose", _SOURCE, safetensors=False)
DETECTOR_SIZE = (640, 640)  # (height, width)
POSE_SIZE = (288, 384)  # (width, height), as the extension writes it
STRIDES = (8, 16, 32)
PAD_VALUE = 114
NMS_IOU = 0.45
BOX_SCORE = 0.1  # kept for NMS
PERSON_SCORE = 0.3
KEYPOINT_SCORE = 0.3
BOX_PADDING = 1.25
SIMCC_SPLIT = 2.0
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
# DWPose (MMPose) body indices, after the neck is inserted at 17, that go to OpenPose's positions
MMPOSE_ORDER = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_ORDER = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]


# --- running a graph ------------------------------------------------------------------------------------------

def _runtime_errors(onnxruntime) -> tuple[type[BaseException], ...]:
    """What a runtime raises for a graph it cannot read or run: OpenCV's error, onnxruntime's own classes (they
    derive from Exception directly), and the usual Python ones."""
    errors: list[type[BaseException]] = [cv2.error, RuntimeError, ValueError, TypeError, OSError]
    if onnxruntime is not None:
        state = onnxruntime.capi.onnxruntime_pybind11_state
        errors += [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    return tuple(errors)


class OnnxGraph:
    """One ONNX graph, run by onnxruntime when installed, else by OpenCV's dnn. ``__call__`` takes one float32
    NCHW batch and returns the graph's outputs in its own order."""

    def __init__(self, path: Path, backend: str | None = None):
        """``backend``: "onnxruntime", "opencv", or None for onnxruntime when it is installed."""
        self.path = Path(path)
        onnxruntime = None
        if backend in (None, "onnxruntime"):
            try:
                import onnxruntime
            except ImportError:
                if backend == "onnxruntime":
                    raise ModelFileError(f"{self.path.name}: onnxruntime is not installed (pip install onnxruntime, "
                                         f"or sdstudio's 'dwpose' extra)") from None
        elif backend != "opencv":
            raise ValueError(f"unknown ONNX backend {backend!r}")
        self._errors = _runtime_errors(onnxruntime)
        try:
            if onnxruntime is not None:
                available = onnxruntime.get_available_providers()
                providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
                self._session = onnxruntime.InferenceSession(str(self.path), providers=providers)
                self._net = None
                self.backend = "onnxruntime"
            else:
                self._session = None
                self._net = cv2.dnn.readNetFromONNX(str(self.path))
                self._net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
                self._net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
                self.backend = "opencv"
        except self._errors as exc:
            raise ModelFileError(f"{self.path.name}: not a readable ONNX graph ({str(exc).strip()[:200]})") from None

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        try:
            if self._session is not None:
                name = self._session.get_inputs()[0].name
                return list(self._session.run(None, {name: x}))
            self._net.setInput(x)
            return list(self._net.forward(self._net.getUnconnectedOutLayersNames()))
        except self._errors as exc:
            raise ModelFileError(f"{self.path.name}: the graph does not take a {tuple(x.shape)} input "
                                 f"({str(exc).strip()[:200]})") from None


def load(path: Path) -> OnnxGraph:
    return cached(Path(path), "onnx", OnnxGraph)


# --- detection ------------------------------------------------------------------------------------------------

def letterbox(image: np.ndarray, size: tuple[int, int] = DETECTOR_SIZE) -> tuple[np.ndarray, float]:
    """The detector's 3×H×W float32 input (the picture scaled into the top-left corner of a 114 canvas) and the
    scale."""
    h, w = image.shape[:2]
    r = min(size[0] / h, size[1] / w)
    resized = cv2.resize(image, (int(w * r), int(h * r)), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    canvas = np.full((size[0], size[1], 3), PAD_VALUE, np.uint8)
    canvas[:int(h * r), :int(w * r)] = resized
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), r


def yolox_decode(outputs: np.ndarray, size: tuple[int, int] = DETECTOR_SIZE) -> np.ndarray:
    """YOLOX's N×(4 + 1 + classes) rows (grid cells of the 8, 16 and 32 strides, row-major, stride by stride)
    with centres ``(p + cell) × stride`` and sizes ``exp(p) × stride``."""
    grids, strides = [], []
    for stride in STRIDES:
        rows, cols = size[0] // stride, size[1] // stride
        xv, yv = np.meshgrid(np.arange(cols), np.arange(rows))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((rows * cols, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    out = np.array(outputs, dtype=np.float32, copy=True)
    if out.shape[-2] != len(grid):
        raise ModelFileError(f"{DETECTOR.name}: {out.shape[-2]} detections, expected {len(grid)} for "
                             f"{size[1]}×{size[0]}")
    out[..., :2] = (out[..., :2] + grid) * stride
    out[..., 2:4] = np.exp(out[..., 2:4]) * stride
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression, highest score first: a box goes when its IoU (areas counted
    pixel-inclusive, ``(x2 - x1 + 1) × (y2 - y1 + 1)``) with a kept one is over ``threshold``."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(overlap <= threshold)[0] + 1]
    return keep


def people(predictions: np.ndarray, ratio: float) -> np.ndarray | None:
    """Person boxes (x1, y1, x2, y2 in the picture's pixels) from decoded predictions; None when no box of any
    class scores over 0.1 (an empty array when some do but no person passes)."""
    boxes = predictions[:, :4]
    scores = predictions[:, 4:5] * predictions[:, 5:]
    xyxy = np.empty_like(boxes)
    xyxy[:, 0], xyxy[:, 1] = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2
    xyxy[:, 2], xyxy[:, 3] = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    xyxy /= ratio
    if not (scores > BOX_SCORE).any():
        return None
    person = scores[:, 0]
    valid = person > BOX_SCORE
    if not valid.any():
        return np.zeros((0, 4), np.float32)
    kept_boxes, kept_scores = xyxy[valid], person[valid]
    keep = nms(kept_boxes, kept_scores)
    kept_boxes, kept_scores = kept_boxes[keep], kept_scores[keep]
    return kept_boxes[kept_scores > PERSON_SCORE]


def detect_people(graph: OnnxGraph, image: np.ndarray) -> np.ndarray | None:
    x, ratio = letterbox(image)
    return people(yolox_decode(graph(x[None])[0])[0], ratio)


# --- pose -----------------------------------------------------------------------------------------------------

def box_center_scale(box: np.ndarray, padding: float = BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([x1 + x2, y1 + y2]) * 0.5, np.array([x2 - x1, y2 - y1]) * padding


def fix_aspect(scale: np.ndarray, aspect: float) -> np.ndarray:
    """(w, h) widened or heightened to ``aspect`` = w / h."""
    w, h = scale
    return np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])


def warp_matrix(center: np.ndarray, scale: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The affine map taking the box (centre, size (w, h)) onto a ``size`` (w, h) crop, as MMPose's
    ``get_warp_matrix`` without rotation: the centre to the crop's centre, the box's width to the crop's."""
    dst_w, dst_h = size
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, scale[0] * -0.5])
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + np.array([0.0, dst_w * -0.5])
    for m in (src, dst):
        direction = m[0] - m[1]
        m[2] = m[1] + np.array([-direction[1], direction[0]])
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def crop(image: np.ndarray, box: np.ndarray, size: tuple[int, int] = POSE_SIZE
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pose graph's 3×h×w float32 input for one box, with the box's centre and (aspect-fixed) scale."""
    center, scale = box_center_scale(box)
    scale = fix_aspect(scale, size[0] / size[1])
    warped = cv2.warpAffine(image, warp_matrix(center, scale, size), (int(size[0]), int(size[1])),
                            flags=cv2.INTER_LINEAR)
    x = (warped - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32), center, scale


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = SIMCC_SPLIT
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, Wx) and (N, K, Wy) SimCC maps → (N, K, 2) locations (argmax / split; -1 where the score is not
    positive) and (N, K) scores (the smaller of the two maxima)."""
    n, k, _ = simcc_x.shape
    sx, sy = simcc_x.reshape(n * k, -1), simcc_y.reshape(n * k, -1)
    locs = np.stack((np.argmax(sx, axis=1), np.argmax(sy, axis=1)), axis=-1).astype(np.float32)
    vals = np.minimum(np.amax(sx, axis=1), np.amax(sy, axis=1))
    locs[vals <= 0.0] = -1
    return locs.reshape(n, k, 2) / split, vals.reshape(n, k)


def keypoints_in_picture(locs: np.ndarray, center: np.ndarray, scale: np.ndarray,
                         size: tuple[int, int] = POSE_SIZE) -> np.ndarray:
    """Crop locations back to the picture: ``loc / size × scale + centre - scale / 2``."""
    return locs / np.array(size) * scale + center - scale / 2


def estimate(graph: OnnxGraph, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(people, 133, 3) keypoints (x, y, score) in the picture's pixels; an empty box list means the whole
    picture."""
    h, w = image.shape[:2]
    if len(boxes) == 0:
        boxes = np.array([[0, 0, w, h]], np.float32)
    found = []
    for box in boxes:
        x, center, scale = crop(image, box)
        outputs = graph(x[None])
        if len(outputs) < 2:
            raise ModelFileError(f"{POSE.name}: expected the SimCC x and y outputs, got {len(outputs)} output(s)")
        locs, scores = simcc_decode(outputs[0], outputs[1])
        points = keypoints_in_picture(locs[0], center, scale)
        found.append(np.concatenate([points, scores[0][:, None]], axis=1))
    return np.array(found)


def to_openpose(info: np.ndarray) -> np.ndarray:
    """(people, 133, 3) → (people, 134, 3): the neck inserted at 17 and the body reordered to OpenPose's."""
    neck = np.mean(info[:, [5, 6]], axis=1)
    neck[:, 2] = np.logical_and(info[:, 5, 2] > KEYPOINT_SCORE, info[:, 6, 2] > KEYPOINT_SCORE).astype(int)
    out = np.insert(info, 17, neck, axis=1)
    out[:, OPENPOSE_ORDER] = out[:, MMPOSE_ORDER]
    return out


def poses(info: np.ndarray | None) -> list[Pose]:
    """The people of :func:`to_openpose` keypoints, keypoints scoring under 0.3 dropped (a part with none left
    is None; a body with none is 18 Nones)."""
    def part(rows: np.ndarray) -> list[Keypoint | None] | None:
        points = [Keypoint(float(x), float(y), float(s)) if s >= KEYPOINT_SCORE else None for x, y, s in rows]
        return None if all(p is None for p in points) else points

    out = []
    for person in [] if info is None else info:
        body = part(person[:18]) or [None] * 18
        face = part(person[24:92])
        if face is not None:
            face += [body[14], body[15]]  # OpenPose's face has 70 points: the eyes close it
        out.append(Pose(body, part(person[92:113]), part(person[113:134]), face))
    return out


def detect(detector: OnnxGraph, pose: OnnxGraph, image: np.ndarray) -> list[Pose]:
    """The people in an RGB uint8 picture (keypoints in its pixels)."""
    boxes = detect_people(detector, image)
    if boxes is None:
        return []
    return poses(to_openpose(estimate(pose, image, boxes)))
