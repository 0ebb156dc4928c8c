"""Tiled VAE decode and encode that give the untiled result (to rounding) while holding only one tile
on the GPU.

Naive tiling (decode each tile on its own, blend the overlaps) changes the picture in two ways: the
convolutions near a tile's edge see zeros instead of the neighbour's pixels, and every GroupNorm
normalises with the tile's own statistics, so tiles come out in slightly different tones. Here:

- each tile carries a halo wider than the receptive field of the tiled layers, and only its core is
  kept, so the convolutions see exactly what they see in the whole image;
- the attention layer (global by nature) runs untiled, at latent resolution, where it is cheap: the
  decoder tiles only its upsampling path, the encoder only its downsampling path;
- the tiles advance in lockstep from one GroupNorm to the next: each contributes its core's mean and
  variance (the cores partition the image), the whole image's are combined and sent back, and every
  tile normalises with those. While a tile waits its state is parked in CPU memory.

Memory: on a GPU, one tile's activations at a time (the parked states live in CPU memory), and within a
tile the norms and activations work in place where the input is not needed again. On a CPU the parked
states stay where they are, so the saving there is only the larger intermediates of a whole-image layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DECODE_CORE = (32, 64)  # latent pixels per tile core side (256–512 image pixels): a quarter of the picture's
# side within these bounds. Each tile carries a halo of 15 latent pixels a side, so with 512-px cores a 1024²
# picture's 2×2 tiles each covered 38 % of it (632² of 1024²); quarters keep a tile near a quarter of it.


def decode_core(height: int, width: int) -> int:
    """The tile core side for a latent of this size (see DECODE_CORE)."""
    low, high = DECODE_CORE
    return max(low, min(high, math.ceil(max(height, width) / 4)))
ENCODE_CORE = 512  # image pixels


def decoder_halo(dec: nn.Module) -> int:
    """Latent pixels a tile needs around its core: the reach of the upsampling path's 3×3 convolutions
    (each reaches one pixel at its own resolution), plus a margin: 15 for the SD / SDXL decoder."""
    reach, scale = 0.0, 1
    for block in dec.up_blocks:
        reach += 2 * len(block.resnets) / scale
        if block.upsamplers:
            scale *= 2
            reach += len(block.upsamplers) / scale
    reach += 1 / scale  # conv_out
    return math.ceil(reach) + 2


def encoder_halo(enc: nn.Module) -> int:
    """Image pixels a tile needs around its core (a multiple of the downsampling factor): 88 for SD."""
    reach, scale = 1.0, 1  # conv_in
    for block in enc.down_blocks:
        reach += 2 * len(block.resnets) * scale
        if block.downsamplers:
            scale *= 2
            reach += len(block.downsamplers) * scale
    factor = 2 ** (len(enc.down_blocks) - 1)
    return (math.ceil(reach) + factor + factor - 1) // factor * factor


class _Tile:
    """One tile's place: where its core lies inside it (fractions, so they hold at every resolution),
    and where its state waits while the other tiles catch up (pinned CPU memory, when on a GPU)."""

    def __init__(self, core: tuple[float, float, float, float], device: torch.device):
        self.core = core
        self.device = device
        self.parks = device.type == "cuda"

    def partial(self, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean and variance per (image, group) over the core, and the core's element count. Computed
        in float32 a few groups at a time, so no full-size float32 copy of a half-precision tile is made."""
        n, c, h, w = x.shape
        y0, y1, x0, x1 = (round(self.core[0] * h), round(self.core[1] * h), round(self.core[2] * w),
                          round(self.core[3] * w))
        per_group = c // groups
        count = per_group * (y1 - y0) * (x1 - x0)
        means, variances = [], []
        for g in range(0, groups, 8):
            chunk = x[:, g * per_group:(g + 8) * per_group, y0:y1, x0:x1].float()
            var, mean = torch.var_mean(chunk.reshape(n, -1, count), dim=-1, unbiased=False)
            means.append(mean)
            variances.append(var)
        return torch.cat(means, 1).double().cpu(), torch.cat(variances, 1).double().cpu(), count

    def park(self, state: dict[str, torch.Tensor]) -> None:
        """Move the state's tensors off the GPU (in place: no reference to the GPU copies is left)."""
        if not self.parks:
            return
        moved: dict[int, torch.Tensor] = {}
        for key, t in state.items():
            if id(t) not in moved:
                moved[id(t)] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            state[key] = moved[id(t)]
        torch.cuda.current_stream(self.device).synchronize()

    def unpark(self, state: dict[str, torch.Tensor]) -> None:
        if not self.parks:
            return
        moved: dict[int, torch.Tensor] = {}
        for key, t in state.items():
            state[key] = moved.setdefault(id(t), t.to(self.device, non_blocking=True))


def _normalize(gn: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
               in_place: bool = False) -> torch.Tensor:
    """``gn(x)`` with given statistics: a per-channel scale and shift (worked out in float32) applied
    in ``x``'s dtype, into ``x`` itself when ``in_place``."""
    c = x.shape[1]
    per_group = c // gn.num_groups
    inv = torch.rsqrt(var + gn.eps).float().repeat_interleave(per_group, 1)  # (n, c)
    mu = mean.float().repeat_interleave(per_group, 1)
    weight = gn.weight.float().cpu() if gn.affine else torch.ones(c)
    bias = gn.bias.float().cpu() if gn.affine else torch.zeros(c)
    scale = inv * weight
    shift = (bias - mu * scale).to(x.device, x.dtype)[:, :, None, None]
    scale = scale.to(x.device, x.dtype)[:, :, None, None]
    return x.mul_(scale).add_(shift) if in_place else torch.addcmul(shift, x, scale)


def _sync(tile: _Tile, gn: nn.GroupNorm, state: dict[str, torch.Tensor], key: str):
    """Yield this tile's share of ``gn``'s statistics, wait (state parked) for the whole image's, then
    normalise ``state[key]`` with them (in place unless another key holds the same tensor). The tile's
    tensors live only in ``state``, so that parking really frees the GPU."""
    partial = tile.partial(state[key], gn.num_groups)
    tile.park(state)
    mean, var = yield partial
    tile.unpark(state)
    shared = any(t is state[key] for k, t in state.items() if k != key)
    state[key] = _normalize(gn, state[key], mean, var, in_place=not shared)


def _act(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The activation, in place when it is SiLU (every SD VAE's): one tile-sized tensor less at a time."""
    return F.silu(x, inplace=True) if isinstance(module, nn.SiLU) else module(x)


def _resnet(tile: _Tile, r: nn.Module, state: dict[str, torch.Tensor]):
    """diffusers' ResnetBlock2D as the VAE uses it (no time embedding, no resampling inside), from
    ``state["x"]`` to ``state["x"]``."""
    state["h"] = state["x"]
    yield from _sync(tile, r.norm1, state, "h")  # a new tensor: x is still needed
    state["h"] = r.conv1(_act(r.nonlinearity, state["h"]))
    yield from _sync(tile, r.norm2, state, "h")
    h = r.conv2(r.dropout(_act(r.nonlinearity, state.pop("h"))))
    x = state.pop("x")
    h += r.conv_shortcut(x) if r.conv_shortcut is not None else x
    del x
    if r.output_scale_factor != 1:
        h /= r.output_scale_factor
    state["x"] = h


def _supported(blocks) -> bool:
    return all(r.upsample is None and r.downsample is None and r.time_emb_proj is None
               and r.time_embedding_norm in ("default", "group") for b in blocks for r in b.resnets) and \
        not any(getattr(b, "attentions", None) for b in blocks)


def _combine(partials: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-image mean and variance from the tiles' (Chan's parallel formula, in float64)."""
    total = sum(p[2] for p in partials)
    mean = sum(p[0] * p[2] for p in partials) / total
    m2 = sum((p[1] + (p[0] - mean) ** 2) * p[2] for p in partials)
    return mean, m2 / total


def _boxes(size: int, core: int) -> list[tuple[int, int]]:
    return [(start, min(start + core, size)) for start in range(0, size, core)]


def _run_tiles(program, x: torch.Tensor, core: int, halo: int, scale: float, out_channels: int) -> torch.Tensor:
    """``program(tile, {"x": tile_input})`` (a generator that yields at every GroupNorm) over ``x`` in tiles of
    ``core`` input pixels plus ``halo``, all tiles advancing together from one norm to the next. The
    result (``scale`` times the input's size, float32, CPU) is assembled from the tiles' cores."""
    n, _, height, width = x.shape
    jobs = []
    for y0, y1 in _boxes(height, core):
        for x0, x1 in _boxes(width, core):
            ty0, ty1, tx0, tx1 = max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)
            th, tw = ty1 - ty0, tx1 - tx0
            tile = _Tile(((y0 - ty0) / th, (y1 - ty0) / th, (x0 - tx0) / tw, (x1 - tx0) / tw), x.device)
            jobs.append(((y0, y1, x0, x1), (ty0, tx0), program(tile, {"x": x[:, :, ty0:ty1, tx0:tx1]})))
    out = torch.empty(n, out_channels, int(height * scale), int(width * scale), dtype=torch.float32)

    def finish(box, origin, result):
        y0, y1, x0, x1 = box
        oy, ox = int((y0 - origin[0]) * scale), int((x0 - origin[1]) * scale)
        oh, ow = int((y1 - y0) * scale), int((x1 - x0) * scale)
        out[:, :, int(y0 * scale):int(y0 * scale) + oh, int(x0 * scale):int(x0 * scale) + ow] = \
            result[:, :, oy:oy + oh, ox:ox + ow].float().cpu()

    waiting = []
    for box, origin, gen in jobs:
        try:
            waiting.append((box, origin, gen, next(gen)))
        except StopIteration as done:
            finish(box, origin, done.value)
    while waiting:
        stats = _combine([w[3] for w in waiting])
        still = []
        for box, origin, gen, _ in waiting:
            try:
                still.append((box, origin, gen, gen.send(stats)))
            except StopIteration as done:
                finish(box, origin, done.value)
        waiting = still
    return out


@torch.no_grad()
def decode(vae, z: torch.Tensor, core: int | None = None, halo: int | None = None) -> torch.Tensor | None:
    """``vae.decode(z).sample`` (z already divided by the scaling factor, on the VAE's device and dtype)
    tile by tile; float32 on the CPU. None when the decoder has a layout this does not know."""
    dec = vae.decoder
    if not _supported(dec.up_blocks) or not isinstance(dec.conv_norm_out, nn.GroupNorm):
        return None
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    h = dec.mid_block(dec.conv_in(z), None)  # attention: whole image, at latent resolution

    def up_path(tile: _Tile, state: dict[str, torch.Tensor]):
        for block in dec.up_blocks:
            for r in block.resnets:
                yield from _resnet(tile, r, state)
            for up in block.upsamplers or []:
                state["x"] = up(state["x"])
        yield from _sync(tile, dec.conv_norm_out, state, "x")
        return dec.conv_out(_act(dec.conv_act, state.pop("x")))

    halo = decoder_halo(dec) if halo is None else halo
    core = decode_core(*z.shape[2:]) if core is None else core
    return _run_tiles(up_path, h, core, halo, 2 ** (len(dec.up_blocks) - 1), dec.conv_out.out_channels)


@torch.no_grad()
def encode_moments(vae, x: torch.Tensor, core: int = ENCODE_CORE, halo: int | None = None) -> torch.Tensor | None:
    """The encoder's moments (after ``quant_conv``) for images ``x`` (on the VAE's device and dtype; sides
    a multiple of 8), tiling the downsampling path; float32 on the CPU. None for unknown layouts."""
    enc = vae.encoder
    if not _supported(enc.down_blocks):
        return None
    factor = 2 ** (len(enc.down_blocks) - 1)

    def down_path(tile: _Tile, state: dict[str, torch.Tensor]):
        state["x"] = enc.conv_in(state["x"])
        for block in enc.down_blocks:
            for r in block.resnets:
                yield from _resnet(tile, r, state)
            for down in block.downsamplers or []:
                state["x"] = down(state["x"])
        return state.pop("x")

    channels = enc.down_blocks[-1].resnets[-1].conv2.out_channels
    halo = encoder_halo(enc) if halo is None else halo
    h = _run_tiles(down_path, x, core, halo, 1 / factor, channels).to(x.device, x.dtype)
    moments = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
    moments = vae.quant_conv(moments) if vae.quant_conv is not None else moments
    return moments.float().cpu()
