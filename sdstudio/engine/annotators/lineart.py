"""Line art: the "informative drawings" generator (``sk_model.pth`` for ``lineart_realistic``,
``sk_model2.pth`` for ``lineart_coarse``) and the anime line U-Net (``netG.pth``, ``lineart_anime``).

Both networks use instance norm without learnt parameters, so the files hold only convolutions. The
realistic/coarse generator reads RGB in [0, 1] and gives white-on-black-inverted strokes in [0, 1]; the anime
U-Net reads [-1, 1] at sizes that are multiples of 256 (the picture is resized there and back, bicubic). The
preprocessors invert both, giving white lines on black as the ControlNet lineart models expect.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from .common import AnnotatorFile, cached_network, image_tensor, to_uint8

REALISTIC = AnnotatorFile("sk_model.pth", "lineart")
COARSE = AnnotatorFile("sk_model2.pth", "lineart")
ANIME = AnnotatorFile("netG.pth", "lineart_anime")


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm2d(c)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(c), nn.ReLU(),
                                        nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineGenerator(nn.Module):
    """7×7 stem, two stride-2 downsamplings (64→256 channels), ``blocks`` residual blocks, two transposed
    upsamplings, 7×7 to one sigmoid channel. Module names as in ``sk_model.pth`` (``model0.1``…``model4.1``)."""

    def __init__(self, blocks: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), _norm(64), nn.ReLU())
        self.model1 = nn.Sequential(nn.Conv2d(64, 128, 3, 2, 1), _norm(128), nn.ReLU(),
                                    nn.Conv2d(128, 256, 3, 2, 1), _norm(256), nn.ReLU())
        self.model2 = nn.Sequential(*[_Residual(256) for _ in range(blocks)])
        self.model3 = nn.Sequential(nn.ConvTranspose2d(256, 128, 3, 2, 1, output_padding=1), _norm(128), nn.ReLU(),
                                    nn.ConvTranspose2d(128, 64, 3, 2, 1, output_padding=1), _norm(64), nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class _UnetLevel(nn.Module):
    """One level of the pix2pix U-Net: 4×4 stride-2 down, the inner levels, 4×4 stride-2 transposed up, and (but
    at the outermost level) the input concatenated to the result. ``model`` holds the layers under the
    indices the file uses."""

    def __init__(self, outer: int, inner: int, cin: int | None = None, sub: nn.Module | None = None,
                 outermost: bool = False):
        super().__init__()
        self.outermost = outermost
        cin = outer if cin is None else cin
        down = nn.Conv2d(cin, inner, 4, 2, 1)
        if outermost:
            layers = [down, sub, nn.ReLU(), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
        elif sub is None:  # innermost
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(inner, outer, 4, 2, 1), _norm(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, _norm(inner), sub, nn.ReLU(),
                      nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), _norm(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], 1)


class AnimeUnet(nn.Module):
    """The 8-level U-Net (64 filters) of ``netG.pth``."""

    def __init__(self, levels: int = 8, ngf: int = 64):
        super().__init__()
        level = _UnetLevel(ngf * 8, ngf * 8)
        for _ in range(levels - 5):
            level = _UnetLevel(ngf * 8, ngf * 8, sub=level)
        for mult in (4, 2, 1):
            level = _UnetLevel(ngf * mult, ngf * mult * 2, sub=level)
        self.model = _UnetLevel(1, ngf, cin=3, sub=level, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def load_generator(path) -> LineGenerator:
    return cached_network(path, "lineart", lambda weights: LineGenerator())


def load_anime(path) -> AnimeUnet:
    return cached_network(path, "lineart_anime", lambda weights: AnimeUnet())


@torch.no_grad()
def lines(net: LineGenerator, image: np.ndarray) -> np.ndarray:
    """H×W uint8: the generator's output (dark lines on white) for an RGB uint8 picture."""
    param = next(net.parameters())
    out = net(image_tensor(image).to(param.device, param.dtype) / 255.0)
    return to_uint8(out[0, 0].float().cpu().numpy())


@torch.no_grad()
def anime_lines(net: AnimeUnet, image: np.ndarray) -> np.ndarray:
    """H×W uint8: the anime U-Net's output (dark lines on white), run at the next multiples of 256."""
    h, w = image.shape[:2]
    hn, wn = 256 * int(np.ceil(h / 256.0)), 256 * int(np.ceil(w / 256.0))
    big = cv2.resize(image, (wn, hn), interpolation=cv2.INTER_CUBIC)
    param = next(net.parameters())
    out = net(image_tensor(big).to(param.device, param.dtype) / 127.5 - 1.0)
    line = (out[0, 0] * 127.5 + 127.5).float().cpu().numpy()
    return cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
