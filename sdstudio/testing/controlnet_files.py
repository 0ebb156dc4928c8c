"""Random-weight ControlNet and T2I-Adapter files in each real layout, for tests.

A ControlNet is built with diffusers' ``ControlNetModel.from_unet`` from a UNet of
:func:`.synthetic.unet_config` (the same family and size as :func:`.synthetic.write_checkpoint`'s), so a
tiny checkpoint and a tiny ControlNet fit together. Its zero convolutions -- zero in a fresh ControlNet, so
it would have no effect -- get small random weights. The files are written in the layouts users have:
lllyasviel's (with or without ``control_model.``, or inside a whole SD checkpoint), diffusers' single file
and folder; T2I-Adapters in TencentARC's and diffusers' names. Same seed, same bytes.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, T2IAdapter, UNet2DConditionModel
from safetensors.torch import save_file

from ..models.controlnet import (
    CONTROL_PREFIX,
    controlnet_hf_to_ldm,
    t2i_adapter_hf_to_tencentarc,
)
from ..models.convert import component_to_ldm
from .synthetic import make_checkpoint, unet_config

CONTROLNET_LAYOUTS = ("ldm", "ldm_prefixed", "full_sd", "diffusers_file", "diffusers_folder")
T2I_LAYOUTS = ("tencentarc", "diffusers_file", "diffusers_folder")


def _randomize_zero_convs(controlnet: ControlNetModel, scale: float = 0.05) -> None:
    """Fresh zero convolutions make a ControlNet a no-op; trained ones are not zero."""
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0.0, scale)
            conv.bias.normal_(0.0, scale)


def controlnet_for(unet: UNet2DConditionModel, *, seed: int = 0, conditioning_channels: int = 3) -> ControlNetModel:
    """A ControlNet for ``unet`` (its encoder copied, as ControlNet training starts), with random non-zero zero
    convolutions and a random hint encoder, so it changes the UNet's output."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels)
    _randomize_zero_convs(controlnet)
    return controlnet.eval()


def _tiny_unet(family: str, size: str, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(family, size))


def _save(state: dict[str, torch.Tensor], path: Path, plain_pickle: bool = True) -> None:
    state = {k: v.detach().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:  # lllyasviel's .pth files are plain state dicts; full checkpoints wrap theirs in "state_dict"
        torch.save(state if plain_pickle else {"state_dict": state}, str(path))


def write_controlnet(path: str | Path, family: str = "sd1", size: str = "tiny", layout: str = "ldm", *,
                     fp16: bool = False, seed: int = 0, unet: UNet2DConditionModel | None = None,
                     controlnet: ControlNetModel | None = None, drop: tuple[str, ...] = ()) -> ControlNetModel:
    """Write a random-weight ControlNet to ``path`` in ``layout`` and return the diffusers module it holds.

    ``ldm``: lllyasviel names, no prefix (control_v11 files); ``ldm_prefixed``: under ``control_model.``;
    ``full_sd``: a whole SD checkpoint (the UNet, VAE and text encoder of ``family``) plus ``control_model.*``
    (control_sd15_* files); ``diffusers_file``: a diffusers state dict in one file; ``diffusers_folder``: a
    folder with config.json and diffusion_pytorch_model.safetensors (``path`` is the folder; a ``.bin`` suffix
    on it selects diffusion_pytorch_model.bin). The file format follows the suffix. ``drop`` removes tensors
    (file names) to imitate files that omit some."""
    if layout not in CONTROLNET_LAYOUTS:
        raise ValueError(f"layout must be one of {CONTROLNET_LAYOUTS}")
    path = Path(path)
    if controlnet is None:
        controlnet = controlnet_for(unet if unet is not None else _tiny_unet(family, size, seed), seed=seed)
    state = controlnet.state_dict()
    if fp16:
        state = {k: v.half() for k, v in state.items()}
    if layout == "diffusers_folder":
        folder = path.with_suffix("") if path.suffix == ".bin" else path
        folder.mkdir(parents=True, exist_ok=True)
        controlnet.save_config(str(folder))
        name = "diffusion_pytorch_model.bin" if path.suffix == ".bin" else "diffusion_pytorch_model.safetensors"
        _save({k: v for k, v in state.items() if k not in drop}, folder / name)
        return controlnet
    if layout != "diffusers_file":
        state = controlnet_hf_to_ldm(state)
    if layout in ("ldm_prefixed", "full_sd"):
        state = {CONTROL_PREFIX + k: v for k, v in state.items()}
    if layout == "full_sd":
        full = make_checkpoint(family, size, seed=seed, dtype=torch.float16 if fp16 else torch.float32)
        state = {**full, **state}
    _save({k: v for k, v in state.items() if k not in drop}, path)
    return controlnet


def _unet_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    up_attn = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    return component_to_ldm(unet.state_dict(), "", "unet", layers_per_block=unet.config.layers_per_block,
                            up_has_attention=up_attn)


def write_difference_controlnet(path: str | Path, unet: UNet2DConditionModel, *, seed: int = 0) -> ControlNetModel:
    """A "difference" ControlNet (extract_controlnet_diff.py's output): every tensor the UNet also has is
    stored minus the UNet's, beside a ``difference`` marker. Loading needs ``unet``."""
    controlnet = controlnet_for(unet, seed=seed)
    with torch.no_grad():  # the encoder trained away from the UNet's, or the differences would all be zero
        for p in controlnet.down_blocks.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    base = _unet_ldm(unet)
    state = controlnet_hf_to_ldm(controlnet.state_dict())
    state = {k: v - base[k] if k in base else v for k, v in state.items()}
    _save({"difference": torch.tensor(1.0), **{CONTROL_PREFIX + k: v for k, v in state.items()}}, Path(path))
    return controlnet


def write_control_lora(path: str | Path, unet: UNet2DConditionModel, *, rank: int = 2, seed: int = 0
                       ) -> ControlNetModel:
    """A Control-LoRA (Stability's control-lora layout): a ``lora_controlnet`` marker; each 2-D+ weight of the
    copied encoder as ``up``/``down`` factors of its change from the UNet's weight (a conv's ``up`` is
    ``[out, rank, 1, 1]``, ``down`` ``[rank, in, k, k]``); the ControlNet's own parts, biases and norms in full.
    Returns the ControlNet the file describes. Loading needs ``unet``."""
    controlnet = controlnet_for(unet, seed=seed)
    base = _unet_ldm(unet)
    gen = torch.Generator().manual_seed(seed + 1)
    hf_state = controlnet.state_dict()
    names = dict(zip(hf_state, controlnet_hf_to_ldm(hf_state)))  # hf name -> lllyasviel name, in order
    out: dict[str, torch.Tensor] = {"lora_controlnet": torch.tensor([])}
    changed: dict[str, torch.Tensor] = {}
    for hf, key in names.items():
        weight = hf_state[hf]
        shared = key in base and not key.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))
        if shared and key.endswith(".weight") and weight.ndim >= 2 and "norm" not in key:
            stem = key.removesuffix(".weight")
            up = torch.randn(weight.shape[0], rank, generator=gen) * 0.05
            down = torch.randn(rank, weight[0].numel(), generator=gen) * 0.05
            changed[hf] = base[key] + (up @ down).reshape(weight.shape)
            out[stem + ".up"] = up.reshape(weight.shape[0], rank, *([1] * (weight.ndim - 2)))
            out[stem + ".down"] = down.reshape(rank, *weight.shape[1:])
        else:
            out[key] = weight
    controlnet.load_state_dict({**hf_state, **changed})  # the module's own names: no reverse conversion
    _save(out, Path(path))
    return controlnet


def t2i_adapter_for(family: str = "sd1", size: str = "tiny", *, seed: int = 0, in_channels: int = 3,
                    adapter_type: str | None = None) -> T2IAdapter:
    """A random-weight diffusers T2IAdapter whose feature widths are the UNet's of :func:`unet_config`."""
    torch.manual_seed(seed)
    channels = list(unet_config(family, size)["block_out_channels"])
    if adapter_type is None:
        adapter_type = "full_adapter_xl" if family == "sdxl" else "full_adapter"
    if family == "sdxl":  # the SDXL adapters feed four features into three levels: widths c0, c1, c2, c2
        channels = [channels[0], channels[1], channels[2], channels[2]]
    factor = 16 if adapter_type == "full_adapter_xl" else 8
    return T2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=2, downscale_factor=factor,
                      adapter_type=adapter_type).eval()


def write_t2i_adapter(path: str | Path, family: str = "sd1", size: str = "tiny", layout: str = "tencentarc", *,
                      fp16: bool = False, seed: int = 0, in_channels: int = 3,
                      adapter: T2IAdapter | None = None) -> T2IAdapter:
    """Write a random-weight T2I-Adapter: ``tencentarc`` (t2iadapter_*_sd14v1.pth names), ``diffusers_file``
    (``adapter.*``) or ``diffusers_folder``; returns the diffusers module."""
    if layout not in T2I_LAYOUTS:
        raise ValueError(f"layout must be one of {T2I_LAYOUTS}")
    path = Path(path)
    adapter = adapter or t2i_adapter_for(family, size, seed=seed, in_channels=in_channels)
    state = adapter.state_dict()
    if fp16:
        state = {k: v.half() for k, v in state.items()}
    if layout == "diffusers_folder":
        path.mkdir(parents=True, exist_ok=True)
        adapter.save_config(str(path))
        _save(state, path / "diffusion_pytorch_model.safetensors")
        return adapter
    if layout == "tencentarc":
        state = t2i_adapter_hf_to_tencentarc(state)
    _save(state, path)
    return adapter


def t2i_style_state(width: int = 128, context_dim: int = 64, layers: int = 2, tokens: int = 4, *,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A random T2I style adapter's tensors under the published file's names and shapes, written name by name
    (not through :class:`sdstudio.models.t2i_style.StyleAdapter`, so loading one tests that module's names).
    The defaults fit the tiny SD 1.x checkpoint (64-wide context) and the tiny CLIP encoder (128 wide)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + mean

    w = width
    state = {"style_embedding": rand(1, tokens, w, scale=w ** -0.5), "proj": rand(w, context_dim, scale=w ** -0.5)}
    for norm in ("ln_pre", "ln_post"):
        state |= {f"{norm}.weight": rand(w, scale=0.1, mean=1.0), f"{norm}.bias": rand(w, scale=0.1)}
    for i in range(layers):
        p = f"transformer_layes.{i}."
        state |= {f"{p}attn.in_proj_weight": rand(3 * w, w), f"{p}attn.in_proj_bias": rand(3 * w),
                  f"{p}attn.out_proj.weight": rand(w, w), f"{p}attn.out_proj.bias": rand(w),
                  f"{p}mlp.c_fc.weight": rand(4 * w, w), f"{p}mlp.c_fc.bias": rand(4 * w),
                  f"{p}mlp.c_proj.weight": rand(w, 4 * w), f"{p}mlp.c_proj.bias": rand(w)}
        for norm in ("ln_1", "ln_2"):
            state |= {f"{p}{norm}.weight": rand(w, scale=0.1, mean=1.0), f"{p}{norm}.bias": rand(w, scale=0.1)}
    return state


def write_t2i_style(path: str | Path, **kwargs) -> Path:
    """:func:`t2i_style_state` saved at ``path`` (.pth as published, or .safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(t2i_style_state(**kwargs), path)
    return path


def controlnet_union_for(unet: UNet2DConditionModel, *, seed: int = 0, num_control_type: int = 8,
                         trans_channels: int | None = None) -> ControlNetUnionModel:
    """A ControlNet++ union model for ``unet``: its encoder copied, zero convolutions, the type projection and
    the task embedding random (trained ones are not zero), the transformer's width the first level's (320 in
    the published files) unless given."""
    torch.manual_seed(seed)
    width = trans_channels or unet.config.block_out_channels[0]
    plain = ControlNetModel.from_unet(unet)  # the encoder copied; the union parts added around it
    accepted = set(inspect.signature(ControlNetUnionModel.__init__).parameters)
    config = {k: v for k, v in plain.config.items() if k in accepted}
    config["addition_time_embed_dim"] = config.get("addition_time_embed_dim") or 32  # SD 1.x: its type embedding
    union = ControlNetUnionModel(**config, num_control_type=num_control_type, num_trans_channel=width,
                                 num_proj_channel=width, num_trans_head=8)
    union.load_state_dict(plain.state_dict(), strict=False)
    _randomize_zero_convs(union)
    with torch.no_grad():
        union.spatial_ch_projs.weight.normal_(0.0, 0.2)
        union.spatial_ch_projs.bias.normal_(0.0, 0.2)
        union.task_embedding.normal_(0.0, 1.0)
    return union.eval()


def write_controlnet_union(path: str | Path, family: str = "sdxl", size: str = "tiny", layout: str = "diffusers_file",
                           *, seed: int = 0, union: ControlNetUnionModel | None = None) -> ControlNetUnionModel:
    """A random union model in one file: ``diffusers_file`` (xinsir's published layout) or ``ldm`` (lllyasviel
    names for the ControlNet part, the union parts under their own names, as converted files have them)."""
    path = Path(path)
    union = union or controlnet_union_for(_tiny_unet(family, size, seed), seed=seed)
    state = union.state_dict()
    if layout == "ldm":
        union_parts = {k: v for k, v in state.items() if k.startswith(
            ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding."))}
        rest = {k: v for k, v in state.items() if k not in union_parts and not k.startswith("control_type_proj")}
        state = {**controlnet_hf_to_ldm(rest), **union_parts}
    elif layout != "diffusers_file":
        raise ValueError("layout must be diffusers_file or ldm")
    _save(state, path)
    return union


def lllite_state(layers: dict[str, int], *, depth: int = 1, cond_emb_dim: int = 16, mlp_dim: int = 8,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ControlNet-LLLite file's tensors for ``layers`` (kohya module name -> the projection's input
    width), written name by name in the published layout (linear modules; ``depth`` 1-3 picks the
    conditioning convs), so loading one tests the loader's reading of the shapes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    half = cond_emb_dim // 2
    state: dict[str, torch.Tensor] = {}
    for name, width in layers.items():
        convs = {"conditioning1.0": (half, 3, 4, 4)}
        if depth == 1:
            convs["conditioning1.2"] = (cond_emb_dim, half, 2, 2)
        elif depth == 2:
            convs["conditioning1.2"] = (cond_emb_dim, half, 4, 4)
        else:
            convs |= {"conditioning1.2": (half, half, 4, 4), "conditioning1.4": (cond_emb_dim, half, 2, 2)}
        for key, shape in convs.items():
            state |= {f"{name}.{key}.weight": rand(*shape), f"{name}.{key}.bias": rand(shape[0])}
        for key, (out, cin) in {"down.0": (mlp_dim, width), "mid.0": (mlp_dim, mlp_dim + cond_emb_dim),
                                "up.0": (width, mlp_dim)}.items():
            state |= {f"{name}.{key}.weight": rand(out, cin), f"{name}.{key}.bias": rand(out)}
    return state


def lllite_layers(unet: UNet2DConditionModel, projections: tuple[str, ...] = ("attn1_to_q", "attn2_to_q")
                  ) -> dict[str, int]:
    """Kohya module names for every transformer block of an SDXL-layout ``unet`` (LDM numbering) and the given
    projections, with each projection's input width."""
    from ..models.convert import unet_hf_to_ldm

    lpb = unet.config.layers_per_block
    up_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    out = {}
    for path, layer in unet.named_modules():
        for proj in projections:
            attn, to = proj.split("_to_")
            if not path.endswith(f".{attn}.to_{to}"):
                continue
            ldm = unet_hf_to_ldm(path + ".weight", lpb, up_attn)
            if ldm is None:
                continue
            name = "lllite_unet_" + ldm.removesuffix(".weight").replace(".", "_")
            out[name] = layer.in_features
    return out


def write_lllite(path: str | Path, unet: UNet2DConditionModel, **kwargs) -> Path:
    """:func:`lllite_state` for every transformer block of ``unet`` saved at ``path`` (.safetensors)."""
    path = Path(path)
    _save(lllite_state(lllite_layers(unet), **kwargs), path)
    return path
