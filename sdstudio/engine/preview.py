"""Live previews: a latent turned into a small RGB picture without running the full VAE.

A1111's "Live preview method" (setting ``show_progress_type``):

- "Approx cheap": a fixed linear map from the 4 latent channels to RGB (the published coefficients for SD
  1.x/2.x and SDXL latents), a few microseconds, at the latent's size.
- "TAESD": madebyollin's tiny decoder for that latent space (``models/VAE-approx/taesd_decoder.*``...;
  :mod:`sdstudio.models.taesd`), a full-size picture close to the VAE's at a fraction of its cost.
- "Approx NN": A1111's small network (``models/VAE-approx/model.pt``, ``vaeapprox-sdxl.pt``), at twice the
  latent's size (a quarter of the picture's).
- "Full": the model's own VAE (the engine passes it in :class:`~sdstudio.engine.generate.Progress`).

When the file a method needs is not there (or cannot be read), the preview is "Approx cheap" and the log says
why, once per latent space and method.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from ..models import taesd
from ..models.errors import ModelFileError

log = logging.getLogger(__name__)

METHODS = ("Full", "Approx NN", "Approx cheap", "TAESD")  # A1111's order

_SD1 = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_SDXL = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088))

# madebyollin's decoder names per latent space (taef1 was first published as taesdf1), and A1111's Approx NN ones
TAESD_NAMES = {"sd1": ("taesd_decoder",), "sdxl": ("taesdxl_decoder",), "sd3": ("taesd3_decoder",),
               "flux": ("taef1_decoder", "taesdf1_decoder")}
APPROX_NN_NAMES = {"sd1": ("model",), "sdxl": ("vaeapprox-sdxl",), "sd3": ("vaeapprox-sd3",)}
SPACE_TITLES = {"sd1": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD 3.x", "flux": "Flux.1"}
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")  # preference order for the same name


def cheap_preview(latent: torch.Tensor, sdxl: bool = False) -> Image.Image:
    """One latent (C×H×W, or the first of a batch) as an RGB image of the latent's size."""
    if latent.dim() == 4:
        latent = latent[0]
    coefs = torch.tensor(_SDXL if sdxl else _SD1, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latent.detach().float().cpu()[:4], coefs)
    return _to_image(rgb)


def _to_image(rgb: torch.Tensor) -> Image.Image:
    """3×H×W in about [-1, 1] -> a PIL picture."""
    rgb = ((rgb.float().cpu() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def latent_space(spec) -> str:
    """Which family's latents a model samples: "sd1" (also SD 2.x), "sdxl" (also its refiner), "sd3", "flux"."""
    if getattr(spec, "dit", None) is not None:
        return spec.dit.family
    return "sdxl" if spec.family.startswith("sdxl") else "sd1"


def live_preview(method: str, progress) -> Image.Image:
    """The live preview of a :class:`~sdstudio.engine.generate.Progress` by A1111's method name."""
    if method == "Full" and progress.decode is not None:
        return progress.decode(progress.latent)
    if method in ("TAESD", "Approx NN") and getattr(progress, "approx", None) is not None:
        image = progress.approx(method, progress.latent)
        if image is not None:
            return image
    return cheap_preview(progress.latent, progress.sdxl)


class PreviewDecoders:
    """The preview networks in one folder (``models/VAE-approx``), each loaded once and kept on ``device``.
    Files are looked for at each call, so one dropped in while the server runs is used from the next preview."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.folder = Path(folder)
        self.device, self.dtype = torch.device(device), dtype
        self._modules: dict[tuple, torch.nn.Module] = {}
        self._metadata: dict[tuple, dict[str, str]] = {}
        self._warned: set[tuple] = set()

    # ---- finding the file ----------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES),
                      key=lambda p: (p.stem.lower(), SUFFIXES.index(p.suffix.lower())))

    def _meta(self, path: Path) -> dict[str, str]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime)
        if key not in self._metadata:
            self._metadata[key] = taesd.file_metadata(path)
        return self._metadata[key]

    def find(self, method: str, space: str, vae=None) -> Path | None:
        """The file ``method`` uses for latents of ``space`` decoded by ``vae``: for TAESD one trained for
        this very VAE (its fingerprint in the metadata) first, then the family's decoder."""
        files = self._files()
        if method == "Approx NN":
            names = APPROX_NN_NAMES.get(space, ())
            return next((p for p in files if p.stem.lower() in names), None)
        fingerprint = taesd.vae_fingerprint(vae) if vae is not None and hasattr(vae, "decoder") else None
        generic = None
        for path in files:
            meta = self._meta(path)
            own = taesd.fingerprint_of(meta)
            if own is not None:  # made for one model's VAE: never for another's latents
                if fingerprint is not None and taesd.same_fingerprint(fingerprint, own):
                    return path
                continue
            if generic is None and (path.stem.lower() in TAESD_NAMES.get(space, ()) or
                                    meta.get(taesd.LATENT_SPACE_KEY) == space):
                generic = path
        return generic

    # ---- decoding ------------------------------------------------------------------------------------
    def module(self, method: str, path: Path) -> torch.nn.Module:
        st = path.stat()
        key = (method, str(path), st.st_size, st.st_mtime)
        if key not in self._modules:
            load = taesd.load_approx_nn if method == "Approx NN" else taesd.load_decoder
            self._modules = {k: v for k, v in self._modules.items() if k[:2] != key[:2]}  # an older version of it
            self._modules[key] = load(path, self.device, self.dtype)
        return self._modules[key]

    def _warn_once(self, key: tuple, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    @torch.no_grad()
    def decode(self, method: str, spec, vae, latent: torch.Tensor) -> Image.Image | None:
        """The first latent of a batch as a picture through ``method``'s network; None (and one warning in
        the log) when there is no usable file, so the caller shows "Approx cheap"."""
        space = latent_space(spec)
        path = self.find(method, space, vae)
        if path is None:
            names = (TAESD_NAMES if method == "TAESD" else APPROX_NN_NAMES).get(space, ("(none published)",))
            self._warn_once((method, space, "missing"),
                            f"Live preview method {method}: no decoder for {SPACE_TITLES.get(space, space)} "
                            f"latents in {self.folder} (e.g. {names[0]}.safetensors / .pth); showing Approx cheap")
            return None
        try:
            net = self.module(method, path)
        except ModelFileError as exc:
            self._warn_once((method, str(path), "broken"), f"Live preview method {method}: {exc}; showing Approx cheap")
            return None
        if latent.dim() == 3:
            latent = latent[None]
        x = latent[:1].to(self.device, self.dtype)
        if x.shape[1] != self._latent_channels(net):
            self._warn_once((method, str(path), "channels"),
                            f"Live preview method {method}: {path.name} takes {self._latent_channels(net)}-channel "
                            f"latents, this model's have {x.shape[1]}; showing Approx cheap")
            return None
        return _to_image(net(x)[0])

    @staticmethod
    def _latent_channels(net: torch.nn.Module) -> int:
        first = net.layers[0] if hasattr(net, "layers") else net.conv1
        return first.in_channels
