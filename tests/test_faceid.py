"""IP-Adapter FaceID: InsightFace's face analysis (our own, over the pack's ONNX graphs) and the FaceID adapter's
projection, as sd-webui-controlnet runs them.

The graphs are tiny stand-ins with the published files' interfaces: an SCRFD detector (1×3×640×640 in, nine
outputs: scores, box and keypoint distances for strides 8/16/32, two anchors a cell) whose outputs are hand-made
detections, and an ArcFace-shaped recognizer (1×3×112×112 in, 512 out) that is a real random network. Each step is
checked against its formula: the letterbox, SCRFD's decoding and NMS, the alignment against scikit-image's
similarity estimate, the recognizer's input, the projection (Linear, GELU, Linear, LayerNorm) and its zero
embedding for the negative prompt; then a FaceID unit through a generation."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.transform import SimilarityTransform

from sdstudio.core.controlnet import ControlNetError
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine.annotators import insightface as ins
from sdstudio.models import ip_adapter as files
from sdstudio.models.errors import ModelFileError
from sdstudio.testing.ip_adapter_files import write_ip_adapter
from tests.test_annotators_dwpose import _Constant, export

torch.set_num_threads(1)

ANCHORS = {s: 2 * (640 // s) ** 2 for s in (8, 16, 32)}


def detector_outputs(faces: list[tuple[int, int, float, tuple, tuple]]) -> list[torch.Tensor]:
    """SCRFD's nine outputs; each face (stride, anchor index, score, box distances l t r b, keypoint offsets
    10) in detector pixels goes to that anchor (distances in units of the stride, as the graph gives them)."""
    scores = {s: torch.zeros(n, 1) for s, n in ANCHORS.items()}
    boxes = {s: torch.zeros(n, 4) for s, n in ANCHORS.items()}
    kps = {s: torch.zeros(n, 10) for s, n in ANCHORS.items()}
    for stride, anchor, score, box, points in faces:
        scores[stride][anchor, 0] = score
        boxes[stride][anchor] = torch.tensor(box) / stride
        kps[stride][anchor] = torch.tensor(points) / stride
    return [*scores.values(), *boxes.values(), *kps.values()]


def anchor_centre(stride: int, anchor: int) -> tuple[float, float]:
    cell = anchor // 2
    cols = 640 // stride
    return (cell % cols) * stride, (cell // cols) * stride


class Recognizer(torch.nn.Module):
    """An ArcFace-shaped random network: 112×112 RGB in, 512 out."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.fc = torch.nn.Linear(4 * 14 * 14, 512)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


# a face: its anchor (stride 16), box distances and keypoints around the anchor centre (detector pixels)
STRIDE, ANCHOR = 16, 2 * (12 * 40 + 15) + 1  # row 12, column 15, the second anchor
BOX = (60.0, 70.0, 50.0, 90.0)
POINTS = (-25.0, -20.0, 25.0, -21.0, 0.0, 5.0, -18.0, 35.0, 18.0, 34.0)


def write_pack(folder, faces=None):
    pack = folder / "insightface" / "models" / "buffalo_l"
    faces = [(STRIDE, ANCHOR, 0.9, BOX, POINTS)] if faces is None else faces
    outputs = detector_outputs(faces)
    export(pack / "det_10g.onnx", _Constant(*outputs), (1, 3, 640, 640), ["input.1"], [f"o{i}" for i in range(9)])
    net = Recognizer().eval()
    export(pack / "w600k_r50.onnx", net, (1, 3, 112, 112), ["input.1"], ["embedding"])
    return pack, net


def test_the_detection_is_decoded_as_scrfd_and_scaled_back(tmp_path):
    # a duplicate of the face one cell over (lower score) goes in NMS; one under 0.5 is never kept
    dup = (STRIDE, ANCHOR + 2, 0.8, BOX, POINTS)
    weak = (8, 10, 0.45, (5.0, 5.0, 5.0, 5.0), (0.0,) * 10)
    pack, _ = write_pack(tmp_path, [(STRIDE, ANCHOR, 0.9, BOX, POINTS), dup, weak])
    analysis = ins.FaceAnalysis(pack / "det_10g.onnx", pack / "w600k_r50.onnx")
    picture = np.zeros((480, 320, 3), np.uint8)  # taller than wide: scaled by 640 / 480 into the canvas's left
    blob, scale = ins.det_input(picture)
    assert blob.shape == (1, 3, 640, 640) and scale == pytest.approx(640 / 480)
    assert np.allclose(blob[0, :, :, 427:], -127.5 / 128) and np.allclose(blob[0, :, :, :426], -127.5 / 128)
    faces = analysis.detect(picture)
    assert len(faces) == 1
    cx, cy = anchor_centre(STRIDE, ANCHOR)
    l, t, r, b = BOX
    assert np.allclose(faces[0].bbox, np.array([cx - l, cy - t, cx + r, cy + b]) / scale, atol=1e-3)
    expected_kps = (np.array([cx, cy] * 5) + np.array(POINTS)).reshape(5, 2) / scale
    assert np.allclose(faces[0].kps, expected_kps, atol=1e-3) and faces[0].score == pytest.approx(0.9)


def test_nothing_found_is_an_error_naming_the_unit(tmp_path):
    pack, _ = write_pack(tmp_path, [])
    analysis = ins.FaceAnalysis(pack / "det_10g.onnx", pack / "w600k_r50.onnx")
    assert analysis.faces(np.zeros((64, 64, 3), np.uint8)) == []
    with pytest.raises(ControlNetError, match="ControlNet unit 2: InsightFace found no face"):
        ins.largest_face([], "ControlNet unit 2")
    small = ins.Face(np.array([0, 0, 10, 10.0]), 0.9, np.zeros((5, 2)))
    big = ins.Face(np.array([0, 0, 20, 30.0]), 0.6, np.zeros((5, 2)))
    assert ins.largest_face([small, big], "x") is big


def test_the_alignment_is_scikit_images_similarity():
    rng = np.random.default_rng(0)
    for _ in range(5):
        src = rng.uniform(0, 300, (5, 2))
        ours = ins.umeyama(src, ins.ARCFACE_TEMPLATE)
        theirs = SimilarityTransform.from_estimate(src, ins.ARCFACE_TEMPLATE)
        assert np.allclose(ours, theirs.params, atol=1e-8)
    # keypoints that are the template moved by a similarity come back onto the template
    angle, s, shift = 0.3, 1.7, np.array([40.0, 25.0])
    rot = s * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    kps = ins.ARCFACE_TEMPLATE @ rot.T + shift
    matrix = ins.umeyama(kps, ins.ARCFACE_TEMPLATE)
    back = np.c_[kps, np.ones(5)] @ matrix[:2].T
    assert np.allclose(back, ins.ARCFACE_TEMPLATE, atol=1e-4)


def test_the_embedding_is_the_recognizer_on_the_aligned_face(tmp_path):
    pack, net = write_pack(tmp_path)
    analysis = ins.FaceAnalysis(pack / "det_10g.onnx", pack / "w600k_r50.onnx")
    rgb = np.random.default_rng(1).integers(0, 255, (400, 400, 3)).astype(np.uint8)
    face = ins.largest_face(analysis.faces(rgb), "unit")
    # by hand: the BGR picture warped by scikit-image's similarity, back to RGB, (x - 127.5) / 127.5
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    tform = SimilarityTransform.from_estimate(face.kps, ins.ARCFACE_TEMPLATE)
    crop = cv2.warpAffine(bgr, tform.params[:2], (112, 112), borderValue=0.0)[:, :, ::-1]
    x = torch.from_numpy((crop.astype(np.float32) - 127.5) / 127.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = net(x)[0].numpy()
    assert np.allclose(face.embedding, expected, atol=1e-3)  # onnxruntime's float32 sums against torch's
    assert np.linalg.norm(face.normed_embedding) == pytest.approx(1.0)


def test_a_faceid_file_is_detected_and_projects_as_the_extensions_mlp(tmp_path):
    path = write_ip_adapter(tmp_path / "ip-adapter-faceid_sd15.bin", "faceid", seed=2)
    model = files.load_ip_adapter(path)
    spec = model.spec
    assert (spec.kind, spec.clip_dim, spec.tokens, spec.feature) == ("faceid", 512, 4, "face")
    assert spec.describe() == "64-wide context IP-Adapter FaceID"  # the tiny UNet's context
    nested = torch.load(path, weights_only=True)["image_proj"]
    e = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    h = torch.nn.functional.gelu(e @ nested["proj.0.weight"].T + nested["proj.0.bias"])
    x = (h @ nested["proj.2.weight"].T + nested["proj.2.bias"]).reshape(2, 4, -1)
    expected = torch.nn.functional.layer_norm(x, (x.shape[-1],), nested["norm.weight"], nested["norm.bias"])
    assert torch.allclose(model.project(e), expected, atol=1e-5)
    portrait = files.load_ip_adapter(write_ip_adapter(tmp_path / "portrait.safetensors", "faceid", tokens=16))
    assert portrait.spec.tokens == 16
    state = files.read_ip_adapter(path)
    del state["image_proj.norm.bias"]
    with pytest.raises(ModelFileError, match="FaceID: incomplete projection"):
        files.detect_ip_adapter({k: tuple(v.shape) for k, v in state.items()})


def _b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def faceid_studio(make_data_root):
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.scripts import Studio
    from sdstudio.testing.ip_adapter_files import write_clip_vision

    root = make_data_root("faceid")
    write_ip_adapter(root / "models" / "ControlNet" / "ip-adapter-faceid_sd15.bin", "faceid", seed=3)
    write_ip_adapter(root / "models" / "ControlNet" / "ip-adapter_tiny.safetensors")
    write_clip_vision(root / "models" / "clip_vision" / "clip_h.safetensors")
    write_pack(root / "models")  # models/insightface/models/buffalo_l
    return Studio(Engine(Paths(root)))


FACE_PICTURE = np.random.default_rng(2).integers(0, 255, (96, 96, 3)).astype(np.uint8)


def _generate(studio, *units) -> np.ndarray:
    req = Txt2ImgRequest(prompt="a portrait", seed=3, steps=2, width=64, height=64, sampler_name="Euler",
                         alwayson_scripts={"ControlNet": {"units": list(units)}} if units else {})
    return np.asarray(studio.generate(req).images[0].image.convert("RGB"), np.int16)


def test_a_faceid_unit_prompts_with_the_face(faceid_studio):
    studio = faceid_studio
    unit = {"enabled": True, "module": "ip-adapter_face_id", "model": "ip-adapter-faceid_sd15",
            "image": _b64(FACE_PICTURE)}
    plain = _generate(studio)
    with_face = _generate(studio, unit)
    assert np.abs(with_face - plain).mean() > 1
    assert np.array_equal(_generate(studio, {**unit, "weight": 0.0}), plain)
    assert np.array_equal(_generate(studio, {**unit, "module": "ip-adapter-auto"}), with_face)  # its preset
    result = studio.generate(Txt2ImgRequest(prompt="a portrait", seed=3, steps=2, width=64, height=64,
                                            sampler_name="Euler", alwayson_scripts={"ControlNet": {"units": [unit]}}))
    assert "Module: ip-adapter_face_id, Model: ip-adapter-faceid_sd15 [" in result.images[0].infotext


def test_faceid_refusals_name_what_fits(faceid_studio, tmp_path):
    studio = faceid_studio
    face = {"enabled": True, "module": "ip-adapter_face_id", "model": "ip-adapter-faceid_sd15",
            "image": _b64(FACE_PICTURE)}
    with pytest.raises(ControlNetError, match="is a FaceID adapter: it takes an InsightFace face embedding; pick "
                                              "the ip-adapter_face_id"):
        _generate(studio, {**face, "module": "ip-adapter_clip_sd15"})
    with pytest.raises(ControlNetError, match="gives a face embedding for FaceID adapters; ip-adapter_tiny takes a "
                                              "CLIP feature"):
        _generate(studio, {**face, "model": "ip-adapter_tiny"})
    with pytest.raises(ControlNetError, match="is a FaceID adapter: .* pick the ip-adapter_face_id preprocessor"):
        _generate(studio, {**face, "module": "ip-adapter_face_id_plus"})  # a plain FaceID file
    with pytest.raises(ControlNetError, match="ip-adapter-faceid_sd15 is a FaceID adapter: .* pick the "
                                              "ip-adapter_face_id preprocessor"):
        from sdstudio.engine.ip_adapter import encoder_for

        encoder_for("ip-adapter_pulid", "ip-adapter-faceid_sd15", files.load_ip_adapter(
            write_ip_adapter(tmp_path / "f.bin", "faceid")).spec)
    with pytest.raises(ControlNetError, match=r"needs InsightFace's buffalo_l pack: put det_10g.onnx .* in "
                                              r".*models/insightface/models/buffalo_l"):
        ins.find_pack(tmp_path / "models", tmp_path / "annotators", "buffalo_l", "ip-adapter_face_id")


# ---- InstantID ------------------------------------------------------------------------------------------------

def write_antelope(models_dir):
    """The antelopev2 pack: the same stand-in detector and recognizer under its file names."""
    pack, _ = write_pack(models_dir)
    antelope = pack.parent / "antelopev2"
    antelope.mkdir()
    (pack / "det_10g.onnx").rename(antelope / "scrfd_10g_bnkps.onnx")
    (pack / "w600k_r50.onnx").rename(antelope / "glintr100.onnx")
    pack.rmdir()
    return antelope


def test_an_instant_id_adapter_is_a_resampler_over_the_face_embedding(tmp_path):
    from sdstudio.testing.synthetic import unet_config

    path = write_ip_adapter(tmp_path / "ip-adapter_instant_id_sdxl.bin", "plus", clip_dim=512,
                            config=unet_config("sdxl", "tiny"))
    spec = files.load_ip_adapter(path).spec
    assert (spec.kind, spec.feature, spec.clip_dim, spec.tokens) == ("instantid", "face", 512, 16)
    assert spec.describe().endswith("InstantID IP-Adapter")


def test_the_keypoint_map_is_the_extensions_drawing():
    kps = np.array([[40.0, 50.0], [90.0, 52.0], [65.0, 80.0], [45.0, 110.0], [85.0, 108.0]])
    out = ins.draw_kps((160, 130), kps)
    assert out.shape == (160, 130, 3) and out.dtype == np.uint8
    for (x, y), color in zip(kps.astype(int), ins.KPS_COLORS, strict=True):
        assert tuple(out[y, x]) == color  # a full-colour dot of radius 10 on each point
    # half-way from the left eye (0) to the nose (2): the left eye's colour at 60 %
    mid = ((kps[0] + kps[2]) / 2).astype(int)
    assert tuple(out[mid[1], mid[0]]) == (153, 0, 0)
    assert not out[5, 5].any() and not out[150, 120].any()  # black elsewhere


def test_instant_id_keypoints_preprocessor_runs_on_the_picture_at_512(tmp_path):
    from sdstudio.engine.preprocessors import builtin, detect

    write_antelope(tmp_path / "models")
    registry = builtin(tmp_path / "annotators", tmp_path / "models")
    pre = registry.get("instant_id_face_keypoints")
    picture = np.random.default_rng(5).integers(0, 255, (200, 300, 3)).astype(np.uint8)
    out = detect(pre, picture, -1, -1, -1)
    assert out.shape == (512, 768, 3)  # the short side at 512, the padding cut off
    analysis = ins.face_analysis(tmp_path / "models", tmp_path / "annotators", "antelopev2", "x")
    face, size, _ = ins.instant_id_face(analysis, picture, "x")
    assert size == (512, 768) and np.array_equal(out, ins.draw_kps((512, 768), face.kps))
    with pytest.raises(ControlNetError, match="needs InsightFace's antelopev2 pack: put scrfd_10g_bnkps.onnx"):
        detect(builtin(tmp_path / "elsewhere", tmp_path / "nowhere").get("instant_id_face_keypoints"),
               picture, -1, -1, -1)


@pytest.fixture(scope="module")
def instant_id_studio(make_data_root):
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.scripts import Studio
    from sdstudio.testing.controlnet_files import write_controlnet
    from sdstudio.testing.synthetic import unet_config

    root = make_data_root("instant-id", {"tiny-sdxl": "sdxl"})
    folder = root / "models" / "ControlNet"
    write_ip_adapter(folder / "ip-adapter_instant_id_sdxl.bin", "plus", clip_dim=512, config=unet_config("sdxl", "tiny"))
    write_controlnet(folder / "control_instant_id_sdxl.safetensors", "sdxl", "tiny", seed=5)
    write_controlnet(folder / "control_plain_sdxl.safetensors", "sdxl", "tiny", seed=5)  # the same weights
    write_antelope(root / "models")
    return Studio(Engine(Paths(root)))


EMBED = {"enabled": True, "module": "instant_id_face_embedding", "model": "ip-adapter_instant_id_sdxl",
         "image": _b64(FACE_PICTURE)}
KEYPOINTS = {"enabled": True, "module": "instant_id_face_keypoints", "model": "control_instant_id_sdxl",
             "image": _b64(FACE_PICTURE)}


def test_instant_id_runs_its_controlnet_on_the_image_prompt(instant_id_studio):
    studio = instant_id_studio
    both = _generate(studio, EMBED, KEYPOINTS)
    assert np.abs(both - _generate(studio)).mean() > 1
    # the same ControlNet weights under another name take the text as context (a plain ControlNet): other pixels
    plain = _generate(studio, EMBED, {**KEYPOINTS, "model": "control_plain_sdxl"})
    assert np.abs(both - plain).max() > 0
    with pytest.raises(ControlNetError, match="unit 0: the InstantID ControlNet control_instant_id_sdxl .* must be an "
                                              "InstantID IP-Adapter unit"):
        _generate(studio, KEYPOINTS)
    with pytest.raises(ControlNetError, match="is an InstantID adapter: .* pick the instant_id_face_embedding"):
        _generate(studio, {**EMBED, "module": "ip-adapter_face_id"})


def test_the_image_prompt_per_row():
    from sdstudio.engine.ip_adapter import ImagePrompt

    cond, uncond = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
    prompt = ImagePrompt(cond, uncond)
    rows = prompt.for_rows([False, True, False], 3, torch.device("cpu"), torch.float32)
    assert rows.shape == (3, 3, 4) and rows[0].eq(1).all() and rows[1].eq(0).all() and rows[2].eq(1).all()
    assert prompt.for_rows([], 2, torch.device("cpu"), torch.float32).eq(1).all()  # unannounced: the prompt's


# ---- FaceID Plus ----------------------------------------------------------------------------------------------

def _face_plus_reference(state: dict, face: torch.Tensor, hidden: torch.Tensor, heads: int, shortcut: bool):
    """ProjModelFaceIdPlus written out from the IP-Adapter authors' formulas (PerceiverAttention with its
    1/sqrt(sqrt(d)) scaling on both sides, the bias-free FeedForward), on the file's own tensors."""
    F = torch.nn.functional
    cross = state["norm.weight"].shape[0]
    x = F.gelu(face @ state["proj.0.weight"].T + state["proj.0.bias"]) @ state["proj.2.weight"].T + state["proj.2.bias"]
    ids = F.layer_norm(x.reshape(1, -1, cross), (cross,), state["norm.weight"], state["norm.bias"])
    r = "perceiver_resampler."
    ctx = hidden @ state[r + "proj_in.weight"].T + state[r + "proj_in.bias"]
    latents = ids
    depth = len({k.split(".")[2] for k in state if k.startswith(r + "layers.")})
    for i in range(depth):
        a, f = f"{r}layers.{i}.0.", f"{r}layers.{i}.1."
        xn = F.layer_norm(ctx, (cross,), state[a + "norm1.weight"], state[a + "norm1.bias"])
        ln = F.layer_norm(latents, (cross,), state[a + "norm2.weight"], state[a + "norm2.bias"])
        q = ln @ state[a + "to_q.weight"].T
        k, v = (torch.cat([xn, ln], dim=1) @ state[a + "to_kv.weight"].T).chunk(2, dim=-1)
        d = q.shape[-1] // heads
        q, k, v = (t.reshape(1, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
        scale = 1 / d ** 0.25
        w = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(1, latents.shape[1], -1) @ state[a + "to_out.weight"].T
        latents = out + latents
        h = F.layer_norm(latents, (cross,), state[f + "0.weight"], state[f + "0.bias"])
        latents = F.gelu(h @ state[f + "1.weight"].T) @ state[f + "3.weight"].T + latents
    out = F.layer_norm(latents @ state[r + "proj_out.weight"].T + state[r + "proj_out.bias"], (cross,),
                       state[r + "norm_out.weight"], state[r + "norm_out.bias"])
    return ids + out if shortcut else out


def test_a_faceid_plus_file_projects_as_the_authors_model(tmp_path):
    path = write_ip_adapter(tmp_path / "ip-adapter-faceid-plusv2_sd15.bin", "faceid_plus", seed=6)
    model = files.load_ip_adapter(path)
    spec = model.spec
    assert (spec.kind, spec.feature, spec.face_dim, spec.clip_dim, spec.tokens, spec.heads, spec.depth) == \
        ("faceid_plus", "face+penultimate", 512, 128, 4, 2, 4)
    state = torch.load(path, weights_only=True)["image_proj"]
    g = torch.Generator().manual_seed(1)
    face, hidden = torch.randn(1, 512, generator=g), torch.randn(1, 257, 128, generator=g)
    for shortcut in (False, True):
        expected = _face_plus_reference(state, face, hidden, spec.heads, shortcut)
        assert torch.allclose(model.project(face, hidden, shortcut), expected, atol=1e-4), shortcut


def test_a_faceid_plus_unit_uses_the_face_and_clip(faceid_studio, tmp_path_factory):
    studio = faceid_studio
    folder = studio.engine.paths.controlnet_dir
    write_ip_adapter(folder / "ip-adapter-faceid-plusv2_sd15.bin", "faceid_plus", seed=7)
    write_ip_adapter(folder / "ip-adapter-faceid-plus_sd15.bin", "faceid_plus", seed=7)  # v1: no shortcut
    studio.engine.registry.refresh()
    unit = {"enabled": True, "module": "ip-adapter_face_id_plus", "model": "ip-adapter-faceid-plusv2_sd15",
            "image": _b64(FACE_PICTURE)}
    plain, v2 = _generate(studio), _generate(studio, unit)
    assert np.abs(v2 - plain).mean() > 1
    v1 = _generate(studio, {**unit, "model": "ip-adapter-faceid-plus_sd15"})
    assert np.abs(v1 - v2).max() > 0  # the same weights, v2's shortcut
    assert np.array_equal(_generate(studio, {**unit, "module": "ip-adapter-auto"}), v2)
    with pytest.raises(ControlNetError, match="is a FaceID Plus adapter: .* pick the ip-adapter_face_id_plus"):
        _generate(studio, {**unit, "module": "ip-adapter_face_id"})
