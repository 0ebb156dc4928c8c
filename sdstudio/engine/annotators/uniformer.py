"""UniFormer segmentation, the extension's ``segmentation`` preprocessor (label ``seg_ufade20k``): the published
``upernet_global_small.pth`` (lllyasviel's ControlNet annotators; an mmsegmentation checkpoint, ``state_dict``
with ``backbone.*``, ``decode_head.*`` and the training-only ``auxiliary_head.*``) is a UniFormer-S backbone
(two stages of convolutional blocks, two of global self-attention) under an UperNet head trained on ADE20K's 150
classes.

The backbone is ours, built from the file's shapes under its names; the head is transformers' ``UperNetHead``,
which is mmsegmentation's ``UPerHead`` (pyramid pooling, FPN, 1×1 classifier) with other names.

As the extension (its mmsegmentation pipeline): the picture is rescaled so its short side is 512 (long side at
most 2048; OpenCV's bilinear), normalized with ImageNet's mean and std after a red/blue swap (the pipeline's
``to_rgb`` expects BGR but is given RGB, so the network sees BGR with the means in RGB order: kept, since the
network's ControlNet was trained on maps made this way), segmented, the logits brought back to the picture's size
(bilinear), and every pixel painted with its class's ADE20K colour.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network, compute_device, count_indexed

FILE = AnnotatorFile("upernet_global_small.pth", "uniformer",
                     "lllyasviel/ControlNet (annotator/ckpts/) on the Hugging Face hub")
SCALE = (2048, 512)  # the test pipeline's img_scale: long side at most 2048, short side 512
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
HEAD_DIM = 64
POOL_SCALES = (1, 2, 3, 6)
# mmsegmentation's ADE20K palette, class 0 ("wall") first
ADE20K_PALETTE = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
], np.uint8)


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, conv: bool):
        super().__init__()
        layer = (lambda a, b: nn.Conv2d(a, b, 1)) if conv else nn.Linear
        self.fc1, self.act, self.fc2 = layer(dim, hidden), nn.GELU(), layer(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """UniFormer's local block (``CBlock``): depthwise position convolution, then a 5×5 depthwise "attention"
    between 1×1 projections and a convolutional MLP, both after batch norms."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1, self.norm2 = nn.BatchNorm2d(dim), nn.BatchNorm2d(dim)
        self.conv1, self.conv2 = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.mlp = ConvMlp(dim, hidden, conv=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class AttentionBlock(nn.Module):
    """UniFormer's global block (``SABlock``): depthwise position convolution, then multi-head self-attention
    over every position and an MLP, pre-norm (layer norms, ε 1e-6)."""

    def __init__(self, dim: int, hidden: int, heads: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = ConvMlp(dim, hidden, conv=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class PatchEmbed(nn.Module):
    """A strided convolution (4 for the first stage, 2 after) and a layer norm over the channels."""

    def __init__(self, cin: int, cout: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, patch, patch)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class UniFormer(nn.Module):
    """The backbone, in the file's names (``patch_embed1-4``, ``blocks1-4``, ``norm1-4``): four stages at
    strides 4, 8, 16, 32; each stage's output goes through its layer norm (ε 1e-6) to the head. Which stages are
    convolutional and which attend is read from the blocks' names; widths and depths from the shapes."""

    def __init__(self, dims: list[int], depths: list[int], hidden: list[int], attends: list[bool]):
        super().__init__()
        cin = 3
        for i, (dim, depth, wide, attend) in enumerate(zip(dims, depths, hidden, attends, strict=True), start=1):
            setattr(self, f"patch_embed{i}", PatchEmbed(cin, dim, 4 if i == 1 else 2))
            blocks = [AttentionBlock(dim, wide, max(1, dim // HEAD_DIM)) if attend else ConvBlock(dim, wide)
                      for _ in range(depth)]
            setattr(self, f"blocks{i}", nn.ModuleList(blocks))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
            cin = dim
        self.stages = len(dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in range(1, self.stages + 1):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"blocks{i}"):
                x = block(x)
            out.append(getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return out


class Segmentor(nn.Module):
    """Backbone and UperNet head: class logits at a quarter of the input's size."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetHead

        stages = count_indexed(weights, r"backbone\.patch_embed(\d+)\.proj\.weight") - 1
        if stages < 1 or "decode_head.conv_seg.weight" not in weights:
            raise ModelFileError("not an UperNet UniFormer checkpoint (no backbone.patch_embed1 or "
                                 "decode_head.conv_seg)")
        try:
            dims = [weights[f"backbone.patch_embed{i}.proj.weight"].shape[0] for i in range(1, stages + 1)]
            depths = [count_indexed(weights, rf"backbone\.blocks{i}\.(\d+)\.") for i in range(1, stages + 1)]
            hidden = [weights[f"backbone.blocks{i}.0.mlp.fc1.weight"].shape[0] if depths[i - 1] else dims[i - 1]
                      for i in range(1, stages + 1)]
        except KeyError as exc:
            raise ModelFileError(f"not a whole UperNet UniFormer checkpoint: {exc.args[0]} is missing") from None
        attends = [f"backbone.blocks{i}.0.attn.qkv.weight" in weights for i in range(1, stages + 1)]
        self.backbone = UniFormer(dims, depths, hidden, attends)
        classes, channels = weights["decode_head.conv_seg.weight"].shape[:2]
        pools = count_indexed(weights, r"decode_head\.psp_modules\.(\d+)\.")
        config = UperNetConfig(hidden_size=int(channels), num_labels=int(classes), pool_scales=list(POOL_SCALES[:pools]))
        self.head = UperNetHead(config, in_channels=dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def convert(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's names to ours: ``decode_head.`` → ``head.`` (mmcv's ``bn`` → ``batch_norm``, ``conv_seg`` →
    ``classifier``); the auxiliary FCN head (training only) is left out."""
    out = {}
    for key, value in weights.items():
        if key.startswith("backbone."):
            out[key] = value
        elif key.startswith("decode_head."):
            name = "head." + key[len("decode_head."):].replace(".bn.", ".batch_norm.")
            out[name.replace("head.conv_seg.", "head.classifier.")] = value
    return out


def load(path: Path) -> Segmentor:
    return cached_network(path, "uniformer", Segmentor, convert=convert)  # type: ignore[return-value]


def rescaled(image: np.ndarray) -> np.ndarray:
    """mmcv's ``imrescale`` to :data:`SCALE` keeping the ratio (sizes rounded half up, bilinear)."""
    h, w = image.shape[:2]
    factor = min(max(SCALE) / max(h, w), min(SCALE) / min(h, w))
    size = (int(w * factor + 0.5), int(h * factor + 0.5))
    return image if size == (w, h) else cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def normalized(image: np.ndarray) -> torch.Tensor:
    """The network's input (1×3×H×W) from an RGB picture: channels swapped, then ImageNet's mean and std in RGB
    order (the pipeline's ``to_rgb`` swap given RGB, see the module's docstring)."""
    x = (image[..., ::-1].astype(np.float32) - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]


@torch.no_grad()
def segment(model: Segmentor, image: np.ndarray) -> np.ndarray:
    """The class of every pixel (H×W int64) of an RGB picture, as the extension's pipeline computes it."""
    h, w = image.shape[:2]
    t = normalized(rescaled(image)).to(compute_device())
    logits = model(t)
    logits = F.interpolate(logits, size=t.shape[2:], mode="bilinear", align_corners=False)
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu().numpy()


def colorize(classes: np.ndarray, palette: np.ndarray = ADE20K_PALETTE) -> np.ndarray:
    """Each class's palette colour (classes past the palette stay black, as mmsegmentation leaves them)."""
    out = np.zeros((*classes.shape, 3), np.uint8)
    inside = classes < len(palette)
    out[inside] = palette[classes[inside]]
    return out


def detect(model: Segmentor, image: np.ndarray) -> np.ndarray:
    return colorize(segment(model, image))
