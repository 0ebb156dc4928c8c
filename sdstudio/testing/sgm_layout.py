"""Stability's released SDXL single files (SGM layout), key by key, written from the layout itself.

Our other test checkpoints (:mod:`.synthetic`) are diffusers modules run through our own converter, so
they can never catch a converter or loader mistake. This module knows nothing of diffusers or of
:mod:`sdstudio.models.convert`: it walks Stability's ``sgm`` model definitions -- ``UNetModel`` of
``sgm/modules/diffusionmodules/openaimodel.py`` with the parameters of ``configs/inference/sd_xl_base.yaml``
and ``sd_xl_refiner.yaml``, ``FrozenCLIPEmbedder`` (a transformers ``CLIPTextModel``, its state dict
under ``conditioner.embedders.0.transformer.``), ``FrozenOpenCLIPEmbedder2`` (an OpenCLIP ViT-bigG text
tower under ``conditioner.embedders.N.model.``) and the LDM ``AutoencoderKL`` -- and lists the tensors
those modules save, with their shapes.

What the released files hold (the counts are checked by tests/test_sdxl_files.py):

- ``sd_xl_base_1.0.safetensors``: 2515 tensors, fp16 -- the UNet 1680, the VAE 248, CLIP-L 197
  (its 196 parameters, ``final_layer_norm`` included although SDXL never applies it, plus the int64
  ``embeddings.position_ids`` buffer [1, 77]), OpenCLIP bigG 390 (32 x 12 resblock tensors,
  ``token_embedding``, ``positional_embedding``, ``ln_final`` x2, ``text_projection`` [1280, 1280] used
  as ``x @ P``, and the unused scalar ``logit_scale``). No ``attn_mask`` (a non-persistent buffer), no EMA.
- ``sd_xl_refiner_1.0.safetensors``: the same OpenCLIP bigG under ``conditioner.embedders.0.model.``
  (390), the VAE (248) and a 4-level UNet (model_channels 384, attention at levels 1 and 2 with depth 4,
  context 1280, adm 2560): 1220 UNet tensors, 1858 in all -- counted from the layout, not read from a
  header.

Files in the wild differ from those in tensors the model never reads (merges and "pruned" saves drop
CLIP-L's ``final_layer_norm``, ``position_ids`` or ``logit_scale``), in EMA copies (``model_ema.*``, the
UNet's parameter names without dots, as sgm's ``LitEma`` stores them), in the orientation of bigG's
projection (ComfyUI reads ``text_projection`` as OpenCLIP's [width, proj] and ``text_projection.weight``
as a Linear weight [proj, width]) and in fp8 (``float8_e4m3fn``) UNet weights: see :class:`Variant`.

Tensors are random but reproducible per key (the seed and the key's CRC), so two variants of one seed
share every tensor they both have, and a variant's file can be checked against the release layout's.
Files are streamed to disk tensor by tensor: the full-size base (6.9 GB fp16) never sits in memory.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer."
OPENCLIP = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
TIME_EMBED_DIM = 256  # ConcatTimestepEmbedderND's outdim, per number (sizes, crop, aesthetic score)

# What the released files contain, component by component (see the module docstring).
RELEASED_KEY_COUNTS = {
    "base": {"unet": 1680, "vae": 248, "clip_l": 197, "openclip": 390, "total": 2515},
    "refiner": {"unet": 1220, "vae": 248, "openclip": 390, "total": 1858},
}


# ---- the layouts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetLayout:
    """``sgm.modules.diffusionmodules.openaimodel.UNetModel``'s constructor arguments."""

    model_channels: int
    channel_mult: tuple[int, ...]
    attention_levels: tuple[bool, ...]  # attention_resolutions [4, 2]: levels whose downsampling ds is 2 or 4
    transformer_depth: tuple[int, ...]  # per level; the middle block takes the last (transformer_depth[-1])
    context_dim: int
    adm_in_channels: int
    num_res_blocks: int = 2
    num_head_channels: int = 64
    in_channels: int = 4
    out_channels: int = 4

    @property
    def channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


@dataclass(frozen=True)
class TextLayout:
    """A CLIP text tower: width, layers, MLP width; ``proj`` only for OpenCLIP (its text_projection)."""

    width: int
    layers: int
    mlp: int
    proj: int = 0
    vocab: int = 49408
    positions: int = 77

    @property
    def heads(self) -> int:
        return self.width // 64


@dataclass(frozen=True)
class VaeLayout:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4

    @property
    def channels(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]


@dataclass(frozen=True)
class SgmLayout:
    kind: str  # "base" or "refiner"
    unet: UNetLayout
    vae: VaeLayout
    clip_l: TextLayout | None  # the refiner has no CLIP-L
    openclip: TextLayout

    @property
    def openclip_prefix(self) -> str:
        return OPENCLIP[self.kind]

    @property
    def time_ids(self) -> int:
        """Numbers in the size conditioning: base (h, w, top, left, h, w), refiner (h, w, top, left, score)."""
        return (self.unet.adm_in_channels - self.openclip.proj) // TIME_EMBED_DIM


_BIGG = TextLayout(width=1280, layers=32, mlp=5120, proj=1280)
_FULL = {
    "base": SgmLayout(
        "base",
        UNetLayout(320, (1, 2, 4), (False, True, True), (1, 2, 10), 2048, 2816),
        VaeLayout(),
        TextLayout(width=768, layers=12, mlp=3072),
        _BIGG,
    ),
    "refiner": SgmLayout(
        "refiner",
        UNetLayout(384, (1, 2, 4, 4), (False, True, True, False), (4, 4, 4, 4), 1280, 2560),
        VaeLayout(),
        None,
        _BIGG,
    ),
}
# The reduced models keep the layout (levels, channel multipliers, which levels attend, per-level depths
# that differ, 64-channel heads, GroupNorm's 32 groups, the key names) and shrink widths and depths until
# a load and a 64x64 generation take seconds on one core. bigG's projection is made non-square (128 -> 96)
# so that a transposed projection fails by shape as well as by value.
_R_BIGG = TextLayout(width=128, layers=3, mlp=512, proj=96)
_REDUCED = {
    "base": SgmLayout(
        "base",
        UNetLayout(32, (1, 2, 4), (False, True, True), (1, 2, 3), 64 + 128, 6 * TIME_EMBED_DIM + 96),
        VaeLayout(ch=32),
        TextLayout(width=64, layers=3, mlp=256),
        _R_BIGG,
    ),
    "refiner": SgmLayout(
        "refiner",
        UNetLayout(32, (1, 2, 4, 4), (False, True, True, False), (2, 2, 2, 2), 128, 5 * TIME_EMBED_DIM + 96),
        VaeLayout(ch=32),
        None,
        _R_BIGG,
    ),
}


def sgm_layout(kind: str = "base", *, reduced: bool = False, depth_scale: float | None = None) -> SgmLayout:
    """The layout of the released file (``reduced=False``) or of its small stand-in. ``depth_scale``
    scales every transformer depth and text-encoder layer count (rounded up, at least 2 text layers so a
    penultimate layer exists), keeping the widths."""
    if kind not in _FULL:
        raise ValueError(f"kind must be 'base' or 'refiner', not {kind!r}")
    layout = (_REDUCED if reduced else _FULL)[kind]
    if depth_scale is None:
        return layout

    def scaled(n: int, least: int = 1) -> int:
        return max(least, math.ceil(n * depth_scale))

    unet = replace(layout.unet, transformer_depth=tuple(scaled(d) for d in layout.unet.transformer_depth))
    clip_l = replace(layout.clip_l, layers=scaled(layout.clip_l.layers, 2)) if layout.clip_l else None
    return replace(layout, unet=unet, clip_l=clip_l, openclip=replace(layout.openclip, layers=scaled(
        layout.openclip.layers, 2)))


# ---- the variants found in the wild -----------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    final_layer_norm: bool = True  # CLIP-L's final_layer_norm (SDXL conditions on its penultimate layer)
    position_ids: bool = True  # CLIP-L's embeddings.position_ids buffer, int64 [1, 77]
    logit_scale: bool = True  # OpenCLIP's scalar logit_scale (contrastive training only)
    ema: bool = False  # model_ema.* copies of every UNet parameter, plus model_ema.decay / num_updates
    text_projection: str = "openclip"  # "openclip": text_projection [width, proj]; "linear": .weight [proj, width]
    unet_fp8: bool = False  # UNet matrices and kernels stored as float8_e4m3fn (1-D tensors stay in `dtype`)


VARIANTS = {
    "release": Variant(),
    "no_final_layer_norm": Variant(final_layer_norm=False),
    "pruned": Variant(final_layer_norm=False, position_ids=False, logit_scale=False),
    "ema": Variant(ema=True),
    "linear_projection": Variant(text_projection="linear"),
    "fp8": Variant(unet_fp8=True),
}


def _variant(variant: Variant | str | None) -> Variant:
    if variant is None:
        return VARIANTS["release"]
    return VARIANTS[variant] if isinstance(variant, str) else variant


# ---- the tensors ------------------------------------------------------------------------------------
# Each entry: (key, shape, init). init: "w" a weight (scaled by its fan-in), "b" a bias, "nw"/"nb" a
# norm's scale/shift, "emb" an embedding table, "pos" a positional table, "ids" position ids,
# "scale" logit_scale, "decay"/"updates" the EMA's counters, "wT" the transpose of the weight of the key
# without ".weight" (bigG's projection stored as a Linear).
Entry = tuple[str, tuple[int, ...], str]


def _norm(p: str, c: int) -> Iterator[Entry]:
    yield p + "weight", (c,), "nw"
    yield p + "bias", (c,), "nb"


def _lin(p: str, out: int, inp: int, bias: bool = True) -> Iterator[Entry]:
    yield p + "weight", (out, inp), "w"
    if bias:
        yield p + "bias", (out,), "b"


def _conv(p: str, out: int, inp: int, k: int = 3) -> Iterator[Entry]:
    yield p + "weight", (out, inp, k, k), "w"
    yield p + "bias", (out,), "b"


def _resblock(p: str, cin: int, cout: int, emb: int) -> Iterator[Entry]:
    """openaimodel.ResBlock: in_layers (GroupNorm, SiLU, conv), emb_layers (SiLU, Linear),
    out_layers (GroupNorm, SiLU, Dropout, conv), a 1x1 skip_connection when the width changes."""
    yield from _norm(p + "in_layers.0.", cin)
    yield from _conv(p + "in_layers.2.", cout, cin)
    yield from _lin(p + "emb_layers.1.", cout, emb)
    yield from _norm(p + "out_layers.0.", cout)
    yield from _conv(p + "out_layers.3.", cout, cout)
    if cin != cout:
        yield from _conv(p + "skip_connection.", cout, cin, 1)


def _spatial_transformer(p: str, c: int, depth: int, context: int) -> Iterator[Entry]:
    """attention.SpatialTransformer with use_linear=True: GroupNorm, Linear proj_in/proj_out, and
    BasicTransformerBlocks (self-attention, cross-attention, GEGLU feed-forward of 4x width)."""
    yield from _norm(p + "norm.", c)
    yield from _lin(p + "proj_in.", c, c)
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for attn, kv in (("attn1.", c), ("attn2.", context)):
            yield from _lin(b + attn + "to_q.", c, c, bias=False)
            yield from _lin(b + attn + "to_k.", c, kv, bias=False)
            yield from _lin(b + attn + "to_v.", c, kv, bias=False)
            yield from _lin(b + attn + "to_out.0.", c, c)
        yield from _lin(b + "ff.net.0.proj.", 8 * c, c)  # GEGLU: value and gate
        yield from _lin(b + "ff.net.2.", c, 4 * c)
        for n in ("norm1.", "norm2.", "norm3."):
            yield from _norm(b + n, c)
    yield from _lin(p + "proj_out.", c, c)


def unet_entries(u: UNetLayout, prefix: str = UNET) -> Iterator[Entry]:
    """UNetModel.__init__'s loops, block by block, in its numbering."""
    emb = u.time_embed_dim
    yield from _lin(prefix + "time_embed.0.", emb, u.model_channels)
    yield from _lin(prefix + "time_embed.2.", emb, emb)
    yield from _lin(prefix + "label_emb.0.0.", emb, u.adm_in_channels)  # num_classes="sequential"
    yield from _lin(prefix + "label_emb.0.2.", emb, emb)
    yield from _conv(prefix + "input_blocks.0.0.", u.model_channels, u.in_channels)
    chans = [u.model_channels]  # input_block_chans: what each input block hands to the output side
    ch, k = u.model_channels, 1
    for level, mult in enumerate(u.channel_mult):
        for _ in range(u.num_res_blocks):
            p = f"{prefix}input_blocks.{k}."
            yield from _resblock(p + "0.", ch, mult * u.model_channels, emb)
            ch = mult * u.model_channels
            if u.attention_levels[level]:
                yield from _spatial_transformer(p + "1.", ch, u.transformer_depth[level], u.context_dim)
            chans.append(ch)
            k += 1
        if level != len(u.channel_mult) - 1:
            yield from _conv(f"{prefix}input_blocks.{k}.0.op.", ch, ch)
            chans.append(ch)
            k += 1
    yield from _resblock(prefix + "middle_block.0.", ch, ch, emb)
    yield from _spatial_transformer(prefix + "middle_block.1.", ch, u.transformer_depth[-1], u.context_dim)
    yield from _resblock(prefix + "middle_block.2.", ch, ch, emb)
    k = 0
    for level, mult in reversed(list(enumerate(u.channel_mult))):
        for i in range(u.num_res_blocks + 1):
            p = f"{prefix}output_blocks.{k}."
            skip = chans.pop()
            yield from _resblock(p + "0.", ch + skip, mult * u.model_channels, emb)
            ch = mult * u.model_channels
            part = 1
            if u.attention_levels[level]:
                yield from _spatial_transformer(p + "1.", ch, u.transformer_depth[level], u.context_dim)
                part = 2
            if level and i == u.num_res_blocks:
                yield from _conv(f"{p}{part}.conv.", ch, ch)
            k += 1
    yield from _norm(prefix + "out.0.", ch)
    yield from _conv(prefix + "out.2.", u.out_channels, ch)


def vae_entries(v: VaeLayout, prefix: str = VAE) -> Iterator[Entry]:
    """ldm.modules.diffusionmodules.model Encoder/Decoder (attn_resolutions [], so attention only in the
    middle), with quant_conv/post_quant_conv; attention q/k/v/proj_out are 1x1 convolutions."""

    def block(p: str, cin: int, cout: int) -> Iterator[Entry]:
        yield from _norm(p + "norm1.", cin)
        yield from _conv(p + "conv1.", cout, cin)
        yield from _norm(p + "norm2.", cout)
        yield from _conv(p + "conv2.", cout, cout)
        if cin != cout:
            yield from _conv(p + "nin_shortcut.", cout, cin, 1)

    def mid(p: str, c: int) -> Iterator[Entry]:
        yield from block(p + "block_1.", c, c)
        yield from _norm(p + "attn_1.norm.", c)
        for n in ("q", "k", "v", "proj_out"):
            yield from _conv(f"{p}attn_1.{n}.", c, c, 1)
        yield from block(p + "block_2.", c, c)

    chans = v.channels
    e = prefix + "encoder."
    yield from _conv(e + "conv_in.", v.ch, 3)
    cin = v.ch
    for i, c in enumerate(chans):
        for j in range(v.num_res_blocks):
            yield from block(f"{e}down.{i}.block.{j}.", cin, c)
            cin = c
        if i != len(chans) - 1:
            yield from _conv(f"{e}down.{i}.downsample.conv.", c, c)
    yield from mid(e + "mid.", cin)
    yield from _norm(e + "norm_out.", cin)
    yield from _conv(e + "conv_out.", 2 * v.z_channels, cin)
    d = prefix + "decoder."
    cin = chans[-1]
    yield from _conv(d + "conv_in.", cin, v.z_channels)
    yield from mid(d + "mid.", cin)
    for i in reversed(range(len(chans))):
        for j in range(v.num_res_blocks + 1):
            yield from block(f"{d}up.{i}.block.{j}.", cin, chans[i])
            cin = chans[i]
        if i:
            yield from _conv(f"{d}up.{i}.upsample.conv.", cin, cin)
    yield from _norm(d + "norm_out.", cin)
    yield from _conv(d + "conv_out.", 3, cin)
    yield from _conv(prefix + "quant_conv.", 2 * v.embed_dim, 2 * v.z_channels, 1)
    yield from _conv(prefix + "post_quant_conv.", v.z_channels, v.embed_dim, 1)


def clip_l_entries(t: TextLayout, variant: Variant, prefix: str = CLIP_L) -> Iterator[Entry]:
    """transformers' CLIPTextModel state dict (the SGM files keep its ``text_model.`` level)."""
    m = prefix + "text_model."
    yield m + "embeddings.token_embedding.weight", (t.vocab, t.width), "emb"
    yield m + "embeddings.position_embedding.weight", (t.positions, t.width), "pos"
    if variant.position_ids:
        yield m + "embeddings.position_ids", (1, t.positions), "ids"
    for i in range(t.layers):
        p = f"{m}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _lin(f"{p}self_attn.{n}.", t.width, t.width)
        yield from _norm(p + "layer_norm1.", t.width)
        yield from _lin(p + "mlp.fc1.", t.mlp, t.width)
        yield from _lin(p + "mlp.fc2.", t.width, t.mlp)
        yield from _norm(p + "layer_norm2.", t.width)
    if variant.final_layer_norm:
        yield from _norm(m + "final_layer_norm.", t.width)


def openclip_entries(t: TextLayout, variant: Variant, prefix: str) -> Iterator[Entry]:
    """open_clip's text tower as FrozenOpenCLIPEmbedder2 keeps it (the visual tower deleted)."""
    yield prefix + "positional_embedding", (t.positions, t.width), "pos"
    if variant.text_projection == "openclip":
        yield prefix + "text_projection", (t.width, t.proj), "w"
    elif variant.text_projection == "linear":
        yield prefix + "text_projection.weight", (t.proj, t.width), "wT"  # the same P, transposed
    else:
        raise ValueError(variant.text_projection)
    if variant.logit_scale:
        yield prefix + "logit_scale", (), "scale"
    yield prefix + "token_embedding.weight", (t.vocab, t.width), "emb"
    yield from _norm(prefix + "ln_final.", t.width)
    for i in range(t.layers):
        p = f"{prefix}transformer.resblocks.{i}."
        yield from _norm(p + "ln_1.", t.width)
        yield p + "attn.in_proj_weight", (3 * t.width, t.width), "w"  # q, k, v stacked by rows
        yield p + "attn.in_proj_bias", (3 * t.width,), "b"
        yield from _lin(p + "attn.out_proj.", t.width, t.width)
        yield from _norm(p + "ln_2.", t.width)
        yield from _lin(p + "mlp.c_fc.", t.mlp, t.width)
        yield from _lin(p + "mlp.c_proj.", t.width, t.mlp)


def ema_name(key: str) -> str:
    """sgm's LitEma: the parameter's name below ``model.`` with its dots removed."""
    return "model_ema." + key.removeprefix("model.").replace(".", "")


def sgm_entries(layout: SgmLayout, variant: Variant | str | None = None) -> list[Entry]:
    variant = _variant(variant)
    unet = list(unet_entries(layout.unet))
    out = unet + list(vae_entries(layout.vae))
    if layout.clip_l is not None:
        out += list(clip_l_entries(layout.clip_l, variant))
    out += list(openclip_entries(layout.openclip, variant, layout.openclip_prefix))
    if variant.ema:
        out += [(ema_name(k), shape, init) for k, shape, init in unet]
        out += [("model_ema.decay", (), "decay"), ("model_ema.num_updates", (), "updates")]
    return out


def sgm_shapes(kind: str = "base", *, reduced: bool = False, depth_scale: float | None = None,
               variant: Variant | str | None = None) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the released file (full size by default), as a safetensors header lists it."""
    return {k: shape for k, shape, _ in sgm_entries(sgm_layout(kind, reduced=reduced, depth_scale=depth_scale),
                                                    variant)}


def _dtype_of(key: str, shape: tuple[int, ...], init: str, dtype: torch.dtype, variant: Variant) -> torch.dtype:
    if init == "ids":
        return torch.int64
    if init == "updates":
        return torch.int32
    if init == "decay":
        return torch.float32
    if variant.unet_fp8 and key.startswith(UNET) and len(shape) >= 2:
        return torch.float8_e4m3fn
    return dtype


def sgm_tensor(key: str, shape: tuple[int, ...], init: str, seed: int = 0) -> torch.Tensor:
    """The float32 (or integer) value of one tensor: the same for the same seed and key in every variant."""
    if init == "ids":
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if init == "updates":
        return torch.tensor(0, dtype=torch.int32)
    if init == "decay":
        return torch.tensor(0.9999, dtype=torch.float32)
    if init == "scale":
        return torch.tensor(math.log(1 / 0.07), dtype=torch.float32)  # open_clip's initial value
    if init == "wT":  # a Linear's weight stored for what another layout stores as [in, out]: same values
        return sgm_tensor(key.removesuffix(".weight"), shape[::-1], "w", seed).T.contiguous()
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    x = torch.randn(shape, generator=g)
    if init == "w":
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        return x / math.sqrt(fan_in)
    mean, std = {"b": (0.0, 0.02), "nw": (1.0, 0.1), "nb": (0.05, 0.1), "emb": (0.0, 0.02),
                 "pos": (0.0, 0.01)}[init]
    return x * std + mean


def stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """As the file stores it: float tensors rounded to ``dtype``; fp8 by way of fp16, as fp8 files are
    made (an fp16 release quantized). Integer buffers stay as they are."""
    if not tensor.is_floating_point() or tensor.dtype == torch.float32 and dtype == torch.float32:
        return tensor
    if dtype == torch.float8_e4m3fn:
        tensor = tensor.to(torch.float16)
    return tensor.to(dtype)


def sgm_state_dict(kind: str = "base", *, reduced: bool = True, dtype: torch.dtype = torch.float16, seed: int = 0,
                   variant: Variant | str | None = None, depth_scale: float | None = None) -> dict[str, torch.Tensor]:
    """The tensors :func:`write_sgm_checkpoint` writes, in memory (use for reduced layouts)."""
    v = _variant(variant)
    layout = sgm_layout(kind, reduced=reduced, depth_scale=depth_scale)
    return {k: stored(sgm_tensor(k, shape, init, seed), _dtype_of(k, shape, init, dtype, v))
            for k, shape, init in sgm_entries(layout, v)}


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.float8_e4m3fn: "F8_E4M3"}


def write_sgm_checkpoint(path: str | Path, kind: str = "base", *, reduced: bool = True,
                         dtype: torch.dtype = torch.float16, seed: int = 0, variant: Variant | str | None = None,
                         depth_scale: float | None = None) -> Path:
    """A random-weight ``.safetensors`` file with the released file's key names (``reduced=False``: its
    shapes too). Written by hand, one tensor at a time: header (little-endian u64 length, JSON padded to
    8 bytes with spaces), then the tensors' bytes back to back in header order."""
    v = _variant(variant)
    layout = sgm_layout(kind, reduced=reduced, depth_scale=depth_scale)
    entries = sgm_entries(layout, v)
    header: dict[str, dict] = {"__metadata__": {"format": "pt", "sdstudio.sgm_layout": f"{kind}"
                                                f"{'-reduced' if reduced else ''}", "sdstudio.seed": str(seed)}}
    offset = 0
    for key, shape, init in entries:
        dt = _dtype_of(key, shape, init, dtype, v)
        size = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        header[key] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, init in entries:
            t = stored(sgm_tensor(key, shape, init, seed), _dtype_of(key, shape, init, dtype, v))
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return path
