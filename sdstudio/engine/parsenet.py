"""facexlib's ParseNet (``parsing_parsenet.pth``, from PSFRGAN): the face parser A1111's face restoration pastes
restored faces through. Our own network under the file's names, built from its shapes.

The network is an encoder of residual blocks going down (stride-2 convolutions) to 32², a body of residual
blocks at that size added to its input, a decoder going back up (nearest 2× upsampling), and two 3×3 heads:
19 parsing classes and a picture (unused here, kept so that the file loads strictly). Every convolution is
3×3 after a one-pixel reflection pad; inside the residual blocks each is followed by batch norm, the first
also by a leaky ReLU (slope 0.2); a block that changes size or width has a plain convolution as its shortcut.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 19
LEAKY_SLOPE = 0.2


class ConvLayer(nn.Module):
    """(nearest 2× up), reflection pad 1, 3×3 convolution (stride 2 for ``down``), (batch norm, leaky ReLU);
    the batch norm under ``norm.norm`` as facexlib names it."""

    def __init__(self, cin: int, cout: int, scale: str = "none", norm: bool = False, act: bool = False):
        super().__init__()
        self.scale, self.act = scale, act
        self.conv2d = nn.Conv2d(cin, cout, 3, 2 if scale == "down" else 1, bias=not norm)
        self.norm = nn.ModuleDict({"norm": nn.BatchNorm2d(cout)}) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        if self.norm is not None:
            x = self.norm["norm"](x)
        return F.leaky_relu(x, LEAKY_SLOPE) if self.act else x


class ResidualBlock(nn.Module):
    """Two normed convolutions (the first with the activation; the size changes in the second going down,
    in the first going up) plus the input, through a plain convolution when the size or width changes."""

    def __init__(self, cin: int, cout: int, scale: str = "none"):
        super().__init__()
        first, second = {"down": ("none", "down"), "up": ("up", "none")}.get(scale, ("none", "none"))
        self.shortcut_func = ConvLayer(cin, cout, scale) if scale != "none" or cin != cout else None
        self.conv1 = ConvLayer(cin, cout, first, norm=True, act=True)
        self.conv2 = ConvLayer(cout, cout, second, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut_func is None else self.shortcut_func(x)
        return identity + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    def __init__(self, base: int, encoder: list[tuple[int, int]], body: list[int], decoder: list[tuple[int, int]],
                 classes: int = CLASSES):
        """``encoder``/``decoder``: (in, out) widths of their blocks; ``body``: its blocks' widths."""
        super().__init__()
        self.encoder = nn.Sequential(ConvLayer(3, base), *(ResidualBlock(i, o, "down") for i, o in encoder))
        self.body = nn.Sequential(*(ResidualBlock(c, c) for c in body))
        self.decoder = nn.Sequential(*(ResidualBlock(i, o, "up") for i, o in decoder))
        last = decoder[-1][1] if decoder else (body[-1] if body else encoder[-1][1] if encoder else base)
        self.out_img_conv = ConvLayer(last, 3)
        self.out_mask_conv = ConvLayer(last, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The parsing logits (N×classes×H×W) of pictures in -1..1, H and W multiples of 2**(encoder depth)."""
        feat = self.encoder(x)
        return self.out_mask_conv(self.decoder(feat + self.body(feat)))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ParseNet:
        """The network of a ``parsing_parsenet.pth`` state dict, loaded strictly; KeyError when it is not one."""
        for wrapper in ("params_ema", "params", "state_dict"):
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        if "encoder.0.conv2d.weight" not in sd or "out_mask_conv.conv2d.weight" not in sd:
            raise KeyError("not a ParseNet face parser (no encoder.0.conv2d or out_mask_conv)")

        def blocks(part: str) -> list[tuple[int, int]]:
            found = sorted({int(m.group(1)) for k in sd if (m := re.match(rf"{part}\.(\d+)\.conv1\.", k))})
            return [tuple(sd[f"{part}.{i}.conv1.conv2d.weight"].shape[1::-1]) for i in found]

        body = [o for _, o in blocks("body")]
        model = cls(sd["encoder.0.conv2d.weight"].shape[0], blocks("encoder"), body, blocks("decoder"),
                    sd["out_mask_conv.conv2d.weight"].shape[0])
        model.load_state_dict(sd, strict=True)
        return model.eval()
