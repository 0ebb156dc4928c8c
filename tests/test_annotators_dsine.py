"""normal_dsine: our DSINE network (EfficientNet-B5 encoder with TensorFlow padding, the decoder, the rotation-based
refinement) built from a file's shapes and loaded under the published names (``dsine.pt``: ``{"model": state}``,
``module.`` prefixes), its pieces checked against independent definitions (the exponential map for the rotations,
TensorFlow's "same" padding, the convex upsampling's limit), and the preprocessor's frame as the extension's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine.annotators import dsine
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import fresh_annotator_cache, picture  # noqa: F401 (autouse)

torch.set_num_threads(1)
E = "encoder.original_model."


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    """A narrow network of DSINE's layout: seven stages (the second with two blocks), a 32-wide decoder."""
    s = {E + "conv_stem.weight": (8, 3, 3, 3), E + "conv_head.weight": (48, 32, 1, 1),
         "decoder.conv2.weight": (32, 50, 1, 1), "decoder.normal_head.0.weight": (16, 10, 3, 3)}
    s |= {E + "blocks.0.0.conv_dw.weight": (8, 1, 3, 3), E + "blocks.0.0.se.conv_reduce.weight": (2, 8, 1, 1),
          E + "blocks.0.0.conv_pw.weight": (8, 8, 1, 1)}
    cin = 8
    for stage, blocks, cout, k in ((1, 2, 12, 3), (2, 1, 16, 5), (3, 1, 16, 3), (4, 1, 24, 5), (5, 1, 24, 5),
                                   (6, 1, 32, 3)):
        for b in range(blocks):
            p = f"{E}blocks.{stage}.{b}."
            mid = cin * 2
            s |= {p + "conv_pw.weight": (mid, cin, 1, 1), p + "conv_dw.weight": (mid, 1, k, k),
                  p + "se.conv_reduce.weight": (max(1, cin // 4), mid, 1, 1), p + "conv_pwl.weight": (cout, mid, 1, 1)}
            cin = cout
    return s


def tiny_model(seed: int = 0) -> dsine.DSINE:
    torch.manual_seed(seed)
    model = dsine.DSINE(tiny_shapes()).eval()
    with torch.no_grad():
        for m in model.modules():  # batch norms with statistics that are not the identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def write_file(path, model: dsine.DSINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "iter": 1}, str(path))


def test_the_published_names_and_the_encoder_built_from_shapes(tmp_path):
    model = tiny_model()
    names = set(model.state_dict())
    for name in (E + "blocks.0.0.se.conv_expand.weight", E + "blocks.1.1.bn3.running_var", E + "bn2.weight",
                 "decoder.up1._net.0.weight", "decoder.up2._net.4.bias", "decoder.hidden_head.4.weight",
                 "gru.convq.weight", "prob_head.0.weight", "xy_head.4.weight", "angle_head.2.bias",
                 "up_prob_head.4.weight"):
        assert name in names, name
    assert model.up_prob_head[4].out_channels == 9 * 8 * 8 and model.xy_head[4].out_channels == 2 * 25
    net = model.encoder.original_model
    assert net.blocks[1][1].skip and not net.blocks[1][0].skip  # the stride-2 first block has no residual
    f8, f16, f32 = net(torch.randn(1, 3, 96, 64))
    assert f8.shape[-2:] == (12, 8) and f16.shape[-2:] == (6, 4) and f32.shape[-2:] == (3, 2)
    write_file(tmp_path / "dsine.pt", model)
    loaded = dsine.load(tmp_path / "dsine.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, str(tmp_path / "other.pt"))
    with pytest.raises(ModelFileError, match="not a DSINE checkpoint"):
        dsine.load(tmp_path / "other.pt")


def test_tensorflow_same_padding():
    conv = dsine._conv(2, 3, 5, stride=2)
    torch.nn.init.normal_(conv.weight)
    for size in (9, 10, 17, 32):
        x = torch.randn(1, 2, size, size + 1)
        out = conv(x)
        assert out.shape[-2:] == (math.ceil(size / 2), math.ceil((size + 1) / 2))
        # TensorFlow's rule: total padding (out - 1) * stride + k - in, the larger half after
        def pads(n):
            total = max((math.ceil(n / 2) - 1) * 2 + 5 - n, 0)
            return total // 2, total - total // 2
        (t, b), (lft, r) = pads(size), pads(size + 1)
        ref = F.conv2d(F.pad(x, (lft, r, t, b)), conv.weight, stride=2)
        assert torch.allclose(out, ref, atol=1e-6)


def test_rotations_are_the_exponential_map():
    g = torch.Generator().manual_seed(0)
    axis_angle = torch.randn(50, 3, generator=g) * 1.5
    axis_angle[0] = 0.0
    axis_angle[1] = torch.tensor([1e-8, 0.0, 0.0])
    ours = dsine.rotation_matrices(axis_angle)
    x, y, z = axis_angle.double().unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(-1, 3, 3)
    assert torch.allclose(ours.double(), torch.linalg.matrix_exp(skew), atol=1e-5)


def test_convex_upsampling_and_the_ray_relu():
    x = torch.randn(1, 3, 4, 5)
    peaked = torch.full((1, 9, 8, 8, 4, 5), -50.0)
    peaked[:, 4] = 50.0  # all weight on the centre neighbour: nearest-neighbour upsampling
    up = dsine.convex_upsample(x, peaked.reshape(1, 9 * 64, 4, 5))
    assert torch.allclose(up, F.interpolate(x, scale_factor=8, mode="nearest"), atol=1e-5)
    ray = F.normalize(torch.tensor([0.2, -0.1, 1.0]).view(1, 3, 1, 1), dim=1)
    away = F.normalize(torch.tensor([0.0, 0.3, -1.0]).view(1, 3, 1, 1), dim=1)
    fixed = dsine.ray_relu(away, ray)
    assert torch.cosine_similarity(fixed, ray, dim=1).item() >= 0.01 - 1e-6
    facing = F.normalize(torch.tensor([0.1, 0.2, 0.9]).view(1, 3, 1, 1), dim=1)
    assert torch.allclose(dsine.ray_relu(facing, ray), facing, atol=1e-6)


def test_intrinsics_and_padding_as_the_extension():
    k = dsine.intrinsics_from_fov(60.0, 480, 640)
    assert k[0, 0].item() == pytest.approx(320 / math.tan(math.radians(30))) and k[1, 1] == k[0, 0]
    assert (k[0, 2].item(), k[1, 2].item()) == (319.5, 239.5)
    assert dsine.padding_to_32(480, 640) == (0, 0, 0, 0)
    assert dsine.padding_to_32(500, 650) == (11, 11, 6, 6)  # 650 -> 672, 500 -> 512


def test_normal_dsine_preprocessor(tmp_path):
    from sdstudio.engine.preprocessors import builtin, detect

    registry = builtin(tmp_path)
    pre = registry.get("normal_dsine")
    assert [s.detail() for s in pre.sliders()][1:] == [
        {"name": "Fov", "value": 60.0, "min": 0.0, "max": 360.0, "step": 0.1},
        {"name": "Iterations", "value": 5, "min": 1, "max": 20, "step": 1}]
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3)).astype(np.uint8)
    with pytest.raises(ControlNetError, match=rf"needs dsine.pt: put dsine.pt in {tmp_path / 'normal_dsine'}"):
        detect(pre, image, 128, -1, -1)
    write_file(tmp_path / "normal_dsine" / "dsine.pt", tiny_model(1))
    out = detect(pre, image, 128, -1, -1)
    assert out.shape == (128, 171, 3) and out.dtype == np.uint8  # the short side at the resolution
    n = out.astype(np.float64) / 255.0 * 2 - 1
    assert np.allclose(np.linalg.norm(n, axis=2), 1.0, atol=0.03)  # unit normals, as (n + 1) / 2
    again = detect(pre, image, 128, 60.0, 5)
    assert np.array_equal(out, again)  # the defaults are the sliders'
    fewer = detect(pre, image, 128, 60.0, 1)
    wider = detect(pre, image, 128, 120.0, 5)
    assert not np.array_equal(out, fewer) and not np.array_equal(out, wider)  # both sliders act
