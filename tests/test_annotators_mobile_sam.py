"""mobile_sam: a tiny MobileSAM written in the published layout (segment_anything / MobileSAM names, listed here
from their module definitions) loads through our TinyViT and transformers' prompt encoder / mask decoder, whose
outputs match segment_anything's decoder written out here; TinyViT's window attention matches a direct
per-window computation; the automatic mask generator's pieces (point grid, stability score, boxes, NMS, the
IoU / stability filters) match direct definitions; the map's colouring is controlnet_aux's ``show_anns``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdstudio.engine.annotators import mobile_sam
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import fresh_annotator_cache, picture  # noqa: F401 (autouse)

torch.set_num_threads(1)

SIZE = 64  # the tiny encoder's input side (the published one is 1024)
C = 32  # the prompt / decoder width (published 256)


# ---- the published layout -------------------------------------------------------------------------------------

def _conv_bn(out: dict, name: str, cout: int, cin: int, k: int) -> None:
    out[f"{name}.c.weight"] = (cout, cin, k, k)
    for p in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.bn.{p}"] = (cout,)
    out[f"{name}.bn.num_batches_tracked"] = ()


def _linear(out: dict, name: str, cout: int, cin: int) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin), (cout,)


def _norm(out: dict, name: str, c: int) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)


def published_layout(dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), heads=(0, 2, 3, 4), windows=(0, 3, 2, 4),
                     classes: int = 10) -> dict[str, tuple[int, ...]]:
    """``sam_model_registry["vit_t"]``'s state dict names and shapes, narrowed (TinyViT: mbconv ratio 4, mlp ratio
    4, local conv 3; SAM's decoder: 2 layers, 3 multimask outputs, iou head depth 3)."""
    e = "image_encoder."
    out: dict = {}
    _conv_bn(out, e + "patch_embed.seq.0", dims[0] // 2, 3, 3)
    _conv_bn(out, e + "patch_embed.seq.2", dims[0], dims[0] // 2, 3)
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        for j in range(depth):
            b = f"{e}layers.{i}.blocks.{j}"
            if i == 0:
                _conv_bn(out, b + ".conv1", 4 * dim, dim, 1)
                _conv_bn(out, b + ".conv2", 4 * dim, 1, 3)
                _conv_bn(out, b + ".conv3", dim, 4 * dim, 1)
                continue
            out[b + ".attn.attention_biases"] = (heads[i], windows[i] ** 2)
            _norm(out, b + ".attn.norm", dim)
            _linear(out, b + ".attn.qkv", 3 * dim, dim)
            _linear(out, b + ".attn.proj", dim, dim)
            _norm(out, b + ".mlp.norm", dim)
            _linear(out, b + ".mlp.fc1", 4 * dim, dim)
            _linear(out, b + ".mlp.fc2", dim, 4 * dim)
            _conv_bn(out, b + ".local_conv", dim, 1, 3)
        if i < len(dims) - 1:
            d = f"{e}layers.{i}.downsample"
            _conv_bn(out, d + ".conv1", dims[i + 1], dim, 1)
            _conv_bn(out, d + ".conv2", dims[i + 1], 1, 3)
            _conv_bn(out, d + ".conv3", dims[i + 1], dims[i + 1], 1)
    _norm(out, e + "norm_head", dims[-1])
    _linear(out, e + "head", classes, dims[-1])
    out[e + "neck.0.weight"] = (C, dims[-1], 1, 1)
    _norm(out, e + "neck.1", C)
    out[e + "neck.2.weight"] = (C, C, 3, 3)
    _norm(out, e + "neck.3", C)
    p = "prompt_encoder."
    out[p + "pe_layer.positional_encoding_gaussian_matrix"] = (2, C // 2)
    for i in range(4):
        out[f"{p}point_embeddings.{i}.weight"] = (1, C)
    out[p + "not_a_point_embed.weight"] = (1, C)
    out[p + "no_mask_embed.weight"] = (1, C)
    out[p + "mask_downscaling.0.weight"], out[p + "mask_downscaling.0.bias"] = (4, 1, 2, 2), (4,)
    _norm(out, p + "mask_downscaling.1", 4)
    out[p + "mask_downscaling.3.weight"], out[p + "mask_downscaling.3.bias"] = (16, 4, 2, 2), (16,)
    _norm(out, p + "mask_downscaling.4", 16)
    out[p + "mask_downscaling.6.weight"], out[p + "mask_downscaling.6.bias"] = (C, 16, 1, 1), (C,)
    m = "mask_decoder."
    out[m + "iou_token.weight"], out[m + "mask_tokens.weight"] = (1, C), (4, C)
    for i in range(2):
        t = f"{m}transformer.layers.{i}."
        for attn, inner in (("self_attn", C), ("cross_attn_token_to_image", C // 2),
                            ("cross_attn_image_to_token", C // 2)):
            for proj in ("q_proj", "k_proj", "v_proj"):
                _linear(out, t + f"{attn}.{proj}", inner, C)
            _linear(out, t + f"{attn}.out_proj", C, inner)
        for k in range(1, 5):
            _norm(out, t + f"norm{k}", C)
        _linear(out, t + "mlp.lin1", 2 * C, C)
        _linear(out, t + "mlp.lin2", C, 2 * C)
    for proj in ("q_proj", "k_proj", "v_proj"):
        _linear(out, f"{m}transformer.final_attn_token_to_image.{proj}", C // 2, C)
    _linear(out, f"{m}transformer.final_attn_token_to_image.out_proj", C, C // 2)
    _norm(out, m + "transformer.norm_final_attn", C)
    out[m + "output_upscaling.0.weight"], out[m + "output_upscaling.0.bias"] = (C, C // 4, 2, 2), (C // 4,)
    _norm(out, m + "output_upscaling.1", C // 4)
    out[m + "output_upscaling.3.weight"], out[m + "output_upscaling.3.bias"] = (C // 4, C // 8, 2, 2), (C // 8,)
    for i in range(4):
        for j, (cout, cin) in enumerate(((C, C), (C, C), (C // 8, C))):
            _linear(out, f"{m}output_hypernetworks_mlps.{i}.layers.{j}", cout, cin)
    for j, (cout, cin) in enumerate(((C, C), (C, C), (4, C))):
        _linear(out, f"{m}iou_prediction_head.layers.{j}", cout, cin)
    return out


def published_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in published_layout().items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(5)
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1:  # norms' weights near 1; biases, running means near 0
            out[name] = float(name.endswith(".weight")) + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * (1.5 / math.sqrt(math.prod(shape[1:])))
    return out


def write(path, weights: dict[str, torch.Tensor]):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, str(path))
    return path


# ---- segment_anything's decoder, written out -------------------------------------------------------------------

def _lin(w, p, x):
    return F.linear(x, w[p + ".weight"], w[p + ".bias"])


def _ln(w, p, x, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"], eps)


def _attention(w, p, q, k, v, heads=8):
    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = (split(_lin(w, f"{p}.{n}_proj", t)) for n, t in (("q", q), ("k", k), ("v", v)))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return _lin(w, p + ".out_proj", (a @ v).transpose(1, 2).flatten(2))


def _mlp(w, p, x, n=3):
    for i in range(n):
        x = _lin(w, f"{p}.layers.{i}", x)
        x = F.relu(x) if i < n - 1 else x
    return x


def reference_predict(w, features, points, image_size):
    """SAM's prompt encoder (one foreground point and the padding point) and mask decoder (multimask)."""
    gauss = w["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]

    def pe(c):
        c = (2 * c - 1) @ gauss * (2 * math.pi)
        return torch.cat([c.sin(), c.cos()], dim=-1)

    n_points = len(points)
    coords = torch.cat([torch.as_tensor(points, dtype=torch.float64)[:, None] + 0.5,
                        torch.zeros(n_points, 1, 2, dtype=torch.float64)], dim=1) / image_size
    sparse = pe(coords.float())
    sparse[:, 1] = w["prompt_encoder.not_a_point_embed.weight"][0]
    sparse[:, 0] += w["prompt_encoder.point_embeddings.1.weight"][0]
    n = features.shape[-1]
    centres = (torch.arange(n) + 0.5) / n
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    image_pe = pe(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)[None]
    tokens = torch.cat([w["mask_decoder.iou_token.weight"], w["mask_decoder.mask_tokens.weight"]])
    tokens = torch.cat([tokens[None].expand(n_points, -1, -1), sparse], dim=1)
    src = features.repeat_interleave(n_points, 0) + w["prompt_encoder.no_mask_embed.weight"].view(1, -1, 1, 1)
    b, c, h, wd = src.shape
    keys, key_pe = src.flatten(2).transpose(1, 2), image_pe.repeat_interleave(n_points, 0).flatten(2).transpose(1, 2)
    queries = tokens
    t = "mask_decoder.transformer"
    for i in range(2):
        layer = f"{t}.layers.{i}"
        if i == 0:
            queries = _attention(w, layer + ".self_attn", queries, queries, queries)
        else:
            q = queries + tokens
            queries = queries + _attention(w, layer + ".self_attn", q, q, queries)
        queries = _ln(w, layer + ".norm1", queries)
        q, k = queries + tokens, keys + key_pe
        queries = _ln(w, layer + ".norm2", queries + _attention(w, layer + ".cross_attn_token_to_image", q, k, keys))
        mlp = _lin(w, layer + ".mlp.lin2", F.relu(_lin(w, layer + ".mlp.lin1", queries)))
        queries = _ln(w, layer + ".norm3", queries + mlp)
        q, k = queries + tokens, keys + key_pe
        keys = _ln(w, layer + ".norm4", keys + _attention(w, layer + ".cross_attn_image_to_token", k, q, queries))
    q, k = queries + tokens, keys + key_pe
    queries = _ln(w, t + ".norm_final_attn", queries + _attention(w, t + ".final_attn_token_to_image", q, k, keys))
    src = keys.transpose(1, 2).reshape(b, c, h, wd)
    u = "mask_decoder.output_upscaling"
    up = F.conv_transpose2d(src, w[u + ".0.weight"], w[u + ".0.bias"], stride=2)
    mean = up.mean(1, keepdim=True)
    var = (up - mean).pow(2).mean(1, keepdim=True)
    up = (up - mean) / torch.sqrt(var + 1e-6) * w[u + ".1.weight"][:, None, None] + w[u + ".1.bias"][:, None, None]
    up = F.gelu(F.conv_transpose2d(F.gelu(up), w[u + ".3.weight"], w[u + ".3.bias"], stride=2))
    hyper = torch.stack([_mlp(w, f"mask_decoder.output_hypernetworks_mlps.{i}", queries[:, 1 + i])
                         for i in range(4)], dim=1)
    masks = (hyper @ up.flatten(2)).view(b, 4, *up.shape[-2:])
    iou = _mlp(w, "mask_decoder.iou_prediction_head", queries[:, 0])
    return masks[:, 1:], iou[:, 1:]


# ---- the network ------------------------------------------------------------------------------------------------

def test_the_published_layout_loads(tmp_path):
    weights = published_weights()
    for name in ("image_encoder.patch_embed.seq.0.c.weight", "image_encoder.layers.0.blocks.0.conv2.bn.running_var",
                 "image_encoder.layers.1.blocks.0.attn.qkv.weight", "image_encoder.layers.1.blocks.1.local_conv.c.weight",
                 "image_encoder.layers.2.downsample.conv2.c.weight", "image_encoder.neck.0.weight",
                 "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "prompt_encoder.mask_downscaling.6.bias",
                 "mask_decoder.transformer.layers.0.self_attn.q_proj.weight", "mask_decoder.output_upscaling.3.weight",
                 "mask_decoder.iou_prediction_head.layers.0.weight"):
        assert name in weights, name
    model = mobile_sam.load(write(tmp_path / "mobile_sam" / "mobile_sam.pt", weights), image_size=SIZE)
    assert model is mobile_sam.load(tmp_path / "mobile_sam" / "mobile_sam.pt", image_size=SIZE)  # cached
    state = model.state_dict()
    encoder = {k for k in weights if k.startswith("image_encoder.") and ".head." not in k and "norm_head" not in k}
    assert {k for k in state if k.startswith("image_encoder.")} == encoder  # the encoder under the file's names
    pairs = {"mask_decoder.iou_prediction_head.proj_in.weight": "mask_decoder.iou_prediction_head.layers.0.weight",
             "mask_decoder.iou_prediction_head.layers.0.weight": "mask_decoder.iou_prediction_head.layers.1.weight",
             "mask_decoder.output_hypernetworks_mlps.2.proj_out.bias":
                 "mask_decoder.output_hypernetworks_mlps.2.layers.2.bias",
             "mask_decoder.transformer.layers.1.layer_norm4.weight": "mask_decoder.transformer.layers.1.norm4.weight",
             "mask_decoder.upscale_layer_norm.bias": "mask_decoder.output_upscaling.1.bias",
             "prompt_encoder.shared_embedding.positional_embedding":
                 "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
             "prompt_encoder.point_embed.3.weight": "prompt_encoder.point_embeddings.3.weight"}
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours].cpu(), weights[theirs]), ours
    assert model.embed(picture(40, 30)).shape == (1, C, SIZE // 16, SIZE // 16)

    torch.save({"conv.weight": torch.zeros(1)}, str(tmp_path / "other.pt"))
    with pytest.raises(ModelFileError, match=r"other\.pt: not a MobileSAM checkpoint"):
        mobile_sam.load(tmp_path / "other.pt")
    short = dict(weights)
    del short["mask_decoder.transformer.layers.1.norm3.bias"]
    with pytest.raises(ModelFileError, match=r"short\.pt: not the expected network \(missing: .*layer_norm3\.bias"):
        mobile_sam.load(write(tmp_path / "short.pt", short), image_size=SIZE)


def test_the_decoder_is_segment_anythings(tmp_path):
    weights = published_weights(1)
    model = mobile_sam.load(write(tmp_path / "mobile_sam.pt", weights), image_size=SIZE)
    g = torch.Generator().manual_seed(2)
    features = torch.randn(1, C, 4, 4, generator=g)
    points = np.array([[3.0, 5.0], [60.2, 17.7], [31.5, 40.0]])
    with torch.no_grad():
        masks, iou = model.predict(features.to(model.pixel_mean.device), points)
        ref_masks, ref_iou = reference_predict(weights, features, points, SIZE)
    assert masks.shape == (3, 3, 16, 16) and iou.shape == (3, 3)
    assert torch.allclose(masks.cpu(), ref_masks, atol=1e-4, rtol=1e-4)
    assert torch.allclose(iou.cpu(), ref_iou, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(masks[0], masks[1])  # the points matter


def test_tinyvit_window_attention():
    for window in (2, 3, 7):  # the original's offset numbering, by its loop
        cells = list(itertools.product(range(window), range(window)))
        offsets, index = {}, []
        for a in cells:
            for b in cells:
                index.append(offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)))
        assert torch.equal(mobile_sam.bias_index(window), torch.tensor(index).view(len(cells), len(cells)))
    torch.manual_seed(0)
    block = mobile_sam.TinyViTBlock(6, 2, 3, 12, 3).eval()
    with torch.no_grad():
        block.attn.attention_biases.normal_()
        block.local_conv.bn.running_mean.uniform_(-0.2, 0.2)
        block.local_conv.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 5, 4, 6)
    attn = block.attn
    padded = F.pad(x, (0, 0, 0, 2, 0, 1))  # zeros to 6×6, normalized and attended like any token
    mixed = torch.zeros_like(padded)
    bias = attn.attention_biases[:, mobile_sam.bias_index(3)]
    for wy, wx in itertools.product(range(2), range(2)):
        tokens = padded[0, 3 * wy:3 * wy + 3, 3 * wx:3 * wx + 3].reshape(9, 6)
        qkv = F.linear(F.layer_norm(tokens, (6,), attn.norm.weight, attn.norm.bias), attn.qkv.weight, attn.qkv.bias)
        heads = []
        for hd in range(2):
            q, k, v = qkv.view(9, 2, 9)[:, hd].split(3, dim=1)
            heads.append(torch.softmax(q @ k.T / math.sqrt(3) + bias[hd], dim=-1) @ v)
        out = F.linear(torch.cat(heads, dim=1), attn.proj.weight, attn.proj.bias)
        mixed[0, 3 * wy:3 * wy + 3, 3 * wx:3 * wx + 3] = out.view(3, 3, 6)
    y = x + mixed[:, :5, :4]
    bn = block.local_conv.bn
    conv = F.conv2d(y.permute(0, 3, 1, 2), block.local_conv.c.weight, padding=1, groups=6)
    conv = (conv - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = (conv * bn.weight[:, None, None] + bn.bias[:, None, None]).permute(0, 2, 3, 1)
    m = block.mlp
    y = y + F.linear(F.gelu(F.linear(F.layer_norm(y, (6,), m.norm.weight, m.norm.bias), m.fc1.weight, m.fc1.bias)),
                     m.fc2.weight, m.fc2.bias)
    with torch.no_grad():
        assert torch.allclose(block(x), y, atol=1e-5)


def test_the_encoder_strides_and_the_input():
    shapes = {k[len("image_encoder."):]: s for k, s in published_layout().items() if k.startswith("image_encoder.")}
    net = mobile_sam.TinyViT(shapes)
    strides = [layer.downsample.conv2.c.stride[0] for layer in net.layers[:-1]]
    assert strides == [2, 2, 1] and net.layers[-1].downsample is None  # 4 × 2 × 2 × 1 = 16
    assert [len(layer.blocks) for layer in net.layers] == [1, 2, 1, 1]
    assert [layer.blocks[0].attn.heads for layer in net.layers[1:]] == [2, 3, 4]
    assert [layer.blocks[0].window for layer in net.layers[1:]] == [3, 2, 4]
    assert net(torch.randn(1, 3, SIZE, SIZE)).shape == (1, C, 4, 4)
    vit_t = published_layout(dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), heads=(0, 4, 5, 10), windows=(0, 7, 14, 7))
    net = mobile_sam.TinyViT({k[len("image_encoder."):]: s for k, s in vit_t.items() if k.startswith("image_encoder.")})
    assert [layer.downsample.conv2.c.stride[0] for layer in net.layers[:-1]] == [2, 2, 1]  # 320 wide: stride 1
    assert [len(layer.blocks) for layer in net.layers] == [2, 2, 6, 2]
    assert [(layer.blocks[0].attn.heads, layer.blocks[0].window) for layer in net.layers[1:]] == [(4, 7), (5, 14),
                                                                                                  (10, 7)]
    with torch.no_grad():
        assert net(torch.randn(1, 3, 96, 96)).shape == (1, C, 6, 6)


# ---- the generator ----------------------------------------------------------------------------------------------

def test_the_generators_defaults_are_controlnet_auxs():
    assert (mobile_sam.POINTS_PER_SIDE, mobile_sam.POINTS_PER_BATCH) == (32, 64)
    assert (mobile_sam.PRED_IOU_THRESH, mobile_sam.STABILITY_THRESH, mobile_sam.STABILITY_OFFSET) == (0.88, 0.95, 1.0)
    assert (mobile_sam.BOX_NMS_THRESH, mobile_sam.IMAGE_SIZE) == (0.7, 1024)
    assert (mobile_sam.FILE.name, mobile_sam.FILE.subfolder) == ("mobile_sam.pt", "mobile_sam")


def test_point_grid_stability_boxes_and_nms():
    grid = mobile_sam.point_grid(4)
    centres = [0.125, 0.375, 0.625, 0.875]
    assert np.allclose(grid, [[x, y] for y in centres for x in centres])  # x fastest
    assert len(mobile_sam.point_grid(32)) == 1024 and np.isclose(mobile_sam.point_grid(32)[0, 0], 1 / 64)

    logits = torch.tensor([[[2.0, 0.5], [-0.5, -3.0]], [[1.5, 1.2], [0.9, -0.99]], [[-2.0, -2.0], [-2.0, -2.0]]])
    score = mobile_sam.stability_score(logits)
    assert score[0].item() == pytest.approx(1 / 3) and score[1].item() == pytest.approx(2 / 4)
    assert math.isnan(score[2].item())  # no pixel above -1: dropped by any threshold
    assert mobile_sam.stability_score(logits, 0.0, 1.2)[1].item() == pytest.approx(1 / 4)  # strict >

    masks = torch.zeros(4, 6, 7, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True
    masks[1, 5, 0] = True
    masks[2, 0, 6] = masks[2, 4, 1] = True
    boxes = mobile_sam.mask_boxes(masks)
    assert boxes.tolist() == [[2, 1, 5, 3], [0, 5, 0, 5], [1, 0, 6, 4], [0, 0, 0, 0]]  # inclusive; empty: zeros

    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 8]]).float()
    scores = torch.tensor([0.9, 0.95, 0.8, 0.5, 0.99])
    # (0,0,10,8) first; (0,0,10,9) has IoU 80/90 with it (> 0.7): out; (0,0,10,10) 80/100: out;
    # (1,1,11,11) 63/117 with the first: kept; the far box: kept
    assert mobile_sam.nms(boxes, scores, 0.7).tolist() == [4, 2, 3]


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        def iou(a, b):
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
            return w * h / union if union > 0 else 0.0
        if all(iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def _between(values: torch.Tensor, fraction: float) -> float:
    """A threshold halfway between two neighbouring values (robust to rounding), near the given quantile."""
    v = values[~values.isnan()].sort().values
    k = min(max(int(len(v) * fraction), 0), len(v) - 2)
    return float((v[k] + v[k + 1]) / 2)


def test_generate_filters_and_deduplicates_as_defined(tmp_path):
    model = mobile_sam.load(write(tmp_path / "mobile_sam.pt", published_weights(3)), image_size=SIZE)
    image = picture(48, 60, seed=4)
    assert model.input_size(48, 60) == (51, 64)  # the long side at 64, int(x + 0.5)
    # every point at once, by the definitions
    points = np.array([[(i + 0.5) / 4 * 60, (j + 0.5) / 4 * 48] for j in range(4) for i in range(4)])
    resized = np.asarray(Image.fromarray(image).resize((64, 51), Image.Resampling.BILINEAR)).astype(np.float32)
    x = (torch.from_numpy(resized).permute(2, 0, 1)[None] - torch.tensor(mobile_sam.PIXEL_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(mobile_sam.PIXEL_STD).view(1, 3, 1, 1)
    x = F.pad(x, (0, 0, 0, 13))
    with torch.no_grad():
        features = model.image_encoder(x.to(model.pixel_mean.device))
        assert torch.allclose(features, model.embed(image), atol=1e-5)
        low, iou = model.predict(features, points * np.array([64 / 60, 51 / 48]))
        logits = F.interpolate(F.interpolate(low, (SIZE, SIZE), mode="bilinear")[..., :51, :64], (48, 60),
                               mode="bilinear").flatten(0, 1).cpu()
    iou = iou.flatten().cpu()
    stability = (logits > 1).sum((1, 2)) / (logits > -1).sum((1, 2))
    iou_t = _between(iou, 0.3)
    stable_t = _between(stability[iou > iou_t], 0.3)
    keep = (iou > iou_t) & (stability >= stable_t)
    assert 0 < int((iou > iou_t).sum()) < 48 and 0 < int(keep.sum()) < int((iou > iou_t).sum())
    index = torch.nonzero(keep)[:, 0]
    masks = (logits > 0)[index].numpy()
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else [0, 0, 0, 0])
    order = _greedy_nms(np.array(boxes, float), iou[index].numpy(), 0.7)

    segments = mobile_sam.generate(model, image, points_per_side=4, points_per_batch=5, pred_iou_thresh=iou_t,
                                   stability_thresh=stable_t)
    assert len(segments) == len(order) and 0 < len(order) < len(index)  # the NMS removed some
    for seg, k in zip(segments, order):
        i = int(index[k])
        assert seg.predicted_iou == pytest.approx(float(iou[i]), abs=1e-5)
        assert seg.stability_score == pytest.approx(float(stability[i]), abs=1e-6)
        assert seg.point == pytest.approx(tuple(points[i // 3]))
        assert np.array_equal(seg.mask, masks[k]) and seg.area == int(masks[k].sum())
        assert list(seg.box) == [int(v) for v in boxes[k]]
    assert [s.predicted_iou for s in segments] == sorted((s.predicted_iou for s in segments), reverse=True)
    none = mobile_sam.generate(model, image, points_per_side=2, pred_iou_thresh=float(iou.max()) + 1)
    assert none == [] and not mobile_sam.detect(model, image, 0, points_per_side=2,
                                                pred_iou_thresh=float(iou.max()) + 1).any()


# ---- the map ----------------------------------------------------------------------------------------------------

def _show_anns(masks: list[np.ndarray], seed: int) -> np.ndarray:
    """controlnet_aux's SamDetector.show_anns, on the global numpy generator after np.random.seed."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        anns = sorted([{"segmentation": m, "area": int(m.sum())} for m in masks], key=lambda a: a["area"],
                      reverse=True)
        h, w = masks[0].shape
        final = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8), mode="RGB")
        for ann in anns:
            m = ann["segmentation"]
            img = np.empty((h, w, 3), dtype=np.uint8)
            for i in range(3):
                img[:, :, i] = np.random.randint(255, dtype=np.uint8)
            final.paste(Image.fromarray(img, mode="RGB"), (0, 0), Image.fromarray(np.uint8(m * 255)))
        return np.array(final, dtype=np.uint8)
    finally:
        np.random.set_state(state)


def _segment(mask: np.ndarray) -> mobile_sam.Segment:
    return mobile_sam.Segment(mask, int(mask.sum()), (0, 0, 0, 0), 1.0, 1.0, (0.0, 0.0))


def test_the_colouring_is_show_anns():
    masks = [np.zeros((9, 12), bool) for _ in range(5)]
    masks[0][2:5, 3:9] = True  # 18
    masks[1][:, :8] = True  # 72: painted first, under the others
    masks[2][4:7, 6:12] = True  # 18: the same area as masks[0], after it
    masks[3][0, 0] = True  # 1: last, on top
    masks[4][5:9, 0:4] = True  # 16
    segments = [_segment(m) for m in masks]
    for seed in (0, 12345, 2**32 - 1):
        ours = mobile_sam.colour_masks(segments, (9, 12), seed)
        assert np.array_equal(ours, _show_anns(masks, seed))
    ours = mobile_sam.colour_masks(segments, (9, 12), 7)
    np.random.seed(7)
    first = [np.random.randint(255, dtype=np.uint8) for _ in range(3)]  # the largest mask's colour
    assert list(ours[8, 7]) == first and not ours[0, 11].any()  # uncovered: black
    assert not np.array_equal(ours, mobile_sam.colour_masks(segments, (9, 12), 8))
    assert not mobile_sam.colour_masks([], (3, 4), 0).any()


def test_detect_and_the_detectors_frame(tmp_path):
    model = mobile_sam.load(write(tmp_path / "mobile_sam.pt", published_weights(5)), image_size=SIZE)
    pic = picture(80, 100)
    assert mobile_sam.aux_resize(pic, 64).shape == (64, 64, 3)  # 64 × 80: both sides to multiples of 64
    assert mobile_sam.aux_resize(pic, 100).shape == (128, 128, 3)  # 100 × 125 rounds to 128 × 128
    assert mobile_sam.aux_resize(pic, 200).shape == (192, 256, 3)  # 200 × 250: the short side can end under it
    assert mobile_sam.aux_resize(picture(60, 200), 64).shape == (64, 192, 3)  # 64 × 213.3 -> 64 × 192
    loose = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_thresh": 0.0}
    small = picture(40, 50)
    out = mobile_sam.detect(model, small, 3, **loose)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8 and out.any()
    segments = mobile_sam.generate(model, small, **loose)
    assert np.array_equal(out, mobile_sam.colour_masks(segments, (40, 50), 3))
    assert np.array_equal(out, mobile_sam.detect(model, small, 3, **loose))  # the seed makes it repeat
    mapped = mobile_sam.run(model, pic, 64, seed=1, **loose)
    assert mapped.shape == (64, 64, 3) and mapped.dtype == np.uint8
    assert np.array_equal(mapped, mobile_sam.detect(model, mobile_sam.aux_resize(pic, 64), 1, **loose))
    gray = mobile_sam.run(model, pic[:, :, 0], 64, seed=1, **loose)
    assert gray.shape == (64, 64, 3)


def test_the_registered_preprocessor_takes_the_seed_and_names_its_file(tmp_path):
    from sdstudio.core.controlnet import ControlNetError
    from sdstudio.engine import annotators
    from sdstudio.engine.preprocessors import _takes_seed

    p = {x.name: x for x in annotators.preprocessors(tmp_path)}["mobile_sam"]
    assert p.control_types == ("Segmentation",) and _takes_seed(p.run)
    with pytest.raises(ControlNetError, match=r"mobile_sam needs mobile_sam\.pt: put mobile_sam\.pt in .*mobile_sam"):
        p.run(picture(), 64, -1, -1, None, seed=1)
