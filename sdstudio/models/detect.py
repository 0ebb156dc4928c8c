"""Detect a checkpoint's architecture from its keys and tensor shapes (never from its file name).

:func:`detect` is pure: ``{key: shape}`` in, :class:`ModelSpec` out. The spec carries diffusers /
transformers configs read off the shapes (channel widths, block counts, attention layout, context
width), plus the few facts shapes cannot tell, taken from the family's published configuration
(number of attention heads, VAE scaling factor). A scaled-down model of the same family therefore
loads through exactly the same path as a real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelFileError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class TextEncoderSpec:
    prefix: str  # where its keys live in the checkpoint
    layout: str  # "clip_hf" (transformers names) or "openclip"
    config: dict  # transformers CLIPTextConfig kwargs
    with_projection: bool  # CLIPTextModelWithProjection (SDXL's second encoder)
    pad_token: str  # "<|endoftext|>" for OpenAI CLIP, "!" for OpenCLIP
    hidden_layer: int  # which hidden state conditions the UNet: -1 last, -2 penultimate...
    final_norm: bool  # apply the final layer norm to that hidden state


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "sd1", "sd2", "sdxl", "sdxl_refiner"
    unet: dict
    vae: dict
    text_encoders: tuple[TextEncoderSpec, ...]
    prediction: str = "epsilon"  # or "v_prediction"
    layers_per_block: int = 2
    up_has_attention: tuple[bool, ...] = field(default_factory=tuple)
    vae_levels: int = 4
    dit: Any = None  # SD 3.x / Flux.1: the transformer's spec (models.dit.DitSpec); ``unet`` holds latent sizes only

    @property
    def inpainting(self) -> bool:
        return self.unet["in_channels"] == 9

    @property
    def is_sdxl(self) -> bool:
        return self.family.startswith("sdxl")

    @property
    def is_flow(self) -> bool:
        """A flow-matching transformer (SD 3.x, Flux.1) rather than a UNet."""
        return self.prediction == "flow"

    def describe(self) -> str:
        if self.dit is not None:
            return self.dit.describe()
        kind = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}[self.family]
        extras = [x for x, on in (("v-prediction", self.prediction == "v_prediction"),
                                  ("inpainting", self.inpainting)) if on]
        return kind + (f" ({', '.join(extras)})" if extras else "")


@dataclass(frozen=True)
class OptionalTensor:
    """A tensor real files may leave out. ``fill``: what stands in for it ("ones" / "zeros"); ``used``:
    whether the model reads it (then its absence is worth a warning, else it is silent)."""

    key: str  # the module's own (diffusers / transformers) name
    fill: str
    used: bool


def optional_tensors(component: str, te: TextEncoderSpec | None = None) -> tuple[OptionalTensor, ...]:
    """The one table of tensors a component may lack, per architecture. A text encoder's final layer norm
    is read only when its output is normalised (SD 1.x, SD 2.x) or pooled (the projection encoders of
    SDXL and its refiner): SDXL's CLIP-L conditions on its penultimate layer, so real SDXL files often omit it."""
    if component == "text_encoder" and te is not None:
        used = te.final_norm or te.with_projection
        return (OptionalTensor("text_model.final_layer_norm.weight", "ones", used),
                OptionalTensor("text_model.final_layer_norm.bias", "zeros", used))
    return ()


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in shapes if (m := rx.match(k))}
    return len(found)


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelFileError(f"not a complete {what}: missing {key}")
    return shapes[key]


def _unet_config(shapes: Shapes, family: str) -> tuple[dict, int, tuple[bool, ...]]:
    p = UNET_PREFIX
    conv_in = _need(shapes, p + "input_blocks.0.0.weight", "UNet")
    channels, in_channels = conv_in[0], conv_in[1]
    # Walk the input blocks: resnets until a downsampler ("op"), which closes a level.
    levels: list[dict] = [{"resnets": 0, "attn": False, "depth": 1, "channels": channels}]
    k = 1
    while any(key.startswith(f"{p}input_blocks.{k}.") for key in shapes):
        if f"{p}input_blocks.{k}.0.op.weight" in shapes:
            levels.append({"resnets": 0, "attn": False, "depth": 1, "channels": channels})
        else:
            level = levels[-1]
            level["resnets"] += 1
            level["channels"] = shapes[f"{p}input_blocks.{k}.0.out_layers.3.weight"][0]
            if f"{p}input_blocks.{k}.1.proj_in.weight" in shapes:
                level["attn"] = True
                level["depth"] = _count(shapes, rf"{re.escape(p)}input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")
        k += 1
    lpb = levels[0]["resnets"]
    if lpb == 0 or any(lv["resnets"] != lpb for lv in levels):
        raise ModelFileError("UNet blocks are not laid out as in Stable Diffusion")
    first_attn = next((k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    if first_attn is None:
        raise ModelFileError("UNet has no cross-attention layers")
    context_dim = shapes[first_attn][1]
    linear_proj = len(next(v for k, v in shapes.items() if k.startswith(p) and k.endswith("proj_in.weight"))) == 2
    block_channels = [lv["channels"] for lv in levels]
    heads = [8] * len(levels) if family == "sd1" else [c // 64 for c in block_channels]
    mid_depth = _count(shapes, rf"{re.escape(p)}middle_block\.1\.transformer_blocks\.(\d+)\.")
    if mid_depth and not levels[-1]["attn"]:
        levels[-1]["depth"] = mid_depth  # the SDXL refiner: no attention at the last level; diffusers takes
        # the middle block's depth from that level's entry
    config = {
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128, "sdxl_refiner": 128}[family],
        "in_channels": in_channels,
        "out_channels": _need(shapes, p + "out.2.weight", "UNet")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attn"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if lv["attn"] else "UpBlock2D" for lv in reversed(levels)],
        "block_out_channels": block_channels,
        "layers_per_block": lpb,
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads if family != "sd1" else 8,
        "use_linear_projection": linear_proj,
        "transformer_layers_per_block": [lv["depth"] for lv in levels] if family.startswith("sdxl") else 1,
    }
    if mid_depth and mid_depth != levels[-1]["depth"]:
        raise ModelFileError("UNet middle block depth differs from its last level; not a known layout")
    if family.startswith("sdxl"):
        label = _need(shapes, p + "label_emb.0.0.weight", "SDXL UNet")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=label[1])
    if family == "sd2":
        config["upcast_attention"] = True
    return config, lpb, tuple(lv["attn"] for lv in reversed(levels))


def _vae_config(shapes: Shapes, prefix: str, family: str) -> tuple[dict, int]:
    p = prefix
    conv_in = _need(shapes, p + "encoder.conv_in.weight", "VAE")
    levels = _count(shapes, rf"{re.escape(p)}encoder\.down\.(\d+)\.")
    lpb = _count(shapes, rf"{re.escape(p)}encoder\.down\.0\.block\.(\d+)\.")
    channels = [shapes[f"{p}encoder.down.{i}.block.{lpb - 1}.conv2.weight"][0] for i in range(levels)]
    config = {
        "in_channels": conv_in[1],
        "out_channels": _need(shapes, p + "decoder.conv_out.weight", "VAE")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "latent_channels": _need(shapes, p + "decoder.conv_in.weight", "VAE")[1],
        "sample_size": 1024 if family.startswith("sdxl") else 512,
        "scaling_factor": 0.13025 if family.startswith("sdxl") else 0.18215,
    }
    return config, levels


def _clip_hf_spec(shapes: Shapes, prefix: str, *, hidden_layer: int, final_norm: bool) -> TextEncoderSpec:
    tm = prefix + ("text_model." if any(k.startswith(prefix + "text_model.") for k in shapes) else "")
    vocab, width = _need(shapes, tm + "embeddings.token_embedding.weight", "CLIP text encoder")
    config = {
        "vocab_size": vocab, "hidden_size": width, "num_attention_heads": max(1, width // 64),
        "num_hidden_layers": _count(shapes, rf"{re.escape(tm)}encoder\.layers\.(\d+)\."),
        "intermediate_size": shapes[tm + "encoder.layers.0.mlp.fc1.weight"][0],
        "max_position_embeddings": shapes[tm + "embeddings.position_embedding.weight"][0],
        "hidden_act": "quick_gelu", "projection_dim": width,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    }
    return TextEncoderSpec(prefix, "clip_hf", config, False, "<|endoftext|>", hidden_layer, final_norm)


def _openclip_spec(shapes: Shapes, prefix: str, *, with_projection: bool, hidden_layer: int,
                   final_norm: bool) -> TextEncoderSpec:
    vocab, width = _need(shapes, prefix + "token_embedding.weight", "OpenCLIP text encoder")
    if prefix + "text_projection.weight" in shapes:  # stored as a Linear's weight: [projection, width]
        proj = shapes[prefix + "text_projection.weight"][::-1]
    else:  # OpenCLIP's own [width, projection]
        proj = shapes.get(prefix + "text_projection", (width, width))
    config = {
        "vocab_size": vocab, "hidden_size": width, "num_attention_heads": max(1, width // 64),
        "num_hidden_layers": _count(shapes, rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\."),
        "intermediate_size": shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        "max_position_embeddings": shapes[prefix + "positional_embedding"][0],
        "hidden_act": "gelu", "projection_dim": proj[1],
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
    }
    return TextEncoderSpec(prefix, "openclip", config, with_projection, "!", hidden_layer, final_norm)


def detect(shapes: Shapes, *, v_prediction: bool | None = None) -> ModelSpec:
    """Architecture of a single-file checkpoint. ``v_prediction`` overrides what the keys suggest."""
    from .dit import detect_dit  # SD 3.x / Flux.1 transformers: their own tables (dit imports this module)

    dit = detect_dit(shapes)
    if dit is not None:
        latent = dit.vae["latent_channels"] if dit.vae else 16
        return ModelSpec(dit.family, {"in_channels": latent, "out_channels": latent, "sample_size": 128},
                         dit.vae or {}, (), "flow", dit=dit)
    if UNET_PREFIX + "input_blocks.0.0.weight" not in shapes:
        if any(k.startswith(("encoder.", "decoder.")) for k in shapes):
            raise ModelFileError("this is a stand-alone VAE, not a checkpoint: put it in models/VAE")
        if any("lora_" in k or ".lora." in k for k in list(shapes)[:50]):
            raise ModelFileError("this is a LoRA, not a checkpoint: put it in models/Lora")
        raise ModelFileError("not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet keys)")
    if any(k.startswith("conditioner.embedders.0.transformer.") for k in shapes):
        family = "sdxl"
        encoders = (
            _clip_hf_spec(shapes, "conditioner.embedders.0.transformer.", hidden_layer=-2, final_norm=False),
            _openclip_spec(shapes, "conditioner.embedders.1.model.", with_projection=True, hidden_layer=-2,
                           final_norm=False),
        )
    elif any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        family = "sdxl_refiner"
        encoders = (_openclip_spec(shapes, "conditioner.embedders.0.model.", with_projection=True,
                                   hidden_layer=-2, final_norm=False),)
    elif any(k.startswith("cond_stage_model.model.") for k in shapes):
        family = "sd2"  # OpenCLIP ViT-H, conditioned on its penultimate layer
        encoders = (_openclip_spec(shapes, "cond_stage_model.model.", with_projection=False, hidden_layer=-2,
                                   final_norm=True),)
    elif any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        family = "sd1"
        encoders = (_clip_hf_spec(shapes, "cond_stage_model.transformer.", hidden_layer=-1, final_norm=True),)
    else:
        raise ModelFileError("checkpoint has a UNet but no text encoder this program knows")
    unet, lpb, up_attn = _unet_config(shapes, family)
    vae, vae_levels = _vae_config(shapes, VAE_PREFIX, family)
    if v_prediction is None:
        v_prediction = "v_pred" in shapes
    return ModelSpec(family, unet, vae, encoders, "v_prediction" if v_prediction else "epsilon", lpb, up_attn,
                     vae_levels)


def detect_vae(shapes: Shapes) -> tuple[str, dict, int]:
    """A stand-alone VAE file: returns (key prefix, diffusers config, levels)."""
    for prefix in ("", VAE_PREFIX):
        if prefix + "encoder.conv_in.weight" in shapes and prefix + "decoder.conv_out.weight" in shapes:
            config, levels = _vae_config(shapes, prefix, "sd1")
            return prefix, config, levels
    raise ModelFileError("not a VAE (no encoder.*/decoder.* keys)")
