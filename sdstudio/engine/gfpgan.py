"""GFPGAN's "clean" network (the v1.2, v1.3 and v1.4 files A1111 users have), built without basicsr.

A U-Net encoder reads a 512² aligned face; its bottleneck gives one style vector per StyleGAN2 layer and
its decoder side gives, per resolution, a scale and a shift (spatial feature transform) applied to half of
the channels of a StyleGAN2 generator's layers. The module names are those of the published files, so
their ``params_ema`` load strictly; every width is read from the file, not assumed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _ModulatedConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, style: int, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.cout, self.k, self.demodulate, self.upsample = cout, k, demodulate, upsample
        self.modulation = nn.Linear(style, cin)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k) / math.sqrt(cin * k * k))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        w = self.weight * self.modulation(style).view(b, 1, c, 1, 1)
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.cout, 1, 1, 1)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h, wd = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * c, h, wd), w.reshape(b * self.cout, c, self.k, self.k), padding=self.k // 2,
                       groups=b)
        return out.view(b, self.cout, h, wd)


class _StyleConv(nn.Module):
    def __init__(self, cin: int, cout: int, style: int, upsample: bool = False):
        super().__init__()
        self.modulated_conv = _ModulatedConv(cin, cout, 3, style, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # the strength of the injected noise
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x, style, generator: torch.Generator | None = None):
        out = self.modulated_conv(x, style) * 2 ** 0.5
        b, _, h, w = out.shape
        noise = torch.randn((b, 1, h, w), generator=generator, device=out.device, dtype=out.dtype)
        return F.leaky_relu(out + self.weight * noise + self.bias, 0.2)


class _ToRGB(nn.Module):
    def __init__(self, cin: int, style: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = _ModulatedConv(cin, 3, 1, style, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            out = out + (F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
                         if self.upsample else skip)
        return out


class _NormStyle(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


class _Decoder(nn.Module):
    """StyleGAN2's generator whose layers take SFT conditions (scale, shift) on half their channels."""

    def __init__(self, channels: dict[int, int], style: int, mlp: int):
        super().__init__()
        layers: list[nn.Module] = [_NormStyle()]
        for _ in range(mlp):
            layers += [nn.Linear(style, style), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*layers)
        self.constant_input = nn.Module()
        self.constant_input.weight = nn.Parameter(torch.randn(1, channels[4], 4, 4))
        self.style_conv1 = _StyleConv(channels[4], channels[4], style)
        self.to_rgb1 = _ToRGB(channels[4], style, upsample=False)
        sizes = sorted(channels)[1:]
        self.style_convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        cin = channels[4]
        for size in sizes:
            self.style_convs.append(_StyleConv(cin, channels[size], style, upsample=True))
            self.style_convs.append(_StyleConv(channels[size], channels[size], style))
            self.to_rgbs.append(_ToRGB(channels[size], style))
            cin = channels[size]
        self.noises = nn.Module()  # the files carry fixed noise; inference draws fresh noise as GFPGAN does
        for i in range(2 * len(sizes) + 1):
            side = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.zeros(1, 1, side, side))

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor], sft_half: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
        out = self.constant_input.weight.repeat(latent.shape[0], 1, 1, 1)
        out = self.style_conv1(out, latent[:, 0], generator)
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, to_rgb in zip(self.style_convs[::2], self.style_convs[1::2], self.to_rgbs):
            out = conv1(out, latent[:, i], generator)
            if i < len(conditions):
                scale, shift = conditions[i - 1], conditions[i]
                if sft_half:
                    same, sft = out.split(out.shape[1] // 2, dim=1)
                    out = torch.cat([same, sft * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = conv2(out, latent[:, i + 1], generator)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, factor: float):
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        def resize(t):
            return F.interpolate(t, scale_factor=self.factor, mode="bilinear", align_corners=False)

        out = F.leaky_relu(self.conv2(resize(F.leaky_relu(self.conv1(x), 0.2))), 0.2)
        return out + self.skip(resize(x))


def _sft(c: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, cout, 3, 1, 1))


class GFPGAN(nn.Module):
    """``unet``: channels of the encoder/decoder per resolution (4 … out size); ``decoder``: StyleGAN2's."""

    def __init__(self, unet: dict[int, int], decoder: dict[int, int], style: int = 512, mlp: int = 8,
                 different_w: bool = True, sft_half: bool = True):
        super().__init__()
        self.size = max(unet)
        self.style, self.different_w, self.sft_half = style, different_w, sft_half
        levels = int(math.log2(self.size))
        self.conv_body_first = nn.Conv2d(3, unet[self.size], 1)
        self.conv_body_down = nn.ModuleList(_ResBlock(unet[2 ** i], unet[2 ** (i - 1)], 0.5)
                                            for i in range(levels, 2, -1))
        self.final_conv = nn.Conv2d(unet[8], unet[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList(_ResBlock(unet[2 ** (i - 1)], unet[2 ** i], 2) for i in range(3, levels + 1))
        self.toRGB = nn.ModuleList(nn.Conv2d(unet[2 ** i], 3, 1) for i in range(3, levels + 1))  # training only
        self.final_linear = nn.Linear(unet[4] * 16, (levels * 2 - 2) * style if different_w else style)
        self.stylegan_decoder = _Decoder(decoder, style, mlp)
        self.condition_scale = nn.ModuleList(_sft(unet[2 ** i], unet[2 ** i] * (1 if sft_half else 2))
                                             for i in range(3, levels + 1))
        self.condition_shift = nn.ModuleList(_sft(unet[2 ** i], unet[2 ** i] * (1 if sft_half else 2))
                                             for i in range(3, levels + 1))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Faces in [-1, 1] (N×3×size×size, RGB) to restored faces (not clamped)."""
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)
        latent = self.final_linear(feat.flatten(1))
        latent = latent.view(latent.shape[0], -1, self.style) if self.different_w else \
            latent[:, None].repeat(1, 2 * len(self.conv_body_up) + 2, 1)
        conditions = []
        for skip, up, scale, shift in zip(skips, self.conv_body_up, self.condition_scale, self.condition_shift):
            feat = up(feat + skip)
            conditions += [scale(feat), shift(feat)]
        return self.stylegan_decoder(latent, conditions, self.sft_half, generator)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> GFPGAN:
        if "conv_body_first.weight" not in sd or "stylegan_decoder.to_rgb1.bias" not in sd:
            raise KeyError("not a GFPGAN v1.2–v1.4 ('clean') network")
        ups = len({k.split(".")[1] for k in sd if k.startswith("conv_body_up.")})
        unet = {4: sd["final_conv.weight"].shape[0]}
        decoder = {4: sd["stylegan_decoder.constant_input.weight"].shape[1]}
        for i in range(ups):
            unet[2 ** (i + 3)] = sd[f"conv_body_up.{i}.conv2.weight"].shape[0]
            decoder[2 ** (i + 3)] = sd[f"stylegan_decoder.style_convs.{2 * i}.modulated_conv.weight"].shape[1]
        style = sd["stylegan_decoder.style_conv1.modulated_conv.modulation.weight"].shape[1]
        mlp = sum(1 for k in sd if k.startswith("stylegan_decoder.style_mlp.") and k.endswith(".weight"))
        model = cls(unet, decoder, style, mlp, different_w=sd["final_linear.weight"].shape[0] != style,
                    sft_half=sd["condition_scale.0.2.weight"].shape[0] == unet[8])
        model.load_state_dict(sd, strict=True)
        return model.eval()


def channels(size: int = 512, multiplier: int = 2, narrow: float = 1.0) -> tuple[dict[int, int], dict[int, int]]:
    """The published networks' widths (U-Net, decoder) per resolution: 512 wide at 4–32 px, then
    256·m at 64 px, halving per doubling; the U-Net half as wide. Small ``narrow`` for tests."""
    decoder = {s: int((512 if s <= 32 else 512 * 32 // s * multiplier) * narrow)
               for s in (2 ** i for i in range(2, int(math.log2(size)) + 1))}
    return {s: int(c * 0.5) or 1 for s, c in decoder.items()}, decoder
