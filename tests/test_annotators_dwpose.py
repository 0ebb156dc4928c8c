"""DWPose (dw_openpose_full): tiny ONNX graphs with the published files' input and output names and shapes
(yolox_l.onnx: "images" 1×3×640×640 → "output" 1×8400×85; dw-ll_ucoco_384.onnx: "input" 1×3×384×288 →
"simcc_x" 1×133×576, "simcc_y" 1×133×768), exported by torch, whose outputs are hand-made detections and SimCC
maps; the pipeline runs end to end through the preprocessor, and each step (letterbox, YOLOX decoding, NMS,
the crop, SimCC decoding, the OpenPose reordering) is checked against its formula.
"""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pytest
import torch

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import annotators
from sdstudio.engine.annotators import common, dwpose, openpose
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import fresh_annotator_cache, picture  # noqa: F401 (autouse)

torch.set_num_threads(1)

CELLS = sum((640 // s) ** 2 for s in (8, 16, 32))  # 8400
# COCO-WholeBody body index -> OpenPose body index (the neck, OpenPose's 1, is made from the shoulders)
COCO_TO_OPENPOSE = {0: 0, 6: 2, 8: 3, 10: 4, 5: 5, 7: 6, 9: 7, 12: 8, 14: 9, 16: 10, 11: 11, 13: 12, 15: 13,
                    2: 14, 1: 15, 4: 16, 3: 17}


class _Constant(torch.nn.Module):
    """Returns fixed tensors whatever the picture (the graph still reads its input)."""

    def __init__(self, *outputs: torch.Tensor):
        super().__init__()
        for i, t in enumerate(outputs):
            self.register_buffer(f"out{i}", t)
        self.count = len(outputs)

    def forward(self, x):
        zero = x.mean() * 0.0
        outs = tuple(getattr(self, f"out{i}") + zero for i in range(self.count))
        return outs if self.count > 1 else outs[0]


def export(path, module, shape, inputs, outputs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(shape),), str(path), input_names=inputs, output_names=outputs,
                          dynamo=False)
    return path


def detector_output(boxes: list[tuple[int, tuple[float, float, float, float], float, float]]) -> torch.Tensor:
    """1×8400×85 raw YOLOX rows; each (class, box x1 y1 x2 y2 in detector pixels, objectness, class score) goes
    into the stride-8 cell holding its centre."""
    out = torch.zeros(1, CELLS, 85)
    for cls, (x1, y1, x2, y2), obj, score in boxes:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        col, row = int(cx // 8), int(cy // 8)
        i = row * 80 + col
        out[0, i, :4] = torch.tensor([cx / 8 - col, cy / 8 - row, math.log((x2 - x1) / 8), math.log((y2 - y1) / 8)])
        out[0, i, 4] = obj
        out[0, i, 5 + cls] = score
    return out


def simcc(points: dict[int, tuple[float, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCC maps with keypoint k peaking at crop pixel (u, v) (bins 2u, 2v) at height ``score``; every other
    keypoint peaks at 0.05 (under the 0.3 threshold)."""
    sx, sy = torch.zeros(1, 133, 576), torch.zeros(1, 133, 768)
    sx[0, :, 0], sy[0, :, 0] = 0.05, 0.05
    for k, (u, v, score) in points.items():
        sx[0, k, 0], sy[0, k, 0] = 0.0, 0.0
        sx[0, k, round(2 * u)], sy[0, k, round(2 * v)] = score, score
    return sx, sy


def write_graphs(folder, boxes, points):
    export(folder / "openpose" / "yolox_l.onnx", _Constant(detector_output(boxes)), (1, 3, 640, 640),
           ["images"], ["output"])
    export(folder / "openpose" / "dw-ll_ucoco_384.onnx", _Constant(*simcc(points)), (1, 3, 384, 288),
           ["input"], ["simcc_x", "simcc_y"])


def run(folder, image=None):
    p = {q.name: q for q in annotators.preprocessors(folder)}["dw_openpose_full"]
    return p.run(picture() if image is None else image, 64, -1, -1)


# the picture: 80×100 at resolution 64 → 64×80, padded to 64×128; the detector sees it ×5
PERSON = (30.0, 10.0, 60.0, 60.0)  # in the padded picture's pixels
BODY = {0: (144, 40), 5: (170, 100), 6: (118, 100), 7: (180, 160), 8: (108, 160), 11: (160, 220), 12: (128, 220),
        1: (150, 30), 2: (138, 30)}  # COCO index: crop pixel (u, v)
LEFT_HAND = {92 - 1 + j: (200 + 3 * j, 200 + 2 * j) for j in range(21)}  # DWPose 91-111 (OpenPose 92-112 later)
FACE = {23 + j: (120 + j, 50 + (j % 5)) for j in range(68)}  # DWPose 23-90


def _points(score: float = 0.9) -> dict:
    return {k: (u, v, score) for k, (u, v) in {**BODY, **LEFT_HAND, **FACE}.items()}


def _to_picture(u: float, v: float, box=PERSON) -> tuple[float, float]:
    """A crop pixel back in the picture, by the formulas: centre, 1.25× size widened to 288:384."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = (box[2] - box[0]) * 1.25, (box[3] - box[1]) * 1.25
    w, h = (w, w / 0.75) if w > h * 0.75 else (h * 0.75, h)
    return u / 288 * w + cx - w / 2, v / 384 * h + cy - h / 2


def expected_pose(box=PERSON) -> openpose.Pose:
    kp = {k: openpose.Keypoint(*_to_picture(u, v, box), 0.9) for k, (u, v) in {**BODY, **LEFT_HAND, **FACE}.items()}
    body: list = [None] * 18
    for coco, op in COCO_TO_OPENPOSE.items():
        body[op] = kp.get(coco)
    left, right = kp[5], kp[6]
    body[1] = openpose.Keypoint((left.x + right.x) / 2, (left.y + right.y) / 2, 1.0)  # both shoulders over 0.3
    face = [kp[23 + j] for j in range(68)] + [body[14], body[15]]
    return openpose.Pose(body, [kp[91 + j] for j in range(21)], None, face)


# --- end to end -----------------------------------------------------------------------------------------------

def test_dwpose_runs_the_two_graphs_and_draws_openposes_map(tmp_path):
    scaled = tuple(5 * v for v in PERSON)
    shifted = tuple(v + 5 for v in scaled)  # the same person found twice: NMS keeps the better one
    write_graphs(tmp_path, [(0, scaled, 0.9, 0.8), (0, shifted, 0.9, 0.6), (5, (400, 400, 500, 500), 0.9, 0.9)],
                 _points())
    out = run(tmp_path)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    expected = openpose.draw_poses([expected_pose()], 64, 128)[:64, :80]
    assert np.array_equal(out, expected)
    assert (out == [255, 255, 255]).all(axis=2).any()  # the face's white dots are there
    assert (out == [0, 0, 255]).all(axis=2).any()  # the hand's blue joints


def test_the_poses_come_out_in_pixels_with_the_openpose_layout(tmp_path):
    write_graphs(tmp_path, [(0, tuple(5 * v for v in PERSON), 0.9, 0.8)], _points())
    graphs = dwpose.load(tmp_path / "openpose" / "yolox_l.onnx"), dwpose.load(tmp_path / "openpose" /
                                                                              "dw-ll_ucoco_384.onnx")
    padded, _ = common.resize_with_pad(picture(), 64)
    (found,) = dwpose.detect(*graphs, padded)
    want = expected_pose()
    for got, exp in zip(found.body, want.body):
        assert (got is None) == (exp is None)
        if got is not None:
            assert got.x == pytest.approx(exp.x, abs=1e-3) and got.y == pytest.approx(exp.y, abs=1e-3)
    assert found.right_hand is None and len(found.left_hand) == 21 and len(found.face) == 70
    assert found.face[68] is found.body[14] and found.face[69] is found.body[15]


def test_no_detection_is_an_empty_map_and_other_classes_alone_mean_the_whole_picture(tmp_path):
    write_graphs(tmp_path, [], _points())
    assert not run(tmp_path).any()
    common.clear_cache()
    write_graphs(tmp_path, [(5, (100, 100, 200, 300), 0.9, 0.9)], _points())  # a class-5 box only
    out = run(tmp_path)
    whole = (0.0, 0.0, 128.0, 64.0)  # the padded picture
    assert np.array_equal(out, openpose.draw_poses([expected_pose(whole)], 64, 128)[:64, :80])
    assert out.any()


def test_opencv_dnn_runs_the_same_graphs(tmp_path):
    write_graphs(tmp_path, [(0, tuple(5 * v for v in PERSON), 0.9, 0.8)], _points())
    padded, _ = common.resize_with_pad(picture(), 64)
    paths = tmp_path / "openpose" / "yolox_l.onnx", tmp_path / "openpose" / "dw-ll_ucoco_384.onnx"
    by_ort = [dwpose.OnnxGraph(p, backend="onnxruntime") for p in paths]
    by_cv = [dwpose.OnnxGraph(p, backend="opencv") for p in paths]
    assert by_ort[0].backend == "onnxruntime" and by_cv[0].backend == "opencv"
    x, _ = dwpose.letterbox(padded)
    assert np.allclose(by_ort[0](x[None])[0], by_cv[0](x[None])[0])
    a, b = dwpose.detect(*by_ort, padded), dwpose.detect(*by_cv, padded)
    assert len(a) == len(b) == 1
    assert all((p is None and q is None) or (p.x == pytest.approx(q.x) and p.y == pytest.approx(q.y))
               for p, q in zip(a[0].body, b[0].body))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ControlNetError) as err:
        run(tmp_path)
    assert f"put yolox_l.onnx in {tmp_path / 'openpose'}" in str(err.value) and "yzd-v/DWPose" in str(err.value)
    export(tmp_path / "openpose" / "yolox_l.onnx", _Constant(detector_output([])), (1, 3, 640, 640), ["images"],
           ["output"])
    with pytest.raises(ControlNetError, match=r"put dw-ll_ucoco_384\.onnx in"):
        run(tmp_path)
    (tmp_path / "openpose" / "dw-ll_ucoco_384.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelFileError, match="dw-ll_ucoco_384.onnx: not a readable ONNX graph"):
        run(tmp_path)
    assert all(p.suffix == ".onnx" for p in dwpose.POSE.candidates(tmp_path))  # no .safetensors stand-in


def test_a_detector_of_another_size_is_refused_naming_it(tmp_path):
    export(tmp_path / "openpose" / "yolox_l.onnx", _Constant(torch.zeros(1, 100, 85)), (1, 3, 640, 640),
           ["images"], ["output"])
    export(tmp_path / "openpose" / "dw-ll_ucoco_384.onnx", _Constant(*simcc({})), (1, 3, 384, 288), ["input"],
           ["simcc_x", "simcc_y"])
    with pytest.raises(ModelFileError, match="yolox_l.onnx: 100 detections, expected 8400"):
        run(tmp_path)


# --- the steps ------------------------------------------------------------------------------------------------

def test_letterbox_puts_the_scaled_picture_top_left_on_114():
    image = picture(64, 128)
    x, r = dwpose.letterbox(image)
    assert r == 5.0 and x.shape == (3, 640, 640) and x.dtype == np.float32
    scaled = cv2.resize(image, (640, 320), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(x[:, :320].transpose(1, 2, 0), scaled.astype(np.float32))
    assert (x[:, 320:] == 114).all()
    x, r = dwpose.letterbox(picture(100, 50))  # tall: r = 6.4, 640 × 320
    assert r == 6.4 and (x[:, :, 320:] == 114).all() and not (x[:, :, :320] == 114).all()


def test_yolox_decoding_follows_the_grid():
    raw = np.zeros((1, CELLS, 85), np.float32)
    raw[0, 81] = [0.5, 0.25, 0.0, math.log(2)] + [0.0] * 81  # stride 8, row 1, column 1
    raw[0, 6400 + 41] = [0.0, 0.0, math.log(3), 0.0] + [0.0] * 81  # stride 16, row 1, column 1
    raw[0, 6400 + 1600 + 20 * 20 - 1, :4] = [1.0, 1.0, 0.0, 0.0]  # stride 32, the last cell (19, 19)
    out = dwpose.yolox_decode(raw)
    assert np.allclose(out[0, 81, :4], [(0.5 + 1) * 8, (0.25 + 1) * 8, 8, 16])
    assert np.allclose(out[0, 6441, :4], [16, 16, 48, 16])
    assert np.allclose(out[0, -1, :4], [20 * 32, 20 * 32, 32, 32])
    assert np.array_equal(raw[0, 81, :4], [0.5, 0.25, 0.0, np.float32(math.log(2))])  # the input is left alone


def test_nms_counts_areas_pixel_inclusive():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 4]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # 0 vs 3 (the best): 50 / (100 + 50 - 50) = 0.5 → gone; 1 vs 3: 36 / (100 + 50 - 36) = 0.32 → kept
    assert dwpose.nms(boxes, scores) == [3, 1, 2]
    assert dwpose.nms(boxes, scores, threshold=0.9) == [3, 0, 1, 2]  # 1 vs 0: 81 / 119 = 0.68 → kept too


def test_people_scores_are_objectness_times_class_and_need_03():
    rows = np.zeros((4, 85), np.float32)
    rows[:, :4] = [[50, 50, 20, 20], [200, 200, 20, 20], [400, 400, 20, 20], [600, 600, 20, 20]]
    rows[:, 4] = [0.9, 0.5, 0.9, 0.9]
    rows[0, 5], rows[1, 5], rows[2, 5], rows[3, 6] = 0.5, 0.5, 0.2, 0.9  # 0.45, 0.25, 0.18, class 1
    boxes = dwpose.people(rows, 2.0)
    assert np.allclose(boxes, [[20, 20, 30, 30]])  # only 0.45 passes 0.3; halved back to the picture
    rows[:, 4] = 0.0
    assert dwpose.people(rows, 2.0) is None


def test_crop_maps_the_padded_box_onto_288_by_384():
    image = np.zeros((200, 300, 3), np.uint8)
    image[50:150, 100:160] = 200
    x, center, scale = dwpose.crop(image, np.array([100, 50, 160, 150]))
    assert x.shape == (3, 384, 288) and x.dtype == np.float32
    assert np.allclose(center, [130, 100]) and np.allclose(scale, [93.75, 125])  # 75 × 125, widened to 0.75
    m = dwpose.warp_matrix(center, scale, (288, 384))
    assert np.allclose(m @ [130, 100, 1], [144, 192]) and np.allclose(m[0, 0], 288 / 93.75)
    centre_pixel = x[:, 192, 144]
    assert np.allclose(centre_pixel, (200 - dwpose.MEAN) / dwpose.STD, atol=1e-4)


def test_simcc_decoding_formula():
    sx = np.zeros((1, 3, 576), np.float32)
    sy = np.zeros((1, 3, 768), np.float32)
    sx[0, 0, 101], sy[0, 0, 333] = 0.8, 0.6  # score: the smaller maximum
    sx[0, 1, 10], sy[0, 1, 20] = 0.4, 0.9
    sx[0, 2] -= 1.0  # nothing positive: location -1 (before the split)
    locs, scores = dwpose.simcc_decode(sx, sy)
    assert np.allclose(locs[0, 0], [50.5, 166.5]) and scores[0, 0] == pytest.approx(0.6)
    assert np.allclose(locs[0, 1], [5, 10]) and scores[0, 1] == pytest.approx(0.4)
    assert np.allclose(locs[0, 2], [-0.5, -0.5]) and scores[0, 2] == pytest.approx(-1.0)
    back = dwpose.keypoints_in_picture(np.array([[144.0, 192.0], [0.0, 0.0]]), np.array([130, 100]),
                                       np.array([93.75, 125]))
    assert np.allclose(back, [[130, 100], [130 - 46.875, 100 - 62.5]])


def test_neck_and_openpose_order():
    info = np.zeros((1, 133, 3))
    info[0, :, 0] = np.arange(133)  # x = the DWPose index
    info[0, :, 2] = 0.9
    info[0, 6, 2] = 0.2  # one shoulder under 0.3: the neck scores 0
    out = dwpose.to_openpose(info)
    assert out.shape == (1, 134, 3)
    assert out[0, 1, 0] == 5.5 and out[0, 1, 2] == 0  # the neck: mean of the shoulders
    for coco, op in COCO_TO_OPENPOSE.items():
        assert out[0, op, 0] == coco
    assert [out[0, i, 0] for i in (18, 24, 92, 113, 133)] == [17, 23, 91, 112, 132]  # after the body: shifted
    (pose,) = dwpose.poses(out)
    assert pose.body[1] is None and pose.body[2] is None  # the neck and the weak right shoulder are dropped
    assert pose.body[5].x == 5 and len(pose.left_hand) == 21 and pose.left_hand[0].x == 91
    assert len(pose.right_hand) == 21 and len(pose.face) == 70 and pose.face[0].x == 23
    info[0, :, 2] = 0.1
    (nobody,) = dwpose.poses(dwpose.to_openpose(info))
    assert nobody.body == [None] * 18 and nobody.left_hand is None and nobody.face is None


def test_a_pose_graph_of_another_input_size_is_refused_naming_it(tmp_path):
    export(tmp_path / "openpose" / "yolox_l.onnx", _Constant(detector_output([(0, (150, 50, 300, 300), 0.9, 0.9)])),
           (1, 3, 640, 640), ["images"], ["output"])
    export(tmp_path / "openpose" / "dw-ll_ucoco_384.onnx", _Constant(*simcc({})), (1, 3, 256, 192), ["input"],
           ["simcc_x", "simcc_y"])  # the 256×192 model's input: this pipeline crops 384×288
    with pytest.raises(ModelFileError, match=r"dw-ll_ucoco_384.onnx: the graph does not take a \(1, 3, 384, 288\)"):
        run(tmp_path)
