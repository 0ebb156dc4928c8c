"""MobileSAM, the extension's ``mobile_sam`` (Segmentation): SAM's automatic mask generator over MobileSAM
(Zhang et al., "Faster Segment Anything", 2023), loading the published ``mobile_sam.pt`` (dhkim2810/MobileSAM).

The network, as controlnet_aux's ``sam_model_registry["vit_t"]`` builds it:

* image encoder: TinyViT-5M (our own, under the file's names ``image_encoder.*``): a patch embedding of two stride-2
  3×3 convolutions with batch norm and GELU; a stage of MBConv blocks; three stages of TinyViT blocks (window
  attention with learned relative-offset biases, the windows zero-padded at the bottom / right; a depthwise 3×3
  convolution; an MLP); patch merging between stages (stride 2, except before the last stage: the encoder works
  at 1/16, the original tells it by the width 320); the neck (1×1 and 3×3 convolutions, each with a channels-first
  layer norm) to 256 channels. Widths, depths, heads and window sizes are read from the file's shapes (the
  published ones: widths 64 / 128 / 160 / 320, depths 2 / 2 / 6 / 2, heads 4 / 5 / 10 and windows 7 / 14 / 7 in the
  attention stages); the input side (1024) is not in the file, :func:`load` takes it. The file's ImageNet
  classifier (``image_encoder.norm_head``, ``image_encoder.head``) is not used and not kept;
* prompt encoder and mask decoder: SAM's, run by transformers' ``SamPromptEncoder`` / ``SamMaskDecoder``, the
  file's segment_anything names renamed to transformers' by :func:`convert` (the two-way transformer's layer
  norms at SAM's eps 1e-5, not transformers' default 1e-6; 8 heads, which the shapes do not tell).

The generator, as ``SamAutomaticMaskGenerator``'s defaults (no crops, no small-region clean-up): the picture resized
(PIL bilinear) to 1024 on its long side, normalized by SAM's pixel mean / std and zero-padded to 1024²; a 32×32 grid
of single foreground points (cell centres, x fastest), 64 points a batch, three masks each (multimask); masks kept
whose predicted IoU > 0.88 and whose stability score (IoU of the logits thresholded at +1 and -1) >= 0.95, the
logits brought to the picture's size first (bilinear to the padded input, cropped, bilinear to the picture), then
binarized at 0; their boxes (inclusive pixel extents) deduplicated by box NMS at 0.7 by
predicted IoU (the NMS of :mod:`.densepose`, torchvision's rule).

The map, as controlnet_aux's ``SamDetector``: masks in decreasing area (ties in the NMS order), each painted over
the ones before in a colour of three ``randint(255)`` draws from numpy's legacy generator (R, G, B), on black;
``seed`` seeds that generator as the extension's ``np.random.seed`` before preprocessing does (None: a fresh one).
:func:`run` is the detector's frame: the picture (gray / RGBA made RGB) resized to controlnet_aux's
``resize_image`` size (short side at the resolution, both sides rounded to multiples of 64, Lanczos up / area
down), the map made there, then resized bilinearly to ``resize_image`` of that picture (in practice the same
size, so the map keeps the multiples of 64). The
extension fails on a picture where no mask survives; here the map is black.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network, count_indexed, hwc3, renamed_weights
from .densepose import nms

FILE = AnnotatorFile("mobile_sam.pt", "mobile_sam", "dhkim2810/MobileSAM on the Hugging Face hub")
IMAGE_SIZE = 1024  # the encoder's input (long side, padded square)
PATCH = 16  # the encoder's stride
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
DECODER_HEADS = 8
MASK_THRESHOLD = 0.0
POINTS_PER_SIDE = 32
POINTS_PER_BATCH = 64
PRED_IOU_THRESH = 0.88
STABILITY_THRESH = 0.95
STABILITY_OFFSET = 1.0
BOX_NMS_THRESH = 0.7


# ---- TinyViT (the published names) ------------------------------------------------------------------------------

class ConvBN(nn.Sequential):
    """A bias-free convolution and its batch norm (``c``, ``bn``)."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, dim // 2, 3, 2, 1), nn.GELU(), ConvBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x):  # B×C×H×W
        y = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return F.gelu(x + y)


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x):  # B×C×H×W
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def bias_index(window: int) -> torch.Tensor:
    """Which learned bias each pair of a window's positions uses: their offset (|dy|, |dx|) numbered in the
    order TinyViT first meets it, which is dy × window + dx."""
    r = torch.arange(window).repeat_interleave(window)
    c = torch.arange(window).repeat(window)
    return (r[:, None] - r[None, :]).abs() * window + (c[:, None] - c[None, :]).abs()


class Attention(nn.Module):
    """Multi-head attention within a window, after a layer norm, with a per-head bias for each offset."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.key_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        self.register_buffer("attention_bias_idxs", bias_index(window), persistent=False)

    def forward(self, x):  # B×N×C
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, -1)  # per head: q, k, v
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.key_dim] * 3, dim=3))
        bias = self.attention_biases[:, self.attention_bias_idxs]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, mlp_hidden: int, local_k: int):
        super().__init__()
        self.window = window
        self.attn = Attention(dim, heads, window)
        self.mlp = Mlp(dim, mlp_hidden)
        self.local_conv = ConvBN(dim, dim, local_k, 1, local_k // 2, groups=dim)

    def forward(self, x):  # B×H×W×C
        b, h, w, c = x.shape
        s = self.window
        pad_b, pad_r = -h % s, -w % s
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zeros, normalized and attended as the original does
        nh, nw = (h + pad_b) // s, (w + pad_r) // s
        y = y.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s * s, c)
        y = self.attn(y).view(b, nh, nw, s, s, c).transpose(2, 3).reshape(b, nh * s, nw * s, c)
        x = x + y[:, :h, :w]
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class Stage(nn.Module):
    """``blocks`` and the optional ``downsample`` after them; B×C×H×W in and out."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None, tokens: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.tokens = tokens  # TinyViT blocks work on B×H×W×C

    def forward(self, x):
        if self.tokens:
            x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        if self.tokens:
            x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's image encoder built from the file's shapes (names without ``image_encoder.``)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.patch_embed = PatchEmbed(shapes["patch_embed.seq.2.c.weight"][0])
        count = count_indexed(shapes, r"layers\.(\d+)\.")
        dim = shapes["patch_embed.seq.2.c.weight"][0]
        self.layers = nn.ModuleList()
        for i in range(count):
            p = f"layers.{i}."
            depth = count_indexed(shapes, rf"layers\.{i}\.blocks\.(\d+)\.")
            if p + "blocks.0.attn.qkv.weight" in shapes:
                heads, offsets = shapes[p + "blocks.0.attn.attention_biases"]
                window = math.isqrt(offsets)
                blocks = [TinyViTBlock(dim, heads, window, shapes[p + f"blocks.{j}.mlp.fc1.weight"][0],
                                       shapes[p + f"blocks.{j}.local_conv.c.weight"][-1]) for j in range(depth)]
            else:
                blocks = [MBConv(dim, shapes[p + f"blocks.{j}.conv1.c.weight"][0]) for j in range(depth)]
            down = None
            if i < count - 1:
                out = shapes[p + "downsample.conv1.c.weight"][0]
                down = PatchMerging(dim, out, 1 if i == count - 2 else 2)
                dim = out
            self.layers.append(Stage(blocks, down, tokens=p + "blocks.0.attn.qkv.weight" in shapes))
        out = shapes["neck.0.weight"][0]
        self.neck = nn.Sequential(nn.Conv2d(dim, out, 1, bias=False), LayerNorm2d(out),
                                  nn.Conv2d(out, out, 3, padding=1, bias=False), LayerNorm2d(out))

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


# ---- the whole network ------------------------------------------------------------------------------------------

class MobileSam(nn.Module):
    """TinyViT, and SAM's prompt encoder and mask decoder (transformers'), for inputs of ``image_size``²."""

    def __init__(self, encoder: TinyViT, prompt_encoder: nn.Module, mask_decoder: nn.Module, image_size: int):
        super().__init__()
        self.image_encoder, self.prompt_encoder, self.mask_decoder = encoder, prompt_encoder, mask_decoder
        self.image_size = image_size
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The picture's size with its long side at ``image_size`` (SAM's ``ResizeLongestSide``)."""
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def embed(self, image: np.ndarray) -> torch.Tensor:
        """The image embedding (1×C×n×n) of an RGB uint8 picture."""
        nh, nw = self.input_size(*image.shape[:2])
        resized = np.array(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.Resampling.BILINEAR))
        device = self.pixel_mean.device
        x = torch.from_numpy(resized).to(device).permute(2, 0, 1)[None].float()
        x = (x - self.pixel_mean) / self.pixel_std
        x = F.pad(x, (0, self.image_size - nw, 0, self.image_size - nh))
        return self.image_encoder(x)

    def dense_pe(self, n: int) -> torch.Tensor:
        """The positional encoding of the n×n embedding's cell centres (1×C×n×n)."""
        grid = torch.ones((n, n), device=self.pixel_mean.device)
        xy = torch.stack([(grid.cumsum(1) - 0.5) / n, (grid.cumsum(0) - 0.5) / n], dim=-1)
        return self.prompt_encoder.shared_embedding(xy).permute(2, 0, 1)[None]

    def predict(self, features: torch.Tensor, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Three low-resolution mask logits (P×3×4n×4n) and their predicted IoUs (P×3) for single foreground
        points (P×2, x / y in the resized picture's pixels)."""
        device = features.device
        coords = torch.as_tensor(points, dtype=torch.float64, device=device)[None, :, None, :]
        labels = torch.ones(coords.shape[:3], dtype=torch.int, device=device)
        sparse, dense = self.prompt_encoder(coords, labels, None, None)
        masks, iou = self.mask_decoder(features, self.dense_pe(features.shape[-1]), sparse, dense,
                                       multimask_output=True)
        return masks[0], iou[0]

    def upscale(self, low: torch.Tensor, input_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """Low-resolution logits to the picture's size: to the padded input, cropped, then to ``size``."""
        x = F.interpolate(low, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x[..., :input_size[0], :input_size[1]]
        return F.interpolate(x, size, mode="bilinear", align_corners=False)


_RENAMES = (  # segment_anything's names -> transformers'
    (r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
     "prompt_encoder.shared_embedding.positional_embedding"),
    (r"prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
)
_MLP = re.compile(r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)")


def convert(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published state dict in our names: the decoder's in transformers' (an MLP's ``layers.0`` / last /
    middle ones are its ``proj_in`` / ``proj_out`` / ``layers.i - 1``), the classifier head dropped."""
    depths: dict[str, int] = {}
    for key in weights:
        if m := _MLP.fullmatch(key):
            depths[m[1]] = max(depths.get(m[1], 0), int(m[2]) + 1)

    def rename(key: str) -> str | None:
        if key.startswith(("image_encoder.head.", "image_encoder.norm_head.")):
            return None
        if m := _MLP.fullmatch(key):
            i, last = int(m[2]), depths[m[1]] - 1
            part = "proj_in" if i == 0 else "proj_out" if i == last else f"layers.{i - 1}"
            return f"{m[1]}.{part}.{m[3]}"
        for pattern, new in _RENAMES:
            if re.match(pattern, key):
                return re.sub(pattern, new, key, count=1)
        return key

    return renamed_weights(weights, rename)


def _build(weights: dict[str, torch.Tensor], path: Path, image_size: int) -> MobileSam:
    from transformers.models.sam.configuration_sam import SamConfig
    from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPromptEncoder

    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    try:
        encoder = TinyViT({k[len("image_encoder."):]: s for k, s in shapes.items() if k.startswith("image_encoder.")})
        hidden = shapes["mask_decoder.iou_token.weight"][1]
        decoder = {
            "hidden_size": hidden, "num_attention_heads": DECODER_HEADS, "layer_norm_eps": 1e-5,
            "mlp_dim": shapes["mask_decoder.transformer.layers.0.mlp.lin1.weight"][0],
            "num_hidden_layers": count_indexed(shapes, r"mask_decoder\.transformer\.layers\.(\d+)\."),
            "attention_downsample_rate":
                hidden // shapes["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"][0],
            "num_multimask_outputs": shapes["mask_decoder.mask_tokens.weight"][0] - 1,
            "iou_head_depth": count_indexed(shapes, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
            "iou_head_hidden_dim": shapes["mask_decoder.iou_prediction_head.layers.0.weight"][0]}
        prompt = {"hidden_size": hidden, "image_size": image_size, "patch_size": PATCH,
                  "mask_input_channels": shapes["prompt_encoder.mask_downscaling.3.weight"][0],
                  "num_point_embeddings": count_indexed(shapes, r"prompt_encoder\.point_embeddings\.(\d+)\.")}
        features = shapes["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"][1]
    except KeyError as exc:
        raise ModelFileError(f"{path.name}: not a MobileSAM checkpoint (no {exc.args[0]})") from None
    except (IndexError, ValueError, ZeroDivisionError) as exc:
        raise ModelFileError(f"{path.name}: not a MobileSAM checkpoint ({exc})") from None
    config = SamConfig(vision_config={"num_pos_feats": features}, prompt_encoder_config=prompt,
                       mask_decoder_config=decoder)
    config.mask_decoder_config._attn_implementation = "sdpa"  # what SamModel would hand its decoder
    return MobileSam(encoder, SamPromptEncoder(config), SamMaskDecoder(config.mask_decoder_config), image_size)


def load(path, image_size: int = IMAGE_SIZE) -> MobileSam:
    """The network of a ``mobile_sam.pt`` (kept for the process); ``image_size`` is the encoder's input side."""
    path = Path(path)
    return cached_network(path, f"mobile_sam@{image_size}", lambda w: _build(w, path, image_size), convert=convert)


# ---- the automatic mask generator -------------------------------------------------------------------------------

@dataclass
class Segment:
    mask: np.ndarray  # H×W bool
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    predicted_iou: float
    stability_score: float
    point: tuple[float, float]


def point_grid(n: int) -> np.ndarray:
    """n² points (x, y) in [0, 1]²: the cell centres of an n×n grid, x varying fastest."""
    side = np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    return np.stack([np.tile(side[None, :], (n, 1)), np.tile(side[:, None], (1, n))], axis=-1).reshape(-1, 2)


def stability_score(logits: torch.Tensor, threshold: float = MASK_THRESHOLD,
                    offset: float = STABILITY_OFFSET) -> torch.Tensor:
    """Per mask: pixels above threshold + offset over pixels above threshold - offset."""
    inner = (logits > threshold + offset).flatten(-2).sum(-1, dtype=torch.int32)
    outer = (logits > threshold - offset).flatten(-2).sum(-1, dtype=torch.int32)
    return inner / outer


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """N×H×W bool -> N×4 (x0, y0, x1, y1) of the set pixels, inclusive; (0, 0, 0, 0) for an empty mask."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.long, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ys, -1).amax(1)
    y0 = torch.where(rows, ys, h).amin(1)
    x1 = torch.where(cols, xs, -1).amax(1)
    x0 = torch.where(cols, xs, w).amin(1)
    out = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where((x1 >= x0)[:, None], out, torch.zeros_like(out))


@torch.no_grad()
def generate(model: MobileSam, image: np.ndarray, points_per_side: int = POINTS_PER_SIDE,
             points_per_batch: int = POINTS_PER_BATCH, pred_iou_thresh: float = PRED_IOU_THRESH,
             stability_thresh: float = STABILITY_THRESH, stability_offset: float = STABILITY_OFFSET,
             box_nms_thresh: float = BOX_NMS_THRESH) -> list[Segment]:
    """The masks of an RGB uint8 picture, in the generator's order (box NMS's: highest predicted IoU first)."""
    h, w = image.shape[:2]
    input_size = model.input_size(h, w)
    features = model.embed(image)
    points = point_grid(points_per_side) * np.array([w, h], dtype=np.float64)
    scale = np.array([input_size[1] / w, input_size[0] / h])
    packed, areas, boxes, ious, scores, origins = [], [], [], [], [], []
    for start in range(0, len(points), points_per_batch):
        batch = points[start:start + points_per_batch]
        low, iou = model.predict(features, batch * scale)
        logits = model.upscale(low, input_size, (h, w)).flatten(0, 1)
        iou = iou.flatten()
        origin = torch.arange(len(batch), device=iou.device).repeat_interleave(low.shape[1]) + start
        keep = iou > pred_iou_thresh if pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
        logits, iou, origin = logits[keep], iou[keep], origin[keep]
        stable = stability_score(logits, MASK_THRESHOLD, stability_offset)
        if stability_thresh > 0:
            keep = stable >= stability_thresh
            logits, iou, origin, stable = logits[keep], iou[keep], origin[keep], stable[keep]
        masks = logits > MASK_THRESHOLD
        del logits
        boxes.append(mask_boxes(masks).cpu())
        areas.append(masks.flatten(1).sum(1).cpu())
        packed.append(np.packbits(masks.flatten(1).cpu().numpy(), axis=1))
        ious.append(iou.float().cpu())
        scores.append(stable.float().cpu())
        origins.append(origin.cpu())
    if not ious:
        return []
    all_boxes, all_ious = torch.cat(boxes), torch.cat(ious)
    all_areas, all_scores, all_origins = torch.cat(areas), torch.cat(scores), torch.cat(origins)
    all_packed = np.concatenate(packed)
    out = []
    for i in nms(all_boxes.float(), all_ious, box_nms_thresh).tolist():
        mask = np.unpackbits(all_packed[i], count=h * w).astype(bool).reshape(h, w)
        x, y = points[int(all_origins[i])]
        out.append(Segment(mask, int(all_areas[i]), tuple(int(v) for v in all_boxes[i]), float(all_ious[i]),
                           float(all_scores[i]), (float(x), float(y))))
    return out


# ---- the map ----------------------------------------------------------------------------------------------------

def colour_masks(segments: list[Segment], size: tuple[int, int], seed: int | None = None) -> np.ndarray:
    """controlnet_aux's ``show_anns``: largest first (a stable sort), each mask painted over the others in three
    ``randint(255)`` draws (R, G, B) from numpy's legacy generator seeded with ``seed``; black where none."""
    rng = np.random.RandomState(seed)
    canvas = np.zeros((*size, 3), np.uint8)
    for segment in sorted(segments, key=lambda s: s.area, reverse=True):
        colour = [rng.randint(255, dtype=np.uint8) for _ in range(3)]
        canvas[segment.mask] = colour
    return canvas


def detect(model: MobileSam, image: np.ndarray, seed: int | None = None, **generator) -> np.ndarray:
    """The coloured masks of an RGB uint8 picture at its own size (``generator``: :func:`generate`'s
    parameters, the published defaults otherwise)."""
    image = np.ascontiguousarray(image)
    return colour_masks(generate(model, image, **generator), image.shape[:2], seed)


def aux_size(h: int, w: int, resolution: float) -> tuple[int, int]:
    """The (height, width) controlnet_aux's ``resize_image`` gives: the short side at ``resolution``, both sides
    rounded to multiples of 64 (at least 64; the original can give 0)."""
    k = float(resolution) / min(h, w)
    th, tw = (max(1, int(np.round(side * k / 64.0))) * 64 for side in (h, w))
    return th, tw


def aux_resize(image: np.ndarray, resolution: float) -> np.ndarray:
    """controlnet_aux's ``resize_image`` (:func:`aux_size`; Lanczos up, area down)."""
    h, w = image.shape[:2]
    th, tw = aux_size(h, w, resolution)
    return cv2.resize(image, (tw, th), interpolation=cv2.INTER_LANCZOS4 if resolution > min(h, w) else cv2.INTER_AREA)


def run(model: MobileSam, image: np.ndarray, resolution: float = 512, seed: int | None = None,
        **generator) -> np.ndarray:
    """The extension's ``mobile_sam`` map: the detector's frame around :func:`detect` (see the module)."""
    picture = aux_resize(hwc3(image, "ControlNet mobile_sam"), resolution)
    detected = detect(model, picture, seed, **generator)
    th, tw = aux_size(*picture.shape[:2], resolution)
    if detected.shape[:2] != (th, tw):
        detected = cv2.resize(detected, (tw, th), interpolation=cv2.INTER_LINEAR)
    return detected

