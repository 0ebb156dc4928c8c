"""MiDaS v2.1 DPT-Hybrid relative depth, the extension's ``depth`` (label ``depth_midas``) and ``normal_map``
(label ``normal_midas``): the published ``dpt_hybrid-midas-501f0c75.pt`` (timm's "vit_base_resnet50_384"
under ``pretrained.model.``: a ResNet-50 v2 stem of three stages with weight-standardized convolutions and
group norms, then ViT-B/16 over its 1/16 map; the DPT reassemble layers under ``pretrained.act_postprocess*``
and the fusion decoder under ``scratch.``) is converted to transformers' hybrid ``DPTForDepthEstimation``
(BiT backbone) when it loads.

transformers' own forward only takes 384×384 square inputs for the hybrid model; the extension runs the
network on the padded picture as it is (any multiple of 64, not square). :class:`Midas` therefore drives
transformers' modules itself as MiDaS's ``forward_flex`` does: the BiT stages' first two maps are the first two
features, the position grid is resized (bilinear) to the picture's grid, and blocks 9 and 12 (three quarters
and the last, for files of other depths) give the other two; the neck and head are transformers'.

The picture goes in RGB as ``x / 127.5 - 1`` (no resize, no normalization beyond that). Depth: min-max
stretched to 0-255 (truncating). Normal: Sobel x/y (3×3) of the raw prediction, zeroed where the stretched
depth is under the background threshold, with z = 2π, normalized, mapped to 0-255 and the channels reversed
(as the extension returns it).
"""

from __future__ import annotations

import math
import re

import cv2
import numpy as np
import torch
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network, count_indexed, renamed_weights

FILE = AnnotatorFile("dpt_hybrid-midas-501f0c75.pt", "midas",
                     "lllyasviel/ControlNet (annotator/ckpts/) or lllyasviel/Annotators on the Hugging Face hub")
PATCH = 16
NORMAL_Z = 2.0 * np.pi  # the extension's ``a``
_VIT = "pretrained.model."
_RESNET = _VIT + "patch_embed.backbone."

# published block names (after "pretrained.model.blocks.N.") -> transformers' (after "dpt.encoder.layer.N.")
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_UNIT = {"resConfUnit1": "residual_layer1", "resConfUnit2": "residual_layer2"}
_CONV = {"conv1": "convolution1", "conv2": "convolution2"}


def _fail(detail: str) -> ModelFileError:
    return ModelFileError(f"{FILE.name}: not a MiDaS DPT-Hybrid checkpoint ({detail})")


def decoder_name(rest: str) -> str | None:
    """transformers' name (under ``neck.``) for a MiDaS decoder key after ``scratch.`` (``layerN_rn``, the
    refinenets); None for anything else. MiDaS v2.1 and v3.1 (ZoeDepth's core) share these names."""
    m = re.fullmatch(r"layer(\d)_rn\.weight", rest)
    if m:
        return f"neck.convs.{int(m[1]) - 1}.weight"
    m = re.fullmatch(r"refinenet(\d)\.(.+)", rest)
    if m:
        layer = f"neck.fusion_stage.layers.{4 - int(m[1])}"  # refinenet4 fuses first
        if m[2].startswith("out_conv."):
            return f"{layer}.projection.{m[2][len('out_conv.'):]}"
        parts = m[2].split(".")
        if len(parts) == 3 and parts[0] in _UNIT and parts[1] in _CONV:
            return f"{layer}.{_UNIT[parts[0]]}.{_CONV[parts[1]]}.{parts[2]}"
    return None


def _rename(key: str) -> str | list[str] | None:
    """The transformers name of a published key (a list of three for the fused q/k/v projection; None for the
    ImageNet classifier the file still carries)."""
    if key.startswith(_RESNET):
        rest = key[len(_RESNET):]
        if rest.startswith("stem.conv."):
            return "dpt.embeddings.backbone.bit.embedder.convolution." + rest[len("stem.conv."):]
        if rest.startswith("stem.norm."):
            return "dpt.embeddings.backbone.bit.embedder.norm." + rest[len("stem.norm."):]
        m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", rest)
        if m:
            return f"dpt.embeddings.backbone.bit.encoder.stages.{m[1]}.layers.{m[2]}.{m[3]}"
    elif key.startswith(_VIT):
        rest = key[len(_VIT):]
        simple = {"cls_token": "dpt.embeddings.cls_token", "pos_embed": "dpt.embeddings.position_embeddings",
                  "patch_embed.proj.weight": "dpt.embeddings.projection.weight",
                  "patch_embed.proj.bias": "dpt.embeddings.projection.bias",
                  "norm.weight": "dpt.layernorm.weight", "norm.bias": "dpt.layernorm.bias"}
        if rest in simple:
            return simple[rest]
        if rest.startswith("head."):
            return None
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
        if m:
            block, name, kind = m.groups()
            prefix = f"dpt.encoder.layer.{block}"
            if name == "attn.qkv":
                return [f"{prefix}.attention.attention.{p}.{kind}" for p in ("query", "key", "value")]
            if name in _BLOCK:
                return f"{prefix}.{_BLOCK[name]}.{kind}"
    elif key.startswith("pretrained.act_postprocess"):
        m = re.fullmatch(r"pretrained\.act_postprocess(\d)\.(0\.project\.0|3|4)\.(weight|bias)", key)
        if m:
            stage, part, kind = int(m[1]) - 1, m[2], m[3]
            if part == "0.project.0":
                return f"neck.reassemble_stage.readout_projects.{stage}.0.{kind}"
            return f"neck.reassemble_stage.layers.{stage}.{'projection' if part == '3' else 'resize'}.{kind}"
    elif key.startswith("scratch."):
        rest = key[len("scratch."):]
        name = decoder_name(rest)
        if name is not None:
            return name
        m = re.fullmatch(r"output_conv\.([024])\.(weight|bias)", rest)
        if m:
            return f"head.head.{m[1]}.{m[2]}"
    raise ModelFileError(f"{FILE.name}: unexpected key {key!r} for MiDaS DPT-Hybrid")


def to_transformers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published state dict in transformers' names (q, k and v split from timm's fused projection)."""
    return renamed_weights(weights, _rename)


def feature_blocks(blocks: int) -> tuple[int, int]:
    """The two ViT blocks whose outputs are the decoder's third and fourth features: MiDaS hooks blocks 8 and
    11 of ViT-B's 12 (three quarters of the way and the last, as a rule for other depths)."""
    return blocks * 3 // 4 - 1, blocks - 1


def config_for(weights: dict[str, torch.Tensor]):
    """The transformers config the published file's shapes describe."""
    from transformers import BitConfig, DPTConfig

    try:
        pos = weights[_VIT + "pos_embed"]
        hidden = pos.shape[-1]
        blocks = count_indexed(weights, re.escape(_VIT) + r"blocks\.(\d+)\.")
        mlp = weights[_VIT + "blocks.0.mlp.fc1.weight"].shape[0]
        stem = weights[_RESNET + "stem.conv.weight"].shape[0]
        stages = count_indexed(weights, re.escape(_RESNET) + r"stages\.(\d+)\.")
        depths = [count_indexed(weights, re.escape(_RESNET) + rf"stages\.{s}\.blocks\.(\d+)\.") for s in range(stages)]
        widths = [weights[f"{_RESNET}stages.{s}.blocks.0.conv3.weight"].shape[0] for s in range(stages)]
        token_in = weights[_VIT + "patch_embed.proj.weight"].shape[1]
        neck = [weights[f"scratch.layer{i}_rn.weight"].shape[1] for i in range(1, 5)]
        features = weights["scratch.layer1_rn.weight"].shape[0]
    except (KeyError, IndexError) as exc:
        raise _fail(f"no {exc}") from None
    if stages != 3 or blocks < 2 or hidden % 64:
        raise _fail(f"{stages} ResNet stages, {blocks} ViT blocks of width {hidden}")
    grid = math.isqrt(pos.shape[1] - 1)
    bit = BitConfig(global_padding="same", layer_type="bottleneck", depths=depths, hidden_sizes=widths + [widths[-1] * 2],
                    embedding_size=stem, out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True)
    third, fourth = feature_blocks(blocks)
    return DPTConfig(is_hybrid=True, backbone_config=bit, hidden_size=hidden, num_hidden_layers=blocks,
                     num_attention_heads=hidden // 64, intermediate_size=mlp, layer_norm_eps=1e-6,
                     image_size=grid * PATCH, patch_size=PATCH, backbone_out_indices=[0, 1, third, fourth],
                     readout_type="project", reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=neck,
                     fusion_hidden_size=features, backbone_featmap_shape=[1, token_in, grid, grid],
                     use_batch_norm_in_fusion_residual=False, add_projection=False)


class Midas(nn.Module):
    """transformers' hybrid DPT under ``model``, run on any multiple-of-32 size (see the module docstring)."""

    def __init__(self, config):
        super().__init__()
        from transformers import DPTForDepthEstimation

        with torch.device("meta"):  # no random init: the file's tensors are assigned
            self.model = DPTForDepthEstimation(config)
        self.taps = tuple(config.backbone_out_indices[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1×3×H×W in [-1, 1] → 1×H×W relative inverse depth."""
        dpt = self.model.dpt
        emb = dpt.embeddings
        rows, cols = x.shape[2] // PATCH, x.shape[3] // PATCH
        maps = emb.backbone(x).feature_maps
        tokens = emb.projection(maps[-1]).flatten(2).transpose(1, 2)
        tokens = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + emb._resize_pos_embed(emb.position_embeddings, rows, cols)
        taken = {}
        for i, layer in enumerate(dpt.encoder.layer):
            tokens = layer(tokens)
            if i in self.taps:
                taken[i] = tokens
            if i >= max(self.taps):
                break
        states = [maps[0], maps[1], *(taken[i] for i in self.taps)]
        return self.model.head(self.model.neck(states, rows, cols))


def _converted(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in to_transformers(weights).items()}


def load(path) -> Midas:
    return cached_network(path, "midas", lambda weights: Midas(config_for(weights)), convert=_converted)


@torch.no_grad()
def predict(net: Midas, image: np.ndarray) -> np.ndarray:
    """The raw H×W prediction for an RGB uint8 picture whose sides are multiples of 32."""
    param = next(net.parameters())
    x = torch.from_numpy(np.ascontiguousarray(image)).to(param.device, torch.float32) / 127.5 - 1.0
    return net(x.permute(2, 0, 1)[None])[0].float().cpu().numpy()


def stretched(depth: np.ndarray) -> np.ndarray:
    """The prediction minus its minimum, over the new maximum (a flat prediction is all 0)."""
    d = depth.astype(np.float32) - depth.min()
    top = d.max()
    return d / top if top > 0 else np.zeros_like(d)


def depth_map(depth: np.ndarray) -> np.ndarray:
    """``depth_midas``: the stretched prediction as 0-255 (truncating)."""
    return (stretched(depth) * 255.0).clip(0, 255).astype(np.uint8)


def normal_map(depth: np.ndarray, background: float = 0.4, z: float = NORMAL_Z) -> np.ndarray:
    """``normal_midas``: (Sobel x, Sobel y, z) of the raw prediction, x and y zeroed where the stretched depth is
    under ``background``, normalized, mapped to 0-255 and given as (z, y, x) channels as the extension does."""
    d = depth.astype(np.float32)
    x = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    flat = stretched(d) < background
    x[flat] = 0
    y[flat] = 0
    normal = np.stack([x, y, np.full_like(x, z)], axis=2)
    normal /= np.sum(normal ** 2.0, axis=2, keepdims=True) ** 0.5
    return np.ascontiguousarray((normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1])
