"""Tiled VAE decode and encode that give the untiled result (to rounding) in a fraction of the memory.

Naive tiling (decode each tile on its own, blend the overlaps) changes the picture in two ways: the
convolutions near a tile's edge see zeros instead of the neighbour's pixels, and every GroupNorm
normalises with the tile's own statistics, so tiles come out in slightly different tones. Here the
decoder's upsampling path (the encoder's downsampling path) runs layer by layer, one *pass* over the
picture for each stretch between two GroupNorms:

- between passes the picture's activations are held whole in CPU memory, as bands of rows (one per
  row of tiles); a pass takes them to the VAE's device tile by tile, each tile with a halo as wide as the pass's own reach (one or two pixels at
  that resolution), and keeps only each tile's core, so every convolution sees what it sees in the
  whole picture;
- a pass also measures each channel's mean and variance over the cores it keeps (the cores partition
  the picture); the next GroupNorm normalises every tile with the whole picture's statistics;
- a resnet block has two GroupNorms, so it takes two passes: the first only measures ``conv1``'s output,
  the second computes it again and finishes the block. ``conv1`` runs twice, but its output is never
  stored;
- attention, which is global, runs whole at latent resolution, where it is cheap.

Memory: on the device, one tile's activations; in CPU memory, one pass's input and output, and where
the input is not needed again the pass frees its bands as it moves down, so the input shrinks while the
output grows. On a CPU the two are the same memory, and the saving is a whole layer's intermediates:
about one whole-picture tensor at a time instead of the five or six a whole decode holds at its largest
layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Stats = tuple[torch.Tensor, torch.Tensor]  # per (image, channel) mean and variance, float64 on the CPU

DECODE_CORE = (32, 64)  # latent pixels per tile core side: a quarter of the picture's side within these bounds
ENCODE_CORE = 512  # image pixels per tile core side


def decode_core(height: int, width: int) -> int:
    """The tile core side, in latent pixels, for a latent of this size (see DECODE_CORE). It doubles at
    each upsampling, so every pass cuts the picture into the same grid."""
    low, high = DECODE_CORE
    return max(low, min(high, math.ceil(max(height, width) / 4)))


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and variance per (image, channel) and the pixel count, in float32 a few channels at a time
    (no full-size float32 copy of a half-precision tile), returned in float64 on the CPU."""
    means, variances = [], []
    for c in range(0, x.shape[1], 64):
        var, mean = torch.var_mean(x[:, c:c + 64].float(), dim=(2, 3), unbiased=False)
        means.append(mean)
        variances.append(var)
    return torch.cat(means, 1).double().cpu(), torch.cat(variances, 1).double().cpu(), x.shape[2] * x.shape[3]


def _combine(partials: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Stats:
    """Whole-picture mean and variance from the tiles' (Chan's parallel formula, in float64)."""
    total = sum(p[2] for p in partials)
    mean = sum(p[0] * p[2] for p in partials) / total
    m2 = sum((p[1] + (p[0] - mean) ** 2) * p[2] for p in partials)
    return mean, m2 / total


def _normalize(gn: nn.GroupNorm, x: torch.Tensor, stats: Stats, in_place: bool = False) -> torch.Tensor:
    """``gn(x)`` with the whole picture's per-channel statistics, pooled into ``gn``'s groups (the
    channels of a group have equal counts): a per-channel scale and shift worked out in float32, applied
    in ``x``'s dtype, into ``x`` itself when ``in_place``."""
    mean, var = stats
    n, c = mean.shape
    per_group = c // gn.num_groups
    grouped = mean.view(n, gn.num_groups, per_group)
    group_mean = grouped.mean(-1, keepdim=True)
    group_var = (var.view(n, gn.num_groups, per_group) + (grouped - group_mean) ** 2).mean(-1)
    inv = torch.rsqrt(group_var + gn.eps).float().repeat_interleave(per_group, 1)  # (n, c)
    mu = group_mean[..., 0].float().repeat_interleave(per_group, 1)
    weight = gn.weight.float().cpu() if gn.affine else torch.ones(c)
    bias = gn.bias.float().cpu() if gn.affine else torch.zeros(c)
    scale = inv * weight
    shift = (bias - mu * scale).to(x.device, x.dtype)[:, :, None, None]
    scale = scale.to(x.device, x.dtype)[:, :, None, None]
    return x.mul_(scale).add_(shift) if in_place else torch.addcmul(shift, x, scale)


def _act(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The activation, in place when it is SiLU (every SD VAE's): one tile-sized tensor less at a time."""
    return F.silu(x, inplace=True) if isinstance(module, nn.SiLU) else module(x)


def _boxes(size: int, core: int) -> list[tuple[int, int]]:
    return [(start, min(start + core, size)) for start in range(0, size, core)]


Bands = list  # a whole picture as bands of rows, one per tile row (separate tensors, so each can be freed)


def _bands(x: torch.Tensor, core: int) -> Bands:
    return [x[:, :, y0:y1] for y0, y1 in _boxes(x.shape[2], core)]


def _rows(bands: Bands, i: int, halo: int, x0: int, x1: int) -> torch.Tensor:
    """Band ``i``'s columns x0:x1 with ``halo`` rows of its neighbours above and below (fewer at the
    picture's edges)."""
    parts = [bands[i - 1][:, :, -halo:, x0:x1]] if i > 0 and halo else []
    parts.append(bands[i][:, :, :, x0:x1])
    if i + 1 < len(bands) and halo:
        parts.append(bands[i + 1][:, :, :halo, x0:x1])
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def _pass(fn: Callable[[torch.Tensor], torch.Tensor], bands: Bands, core: int, halo: int, device: torch.device,
          scale: float = 1, keep: bool = True, consume: bool = False) -> tuple[Bands | None, Stats]:
    """``fn`` over a whole picture (``bands`` of ``core`` rows, on the CPU) in tiles of ``core`` pixels a side
    plus ``halo``, each run on ``device``. Returns the output's bands, assembled from the tiles' cores
    (``scale`` times the size, on the CPU; None unless ``keep``), and its per-channel statistics.
    ``consume``: free each input band once no tile needs it (the caller's list is emptied as the pass moves
    down), so the input shrinks while the output grows. ``fn`` must leave its input as it is."""
    width = bands[0].shape[3]
    out, partials = [] if keep else None, []
    for i in range(len(bands)):
        band = None
        for x0, x1 in _boxes(width, core):
            tx0 = max(0, x0 - halo)
            result = fn(_rows(bands, i, halo, tx0, min(width, x1 + halo)).to(device))
            oy, ox = int((halo if i > 0 else 0) * scale), int((x0 - tx0) * scale)
            oh, ow = int(bands[i].shape[2] * scale), int((x1 - x0) * scale)
            kept = result[:, :, oy:oy + oh, ox:ox + ow]
            partials.append(_channel_stats(kept))
            if keep:
                if band is None:  # pinned on a GPU machine: the tiles come and go faster
                    band = torch.empty(kept.shape[0], kept.shape[1], oh, int(width * scale), dtype=kept.dtype,
                                       pin_memory=device.type == "cuda")
                band[:, :, :, int(x0 * scale):int(x0 * scale) + ow] = kept
            del result, kept
        if keep:
            out.append(band)
        if consume and i > 0:
            bands[i - 1] = None
    if consume:
        bands.clear()
    return out, _combine(partials)


def _resnet(r: nn.Module, x: Bands, stats: Stats, core: int, device: torch.device,
            halo: int | None) -> tuple[Bands, Stats]:
    """diffusers' ResnetBlock2D as the VAE uses it (no time embedding, no resampling inside) in two
    passes: the first measures conv1's output for ``norm2``, the second computes the block (and frees
    the input as it goes)."""
    def first(t: torch.Tensor) -> torch.Tensor:
        return r.conv1(_act(r.nonlinearity, _normalize(r.norm1, t, stats)))  # a new tensor: t is x's

    _, mid = _pass(first, x, core, 1 if halo is None else halo, device, keep=False)

    def block(t: torch.Tensor) -> torch.Tensor:
        h = r.conv2(r.dropout(_act(r.nonlinearity, _normalize(r.norm2, first(t), mid, in_place=True))))
        h += r.conv_shortcut(t) if r.conv_shortcut is not None else t
        if r.output_scale_factor != 1:
            h /= r.output_scale_factor
        return h

    return _pass(block, x, core, 2 if halo is None else halo, device, consume=True)


def _supported(blocks) -> bool:
    return all(r.upsample is None and r.downsample is None and r.time_emb_proj is None
               and r.time_embedding_norm in ("default", "group") for b in blocks for r in b.resnets) and \
        not any(getattr(b, "attentions", None) for b in blocks)


@torch.no_grad()
def decode(vae, z: torch.Tensor, core: int | None = None, halo: int | None = None) -> torch.Tensor | None:
    """``vae.decode(z).sample`` (z already divided by the scaling factor, on the VAE's device and dtype)
    pass by pass; float32 on the CPU. ``core``: tile side in latent pixels (default: decode_core);
    ``halo``: one halo for every pass instead of each pass's reach (for tests). None when the decoder
    has a layout this does not know."""
    dec = vae.decoder
    if not _supported(dec.up_blocks) or not isinstance(dec.conv_norm_out, nn.GroupNorm):
        return None
    device = z.device
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    h = dec.mid_block(dec.conv_in(z), None)  # attention: whole picture, at latent resolution
    stats = _combine([_channel_stats(h)])
    core = decode_core(*z.shape[2:]) if core is None else core
    x = _bands(h.cpu(), core)
    del h
    for block in dec.up_blocks:
        for r in block.resnets:
            x, stats = _resnet(r, x, stats, core, device, halo)
        for up in block.upsamplers or []:
            x, stats = _pass(up, x, core, 1 if halo is None else halo, device, scale=2, consume=True)
            core *= 2

    def head(t: torch.Tensor) -> torch.Tensor:
        return dec.conv_out(_act(dec.conv_act, _normalize(dec.conv_norm_out, t, stats)))

    out, _ = _pass(head, x, core, 1 if halo is None else halo, device, consume=True)
    return torch.cat(out, 2).float()


@torch.no_grad()
def encode_moments(vae, x: torch.Tensor, core: int = ENCODE_CORE, halo: int | None = None) -> torch.Tensor | None:
    """The encoder's moments (after ``quant_conv``) for images ``x`` (on the VAE's device and dtype; sides
    a multiple of 8), pass by pass along the downsampling path; float32 on the CPU. ``core``: tile side in
    image pixels, a multiple of the downsampling factor. None for unknown layouts."""
    enc = vae.encoder
    if not _supported(enc.down_blocks):
        return None
    factor = 2 ** (len(enc.down_blocks) - 1)
    if core % factor:
        raise ValueError(f"tile core {core} is not a multiple of the VAE's downsampling factor {factor}")
    device = x.device
    h, stats = _pass(enc.conv_in, _bands(x.cpu(), core), core, 1 if halo is None else halo, device)
    for block in enc.down_blocks:
        for r in block.resnets:
            h, stats = _resnet(r, h, stats, core, device, halo)
        for down in block.downsamplers or []:
            # a stride-2 convolution reads pixels 2i..2i+2; even halos and cores keep the tiles on its grid
            h, stats = _pass(down, h, core, 2 if halo is None else halo, device, scale=0.5, consume=True)
            core //= 2
    moments = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(torch.cat(h, 2).to(device)))))
    moments = vae.quant_conv(moments) if vae.quant_conv is not None else moments
    return moments.float().cpu()
