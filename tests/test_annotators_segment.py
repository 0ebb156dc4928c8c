"""Anime face segmentation (seg_anime_face): UNet.pth written in the published layout (torchvision's
MobileNetV2 ``features`` names under en_block0-4, the decoder's convolutions), loaded, run through the
extension's frame, and the palette map checked against the network's class scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import annotators
from sdstudio.engine.annotators import anime_face, common
from tests.test_annotators import fresh_annotator_cache, picture, random_weights, write  # noqa: F401 (autouse)

torch.set_num_threads(1)


def _bn(out: dict, name: str, c: int) -> None:
    for p in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{p}"] = (c,)
    out[f"{name}.num_batches_tracked"] = ()


def unet_layout() -> dict:
    """UNet.pth: torchvision's mobilenet_v2 features 0-16 regrouped (0-1, 2-3, 4-6, 7-13, 14-16); a feature is
    Conv2dNormActivation ("0" conv, "1" bn) or InvertedResidual ("conv": [1×1 expand (0.0, 0.1),] 3×3 depthwise
    (.0, .1), 1×1 project, bn); the decoder's convolutions sit at index 1 of each de_block."""
    out: dict = {}
    features = [("stem", 3, 32, 1)]
    cin = 32
    for t, c, n, _s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]:
        for _ in range(n):
            features.append(("ir", cin, c, t))
            cin = c
    groups = [(0, 2), (2, 4), (4, 7), (7, 14), (14, 17)]
    for g, (a, b) in enumerate(groups):
        for j, index in enumerate(range(a, b)):
            kind, ci, co, t = features[index]
            p = f"en_block{g}.{j}"
            if kind == "stem":
                out[f"{p}.0.weight"] = (32, 3, 3, 3)
                _bn(out, f"{p}.1", 32)
                continue
            hidden, k = ci * t, 0
            if t != 1:
                out[f"{p}.conv.0.0.weight"] = (hidden, ci, 1, 1)
                _bn(out, f"{p}.conv.0.1", hidden)
                k = 1
            out[f"{p}.conv.{k}.0.weight"] = (hidden, 1, 3, 3)
            _bn(out, f"{p}.conv.{k}.1", hidden)
            out[f"{p}.conv.{k + 1}.weight"] = (co, hidden, 1, 1)
            _bn(out, f"{p}.conv.{k + 2}", co)
    for name, ci, co in (("de_block4", 160, 96), ("de_block3", 192, 32), ("de_block2", 64, 24),
                         ("de_block1", 48, 16), ("de_block0", 32, 7)):
        out[f"{name}.1.weight"], out[f"{name}.1.bias"] = (co, ci, 3, 3), (co,)
    return out


def reference_unet(w: dict, x: torch.Tensor) -> torch.Tensor:
    """The extension's UNet forward written out with functional ops over the file's tensors: MobileNetV2 blocks
    (ReLU6 after each conv-bn but the projection; a residual where stride 1 keeps the width), then per level
    nearest ×2, conv, instance norm, LeakyReLU(0.1), resized to the skip (bilinear, corners aligned) and put
    before it, and a softmax over the 7 classes."""
    def bn(t, p):
        return F.batch_norm(t, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"],
                            eps=1e-5)

    def conv_bn(t, p, stride=1, groups=1, act=True):
        k = w[f"{p}.0.weight"]
        t = bn(F.conv2d(t, k, stride=stride, padding=k.shape[-1] // 2, groups=groups), f"{p}.1")
        return F.relu6(t) if act else t

    strides = {0: 2, 2: 2, 4: 2, 7: 2, 14: 2}  # MobileNetV2's features that halve the size
    skips, t, feature = [], x, 0
    for g, n in enumerate((2, 2, 3, 7, 3)):
        for j in range(n):
            p, stride = f"en_block{g}.{j}", strides.get(feature, 1)
            feature += 1
            if (g, j) == (0, 0):
                t = conv_bn(t, p, stride=stride)
                continue
            start, k = t, 0
            if f"{p}.conv.0.0.weight" in w and w[f"{p}.conv.0.0.weight"].shape[-1] == 1:
                t = conv_bn(t, f"{p}.conv.0")
                k = 1
            hidden = t.shape[1]
            t = conv_bn(t, f"{p}.conv.{k}", stride=stride, groups=hidden)
            t = bn(F.conv2d(t, w[f"{p}.conv.{k + 1}.weight"]), f"{p}.conv.{k + 2}")
            if stride == 1 and start.shape[1] == t.shape[1]:
                t = t + start
        skips.append(t)
    y = skips[4]
    for level in (4, 3, 2, 1):
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        y = F.conv2d(y, w[f"de_block{level}.1.weight"], w[f"de_block{level}.1.bias"], padding=1)
        y = F.leaky_relu(F.instance_norm(y, eps=1e-5), 0.1)
        skip = skips[level - 1]
        y = torch.cat((F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=True), skip), 1)
    y = F.interpolate(y, scale_factor=2, mode="nearest")
    return torch.softmax(F.conv2d(y, w["de_block0.1.weight"], w["de_block0.1.bias"], padding=1), dim=1)


def test_unet_is_the_extensions_network():
    weights = random_weights(unet_layout(), seed=5)
    net = anime_face.AnimeFaceUNet()
    common.load_into(net, weights, Path("UNet.pth"))
    x = torch.rand(1, 3, 96, 160)
    with torch.no_grad():
        assert torch.allclose(net(x), reference_unet(weights, x), atol=1e-5)


def test_unet_loads_the_published_layout_with_or_without_dataparallel_names(tmp_path):
    weights = random_weights(unet_layout(), seed=2)
    path = write(tmp_path / "anime_face_segment" / "UNet.pth", weights, prefix="module.")
    net = anime_face.load(path)
    x = torch.rand(1, 3, 96, 160)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 7, 96, 160) and torch.allclose(y.sum(dim=1), torch.ones(1, 96, 160), atol=1e-5)
    common.clear_cache()
    plain = anime_face.load(write(tmp_path / "plain" / "UNet.pth", weights))
    with torch.no_grad():
        assert torch.allclose(plain(x), y)


def test_seg_anime_face_paints_the_most_likely_class(tmp_path):
    write(tmp_path / "anime_face_segment" / "UNet.pth", random_weights(unet_layout(), seed=3))
    p = {q.name: q for q in annotators.preprocessors(tmp_path)}["anime_face_segment"]
    assert p.aliases == ("seg_anime_face",) and p.control_types == ("Segmentation",)
    image = picture(80, 100)
    out = p.run(image, 512, -1, -1)  # 512×640: already 512 on the short side, so no resize
    assert out.shape == (512, 640, 3) and out.dtype == np.uint8
    padded, _ = common.resize_with_pad(image, 512)
    net = anime_face.load(tmp_path / "anime_face_segment" / "UNet.pth")
    with torch.no_grad():
        scores = net(torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255.0)[0].numpy()
    expected = anime_face.PALETTE[scores.argmax(axis=0)]
    assert np.array_equal(out, expected)
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in anime_face.PALETTE.tolist()} and len(colours) > 1


def test_other_resolutions_segment_at_512_as_the_extension_does(tmp_path):
    write(tmp_path / "anime_face_segment" / "UNet.pth", random_weights(unet_layout(), seed=3))
    p = {q.name: q for q in annotators.preprocessors(tmp_path)}["anime_face_segment"]
    image = picture(80, 100)
    out = p.run(image, 64, -1, -1)
    padded, _ = common.resize_with_pad(image, 64)  # 64×128 → PIL bicubic to 512×1024, segmented there
    assert anime_face.working_size(64, 128) == (512, 1024)
    full = anime_face.detect(anime_face.load(tmp_path / "anime_face_segment" / "UNet.pth"), padded)
    assert full.shape == (512, 1024, 3)
    assert np.array_equal(out, full[:64, :80])  # the frame cuts at the resolution's size, as the extension's


@pytest.mark.parametrize("h, w, expected", [(512, 640, (512, 640)), (64, 128, (512, 1024)), (300, 200, (768, 512)),
                                            (700, 700, (512, 512)), (640, 448, (731, 512))])
def test_working_size_is_torchvisions_resize_512(h, w, expected):
    assert anime_face.working_size(h, w) == expected  # 640 × 512 / 448 = 731.4 → 731


def test_missing_file(tmp_path):
    with pytest.raises(ControlNetError) as err:
        {q.name: q for q in annotators.preprocessors(tmp_path)}["anime_face_segment"].run(picture(), 64, -1, -1)
    assert f"put UNet.pth in {tmp_path / 'anime_face_segment'}" in str(err.value)
