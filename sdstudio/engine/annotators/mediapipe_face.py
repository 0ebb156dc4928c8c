"""The extension's ``mediapipe_face`` map: MediaPipe's face mesh (the legacy ``solutions.face_mesh``, refined
landmarks: 478 points with the irises) drawn as the extension draws it.

The mesh comes from the ``mediapipe`` package itself, as in the extension, since its models and graphs ship
inside that wheel (``mediapipe/modules/face_landmark/face_landmark_with_attention.tflite`` and the short-range
face detector). Only the 0.10 wheels still carry the legacy solution; they declare ``numpy<2`` but run with
numpy 2, so ``scripts/setup.sh`` installs ``mediapipe==0.10.21`` without its dependencies and the ``mediapipe``
extra brings what its face mesh imports, with protobuf on the 4.25 line it declares (5.28 to 6.30 fail to
parse its graphs, 6.33 prints an ``AttributeError`` from its bindings at import, 7 breaks them).

The drawing follows the extension's ``generate_annotation``: faces found with ``static_image_mode``, up to
"Max Faces", at "Min Face Confidence"; a face whose landmarks span less than 64 pixels in either direction is
left out; the face oval, eyes, eyebrows and lips are drawn as 2-pixel lines in the extension's colours
(mediapipe's ``draw_landmarks``, connections only), the two pupils (landmarks 468 and 473) as 4×4 squares,
all on black, in BGR, then flipped to RGB.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from ...core.controlnet import ControlNetError

MAX_FACES, MIN_CONFIDENCE = 1, 0.5  # the extension's slider defaults
MIN_FACE_PIXELS = 64  # the extension's min_face_size_pixels
PUPIL_HALF_WIDTH = 2
MAX_SIDE = 32766  # OpenCV's remap, which mediapipe's image-to-tensor step calls, needs sides below SHRT_MAX

# the extension's colours (BGR, as mediapipe draws), by the face mesh's connection groups
HEAD = (10, 200, 10)
MOUTH = (10, 180, 10)
LEFT_EYE, LEFT_EYEBROW, LEFT_IRIS = (180, 200, 10), (180, 220, 10), (250, 200, 10)
RIGHT_EYE, RIGHT_EYEBROW, RIGHT_IRIS = (10, 200, 180), (10, 220, 180), (10, 200, 250)
LINE_THICKNESS = 2
PUPILS = {468: RIGHT_IRIS, 473: LEFT_IRIS}  # the refined mesh's iris centres

INSTALL = ("pip install --no-deps mediapipe==0.10.21 && pip install absl-py attrs matplotlib 'protobuf>=4.25.8,<5' "
           "(scripts/setup.sh does this)")

_lock = threading.Lock()
_mp = None


def _mediapipe(where: str):
    """The ``mediapipe`` module, imported once; a ControlNetError saying how to install it otherwise."""
    global _mp
    with _lock:
        if _mp is None:
            try:
                import mediapipe

                mediapipe.solutions.face_mesh  # noqa: B018 - the legacy solution, gone from mediapipe 0.10.22 on
            except Exception as exc:  # ImportError, or the bindings failing against this protobuf
                raise ControlNetError(f"{where} needs the mediapipe package with its legacy face mesh "
                                      f"({type(exc).__name__}: {exc}); {INSTALL}") from exc
            _mp = mediapipe
        return _mp


def _connection_colours(mp) -> dict[tuple[int, int], tuple[int, int, int]]:
    """Each drawn connection's colour, in the extension's order (later groups win where two share an edge)."""
    fm = mp.solutions.face_mesh
    spec: dict = {}
    for group, colour in ((fm.FACEMESH_FACE_OVAL, HEAD), (fm.FACEMESH_LEFT_EYE, LEFT_EYE),
                          (fm.FACEMESH_LEFT_EYEBROW, LEFT_EYEBROW), (fm.FACEMESH_RIGHT_EYE, RIGHT_EYE),
                          (fm.FACEMESH_RIGHT_EYEBROW, RIGHT_EYEBROW), (fm.FACEMESH_LIPS, MOUTH)):
        for edge in group:
            spec[edge] = colour
    return spec


def _faces(image: np.ndarray, max_faces: int, min_confidence: float, where: str) -> list:
    """mediapipe's landmark lists of the picture's faces (its protobuf messages), largest first."""
    height, width = image.shape[:2]
    if max(height, width) > MAX_SIDE:  # OpenCV inside mediapipe aborts the whole process on such a picture
        raise ControlNetError(f"{where}: a {width}×{height} picture is too large for mediapipe's face mesh "
                              f"(at most {MAX_SIDE} pixels a side); use a lower resolution or a less elongated "
                              "picture")
    mp = _mediapipe(where)
    picture = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=int(max_faces),
                                         refine_landmarks=True,
                                         min_detection_confidence=float(min_confidence)) as mesh:
        return list(mesh.process(picture).multi_face_landmarks or [])


def _points(face) -> np.ndarray:
    return np.array([(p.x, p.y, p.z) for p in face.landmark], dtype=np.float64)


def face_landmarks(image: np.ndarray, max_faces: int, min_confidence: float,
                   where: str = "ControlNet preprocessor 'mediapipe_face'") -> list[np.ndarray]:
    """Each face's 478 refined landmarks as an N×3 float array (x, y relative to the picture's width and
    height, z relative depth), largest-first as mediapipe gives them; ``image`` is RGB uint8 H×W×3."""
    return [_points(face) for face in _faces(image, max_faces, min_confidence, where)]


def large_enough(points: np.ndarray, width: int, height: int, minimum: int = MIN_FACE_PIXELS) -> bool:
    """The extension's size filter: the landmarks' box at least ``minimum`` pixels wide and high."""
    span_x = (points[:, 0].max() - points[:, 0].min()) * width
    span_y = (points[:, 1].max() - points[:, 1].min()) * height
    return min(span_x, span_y) >= minimum


def draw_pupils(canvas: np.ndarray, points: np.ndarray, colours: Mapping[int, tuple[int, int, int]],
                half_width: int = PUPIL_HALF_WIDTH) -> None:
    """The extension's pupils: a (2·half_width)² square at each listed landmark inside the picture, its
    corner at the landmark's pixel minus ``half_width`` (numpy's slicing, so nothing at the very edge)."""
    rows, cols = canvas.shape[:2]
    for idx, colour in colours.items():
        x, y = float(points[idx, 0]), float(points[idx, 1])
        if not (0.0 <= x < 1.0 and 0.0 <= y < 1.0):
            continue
        px, py = int(cols * x), int(rows * y)
        canvas[py - half_width:py + half_width, px - half_width:px + half_width, :] = colour


def detect(image: np.ndarray, max_faces: int = MAX_FACES, min_confidence: float = MIN_CONFIDENCE,
           where: str = "ControlNet preprocessor 'mediapipe_face'") -> np.ndarray:
    """The map of ``image`` (RGB uint8 H×W×3) at its own size: black where no face was found."""
    mp = _mediapipe(where)
    height, width = image.shape[:2]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)  # drawn in BGR, as the extension
    colours = _connection_colours(mp)
    specs = {edge: mp.solutions.drawing_utils.DrawingSpec(color=c, thickness=LINE_THICKNESS)
             for edge, c in colours.items()}
    for face in _faces(image, max_faces, min_confidence, where):
        points = _points(face)
        if not large_enough(points, width, height):
            continue
        mp.solutions.drawing_utils.draw_landmarks(canvas, face, connections=specs.keys(),
                                                  landmark_drawing_spec=None, connection_drawing_spec=specs)
        draw_pupils(canvas, points, PUPILS)
    return np.ascontiguousarray(canvas[:, :, ::-1])
