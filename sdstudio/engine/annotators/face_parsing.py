"""facexlib's face parsing (BiSeNet) and the extension's ``facexlib`` preprocessor, the first half of PuLID's
``ip-adapter_pulid``: the picture's centre face aligned to 512×512 and turned into "face features", its skin,
eyes, brows, nose and mouth in gray on white.

Files, in ``<annotators>/facexlib/`` (facexlib keeps them in its package's ``facexlib/weights`` folder):

* ``parsing_bisenet.pth`` (facexlib's v0.2.0 release): BiSeNet with a ResNet-18 context path, 19 classes, read
  strictly under facexlib's names (``cp.resnet.layer1.0.conv1.weight``, ``cp.arm16.conv.conv.weight``,
  ``cp.conv_avg.bn.running_var``, ``ffm.convblk.conv.weight``, ``ffm.conv1.weight``,
  ``conv_out.conv_out.weight``, ``conv_out16.conv.bn.bias`` ...); its widths and depths are read from the file's
  shapes (tests build small ones);
* ``detection_Resnet50_Final.pth`` (facexlib's v0.1.0 release): the RetinaFace detector of
  :mod:`sdstudio.engine.retinaface`.

The network: ResNet-18 (7×7 stem, max pool, four stages of two basic blocks) gives features at 1/8, 1/16 and
1/32; the context path refines the last two with attention modules (a 3×3 conv and a sigmoid channel gate from
the global average), adds the globally pooled 1/32 features, upsamples (nearest) and mixes with 3×3 convs; a
fusion module joins the 1/8 features with the context at 1/8 (concatenation, 1×1 conv, a channel gate added
back); three heads give class logits at 1/8, 1/8 and 1/16, bilinearly resized (corners aligned) to the input.
The main head's argmax is the label map.

The preprocessor, as the extension's (``FaceRestoreHelper(upscale_factor=1, face_size=512)`` +
``init_parsing_model("bisenet")``): the picture's short side at the resolution (padded to multiples of 64); the
faces RetinaFace finds with a score over 0.97 (NMS at 0.4); the one whose box centre is nearest the picture's
centre; the similarity taking its five landmarks to facexlib's 512² template; the warp (bilinear, gray
(132, 133, 135) outside the picture, whole levels); the crop in [0, 1], ImageNet-normalized, through BiSeNet;
pixels labelled background, cloth, hat, ears, earring, neck or necklace (0, 16, 18, 7, 8, 9, 14, 15) white, the
rest (skin, brows, eyes, glasses, nose, mouth, lips, hair) the crop in gray (0.299 R + 0.587 G + 0.114 B). The result is a 1×3×512×512 tensor in [0, 1], the input of
:mod:`.eva_clip`.

Differences: facexlib fits the similarity with OpenCV's LMedS (``estimateAffinePartial2D``), here it is the
least-squares fit of :func:`sdstudio.engine.faces.similarity` (the same when the landmarks fit the template
exactly, close otherwise), and the warp is torch's bilinear sampling rather than OpenCV's fixed-point one (about a
level apart at most).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...core.controlnet import ControlNetError
from ...models.errors import ModelFileError
from .. import faces, retinaface
from .common import AnnotatorFile, cached_network, compute_device, count_indexed, hwc3, resize_with_pad

FILE = AnnotatorFile("parsing_bisenet.pth", "facexlib", "xinntao/facexlib's v0.2.0 release on GitHub "
                     "(releases/download/v0.2.0/parsing_bisenet.pth)")
DETECTOR_FILE = AnnotatorFile("detection_Resnet50_Final.pth", "facexlib", "xinntao/facexlib's v0.1.0 release on "
                              "GitHub (releases/download/v0.1.0/detection_Resnet50_Final.pth)")
FACE_SIZE = faces.FACE_SIZE
DET_THRESHOLD = 0.97
NMS_THRESHOLD = 0.4
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# facexlib's 19 classes: 0 background, 1 skin, 2/3 brows, 4/5 eyes, 6 glasses, 7/8 ears, 9 earring, 10 nose,
# 11 mouth, 12/13 lips, 14 neck, 15 necklace, 16 cloth, 17 hair, 18 hat
BACKGROUND = (0, 16, 18, 7, 8, 9, 14, 15)
GRAY = (0.299, 0.587, 0.114)
RESOLUTION = 512


# ---- BiSeNet (facexlib's names) ------------------------------------------------------------------------------

class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """The context path's backbone; returns the last three stages (1/8, 1/16, 1/32)."""

    def __init__(self, base: int, widths: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base)
        cin = base
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = width

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


def _global_average(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3), keepdim=True)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_average(feat))))


class ContextPath(nn.Module):
    def __init__(self, base: int, widths: tuple[int, ...], blocks: tuple[int, ...], width: int):
        super().__init__()
        self.resnet = ResNet18(base, widths, blocks)
        self.arm16 = AttentionRefinement(widths[2], width)
        self.arm32 = AttentionRefinement(widths[3], width)
        self.conv_head32 = ConvBNReLU(width, width)
        self.conv_head16 = ConvBNReLU(width, width)
        self.conv_avg = ConvBNReLU(widths[3], width, 1)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        context = self.arm32(f32) + self.conv_avg(_global_average(f32))  # the pooled map broadcast (nearest)
        up32 = self.conv_head32(F.interpolate(context, f16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, f8.shape[2:], mode="nearest"))
        return f8, up16, up32


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial, context):
        feat = self.convblk(torch.cat([spatial, context], 1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_average(feat)))))
        return feat * gate + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """facexlib's BiSeNet; ``forward`` gives the three heads' logits (B×classes×H×W), the main one first."""

    def __init__(self, base: int = 64, widths: tuple[int, ...] = (64, 128, 256, 512), blocks: tuple[int, ...] = (2,) * 4,
                 width: int = 128, fuse: int = 256, mid: int = 256, mid_aux: int = 64, classes: int = 19):
        super().__init__()
        self.cp = ContextPath(base, widths, blocks, width)
        self.ffm = FeatureFusion(widths[1] + width, fuse)
        self.conv_out = BiSeNetOutput(fuse, mid, classes)
        self.conv_out16 = BiSeNetOutput(width, mid_aux, classes)
        self.conv_out32 = BiSeNetOutput(width, mid_aux, classes)

    def forward(self, x):
        size = x.shape[2:]
        f8, c8, c16 = self.cp(x)
        outs = (self.conv_out(self.ffm(f8, c8)), self.conv_out16(c8), self.conv_out32(c16))
        return tuple(F.interpolate(o, size, mode="bilinear", align_corners=True) for o in outs)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> BiSeNet:
        r = "cp.resnet."
        blocks = tuple(count_indexed(shapes, rf"{r}layer{i}\.(\d+)\.") for i in range(1, 5))
        if not all(blocks):
            raise KeyError(f"{r}layer1-4")
        return cls(base=shapes[f"{r}conv1.weight"][0],
                   widths=tuple(shapes[f"{r}layer{i}.0.conv1.weight"][0] for i in range(1, 5)), blocks=blocks,
                   width=shapes["cp.arm32.conv.conv.weight"][0], fuse=shapes["ffm.convblk.conv.weight"][0],
                   mid=shapes["conv_out.conv.conv.weight"][0], mid_aux=shapes["conv_out16.conv.conv.weight"][0],
                   classes=shapes["conv_out.conv_out.weight"][0])


def _build(weights: dict[str, torch.Tensor]) -> BiSeNet:
    try:
        return BiSeNet.from_shapes({k: tuple(v.shape) for k, v in weights.items()})
    except (KeyError, IndexError) as exc:
        raise ModelFileError(f"not facexlib's BiSeNet face parsing network (no {exc} among its tensors)") from None


def load(path: Path) -> BiSeNet:
    return cached_network(Path(path), "facexlib_bisenet", _build)


def _build_detector(weights: dict[str, torch.Tensor]) -> retinaface.RetinaFace:
    try:
        return retinaface.RetinaFace.from_state_dict(weights)
    except (KeyError, RuntimeError) as exc:
        raise ModelFileError(f"not a RetinaFace detector ({str(exc).splitlines()[0]})") from None


def load_detector(path: Path) -> retinaface.RetinaFace:
    return cached_network(Path(path), "facexlib_retinaface", _build_detector,
                          convert=lambda w: {k: v for k, v in w.items() if not k.startswith("body.fc.")})


# ---- the preprocessor ------------------------------------------------------------------------------------------

@torch.no_grad()
def parse(model: BiSeNet, face: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The label map (B×H×W, int64) of aligned faces: ``face`` a B×3×H×W tensor in [0, 1] or an H×W×3 RGB uint8
    picture."""
    if isinstance(face, np.ndarray):
        face = torch.from_numpy(np.ascontiguousarray(face)).float().div(255.0).permute(2, 0, 1)[None]
    param = next(model.parameters())
    x = face.to(param.device, torch.float32)
    x = (x - torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)) / torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return model(x)[0].argmax(dim=1)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """B×3×H×W → the luma (0.299, 0.587, 0.114) repeated in three channels."""
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).repeat(1, 3, 1, 1)


def features_from_labels(face: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The face features: white where ``labels`` (B×H×W) is a background class, the gray face elsewhere."""
    background = torch.isin(labels, torch.tensor(BACKGROUND, device=labels.device))[:, None]
    return torch.where(background, torch.ones_like(face), to_gray(face))


def center_face(found: list[retinaface.Face], height: int, width: int) -> retinaface.Face:
    """facexlib's ``only_center_face``: the face whose box centre is nearest the picture's (the first on ties)."""
    centre = np.array([width / 2, height / 2])
    dist = [np.linalg.norm(np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2]) - centre) for f in found]
    return found[int(np.argmin(dist))]


@torch.no_grad()
def align(picture: np.ndarray, landmarks: np.ndarray) -> torch.Tensor:
    """The 1×3×512×512 crop in [0, 1] (whole levels) that puts ``landmarks`` on facexlib's template; gray outside
    the picture. ``picture``: H×W×3 RGB uint8."""
    device = compute_device()
    x = torch.from_numpy(np.ascontiguousarray(picture[:, :, :3])).to(device).permute(2, 0, 1).float()
    _, crop = faces.aligned_crop(x, landmarks)
    return (crop.round().clamp(0, 255) / 255.0)[None]


def aligned_center_face(detector: retinaface.RetinaFace, picture: np.ndarray, where: str = "facexlib"
                        ) -> torch.Tensor:
    """The picture's centre face aligned (:func:`align`); no face is a :class:`ControlNetError`."""
    found = retinaface.detect(detector, Image.fromarray(np.ascontiguousarray(picture[:, :, :3])), DET_THRESHOLD,
                              NMS_THRESHOLD)
    if not found:
        raise ControlNetError(f"{where}: facexlib's RetinaFace found no face in the picture")
    return align(picture, center_face(found, *picture.shape[:2]).landmarks)


def face_features(detector: retinaface.RetinaFace, parser: BiSeNet, image: np.ndarray, resolution: float = RESOLUTION,
                  where: str = "facexlib") -> torch.Tensor:
    """The extension's ``facexlib`` preprocessor (module docstring): 1×3×512×512 float32 in [0, 1] on the compute
    device, for an RGB (or gray / RGBA) uint8 picture."""
    padded, _ = resize_with_pad(hwc3(np.asarray(image), where)[:, :, :3], resolution)
    face = aligned_center_face(detector, padded, where)
    return features_from_labels(face, parse(parser, face).to(face.device))


def to_image(features: torch.Tensor) -> np.ndarray:
    """The features as the extension shows them: H×W×3 uint8 (× 255, truncated)."""
    return (features[0].permute(1, 2, 0) * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()


def run(annotators_dir: Path, image: np.ndarray, resolution: float = RESOLUTION, where: str = "facexlib"
        ) -> torch.Tensor:
    """:func:`face_features` with the two files found in ``annotators_dir`` (a missing one is a
    :class:`ControlNetError` saying where to put it)."""
    detector = load_detector(DETECTOR_FILE.locate(annotators_dir, where))
    parser = load(FILE.locate(annotators_dir, where))
    return face_features(detector, parser, image, resolution, where)
