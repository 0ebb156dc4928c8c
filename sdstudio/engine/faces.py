"""Face restoration as A1111 does it with CodeFormer or GFPGAN: find faces, align each to a 512² crop,
restore the crop, paste it back with a soft edge, then blend the result over the picture by the visibility.

Files: CodeFormer's network in A1111's ``models/Codeformer`` (``codeformer-v0.1.0.pth``;
``--codeformer-models-path``), GFPGAN's in ``models/GFPGAN`` (a v1.2–v1.4 file whose name contains
"GFPGAN", e.g. ``GFPGANv1.4.pth``; the highest name wins; ``--gfpgan-models-path``), and facexlib's
RetinaFace detector (``detection_Resnet50_Final.pth`` or ``detection_mobilenet0.25_Final.pth``) in either
folder, all read with the safe loader. Without them the feature says which file to put where.

The steps follow facexlib's helper, which GFPGAN and CodeFormer use: detection at the picture's own size
(score > 0.97, eyes ≥ 5 px apart); a similarity transform (rotation, uniform scale, shift; least squares)
from the five landmarks to a fixed 512² template; bilinear warps with a grey border; the restored face
warped back and blended through facexlib's ParseNet mask of it when ``parsing_parsenet.pth`` is beside the
detector (A1111's helper has ``use_parse`` on: skin and features pasted, hair, neck, clothes and background
kept, the mask blurred), else through its footprint, eroded and blurred in proportion to the face's size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.errors import ModelFileError, ModelNotFoundError
from ..models.files import NETWORK_SUFFIXES
from ..models.safe_load import open_state_dict
from . import retinaface
from .codeformer import CodeFormer
from .gfpgan import GFPGAN
from .parsenet import ParseNet

FACE_SIZE = 512
# where the five landmarks (eyes, nose, mouth corners) go in the 512² crop (facexlib's template)
TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]])
BORDER = (132, 133, 135)  # RGB of the crop outside the picture
DETECTORS = ("detection_Resnet50_Final", "detection_mobilenet0.25_Final")
PARSER = "parsing_parsenet"  # facexlib's face parser (parsing_parsenet.pth), beside the detector
MIN_EYE_DISTANCE = 5.0


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2×3 matrix of the rotation + uniform scale + shift that best maps ``src`` points onto ``dst``
    (least squares, no reflection)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    # x' = a x - b y + tx, y' = b x + a y + ty: a and b minimise the squared error in closed form
    norm = (s ** 2).sum()
    a = (s * d).sum() / norm
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / norm
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (mu_d - rot @ mu_s)[:, None]])


def invert(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]


def warp(pictures: torch.Tensor, matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``pictures`` (C×H×W) moved by ``matrix`` (input pixel → output pixel, pixel centres at integers)
    into a ``size`` (w, h) frame; bilinear, zero outside the input."""
    w, h = size
    inv = torch.as_tensor(invert(matrix), dtype=torch.float32, device=pictures.device)
    ys, xs = torch.meshgrid(torch.arange(h, device=pictures.device, dtype=torch.float32),
                            torch.arange(w, device=pictures.device, dtype=torch.float32), indexing="ij")
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    hin, win = pictures.shape[1:]
    grid = torch.stack([(2 * sx + 1) / win - 1, (2 * sy + 1) / hin - 1], -1)[None]
    return F.grid_sample(pictures[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Minimum over a k×k window (anchored at its centre, as OpenCV's), the outside counting as 1."""
    if k <= 1:
        return mask
    lo, hi = k // 2, k - 1 - k // 2
    padded = F.pad(mask[None, None], (lo, hi, lo, hi), value=1.0)
    return -F.max_pool2d(-padded, k, stride=1)[0, 0]


def _blur(mask: torch.Tensor, k: int, sigma: float | None = None) -> torch.Tensor:
    """Gaussian blur with a k-tap kernel (its sigma, when not given, from k as OpenCV chooses it), borders
    mirrored (OpenCV's default BORDER_REFLECT_101)."""
    if k <= 1:
        return mask
    sigma = sigma if sigma is not None else 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    x = torch.arange(k, dtype=torch.float32, device=mask.device) - (k - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    r = k // 2
    m = mask[None, None]
    if min(mask.shape) > r:
        m = F.pad(m, (r, r, r, r), mode="reflect")
    else:
        m = F.pad(m, (r, r, r, r), mode="replicate")
    m = F.conv2d(m, g.view(1, 1, 1, k))
    return F.conv2d(m, g.view(1, 1, k, 1))[0, 0]


def aligned_crop(picture: torch.Tensor, landmarks: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """(matrix, the 3×512×512 crop in 0..255 that puts ``landmarks`` on the template), grey outside the
    picture; ``picture`` 3×H×W in 0..255."""
    matrix = similarity(landmarks, TEMPLATE)
    both = warp(torch.cat([picture, torch.ones_like(picture[:1])]), matrix, (FACE_SIZE, FACE_SIZE))
    border = torch.tensor(BORDER, dtype=torch.float32, device=picture.device).view(3, 1, 1)
    return matrix, both[:3] + (1 - both[3:]) * border


def paste_mask(matrix: np.ndarray, size: tuple[int, int],
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a face crop made with ``matrix`` goes back into a ``size`` picture: (footprint, soft mask);
    its footprint eroded by 2 px (what bilinear sampling smears), then by a twentieth of the face's side
    on each side and blurred as much, so that the restored face fades into the picture."""
    footprint = warp(torch.ones(1, FACE_SIZE, FACE_SIZE, device=device), invert(matrix), size)[0]
    footprint = _erode(footprint, 2)
    edge = int(float(footprint.sum()) ** 0.5) // 20
    return footprint, _blur(_erode(footprint, 2 * edge), 2 * edge + 1)


# facexlib's parse-mask colours: which of ParseNet's 19 classes the restored face is pasted over (0:
# background, 14: neck, 16-18: cloth, hair, hat keep the picture)
PARSE_KEEP = (0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0)
PARSE_BLUR, PARSE_SIGMA, PARSE_BORDER = 101, 11.0, 10


def parse_mask(parser: ParseNet, restored: torch.Tensor) -> torch.Tensor:
    """Where a restored face (3×512×512, 0..255) goes back, as facexlib's helper pastes with ``use_parse``
    (A1111's): ParseNet's classes of the face, its skin and features 1 and the rest 0, blurred twice (101 taps,
    sigma 11), the outer 10 pixels 0 (512×512 in 0..1)."""
    dtype = next(parser.parameters()).dtype
    device = next(parser.parameters()).device
    labels = parser((restored / 127.5 - 1)[None].to(device, dtype)).float().argmax(1)[0]
    keep = torch.tensor(PARSE_KEEP + (0,) * max(0, parser.out_mask_conv.conv2d.out_channels - len(PARSE_KEEP)),
                        dtype=torch.float32, device=device)
    mask = _blur(_blur(keep[labels], PARSE_BLUR, PARSE_SIGMA), PARSE_BLUR, PARSE_SIGMA)
    b = PARSE_BORDER
    mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = 0, 0, 0, 0
    return mask.to(restored.device)


@dataclass
class FaceRestorer:
    """A loaded restoration network and detector, and (when its file is there) the face parser."""

    name: str
    network: GFPGAN | CodeFormer
    detector: retinaface.RetinaFace
    device: torch.device
    parser: ParseNet | None = None

    def crops(self, picture: torch.Tensor, faces: list[retinaface.Face]) -> list[tuple[np.ndarray, torch.Tensor]]:
        """(matrix, 3×512×512 crop in 0..255) per face; ``picture`` 3×H×W in 0..255."""
        return [aligned_crop(picture, face.landmarks) for face in faces]

    @torch.no_grad()
    def restore_crop(self, crop: torch.Tensor, seed: int = 0, fidelity: float = 0.5) -> torch.Tensor:
        """One aligned crop (3×512×512, 0..255) through the network, rounded to whole levels. GFPGAN draws
        its noise from ``seed``; CodeFormer takes ``fidelity`` (A1111's CodeFormer weight)."""
        dtype = next(self.network.parameters()).dtype
        x = (crop / 127.5 - 1)[None].to(self.device, dtype)
        if isinstance(self.network, CodeFormer):
            y = self.network(x, fidelity)
        else:
            y = self.network(x, torch.Generator(self.device).manual_seed(seed))
        y = y.float().clamp(-1, 1)[0]
        return ((y + 1) * 127.5).round().to(crop.device)

    @torch.no_grad()
    def restore(self, image: Image.Image, visibility: float = 1.0, faces: list[retinaface.Face] | None = None,
                seed: int = 0, fidelity: float = 0.5) -> Image.Image:
        """``image`` with its faces restored and blended over it by ``visibility`` (0: unchanged).
        ``faces``: found by the detector when not given."""
        image = image.convert("RGB")
        if visibility <= 0:
            return image
        if faces is None:
            faces = retinaface.detect(self.detector, image, device=self.device)
        faces = [f for f in faces if f.eye_distance >= MIN_EYE_DISTANCE]
        if not faces:
            return image
        picture = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        out = picture.clone()
        for i, (matrix, crop) in enumerate(self.crops(picture, faces)):
            restored = self.restore_crop(crop, seed + i, fidelity)
            back = warp(restored, invert(matrix), image.size)
            if self.parser is not None:  # facexlib's use_parse, as A1111 pastes
                soft = warp(parse_mask(self.parser, restored)[None], invert(matrix), image.size)[0]
                out = soft * back + (1 - soft) * out
            else:
                footprint, soft = paste_mask(matrix, image.size)
                out = soft * (footprint * back) + (1 - soft) * out
        result = Image.fromarray(out.round().clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy())
        return result if visibility >= 1 else Image.blend(image, result, visibility)


def _build(path: Path, what: str, build):
    """``build(state dict)`` of the file, a ModelFileError naming the file when its weights do not fit."""
    try:
        return build(dict(open_state_dict(path)))
    except (KeyError, RuntimeError, IndexError, ValueError) as exc:
        raise ModelFileError(f"{path.name}: not {what} ({exc})") from None


@dataclass(frozen=True)
class _Kind:
    name: str
    match: str  # a file whose name contains this (any case) is this kind's network
    example: str
    build: object  # state dict -> network


KINDS = (_Kind("CodeFormer", "codeformer", "codeformer-v0.1.0.pth", CodeFormer.from_state_dict),
         _Kind("GFPGAN", "gfpgan", "GFPGANv1.4.pth", GFPGAN.from_state_dict))
DEFAULT = "CodeFormer"  # A1111's default face_restoration_model


class FaceRestorers:
    """The face restorers a data dir offers, by A1111 name (CodeFormer, GFPGAN: each when its network and a
    detector are there), the last one used kept loaded. ``folders``: where each kind's files are
    (A1111: ``models/Codeformer``, ``models/GFPGAN``); the detector may be in either."""

    def __init__(self, folders: dict[str, Path], device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        self.folders = {name: Path(folder) for name, folder in folders.items()}
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self._loaded: tuple[tuple, FaceRestorer] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in NETWORK_SUFFIXES)

    def _kind(self, name: str) -> _Kind:
        for kind in KINDS:
            if kind.name.lower() == name.strip().lower():
                return kind
        raise ModelNotFoundError(f"unknown face restorer {name!r}; known: {', '.join(k.name for k in KINDS)}")

    def network_file(self, name: str) -> Path | None:
        kind = self._kind(name)
        found = [p for p in self._files(self.folders[kind.name]) if kind.match in p.name.lower()]
        return found[-1] if found else None  # the highest version: GFPGANv1.4 over v1.3

    def _beside(self, name: str, stems: tuple[str, ...]) -> Path | None:
        """The first of ``stems`` found in ``name``'s folder, then in the others."""
        folders = [self.folders[self._kind(name).name]] + list(self.folders.values())
        for folder in folders:
            by_stem = {p.stem: p for p in self._files(folder)}
            found = next((by_stem[s] for s in stems if s in by_stem), None)
            if found:
                return found
        return None

    def detector_file(self, name: str) -> Path | None:
        return self._beside(name, DETECTORS)

    def parser_file(self, name: str) -> Path | None:
        """facexlib's ``parsing_parsenet.pth`` (optional: without it faces paste through their footprint)."""
        return self._beside(name, (PARSER,))

    def available(self) -> list[str]:
        return [k.name for k in KINDS if self.network_file(k.name) and self.detector_file(k.name)]

    def resolve(self, name: str = "") -> str:
        """The restorer a request means: its name, or ("") A1111's default when installed, else the other."""
        if name:
            return self._kind(name).name
        found = self.available()
        return DEFAULT if DEFAULT in found or not found else found[0]

    def _files_for(self, name: str) -> tuple[_Kind, Path | None, Path | None, str]:
        """The restorer meant, its network and detector files (None: missing) and what to install, in words
        ("" when nothing is missing); the folders are read once."""
        kind = self._kind(self.resolve(name))
        network, detector = self.network_file(kind.name), self.detector_file(kind.name)
        need = ([] if network else [f"a {kind.name} network (e.g. {kind.example})"]) + \
            ([] if detector else ["the RetinaFace detector detection_Resnet50_Final.pth"])
        problem = (f"face restoration ({kind.name}) is not installed: put {' and '.join(need)} in "
                   f"{self.folders[kind.name]}") if need else ""
        return kind, network, detector, problem

    def missing(self, name: str = "") -> str:
        """What to install, in words ("" when nothing is missing)."""
        return self._files_for(name)[3]

    def check(self, name: str = "") -> None:
        """Raises ModelNotFoundError naming the missing files."""
        problem = self.missing(name)
        if problem:
            raise ModelNotFoundError(problem)

    def get(self, name: str = "") -> FaceRestorer:
        kind, net_path, det_path, problem = self._files_for(name)
        if problem:
            raise ModelNotFoundError(problem)
        parser_path = self.parser_file(kind.name)
        key = (net_path, net_path.stat().st_mtime, det_path, det_path.stat().st_mtime,
               parser_path, parser_path.stat().st_mtime if parser_path else None)
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None
                network = _build(net_path, f"a {kind.name} network", kind.build)
                detector = _build(det_path, "a RetinaFace detector", retinaface.RetinaFace.from_state_dict)
                parser = (_build(parser_path, "a ParseNet face parser", ParseNet.from_state_dict)
                          .to(self.device, self.dtype) if parser_path else None)
                restorer = FaceRestorer(kind.name, network.to(self.device, self.dtype),
                                        detector.to(self.device, self.dtype), self.device, parser)
                self._loaded = (key, restorer)
            return self._loaded[1]

    def restore(self, image: Image.Image, visibility: float = 1.0, name: str = "", seed: int = 0,
                fidelity: float = 0.5) -> Image.Image:
        if visibility <= 0:
            return image
        return self.get(name).restore(image, visibility, seed=seed, fidelity=fidelity)
