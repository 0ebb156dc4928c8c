"""ControlNet and T2I-Adapter model files: detection from keys and shapes, key-layout conversion, safe loading.

The files users drop into ``models/ControlNet`` come in several layouts of the same few networks:

* lllyasviel single files (``control_v11p_sd15_canny.pth``): the ControlNet's own LDM names
  (``input_blocks.*``, ``zero_convs.*``, ``input_hint_block.*``, ``middle_block.*``, ``middle_block_out.*``),
  sometimes under ``control_model.``; the old ``control_sd15_*.pth`` files also carry the whole SD model
  (``model.diffusion_model.*`` ...) beside ``control_model.*``, of which only the control part is used.
* "difference" ControlNets (a ``difference`` marker): the control weights minus the base UNet's.
* Control-LoRAs (a ``lora_controlnet`` marker): low-rank ``up``/``down`` pairs over the base UNet's weights.
* diffusers ``ControlNetModel`` state dicts (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*``,
  ``controlnet_mid_block.*``), as one file or a folder with ``config.json``.
* T2I-Adapters: TencentARC's ``body.*``/``conv_in.*`` files and diffusers' ``adapter.*`` state dicts.

:func:`detect_control` is pure (``{key: shape}`` in, :class:`ControlSpec` out; never the file name), as
:func:`.detect.detect` is for checkpoints. The ControlNet's encoder half has the UNet's layout, so its
names go through :func:`.convert.unet_ldm_to_hf` / :func:`.convert.unet_hf_to_ldm`; only the ControlNet's
own parts (hint encoder, zero convolutions) have rules here. Every module is then built from the detected
config with no network access and loaded strictly: a tensor the architecture needs and the file lacks, a
tensor it does not have, or a shape that does not fit is a one-line :class:`ModelFileError` naming the file.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, ControlNetUnionModel, T2IAdapter

from . import lllite
from .convert import component_to_ldm, unet_hf_to_ldm, unet_ldm_to_hf
from .errors import ModelFileError
from .safe_load import open_state_dict, usable_weight
from .t2i_style import StyleAdapter, style_config

CONTROL_PREFIX = "control_model."
Shapes = Mapping[str, tuple[int, ...]]

KINDS = ("controlnet", "t2i_adapter", "control_lora", "t2i_style", "controlnet_union", "lllite")
BASES = ("sd1", "sd2", "sdxl")

# Weight files a diffusers folder may hold, in the order diffusers itself prefers them.
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                  "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")

# What files carry beyond the module, or may lack, per kind: one table. ``ignored``: file keys (relative to
# the prefix) that are not part of the network -- markers, bookkeeping buffers, EMA copies. ``optional``:
# module keys whose value the file may omit because the module's own value is the right one (the
# extension's loaders read these files with strict=False for the same reason). Everything else is required.
TOLERATED: dict[str, dict[str, tuple[str, ...]]] = {
    "controlnet": {
        "ignored": (r"^difference$", r"^lora_controlnet$", r"(^|\.)position_ids$", r"^model_ema\.",
                    r"(^|\.)num_batches_tracked$"),
        "optional": (),
    },
    "control_lora": {
        "ignored": (r"^lora_controlnet$", r"(^|\.)position_ids$"),
        # Everything the base UNet supplies; see _control_lora_state.
        "optional": (r".*",),
    },
    "t2i_adapter": {
        "ignored": (r"(^|\.)num_batches_tracked$",),
        "optional": (),
    },
    "t2i_style": {"ignored": (), "optional": ()},
}
TOLERATED["controlnet_union"] = TOLERATED["controlnet"]
TOLERATED["lllite"] = {"ignored": (), "optional": ()}
# ControlNet++ union models' own parts, under the same names in both layouts (models.controlnet_union)
_UNION_KEYS = r"^(task_embedding$|transformer_layes\.|spatial_ch_projs\.|control_add_embedding\.)"


# config.json values a diffusers folder may set that shapes cannot tell.
_FOLDER_CONFIG_KEYS = ("attention_head_dim", "num_attention_heads", "global_pool_conditions", "upcast_attention",
                       "addition_time_embed_dim", "controlnet_conditioning_channel_order", "flip_sin_to_cos",
                       "freq_shift", "norm_eps", "norm_num_groups", "act_fn", "resnet_time_scale_shift",
                       "mid_block_scale_factor", "only_cross_attention", "addition_embed_type_num_heads",
                       "downsample_padding", "downscale_factor")
_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class ControlSpec:
    """What a control file holds. ``config`` is the keyword arguments of the diffusers module
    (``ControlNetModel`` or ``T2IAdapter``); ``prefix`` is where its keys live in the file."""

    # "controlnet" | "t2i_adapter" | "control_lora" | "t2i_style" (CLIP tokens, models.t2i_style) |
    # "controlnet_union" (ControlNet++: one model, a control type per unit; engine.controlnet_union) |
    # "lllite" (kohya's ControlNet-LLLite: per-projection nudges, models.lllite / engine.lllite)
    kind: str
    base: str  # "sd1" | "sd2" | "sdxl"
    layout: str  # "ldm" | "diffusers" (ControlNet); "tencentarc" | "tencentarc_light" | "diffusers" (T2I)
    config: dict
    prefix: str = ""
    difference: bool = False  # weights are differences from the base UNet's (control_*_diff files)

    @property
    def needs_unet(self) -> bool:
        """Control-LoRAs and difference ControlNets are only complete with the base model's UNet."""
        return self.kind == "control_lora" or self.difference

    def describe(self) -> str:
        base = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.base]
        kind = {"controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter", "control_lora": "Control-LoRA",
                "t2i_style": "T2I style adapter", "controlnet_union": "ControlNet Union",
                "lllite": "ControlNet-LLLite"}[self.kind]
        return f"{base} {kind}" + (" (difference)" if self.difference else "")


# ---- key names --------------------------------------------------------------------------------------

def _hint_ldm_to_hf(index: int, last: int) -> str:
    """``input_hint_block`` is a Sequential of convs with SiLUs between them, so its convs sit at even indices."""
    if index == 0:
        return "conv_in"
    if index == last:
        return "conv_out"
    return f"blocks.{index // 2 - 1}"


def controlnet_key_ldm_to_hf(name: str, layers_per_block: int, hint_last: int) -> str | None:
    """One lllyasviel ControlNet name (no prefix) -> the diffusers ``ControlNetModel`` name, or None.
    ``hint_last`` is the index of the hint encoder's last conv (14 in every published file)."""
    if m := re.match(r"input_hint_block\.(\d+)\.(.+)", name):
        index = int(m[1])
        if index % 2 or index > hint_last:
            return None
        return f"controlnet_cond_embedding.{_hint_ldm_to_hf(index, hint_last)}.{m[2]}"
    if m := re.match(r"zero_convs\.(\d+)\.0\.(.+)", name):
        return f"controlnet_down_blocks.{m[1]}.{m[2]}"
    if m := re.match(r"middle_block_out\.0\.(.+)", name):
        return f"controlnet_mid_block.{m[1]}"
    if name.startswith(("output_blocks.", "out.")):  # a ControlNet has no decoder half
        return None
    return unet_ldm_to_hf(name, layers_per_block)


def controlnet_key_hf_to_ldm(name: str, layers_per_block: int, hint_blocks: int) -> str | None:
    """One diffusers ``ControlNetModel`` name -> the lllyasviel name (no prefix), or None.
    ``hint_blocks`` is the number of convs in ``controlnet_cond_embedding.blocks`` (6 in published files)."""
    if m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.+)", name):
        index = 0 if m[1] == "conv_in" else 2 * (hint_blocks + 1) if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
        return f"input_hint_block.{index}.{m[3]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", name):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"controlnet_mid_block\.(.+)", name):
        return f"middle_block_out.0.{m[1]}"
    if name.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")):
        return None
    return unet_hf_to_ldm(name, layers_per_block, [])


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _hf_layout(keys) -> tuple[int, int]:
    """(layers_per_block, hint encoder blocks) of a diffusers ControlNet state dict."""
    return _count(keys, r"down_blocks\.0\.resnets\.(\d+)\."), _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")


def _ldm_layout(keys) -> tuple[int, int]:
    """(layers_per_block, index of the last hint conv) of an lllyasviel ControlNet state dict (no prefix)."""
    hint = [int(m[1]) for k in keys if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))]
    lpb = 0
    while f"input_blocks.{lpb + 1}.0.in_layers.0.weight" in keys and f"input_blocks.{lpb + 1}.0.op.weight" not in keys:
        lpb += 1
    return lpb, max(hint, default=0)


def controlnet_hf_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``ControlNetModel`` state dict -> lllyasviel key names *without* a prefix, as the
    control_v11 files ship. Our demo ControlNet is exported with this; a name with no rule is an error
    rather than silently dropped, so an export never loses a tensor."""
    lpb, blocks = _hf_layout(state)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        ldm = controlnet_key_hf_to_ldm(name, lpb, blocks)
        if ldm is None:
            raise ValueError(f"no lllyasviel name for ControlNet tensor {name!r}")
        out[ldm] = tensor
    return out


def controlnet_ldm_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`controlnet_hf_to_ldm` (input without the ``control_model.`` prefix); names with
    no rule are an error (the loader reports them with the file's name instead)."""
    lpb, hint_last = _ldm_layout(state)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        hf = controlnet_key_ldm_to_hf(name, lpb, hint_last)
        if hf is None:
            raise ValueError(f"no diffusers name for ControlNet tensor {name!r}")
        out[hf] = tensor
    return out


# T2I-Adapters. TencentARC's full adapter numbers its resnet blocks across levels (body.N, N = level * per
# level + block); diffusers nests them (adapter.body.LEVEL.resnets.BLOCK). Published adapters have four levels.
T2I_LEVELS = 4


def t2i_key_tencentarc_to_hf(name: str, per_level: int, light: bool = False) -> str | None:
    if name.startswith("conv_in."):
        return "adapter." + name
    if light:
        if m := re.match(r"body\.(\d+)\.(in_conv|out_conv)\.(.+)", name):
            return f"adapter.body.{m[1]}.{m[2]}.{m[3]}"
        if m := re.match(r"body\.(\d+)\.body\.(\d+)\.(block1|block2)\.(.+)", name):
            return f"adapter.body.{m[1]}.resnets.{m[2]}.{m[3]}.{m[4]}"
        return None
    if m := re.match(r"body\.(\d+)\.(in_conv|block1|block2)\.(.+)", name):
        level, j = divmod(int(m[1]), per_level)
        if m[2] == "in_conv":
            return f"adapter.body.{level}.in_conv.{m[3]}" if j == 0 else None
        return f"adapter.body.{level}.resnets.{j}.{m[2]}.{m[3]}"
    return None


def t2i_key_hf_to_tencentarc(name: str, per_level: int, light: bool = False) -> str | None:
    if name.startswith("adapter.conv_in."):
        return name.removeprefix("adapter.")
    if light:
        if m := re.match(r"adapter\.body\.(\d+)\.(in_conv|out_conv)\.(.+)", name):
            return f"body.{m[1]}.{m[2]}.{m[3]}"
        if m := re.match(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(block1|block2)\.(.+)", name):
            return f"body.{m[1]}.body.{m[2]}.{m[3]}.{m[4]}"
        return None
    if m := re.match(r"adapter\.body\.(\d+)\.in_conv\.(.+)", name):
        return f"body.{int(m[1]) * per_level}.in_conv.{m[2]}"
    if m := re.match(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(block1|block2)\.(.+)", name):
        return f"body.{int(m[1]) * per_level + int(m[2])}.{m[3]}.{m[4]}"
    return None


def t2i_adapter_hf_to_tencentarc(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``T2IAdapter`` state dict (full or light) -> TencentARC's ``body.*`` names."""
    light = any(".out_conv." in k for k in state)
    per_level = _count(state, r"adapter\.body\.0\.resnets\.(\d+)\.")
    out = {}
    for name, tensor in state.items():
        key = t2i_key_hf_to_tencentarc(name, per_level, light)
        if key is None:
            raise ValueError(f"no TencentARC name for T2I-Adapter tensor {name!r}")
        out[key] = tensor
    return out


# ---- detection --------------------------------------------------------------------------------------

def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelFileError(f"not a complete {what}: missing {key}")
    return tuple(shapes[key])


def _control_prefix(shapes: Shapes) -> str:
    return CONTROL_PREFIX if any(k.startswith(CONTROL_PREFIX) for k in shapes) else ""


def _hint_channels(shapes: Shapes, hint_last: int) -> tuple[int, list[int]]:
    """(conditioning channels, conditioning_embedding_out_channels) read off the hint encoder's convs:
    conv_in, then (same width, wider with stride 2) pairs, then the zero conv into the UNet's width."""
    first = _need(shapes, "input_hint_block.0.weight", "ControlNet hint encoder")
    widths = [first[0]]
    for index in range(4, hint_last, 4):
        widths.append(_need(shapes, f"input_hint_block.{index}.weight", "ControlNet hint encoder")[0])
    return first[1], widths


def _controlnet_config(shapes: Shapes, what: str = "ControlNet") -> tuple[str, dict]:
    """(base, ControlNetModel kwargs) from lllyasviel-named shapes without prefix."""
    conv_in = _need(shapes, "input_blocks.0.0.weight", what)
    levels: list[dict] = [{"resnets": 0, "attn": False, "depth": 1, "channels": conv_in[0]}]
    k = 1
    while any(key.startswith(f"input_blocks.{k}.") for key in shapes):
        if f"input_blocks.{k}.0.op.weight" in shapes:
            levels.append({"resnets": 0, "attn": False, "depth": 1, "channels": levels[-1]["channels"]})
        else:
            level = levels[-1]
            level["resnets"] += 1
            level["channels"] = _need(shapes, f"input_blocks.{k}.0.out_layers.3.weight", what)[0]
            if f"input_blocks.{k}.1.proj_in.weight" in shapes:
                level["attn"] = True
                level["depth"] = _count(shapes, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")
        k += 1
    lpb = levels[0]["resnets"]
    if lpb == 0 or any(lv["resnets"] != lpb for lv in levels):
        raise ModelFileError(f"{what} blocks are not laid out as in Stable Diffusion")
    sdxl = "label_emb.0.0.weight" in shapes
    first_attn = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in shapes.items() if k.endswith("proj_in.weight")), None)
    linear = proj_in is not None and len(proj_in) == 2
    context = shapes[first_attn][1] if first_attn else None
    if sdxl:
        base = "sdxl"
    elif context in _CONTEXT_WIDTH and context != 2048:
        base = _CONTEXT_WIDTH[context]
    else:  # scaled-down models: SD 2.x transformers use linear projections, SD 1.x 1x1 convolutions
        base = "sd2" if linear else "sd1"
    if context is None:
        context = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[base]
    mid_attn = "middle_block.1.proj_in.weight" in shapes
    mid_depth = _count(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    _need(shapes, "middle_block.0.in_layers.0.weight", what)
    depths = [lv["depth"] if lv["attn"] else 1 for lv in levels]
    if mid_attn:
        if levels[-1]["attn"] and depths[-1] != mid_depth:
            raise ModelFileError(f"{what} middle block depth ({mid_depth}) differs from its last level "
                                 f"({depths[-1]}); not a known layout")
        depths[-1] = mid_depth
    hint_last = _ldm_layout(shapes)[1]
    hint_in, hint_widths = _hint_channels(shapes, hint_last)
    channels = [lv["channels"] for lv in levels]
    config = {
        "in_channels": conv_in[1],
        "conditioning_channels": hint_in,
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attn"] else "DownBlock2D" for lv in levels],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attn else "UNetMidBlock2D",
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": context,
        # Heads are not in the shapes: SD 1.x uses 8 heads, SD 2.x and SDXL heads of width 64.
        "attention_head_dim": 8 if base == "sd1" else [max(1, c // 64) for c in channels],
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths if any(d != 1 for d in depths) else 1,
        "conditioning_embedding_out_channels": hint_widths,
        "global_pool_conditions": False,  # never from shapes: the loader decides (config.json, file name)
    }
    if base == "sd2":
        config["upcast_attention"] = True
    if sdxl:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1])
    return base, config


def _union_config(config: dict, shapes: Shapes) -> dict:
    """ControlNetUnionModel kwargs: the ControlNet's, plus the union parts' sizes (heads are not in the shapes:
    8, as every published union model and the extension have)."""
    task = _need(shapes, "task_embedding", "ControlNet Union")
    layers = _count(shapes, r"transformer_layes\.(\d+)\.")
    out = {k: v for k, v in config.items() if k != "mid_block_type"}
    out.update(num_control_type=task[0], num_trans_channel=task[1], num_trans_head=8, num_trans_layer=layers,
               num_proj_channel=_need(shapes, "spatial_ch_projs.weight", "ControlNet Union")[0])
    if "addition_time_embed_dim" not in out:  # the control-type embedding's width (SD 1.x union files)
        out["addition_time_embed_dim"] = _need(shapes, "control_add_embedding.linear_1.weight",
                                               "ControlNet Union")[1] // task[0]
    return out


def _hf_to_ldm_shapes(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    lpb, blocks = _hf_layout(shapes)
    out = {}
    for name, shape in shapes.items():
        ldm = controlnet_key_hf_to_ldm(name, lpb, blocks)
        if ldm is not None:
            out[ldm] = tuple(shape)
    return out


def _t2i_spec(shapes: Shapes, layout: str) -> ControlSpec:
    """TencentARC or diffusers T2I-Adapter shapes -> spec (config for diffusers' T2IAdapter)."""
    if layout == "diffusers":
        keys = {k.removeprefix("adapter."): v for k, v in shapes.items()}
        light = any(".out_conv." in k for k in keys)
        if light:
            rel = {t2i_key_hf_to_tencentarc("adapter." + k, 0, True) or k: v for k, v in keys.items()}
        else:
            per = _count(keys, r"body\.0\.resnets\.(\d+)\.")
            rel = {t2i_key_hf_to_tencentarc("adapter." + k, per) or k: v for k, v in keys.items()}
    else:
        rel = dict(shapes)
        light = layout == "tencentarc_light"
    if light:
        first = _need(rel, "body.0.in_conv.weight", "T2I-Adapter")
        n_blocks = _count(rel, r"body\.(\d+)\.out_conv\.")
        channels = [_need(rel, f"body.{i}.out_conv.weight", "T2I-Adapter")[0] for i in range(n_blocks)]
        per = _count(rel, r"body\.0\.body\.(\d+)\.")
        # diffusers' LightAdapter repeats its last width in one more block than it has channels.
        config = {"in_channels": first[1] // 64, "channels": channels[:-1], "num_res_blocks": per,
                  "downscale_factor": 8, "adapter_type": "light_adapter"}
        return ControlSpec("t2i_adapter", "sd1", layout, config)
    conv_in = _need(rel, "conv_in.weight", "T2I-Adapter")
    total = _count(rel, r"body\.(\d+)\.block1\.")
    if total == 0 or total % T2I_LEVELS:
        raise ModelFileError(f"T2I-Adapter has {total} resnet blocks; expected a multiple of {T2I_LEVELS}")
    per = total // T2I_LEVELS
    block2 = _need(rel, "body.0.block2.weight", "T2I-Adapter")
    if block2[-1] != 1 or any(k.endswith(("skep.weight", "down_opt.op.weight")) for k in rel):
        raise ModelFileError("this T2I-Adapter variant (3x3 second convs, skip convs or strided-conv downsampling) "
                             "is not supported; the published sd14v1/sdxl adapters are")
    channels = [_need(rel, f"body.{level * per}.block1.weight", "T2I-Adapter")[0] for level in range(T2I_LEVELS)]
    xl = conv_in[1] in (256, 768)  # 1 or 3 channels unshuffled by 16: the SDXL adapters
    factor = 16 if xl else 8
    if conv_in[1] % (factor * factor):
        raise ModelFileError(f"T2I-Adapter input width {conv_in[1]} is not channels x {factor}x{factor}")
    config = {"in_channels": conv_in[1] // (factor * factor), "channels": channels, "num_res_blocks": per,
              "downscale_factor": factor, "adapter_type": "full_adapter_xl" if xl else "full_adapter"}
    return ControlSpec("t2i_adapter", "sdxl" if xl else "sd1", layout, config)


def _lora_weight_shapes(rel: Shapes) -> dict[str, tuple[int, ...]]:
    """A Control-LoRA's shapes with each ``up``/``down`` pair read as the weight it changes:
    ``up [out, rank, (1, 1)]`` and ``down [rank, in, (k, k)]`` make ``[out, in, (k, k)]``."""
    out = dict(rel)
    for key, up in rel.items():
        if key.endswith(".up") and (down := rel.get(key[:-3] + ".down")) is not None:
            out.setdefault(key[:-3] + ".weight", (up[0], *down[1:]))
    return out


def detect_control(shapes: Shapes) -> ControlSpec:
    """The architecture of a ControlNet / T2I-Adapter file from its ``{key: shape}`` (ComfyUI style).
    Anything unrecognised, however malformed, is a :class:`ModelFileError`."""
    try:
        return _detect(shapes)
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelFileError(f"not a ControlNet layout this program knows ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None


def _detect(shapes: Shapes) -> ControlSpec:
    if not shapes:
        raise ModelFileError("the file holds no tensors")
    prefix = _control_prefix(shapes)
    rel = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    markers = set(rel) | {k for k in shapes if "." not in k}  # markers sit beside a control_model. prefix
    if "lora_controlnet" in markers:
        base, config = _controlnet_config(_lora_weight_shapes(rel), "Control-LoRA")
        return ControlSpec("control_lora", base, "control_lora", config, prefix)
    union = "task_embedding" in rel and "control_add_embedding.linear_1.weight" in rel
    if "controlnet_cond_embedding.conv_in.weight" in rel:
        base, config = _controlnet_config(_hf_to_ldm_shapes(rel))
        if union:
            return ControlSpec("controlnet_union", base, "diffusers", _union_config(config, rel), prefix)
        return ControlSpec("controlnet", base, "diffusers", config, prefix)
    if "input_hint_block.0.weight" in rel:
        base, config = _controlnet_config(rel)
        if union:
            return ControlSpec("controlnet_union", base, "ldm", _union_config(config, rel), prefix)
        return ControlSpec("controlnet", base, "ldm", config, prefix, difference="difference" in markers)
    if "adapter.conv_in.weight" in rel or "adapter.body.0.in_conv.weight" in rel:
        return _t2i_spec(rel, "diffusers")
    if "conv_in.weight" in rel and "body.0.block1.weight" in rel:
        return _t2i_spec(rel, "tencentarc")
    if "body.0.in_conv.weight" in rel and "body.0.out_conv.weight" in rel:
        return _t2i_spec(rel, "tencentarc_light")
    if "style_embedding" in rel:
        config = style_config(rel)
        return ControlSpec("t2i_style", _CONTEXT_WIDTH.get(config["context_dim"], "sd1"), "tencentarc_style", config,
                           prefix)
    keys = list(shapes)
    if any(k.startswith(("ip_adapter.", "image_proj.")) for k in keys):
        raise ModelFileError("this is an IP-Adapter, not a ControlNet; choose it with an ip-adapter preprocessor")
    if lllite.is_lllite(keys):
        widths = {v[1] for k, v in shapes.items() if k.endswith(".down.0.weight")}
        return ControlSpec("lllite", "sd1" if 320 in widths else "sdxl", "kohya", {}, "")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelFileError("this is a Stable Diffusion checkpoint, not a ControlNet: put it in models/Stable-diffusion")
    if any("lora_" in k or ".lora." in k for k in keys[:50]):
        raise ModelFileError("this is a LoRA, not a ControlNet: put it in models/Lora")
    raise ModelFileError("not a ControlNet or T2I-Adapter (no input_hint_block, controlnet_cond_embedding or "
                         "adapter keys)")


# ---- loading ----------------------------------------------------------------------------------------

@dataclass
class ControlModel:
    """A loaded control network: ``module`` is a diffusers ``ControlNetModel`` or ``T2IAdapter``."""

    spec: ControlSpec
    module: torch.nn.Module
    path: Path
    name: str
    dtype: torch.dtype = torch.float32
    extras: dict = field(default_factory=dict)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _module_class(spec: ControlSpec) -> type:
    return {"t2i_adapter": T2IAdapter, "t2i_style": StyleAdapter,
            "controlnet_union": ControlNetUnionModel}.get(spec.kind, ControlNetModel)


def _build_module(spec: ControlSpec, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    if spec.kind == "lllite":  # one small network per projection: built from the file's shapes
        return lllite.build({k: tuple(v.shape) for k, v in tensors.items()})
    cls = _module_class(spec)
    try:
        with init_empty_weights(include_buffers=False):
            return cls(**spec.config)
    except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise ModelFileError(f"cannot build a {spec.describe()} from this configuration ({exc})") from None


def _convert(spec: ControlSpec, rel: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                                          list[str]]:
    """File tensors (without prefix) -> (module state dict, module name -> file name, unmapped file names)."""
    ignored = TOLERATED[spec.kind]["ignored"]
    if spec.kind == "t2i_adapter":
        if spec.layout == "diffusers":
            def rule(n: str) -> str | None:
                return n if n.startswith("adapter.") else None
        else:
            per = spec.config["num_res_blocks"]
            light = spec.layout == "tencentarc_light"

            def rule(n: str) -> str | None:
                return t2i_key_tencentarc_to_hf(n, per, light)
    elif spec.layout in ("diffusers", "tencentarc_style", "kohya"):  # the module has the file's names
        def rule(n: str) -> str | None:
            return n
    else:
        lpb, hint_last = _ldm_layout(rel)

        def rule(n: str) -> str | None:
            if spec.kind == "controlnet_union" and re.match(_UNION_KEYS, n):
                return n
            return controlnet_key_ldm_to_hf(n, lpb, hint_last)
    state: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    unmapped: list[str] = []
    for name in rel:
        if _matches(name, ignored):
            continue
        hf = rule(name)
        if hf is None:
            unmapped.append(name)
            continue
        state[hf] = rel[name]
        names[hf] = name
    return state, names, unmapped


def _file_name_of(spec: ControlSpec, hf: str, names: dict[str, str], lpb: int, hint_blocks: int) -> str:
    """A module key in the file's own naming, for messages about tensors the file lacks."""
    if hf in names:
        return spec.prefix + names[hf]
    if spec.layout in ("diffusers", "tencentarc_style", "kohya"):
        return spec.prefix + hf
    if spec.kind == "t2i_adapter":
        return t2i_key_hf_to_tencentarc(hf, spec.config["num_res_blocks"], spec.layout == "tencentarc_light") or hf
    if re.match(_UNION_KEYS, hf):
        return spec.prefix + hf
    return spec.prefix + (controlnet_key_hf_to_ldm(hf, lpb, hint_blocks) or hf)


def _short(keys: list[str], n: int = 4) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _unet_ldm_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base UNet's weights under lllyasviel names (no prefix): what difference files and Control-LoRAs
    add to. The ControlNet shares the UNet's encoder names, so the UNet conversion applies as it is."""
    cfg = unet.config
    up_attn = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    return component_to_ldm(state, "", "unet", layers_per_block=cfg.layers_per_block, up_has_attention=up_attn)


def _control_lora_state(rel: Mapping[str, torch.Tensor], unet_ldm: Mapping[str, torch.Tensor],
                        module_ldm_keys: list[str]) -> dict[str, torch.Tensor]:
    """A Control-LoRA's full weights, as the extension builds them: a tensor the file holds is used as it is;
    a weight with ``up``/``down`` factors is the base UNet's plus ``up @ down``; any other weight comes from the
    base UNet; a convolution/linear bias the file lacks is zero (the extension's layers have none then)."""
    out: dict[str, torch.Tensor] = {}
    for key in module_ldm_keys:
        if key in rel:
            out[key] = rel[key]
            continue
        stem, _, param = key.rpartition(".")
        up, down = rel.get(stem + ".up"), rel.get(stem + ".down")
        base = unet_ldm.get(key)
        if param == "weight" and up is not None and down is not None and base is not None:
            delta = torch.mm(up.flatten(1).float(), down.flatten(1).float()).reshape(base.shape)
            out[key] = (base.float() + delta).to(base.dtype)
        elif base is not None:
            out[key] = base
    return out


def _default_value(module: torch.nn.Module, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """What an untrained layer holds for ``key``: ones for a norm's scale, zeros otherwise (biases; the
    extension's Control-LoRA layers have no bias where the file gives none)."""
    owner = module.get_submodule(key.rpartition(".")[0]) if "." in key else module
    norm = isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm))
    return torch.ones(shape) if norm and key.endswith(".weight") else torch.zeros(shape)


def _check_and_load(module: torch.nn.Module, state: dict[str, torch.Tensor], spec: ControlSpec, names: dict[str, str],
                    dtype: torch.dtype, file_label: str, lpb: int, hint_blocks: int) -> None:
    expected = module.state_dict()
    optional = TOLERATED[spec.kind]["optional"]
    missing = [k for k in expected if k not in state]
    required_missing = [k for k in missing if not _matches(k, optional)]
    if required_missing:
        shown = [_file_name_of(spec, k, names, lpb, hint_blocks) for k in required_missing]
        raise ModelFileError(f"{file_label}: missing {len(shown)} tensor(s) the {spec.describe()} needs: {_short(shown)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        shown = [spec.prefix + names.get(k, k) for k in unexpected]
        raise ModelFileError(f"{file_label}: tensors the detected {spec.describe()} does not have: {_short(shown)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelFileError(f"{file_label}: {spec.prefix + names.get(key, key)} has shape {tuple(tensor.shape)}, "
                                 f"the detected {spec.describe()} needs {tuple(expected[key].shape)}")
    for key in missing:  # optional and absent: the value a fresh layer has
        state[key] = _default_value(module, key, tuple(expected[key].shape))
    try:
        module.load_state_dict({k: usable_weight(file_label, spec.prefix + names.get(k, k), v, expected[k], dtype)
                                for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{file_label}: weights do not fit ({str(exc).splitlines()[0][:200]})") from None
    module.eval().requires_grad_(False)


def _folder_weights(folder: Path) -> Path:
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise ModelFileError(f"{folder.name}: diffusers folder without weights (expected {FOLDER_WEIGHTS[0]} or "
                         f"{FOLDER_WEIGHTS[2]})")


def _folder_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{folder.name}: unreadable config.json ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{folder.name}: config.json is not an object")
    return cfg


def detect_control_file(path: str | Path) -> ControlSpec:
    """:func:`detect_control` for a file or diffusers folder on disk (reads the header / tensor shapes only for
    .safetensors), errors naming the file -- e.g. to learn whether it needs the base UNet before loading."""
    path = Path(path)
    weights = _folder_weights(path) if path.is_dir() else path
    try:
        return detect_control(open_state_dict(weights).shapes)
    except ModelFileError as exc:
        message = str(exc)
        raise ModelFileError(message if message.startswith(weights.name) else f"{path.name}: {message}") from None


def load_control_model(path: str | Path, dtype: torch.dtype = torch.float32, *, unet: torch.nn.Module | None = None,
                       global_pool: bool | None = None) -> ControlModel:
    """Detect, convert and load a ControlNet / T2I-Adapter file or diffusers folder (no network access).

    ``unet`` (the base model's diffusers UNet) completes difference ControlNets and Control-LoRAs.
    ``global_pool`` overrides the "global average pooling" switch (the shuffle ControlNet's): otherwise it
    comes from a folder's config.json, or -- the extension's rule for single files -- "shuffle" in the name.
    """
    path = Path(path)
    folder_cfg: dict = {}
    if path.is_dir():
        weights = _folder_weights(path)
        folder_cfg = _folder_config(path)
        label = path.name
    else:
        weights = path
        label = path.name
    source = open_state_dict(weights)  # raises ModelFileError naming the file (truncated, unsafe pickle, ...)
    try:
        spec = detect_control(source.shapes)
    except ModelFileError as exc:
        raise ModelFileError(f"{label}: {exc}") from None
    config = dict(spec.config)
    if folder_cfg:
        config.update({k: folder_cfg[k] for k in _FOLDER_CONFIG_KEYS if k in folder_cfg and k in _accepted(spec)})
    if spec.kind in ("controlnet", "control_lora", "controlnet_union"):
        if global_pool is None:
            global_pool = bool(folder_cfg.get("global_pool_conditions")) if folder_cfg else "shuffle" in path.stem.lower()
        config["global_pool_conditions"] = bool(global_pool)
    spec = ControlSpec(spec.kind, spec.base, spec.layout, config, spec.prefix, spec.difference)
    if spec.needs_unet and unet is None:
        family = spec.describe().split(" Control")[0]
        raise ModelFileError(f"{label}: this {spec.describe()} only holds changes to the base model's UNet; "
                             f"use it with a {family} checkpoint loaded")
    rel = {k[len(spec.prefix):]: source[k] for k in source.shapes if k.startswith(spec.prefix)}
    try:
        module = _build_module(spec, rel)
    except ModelFileError as exc:
        raise ModelFileError(f"{label}: {exc}") from None
    lpb = spec.config.get("layers_per_block", 0)
    hint_blocks = 2 * (len(spec.config.get("conditioning_embedding_out_channels") or [0]) - 1)
    if spec.kind == "control_lora":
        module_ldm = [controlnet_key_hf_to_ldm(k, lpb, hint_blocks) for k in module.state_dict()]
        rel = _control_lora_state(rel, _unet_ldm_state(unet), [k for k in module_ldm if k is not None])
    elif spec.difference:
        base = _unet_ldm_state(unet)
        rel = {k: (v.float() + base[k].float()).to(v.dtype) if k in base and base[k].shape == v.shape else v
               for k, v in rel.items()}
    state, names, unmapped = _convert(spec, rel)
    if unmapped:
        raise ModelFileError(f"{label}: tensors the detected {spec.describe()} does not have: "
                             f"{_short([spec.prefix + n for n in unmapped])}")
    _check_and_load(module, state, spec, names, dtype, label, lpb, hint_blocks)
    name = path.name if path.is_dir() else path.stem
    return ControlModel(spec, module, path, name, dtype)


def _accepted(spec: ControlSpec) -> set[str]:
    return set(inspect.signature(_module_class(spec).__init__).parameters)


class ControlModelCache:
    """Recently used control models, keyed by (path, size, mtime, dtype); least recently used evicted.
    The engine holds one; two entries cover the common "two units, two models" case without reloading."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._items: OrderedDict[tuple, ControlModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    @staticmethod
    def _key(path: Path, dtype: torch.dtype, unet: torch.nn.Module | None) -> tuple:
        target = _folder_weights(path) if path.is_dir() else path
        try:
            st = target.stat()
        except OSError:
            raise ModelFileError(f"{path}: no such file") from None
        return (str(path.resolve()), st.st_size, st.st_mtime, dtype, id(unet) if unet is not None else None)

    def get(self, path: str | Path, dtype: torch.dtype = torch.float32, *, unet: torch.nn.Module | None = None,
            global_pool: bool | None = None) -> ControlModel:
        path = Path(path)
        key = self._key(path, dtype, unet) + (global_pool,)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        model = load_control_model(path, dtype, unet=unet, global_pool=global_pool)
        with self._lock:
            self.loads += 1
            self._items[key] = model
            while len(self._items) > max(self.capacity, 1):
                self._items.popitem(last=False)
        return model

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
