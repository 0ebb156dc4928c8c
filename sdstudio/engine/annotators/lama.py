"""LaMa (Suvorov et al., "Resolution-robust Large Mask Inpainting with Fourier Convolutions", 2021), the
"big-lama" generator behind the extension's ``inpaint_only+lama``, from lllyasviel's ``ControlNetLama.pth``.

The generator (LaMa's ``FFCResNetGenerator`` as big-lama's config sets it): RGB with the masked pixels
zeroed and the mask as a fourth channel, a 7×7 convolution to 64 channels, three stride-2 convolutions to
512, then residual blocks of fast Fourier convolutions (18 in big-lama; counted from the file), three
transposed convolutions back up and a 7×7 convolution to RGB through a sigmoid. Every convolution pads by
reflection; each is followed by batch norm and ReLU.

A fast Fourier convolution splits its channels into a local part (a quarter) and a global part (three
quarters): local→local, local→global and global→local are 3×3 convolutions, global→global is the spectral
transform (1×1 convolution to half the channels, then the Fourier unit: the real FFT of the picture, its
real and imaginary parts as channels through a 1×1 convolution, batch norm and ReLU, and the inverse FFT;
added to its input and brought back by a 1×1 convolution). The last down-sampling convolution makes the
global part; the up-sampling starts from both parts side by side.

State-dict names are the training module's (``generator.model.<i>.…``, wrapped in ``state_dict``); the
discriminator's and the losses' tensors in a full checkpoint are ignored.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import AnnotatorFile, cached_network

FILE = AnnotatorFile("ControlNetLama.pth", "lama")
RESOLUTION = 256  # the extension always runs LaMa at 256 (what it was trained at)
GLOBAL_SHARE = 0.75  # big-lama's ratio_gin / ratio_gout in the residual blocks
_DOWN = 3  # big-lama's n_downsampling


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv2d | None:
    if not cin or not cout:
        return None
    return nn.Conv2d(cin, cout, kernel, stride, padding, bias=False, padding_mode="reflect")


class _FourierUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_layer = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        spectrum = torch.fft.rfftn(x.float(), dim=(-2, -1), norm="ortho")
        parts = torch.stack((spectrum.real, spectrum.imag), dim=2).reshape(b, 2 * c, h, w // 2 + 1).to(x.dtype)
        parts = F.relu(self.bn(self.conv_layer(parts))).view(b, c, 2, h, w // 2 + 1).float()
        out = torch.fft.irfftn(torch.complex(parts[:, :, 0], parts[:, :, 1]), s=(h, w), dim=(-2, -1), norm="ortho")
        return out.to(x.dtype)


class _SpectralTransform(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Sequential(nn.Conv2d(channels, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.fu = _FourierUnit(half)
        self.conv2 = nn.Conv2d(half, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(x + self.fu(x))


class _FFC(nn.Module):
    """The four paths between the local and global parts (those with no channels at either end absent)."""

    def __init__(self, cin: int, cout: int, kernel: int, share_in: float, share_out: float, stride: int = 1,
                 padding: int = 0):
        super().__init__()
        gin, gout = int(cin * share_in), int(cout * share_out)
        lin, lout = cin - gin, cout - gout
        self.convl2l = _conv(lin, lout, kernel, stride, padding)
        self.convl2g = _conv(lin, gout, kernel, stride, padding)
        self.convg2l = _conv(gin, lout, kernel, stride, padding)
        self.convg2g = _SpectralTransform(gin) if gin and gout else None
        self.local_out, self.global_out = lout > 0, gout > 0

    def forward(self, x_l: torch.Tensor, x_g: torch.Tensor | None):
        def total(*terms):
            present = [t for t in terms if t is not None]
            return sum(present[1:], present[0]) if present else None

        def apply(conv, x):
            return conv(x) if conv is not None and x is not None else None

        out_l = total(apply(self.convl2l, x_l), apply(self.convg2l, x_g)) if self.local_out else None
        out_g = total(apply(self.convl2g, x_l), apply(self.convg2g, x_g)) if self.global_out else None
        return out_l, out_g


class _FFCBlock(nn.Module):
    """A fast Fourier convolution, batch norm and ReLU on each part (LaMa's ``FFC_BN_ACT``)."""

    def __init__(self, cin: int, cout: int, kernel: int, share_in: float, share_out: float, stride: int = 1,
                 padding: int = 0):
        super().__init__()
        self.ffc = _FFC(cin, cout, kernel, share_in, share_out, stride, padding)
        gout = int(cout * share_out)
        self.bn_l = nn.BatchNorm2d(cout - gout) if cout - gout else None
        self.bn_g = nn.BatchNorm2d(gout) if gout else None

    def forward(self, x_l: torch.Tensor, x_g: torch.Tensor | None):
        out_l, out_g = self.ffc(x_l, x_g)
        return (F.relu(self.bn_l(out_l)) if out_l is not None else None,
                F.relu(self.bn_g(out_g)) if out_g is not None else None)


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _FFCBlock(channels, channels, 3, GLOBAL_SHARE, GLOBAL_SHARE, padding=1)
        self.conv2 = _FFCBlock(channels, channels, 3, GLOBAL_SHARE, GLOBAL_SHARE, padding=1)

    def forward(self, x_l: torch.Tensor, x_g: torch.Tensor):
        a_l, a_g = self.conv2(*self.conv1(x_l, x_g))
        return x_l + a_l, x_g + a_g


class LaMa(nn.Module):
    """big-lama's generator with ``blocks`` residual blocks; module ``model.<i>`` at LaMa's indices (the
    parameterless layers keep their places)."""

    def __init__(self, blocks: int = 18, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), _FFCBlock(4, width, 7, 0, 0)]
        for i in range(_DOWN):
            share_out = GLOBAL_SHARE if i == _DOWN - 1 else 0
            layers.append(_FFCBlock(width * 2 ** i, width * 2 ** (i + 1), 3, 0, share_out, stride=2, padding=1))
        layers += [_ResBlock(width * 2 ** _DOWN) for _ in range(blocks)]
        layers.append(nn.Identity())  # the parts side by side
        for i in range(_DOWN):
            c = width * 2 ** (_DOWN - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(c // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, 3, 7), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in 0..1 with the masked pixels 0, and the 0/1 mask: (B, 4, H, W), sides multiples of 8."""
        m = self.model
        x_l, x_g = m[1](m[0](x), None)
        for i in range(2, 2 + _DOWN + self.blocks):
            x_l, x_g = m[i](x_l, x_g)
        x = torch.cat([x_l, x_g], dim=1)
        for i in range(3 + _DOWN + self.blocks, len(m)):
            x = m[i](x)
        return x


def _blocks(weights: dict[str, torch.Tensor]) -> int:
    found = {int(m.group(1)) for k in weights if (m := re.match(r"model\.(\d+)\.conv1\.ffc\.", k))}
    return len(found)


def _generator(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generator's tensors, without the ``generator.`` prefix (a flat file may already lack it)."""
    if any(k.startswith("generator.") for k in weights):
        return {k[len("generator."):]: v for k, v in weights.items() if k.startswith("generator.")}
    return {k: v for k, v in weights.items() if k.startswith("model.")}


def load(path) -> LaMa:
    return cached_network(path, "lama", lambda weights: LaMa(_blocks(_generator(weights))), convert=_generator)


@torch.no_grad()
def inpaint(net: LaMa, rgba: np.ndarray) -> np.ndarray:
    """H×W×3 uint8: the picture of an H×W×4 uint8 (RGB and mask, 255 = masked; sides multiples of 8) with
    the masked part (mask > 127) filled by the network, the rest as it is."""
    param = next(net.parameters())
    x = torch.from_numpy(np.ascontiguousarray(rgba)).to(param.device).float().div(255.0).permute(2, 0, 1)[None]
    color, mask = x[:, :3], (x[:, 3:4] > 0.5).float()
    color = color * (1 - mask)
    out = net(torch.cat([color, mask], dim=1).to(param.device, param.dtype)).float()
    out = out * mask + color * (1 - mask)
    return (out[0].permute(1, 2, 0) * 255.0).clamp(0, 255).byte().cpu().numpy()
