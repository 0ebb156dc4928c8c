"""The weight-based ControlNet preprocessors: each network family loads a file written in the published layout
(key names and shapes as the extension's network code defines them, written out here independently of our
modules), runs through the extension's frame (resize, pad, crop), and its post-processing matches the
formulas; missing files say which file to put where.
"""

from __future__ import annotations

import colorsys
import math
import os
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import annotators
from sdstudio.engine.annotators import (
    common,
    depth_anything,
    hed,
    leres,
    lineart,
    mlsd,
    normalbae,
    openpose,
    pidinet,
)
from sdstudio.models.errors import ModelFileError

torch.set_num_threads(1)


# --- published layouts (from the extension's network definitions) -------------------------------------------

def _conv(out: dict, name: str, cout: int, cin: int, k: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (cout, cin, k, k)
    if bias:
        out[f"{name}.bias"] = (cout,)


def _bn(out: dict, name: str, c: int) -> None:
    for p in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{p}"] = (c,)
    out[f"{name}.num_batches_tracked"] = ()


def hed_layout() -> dict:
    out = {"norm": (1, 3, 1, 1)}
    for i, (cin, cout, n) in enumerate([(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)], 1):
        for j in range(n):
            _conv(out, f"block{i}.convs.{j}", cout, cin if j == 0 else cout, 3)
        _conv(out, f"block{i}.projection", 1, cout, 1)
    return out


def pidinet_layout() -> dict:
    out = {"init_block.weight": (60, 3, 3, 3)}
    plan = [(1, 3, 60, 60), (2, 4, 60, 120), (3, 4, 120, 240), (4, 4, 240, 240)]
    for stage, blocks, cin, cout in plan:
        for b in range(1, blocks + 1):
            name = f"block{stage}_{b}"
            c = cin if b == 1 else cout
            if stage > 1 and b == 1:
                _conv(out, f"{name}.shortcut", cout, cin, 1)
            out[f"{name}.conv1.weight"] = (c, 1, 3, 3)
            out[f"{name}.conv2.weight"] = (cout, c, 1, 1)
    for i, c in enumerate((60, 120, 240, 240)):
        _conv(out, f"dilations.{i}.conv1", 24, c, 1)
        for j in range(1, 5):
            _conv(out, f"dilations.{i}.conv2_{j}", 24, 24, 3, bias=False)
        _conv(out, f"attentions.{i}.conv1", 4, 24, 1)
        _conv(out, f"attentions.{i}.conv2", 1, 4, 3, bias=False)
        _conv(out, f"conv_reduces.{i}.conv", 1, 24, 1)
    _conv(out, "classifier", 1, 4, 1)
    return out


def sk_layout() -> dict:
    out: dict = {}
    _conv(out, "model0.1", 64, 3, 7)
    _conv(out, "model1.0", 128, 64, 3)
    _conv(out, "model1.3", 256, 128, 3)
    for i in range(3):
        _conv(out, f"model2.{i}.conv_block.1", 256, 256, 3)
        _conv(out, f"model2.{i}.conv_block.5", 256, 256, 3)
    out["model3.0.weight"], out["model3.0.bias"] = (256, 128, 3, 3), (128,)  # transposed: (in, out, k, k)
    out["model3.3.weight"], out["model3.3.bias"] = (128, 64, 3, 3), (64,)
    _conv(out, "model4.1", 1, 64, 7)
    return out


def netg_layout() -> dict:
    """pix2pix unet_256 (8 levels, ngf 64, instance norm without parameters, so every convolution has a bias)."""
    levels = [(1, 64, 3), (64, 128, None), (128, 256, None), (256, 512, None)] + [(512, 512, None)] * 4
    out: dict = {}
    prefix = "model"
    for depth, (outer, inner, cin) in enumerate(levels):
        cin = outer if cin is None else cin
        innermost, outermost = depth == len(levels) - 1, depth == 0
        down, up, sub = (0, 3, 1) if outermost else (1, 3, None) if innermost else (1, 5, 3)
        out[f"{prefix}.model.{down}.weight"], out[f"{prefix}.model.{down}.bias"] = (inner, cin, 4, 4), (inner,)
        up_in = inner if innermost else inner * 2
        out[f"{prefix}.model.{up}.weight"], out[f"{prefix}.model.{up}.bias"] = (up_in, outer, 4, 4), (outer,)
        if sub is not None:
            prefix = f"{prefix}.model.{sub}"
    return out


_VGG = [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
        ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
        ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3)]


def body_layout() -> dict:
    out: dict = {}
    for name, cin, cout, k in _VGG + [("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3)]:
        _conv(out, name, cout, cin, k)
    for b, c in ((1, 38), (2, 19)):
        for i in (1, 2, 3):
            _conv(out, f"conv5_{i}_CPM_L{b}", 128, 128, 3)
        _conv(out, f"conv5_4_CPM_L{b}", 512, 128, 1)
        _conv(out, f"conv5_5_CPM_L{b}", c, 512, 1)
        for s in range(2, 7):
            _conv(out, f"Mconv1_stage{s}_L{b}", 128, 185, 7)
            for i in range(2, 6):
                _conv(out, f"Mconv{i}_stage{s}_L{b}", 128, 128, 7)
            _conv(out, f"Mconv6_stage{s}_L{b}", 128, 128, 1)
            _conv(out, f"Mconv7_stage{s}_L{b}", c, 128, 1)
    return out


def hand_layout(outputs: int = 22) -> dict:
    out: dict = {}
    front = _VGG + [("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3), ("conv5_1", 512, 512, 3),
                    ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3)]
    for name, cin, cout, k in front:
        _conv(out, name, cout, cin, k)
    _conv(out, "conv6_1_CPM", 512, 128, 1)
    _conv(out, "conv6_2_CPM", outputs, 512, 1)
    for s in range(2, 7):
        _conv(out, f"Mconv1_stage{s}", 128, 128 + outputs, 7)
        for i in range(2, 6):
            _conv(out, f"Mconv{i}_stage{s}", 128, 128, 7)
        _conv(out, f"Mconv6_stage{s}", 128, 128, 1)
        _conv(out, f"Mconv7_stage{s}", outputs, 128, 1)
    return out


def mlsd_layout() -> dict:
    out: dict = {}
    _conv(out, "backbone.features.0.0", 32, 4, 3, bias=False)
    _bn(out, "backbone.features.0.1", 32)
    cin, i = 32, 1
    for t, c, n, _s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]:
        for _ in range(n):
            p, hid, j = f"backbone.features.{i}.conv", cin * t, 0
            if t != 1:
                _conv(out, f"{p}.0.0", hid, cin, 1, bias=False)
                _bn(out, f"{p}.0.1", hid)
                j = 1
            out[f"{p}.{j}.0.weight"] = (hid, 1, 3, 3)
            _bn(out, f"{p}.{j}.1", hid)
            _conv(out, f"{p}.{j + 1}", c, hid, 1, bias=False)
            _bn(out, f"{p}.{j + 2}", c)
            cin, i = c, i + 1
    for name, (skip, deep) in {"block15": (64, 96), "block17": (32, 64), "block19": (24, 64),
                               "block21": (16, 64)}.items():
        _conv(out, f"{name}.conv1.0", 64, deep, 1)
        _bn(out, f"{name}.conv1.1", 64)
        _conv(out, f"{name}.conv2.0", 64, skip, 1)
        _bn(out, f"{name}.conv2.1", 64)
    for name in ("block16", "block18", "block20", "block22"):
        _conv(out, f"{name}.conv1.0", 128, 128, 3)
        _bn(out, f"{name}.conv1.1", 128)
        _conv(out, f"{name}.conv2.0", 64, 128, 3)
        _bn(out, f"{name}.conv2.1", 64)
    for j in (1, 2):
        _conv(out, f"block23.conv{j}.0", 64, 64, 3)
        _bn(out, f"block23.conv{j}.1", 64)
    _conv(out, "block23.conv3", 16, 64, 1)
    return out


def leres_layout() -> dict:
    """AdelaiDepth's RelDepthModel: ResNeXt-101 32×8d encoder (torchvision's layout) and the FTB/FFM/AO decoder."""
    out: dict = {}
    enc = "depth_model.encoder_modules.encoder"
    _conv(out, f"{enc}.conv1", 64, 3, 7, bias=False)
    _bn(out, f"{enc}.bn1", 64)
    cin = 64
    for i, (blocks, planes) in enumerate(zip((3, 4, 23, 3), (64, 128, 256, 512)), 1):
        width = planes * 4  # int(planes * 8 / 64) * 32
        for b in range(blocks):
            p = f"{enc}.layer{i}.{b}"
            _conv(out, f"{p}.conv1", width, cin, 1, bias=False)
            _bn(out, f"{p}.bn1", width)
            out[f"{p}.conv2.weight"] = (width, width // 32, 3, 3)  # 32 groups
            _bn(out, f"{p}.bn2", width)
            _conv(out, f"{p}.conv3", planes * 4, width, 1, bias=False)
            _bn(out, f"{p}.bn3", planes * 4)
            if b == 0:
                _conv(out, f"{p}.downsample.0", planes * 4, cin, 1, bias=False)
                _bn(out, f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    dec = "depth_model.decoder_modules"

    def ftb(name: str, cin: int, mid: int) -> None:
        _conv(out, f"{name}.conv1", mid, cin, 3)
        _conv(out, f"{name}.conv_branch.1", mid, mid, 3)
        _bn(out, f"{name}.conv_branch.2", mid)
        _conv(out, f"{name}.conv_branch.4", mid, mid, 3)

    ftb(f"{dec}.conv", 2048, 512)
    _conv(out, f"{dec}.conv1", 256, 512, 3)
    for name, c in (("ffm2", 1024), ("ffm1", 512), ("ffm0", 256)):
        ftb(f"{dec}.{name}.ftb1", c, 256)
        ftb(f"{dec}.{name}.ftb2", 256, 256)
    _conv(out, f"{dec}.outconv.adapt_conv.0", 128, 256, 3)
    _bn(out, f"{dec}.outconv.adapt_conv.1", 128)
    _conv(out, f"{dec}.outconv.adapt_conv.3", 1, 128, 3)
    return out


def dpt_refinenets(out: dict, prefix: str, neck, features: int) -> None:
    """A DPT decoder's scratch as MiDaS and Depth Anything publish it: layerN_rn (no bias) and four
    refinenets (out_conv, two residual units)."""
    for i, c in enumerate(neck, 1):
        out[f"{prefix}layer{i}_rn.weight"] = (features, c, 3, 3)
    for i in range(1, 5):
        r = f"{prefix}refinenet{i}"
        _conv(out, f"{r}.out_conv", features, features, 1)
        for unit in ("resConfUnit1", "resConfUnit2"):
            _conv(out, f"{r}.{unit}.conv1", features, features, 3)
            _conv(out, f"{r}.{unit}.conv2", features, features, 3)


def depth_anything_layout(dim: int = 1024, blocks: int = 24, neck=(256, 512, 1024, 1024), features: int = 256) -> dict:
    """depth_anything_vitl14.pth: DINOv2 (torch hub names) under "pretrained.", the DPT head under "depth_head."
    (defaults: the published ViT-L sizes)."""
    out: dict = {"pretrained.cls_token": (1, 1, dim), "pretrained.pos_embed": (1, 1 + 37 * 37, dim),
                 "pretrained.mask_token": (1, dim), "pretrained.patch_embed.proj.weight": (dim, 3, 14, 14),
                 "pretrained.patch_embed.proj.bias": (dim,)}
    for b in range(blocks):
        p = f"pretrained.blocks.{b}"
        for name, shape in (("norm1", (dim,)), ("norm2", (dim,))):
            out[f"{p}.{name}.weight"], out[f"{p}.{name}.bias"] = shape, shape
        out[f"{p}.attn.qkv.weight"], out[f"{p}.attn.qkv.bias"] = (3 * dim, dim), (3 * dim,)
        out[f"{p}.attn.proj.weight"], out[f"{p}.attn.proj.bias"] = (dim, dim), (dim,)
        out[f"{p}.ls1.gamma"], out[f"{p}.ls2.gamma"] = (dim,), (dim,)
        out[f"{p}.mlp.fc1.weight"], out[f"{p}.mlp.fc1.bias"] = (4 * dim, dim), (4 * dim,)
        out[f"{p}.mlp.fc2.weight"], out[f"{p}.mlp.fc2.bias"] = (dim, 4 * dim), (dim,)
    out["pretrained.norm.weight"], out["pretrained.norm.bias"] = (dim,), (dim,)
    h = "depth_head"
    for i, c in enumerate(neck):
        _conv(out, f"{h}.projects.{i}", c, dim, 1)
    out[f"{h}.resize_layers.0.weight"], out[f"{h}.resize_layers.0.bias"] = (neck[0], neck[0], 4, 4), (neck[0],)
    out[f"{h}.resize_layers.1.weight"], out[f"{h}.resize_layers.1.bias"] = (neck[1], neck[1], 2, 2), (neck[1],)
    _conv(out, f"{h}.resize_layers.3", neck[3], neck[3], 3)
    dpt_refinenets(out, f"{h}.scratch.", neck, features)
    _conv(out, f"{h}.scratch.output_conv1", features // 2, features, 3)
    _conv(out, f"{h}.scratch.output_conv2.0", 32, features // 2, 3)
    _conv(out, f"{h}.scratch.output_conv2.2", 1, 32, 1)
    return out


# EfficientNet-B5 (channel ×1.6, depth ×2.2): repeats, channels, depthwise kernel, expansion per stage
_B5 = [(3, 24, 3, 1), (5, 40, 3, 6), (5, 64, 5, 6), (7, 128, 3, 6), (7, 176, 5, 6), (9, 304, 5, 6), (3, 512, 3, 6)]


def normalbae_layout() -> dict:
    """scannet.pt's "model": geffnet's tf_efficientnet_b5_ap under encoder.original_model (squeeze-excite reduced
    from the block's input: a quarter, rounded), and the decoder."""
    out: dict = {}
    e = "encoder.original_model"
    _conv(out, f"{e}.conv_stem", 48, 3, 3, bias=False)
    _bn(out, f"{e}.bn1", 48)
    cin = 48
    for s, (repeats, cout, k, expansion) in enumerate(_B5):
        for i in range(repeats):
            p, reduced, mid = f"{e}.blocks.{s}.{i}", max(1, int(cin * 0.25 + 0.5)), cin * expansion
            if expansion == 1:  # depthwise-separable
                out[f"{p}.conv_dw.weight"] = (cin, 1, k, k)
                _bn(out, f"{p}.bn1", cin)
                _conv(out, f"{p}.conv_pw", cout, cin, 1, bias=False)
                _bn(out, f"{p}.bn2", cout)
            else:
                _conv(out, f"{p}.conv_pw", mid, cin, 1, bias=False)
                _bn(out, f"{p}.bn1", mid)
                out[f"{p}.conv_dw.weight"] = (mid, 1, k, k)
                _bn(out, f"{p}.bn2", mid)
                _conv(out, f"{p}.conv_pwl", cout, mid, 1, bias=False)
                _bn(out, f"{p}.bn3", cout)
            _conv(out, f"{p}.se.conv_reduce", reduced, mid, 1)
            _conv(out, f"{p}.se.conv_expand", mid, reduced, 1)
            cin = cout
    _conv(out, f"{e}.conv_head", 2048, 512, 1, bias=False)
    _bn(out, f"{e}.bn2", 2048)
    _conv(out, "decoder.conv2", 2048, 2048, 1)
    for name, (cin, cout) in {"up1": (2048 + 176, 1024), "up2": (1024 + 64, 512), "up3": (512 + 40, 256),
                              "up4": (256 + 24, 128)}.items():
        _conv(out, f"decoder.{name}._net.0", cout, cin, 3)
        _bn(out, f"decoder.{name}._net.1", cout)
        _conv(out, f"decoder.{name}._net.3", cout, cout, 3)
        _bn(out, f"decoder.{name}._net.4", cout)
    _conv(out, "decoder.out_conv_res8", 4, 512, 3)
    for name, cin in (("out_conv_res4", 516), ("out_conv_res2", 260), ("out_conv_res1", 132)):
        for j, (a, b) in zip((0, 2, 4, 6), ((cin, 128), (128, 128), (128, 128), (128, 4))):
            out[f"decoder.{name}.{j}.weight"], out[f"decoder.{name}.{j}.bias"] = (b, a, 1), (b,)
    return out


def random_weights(layout: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Finite random tensors of the layout's shapes (fan-in scaled, so deep stacks neither vanish nor blow up)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            out[key] = (torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))).to(dtype)
        else:
            out[key] = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    return out


def write(path: Path, tensors: dict, wrap: str | None = None, prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {prefix + k: v for k, v in tensors.items()}
    torch.save({"epoch": 10, wrap: data} if wrap else data, path)
    return path


@pytest.fixture(autouse=True)
def fresh_annotator_cache():
    """Every test loads its networks afresh (the other annotator test files import this autouse fixture)."""
    common.clear_cache()
    yield
    common.clear_cache()


def picture(h: int = 80, w: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.zeros((h, w, 3), np.uint8)
    cv2.rectangle(base, (w // 5, h // 5), (w // 2, h // 2), (250, 40, 40), -1)
    cv2.circle(base, (3 * w // 4, 2 * h // 3), h // 6, (30, 200, 90), -1)
    return np.clip(base.astype(int) + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)


def by_name(folder: Path) -> dict:
    return {p.name: p for p in annotators.preprocessors(folder)}


# --- declarations -------------------------------------------------------------------------------------------

EXPECTED = {  # module name: (UI label, control types) as the extension declares them
    "hed": ("softedge_hed", ("SoftEdge",)), "hed_safe": ("softedge_hedsafe", ("SoftEdge",)),
    "scribble_hed": ("scribble_hed", ("Scribble", "SparseCtrl")), "pidinet": ("softedge_pidinet", ("SoftEdge",)),
    "pidinet_safe": ("softedge_pidisafe", ("SoftEdge",)),
    "pidinet_scribble": ("scribble_pidinet", ("Scribble", "SparseCtrl")),
    "pidinet_sketch": ("t2ia_sketch_pidi", ("T2I-Adapter",)), "lineart": ("lineart_realistic", ("Lineart",)),
    "lineart_coarse": ("lineart_coarse", ("Lineart",)), "lineart_anime": ("lineart_anime", ("Lineart",)),
    "openpose": ("openpose", ("OpenPose",)), "openpose_hand": ("openpose_hand", ("OpenPose",)),
    "openpose_face": ("openpose_face", ("OpenPose",)), "openpose_faceonly": ("openpose_faceonly", ("OpenPose",)),
    "openpose_full": ("openpose_full", ("OpenPose",)), "mlsd": ("mlsd", ("MLSD",)),
    "depth_leres": ("depth_leres", ("Depth",)), "depth_anything": ("depth_anything", ("Depth",)),
    "normal_bae": ("normal_bae", ("NormalMap",)),
    "depth": ("depth_midas", ("Depth",)), "normal_map": ("normal_midas", ("NormalMap",)),  # test_annotators_depth
    "depth_anything_v2": ("depth_anything_v2", ("Depth",)), "depth_zoe": ("depth_zoe", ("Depth",)),
    "dw_openpose_full": ("dw_openpose_full", ("OpenPose",)),  # test_annotators_dwpose
    "anime_face_segment": ("seg_anime_face", ("Segmentation",)),  # test_annotators_segment
    "softedge_teed": ("softedge_teed", ("SoftEdge",)),  # test_annotators_teed
    "softedge_anyline": ("softedge_anyline", ("SoftEdge",)),
    "inpaint_only+lama": ("inpaint_only+lama", ("Inpaint",)),  # test_annotators_lama
    "depth_leres++": ("depth_leres++", ("Depth",)),  # test_annotators_leres_boost
    "instant_id_face_keypoints": ("instant_id_face_keypoints", ("Instant-ID",)),  # test_faceid
    "normal_dsine": ("normal_dsine", ("NormalMap",)),  # test_annotators_dsine
    "densepose": ("densepose (pruple bg & purple torso)", ("OpenPose",)),  # test_annotators_densepose
    "densepose_parula": ("densepose_parula (black bg & blue torso)", ("OpenPose",)),
    "segmentation": ("seg_ufade20k", ("Segmentation",)),  # test_annotators_uniformer
    "mobile_sam": ("mobile_sam", ("Segmentation",)),  # test_annotators_mobile_sam
    "oneformer_ade20k": ("seg_ofade20k", ("Segmentation",)),  # test_annotators_oneformer
    "oneformer_coco": ("seg_ofcoco", ("Segmentation",)),
    "facexlib": ("facexlib", ()),  # test_annotators_face_parsing (PuLID's face features)
    "mediapipe_face": ("mediapipe_face", ()),  # test_annotators_mediapipe
}


def test_declarations_are_the_extensions_and_cost_nothing(tmp_path):
    found = by_name(tmp_path / "nothing-here")  # no folder, no files: declaring reads nothing
    assert set(found) == set(EXPECTED)
    for name, (label, kinds) in EXPECTED.items():
        p = found[name]
        assert p.aliases == (() if label == name else (label,))
        assert p.control_types == kinds
        start = 1280 if name == "softedge_anyline" else 512  # the extension's Anyline starts higher
        if name == "inpaint_only+lama":  # LaMa runs at 256 whatever the unit says: no slider
            assert p.resolution is None and p.needs_mask
        elif name in ("instant_id_face_keypoints", "oneformer_ade20k", "oneformer_coco", "facexlib"):  # no slider, as the
            assert p.resolution is None  # extension's (InstantID at 512 always, OneFormer framed at 512)
        else:
            assert p.resolution.detail() == {"name": "Resolution", "value": start, "min": 64, "max": 2048, "step": 8}
        assert not p.model_free and callable(p.run)
    assert [s.detail() for s in found["mlsd"].sliders()][1:] == [
        {"name": "MLSD Value Threshold", "value": 0.1, "min": 0.01, "max": 2.0, "step": 0.01},
        {"name": "MLSD Distance Threshold", "value": 0.1, "min": 0.01, "max": 20.0, "step": 0.01}]
    assert [s.detail() for s in found["depth_leres"].sliders()][1:] == [
        {"name": "Remove Near %", "value": 0, "min": 0, "max": 100, "step": 0.1},
        {"name": "Remove Background %", "value": 0, "min": 0, "max": 100, "step": 0.1}]
    assert annotators.preprocessors(None)[0].name == "hed"  # the default folder


@pytest.mark.parametrize("name, file, sub", [("hed", "ControlNetHED.pth", "hed"),
                                             ("pidinet_scribble", "table5_pidinet.pth", "pidinet"),
                                             ("lineart", "sk_model.pth", "lineart"),
                                             ("lineart_coarse", "sk_model2.pth", "lineart"),
                                             ("lineart_anime", "netG.pth", "lineart_anime"),
                                             ("openpose", "body_pose_model.pth", "openpose"),
                                             ("mlsd", "mlsd_large_512_fp32.pth", "mlsd"),
                                             ("depth_leres", "res101.pth", "leres"),
                                             ("depth_anything", "depth_anything_vitl14.pth", "depth_anything"),
                                             ("normal_bae", "scannet.pt", "normal_bae")])
def test_missing_file_names_the_file_and_the_folder(tmp_path, name, file, sub):
    with pytest.raises(ControlNetError) as err:
        by_name(tmp_path)[name].run(picture(), 64, -1, -1)
    message = str(err.value)
    assert f"put {file} in {tmp_path / sub}" in message and str(tmp_path) in message


def test_openpose_hand_and_face_files_are_asked_for_only_by_the_modules_that_use_them(tmp_path):
    write(tmp_path / "openpose" / "body_pose_model.pth", random_weights(body_layout(), dtype=torch.float16))
    found = by_name(tmp_path)
    assert found["openpose"].run(picture(), 64, -1, -1).shape == (64, 80, 3)
    with pytest.raises(ControlNetError, match=r"put hand_pose_model\.pth in .*openpose"):
        found["openpose_hand"].run(picture(), 64, -1, -1)
    with pytest.raises(ControlNetError, match=r"put facenet\.pth in .*openpose"):
        found["openpose_face"].run(picture(), 64, -1, -1)


# --- shared formulas ----------------------------------------------------------------------------------------

def test_safe_step_quantizes_to_three_levels():
    x = np.array([0.0, 0.2, 0.33, 0.34, 0.5, 0.66, 0.67, 0.9, 1.0])
    # ×3, truncated, /2: [0, 1/3) → 0, [1/3, 2/3) → 0.5, [2/3, 1) → 1, 1 → 1.5
    assert common.safe_step(x).tolist() == [0, 0, 0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.5]
    assert common.to_uint8(common.safe_step(x)).tolist() == [0, 0, 0, 127, 127, 127, 255, 255, 255]


def test_nms_keeps_pixels_that_peak_along_some_direction_above_the_threshold():
    # (σ 0.3 here so the unit's rule shows; the scribble preprocessors blur with σ 3 first)
    i, j = np.mgrid[0:20, 0:20]
    ramp = (100 + 4 * i + 3 * j).astype(np.uint8)  # every pixel has a bigger neighbour in all four directions
    assert (ramp > 127).mean() > 0.5 and not common.nms(ramp, 127, 0.3)[2:-2, 2:-2].any()
    ridge = np.zeros((20, 30), np.uint8)
    ridge[10, :] = 200  # a horizontal crest: a maximum along the vertical
    ridge[15, :] = 120  # under the threshold
    thin = common.nms(ridge, 127, 0.3)
    assert set(np.nonzero(thin[:, 3:-3].any(1))[0]) == {10}
    assert set(np.unique(thin)) == {0, 255}


def test_scribble_strokes_from_a_soft_edge_band():
    # a 7 px band at 255: blurred (σ 3) it is over 127 out to 3 px from its middle (140 there, 109 at 4 px), so
    # NMS keeps those 7 columns (a straight band peaks along its own direction everywhere); blurred again it
    # stays over 4 out to 9 px (8.3 there, 3.8 at 10): a 19 px stroke
    edge = np.zeros((60, 60), np.uint8)
    edge[:, 27:34] = 255
    assert np.nonzero(common.nms(edge, 127, 3.0)[30])[0].tolist() == list(range(27, 34))
    out = common.scribble(edge)
    assert set(np.unique(out)) == {0, 255}
    assert np.nonzero(out[30])[0].tolist() == list(range(21, 40))
    faint = np.zeros((60, 60), np.uint8)
    faint[:, 30] = 255  # a 1 px line blurs to 34 at most: under 127, no stroke
    assert not common.scribble(faint).any()


def test_the_frame_is_the_weight_free_preprocessors_one():
    from sdstudio.engine import preprocessors

    assert common.resize_with_pad is preprocessors.resize_with_pad and common.hwc3 is preprocessors.hwc3
    with pytest.raises(ControlNetError, match="softedge_hed"):
        by_name(Path("."))["hed"].run(np.zeros((4, 4), np.float32), 64, -1, -1)


# --- HED ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("logits, soft, safe", [
    ((2.0, 0.0, 1.0, -1.0, 3.0), 186, 255),  # mean 1: sigmoid 0.731 → 186; ×3 = 2.19 → 2 → 1.0 → 255
    ((0.0, 0.0, 0.0, 0.0, 0.0), 127, 127),  # 0.5 → 127.5 truncated; ×3 = 1.5 → 1 → 0.5 → 127
    ((-3.0, 1.0, -1.0, -2.0, 0.0), 68, 0),  # mean -1: 0.269 → 68; ×3 = 0.81 → 0
])
def test_hed_soft_edge_formula(logits, soft, safe):
    # the five side outputs come at 1, 1/2, 1/4, 1/8, 1/16 of the size: resized, averaged, sigmoid
    maps = [np.full((16 >> i, 20 >> i), v) for i, v in enumerate(logits)]
    assert int(255 / (1 + math.exp(-np.mean(logits)))) == soft
    out = hed.soft_edges(maps)
    assert out.shape == (16, 20) and (out == soft).all()
    assert (hed.soft_edges(maps, safe_steps=2) == safe).all()


def test_hed_loads_the_published_layout_and_runs(tmp_path):
    weights = random_weights(hed_layout(), dtype=torch.float16)  # the published file is half precision
    write(tmp_path / "hed" / "ControlNetHED.pth", weights)
    found = by_name(tmp_path)
    image = picture()
    out = found["hed"].run(image, 64, -1, -1)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 0] == out[:, :, 2]).all()
    # the same map computed by hand: our network on the padded picture, cropped
    padded, crop = common.resize_with_pad(image, 64)
    net = hed.load(tmp_path / "hed" / "ControlNetHED.pth")
    assert net is hed.load(tmp_path / "hed" / "ControlNetHED.pth")  # loaded once
    assert (crop(hed.detect(net, padded)) == out[:, :, 0]).all()
    safe = found["hed_safe"].run(image, 64, -1, -1)[:, :, 0]
    assert set(np.unique(safe)) <= {0, 127, 255}
    soft = out[:, :, 0].astype(int)
    assert ((soft >= 171) <= (safe == 255)).all()  # 171/255 > 2/3: the top level
    strokes = found["scribble_hed"].run(image, 64, -1, -1)[:, :, 0]
    assert set(np.unique(strokes)) <= {0, 255}
    assert (strokes == common.scribble(out[:, :, 0])).all()


def test_files_may_sit_directly_in_the_folder_and_a_replaced_file_is_read_again(tmp_path):
    path = write(tmp_path / "ControlNetHED.pth", random_weights(hed_layout(), seed=1))
    run = by_name(tmp_path)["hed"].run
    first = run(picture(), 64, -1, -1)
    write(path, random_weights(hed_layout(), seed=2))
    os.utime(path, ns=(1, 1))  # a different modification time, as a copy over it would have
    assert not (run(picture(), 64, -1, -1) == first).all()


def test_a_file_of_another_network_is_refused_naming_it(tmp_path):
    weights = random_weights(hed_layout())
    del weights["block3.convs.2.weight"]
    write(tmp_path / "hed" / "ControlNetHED.pth", weights)
    with pytest.raises(ModelFileError, match=r"ControlNetHED\.pth: .*missing: block3\.convs\.2\.weight"):
        by_name(tmp_path)["hed"].run(picture(), 64, -1, -1)


# --- PiDiNet --------------------------------------------------------------------------------------------------

def _patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """N×C×H×W → N×C×H×W×k² neighbourhoods (zero padded), row-major."""
    cols = F.unfold(x, k, padding=k // 2)
    n, c, h, w = x.shape
    return cols.reshape(n, c, k * k, h, w).permute(0, 1, 3, 4, 2)


def test_pixel_difference_kernels_match_the_operator_definitions():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 9, 11, generator=g, dtype=torch.float64)
    w = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64)
    p3, p5, wf = _patches(x, 3)[0, 0], _patches(x, 5)[0, 0], w.flatten()
    # central: Σ w_k (x_k - x_centre)
    cd = (p3 * wf).sum(-1) - wf.sum() * p3[..., 4]
    # angular: Σ w_k x_k minus the same weights read one step clockwise (tap k paired with tap cw[k])
    cw = [3, 0, 1, 6, 4, 2, 7, 8, 5]
    ad = sum(wf[k] * p3[..., k] - wf[cw[k]] * p3[..., k] for k in range(9))
    # radial: the 8 outer taps w_1..w_8 read at distance 2 minus at distance 1 along the same rays
    outer, inner = [0, 2, 4, 10, 14, 20, 22, 24], [6, 7, 8, 11, 13, 16, 17, 18]
    rd = sum(wf[i + 1] * (p5[..., outer[i]] - p5[..., inner[i]]) for i in range(8))
    for op, expected in (("cd", cd), ("ad", ad), ("rd", rd), ("cv", (p3 * wf).sum(-1))):
        kernel = pidinet.pdc_kernel(op, w)
        got = F.conv2d(x, kernel, padding=kernel.shape[-1] // 2)[0, 0]
        assert torch.allclose(got, expected), op


def test_pidinet_loads_the_published_checkpoint_and_runs(tmp_path):
    # table5_pidinet.pth is a training checkpoint: {"epoch", "state_dict"} with DataParallel's "module." prefix
    write(tmp_path / "pidinet" / "table5_pidinet.pth", random_weights(pidinet_layout()), wrap="state_dict",
          prefix="module.")
    found, image = by_name(tmp_path), picture()
    soft = found["pidinet"].run(image, 64, -1, -1)
    assert soft.shape == (64, 80, 3)
    padded, crop = common.resize_with_pad(image, 64)
    net = pidinet.load(tmp_path / "pidinet" / "table5_pidinet.pth")
    with torch.no_grad():  # the network reads BGR in [0, 1]
        bgr = torch.from_numpy(padded[:, :, ::-1] / 255.0).float().permute(2, 0, 1)[None]
        prob = net(bgr)[0, 0].numpy()
    assert (crop(common.to_uint8(prob)) == soft[:, :, 0]).all()
    safe = found["pidinet_safe"].run(image, 64, -1, -1)[:, :, 0]
    assert (safe == crop(common.to_uint8(common.safe_step(prob)))).all()
    sketch = found["pidinet_sketch"].run(image, 64, -1, -1)[:, :, 0]
    assert (sketch == crop(np.where(prob > 0.5, 255, 0))).all()
    scribble = found["pidinet_scribble"].run(image, 64, -1, -1)[:, :, 0]
    assert (scribble == common.scribble(soft[:, :, 0])).all()


# --- line art -------------------------------------------------------------------------------------------------

def test_lineart_generators_load_and_invert(tmp_path):
    write(tmp_path / "lineart" / "sk_model.pth", random_weights(sk_layout(), seed=1))
    write(tmp_path / "lineart" / "sk_model2.pth", random_weights(sk_layout(), seed=2))
    found, image = by_name(tmp_path), picture()
    padded, crop = common.resize_with_pad(image, 64)
    for name, file in (("lineart", "sk_model.pth"), ("lineart_coarse", "sk_model2.pth")):
        out = found[name].run(image, 64, -1, -1)
        assert out.shape == (64, 80, 3)
        raw = lineart.lines(lineart.load_generator(tmp_path / "lineart" / file), padded)
        assert (out[:, :, 0] == 255 - crop(raw)).all()  # the extension inverts the generator's output
    assert not (found["lineart"].run(image, 64, -1, -1) == found["lineart_coarse"].run(image, 64, -1, -1)).all()


def test_lineart_anime_loads_netg_and_runs_at_multiples_of_256(tmp_path):
    write(tmp_path / "lineart_anime" / "netG.pth", random_weights(netg_layout(), dtype=torch.float16),
          prefix="module.")
    net = lineart.load_anime(tmp_path / "lineart_anime" / "netG.pth")
    seen = []
    handle = net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        out = by_name(tmp_path)["lineart_anime"].run(picture(60, 70), 64, -1, -1)
    finally:
        handle.remove()
    assert out.shape == (64, 75, 3) and out.dtype == np.uint8  # 60×70 → 64×75
    assert seen == [(1, 3, 256, 256)]  # 64×128 padded → 256×256


# --- OpenPose ---------------------------------------------------------------------------------------------------

def test_openpose_networks_load_the_published_layouts(tmp_path):
    write(tmp_path / "hand_pose_model.pth", random_weights(hand_layout(22), dtype=torch.float16))
    write(tmp_path / "facenet.pth", random_weights(hand_layout(71), dtype=torch.float16))
    hand = openpose.load_hand(tmp_path / "hand_pose_model.pth")
    face = openpose.load_face(tmp_path / "facenet.pth")
    with torch.no_grad():
        assert hand(torch.zeros(1, 3, 48, 40)).shape == (1, 22, 6, 5)
        assert face(torch.zeros(1, 3, 48, 40)).shape == (1, 71, 6, 5)


def test_body_network_keeps_the_relu_on_its_last_heatmaps(tmp_path):
    weights = random_weights(body_layout(), dtype=torch.float16)
    weights["Mconv7_stage6_L2.bias"] = torch.full((19,), -5.0, dtype=torch.float16)  # pushes heatmaps below 0
    weights["Mconv7_stage6_L1.bias"] = torch.full((38,), -5.0, dtype=torch.float16)
    write(tmp_path / "body_pose_model.pth", weights)
    net = openpose.load_body(tmp_path / "body_pose_model.pth")
    with torch.no_grad():
        paf, heat = net(torch.randn(1, 3, 32, 40))
    assert paf.shape == (1, 38, 4, 5) and heat.shape == (1, 19, 4, 5)
    assert heat.min() >= 0 and paf.min() < 0  # L2 of stage 6 is ReLU'd in the extension's network, L1 not


PERSON = [(50, 20), (50, 34), (38, 34), (34, 50), (32, 64), (62, 34), (66, 50), (68, 64), (42, 64), (42, 84),
          (42, 102), (58, 64), (58, 84), (58, 102), (47, 17), (53, 17), (44, 19), (56, 19)]  # 18 COCO points (x, y)


def synthetic_maps(h: int, w: int, points: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps with a σ-2 bump at each keypoint and PAFs holding the unit vector along each limb near it."""
    ys, xs = np.mgrid[0:h, 0:w]
    heat = np.zeros((h, w, 19))
    for i, (x, y) in enumerate(points):
        heat[:, :, i] = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 8.0)
    paf = np.zeros((h, w, 38))
    for (a, b), (cx, cy) in zip(openpose.LIMBS, openpose.PAF_CHANNELS):
        (x0, y0), (x1, y1) = points[a - 1], points[b - 1]
        v = np.array([x1 - x0, y1 - y0], float)
        v /= np.linalg.norm(v)
        mask = np.zeros((h, w), np.uint8)
        cv2.line(mask, (x0, y0), (x1, y1), 1, 3)
        paf[:, :, cx] += mask * v[0]
        paf[:, :, cy] += mask * v[1]
    return heat, paf


def test_body_decoding_finds_the_person_the_maps_describe():
    heat, paf = synthetic_maps(120, 100, PERSON)
    peaks = openpose.find_peaks(heat)
    assert [[(p[0], p[1]) for p in part] for part in peaks] == [[pt] for pt in PERSON]
    candidates, people = openpose.assemble(peaks, openpose._connections(peaks, paf, 120))
    assert len(people) == 1 and people[0][-1] == 18
    assert [tuple(candidates[int(j)][:2]) for j in people[0][:18]] == PERSON
    # the distance prior: with weaker fields (0.4) limbs longer than half the picture's height lose, 0.5 H / length
    # - 1; at a height of 12 only the head's short limbs (nose-eyes-ears, 4 px) stay: a 5-part person
    assert openpose.assemble(peaks, openpose._connections(peaks, 0.4 * paf, 120))[1][0][-1] == 18
    head_only = openpose.assemble(peaks, openpose._connections(peaks, 0.4 * paf, 12))[1]
    assert len(head_only) == 1 and head_only[0][-1] == 5 and (head_only[0][[0, 14, 15, 16, 17]] >= 0).all()
    # a weaker bump (0.06 after smoothing stays under 0.1) is no keypoint
    heat[:, :, 0] *= 0.2
    assert openpose.find_peaks(heat)[0] == []


def test_hand_and_face_boxes_follow_openposes_rules():
    body = [openpose.Keypoint(*p) for p in PERSON]
    # left arm: shoulder (62,34), elbow (66,50), wrist (68,64): centre wrist + 0.33 (wrist - elbow), side
    # 1.5 max(|wrist-elbow|, 0.9 |elbow-shoulder|)
    side = 1.5 * max(math.hypot(2, 14), 0.9 * math.hypot(4, 16))
    cx, cy = 68 + 0.33 * 2, 64 + 0.33 * 14
    left, right = openpose.hand_boxes(body, 100, 120)
    assert left == (int(cx - side / 2), int(cy - side / 2), int(side), True) and right[3] is False
    clipped = openpose.hand_boxes(body, 78, 120)
    assert clipped[0] == (int(cx - side / 2), int(cy - side / 2), int(78 - (cx - side / 2)), True)  # cut at 78
    assert len(openpose.hand_boxes(body, 75, 120)) == 1  # cut under 20 px: dropped
    # face: half side = max(3 × eye offset, 1.5 × ear offset) from the nose (50, 20); eyes (±3, -3), ears (±6, -1):
    # 9, so an 18 px box: under 20, none
    assert openpose.face_box(body, 100, 120) is None
    big = [openpose.Keypoint(k.x * 3, k.y * 3) for k in body]
    assert openpose.face_box(big, 300, 360) == (150 - 27, 60 - 27, 54)
    assert openpose.face_box(big, 145, 360) == (123, 33, 22)  # x + half past the width: side = width - x
    tilted = [None] * 18
    tilted[0], tilted[14] = openpose.Keypoint(100, 100), openpose.Keypoint(102, 90)  # the larger offset counts
    assert openpose.face_box(tilted, 300, 300) == (70, 70, 60)


def test_hand_and_face_peaks():
    heat = np.zeros((128, 128, 22))
    ys, xs = np.mgrid[0:128, 0:128]
    heat[:, :, 3] = 0.6 * np.exp(-((xs - 40) ** 2 + (ys - 90) ** 2) / 20.0)
    heat[:, :, 3] += 0.3 * np.exp(-((xs - 100) ** 2 + (ys - 20) ** 2) / 20.0)  # a weaker second blob
    peaks = openpose.hand_peaks(heat, 64, 32)
    assert peaks.shape == (21, 2)
    assert peaks[3].tolist() == [40 * 64 // 128, 90 * 32 // 128]  # scaled from 128² to the 64×32 crop
    assert (np.delete(peaks, 3, 0) == 0).all()  # nothing found: (0, 0)
    face = np.zeros((71, 30, 40))
    face[5, 12, 7], face[9, 3, 33] = 0.5, 0.04  # the second stays under 0.05: left out
    assert openpose.face_peaks(face).tolist() == [[7, 12]]


def test_pose_drawing_uses_the_extensions_colours_and_limbs():
    h, w = 120, 100
    pose = openpose.Pose([openpose.Keypoint(x / w, y / h) for x, y in PERSON])
    canvas = openpose.draw_poses([pose], h, w)
    for (x, y), color in zip(PERSON, openpose.BODY_COLORS):
        if (x, y) in ((47, 17), (53, 17), (44, 19), (56, 19), (50, 20)):
            continue  # the head's discs overlap each other
        assert tuple(canvas[y, x]) == color
    # limb 4 (elbow 4 → wrist 5, keypoints (34,50) → (32,64)) at 60 % of colour 4; its middle is off the discs
    assert tuple(canvas[57, 33]) == tuple(int(c * 0.6) for c in openpose.BODY_COLORS[3])
    # keypoints 17 and 18 (ears) join nothing to the shoulders: limbs 18-19 of the search are not drawn
    assert canvas[26, 41].sum() == 0
    # hand: bones between found points only, blue 4 px discs over them; missing points (-1) drawn nowhere
    hand = [openpose.Keypoint(-1.0, -1.0)] * 21
    hand[0], hand[1] = openpose.Keypoint(20 / w, 100 / h), openpose.Keypoint(60 / w, 100 / h)
    drawn = openpose.draw_hand(np.zeros((h, w, 3), np.uint8), hand)
    assert tuple(drawn[100, 20]) == tuple(drawn[100, 60]) == (0, 0, 255)
    assert tuple(drawn[100, 40]) == (255, 0, 0)  # edge 0: hue 0
    assert set(np.nonzero(drawn.any(2))[0]) <= set(range(95, 106))  # nothing else
    face = [openpose.Keypoint(30 / w, 30 / h)]
    assert tuple(openpose.draw_face(np.zeros((h, w, 3), np.uint8), face)[30, 30]) == (255, 255, 255)
    assert openpose.draw_poses([pose], h, w, body=False).sum() == 0


def test_hand_bone_colours_go_round_the_hue_circle():
    w = h = 200
    # a hand whose bones are all separate horizontal segments, so each colour can be read at a bone's middle
    points = [openpose.Keypoint(0.0, 0.0)] * 21
    canvas = np.zeros((h, w, 3), np.uint8)
    for i, (a, b) in enumerate(openpose.HAND_EDGES):
        pts = list(points)
        pts[a], pts[b] = openpose.Keypoint(20 / w, (5 + 9 * i) / h), openpose.Keypoint(180 / w, (5 + 9 * i) / h)
        canvas[:] = 0
        openpose.draw_hand(canvas, pts)
        hue = i / 20.0
        expected = [round(c * 255) for c in colorsys.hsv_to_rgb(hue, 1.0, 1.0)]
        assert canvas[5 + 9 * i, 100].tolist() == expected, i


# --- M-LSD ----------------------------------------------------------------------------------------------------

def test_mlsd_loads_and_runs(tmp_path):
    write(tmp_path / "mlsd" / "mlsd_large_512_fp32.pth", random_weights(mlsd_layout()))
    found = by_name(tmp_path)
    out = found["mlsd"].run(picture(), 64, 0.1, 0.1)
    assert out.shape == (64, 80, 3) and set(np.unique(out)) <= {0, 255}
    net = mlsd.load(tmp_path / "mlsd" / "mlsd_large_512_fp32.pth")
    with torch.no_grad():
        assert net(torch.zeros(1, 4, 64, 96)).shape == (1, 9, 32, 48)  # half size: centre + 4 offsets (+ 4 unused)


def test_mlsd_file_without_batchnorm_counters_loads(tmp_path):
    weights = {k: v for k, v in random_weights(mlsd_layout()).items() if not k.endswith("num_batches_tracked")}
    write(tmp_path / "mlsd_large_512_fp32.pth", weights)
    assert by_name(tmp_path)["mlsd"].run(picture(), 64, 0.1, 0.1).shape == (64, 80, 3)


def test_mlsd_line_decoding_and_thresholds():
    maps = torch.full((1, 9, 32, 48), -10.0)
    maps[0, 1:5] = 0.0
    maps[0, 0, 10, 12] = 0.0  # sigmoid 0.5
    maps[0, 1:5, 10, 12] = torch.tensor([-5.0, 0.0, 5.0, 0.0])  # a 10 px (half size) horizontal segment
    maps[0, 0, 20, 30] = 2.0  # sigmoid 0.88, but its segment is 2 px long
    maps[0, 1:5, 20, 30] = torch.tensor([-1.0, 0.0, 1.0, 0.0])
    lines = mlsd.decode_lines(maps, 0.1, 5.0)
    assert lines.tolist() == [[2 * 7, 2 * 10, 2 * 17, 2 * 10]]  # ×2 back to input pixels
    assert len(mlsd.decode_lines(maps, 0.1, 1.5)) == 2  # the distance threshold lets the short one in
    assert len(mlsd.decode_lines(maps, 0.6, 1.5)) == 1  # the value threshold keeps the confident one only
    assert mlsd.decode_lines(maps, 0.9, 0.1).shape == (0, 4)
    maps[0, 0, 10, 13] = 1.0  # a stronger neighbour: (10, 12) is no longer a 3×3 maximum
    assert lines.tolist() != mlsd.decode_lines(maps, 0.1, 5.0).tolist()


# --- LeReS ----------------------------------------------------------------------------------------------------

def test_leres_loads_the_published_checkpoint_and_runs(tmp_path):
    # res101.pth is AdelaiDepth's training checkpoint: the weights under "depth_model", DataParallel-prefixed
    weights = random_weights(leres_layout(), seed=5, dtype=torch.float16)
    path = tmp_path / "leres" / "res101.pth"
    path.parent.mkdir()
    torch.save({"depth_model": {"module." + k: v for k, v in weights.items()}, "step": 1}, path)
    found, image = by_name(tmp_path), picture()
    out = found["depth_leres"].run(image, 64, 0, 0)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    padded, crop = common.resize_with_pad(image, 64)
    net = leres.load(path)
    raw = leres.predict(net, padded)
    assert raw.shape == padded.shape[:2]
    assert (out[:, :, 0] == crop(leres.depth_map(raw))).all()
    assert out[:, :, 0].min() == 0 or raw.max() - raw.min() < 1e-6  # the far end of a stretched map is black
    cut = found["depth_leres"].run(image, 64, 30, 40)[:, :, 0]
    assert (cut == crop(leres.depth_map(raw, 30, 40))).all()


def test_leres_depth_map_formula():
    depth = np.array([[0.0, 0.5, 1.0, 0.25]], np.float32)
    # 16 bits: 0, 32767 (32767.5 truncated), 65535, 16383; to 8 (rounded): 0, 127, 255, 64; inverted
    assert leres.depth_map(depth).tolist() == [[255, 128, 0, 191]]
    # "Remove Near %": values at or under 60 % of 255 (153) zeroed before the inversion
    assert leres.depth_map(depth, remove_near=60).tolist() == [[255, 255, 0, 255]]
    # "Remove Background %": after it, at or under 50 % (127.5) / 51 % (130.05) zeroed
    assert leres.depth_map(depth, remove_background=50).tolist() == [[255, 128, 0, 191]]
    assert leres.depth_map(depth, remove_background=51).tolist() == [[255, 0, 0, 191]]
    assert leres.depth_map(np.full((2, 2), 3.0, np.float32)).tolist() == [[255, 255], [255, 255]]  # flat: far


def test_leres_norms_use_the_pictures_statistics_and_the_residual_is_rectified():
    norm = leres._BatchStatNorm(2).eval()
    norm.running_mean.fill_(100.0)
    x = torch.randn(1, 2, 5, 5) * 7 + 3
    expected = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                  + norm.eps)
    assert torch.allclose(norm(x), expected, atol=1e-5) and (norm.running_mean == 100).all()
    # the FTB adds its branch to the rectified projection (the original's in-place ReLU): with the projection
    # at -1 and the branch giving +0.5, the block gives 0.5 (it would give 0 with the raw projection)
    block = leres._FTB(1, 1).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
        block.conv1.bias.fill_(-1.0)
        block.conv_branch[4].bias.fill_(0.5)
    assert torch.allclose(block(torch.zeros(1, 1, 4, 4)), torch.full((1, 1, 4, 4), 0.5))


# --- Depth Anything -----------------------------------------------------------------------------------------

SMALL_DA = {"dim": 128, "blocks": 4, "neck": (16, 32, 64, 64), "features": 32}  # the layout, at test size


def test_depth_anything_keys_convert_to_transformers_for_the_published_sizes():
    from transformers import DepthAnythingForDepthEstimation

    layout = depth_anything_layout()  # ViT-L: the published file
    weights = {k: torch.empty(v, device="meta") for k, v in layout.items()}  # shapes only
    config = depth_anything.config_for(weights)
    assert config.backbone_config.num_attention_heads == 16 and config.backbone_config.out_indices == [21, 22, 23, 24]
    with torch.device("meta"):
        reference = DepthAnythingForDepthEstimation(config).state_dict()
    converted = depth_anything.to_transformers(weights)
    assert set(converted) == set(reference)
    assert all(tuple(converted[k].shape) == tuple(reference[k].shape) for k in reference)


def test_depth_anything_loads_and_runs(tmp_path):
    weights = random_weights(depth_anything_layout(**SMALL_DA), seed=9)
    write(tmp_path / "depth_anything" / "depth_anything_vitl14.pth", weights)
    found, image = by_name(tmp_path), picture()
    net = depth_anything.load(tmp_path / "depth_anything" / "depth_anything_vitl14.pth")
    seen = []
    handle = net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        out = found["depth_anything"].run(image, 64, -1, -1)
    finally:
        handle.remove()
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    assert out[:, :, 0].max() == 255 or out[:, :, 0].max() == 0
    # the network saw the padded 64×128 picture at 518×1036, channels swapped, ImageNet-normalized
    padded, _ = common.resize_with_pad(image, 64)
    assert tuple(seen[0].shape) == (1, 3, 518, 1036)
    big = cv2.resize(padded[:, :, ::-1] / 255.0, (1036, 518), interpolation=cv2.INTER_CUBIC)
    expected = ((big - np.array(depth_anything.MEAN)) / np.array(depth_anything.STD)).transpose(2, 0, 1)
    assert np.allclose(seen[0][0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("h, w, expected", [(518, 518, (518, 518)), (64, 128, (518, 1036)), (320, 448, (518, 728)),
                                            (600, 400, (784, 518)), (100, 101, (518, 518))])
def test_depth_anything_input_size(h, w, expected):
    # the short side to 518, each side rounded to a multiple of 14 (up if that would go under 518):
    # 448 × 518/320 = 725.2 → 728; 600 × 518/400 = 777 → 784 (55.5 × 14: halves round to even, 56); 101 → 523.2 → 518
    assert depth_anything.input_size(h, w) == expected


def test_depth_anything_positions_use_dinov2s_offset():
    grid = torch.randn(1, 1 + 37 * 37, 8)
    emb = types.SimpleNamespace(position_embeddings=grid)
    tokens = torch.zeros(1, 1 + 37 * 52, 8)  # 518×728: 37×52 patches
    got = depth_anything._dinov2_positions(emb, tokens, 518, 728)
    patches = grid[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    by_offset = F.interpolate(patches, scale_factor=(37.1 / 37, 52.1 / 37), mode="bicubic", antialias=False)
    by_size = F.interpolate(patches, size=(37, 52), mode="bicubic", align_corners=False)
    assert torch.allclose(got[:, 1:], by_offset.permute(0, 2, 3, 1).reshape(1, -1, 8))
    assert not torch.allclose(got[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, -1, 8))
    assert torch.equal(got[:, :1], grid[:, :1])
    assert depth_anything._dinov2_positions(emb, torch.zeros(1, 1 + 37 * 37, 8), 518, 518) is grid


# --- normal_bae -----------------------------------------------------------------------------------------------

def test_normal_bae_loads_the_published_checkpoint_and_runs(tmp_path):
    # scannet.pt: {"model": DataParallel-prefixed weights, ...}
    weights = random_weights(normalbae_layout(), seed=12, dtype=torch.float16)
    path = tmp_path / "normal_bae" / "scannet.pt"
    path.parent.mkdir()
    torch.save({"model": {"module." + k: v for k, v in weights.items()}, "epoch": 3}, path)
    found, image = by_name(tmp_path), picture()
    out = found["normal_bae"].run(image, 64, -1, -1)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    padded, crop = common.resize_with_pad(image, 64)
    net = normalbae.load(path)
    assert (crop(normalbae.detect(net, padded)) == out).all()
    with torch.no_grad():  # a unit normal at every pixel, the concentration over 0.01
        raw = net(torch.randn(1, 3, 64, 96))
    assert raw.shape == (1, 4, 64, 96)
    assert torch.allclose(raw[:, :3].norm(dim=1), torch.ones(1, 64, 96), atol=1e-4) and raw[:, 3].min() > 0.01


def test_normal_formulas():
    out = normalbae.normalize_normals(torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 4, 1, 1)).flatten().tolist()
    assert out == pytest.approx([0.6, 0.8, 0.0, 1.01])  # unit vector; elu(0) + 1 + 0.01
    kappa = normalbae.normalize_normals(torch.tensor([0.0, 0.0, 2.0, -1.0]).view(1, 4, 1, 1))[0, 3].item()
    assert kappa == pytest.approx(math.exp(-1) - 1 + 1.01)

    class Constant(torch.nn.Module):  # a network answering one normal everywhere
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.tensor([0.6, -0.8, 0.0, 2.0]).view(1, 4, 1, 1).expand(1, 4, *x.shape[2:])

    # [-1, 1] to 0-255, truncated: 0.6 → 204, -0.8 → 25.5 → 25, 0 → 127.5 → 127
    assert normalbae.detect(Constant(), np.zeros((32, 32, 3), np.uint8))[5, 5].tolist() == [204, 25, 127]


def test_tensorflow_same_padding_puts_the_odd_pixel_after():
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    assert normalbae._same_pad(x, 3, 2).shape[-2:] == (9, 9)  # (4 - 1) × 2 + 3 - 8 = 1: bottom/right only
    assert normalbae._same_pad(x, 3, 2)[0, 0, 0, :3].tolist() == [0.0, 1.0, 2.0]
    assert normalbae._same_pad(x[..., :7, :7], 5, 2).shape[-2:] == (11, 11)  # 3 × 2 + 5 - 7 = 4: 2 and 2
    conv = normalbae._Conv(1, 1, 3, 2)
    assert conv(torch.zeros(1, 1, 8, 8)).shape[-2:] == (4, 4)
