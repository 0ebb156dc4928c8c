"""Key-layout conversion between original single-file checkpoints (LDM / SGM) and diffusers modules.

All layout knowledge lives here, as per-key rules: each function maps one name of one layout to the
other (or says the key is not part of the module). Tensors are only touched where the layouts store
them differently: the VAE's 1x1-conv attention (linear in diffusers) and OpenCLIP's fused q/k/v
projection (three linears in transformers). Names below are *relative* to the component prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

# ---- UNet -------------------------------------------------------------------------------------------

_RESNET_LDM_TO_HF = (
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
)
_UNET_TOP_LDM_TO_HF = (
    ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
)


def _swap_prefix(name: str, table, reverse: bool = False) -> str | None:
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def _resnet(rest: str, reverse: bool = False) -> str:
    return _swap_prefix(rest, _RESNET_LDM_TO_HF, reverse) or rest


def unet_ldm_to_hf(name: str, layers_per_block: int) -> str | None:
    top = _swap_prefix(name, _UNET_TOP_LDM_TO_HF)
    if top:
        return top
    group = layers_per_block + 1
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.+)", name):
        k, part, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(k - 1, group)
        if j == layers_per_block:  # the level's downsampler
            return f"down_blocks.{level}.downsamplers.0.conv." + rest.removeprefix("op.")
        if part == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    if m := re.match(r"middle_block\.(\d)\.(.+)", name):
        part, rest = int(m[1]), m[2]
        if part == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{part // 2}.{_resnet(rest)}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.+)", name):
        k, part, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(k, group)
        if part == 0:
            return f"up_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        if rest.startswith("conv."):  # Upsample holds only a conv; attention never has a top-level conv
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    return None


def unet_hf_to_ldm(name: str, layers_per_block: int, up_has_attention: list[bool]) -> str | None:
    top = _swap_prefix(name, _UNET_TOP_LDM_TO_HF, reverse=True)
    if top:
        return top
    group = layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", name):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + level * group + layers_per_block}.0.op." + rest.removeprefix("conv.")
        k = 1 + level * group + j
        return f"input_blocks.{k}.0.{_resnet(rest, True)}" if kind == "resnets" else f"input_blocks.{k}.1.{rest}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{_resnet(rest, True)}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", name):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            part = 2 if up_has_attention[level] else 1
            return f"output_blocks.{level * group + layers_per_block}.{part}.{rest}"
        k = level * group + j
        return f"output_blocks.{k}.0.{_resnet(rest, True)}" if kind == "resnets" else f"output_blocks.{k}.1.{rest}"
    return None


# ---- VAE --------------------------------------------------------------------------------------------

_VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
_VAE_ATTN = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."))
_VAE_TOP = (("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out."))
_VAE_SAME = ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
             "quant_conv.", "post_quant_conv.")


def vae_ldm_to_hf(name: str, levels: int) -> str | None:
    if name.startswith(_VAE_SAME):
        return name
    top = _swap_prefix(name, _VAE_TOP)
    if top:
        return top
    if m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", name):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}." + (_swap_prefix(m[3], _VAE_RESNET) or m[3])
    if m := re.match(r"encoder\.down\.(\d+)\.downsample\.(.+)", name):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.{m[2]}"
    if m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", name):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}." + (_swap_prefix(m[3], _VAE_RESNET) or m[3])
    if m := re.match(r"decoder\.up\.(\d+)\.upsample\.(.+)", name):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid\.block_(\d)\.(.+)", name):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}." + (_swap_prefix(m[3], _VAE_RESNET) or m[3])
    if m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(.+)", name):
        rest = _swap_prefix(m[2], _VAE_ATTN)
        return f"{m[1]}.mid_block.attentions.0.{rest}" if rest else None
    return None


def vae_hf_to_ldm(name: str, levels: int) -> str | None:
    if name.startswith(_VAE_SAME):
        return name
    top = _swap_prefix(name, _VAE_TOP, reverse=True)
    if top:
        return top
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}." + (_swap_prefix(m[3], _VAE_RESNET, True) or m[3])
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", name):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}." + (_swap_prefix(m[3], _VAE_RESNET, True) or m[3])
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}." + (_swap_prefix(m[3], _VAE_RESNET, True) or m[3])
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
        rest = _swap_prefix(m[2], _VAE_ATTN, reverse=True)
        return f"{m[1]}.mid.attn_1.{rest}" if rest else None
    return None


def _is_vae_attn_weight(hf_name: str) -> bool:
    return ".mid_block.attentions.0." in hf_name and hf_name.endswith(".weight") and "group_norm" not in hf_name


# ---- text encoders ----------------------------------------------------------------------------------

def clip_hf_ldm_to_hf(name: str) -> str | None:
    """CLIP-L stored in transformers layout (SD1 ``cond_stage_model.transformer.``, SDXL embedder 0)."""
    if name in _CLIP_NOT_WEIGHTS or name.endswith("position_ids"):
        return None  # CLIP's training temperature, the position-ids buffer: not part of the text model
    return name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name  # very old files lack the level


_OPENCLIP_LAYER = (
    ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
)
_OPENCLIP_TOP = (
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."),
)


_CLIP_NOT_WEIGHTS = ("logit_scale", "text_model.logit_scale")


def openclip_to_hf(name: str) -> list[str] | None:
    """OpenCLIP names -> transformers names; the fused ``in_proj`` maps to three names (q, k, v)."""
    top = _swap_prefix(name, _OPENCLIP_TOP)
    if top:
        return [top]
    if name in ("text_projection", "text_projection.weight"):  # OpenCLIP's (x @ P) or a Linear's layout
        return ["text_projection.weight"]
    if m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)", name):
        layer, rest = f"text_model.encoder.layers.{m[1]}.", m[2]
        if m2 := re.match(r"attn\.in_proj_(weight|bias)", rest):
            return [f"{layer}self_attn.{p}_proj.{m2[1]}" for p in "qkv"]
        mapped = _swap_prefix(rest, _OPENCLIP_LAYER)
        return [layer + mapped] if mapped else None
    return None  # logit_scale, attn_mask, ...


def hf_to_openclip(name: str) -> str | None:
    top = _swap_prefix(name, _OPENCLIP_TOP, reverse=True)
    if top:
        return top
    if name == "text_projection.weight":
        return "text_projection"
    if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)", name):
        layer, rest = f"transformer.resblocks.{m[1]}.", m[2]
        if m2 := re.match(r"self_attn\.[qkv]_proj\.(weight|bias)", rest):
            return f"{layer}attn.in_proj_{m2[1]}"
        mapped = _swap_prefix(rest, _OPENCLIP_LAYER, reverse=True)
        return layer + mapped if mapped else None
    return None


# ---- whole components -------------------------------------------------------------------------------

Getter = Callable[[str], torch.Tensor]


def convert_component(source: Mapping[str, torch.Tensor], prefix: str, kind: str, **layout) -> dict[str, torch.Tensor]:
    """Take the keys under ``prefix`` from an original-layout state dict and return a diffusers/
    transformers state dict for one component. ``kind``: unet, vae, clip_hf, openclip."""
    out: dict[str, torch.Tensor] = {}
    for key in source:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if kind == "unet":
            hf = unet_ldm_to_hf(name, layout["layers_per_block"])
        elif kind == "vae":
            hf = vae_ldm_to_hf(name, layout["levels"])
        elif kind == "clip_hf":
            hf = clip_hf_ldm_to_hf(name)
        elif kind == "openclip":
            names = openclip_to_hf(name)
            if names and len(names) == 3:
                for part, hf_name in zip(source[key].chunk(3, dim=0), names):
                    out[hf_name] = part
                continue
            hf = names[0] if names else None
            if name == "text_projection":  # OpenCLIP multiplies x @ P: the Linear's weight is P transposed
                out[hf] = source[key].t()
                continue
        else:
            raise ValueError(kind)
        if hf is None:
            continue
        tensor = source[key]
        if kind == "vae" and _is_vae_attn_weight(hf) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        out[hf] = tensor
    return out


def component_to_ldm(state: Mapping[str, torch.Tensor], prefix: str, kind: str, **layout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_component`: a diffusers/transformers state dict -> original names under ``prefix``."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if kind == "unet":
            ldm = unet_hf_to_ldm(name, layout["layers_per_block"], layout["up_has_attention"])
        elif kind == "vae":
            ldm = vae_hf_to_ldm(name, layout["levels"])
            if ldm and _is_vae_attn_weight(name) and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        elif kind == "clip_hf":
            ldm = None if name.endswith("position_ids") else name
        elif kind == "openclip":
            ldm = hf_to_openclip(name)
            if ldm and ldm.endswith(("in_proj_weight", "in_proj_bias")):
                fused.setdefault(ldm, {})[name.split("self_attn.")[1][0]] = tensor
                continue
            if ldm == "text_projection":
                tensor = tensor.t()
        else:
            raise ValueError(kind)
        if ldm is not None:
            out[prefix + ldm] = tensor
    for ldm, parts in fused.items():
        out[prefix + ldm] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def canonical_text_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's state dict with every transformer weight under ``text_model.`` (transformers 5's
    ``CLIPTextModel`` has no such level; ``CLIPTextModelWithProjection`` and the checkpoints do)."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


def module_text_state(state: Mapping[str, torch.Tensor], module_keys) -> dict[str, torch.Tensor]:
    """Inverse of :func:`canonical_text_state` for a given module's own key names."""
    if "text_model.embeddings.token_embedding.weight" in module_keys:
        return dict(state)
    return {k.removeprefix("text_model."): v for k, v in state.items()}
