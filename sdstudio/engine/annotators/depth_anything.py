"""Depth Anything relative depth, the extension's ``depth_anything`` (v1) and ``depth_anything_v2``: the
published ``depth_anything_vitl14.pth`` / ``depth_anything_v2_vitl.safetensors`` (a DINOv2 ViT-L/14 under
``pretrained.`` and a DPT head under ``depth_head.``, the same names in both versions) is converted to
transformers' ``DepthAnythingForDepthEstimation`` when it loads. The sizes come from the file's shapes (ViT-S/B/L
files all load; heads are width / 64 as in DINOv2); the features are the last four blocks' in v1, and in v2 the
blocks v2 fixes per encoder (ViT-L: 4, 11, 17, 23). Pre- and post-processing are the same for both versions in
the extension.

Two details follow the original rather than transformers: the position embeddings are interpolated with
DINOv2's 0.1 offset on the scale factors (transformers interpolates to the size), and the picture reaches the
network with its channels swapped (the extension converts its RGB picture "BGR to RGB"). The input is the
picture resized (bicubic) so that both sides are at least 518 and multiples of 14, ImageNet-normalized; the
depth comes back at the picture's size (bilinear), min-max stretched to 0-255.
"""

from __future__ import annotations

import math
import re
import types

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network, renamed_weights
from .midas import decoder_name

FILE = AnnotatorFile("depth_anything_vitl14.pth", "depth_anything",
                     "the LiheYoung/Depth-Anything space (checkpoints/) on the Hugging Face hub")
FILE_V2 = AnnotatorFile("depth_anything_v2_vitl.safetensors", "depth_anything_v2",
                        "MackinationsAi/Depth-Anything-V2_Safetensors (or depth-anything/Depth-Anything-V2-Large, "
                        "the .pth) on the Hugging Face hub", also=("depth_anything_v2_vitl.pth",))
# v2 reads these blocks (0-based) per encoder depth: vits/vitb 12, vitl 24, vitg 40 (v1: the last four)
V2_BLOCKS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}
SIZE = 518
PATCH = 14
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_OFFSET = 0.1  # DINOv2's interpolation offset

# published name (after "pretrained.blocks.N.") -> transformers' (after "backbone.encoder.layer.N.")
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "ls1.gamma": "layer_scale1.lambda1",
          "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_EMBEDDINGS = {"cls_token": "cls_token", "mask_token": "mask_token", "pos_embed": "position_embeddings",
               "patch_embed.proj.weight": "patch_embeddings.projection.weight",
               "patch_embed.proj.bias": "patch_embeddings.projection.bias"}


def _rename(key: str) -> list[str] | str:
    """The transformers name of a published key (a list of three for a fused q/k/v tensor)."""
    if key.startswith("pretrained."):
        rest = key[len("pretrained."):]
        if rest in _EMBEDDINGS:
            return f"backbone.embeddings.{_EMBEDDINGS[rest]}"
        if rest.startswith("norm."):
            return f"backbone.layernorm.{rest[5:]}"
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", rest)
        if m:
            block, name, kind = m.groups()
            prefix = f"backbone.encoder.layer.{block}"
            if name == "attn.qkv":
                return [f"{prefix}.attention.{p}_proj.{kind}" for p in ("q", "k", "v")]
            if name in ("ls1", "ls2"):
                return f"{prefix}.{_BLOCK[f'{name}.gamma']}"
            if name in _BLOCK:
                return f"{prefix}.{_BLOCK[name]}.{kind}"
    elif key.startswith("depth_head."):
        rest = key[len("depth_head."):]
        m = re.fullmatch(r"projects\.(\d)\.(weight|bias)", rest)
        if m:
            return f"neck.reassemble_stage.layers.{m[1]}.projection.{m[2]}"
        m = re.fullmatch(r"resize_layers\.(\d)\.(weight|bias)", rest)
        if m:
            return f"neck.reassemble_stage.layers.{m[1]}.resize.{m[2]}"
        if rest.startswith("scratch.") and (name := decoder_name(rest[len("scratch."):])) is not None:
            return name  # MiDaS's decoder names (layerN_rn, the refinenets)
        head = {"scratch.output_conv1": "head.conv1", "scratch.output_conv2.0": "head.conv2",
                "scratch.output_conv2.2": "head.conv3"}
        base, _, kind = rest.rpartition(".")
        if base in head:
            return f"{head[base]}.{kind}"
    raise ModelFileError(f"{FILE.name}: unexpected key {key!r} for Depth Anything")


def to_transformers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published state dict in transformers' names (q, k and v split from DINOv2's fused projection)."""
    return renamed_weights(weights, _rename)


def feature_blocks(blocks: int, version: int = 1) -> list[int]:
    """The 0-based blocks whose outputs the head reads: v1 the last four, v2 fixed ones per encoder size."""
    if version == 1:
        return list(range(blocks - 4, blocks))
    if blocks not in V2_BLOCKS:
        raise ModelFileError(f"{FILE_V2.name}: not a Depth Anything v2 checkpoint ({blocks} blocks; v2 encoders have "
                             f"{', '.join(map(str, V2_BLOCKS))})")
    return list(V2_BLOCKS[blocks])


def config_for(weights: dict[str, torch.Tensor], version: int = 1):
    """The transformers config the published file's shapes describe (``version`` 2: Depth Anything v2, which
    differs only in the blocks it reads)."""
    from transformers import DepthAnythingConfig, Dinov2Config

    try:
        pos = weights["pretrained.pos_embed"]
        hidden = pos.shape[-1]
        blocks = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("pretrained.blocks."))
        mlp = weights["pretrained.blocks.0.mlp.fc1.weight"].shape[0]
        neck = [weights[f"depth_head.projects.{i}.weight"].shape[0] for i in range(4)]
        features = weights["depth_head.scratch.layer1_rn.weight"].shape[0]
        head_hidden = weights["depth_head.scratch.output_conv2.0.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:
        name = FILE.name if version == 1 else FILE_V2.name
        raise ModelFileError(f"{name}: not a Depth Anything (v{version}) checkpoint ({exc})") from None
    grid = math.isqrt(pos.shape[1] - 1)
    backbone = Dinov2Config(image_size=grid * PATCH, patch_size=PATCH, hidden_size=hidden, num_hidden_layers=blocks,
                            num_attention_heads=max(1, hidden // 64), mlp_ratio=mlp // hidden,
                            out_indices=[i + 1 for i in feature_blocks(blocks, version)], apply_layernorm=True,
                            reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, patch_size=PATCH, reassemble_hidden_size=hidden,
                               neck_hidden_sizes=neck, fusion_hidden_size=features, head_hidden_size=head_hidden,
                               reassemble_factors=[4, 2, 1, 0.5], depth_estimation_type="relative")


def _dinov2_positions(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINOv2's own interpolation of the position grid: bicubic with scale factors (n + 0.1) / grid."""
    patches, grid_positions = embeddings.shape[1] - 1, self.position_embeddings.shape[1] - 1
    if patches == grid_positions and height == width:
        return self.position_embeddings
    pos = self.position_embeddings.float()
    dim, grid = pos.shape[-1], math.isqrt(grid_positions)
    rows, cols = height // PATCH, width // PATCH
    grid_map = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    grid_map = F.interpolate(grid_map, scale_factor=((rows + _OFFSET) / grid, (cols + _OFFSET) / grid),
                             mode="bicubic", antialias=False)
    grid_map = grid_map.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos[:, :1], grid_map], dim=1).to(embeddings.dtype)


class DepthAnything(nn.Module):
    """transformers' network under ``model``; :meth:`state_dict` keys are transformers' (the loader converts)."""

    def __init__(self, config):
        super().__init__()
        from transformers import DepthAnythingForDepthEstimation

        with torch.device("meta"):  # no random init of ~335M parameters: the file's tensors are assigned
            self.model = DepthAnythingForDepthEstimation(config)
        embeddings = self.model.backbone.embeddings
        embeddings.interpolate_pos_encoding = types.MethodType(_dinov2_positions, embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).predicted_depth


def _converted(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in to_transformers(weights).items()}


def load(path, version: int = 1) -> DepthAnything:
    return cached_network(path, f"depth_anything_v{version}",
                          lambda weights: DepthAnything(config_for(weights, version)), convert=_converted)


def input_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) the network runs at: scaled so the shorter side reaches 518 (both at least 518), each
    side rounded to a multiple of 14, rounded up where rounding would go under 518."""
    scale = max(SIZE / height, SIZE / width)

    def fit(x: float) -> int:
        y = int(np.round(x / PATCH) * PATCH)
        return int(np.ceil(x / PATCH) * PATCH) if y < SIZE else y

    return fit(scale * height), fit(scale * width)


@torch.no_grad()
def detect(net: DepthAnything, image: np.ndarray) -> np.ndarray:
    """H×W uint8 relative depth (near is bright) of an RGB uint8 picture."""
    h, w = image.shape[:2]
    swapped = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) / 255.0  # the extension's swap of its RGB picture
    th, tw = input_size(h, w)
    x = cv2.resize(swapped, (tw, th), interpolation=cv2.INTER_CUBIC)
    x = ((x - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1).astype(np.float32)
    param = next(net.parameters())
    depth = net(torch.from_numpy(np.ascontiguousarray(x))[None].to(param.device, param.dtype)).float()
    depth = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    span = depth.max() - depth.min()
    if span <= 0:
        return np.zeros((h, w), np.uint8)
    return ((depth - depth.min()) / span * 255.0).cpu().numpy().astype(np.uint8)
