"""Face restoration's parse mask, as A1111 pastes faces (facexlib's helper with ``use_parse``): a file in the
published ``parsing_parsenet.pth`` layout (names and shapes written out here from facexlib's ParseNet at 512:
64 → 128 → 256 wide going down to 32², ten 256-wide body blocks, back up to 64) loads strictly into our ParseNet,
which agrees with a functional forward pass written here; the mask keeps skin and features, is blurred twice
with 101 taps at sigma 11 as OpenCV does, loses its outer 10 pixels; a restorer with the file pastes through
it, and without it through the footprint as before."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import planted_detector
from PIL import Image

from sdstudio.core.paths import Paths
from sdstudio.engine import faces as faces_ops
from sdstudio.engine.gfpgan import GFPGAN, channels
from sdstudio.engine.parsenet import ParseNet
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import random_weights

torch.set_num_threads(1)

# facexlib's ParseNet(in_size=512, out_size=512, base_ch=64, res_depth=10, ch_range=[32, 256])
ENCODER = [(64, 128), (128, 256), (256, 256), (256, 256)]
BODY = [256] * 10
DECODER = [(256, 256), (256, 256), (256, 128), (128, 64)]


def conv(prefix: str, cin: int, cout: int, norm: bool) -> dict[str, tuple[int, ...]]:
    s = {f"{prefix}.conv2d.weight": (cout, cin, 3, 3)}
    if norm:
        s |= {f"{prefix}.norm.norm.{n}": (cout,) for n in ("weight", "bias", "running_mean", "running_var")}
        s[f"{prefix}.norm.norm.num_batches_tracked"] = ()
    else:
        s[f"{prefix}.conv2d.bias"] = (cout,)
    return s


def published_shapes(encoder=ENCODER, body=BODY, decoder=DECODER, base=64) -> dict[str, tuple[int, ...]]:
    s = conv("encoder.0", 3, base, False)
    for part, blocks, scaled in (("encoder", encoder, True), ("body", [(c, c) for c in body], False),
                                 ("decoder", decoder, True)):
        for i, (cin, cout) in enumerate(blocks, start=1 if part == "encoder" else 0):
            p = f"{part}.{i}"
            if scaled or cin != cout:
                s |= conv(f"{p}.shortcut_func", cin, cout, False)
            s |= conv(f"{p}.conv1", cin, cout, True) | conv(f"{p}.conv2", cout, cout, True)
    last = decoder[-1][1]
    return s | conv("out_img_conv", last, 3, False) | conv("out_mask_conv", last, 19, False)


def reference(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ParseNet's forward written from its definition: every conv after a reflection pad of 1."""
    def c(p, x, stride=1, up=False, norm=False, act=False):
        if up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w[f"{p}.conv2d.weight"], w.get(f"{p}.conv2d.bias"),
                     stride)
        if norm:
            n = f"{p}.norm.norm"
            x = (x - w[f"{n}.running_mean"][:, None, None]) / torch.sqrt(w[f"{n}.running_var"][:, None, None] + 1e-5)
            x = x * w[f"{n}.weight"][:, None, None] + w[f"{n}.bias"][:, None, None]
        return torch.where(x > 0, x, 0.2 * x) if act else x

    def block(p, x, scale):
        short = c(f"{p}.shortcut_func", x, 2 if scale == "down" else 1, scale == "up") \
            if f"{p}.shortcut_func.conv2d.weight" in w else x
        r = c(f"{p}.conv1", x, up=scale == "up", norm=True, act=True)
        return short + c(f"{p}.conv2", r, 2 if scale == "down" else 1, norm=True)

    x = c("encoder.0", x)
    for i in range(1, 5):
        x = block(f"encoder.{i}", x, "down")
    b = x
    for i in range(10):
        b = block(f"body.{i}", b, "none")
    x = x + b
    for i in range(4):
        x = block(f"decoder.{i}", x, "up")
    return c("out_mask_conv", x)


def test_the_published_layout_loads_strictly_and_computes_parsenet():
    weights = random_weights(published_shapes())
    net = ParseNet.from_state_dict({f"module.{k}": v for k, v in weights.items()})
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == published_shapes()
    x = torch.rand(1, 3, 64, 64) * 2 - 1  # fully convolutional: a small picture is enough
    with torch.no_grad():
        ours, ref = net(x), reference(weights, x)
    assert ours.shape == (1, 19, 64, 64)
    scale = float(ref.abs().max())  # 38 convolutions deep: float32 sums in another order differ by ~1e-4
    assert scale > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3 * scale)
    with torch.no_grad():
        other = reference(random_weights(published_shapes(), seed=3), x)
    assert (other - ref).abs().max() > 1e-2  # the comparison is not between constants
    with pytest.raises(KeyError, match="not a ParseNet"):
        ParseNet.from_state_dict({"encoder.0.conv2d.weight": torch.zeros(1)})


def tiny_parser(keep_class: int, background: float = 0.2) -> ParseNet:
    """A narrow ParseNet (one block in each part) set by hand: the picture's mean brightness (-1..1) goes
    through the stem's first channel and the blocks' shortcuts (the residual branches give 0), doubled by the
    body's sum, to the mask head, which says ``keep_class`` where twice that beats ``background`` (class 0's
    logit), class 0 elsewhere. Even-numbered edges come through the stride-2 and nearest-2× steps unmoved."""
    shapes = published_shapes([(8, 8)], [8], [(8, 8)], base=8)
    net = ParseNet.from_state_dict(random_weights(shapes))
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                t.zero_()  # convolutions and batch-norm scales and shifts: 0
        net.encoder[0].conv2d.weight[0, :, 1, 1] = 1 / 3
        net.encoder[1].shortcut_func.conv2d.weight[0, 0, 1, 1] = 1.0
        net.decoder[0].shortcut_func.conv2d.weight[0, 0, 1, 1] = 1.0
        net.out_mask_conv.conv2d.weight[keep_class, 0, 1, 1] = 1.0
        net.out_mask_conv.conv2d.bias[0] = background
    return net


def test_the_mask_keeps_the_face_blurs_as_opencv_and_drops_the_border():
    restored = torch.zeros(3, 512, 512)
    restored[:, 100:400, 150:350] = 255  # bright: class kept; dark: background
    for keep_class, kept in ((1, True), (14, False), (17, False), (13, True)):  # skin, neck, hair, lower lip
        mask = faces_ops.parse_mask(tiny_parser(keep_class), restored)
        assert mask.shape == (512, 512)
        assert (float(mask[250, 250]) > 0.99) is kept and float(mask[50, 50]) < 1e-6
    expected = np.zeros((512, 512))
    expected[100:400, 150:350] = 255.0
    expected = cv2.GaussianBlur(cv2.GaussianBlur(expected, (101, 101), 11), (101, 101), 11)
    expected[:10], expected[-10:], expected[:, :10], expected[:, -10:] = 0, 0, 0, 0
    ours = faces_ops.parse_mask(tiny_parser(1), restored).numpy()
    assert np.abs(ours - expected / 255).max() < 1e-5
    whole = faces_ops.parse_mask(tiny_parser(1), torch.full((3, 512, 512), 255.0)).numpy()
    assert whole[:10].max() == 0 and whole[:, -10:].max() == 0 and whole[256, 256] > 0.99


def _picture() -> tuple[Image.Image, object]:
    from tests.test_faces import _face_picture

    return _face_picture()


def test_a_restorer_with_the_parser_pastes_through_its_mask():
    image, face = _picture()
    torch.manual_seed(1)
    net = GFPGAN(*channels(512, 2, 1 / 32), style=16, mlp=2).eval()
    plain = faces_ops.FaceRestorer("GFPGAN", net, planted_detector().eval(), torch.device("cpu"))
    parsed = faces_ops.FaceRestorer("GFPGAN", net, planted_detector().eval(), torch.device("cpu"),
                                    tiny_parser(1, background=-10.0))  # all of the crop is face
    a = np.asarray(image).astype(np.float64)
    with_parse = np.asarray(parsed.restore(image, faces=[face])).astype(np.float64)
    without = np.asarray(plain.restore(image, faces=[face])).astype(np.float64)
    # the formula: the restored face and its parse mask warped back, blended over the picture
    picture = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    (matrix, crop), = parsed.crops(picture, [face])
    restored = parsed.restore_crop(crop, 0)
    back = faces_ops.warp(restored, faces_ops.invert(matrix), image.size).permute(1, 2, 0).numpy()
    soft = faces_ops.warp(faces_ops.parse_mask(parsed.parser, restored)[None], faces_ops.invert(matrix),
                          image.size)[0].numpy()[:, :, None]
    assert soft.max() > 0.99 and (soft == 0).mean() > 0.5  # the crop's inside pasted, the rest kept
    expected = (soft * back + (1 - soft) * a).round().clip(0, 255)
    assert np.abs(with_parse - expected).max() <= 1
    assert np.abs(with_parse - without).max() > 5  # the mask, not the footprint, decided
    outside = soft[:, :, 0] == 0
    assert np.array_equal(with_parse[outside], a[outside])


def test_the_parser_file_is_found_beside_the_detector_and_a_bad_one_named(tmp_path, face_models):
    face_models(tmp_path, codeformer=False)
    dirs = Paths(tmp_path).face_restorer_dirs
    restorers = faces_ops.FaceRestorers(dirs)
    assert restorers.parser_file("GFPGAN") is None and restorers.get("GFPGAN").parser is None  # optional
    torch.save(tiny_parser(1).state_dict(), dirs["GFPGAN"] / "parsing_parsenet.pth")
    assert restorers.parser_file("GFPGAN") == dirs["GFPGAN"] / "parsing_parsenet.pth"
    assert isinstance(restorers.get("GFPGAN").parser, ParseNet)  # a new file: the restorer is loaded again
    image = Image.new("RGB", (32, 32), (150, 110, 90))
    assert restorers.restore(image, name="GFPGAN").size == (32, 32)
    (dirs["GFPGAN"] / "parsing_parsenet.pth").write_bytes(b"not a pickle")
    with pytest.raises(ModelFileError, match="parsing_parsenet.pth"):
        restorers.restore(image, name="GFPGAN")
