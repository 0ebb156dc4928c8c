"""Face restoration: the detector and GFPGAN networks load users' file layouts strictly, detection decodes
anchors as the detector was trained, alignment lands the landmarks on the template, the paste-back leaves
everything outside the face untouched, and the feature works end to end (engine, infotext, API, extras)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PLANTED_OFFSETS, planted_detector
from PIL import Image

from sdstudio.core.params import Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine import faces as faces_ops
from sdstudio.engine import retinaface
from sdstudio.engine.codeformer import CodeFormer
from sdstudio.engine.gfpgan import GFPGAN, channels
from sdstudio.models.errors import ModelFileError, ModelNotFoundError


def test_similarity_recovers_a_rotation_scale_and_shift():
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    m = faces_ops.similarity(src, src @ rot.T + shift)
    assert np.allclose(m[:, :2], rot) and np.allclose(m[:, 2], shift)
    assert np.allclose(faces_ops.invert(m) @ np.append(m @ np.array([3.0, 4.0, 1.0]), 1), [3.0, 4.0])


def test_warp_moves_pixels_as_the_matrix_says():
    picture = torch.zeros(1, 20, 30)
    picture[0, 5, 7] = 1.0
    out = faces_ops.warp(picture, np.array([[1.0, 0, 3], [0, 1.0, 2]]), (30, 20))  # a whole-pixel shift
    assert out[0, 7, 10] == 1.0 and float(out.sum()) == 1.0


def test_priors_and_decoding_follow_the_detector_layout():
    anchors = retinaface.priors(64, 96)
    # stride 8: 8×12 cells, 16: 4×6, 32: 2×3, two anchors each; first anchor centred in the first cell
    assert anchors.shape == (2 * (8 * 12 + 4 * 6 + 2 * 3), 4)
    assert torch.allclose(anchors[0], torch.tensor([4 / 96, 4 / 64, 16 / 96, 16 / 64]))
    loc = torch.zeros(1, 4)
    loc[0, 0] = 1.0  # one variance unit right: 0.1 of the anchor's width
    landm = torch.zeros(1, 10)
    boxes, points = retinaface.decode(loc, landm, anchors[:1], 96, 64)
    assert torch.allclose(boxes[0], torch.tensor([4 + 1.6 - 8, 4 - 8, 4 + 1.6 + 8, 4 + 8]))
    assert torch.allclose(points[0], torch.tensor([[4.0, 4.0]] * 5))


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=np.float32)
    scores = np.array([0.9, 0.95, 0.8, 0.5], dtype=np.float32)
    assert retinaface.nms(boxes, scores, 0.4) == [1, 2]
    assert retinaface.nms(boxes, scores, 0.99) == [1, 0, 2, 3]


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenet0.25"])
def test_detector_files_load_strictly_with_or_without_the_module_prefix(backbone):
    model = retinaface.RetinaFace(backbone, base=8, blocks=(1, 2, 1, 1)) if backbone == "resnet50" else \
        retinaface.RetinaFace(backbone)
    sd = model.state_dict()
    for keys in (sd, {f"module.{k}": v for k, v in sd.items()}):
        loaded = retinaface.RetinaFace.from_state_dict(dict(keys))
        assert loaded.backbone == backbone
        x = torch.randn(1, 3, 64, 64)
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x), loaded(x)))
    with pytest.raises(KeyError, match="not a RetinaFace"):
        retinaface.RetinaFace.from_state_dict({"conv.weight": torch.zeros(1)})
    broken = dict(sd)
    broken.pop(next(k for k in broken if k.startswith("ssh2.")))
    with pytest.raises(RuntimeError, match="Missing key"):
        retinaface.RetinaFace.from_state_dict(broken)


def test_the_published_gfpgan_v14_layout():
    """Widths of GFPGANv1.4 as published (86.4 M parameters, 8192 style values from a 4×4×256 bottleneck)."""
    net = GFPGAN(*channels(512, 2, 1.0))
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 86_444_252
    assert sd["final_linear.weight"].shape == (16 * 512, 256 * 16)
    assert sd["conv_body_first.weight"].shape == (32, 3, 1, 1)
    assert sd["condition_scale.6.2.weight"].shape == (32, 32, 3, 3)  # SFT on half of the 64 decoder channels
    assert sd["stylegan_decoder.noises.noise14"].shape == (1, 1, 512, 512)
    again = GFPGAN.from_state_dict(sd)
    assert (again.sft_half, again.different_w, again.size) == (True, True, 512)


def test_gfpgan_loads_any_width_and_runs_reproducibly():
    torch.manual_seed(0)
    net = GFPGAN(*channels(64, 1, 1 / 16), style=8, mlp=1, different_w=False, sft_half=False)
    again = GFPGAN.from_state_dict(net.state_dict())
    assert (again.sft_half, again.different_w, again.size) == (False, False, 64)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a = again(x, torch.Generator().manual_seed(3))
        b = net.eval()(x, torch.Generator().manual_seed(3))
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)
    with pytest.raises(KeyError, match="not a GFPGAN"):
        GFPGAN.from_state_dict({"conv_first.weight": torch.zeros(1)})


def test_the_planted_detector_finds_its_one_face():
    found = retinaface.detect(planted_detector().eval(), Image.new("RGB", (32, 32), (128, 100, 90)))
    assert len(found) == 1
    assert np.allclose(found[0].landmarks, np.array(PLANTED_OFFSETS) + 16, atol=1e-3)
    assert found[0].score > 0.99 and found[0].eye_distance == pytest.approx(12, abs=1e-3)


def _linear(x, y):
    return np.stack([80 + x * 0.5, 60 + y * 0.6, 120 + (x + y) * 0.2], -1)


def _face_picture(size: int = 240) -> tuple[Image.Image, retinaface.Face]:
    """A picture whose colours are linear in x and y (bilinear sampling reproduces them exactly) and a face
    whose landmarks are the template turned by 0.2 rad and shrunk to eyes 24 px apart, around (100, 110)."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = Image.fromarray(_linear(xx, yy).round().clip(0, 255).astype(np.uint8))
    c, s = np.cos(0.2), np.sin(0.2)
    landmarks = (faces_ops.TEMPLATE - 256) @ (24 / 126 * np.array([[c, s], [-s, c]])) + [100, 110]
    return image, retinaface.Face((70.0, 80.0, 130.0, 140.0), 0.99, landmarks)


@pytest.fixture(scope="module")
def restorer():
    torch.manual_seed(1)
    net = GFPGAN(*channels(512, 2, 1 / 32), style=16, mlp=2).eval()
    return faces_ops.FaceRestorer("GFPGAN", net, planted_detector().eval(), torch.device("cpu"))


def test_alignment_maps_the_landmarks_onto_the_template(restorer):
    image, face = _face_picture()
    matrix = faces_ops.similarity(face.landmarks, faces_ops.TEMPLATE)
    moved = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.allclose(moved, faces_ops.TEMPLATE, atol=1e-6)  # an exact similarity: fitted exactly
    picture = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    (matrix, crop), = restorer.crops(picture, [face])
    inverse = faces_ops.invert(matrix)
    for x, y in [(100, 100), (256, 256), (400, 380), *faces_ops.TEMPLATE.round().astype(int)]:
        sx, sy = inverse @ [x, y, 1]  # each crop pixel holds the picture's colour where it came from
        assert np.allclose(crop[:, y, x].numpy(), _linear(sx, sy), atol=1.0)
    corner = retinaface.Face(face.box, face.score, face.landmarks - [90, 95])  # a face at the picture's corner
    (_, cut), = restorer.crops(picture, [corner])
    assert torch.allclose(cut[:, 0, 0], torch.tensor(faces_ops.BORDER, dtype=torch.float32))  # outside: grey
    back = faces_ops.warp(crop, inverse, image.size)  # and back, inside the footprint
    footprint, _ = faces_ops.paste_mask(matrix, image.size)
    inside = footprint > 0.99
    assert float((back - picture).abs()[:, inside].max()) < 1.5


def test_restoring_changes_the_face_and_nothing_else(restorer):
    image, face = _face_picture()
    out = restorer.restore(image, faces=[face])
    matrix = faces_ops.similarity(face.landmarks, faces_ops.TEMPLATE)
    _, soft = faces_ops.paste_mask(matrix, image.size)
    a, b = np.asarray(image).astype(int), np.asarray(out).astype(int)
    outside = (soft == 0).numpy()
    assert outside.sum() > 0.5 * outside.size
    assert np.array_equal(a[outside], b[outside])  # to the last pixel
    centre = (soft > 0.99).numpy()
    assert np.abs(a[centre] - b[centre]).mean() > 5
    again = restorer.restore(image, faces=[face])
    assert np.array_equal(np.asarray(again), b)  # the network's noise is seeded
    half = restorer.restore(image, 0.5, faces=[face])
    assert np.abs(np.asarray(half).astype(int) - (a + b) / 2).max() <= 1
    small = retinaface.Face(face.box, 0.99, face.landmarks * 0.1)  # eyes 2.4 px apart: skipped, as facexlib does
    assert np.array_equal(np.asarray(restorer.restore(image, faces=[small])), a)


def test_the_published_codeformer_layout():
    net = CodeFormer()
    sd = net.state_dict()
    assert sd["position_emb"].shape == (256, 512) and sd["feat_emb.weight"].shape == (512, 256)
    assert sd["idx_pred_layer.1.weight"].shape == (1024, 512)
    assert sd["ft_layers.8.self_attn.in_proj_weight"].shape == (1536, 512)
    assert sd["fuse_convs_dict.256.encode_enc.conv1.weight"].shape == (128, 256, 3, 3)
    assert sd["generator.blocks.0.weight"].shape == (512, 256, 3, 3)
    # the block indices the published code reads and fuses at (its fuse_encoder_block / fuse_generator_block)
    assert net.encoder.taps == {512: 2, 256: 5, 128: 8, 64: 11, 32: 14, 16: 18}
    assert {s: net.generator.taps[s] for s in (32, 64, 128, 256, 512)} == {32: 9, 64: 12, 128: 15, 256: 18, 512: 21}
    assert len(net.encoder.blocks) == len(net.generator.blocks) == 25
    again = CodeFormer.from_state_dict(sd)
    assert again.encoder.taps == net.encoder.taps


def test_codeformer_loads_any_width_and_its_weight_matters():
    torch.manual_seed(0)
    net = CodeFormer(nf=8, emb=16, codebook=32, dim=32, heads=8, layers=2).eval()
    again = CodeFormer.from_state_dict(net.state_dict())
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.no_grad():
        a, b = again(x, 0.5), net(x, 0.5)
        none, full = again(x, 0.0), again(x, 1.0)
    assert a.shape == (1, 3, 512, 512) and torch.equal(a, b)
    assert not torch.equal(none, full)
    with pytest.raises(KeyError, match="not a CodeFormer"):
        CodeFormer.from_state_dict({"x": torch.zeros(1)})


def test_files_missing_are_named_and_present_ones_are_used(tmp_path, face_models):
    dirs = Paths(tmp_path).face_restorer_dirs
    restorers = faces_ops.FaceRestorers(dirs)
    assert restorers.available() == []
    with pytest.raises(ModelNotFoundError, match=r"CodeFormer.*codeformer-v0.1.0.pth.*detection_Resnet50_Final.pth"):
        restorers.check()  # nothing named: A1111's default, CodeFormer
    with pytest.raises(ModelNotFoundError, match="GFPGANv1.4.pth"):
        restorers.check("GFPGAN")
    with pytest.raises(ModelNotFoundError, match="unknown face restorer 'RestoreFormer'"):
        restorers.check("RestoreFormer")
    face_models(tmp_path, codeformer=False)
    assert restorers.available() == ["GFPGAN"] and restorers.resolve() == "GFPGAN"  # the one there
    face_models(tmp_path)
    assert restorers.available() == ["CodeFormer", "GFPGAN"] and restorers.resolve() == "CodeFormer"
    image = Image.new("RGB", (32, 32), (150, 110, 90))
    for name in ("GFPGAN", "CodeFormer"):  # the CodeFormer folder has no detector: the GFPGAN folder's is used
        out = restorers.restore(image, name=name)
        assert out.size == (32, 32) and not np.array_equal(np.asarray(out), np.asarray(image))
    (dirs["GFPGAN"] / "GFPGANv1.4.pth").write_bytes(b"not a pickle")
    with pytest.raises(ModelFileError):
        restorers.restore(image, name="GFPGAN")


def test_restore_faces_in_txt2img_writes_and_reads_the_infotext(data_dir, face_models):
    from sdstudio.engine.generate import Engine

    engine = Engine(Paths(data_dir))
    req = Txt2ImgRequest(prompt="a face", steps=2, width=64, height=64, seed=5, restore_faces=True)
    with pytest.raises(ModelNotFoundError, match="put .* in .*Codeformer"):
        engine.txt2img(req)
    face_models(data_dir)
    restored = engine.txt2img(req).images[0]
    plain = engine.txt2img(req.replace(restore_faces=False)).images[0]
    assert "Face restoration: CodeFormer, CodeFormer weight: 0.5" in restored.infotext
    assert "Face restoration" not in plain.infotext
    assert not np.array_equal(np.asarray(restored.image), np.asarray(plain.image))
    back = from_infotext(restored.infotext)
    assert back.restore_faces and back.face_restoration_model == "CodeFormer" and back.code_former_weight == 0.5
    assert not from_infotext(plain.infotext).restore_faces
    assert np.array_equal(np.asarray(engine.txt2img(back).images[0].image), np.asarray(restored.image))
    gfpgan = engine.txt2img(req.replace(face_restoration_model="GFPGAN")).images[0]
    assert "Face restoration: GFPGAN" in gfpgan.infotext and "CodeFormer weight" not in gfpgan.infotext
    assert not np.array_equal(np.asarray(gfpgan.image), np.asarray(restored.image))


def test_api_lists_and_uses_face_restoration(data_dir, face_models):
    import base64
    import io

    from fastapi.testclient import TestClient

    from sdstudio.cli import build_parser
    from sdstudio.server import create_app

    face_models(data_dir)
    app = create_app(build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui"]))
    with TestClient(app) as client:
        assert [r["name"] for r in client.get("/sdapi/v1/face-restorers").json()] == ["CodeFormer", "GFPGAN"]
        body = {"prompt": "a face", "steps": 2, "width": 64, "height": 64, "seed": 1, "restore_faces": True,
                "override_settings": {"face_restoration_model": "GFPGAN"}}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["restore_faces"] and info["face_restoration_model"] == "GFPGAN"
        assert "Face restoration: GFPGAN" in info["infotexts"][0]
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (150, 110, 90)).save(buf, "PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        for field in ("gfpgan_visibility", "codeformer_visibility"):
            r = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaling_resize": 1, field: 1.0})
            assert r.status_code == 200, r.text
            out = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
            assert out.size == (32, 32) and not np.array_equal(np.asarray(out), np.asarray(Image.open(buf)))
        r = client.post("/sdapi/v1/extra-single-image", json={"image": image, "codeformer_visibility": 2.0})
        assert r.status_code == 422 and "CodeFormer visibility" in r.json()["detail"]
    app.state.service.stop()
