"""facexlib's face parsing for PuLID: BiSeNet built from a file's shapes and loaded strictly under facexlib's names
(``parsing_bisenet.pth``, written here from facexlib's module tree), its gates and heads checked against their
formulas, the white-background / gray-face rule on a hand-made label map, facexlib's centre-face choice, the
alignment onto the template and the whole ``facexlib`` preprocessor with a planted detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import planted_detector
from PIL import Image

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import faces, retinaface
from sdstudio.engine.annotators import face_parsing as fp
from sdstudio.engine.annotators.common import resize_with_pad
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import fresh_annotator_cache, picture  # noqa: F401 (autouse)

torch.set_num_threads(1)
R = "cp.resnet."


def bisenet_layout(base=8, widths=(8, 16, 32, 64), width=16, fuse=32, mid=32, mid_aux=8, classes=19) -> dict:
    """facexlib's BiSeNet names and shapes (published: base 64, widths 64-512, 128, 256, 256, 64, 19 classes)."""
    out = {}

    def conv(name, cout, cin, k):
        out[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        out.update({f"{name}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})
        out[f"{name}.num_batches_tracked"] = ()

    def conv_bn(name, cout, cin, k):
        conv(f"{name}.conv", cout, cin, k)
        bn(f"{name}.bn", cout)

    conv(R + "conv1", base, 3, 7)
    bn(R + "bn1", base)
    cin = base
    for i, w in enumerate(widths, 1):
        for j in range(2):
            p, c = f"{R}layer{i}.{j}.", (cin if j == 0 else w)
            conv(p + "conv1", w, c, 3), bn(p + "bn1", w), conv(p + "conv2", w, w, 3), bn(p + "bn2", w)
            if j == 0 and (c != w or i > 1):
                conv(p + "downsample.0", w, c, 1), bn(p + "downsample.1", w)
        cin = w
    for name, c in (("arm16", widths[2]), ("arm32", widths[3])):
        conv_bn(f"cp.{name}.conv", width, c, 3)
        conv(f"cp.{name}.conv_atten", width, width, 1)
        bn(f"cp.{name}.bn_atten", width)
    conv_bn("cp.conv_head32", width, width, 3), conv_bn("cp.conv_head16", width, width, 3)
    conv_bn("cp.conv_avg", width, widths[3], 1)
    conv_bn("ffm.convblk", fuse, widths[1] + width, 1)
    conv("ffm.conv1", fuse // 4, fuse, 1), conv("ffm.conv2", fuse, fuse // 4, 1)
    conv_bn("conv_out.conv", mid, fuse, 3)
    conv("conv_out.conv_out", classes, mid, 1)
    for name in ("conv_out16", "conv_out32"):
        conv_bn(f"{name}.conv", mid_aux, width, 3)
        conv(f"{name}.conv_out", classes, mid_aux, 1)
    return out


def random_weights(layout: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layout.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(0)
        elif name.endswith("running_var") or name.endswith(".weight") and len(shape) == 1:  # batch norm scales
            out[name] = torch.rand(shape, generator=g) + 0.5
        else:
            out[name] = torch.randn(shape, generator=g) * (0.3 if len(shape) == 4 else 0.1)
    return out


def write_bisenet(path, seed: int = 0, **sizes) -> dict[str, torch.Tensor]:
    weights = random_weights(bisenet_layout(**sizes), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, str(path))
    return weights


def test_the_published_names_load_strictly_and_the_heads_come_back_at_the_input_size(tmp_path):
    layout = bisenet_layout(64, (64, 128, 256, 512), 128, 256, 256, 64, 19)
    assert set(fp.BiSeNet().state_dict()) == set(layout)  # facexlib's defaults are the published network
    assert {k: tuple(v.shape) for k, v in fp.BiSeNet().state_dict().items()} == layout
    for name in (R + "layer1.1.bn2.running_var", R + "layer4.0.downsample.1.weight", "cp.arm32.bn_atten.bias",
                 "cp.conv_avg.conv.weight", "ffm.conv2.weight", "conv_out32.conv_out.weight"):
        assert name in layout
    assert R + "layer1.0.downsample.0.weight" not in layout and not any("fc" in k for k in layout)

    weights = write_bisenet(tmp_path / "parsing_bisenet.pth")
    model = fp.load(tmp_path / "parsing_bisenet.pth")
    own = model.state_dict()
    assert all(torch.equal(own[k].cpu(), v) for k, v in weights.items() if not k.endswith("num_batches_tracked"))
    device = next(model.parameters()).device  # the compute device
    x = torch.rand(1, 3, 96, 64)
    outs = model(x.to(device))
    assert [tuple(o.shape) for o in outs] == [(1, 19, 96, 64)] * 3
    labels = fp.parse(model, x).cpu()
    assert labels.shape == (1, 96, 64) and labels.dtype == torch.int64
    normalized = (x - torch.tensor(fp.MEAN).view(1, 3, 1, 1)) / torch.tensor(fp.STD).view(1, 3, 1, 1)
    assert torch.equal(labels, model(normalized.to(device))[0].argmax(1).cpu())  # ImageNet normalization, main head
    uint8 = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert torch.equal(fp.parse(model, uint8), fp.parse(model, torch.from_numpy(uint8).permute(2, 0, 1)[None] / 255.0))


def test_wrong_files_are_model_file_errors_naming_the_file(tmp_path):
    torch.save({"conv.weight": torch.zeros(1, 1, 1, 1)}, str(tmp_path / "parsing_bisenet.pth"))
    with pytest.raises(ModelFileError, match=r"parsing_bisenet\.pth: not facexlib's BiSeNet"):
        fp.load(tmp_path / "parsing_bisenet.pth")
    weights = random_weights(bisenet_layout())
    weights["conv_out16.conv_out.weight"] = torch.zeros(18, 8, 1, 1)  # 18 classes on an auxiliary head
    torch.save(weights, str(tmp_path / "odd.pth"))
    with pytest.raises(ModelFileError, match=r"odd\.pth: not the expected network \(wrong shape: conv_out16"):
        fp.load(tmp_path / "odd.pth")
    torch.save(random_weights({"body.conv1.weight": (8, 3, 7, 7)}), str(tmp_path / "detection_Resnet50_Final.pth"))
    with pytest.raises(ModelFileError, match=r"detection_Resnet50_Final\.pth: not a RetinaFace"):
        fp.load_detector(tmp_path / "detection_Resnet50_Final.pth")


def test_the_gates_and_the_context_path_follow_their_formulas():
    torch.manual_seed(0)
    model = fp.BiSeNet.from_shapes(bisenet_layout()).eval()
    model.load_state_dict(random_weights(bisenet_layout(), 1))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        f8, f16, f32 = model.cp.resnet(x)
        assert [t.shape[1:] for t in (f8, f16, f32)] == [(16, 8, 8), (32, 4, 4), (64, 2, 2)]  # 1/8, 1/16, 1/32
        arm = model.cp.arm32
        feat = F.relu(arm.conv.bn(arm.conv.conv(f32)))
        gate = torch.sigmoid(arm.bn_atten(F.conv2d(F.avg_pool2d(feat, feat.shape[2:]), arm.conv_atten.weight)))
        assert torch.allclose(arm(f32), feat * gate, atol=1e-6)
        avg = model.cp.conv_avg(F.avg_pool2d(f32, f32.shape[2:]))
        up32 = model.cp.conv_head32(F.interpolate(arm(f32) + avg.expand_as(arm(f32)), size=(4, 4), mode="nearest"))
        up16 = model.cp.conv_head16(F.interpolate(model.cp.arm16(f16) + up32, size=(8, 8), mode="nearest"))
        _, c8, c16 = model.cp(x)
        assert torch.allclose(c16, up32, atol=1e-6) and torch.allclose(c8, up16, atol=1e-6)
        ffm = model.ffm
        fused = F.relu(ffm.convblk.bn(ffm.convblk.conv(torch.cat([f8, c8], 1))))
        g = torch.sigmoid(ffm.conv2(F.relu(ffm.conv1(fused.mean((2, 3), keepdim=True)))))
        assert torch.allclose(ffm(f8, c8), fused * (1 + g), atol=1e-6)
        main = model.conv_out.conv_out(model.conv_out.conv(ffm(f8, c8)))
        assert torch.allclose(model(x)[0], F.interpolate(main, (64, 64), mode="bilinear", align_corners=True), atol=1e-5)


def test_background_labels_become_white_and_the_rest_gray():
    labels = torch.arange(19).repeat_interleave(3).view(1, 3, 19)  # every class, three pixels each
    face = torch.rand(1, 3, 3, 19)
    out = fp.features_from_labels(face, labels)
    luma = 0.299 * face[:, 0] + 0.587 * face[:, 1] + 0.114 * face[:, 2]
    for cls in range(19):
        where = labels[0] == cls
        got = out[0][:, where]
        if cls in (0, 7, 8, 9, 14, 15, 16, 18):  # background, ears, earring, neck, necklace, cloth, hat
            assert torch.equal(got, torch.ones_like(got)), cls
        else:  # skin, brows, eyes, glasses, nose, mouth, lips and hair stay, in gray
            assert torch.allclose(got, luma[0][where].expand(3, -1), atol=1e-6), cls
    assert out.shape == (1, 3, 3, 19) and 0 <= out.min() and out.max() <= 1
    image = fp.to_image(out)
    assert image.dtype == np.uint8 and image.shape == (3, 19, 3)
    assert np.array_equal(image, (out[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))  # truncated


def test_the_centre_face_is_the_box_nearest_the_picture_centre():
    def face(x0, y0, x1, y1, score=0.99):
        return retinaface.Face((x0, y0, x1, y1), score, np.zeros((5, 2)))

    big_corner = face(0, 0, 90, 90)  # larger and more confident, but off centre
    small_middle = face(45, 35, 65, 55, 0.98)
    assert fp.center_face([big_corner, small_middle], 100, 110) is small_middle  # centre (55, 50)
    a, b = face(40, 40, 60, 60), face(50, 40, 70, 60)  # both 5 px from the centre (55, 50)
    assert fp.center_face([a, b], 100, 110) is a and fp.center_face([b, a], 100, 110) is b


def test_alignment_puts_the_landmarks_on_the_template_with_a_gray_border():
    size = 200
    yy, xx = np.mgrid[0:size, 0:size]
    linear = np.stack([40 + xx * 0.6, 30 + yy * 0.7, 200 - (xx + yy) * 0.3], -1)  # bilinear sampling is exact
    image = linear.round().clip(0, 255).astype(np.uint8)
    c, s = np.cos(0.15), np.sin(0.15)
    landmarks = (faces.TEMPLATE - 256) @ (40 / 126 * np.array([[c, s], [-s, c]])) + [100, 95]
    crop = fp.align(image, landmarks)
    assert crop.shape == (1, 3, 512, 512) and torch.allclose(crop * 255, (crop * 255).round(), atol=1e-4)
    matrix = faces.similarity(landmarks, faces.TEMPLATE)
    assert np.allclose(landmarks @ matrix[:, :2].T + matrix[:, 2], faces.TEMPLATE, atol=1e-6)
    for tx, ty in faces.TEMPLATE:
        got = crop[0, :, round(ty), round(tx)].numpy() * 255
        back = faces.invert(matrix) @ [round(tx), round(ty), 1.0]  # the source pixel of that crop pixel
        expect = [40 + back[0] * 0.6, 30 + back[1] * 0.7, 200 - (back[0] + back[1]) * 0.3]
        assert np.allclose(got, expect, atol=1.01)
    # the crop spans 512 × 40/126 ≈ 160 source pixels around the face; rotated, its corners leave the picture
    big = (faces.TEMPLATE - 256) * (200 / 126) + [100, 95]
    corner = fp.align(image, big)[0, :, 0, 0].numpy() * 255
    assert np.allclose(corner, faces.BORDER)


def test_the_facexlib_preprocessor_end_to_end(tmp_path):
    detector = planted_detector().eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 100, 3)).astype(np.uint8)
    write_bisenet(tmp_path / "facexlib" / "parsing_bisenet.pth", seed=2)
    with pytest.raises(ControlNetError, match=r"needs detection_Resnet50_Final\.pth: put .* in .*facexlib"):
        fp.run(tmp_path, image, 64)
    (tmp_path / "facexlib").mkdir(exist_ok=True)
    torch.save({f"module.{k}": v for k, v in detector.state_dict().items()},
               str(tmp_path / "facexlib" / "detection_Resnet50_Final.pth"))
    out = fp.run(tmp_path, image, 64)
    assert out.shape == (1, 3, 512, 512) and out.dtype == torch.float32

    padded, _ = resize_with_pad(image, 64)  # the extension's frame: short side 48 -> 64, width 133 padded to 192
    assert padded.shape == (64, 192, 3)
    found = retinaface.detect(detector, Image.fromarray(padded), 0.97, 0.4)
    assert len(found) > 1
    # facexlib's rule written out: the first face whose box centre is nearest the padded picture's centre (96, 32)
    dist = [np.hypot((f.box[0] + f.box[2]) / 2 - 96, (f.box[1] + f.box[3]) / 2 - 32) for f in found]
    assert np.argmin(dist) != 0  # not the most confident one
    crop = fp.align(padded, found[int(np.argmin(dist))].landmarks)
    labels = fp.parse(fp.load(tmp_path / "facexlib" / "parsing_bisenet.pth"), crop)
    gray = 0.299 * crop[:, :1] + 0.587 * crop[:, 1:2] + 0.114 * crop[:, 2:]
    white = sum(labels == i for i in (0, 16, 18, 7, 8, 9, 14, 15)).bool()[:, None]
    assert torch.allclose(out, torch.where(white, 1.0, gray.expand(-1, 3, -1, -1)), atol=1e-6)
    assert len({round(v, 6) for v in out.unique().tolist()}) > 2  # some gray face, not all white

    silent = planted_detector().eval()
    with torch.no_grad():
        for head in silent.ClassHead:
            head.conv1x1.bias.copy_(torch.tensor([10.0, -10.0, 10.0, -10.0]))  # nothing scores as a face
    with pytest.raises(ControlNetError, match="found no face"):
        fp.face_features(silent, fp.load(tmp_path / "facexlib" / "parsing_bisenet.pth"), image, 64)
