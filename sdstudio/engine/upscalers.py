"""Image upscalers by A1111 name: ``None``, ``Lanczos``, ``Nearest`` and model files (ESRGAN family).

Model files in ``models/ESRGAN``, ``models/RealESRGAN``, ``models/SwinIR`` and ``models/DAT`` are named by
their file stem, as in A1111's upscaler lists and the infotext's ``Hires upscaler``. They are read with the
safe loader (no pickled code runs) and built by spandrel when it can be imported (it needs torchvision);
otherwise the two architectures almost every SD user's files use are built here: ESRGAN's RRDBNet (old and
new key layouts, 1×/2×/4×/8×, Real-ESRGAN's pixel-unshuffle variants) and Real-ESRGAN's compact
SRVGGNet. Models run over overlapping tiles, so memory stays bounded whatever the image size.

An upscaler is asked for a target size; like A1111 it applies the model until the image is at least that
big (at most three passes), then resizes to the exact size with Lanczos.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..models.errors import ModelFileError, ModelNotFoundError
from ..models.files import NETWORK_SUFFIXES
from ..models.safe_load import open_state_dict

log = logging.getLogger(__name__)

BUILTIN = ("None", "Lanczos", "Nearest")
TILE, OVERLAP = 192, 8  # A1111's defaults for ESRGAN-family tiles (pixels of the input)


# ---- architectures ---------------------------------------------------------------------------------
class _RDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x):
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = _RDB(nf, gc), _RDB(nf, gc), _RDB(nf, gc)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator (the layout of BasicSR / Real-ESRGAN; old ESRGAN files are renamed into it)."""

    def __init__(self, in_nc: int, out_nc: int, nf: int, nb: int, gc: int, n_up: int, unshuffle: int):
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = 2 ** n_up // unshuffle
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.body = nn.Sequential(*[_RRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.ups = nn.ModuleList([nn.Conv2d(nf, nf, 3, 1, 1) for _ in range(n_up)])
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

    def forward(self, x):
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for up in self.ups:
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact model (realesr-general-x4v3, the anime-video models)."""

    def __init__(self, in_nc: int, out_nc: int, nf: int, n_conv: int, scale: int, prelu: bool):
        super().__init__()
        self.scale = scale
        act = (lambda: nn.PReLU(nf)) if prelu else (lambda: nn.LeakyReLU(0.1))
        layers = [nn.Conv2d(in_nc, nf, 3, 1, 1), act()]
        for _ in range(n_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), act()]
        layers.append(nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")


def _renamed_old_esrgan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ESRGAN keys (``model.0``, ``model.1.sub.N.RDBk.convj.0``, ``model.3``...) -> RRDBNet's."""
    out: dict[str, torch.Tensor] = {}
    top = sorted({int(k.split(".")[1]) for k in sd if re.fullmatch(r"model\.\d+\.(weight|bias)", k)})
    hr, last = top[-2], top[-1]
    ups = [i for i in top if 0 < i < hr]
    nb = max(int(m.group(1)) for k in sd if (m := _OLD_RDB.fullmatch(k)))
    for k, v in sd.items():
        if m := _OLD_RDB.fullmatch(k):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = v
        elif k.startswith(f"model.1.sub.{nb + 1}."):
            out["conv_body." + k.rsplit(".", 1)[1]] = v
        elif m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k):
            i = int(m.group(1))
            name = ("conv_first" if i == 0 else "conv_hr" if i == hr else "conv_last" if i == last
                    else f"ups.{ups.index(i)}")
            out[f"{name}.{m.group(2)}"] = v
    return out


def _builtin_model(sd: dict[str, torch.Tensor]) -> nn.Module | None:
    """RRDBNet or SRVGGNetCompact from a state dict, or None when it is neither."""
    if "model.0.weight" in sd and any(_OLD_RDB.fullmatch(k) for k in sd):
        sd = _renamed_old_esrgan(sd)
    sd = {re.sub(r"^conv_up(\d)\.", lambda m: f"ups.{int(m.group(1)) - 1}.", k): v for k, v in sd.items()}
    if "conv_first.weight" in sd and "body.0.rdb1.conv1.weight" in sd:
        in_nc, nf = sd["conv_first.weight"].shape[1], sd["conv_first.weight"].shape[0]
        gc = sd["body.0.rdb1.conv1.weight"].shape[0]
        nb = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
        n_up = len([k for k in sd if re.fullmatch(r"ups\.\d+\.weight", k)])
        out_nc = sd["conv_last.weight"].shape[0]
        unshuffle = math.isqrt(in_nc // out_nc) if in_nc > out_nc else 1
        model: nn.Module = RRDBNet(in_nc, out_nc, nf, nb, gc, n_up, unshuffle)
    elif "body.0.weight" in sd and sd["body.0.weight"].ndim == 4 and "conv_first.weight" not in sd:
        convs = sorted(int(k.split(".")[1]) for k, v in sd.items() if k.startswith("body.") and v.ndim == 4
                       and k.endswith(".weight"))
        first, last = sd["body.0.weight"], sd[f"body.{convs[-1]}.weight"]
        in_nc, nf = first.shape[1], first.shape[0]
        out_nc = in_nc
        scale = math.isqrt(last.shape[0] // out_nc)
        prelu = "body.1.weight" in sd
        model = SRVGGNetCompact(in_nc, out_nc, nf, len(convs) - 2, scale, prelu)
    else:
        return None
    model.load_state_dict(sd, strict=True)
    return model


# ---- loading ---------------------------------------------------------------------------------------
def _spandrel_model(sd: dict[str, torch.Tensor]):
    try:
        import spandrel
    except (ImportError, RuntimeError):  # not installed, or a torchvision built for another torch
        return None
    try:
        return spandrel.ModelLoader().load_from_state_dict(sd)
    except spandrel.UnsupportedModelError:
        return None
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise ModelFileError(f"spandrel could not build this model: {exc}") from None


def load_model(path: Path) -> tuple[nn.Module, int]:
    """A model file -> (module in eval mode taking 0..1 RGB, its scale)."""
    state = open_state_dict(path)
    sd = {k.removeprefix("module."): state[k] for k in state}
    spandrel_error = None
    try:
        described = _spandrel_model(sd)
        if described is not None:
            return described.model.eval(), int(described.scale)
    except ModelFileError as exc:  # e.g. an ESRGAN with unusual growth channels: ours may still fit
        spandrel_error = exc
    try:
        model = _builtin_model(sd)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise ModelFileError(f"{path.name}: the weights do not fit an ESRGAN-family network ({exc})") from None
    if model is None and spandrel_error is not None:
        raise ModelFileError(f"{path.name}: {spandrel_error}") from None
    if model is None:
        raise ModelFileError(f"{path.name}: not an ESRGAN / Real-ESRGAN model; other architectures (SwinIR, DAT, "
                             "HAT...) need the spandrel package, which needs torchvision")
    return model.eval(), model.scale


# ---- running ---------------------------------------------------------------------------------------
def _ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    w = torch.ones(n)
    ramp = torch.linspace(0, 1, overlap + 2)[1:-1] if overlap > 0 else torch.ones(0)
    if not at_start and overlap:
        w[:overlap] = ramp
    if not at_end and overlap:
        w[-overlap:] = ramp.flip(0)
    return w


@torch.no_grad()
def run_tiled(model: nn.Module, scale: int, image: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP,
              device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``model`` over ``image`` (1×C×H×W, 0..1, CPU) in overlapping tiles; the output (1×C×sH×sW) is
    assembled on the CPU with linear blending across the overlaps, so only one tile is on the device."""
    device = device or torch.device("cpu")
    _, c, h, w = image.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return model(image.to(device, dtype)).float().cpu().clamp(0, 1)
    step = tile - overlap
    out = torch.zeros(1, c, h * scale, w * scale)
    weight = torch.zeros(1, 1, h * scale, w * scale)
    ys = list(range(0, max(h - tile, 0) + 1, step))
    xs = list(range(0, max(w - tile, 0) + 1, step))
    if ys[-1] + tile < h:
        ys.append(h - tile)
    if xs[-1] + tile < w:
        xs.append(w - tile)
    for y in ys:
        for x in xs:
            th, tw = min(tile, h - y), min(tile, w - x)
            piece = model(image[:, :, y:y + th, x:x + tw].to(device, dtype)).float().cpu()
            wy = _ramp(th * scale, overlap * scale, y == 0, y + th >= h)
            wx = _ramp(tw * scale, overlap * scale, x == 0, x + tw >= w)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * scale:(y + th) * scale, x * scale:(x + tw) * scale] += piece * mask
            weight[:, :, y * scale:(y + th) * scale, x * scale:(x + tw) * scale] += mask
    return (out / weight).clamp(0, 1)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def _to_image(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8))


@dataclass
class Upscaler:
    name: str
    path: Path | None = None  # None for the built-in resamplers
    function: Callable[[Image.Image, int, int], Image.Image] | None = None  # a plug-in's (image, width, height)


class Upscalers:
    """The upscalers a data dir offers, by name, with the last used model kept loaded."""

    def __init__(self, folders: list[Path], device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 tile: int = TILE, overlap: int = OVERLAP):
        self.folders = folders
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.tile, self.overlap = tile, overlap
        self._loaded: tuple[Path, float, nn.Module, int] | None = None
        self._lock = threading.Lock()  # the API's extras and the job worker may upscale at once
        # plug-ins' upscalers by name: function(image, width, height) -> image (sdstudio.plugins)
        self.extra: dict[str, Callable[[Image.Image, int, int], Image.Image]] = {}

    def available(self) -> list[Upscaler]:
        found = [Upscaler(name) for name in BUILTIN]
        found += [Upscaler(name, function=fn) for name, fn in self.extra.items() if name not in BUILTIN]
        seen = {u.name for u in found}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in NETWORK_SUFFIXES and path.stem not in seen:
                    seen.add(path.stem)
                    found.append(Upscaler(path.stem, path))
        return found

    def get(self, name: str) -> Upscaler:
        for up in self.available():
            if up.name == name:
                return up
        names = ", ".join(u.name for u in self.available())
        raise ModelNotFoundError(f"upscaler {name!r} not found; available: {names}")

    def _model(self, path: Path) -> tuple[nn.Module, int]:
        stamp = path.stat().st_mtime
        if self._loaded is None or self._loaded[:2] != (path, stamp):
            self._loaded = None  # free the old one first
            model, scale = load_model(path)
            self._loaded = (path, stamp, model.to(self.device, self.dtype), scale)
        return self._loaded[2], self._loaded[3]

    def upscale(self, image: Image.Image, width: int, height: int, name: str) -> Image.Image:
        """``image`` at ``width``×``height`` through the named upscaler (A1111's resize with upscaler)."""
        image = image.convert("RGB")
        up = self.get(name)
        if up.function is not None:
            image = up.function(image, width, height).convert("RGB")
        elif up.path is not None and (width > image.width or height > image.height):
            with self._lock:
                model, scale = self._model(up.path)
                for _ in range(3):  # A1111: the model at most three times, until the image is big enough
                    if image.width >= width and image.height >= height:
                        break
                    image = _to_image(run_tiled(model, scale, _to_tensor(image), self.tile, self.overlap,
                                                self.device, self.dtype))
        if image.size == (width, height):
            return image
        resample = Image.Resampling.NEAREST if name == "Nearest" else Image.Resampling.LANCZOS
        return image.resize((width, height), resample)
