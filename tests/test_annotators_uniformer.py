"""seg_ufade20k: a checkpoint written in the published mmsegmentation layout of ``upernet_global_small.pth``
(names and shapes from UniFormer's and mmsegmentation's module definitions, written out here) loads into our
backbone and transformers' UperNet head, and the whole network agrees with a functional forward pass written
here from those definitions; the extension's pipeline (rescale, channel swap, normalization, colours) as its
mmsegmentation steps compute it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.engine import annotators
from sdstudio.engine.annotators import uniformer
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import fresh_annotator_cache, picture  # noqa: F401 (autouse)

torch.set_num_threads(1)
DIMS, DEPTHS, CHANNELS, CLASSES = (8, 16, 24, 32), (1, 1, 2, 1), 16, 150


def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def published_shapes() -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors: ``backbone.*`` (UniFormer: CBlocks in stages 1-2, SABlocks in 3-4),
    ``decode_head.*`` (UPerHead: ConvModules of conv + bn) and the training-only ``auxiliary_head.*``."""
    s: dict[str, tuple[int, ...]] = {}
    cin = 3
    for i, (dim, depth) in enumerate(zip(DIMS, DEPTHS, strict=True), start=1):
        patch = 4 if i == 1 else 2
        s |= {f"backbone.patch_embed{i}.proj.weight": (dim, cin, patch, patch), f"backbone.patch_embed{i}.proj.bias": (dim,),
              f"backbone.patch_embed{i}.norm.weight": (dim,), f"backbone.patch_embed{i}.norm.bias": (dim,),
              f"backbone.norm{i}.weight": (dim,), f"backbone.norm{i}.bias": (dim,)}
        for b in range(depth):
            p = f"backbone.blocks{i}.{b}"
            s |= {f"{p}.pos_embed.weight": (dim, 1, 3, 3), f"{p}.pos_embed.bias": (dim,)}
            if i <= 2:
                s |= bn(f"{p}.norm1", dim) | bn(f"{p}.norm2", dim)
                s |= {f"{p}.conv1.weight": (dim, dim, 1, 1), f"{p}.conv1.bias": (dim,),
                      f"{p}.conv2.weight": (dim, dim, 1, 1), f"{p}.conv2.bias": (dim,),
                      f"{p}.attn.weight": (dim, 1, 5, 5), f"{p}.attn.bias": (dim,),
                      f"{p}.mlp.fc1.weight": (4 * dim, dim, 1, 1), f"{p}.mlp.fc1.bias": (4 * dim,),
                      f"{p}.mlp.fc2.weight": (dim, 4 * dim, 1, 1), f"{p}.mlp.fc2.bias": (dim,)}
            else:
                s |= {f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,), f"{p}.norm2.weight": (dim,),
                      f"{p}.norm2.bias": (dim,), f"{p}.attn.qkv.weight": (3 * dim, dim),
                      f"{p}.attn.qkv.bias": (3 * dim,), f"{p}.attn.proj.weight": (dim, dim), f"{p}.attn.proj.bias": (dim,),
                      f"{p}.mlp.fc1.weight": (4 * dim, dim), f"{p}.mlp.fc1.bias": (4 * dim,),
                      f"{p}.mlp.fc2.weight": (dim, 4 * dim), f"{p}.mlp.fc2.bias": (dim,)}
        cin = dim
    h, c = "decode_head", CHANNELS
    for j in range(4):
        s |= {f"{h}.psp_modules.{j}.1.conv.weight": (c, DIMS[-1], 1, 1)} | bn(f"{h}.psp_modules.{j}.1.bn", c)
    s |= {f"{h}.bottleneck.conv.weight": (c, DIMS[-1] + 4 * c, 3, 3)} | bn(f"{h}.bottleneck.bn", c)
    for j, dim in enumerate(DIMS[:-1]):
        s |= {f"{h}.lateral_convs.{j}.conv.weight": (c, dim, 1, 1)} | bn(f"{h}.lateral_convs.{j}.bn", c)
        s |= {f"{h}.fpn_convs.{j}.conv.weight": (c, c, 3, 3)} | bn(f"{h}.fpn_convs.{j}.bn", c)
    s |= {f"{h}.fpn_bottleneck.conv.weight": (c, 4 * c, 3, 3)} | bn(f"{h}.fpn_bottleneck.bn", c)
    s |= {f"{h}.conv_seg.weight": (CLASSES, c, 1, 1), f"{h}.conv_seg.bias": (CLASSES,)}
    s |= {"auxiliary_head.convs.0.conv.weight": (8, DIMS[2], 3, 3)} | bn("auxiliary_head.convs.0.bn", 8)
    s |= {"auxiliary_head.conv_seg.weight": (CLASSES, 8, 1, 1), "auxiliary_head.conv_seg.bias": (CLASSES,)}
    return s


def published_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in published_shapes().items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".weight") and len(shape) == 1:  # layer and batch norms' scales
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan = int(np.prod(shape[1:])) if len(shape) > 1 else 10
            out[key] = torch.randn(shape, generator=g) / fan ** 0.5
    return out


def write_file(path, weights) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"CLASSES": ["wall"] * CLASSES, "PALETTE": []}, "state_dict": weights}, str(path))


# --- a functional forward pass written from UniFormer's and mmsegmentation's definitions -----------------------

def conv_module(w, p, x, padding=0):
    x = F.conv2d(x, w[f"{p}.conv.weight"], None, padding=padding)
    x = F.batch_norm(x, w[f"{p}.bn.running_mean"], w[f"{p}.bn.running_var"], w[f"{p}.bn.weight"],
                     w[f"{p}.bn.bias"], False, 0.0, 1e-5)
    return F.relu(x)


def reference_logits(w, x):
    feats = []
    for i, dim in enumerate(DIMS, start=1):
        p = f"backbone.patch_embed{i}"
        x = F.conv2d(x, w[f"{p}.proj.weight"], w[f"{p}.proj.bias"], stride=4 if i == 1 else 2)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (dim,), w[f"{p}.norm.weight"], w[f"{p}.norm.bias"], 1e-5)
        x = x.permute(0, 3, 1, 2)
        for b in range(DEPTHS[i - 1]):
            q = f"backbone.blocks{i}.{b}"
            x = x + F.conv2d(x, w[f"{q}.pos_embed.weight"], w[f"{q}.pos_embed.bias"], padding=1, groups=dim)
            if i <= 2:
                def norm(name, t, q=q):
                    return F.batch_norm(t, w[f"{q}.{name}.running_mean"], w[f"{q}.{name}.running_var"],
                                        w[f"{q}.{name}.weight"], w[f"{q}.{name}.bias"], False, 0.0, 1e-5)
                y = F.conv2d(norm("norm1", x), w[f"{q}.conv1.weight"], w[f"{q}.conv1.bias"])
                y = F.conv2d(y, w[f"{q}.attn.weight"], w[f"{q}.attn.bias"], padding=2, groups=dim)
                x = x + F.conv2d(y, w[f"{q}.conv2.weight"], w[f"{q}.conv2.bias"])
                y = F.gelu(F.conv2d(norm("norm2", x), w[f"{q}.mlp.fc1.weight"], w[f"{q}.mlp.fc1.bias"]))
                x = x + F.conv2d(y, w[f"{q}.mlp.fc2.weight"], w[f"{q}.mlp.fc2.bias"])
            else:
                bsz, c, hh, ww = x.shape
                t = x.flatten(2).transpose(1, 2)
                y = F.layer_norm(t, (c,), w[f"{q}.norm1.weight"], w[f"{q}.norm1.bias"], 1e-6)
                heads = max(1, c // 64)
                qkv = F.linear(y, w[f"{q}.attn.qkv.weight"], w[f"{q}.attn.qkv.bias"])
                qkv = qkv.reshape(bsz, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
                att = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5
                y = (att.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(bsz, -1, c)
                t = t + F.linear(y, w[f"{q}.attn.proj.weight"], w[f"{q}.attn.proj.bias"])
                y = F.layer_norm(t, (c,), w[f"{q}.norm2.weight"], w[f"{q}.norm2.bias"], 1e-6)
                y = F.linear(F.gelu(F.linear(y, w[f"{q}.mlp.fc1.weight"], w[f"{q}.mlp.fc1.bias"])),
                             w[f"{q}.mlp.fc2.weight"], w[f"{q}.mlp.fc2.bias"])
                x = (t + y).transpose(1, 2).reshape(bsz, c, hh, ww)
        out = F.layer_norm(x.permute(0, 2, 3, 1), (dim,), w[f"backbone.norm{i}.weight"],
                           w[f"backbone.norm{i}.bias"], 1e-6)
        feats.append(out.permute(0, 3, 1, 2))
    # UPerHead: pyramid pooling on the last level, lateral 1x1s, top-down sums, 3x3s, concatenation, classifier
    h = "decode_head"
    top = feats[-1]
    pooled = [F.interpolate(conv_module(w, f"{h}.psp_modules.{j}.1", F.adaptive_avg_pool2d(top, s)),
                            size=top.shape[2:], mode="bilinear", align_corners=False)
              for j, s in enumerate((1, 2, 3, 6))]
    laterals = [conv_module(w, f"{h}.lateral_convs.{j}", feats[j]) for j in range(3)]
    laterals.append(conv_module(w, f"{h}.bottleneck", torch.cat([top, *pooled], 1), padding=1))
    for j in range(3, 0, -1):
        laterals[j - 1] = laterals[j - 1] + F.interpolate(laterals[j], size=laterals[j - 1].shape[2:],
                                                          mode="bilinear", align_corners=False)
    outs = [conv_module(w, f"{h}.fpn_convs.{j}", laterals[j], padding=1) for j in range(3)] + [laterals[3]]
    outs = [outs[0]] + [F.interpolate(o, size=outs[0].shape[2:], mode="bilinear", align_corners=False)
                        for o in outs[1:]]
    fused = conv_module(w, f"{h}.fpn_bottleneck", torch.cat(outs, 1), padding=1)
    return F.conv2d(fused, w[f"{h}.conv_seg.weight"], w[f"{h}.conv_seg.bias"])


# --- tests ------------------------------------------------------------------------------------------------------

def test_the_published_layout_loads_and_the_network_matches_the_definitions(tmp_path):
    weights = published_weights()
    path = tmp_path / "uniformer" / "upernet_global_small.pth"
    write_file(path, weights)
    model = uniformer.load(path)
    names = set(model.state_dict())
    assert not any(k.startswith("auxiliary_head") for k in names)  # training only: dropped
    assert {"backbone.blocks3.0.attn.qkv.weight", "head.classifier.weight",
            "head.psp_modules.3.1.batch_norm.running_var"} <= names
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        ref = reference_logits(weights, x)
    assert ours.shape == (1, CLASSES, 24, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # a second weight set gives other logits (the comparison is not between constants)
    other = reference_logits(published_weights(seed=5), x)
    assert (other - ref).abs().max() > 1e-2


def test_wrong_files_name_the_file_and_the_problem(tmp_path):
    weights = published_weights()
    path = tmp_path / "bad.pth"
    write_file(path, {k: v for k, v in weights.items() if not k.startswith("decode_head")})
    with pytest.raises(ModelFileError, match=r"bad\.pth: not an UperNet UniFormer"):
        uniformer.load(path)
    wrong = dict(weights)
    wrong["decode_head.fpn_convs.1.conv.weight"] = torch.zeros(CHANNELS, CHANNELS, 1, 1)
    path2 = tmp_path / "wrong.pth"
    write_file(path2, wrong)
    with pytest.raises(ModelFileError, match=r"wrong\.pth: .*wrong shape: head\.fpn_convs\.1\.conv\.weight"):
        uniformer.load(path2)
    path3 = tmp_path / "cut.pth"  # a stage's blocks there, its first block's MLP not
    write_file(path3, {k: v for k, v in weights.items() if not k.startswith("backbone.blocks2.0.mlp.fc1.")})
    with pytest.raises(ModelFileError, match=r"cut\.pth: not a whole UperNet UniFormer checkpoint: "
                                             r"backbone\.blocks2\.0\.mlp\.fc1\.weight is missing"):
        uniformer.load(path3)


def test_the_pipeline_rescales_swaps_and_normalizes_as_mmsegmentation():
    # imrescale to (2048, 512): scale = min(2048 / long, 512 / short), sizes int(x * scale + 0.5)
    assert uniformer.rescaled(np.zeros((300, 500, 3), np.uint8)).shape == (512, 853, 3)
    assert uniformer.rescaled(np.zeros((512, 768, 3), np.uint8)).shape == (512, 768, 3)  # the default: unchanged
    assert uniformer.rescaled(np.zeros((600, 3000, 3), np.uint8)).shape == (410, 2048, 3)  # long side bound
    image = np.zeros((300, 500, 3), np.uint8)
    image[:, :250] = (200, 10, 10)
    expected = cv2.resize(image, (853, 512), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(uniformer.rescaled(image), expected)
    # given RGB, the to_rgb swap makes the network see BGR, normalized by the RGB-ordered mean and std
    x = uniformer.normalized(np.array([[[255, 0, 0]]], np.uint8))
    assert x.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(x.flatten().numpy(), [(0 - 123.675) / 58.395, (0 - 116.28) / 57.12,
                                                     (255 - 103.53) / 57.375], rtol=1e-6)


def test_the_ade20k_palette_and_colouring():
    palette = uniformer.ADE20K_PALETTE
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert palette[:4].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50]]
    assert palette[-1].tolist() == [92, 0, 255] and palette[12].tolist() == [150, 5, 61]
    classes = np.array([[0, 1], [149, 12]])
    out = uniformer.colorize(classes)
    assert out.tolist() == [[[120, 120, 120], [180, 120, 120]], [[92, 0, 255], [150, 5, 61]]]


def test_the_preprocessor_runs_the_extension_frame(tmp_path):
    weights = published_weights()
    write_file(tmp_path / "uniformer" / "upernet_global_small.pth", weights)
    pre = {p.name: p for p in annotators.preprocessors(tmp_path)}["segmentation"]
    assert pre.aliases == ("seg_ufade20k",) and pre.control_types == ("Segmentation",)
    image = picture(80, 100)
    out = pre.run(image, 128)
    assert out.shape == (128, 160, 3) and out.dtype == np.uint8
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in uniformer.ADE20K_PALETTE.tolist()}
    # the map is the argmax of the reference logits at the padded picture's size (rescaled to 512 and back)
    padded, crop = annotators.resize_with_pad(np.ascontiguousarray(image), 128)
    x = uniformer.normalized(uniformer.rescaled(padded))
    with torch.no_grad():
        logits = F.interpolate(reference_logits(weights, x), size=x.shape[2:], mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=padded.shape[:2], mode="bilinear", align_corners=False)
    expected = crop(uniformer.colorize(logits.argmax(1)[0].numpy()))
    assert (out == expected).all(axis=-1).mean() > 0.999


def test_a_missing_file_says_where_to_put_it(tmp_path):
    pre = {p.name: p for p in annotators.preprocessors(tmp_path)}["segmentation"]
    with pytest.raises(Exception, match=r"upernet_global_small\.pth.*uniformer"):
        pre.run(picture(), 64)
