"""ZoeDepth metric depth, the extension's ``depth_zoe``: the published ``ZoeD_M12_N.pt`` (its ``model``: MiDaS
v3.1 DPT-BEiT-L/384 under ``core.core.`` — timm's BEiT with relative position bias under ``pretrained.model.``,
the reassemble layers under ``pretrained.act_postprocess*``, the decoder under ``scratch.`` — and ZoeDepth's
metric head: the bottleneck ``conv2``, seed bin regressor, projectors, inverse attractors and the conditional
log-binomial) is converted to transformers' ``ZoeDepthForDepthEstimation`` when it loads. transformers' BEiT
resizes the relative position bias table to the picture's window exactly as MiDaS v3.1 does, so its own
forward runs any multiple-of-32 size.

Inference is the extension's ``ZoeDepth.infer``: the picture (RGB in [0, 1]) is reflect-padded by
``int(sqrt(side / 2) * 3)`` on each side, resized (bilinear, corners aligned) to the "minimal" keep-aspect size
for 384×512 in multiples of 32, normalized to [-1, 1], the metric depth brought back to the padded size
(bicubic) and the padding cut; the same on the mirrored picture, and the two averaged. The map: the 2nd and
85th percentiles stretched to 0-1, inverted (near is bright), 0-255.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network, count_indexed, renamed_weights
from .midas import decoder_name

FILE = AnnotatorFile("ZoeD_M12_N.pt", "zoedepth")
NET_SIZE = (384, 512)  # ZoeDepth's img_size (height, width)
MULTIPLE = 32
PAD_FACTOR = 3.0
_CORE = "core.core."
_BEIT = _CORE + "pretrained.model."

# published block names (after "blocks.N.") -> transformers' (after "backbone.beit.layers.N.")
_BLOCK = {"norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
          "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
          "gamma_1": "lambda_1", "gamma_2": "lambda_2", "attn.q_bias": "attention.q_proj.bias",
          "attn.v_bias": "attention.v_proj.bias", "attn.proj.weight": "attention.o_proj.weight",
          "attn.proj.bias": "attention.o_proj.bias", "mlp.fc1.weight": "mlp.fc1.weight",
          "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
          "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table"}
# buffers and unused heads the file carries (transformers computes the indices, the classifier is not used)
_DROPPED = re.compile(r"(.*\.relative_position_index|.*\.k_bias|core\.core\.pretrained\.model\.(head|fc_norm|norm)\..*"
                      r"|conditional_log_binomial\.log_binomial_transform\..*)")
_MLP = {"_net.0": "conv1", "_net.2": "conv2"}


def _fail(detail: str) -> ModelFileError:
    return ModelFileError(f"{FILE.name}: not a ZoeDepth (ZoeD_M12_N) checkpoint ({detail})")


def _rename(key: str) -> str | list[str] | None:
    """transformers' name of a published key (a list of three for the fused q/k/v weight; None: dropped)."""
    if _DROPPED.fullmatch(key):
        return None
    if key.startswith(_BEIT):
        rest = key[len(_BEIT):]
        simple = {"cls_token": "backbone.beit.embeddings.cls_token",
                  "patch_embed.proj.weight": "backbone.beit.embeddings.patch_embeddings.projection.weight",
                  "patch_embed.proj.bias": "backbone.beit.embeddings.patch_embeddings.projection.bias"}
        if rest in simple:
            return simple[rest]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
        if m:
            prefix = f"backbone.beit.layers.{m[1]}"
            if m[2] == "attn.qkv.weight":
                return [f"{prefix}.attention.{p}_proj.weight" for p in ("q", "k", "v")]
            if m[2] in _BLOCK:
                return f"{prefix}.{_BLOCK[m[2]]}"
    elif key.startswith(_CORE + "pretrained.act_postprocess"):
        m = re.fullmatch(r"core\.core\.pretrained\.act_postprocess(\d)\.(0\.project\.0|3|4)\.(weight|bias)", key)
        if m:
            stage, part, kind = int(m[1]) - 1, m[2], m[3]
            if part == "0.project.0":
                return f"neck.reassemble_stage.readout_projects.{stage}.0.{kind}"
            return f"neck.reassemble_stage.layers.{stage}.{'projection' if part == '3' else 'resize'}.{kind}"
    elif key.startswith(_CORE + "scratch."):
        rest = key[len(_CORE + "scratch."):]
        name = decoder_name(rest)
        if name is not None:
            return name
        m = re.fullmatch(r"output_conv\.([024])\.(weight|bias)", rest)
        if m:
            return f"relative_head.conv{int(m[1]) // 2 + 1}.{m[2]}"
    else:
        m = re.fullmatch(r"(seed_bin_regressor|seed_projector|projectors\.\d|attractors\.\d)\.(_net\.[02])\.(weight|bias)",
                         key)
        if m:
            return f"metric_head.{m[1]}.{_MLP[m[2]]}.{m[3]}"
        m = re.fullmatch(r"(conv2|conditional_log_binomial\.mlp\.[02])\.(weight|bias)", key)
        if m:
            return f"metric_head.{m[1]}.{m[2]}"
    raise ModelFileError(f"{FILE.name}: unexpected key {key!r} for ZoeDepth (only the single-head ZoeD_M12_N loads)")


def to_transformers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published state dict in transformers' names (q, k and v split from timm's fused projection; timm's
    key bias is zero, transformers' key projection has none)."""
    return renamed_weights(weights, _rename)


def feature_blocks(blocks: int) -> list[int]:
    """The four BEiT blocks (0-based) the decoder reads: MiDaS's 5, 11, 17, 23 of BEiT-L's 24 (each quarter's
    last, as a rule for other depths)."""
    return [(i + 1) * blocks // 4 - 1 for i in range(4)]


def config_for(weights: dict[str, torch.Tensor]):
    """The transformers config the published file's shapes describe."""
    from transformers import BeitConfig, ZoeDepthConfig

    try:
        hidden = weights[_BEIT + "cls_token"].shape[-1]
        patch = weights[_BEIT + "patch_embed.proj.weight"].shape[-1]
        blocks = count_indexed(weights, re.escape(_BEIT) + r"blocks\.(\d+)\.")
        table = weights[_BEIT + "blocks.0.attn.relative_position_bias_table"]
        mlp = weights[_BEIT + "blocks.0.mlp.fc1.weight"].shape[0]
        neck = [weights[f"{_CORE}pretrained.act_postprocess{i}.3.weight"].shape[0] for i in range(1, 5)]
        features = weights[_CORE + "scratch.layer1_rn.weight"].shape[0]
        relative = weights[_CORE + "scratch.output_conv.2.weight"].shape[0]
        bottleneck = weights["conv2.weight"].shape[0]
        bins = weights["seed_bin_regressor._net.2.weight"].shape[0]
        embedding = weights["seed_projector._net.2.weight"].shape[0]
        attractors = [weights[f"attractors.{i}._net.2.weight"].shape[0] for i in range(4)]
    except (KeyError, IndexError) as exc:
        raise _fail(f"no {exc}") from None
    if any(k.startswith("patch_transformer.") for k in weights):
        raise _fail("a multi-head ZoeD_NK file; the extension uses ZoeD_M12_N")
    window = (math.isqrt(table.shape[0] - 3) + 1) // 2
    if blocks < 4 or (2 * window - 1) ** 2 + 3 != table.shape[0]:
        raise _fail(f"{blocks} BEiT blocks, a relative position table of {table.shape[0]} rows")
    beit = BeitConfig(image_size=window * patch, patch_size=patch, hidden_size=hidden, num_hidden_layers=blocks,
                      num_attention_heads=table.shape[1], intermediate_size=mlp, layer_norm_eps=1e-6,
                      use_relative_position_bias=True, use_absolute_position_embeddings=False,
                      use_mean_pooling=True, reshape_hidden_states=False, layer_scale_init_value=0.1,
                      out_features=[f"stage{i + 1}" for i in feature_blocks(blocks)])
    return ZoeDepthConfig(backbone_config=beit, neck_hidden_sizes=neck, fusion_hidden_size=features,
                          bottleneck_features=bottleneck, num_relative_features=relative, bin_embedding_dim=embedding,
                          num_attractors=attractors, bin_centers_type="softplus", attractor_kind="mean",
                          min_temp=0.0212, max_temp=50.0, readout_type="project", reassemble_factors=[4, 2, 1, 0.5],
                          bin_configurations=[{"name": "nyu", "n_bins": bins, "min_depth": 1e-3, "max_depth": 10.0}])


class Zoe(nn.Module):
    """transformers' ZoeDepth under ``model``; ``forward`` takes the network's own input (normalized, sized)."""

    def __init__(self, config):
        super().__init__()
        from transformers import ZoeDepthForDepthEstimation

        with torch.device("meta"):  # no random init of ~345M parameters: the file's tensors are assigned
            self.model = ZoeDepthForDepthEstimation(config)
        # the log-binomial's constant buffers are not in the file (nor in transformers' state dict): made here
        binomial = self.model.metric_head.conditional_log_binomial.log_binomial_transform
        binomial.register_buffer("k_idx", torch.arange(0, binomial.k).view(1, -1, 1, 1), persistent=False)
        binomial.register_buffer("k_minus_1", torch.tensor([binomial.k - 1.0]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1×3×h×w in [-1, 1] (multiples of 32) → 1×1×h×w metric depth."""
        return self.model(pixel_values=x).predicted_depth[:, None]


def _converted(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in to_transformers(weights).items()}


def load(path) -> Zoe:
    return cached_network(path, "zoe", lambda weights: Zoe(config_for(weights)), convert=_converted)


def net_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) the network runs at: MiDaS's "minimal" keep-aspect resize for 384×512 (the scale of the
    side that changes least), each side rounded to a multiple of 32 (at least 32)."""
    scale_h, scale_w = NET_SIZE[0] / height, NET_SIZE[1] / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h

    def fit(x: float) -> int:
        return max(MULTIPLE, int(np.round(x / MULTIPLE) * MULTIPLE))

    return fit(scale * height), fit(scale * width)


def padding(height: int, width: int) -> tuple[int, int]:
    """The reflect padding (rows, columns) on each side: ``int(sqrt(side / 2) * 3)``."""
    return int(np.sqrt(height / 2) * PAD_FACTOR), int(np.sqrt(width / 2) * PAD_FACTOR)


def _padded_run(net: Zoe, x: torch.Tensor) -> torch.Tensor:
    """One pass of ``_infer_with_pad_aug``: pad, resize and normalize, run, back to the padded size, unpad."""
    pad_h, pad_w = padding(x.shape[2], x.shape[3])
    x = F.pad(x, [pad_w, pad_w, pad_h, pad_h], mode="reflect")
    size = net_size(x.shape[2], x.shape[3])
    y = F.interpolate(x, size, mode="bilinear", align_corners=True)
    out = net((y - 0.5) / 0.5)
    if out.shape[-2:] != x.shape[-2:]:
        out = F.interpolate(out, size=x.shape[-2:], mode="bicubic", align_corners=False)
    if pad_h > 0:
        out = out[:, :, pad_h:-pad_h, :]
    if pad_w > 0:
        out = out[:, :, :, pad_w:-pad_w]
    return out


@torch.no_grad()
def predict(net: Zoe, image: np.ndarray) -> np.ndarray:
    """The H×W metric depth of an RGB uint8 picture: the padded pass and the mirrored one, averaged."""
    param = next(net.parameters())
    x = torch.from_numpy(np.ascontiguousarray(image)).to(param.device, torch.float32) / 255.0
    x = x.permute(2, 0, 1)[None]
    out = _padded_run(net, x)
    mirrored = _padded_run(net, torch.flip(x, dims=[3]))
    return ((out + torch.flip(mirrored, dims=[3])) / 2)[0, 0].float().cpu().numpy()


def depth_map(depth: np.ndarray) -> np.ndarray:
    """The 2nd-85th percentile range stretched to 0-1 and inverted, 0-255 (truncating). A flat range divides by
    zero as the extension does: what is not a number becomes 0."""
    d = depth.astype(np.float32)  # in float32, as the extension's in-place steps
    low, high = np.percentile(d, 2), np.percentile(d, 85)
    with np.errstate(divide="ignore", invalid="ignore"):
        d -= low
        d /= high - low
        d = 1.0 - d
    return np.nan_to_num(d * 255.0, nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255).astype(np.uint8)


def detect(net: Zoe, image: np.ndarray) -> np.ndarray:
    return depth_map(predict(net, image))
