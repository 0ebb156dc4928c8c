"""The depth preprocessors added after the first set: MiDaS DPT-Hybrid (depth_midas, normal_midas), ZoeDepth
(depth_zoe) and Depth Anything v2. Each loads a file written in the published layout (key names and shapes as
the extension's network code defines them, written out here independently of our modules), runs through the
extension's frame, and its post-processing matches the extension's formulas; missing files say which file to
put where.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import annotators
from sdstudio.engine.annotators import common, depth_anything, midas, zoe
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import (  # noqa: F401 (fresh_annotator_cache: an autouse fixture)
    _conv,
    depth_anything_layout,
    dpt_refinenets,
    fresh_annotator_cache,
    picture,
    random_weights,
    write,
)

torch.set_num_threads(1)


def by_name(folder) -> dict:
    return {p.name: p for p in annotators.preprocessors(folder)}


def _vit_blocks(out: dict, prefix: str, dim: int, blocks: int, mlp: int) -> None:
    """timm ViT blocks: norm1, fused qkv, proj, norm2, mlp.fc1/fc2."""
    for b in range(blocks):
        p = f"{prefix}blocks.{b}"
        for norm in ("norm1", "norm2"):
            out[f"{p}.{norm}.weight"], out[f"{p}.{norm}.bias"] = (dim,), (dim,)
        out[f"{p}.attn.qkv.weight"], out[f"{p}.attn.qkv.bias"] = (3 * dim, dim), (3 * dim,)
        out[f"{p}.attn.proj.weight"], out[f"{p}.attn.proj.bias"] = (dim, dim), (dim,)
        out[f"{p}.mlp.fc1.weight"], out[f"{p}.mlp.fc1.bias"] = (mlp, dim), (mlp,)
        out[f"{p}.mlp.fc2.weight"], out[f"{p}.mlp.fc2.bias"] = (dim, mlp), (dim,)


def _dpt_decoder(out: dict, prefix: str, neck, features: int) -> None:
    """MiDaS's scratch: layerN_rn (no bias), four refinenets (out_conv, two residual units) and output_conv."""
    dpt_refinenets(out, prefix, neck, features)
    _conv(out, f"{prefix}output_conv.0", features // 2, features, 3)
    _conv(out, f"{prefix}output_conv.2", 32, features // 2, 3)
    _conv(out, f"{prefix}output_conv.4", 1, 32, 1)


def midas_hybrid_layout(dim: int = 768, blocks: int = 12, depths=(3, 4, 9), features: int = 256,
                        classes: int = 1000) -> dict:
    """dpt_hybrid-midas-501f0c75.pt: timm's vit_base_resnet50_384 under "pretrained.model." (ResNetV2 stem and
    three stages of bottlenecks with StdConv + GroupNorm, patch projection 1024 → dim, 24×24 position grid,
    the ImageNet head), the readout projections and reassemble convolutions of act_postprocess3/4 (1 and 2 are
    identities in the hybrid) and the decoder under "scratch." (defaults: the published sizes)."""
    out: dict = {}
    r = "pretrained.model.patch_embed.backbone."
    out[f"{r}stem.conv.weight"] = (64, 3, 7, 7)
    out[f"{r}stem.norm.weight"], out[f"{r}stem.norm.bias"] = (64,), (64,)
    cin = 64
    for s, (n, width) in enumerate(zip(depths, (256, 512, 1024))):
        mid = width // 4
        for b in range(n):
            p = f"{r}stages.{s}.blocks.{b}"
            if b == 0:
                out[f"{p}.downsample.conv.weight"] = (width, cin, 1, 1)
                out[f"{p}.downsample.norm.weight"], out[f"{p}.downsample.norm.bias"] = (width,), (width,)
            for name, shape in (("conv1", (mid, cin if b == 0 else width, 1, 1)), ("conv2", (mid, mid, 3, 3)),
                                ("conv3", (width, mid, 1, 1))):
                out[f"{p}.{name}.weight"] = shape
            for name, c in (("norm1", mid), ("norm2", mid), ("norm3", width)):
                out[f"{p}.{name}.weight"], out[f"{p}.{name}.bias"] = (c,), (c,)
        cin = width
    v = "pretrained.model."
    out[f"{v}cls_token"], out[f"{v}pos_embed"] = (1, 1, dim), (1, 1 + 24 * 24, dim)
    _conv(out, f"{v}patch_embed.proj", dim, 1024, 1)
    _vit_blocks(out, v, dim, blocks, 4 * dim)
    out[f"{v}norm.weight"], out[f"{v}norm.bias"] = (dim,), (dim,)
    out[f"{v}head.weight"], out[f"{v}head.bias"] = (classes, dim), (classes,)
    for k in (3, 4):
        out[f"pretrained.act_postprocess{k}.0.project.0.weight"] = (dim, 2 * dim)
        out[f"pretrained.act_postprocess{k}.0.project.0.bias"] = (dim,)
        _conv(out, f"pretrained.act_postprocess{k}.3", dim, dim, 1)
    _conv(out, "pretrained.act_postprocess4.4", dim, dim, 3)
    _dpt_decoder(out, "scratch.", (256, 512, dim, dim), features)
    return out


SMALL_MIDAS = {"dim": 64, "blocks": 4, "depths": (1, 1, 1), "features": 32, "classes": 10}


# --- MiDaS ----------------------------------------------------------------------------------------------------

def test_midas_keys_convert_to_transformers_for_the_published_sizes():
    from transformers import DPTForDepthEstimation

    weights = {k: torch.empty(v, device="meta") for k, v in midas_hybrid_layout().items()}  # shapes only
    config = midas.config_for(weights)
    assert config.backbone_out_indices == [0, 1, 8, 11] and config.num_attention_heads == 12
    assert config.backbone_config.depths == [3, 4, 9] and config.neck_hidden_sizes == [256, 512, 768, 768]
    with torch.device("meta"):
        reference = DPTForDepthEstimation(config).state_dict()
    converted = midas.to_transformers(weights)
    assert set(converted) == set(reference)  # the ImageNet head is dropped, nothing else
    assert all(tuple(converted[k].shape) == tuple(reference[k].shape) for k in reference)


def _midas_file(folder, seed: int = 3):
    return write(folder / "midas" / "dpt_hybrid-midas-501f0c75.pt",
                 random_weights(midas_hybrid_layout(**SMALL_MIDAS), seed=seed))


def test_midas_runs_on_the_padded_picture_as_it_is(tmp_path):
    path = _midas_file(tmp_path)
    net = midas.load(path)
    seen = []
    handle = net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    image = picture()
    try:
        out = by_name(tmp_path)["depth"].run(image, 64, -1, -1)
    finally:
        handle.remove()
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    padded, _ = common.resize_with_pad(image, 64)  # 64×128: not square, not 384
    assert tuple(seen[0].shape) == (1, 3, 64, 128)
    assert torch.allclose(seen[0][0], torch.from_numpy(padded).permute(2, 0, 1).float() / 127.5 - 1.0)
    raw = midas.predict(net, padded)
    assert raw.shape == (64, 128)
    expected = midas.depth_map(raw)[:64, :80]
    assert np.array_equal(out[:, :, 0], expected) and np.array_equal(out[:, :, 1], expected)


def test_midas_forward_is_the_hybrid_dpt_of_the_file(tmp_path):
    """Our forward over transformers' modules gives transformers' own output where that one runs (384×384), and
    at other sizes reads the position grid resized to the picture's grid."""
    net = midas.load(_midas_file(tmp_path, seed=5))
    x = torch.randn(1, 3, 384, 384) * 0.5
    with torch.no_grad():
        ours = net(x)
        theirs = net.model(pixel_values=x).predicted_depth
    assert ours.shape == (1, 384, 384) and torch.allclose(ours, theirs, atol=1e-5)
    with torch.no_grad():
        wide = net(torch.randn(1, 3, 64, 192))
    assert wide.shape == (1, 64, 192) and torch.isfinite(wide).all() and (wide >= 0).all()  # ReLU'd head


def test_midas_depth_and_normal_formulas():
    depth = np.array([[0.0, 1.0, 2.0, 3.0]] * 4, np.float32) * np.array([[1], [1], [1], [2]], np.float32)
    d8 = midas.depth_map(depth)
    assert d8.dtype == np.uint8 and d8.max() == 255 and d8.min() == 0
    assert d8[0, 1] == int(1.0 / 6.0 * 255.0)  # (d - min) / max(d - min) × 255, truncated
    n = midas.normal_map(depth, background=0.4)
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    flat = (depth - depth.min()) / (depth - depth.min()).max() < 0.4
    x[flat], y[flat] = 0, 0
    v = np.stack([x, y, np.full_like(x, 2 * np.pi)], axis=2)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    expected = (v * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1]
    assert np.array_equal(n, expected)
    assert (n[flat] == [255, 127, 127]).all()  # flat: (z, y, x) = (1, 0, 0) → 255, 127, 127
    assert np.array_equal(midas.depth_map(np.ones((3, 3), np.float32)), np.zeros((3, 3), np.uint8))


def test_normal_midas_uses_the_background_threshold_slider(tmp_path):
    _midas_file(tmp_path)
    found, image = by_name(tmp_path), picture()
    p = found["normal_map"]
    assert p.aliases == ("normal_midas",) and p.control_types == ("NormalMap",)
    assert p.threshold_a.detail() == {"name": "Normal Background Threshold", "value": 0.4, "min": 0.0, "max": 1.0,
                                      "step": 0.01}
    padded, _ = common.resize_with_pad(image, 64)
    raw = midas.predict(midas.load(tmp_path / "midas" / "dpt_hybrid-midas-501f0c75.pt"), padded)
    for threshold in (0.0, 0.4, 1.0):
        out = p.run(image, 64, threshold, -1)
        assert np.array_equal(out, midas.normal_map(raw, threshold)[:64, :80])
    assert (p.run(image, 64, 1.0, -1) == [255, 127, 127]).all()  # everything under the threshold: flat


def test_midas_file_of_another_network_is_refused(tmp_path):
    layout = midas_hybrid_layout(**SMALL_MIDAS)
    del layout["scratch.layer1_rn.weight"]
    write(tmp_path / "midas" / "dpt_hybrid-midas-501f0c75.pt", random_weights(layout))
    with pytest.raises(ModelFileError, match="dpt_hybrid-midas-501f0c75.pt: not a MiDaS DPT-Hybrid"):
        by_name(tmp_path)["depth"].run(picture(), 64, -1, -1)


@pytest.mark.parametrize("name, file, sub", [("depth", "dpt_hybrid-midas-501f0c75.pt", "midas"),
                                             ("normal_map", "dpt_hybrid-midas-501f0c75.pt", "midas")])
def test_missing_file_names_the_file_and_the_folder(tmp_path, name, file, sub):
    with pytest.raises(ControlNetError) as err:
        by_name(tmp_path)[name].run(picture(), 64, -1, -1)
    assert f"put {file} in {tmp_path / sub}" in str(err.value)


# --- Depth Anything v2 ----------------------------------------------------------------------------------------

def test_depth_anything_v2_reads_the_blocks_v2_fixes_per_encoder():
    from transformers import DepthAnythingForDepthEstimation

    weights = {k: torch.empty(v, device="meta") for k, v in depth_anything_layout().items()}  # ViT-L, as published
    config = depth_anything.config_for(weights, version=2)
    assert config.backbone_config.out_indices == [5, 12, 18, 24]  # blocks 4, 11, 17, 23 (transformers counts from 1)
    assert depth_anything.config_for(weights).backbone_config.out_indices == [21, 22, 23, 24]  # v1: the last four
    with torch.device("meta"):
        reference = DepthAnythingForDepthEstimation(config).state_dict()
    converted = depth_anything.to_transformers(weights)
    assert set(converted) == set(reference)
    assert depth_anything.feature_blocks(12, 2) == [2, 5, 8, 11] and depth_anything.feature_blocks(40, 2)[0] == 9
    with pytest.raises(ModelFileError, match="not a Depth Anything v2 checkpoint"):
        depth_anything.feature_blocks(4, 2)


SMALL_DA2 = {"dim": 64, "blocks": 12, "neck": (16, 32, 64, 64), "features": 32}  # a ViT-S/B depth, test width


def test_depth_anything_v2_loads_the_safetensors_file_and_runs(tmp_path):
    from safetensors.torch import save_file

    weights = random_weights(depth_anything_layout(**SMALL_DA2), seed=4)
    path = tmp_path / "depth_anything_v2" / "depth_anything_v2_vitl.safetensors"
    path.parent.mkdir(parents=True)
    save_file(weights, str(path))
    found, image = by_name(tmp_path), picture()
    p = found["depth_anything_v2"]
    assert p.aliases == () and p.control_types == ("Depth",) and p.resolution.value == 512
    out = p.run(image, 64, -1, -1)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    net = depth_anything.load(path, 2)
    assert net.model.config.backbone_config.out_indices == [3, 6, 9, 12]
    padded, _ = common.resize_with_pad(image, 64)
    assert np.array_equal(out[:, :, 0], depth_anything.detect(net, padded)[:64, :80])
    v1 = depth_anything.load(path, 1)  # the same weights read as v1 (the last four blocks) give another map
    assert v1 is not net and not np.array_equal(depth_anything.detect(v1, padded), depth_anything.detect(net, padded))


def test_depth_anything_v2_takes_the_original_pth_too(tmp_path):
    write(tmp_path / "depth_anything_v2" / "depth_anything_v2_vitl.pth",
          random_weights(depth_anything_layout(**SMALL_DA2), seed=4))
    assert by_name(tmp_path)["depth_anything_v2"].run(picture(), 64, -1, -1).shape == (64, 80, 3)
    with pytest.raises(ControlNetError) as err:
        by_name(tmp_path / "empty")["depth_anything_v2"].run(picture(), 64, -1, -1)
    assert f"put depth_anything_v2_vitl.safetensors in {tmp_path / 'empty' / 'depth_anything_v2'}" in str(err.value)


# --- ZoeDepth -------------------------------------------------------------------------------------------------

def zoe_layout(dim: int = 1024, blocks: int = 24, heads: int = 16, window: int = 24, neck=(256, 512, 1024, 1024),
               features: int = 256, bins: int = 64, attractors=(16, 8, 4, 1)) -> dict:
    """ZoeD_M12_N.pt's "model": MiDaS v3.1 DPT_BEiT_L_384 under "core.core." (timm's beit_large_patch16_384:
    no absolute positions, per-block relative position tables and indices, q/v biases, layer scales gamma_1/2,
    the mean-pooling fc_norm and the ImageNet head), the four reassemble layers (readout projections, 1×1
    projections, ConvTranspose ×4 / ×2 and a stride-2 convolution), the decoder, then ZoeDepth's metric head
    (defaults: the published sizes)."""
    out: dict = {}
    b = "core.core.pretrained.model."
    out[f"{b}cls_token"] = (1, 1, dim)
    _conv(out, f"{b}patch_embed.proj", dim, 3, 16)
    rows = (2 * window - 1) ** 2 + 3
    for i in range(blocks):
        p = f"{b}blocks.{i}"
        out[f"{p}.gamma_1"], out[f"{p}.gamma_2"] = (dim,), (dim,)
        for norm in ("norm1", "norm2"):
            out[f"{p}.{norm}.weight"], out[f"{p}.{norm}.bias"] = (dim,), (dim,)
        out[f"{p}.attn.q_bias"], out[f"{p}.attn.v_bias"] = (dim,), (dim,)
        out[f"{p}.attn.relative_position_bias_table"] = (rows, heads)
        out[f"{p}.attn.relative_position_index"] = (window * window + 1, window * window + 1)
        out[f"{p}.attn.qkv.weight"] = (3 * dim, dim)
        out[f"{p}.attn.proj.weight"], out[f"{p}.attn.proj.bias"] = (dim, dim), (dim,)
        out[f"{p}.mlp.fc1.weight"], out[f"{p}.mlp.fc1.bias"] = (4 * dim, dim), (4 * dim,)
        out[f"{p}.mlp.fc2.weight"], out[f"{p}.mlp.fc2.bias"] = (dim, 4 * dim), (dim,)
    out[f"{b}fc_norm.weight"], out[f"{b}fc_norm.bias"] = (dim,), (dim,)
    out[f"{b}head.weight"], out[f"{b}head.bias"] = (1000, dim), (1000,)
    a = "core.core.pretrained.act_postprocess"
    for k, c in enumerate(neck, 1):
        out[f"{a}{k}.0.project.0.weight"], out[f"{a}{k}.0.project.0.bias"] = (dim, 2 * dim), (dim,)
        _conv(out, f"{a}{k}.3", c, dim, 1)
    out[f"{a}1.4.weight"], out[f"{a}1.4.bias"] = (neck[0], neck[0], 4, 4), (neck[0],)  # ConvTranspose: (in, out)
    out[f"{a}2.4.weight"], out[f"{a}2.4.bias"] = (neck[1], neck[1], 2, 2), (neck[1],)
    _conv(out, f"{a}4.4", neck[3], neck[3], 3)
    _dpt_decoder(out, "core.core.scratch.", neck, features)
    _conv(out, "conv2", features, features, 1)
    _conv(out, "seed_bin_regressor._net.0", 256, features, 1)
    _conv(out, "seed_bin_regressor._net.2", bins, 256, 1)
    _conv(out, "seed_projector._net.0", 128, features, 1)
    _conv(out, "seed_projector._net.2", 128, 128, 1)
    for i, n in enumerate(attractors):
        _conv(out, f"projectors.{i}._net.0", 128, features, 1)
        _conv(out, f"projectors.{i}._net.2", 128, 128, 1)
        _conv(out, f"attractors.{i}._net.0", 128, 128, 1)
        _conv(out, f"attractors.{i}._net.2", n, 128, 1)
    _conv(out, "conditional_log_binomial.mlp.0", (33 + 128) // 2, 33 + 128, 1)
    _conv(out, "conditional_log_binomial.mlp.2", 4, (33 + 128) // 2, 1)
    out["conditional_log_binomial.log_binomial_transform.k_idx"] = (1, bins, 1, 1)
    out["conditional_log_binomial.log_binomial_transform.K_minus_1"] = (1, 1, 1, 1)
    return out


SMALL_ZOE = {"dim": 64, "blocks": 4, "heads": 1, "neck": (16, 32, 64, 64), "features": 32}


def test_zoe_keys_convert_to_transformers_for_the_published_sizes():
    from transformers import ZoeDepthForDepthEstimation

    weights = {k: torch.empty(v, device="meta") for k, v in zoe_layout().items()}  # shapes only
    config = zoe.config_for(weights)
    beit = config.backbone_config
    assert beit.out_features == ["stage6", "stage12", "stage18", "stage24"] and beit.image_size == 384
    assert beit.num_attention_heads == 16 and config.num_attractors == [16, 8, 4, 1]
    assert config.bin_configurations[0]["n_bins"] == 64 and config.bin_centers_type == "softplus"
    with torch.device("meta"):
        reference = ZoeDepthForDepthEstimation(config).state_dict()
    converted = zoe.to_transformers(weights)
    assert set(converted) == set(reference)  # indices, k_idx, fc_norm and the ImageNet head dropped
    assert all(tuple(converted[k].shape) == tuple(reference[k].shape) for k in reference)


def _zoe_file(folder, seed: int = 7):
    layout = zoe_layout(**SMALL_ZOE)
    weights = random_weights(layout, seed=seed)
    weights["conditional_log_binomial.log_binomial_transform.k_idx"] = torch.arange(64).view(1, -1, 1, 1)
    weights["conditional_log_binomial.log_binomial_transform.K_minus_1"] = torch.tensor([63.0]).view(1, 1, 1, 1)
    return write(folder / "zoedepth" / "ZoeD_M12_N.pt", weights, wrap="model")


@pytest.mark.parametrize("h, w, expected", [(384, 512, (384, 512)), (64, 128, (256, 512)), (512, 512, (512, 512)),
                                            (512, 768, (384, 576)), (600, 500, (608, 512)), (96, 176, (288, 512)),
                                            (64, 2048, (32, 512))])
def test_zoe_network_size_is_midas_minimal_resize(h, w, expected):
    # both sides scale by the factor (384/h or 512/w) nearer 1, then round to a multiple of 32:
    # 64×128: 6 or 4 → 4; 512×512: 0.75 or 1 → 1; 512×768: 0.75 or 0.667 → 0.75 → 384×576;
    # 600×500: 0.64 or 1.024 → 1.024 → 614.4 → 608; 96×176: 4 or 2.91 → 279.3 → 288; 64×2048: 0.25 → 16 → 32 (the floor)
    assert zoe.net_size(h, w) == expected


def test_zoe_padding():
    assert zoe.padding(64, 128) == (16, 24)  # int(sqrt(32) × 3) = 16, int(sqrt(64) × 3) = 24
    assert zoe.padding(512, 704) == (48, 56)


def test_zoe_loads_and_runs_the_extensions_inference(tmp_path):
    path = _zoe_file(tmp_path)
    net = zoe.load(path)
    seen = []
    handle = net.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["pixel_values"]),
                                                 with_kwargs=True)
    image = picture()
    try:
        out = by_name(tmp_path)["depth_zoe"].run(image, 64, -1, -1)
    finally:
        handle.remove()
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    padded, _ = common.resize_with_pad(image, 64)  # 64×128
    # two passes (the picture and its mirror), each reflect-padded by 16 / 24 to 96×176, resized to 288×512
    assert [tuple(s.shape) for s in seen] == [(1, 3, 288, 512)] * 2
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255.0
    for got, source in zip(seen, (x, torch.flip(x, dims=[3]))):
        big = F.pad(source, [24, 24, 16, 16], mode="reflect")
        assert torch.allclose(got, (F.interpolate(big, (288, 512), mode="bilinear", align_corners=True) - 0.5) / 0.5,
                              atol=1e-6)
    with torch.no_grad():
        one = net.model(pixel_values=seen[0]).predicted_depth[:, None]
        two = net.model(pixel_values=seen[1]).predicted_depth[:, None]
    back = [F.interpolate(o, (96, 176), mode="bicubic", align_corners=False)[:, :, 16:-16, 24:-24] for o in (one, two)]
    depth = ((back[0] + torch.flip(back[1], dims=[3])) / 2)[0, 0].numpy()
    assert np.allclose(zoe.predict(net, padded), depth, atol=1e-5)
    assert np.array_equal(out[:, :, 0], zoe.depth_map(zoe.predict(net, padded))[:64, :80])


def test_zoe_depth_map_formula():
    depth = np.linspace(1.0, 5.0, 100, dtype=np.float32).reshape(10, 10)
    low, high = np.percentile(depth, 2), np.percentile(depth, 85)
    expected = ((1.0 - (depth - np.float32(low)) / np.float32(high - low)) * 255.0).clip(0, 255).astype(np.uint8)
    got = zoe.depth_map(depth)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1 and (got == expected).mean() > 0.95
    assert got[0, 0] == 255 and got[-1, -1] == 0  # near (small metric depth) is bright; beyond the 85th: 0
    assert np.array_equal(zoe.depth_map(np.full((4, 4), 2.0, np.float32)), np.zeros((4, 4), np.uint8))


def test_zoe_refuses_other_files(tmp_path):
    layout = zoe_layout(**SMALL_ZOE)
    layout["patch_transformer.embedding_convPxP.weight"] = (128, 32, 1, 1)
    write(tmp_path / "zoedepth" / "ZoeD_M12_N.pt", random_weights(layout), wrap="model")
    with pytest.raises(ModelFileError, match="ZoeD_M12_N.pt"):
        by_name(tmp_path)["depth_zoe"].run(picture(), 64, -1, -1)
    with pytest.raises(ControlNetError) as err:
        by_name(tmp_path / "empty")["depth_zoe"].run(picture(), 64, -1, -1)
    assert f"put ZoeD_M12_N.pt in {tmp_path / 'empty' / 'zoedepth'}" in str(err.value)
