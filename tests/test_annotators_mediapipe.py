"""mediapipe_face: mediapipe's own refined face mesh (its bundled models) on a real photograph, scikit-image's
public-domain astronaut portrait, drawn as the extension's ``generate_annotation``: the face oval, eyes,
eyebrows and lips in its colours (the subject's left on the picture's right), the pupils as 4×4 squares at
landmarks 468 and 473, faces under 64 pixels left out, Max Faces and Min Face Confidence obeyed, and the map
cropped back to the picture's frame."""

from __future__ import annotations

import importlib.util
import sys

import cv2
import numpy as np
import pytest

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import preprocessors
from sdstudio.engine.annotators import mediapipe_face as mf
from tests.test_annotators import by_name, fresh_annotator_cache  # noqa: F401 (autouse)

if importlib.util.find_spec("mediapipe") is None:  # scripts/setup.sh installs it where a wheel exists (≤ 3.12)
    pytest.skip("mediapipe is not installed (no wheel for this Python)", allow_module_level=True)

skimage_data = pytest.importorskip("skimage.data")


def rgb(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    return bgr[::-1]


COLOURS = {"head": mf.HEAD, "mouth": mf.MOUTH, "left_eye": mf.LEFT_EYE, "left_eyebrow": mf.LEFT_EYEBROW,
           "right_eye": mf.RIGHT_EYE, "right_eyebrow": mf.RIGHT_EYEBROW, "left_iris": mf.LEFT_IRIS,
           "right_iris": mf.RIGHT_IRIS}


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()  # 512×512 RGB, one face


def pixels_of(map_: np.ndarray, bgr: tuple[int, int, int]) -> np.ndarray:
    """(x, y) of the map's pixels in that colour."""
    ys, xs = np.nonzero(np.all(map_ == np.array(rgb(bgr), np.uint8), axis=2))
    return np.stack([xs, ys], axis=1)


def test_declared_with_the_extensions_sliders(tmp_path):
    p = by_name(tmp_path)["mediapipe_face"]
    assert p.aliases == () and p.control_types == ()
    assert [s.detail() for s in p.sliders()] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Max Faces", "value": 1, "min": 1, "max": 10, "step": 1},
        {"name": "Min Face Confidence", "value": 0.5, "min": 0.01, "max": 1.0, "step": 0.01}]


def test_the_astronauts_face_is_drawn_in_the_extensions_colours(tmp_path, astronaut):
    p = by_name(tmp_path)["mediapipe_face"]
    out = preprocessors.detect(p, astronaut, 512, -1, -1)  # -1: the sliders' defaults
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    used = {tuple(c) for c in np.unique(out.reshape(-1, 3), axis=0)}
    assert used <= {(0, 0, 0)} | {rgb(c) for c in COLOURS.values()}  # nothing but black and the eight colours
    for name, colour in COLOURS.items():
        assert len(pixels_of(out, colour)) > 0, name

    (points,) = mf.face_landmarks(astronaut, 1, 0.5)
    assert points.shape == (478, 3)
    # the drawing lies on the landmarks' box (2-pixel lines: one pixel of slack on each side)
    xs, ys = np.nonzero(out.any(axis=2))[1], np.nonzero(out.any(axis=2))[0]
    box = points[:, :2] * 512
    assert xs.min() >= int(box[:, 0].min()) - 2 and xs.max() <= int(box[:, 0].max()) + 2
    assert ys.min() >= int(box[:, 1].min()) - 2 and ys.max() <= int(box[:, 1].max()) + 2
    # the pupils: a whole 4×4 square at each iris centre, drawn last
    for idx, colour in mf.PUPILS.items():
        x, y = int(512 * points[idx, 0]), int(512 * points[idx, 1])
        assert (out[y - 2:y + 2, x - 2:x + 2] == rgb(colour)).all()
        assert len(pixels_of(out, colour)) == 16
    # mediapipe's "left" is the subject's: on the picture's right, as are its eyebrow and iris
    for part in ("eye", "eyebrow", "iris"):
        left = pixels_of(out, COLOURS[f"left_{part}"])[:, 0].mean()
        right = pixels_of(out, COLOURS[f"right_{part}"])[:, 0].mean()
        assert left > right + 20, part
    # the mouth is below the eyes, the eyebrows above them
    eyes_y = pixels_of(out, mf.LEFT_EYE)[:, 1].mean()
    assert pixels_of(out, mf.MOUTH)[:, 1].mean() > eyes_y + 30
    assert pixels_of(out, mf.LEFT_EYEBROW)[:, 1].mean() < eyes_y


def test_max_faces_and_confidence(astronaut):
    face = astronaut[30:250, 120:300]  # the face with some margin
    pair = np.zeros((300, 600, 3), np.uint8)
    pair[40:260, 40:220] = face
    pair[40:260, 380:560] = face[:, ::-1]
    iris = mf.RIGHT_IRIS
    one = mf.detect(pair, 1, 0.5)
    two = mf.detect(pair, 2, 0.5)
    assert len(pixels_of(one, iris)) == 16 and len(pixels_of(two, iris)) == 32
    assert len(mf.face_landmarks(pair, 10, 0.5)) == 2  # up to 10: still two
    assert not mf.detect(pair, 2, 1.0).any()  # no detection scores 1


def test_faces_under_64_pixels_are_left_out(astronaut):
    small = cv2.resize(astronaut, (320, 320), interpolation=cv2.INTER_AREA)  # the face about 57×66 pixels
    (points,) = mf.face_landmarks(small, 1, 0.5)
    assert not mf.large_enough(points, 320, 320)  # found, but narrower than the extension's 64 pixels
    assert not mf.detect(small, 1, 0.5).any()
    assert mf.large_enough(points, 320, 320, minimum=50)
    assert mf.detect(astronaut, 1, 0.5).any()  # the same face at 512: about 92×106


def test_the_map_is_cropped_back_to_the_pictures_frame(tmp_path, astronaut):
    p = by_name(tmp_path)["mediapipe_face"]
    tall = astronaut[:, 56:456]  # 512 high, 400 wide
    out = preprocessors.detect(p, tall, 448, 1, 0.5)
    assert out.shape == (573, 448, 3)  # short side at the resolution (512·448/400 = 573.4), the padding to 576 cut
    assert len(pixels_of(out, mf.LEFT_IRIS)) == 16


def test_draw_pupils_skips_points_outside_and_at_the_edge():
    canvas = np.zeros((10, 10, 3), np.uint8)
    points = np.zeros((478, 3))
    points[468] = (1.0, 0.5, 0)  # x = 1: outside, skipped
    points[473] = (0.05, 0.5, 0)  # pixel 0: the slice starts at -2, numpy's empty slice, as in the extension
    mf.draw_pupils(canvas, points, mf.PUPILS)
    assert not canvas.any()
    points[473] = (0.5, 0.5, 0)
    mf.draw_pupils(canvas, points, mf.PUPILS)
    assert (canvas[3:7, 3:7] == mf.LEFT_IRIS).all() and canvas.sum() == 16 * sum(mf.LEFT_IRIS)


def test_a_missing_mediapipe_is_named(monkeypatch, astronaut):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # what Python does for a package that is not there
    monkeypatch.setattr(mf, "_mp", None)
    with pytest.raises(ControlNetError, match=r"'mediapipe_face' needs the mediapipe package .*"
                                               r"pip install --no-deps mediapipe==0\.10\.21"):
        mf.detect(astronaut, 1, 0.5)


def test_a_picture_too_elongated_for_mediapipe_is_refused_not_a_crash(tmp_path):
    p = by_name(tmp_path)["mediapipe_face"]
    strip = np.zeros((16, 1100, 3), np.uint8)  # at 480: 33000×480 (33024×512 padded), under the pixel limit, but a
    # side where OpenCV inside mediapipe aborts the whole process
    with pytest.raises(ControlNetError, match=r"'mediapipe_face': a 33024×512 picture is too large .* 32766"):
        preprocessors.detect(p, strip, 480, -1, -1)
    assert preprocessors.detect(p, strip, 64, -1, -1).shape == (64, 4400, 3)  # within the limit: a black map
    with pytest.raises(ControlNetError, match=r"^ControlNet preprocessor 'mediapipe_face': a 1100×16 control "
                                               r"picture at resolution 1024 would be 70400×1024 pixels"):
        preprocessors.detect(p, strip, 1024, -1, -1)  # over the pixel limit for every preprocessor
