"""DSINE surface normals, the extension's ``normal_dsine``: our own network loading the published ``dsine.pt``.

The network (Bae & Davison, "Rethinking Inductive Biases for Surface Normal Estimation", CVPR 2024):

* encoder: EfficientNet-B5 as TensorFlow trained it (``tf_efficientnet_b5_ap``: batch norm eps 1e-3, SiLU,
  TensorFlow's "same" padding on the stride-2 convolutions), under its usual names (``conv_stem``, ``bn1``,
  ``blocks.S.B.*``, ``conv_head``); its widths, depths and kernel sizes are read from the file's shapes, the
  strides are EfficientNet's (2 at the stem and stages 1, 2, 3 and 5). The decoder takes stage 2's output (1/8),
  stage 4's (1/16) and ``conv_head``'s (1/32, before its batch norm);
* decoder: the 1/32 features with the rays' (u, v) through a 1×1 convolution, two upsampling steps (bilinear,
  concatenated with the skip features and their rays, two weight-standardized 3×3 convolutions with group norm
  and leaky ReLU each), and three heads at 1/8: the normal, a feature map and the GRU's hidden state;
* refinement: ``iterations`` times, a convolutional GRU (5×5) updates the hidden state; each pixel's normal
  becomes the weighted sum of its 5×5 neighbours' normals, each rotated about an axis (from the predicted
  pixel offset and the camera rays) by a predicted angle, kept facing the camera (the "ray ReLU"); the 1/8
  result is upsampled ×8 by learned convex combinations of 3×3 neighbours.

Around it, as the extension's ``NormalDsineDetector``: the picture's short side at the resolution (padded to
multiples of 64), ImageNet normalization, intrinsics from the Fov slider (focal ``max(H, W) / 2 / tan(fov / 2)``,
centre ``(W / 2 - 0.5, H / 2 - 0.5)``) computed on the picture's original size and shifted by the padding that
would make that size a multiple of 32 (the extension's numbers, which mix the original and the resized sizes),
the last refinement's normals mapped to ``(n + 1) / 2`` in 0-255, then the resize padding cut off. The extension
also crops the map by that 32-padding at the original size, which shifts it against the picture by up to 16
pixels (and cuts it to a corner when the picture is smaller than the resolution); the map here stays aligned.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network, compute_device

FILE = AnnotatorFile("dsine.pt", "normal_dsine", "bdsqlsz/qinglong_controlnet-lllite (Annotators/dsine.pt) on the "
                     "Hugging Face hub")
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # EfficientNet's
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PATCH = 5  # the refinement's neighbourhood
DOWN = 8  # the decoder's resolution
FOV = 60.0
ITERATIONS = 5


# ---- EfficientNet-B5 (TensorFlow padding) ---------------------------------------------------------------------

class SameConv(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding: for stride 2, the extra pixel goes right and bottom."""

    def forward(self, x):
        if self.stride[0] == 1:
            return super().forward(x)
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return SameConv(cin, cout, k, stride, padding=k // 2 if stride == 1 else 0, groups=groups, bias=bias)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        s = F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.conv_expand(s))


class DepthwiseSeparable(nn.Module):
    """The first stage's block: depthwise conv, SE, pointwise conv (no activation after it)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, reduced: int):
        super().__init__()
        self.conv_dw, self.bn1 = _conv(cin, cin, k, stride, groups=cin), _bn(cin)
        self.se = SqueezeExcite(cin, reduced)
        self.conv_pw, self.bn2 = _conv(cin, cout, 1), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """MBConv: pointwise expansion, depthwise conv, SE, pointwise projection."""

    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, reduced: int):
        super().__init__()
        self.conv_pw, self.bn1 = _conv(cin, mid, 1), _bn(mid)
        self.conv_dw, self.bn2 = _conv(mid, mid, k, stride, groups=mid), _bn(mid)
        self.se = SqueezeExcite(mid, reduced)
        self.conv_pwl, self.bn3 = _conv(mid, cout, 1), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.silu(self.bn1(self.conv_pw(x)))
        y = self.bn3(self.conv_pwl(self.se(F.silu(self.bn2(self.conv_dw(y))))))
        return x + y if self.skip else y


class EfficientNet(nn.Module):
    """The encoder, built from the file's shapes (``shapes``: names under ``encoder.original_model.``)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        stem = shapes["conv_stem.weight"][0]
        self.conv_stem, self.bn1 = _conv(3, stem, 3, 2), _bn(stem)
        stages = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")})
        if len(stages) != len(STAGE_STRIDES):
            raise ModelFileError(f"an EfficientNet of {len(stages)} stages; DSINE's has {len(STAGE_STRIDES)}")
        self.blocks = nn.ModuleList()
        cin = stem
        for s in stages:
            count = len({int(k.split(".")[2]) for k in shapes if k.startswith(f"blocks.{s}.")})
            stage = nn.Sequential()
            for b in range(count):
                p = f"blocks.{s}.{b}."
                k = shapes[p + "conv_dw.weight"][-1]
                stride = STAGE_STRIDES[s] if b == 0 else 1
                reduced = shapes[p + "se.conv_reduce.weight"][0]
                if p + "conv_pwl.weight" in shapes:
                    mid, cout = shapes[p + "conv_pw.weight"][0], shapes[p + "conv_pwl.weight"][0]
                    stage.append(InvertedResidual(cin, mid, cout, k, stride, reduced))
                else:
                    cout = shapes[p + "conv_pw.weight"][0]
                    stage.append(DepthwiseSeparable(cin, cout, k, stride, reduced))
                cin = cout
            self.blocks.append(stage)
        head = shapes["conv_head.weight"][0]
        self.conv_head, self.bn2 = _conv(cin, head, 1), _bn(head)  # bn2: in the file, not used by DSINE

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 2's, stage 4's and ``conv_head``'s outputs (1/8, 1/16, 1/32)."""
        x = F.silu(self.bn1(self.conv_stem(x)))
        kept = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in (2, 4):
                kept.append(x)
        return kept[0], kept[1], self.conv_head(x)


# ---- the decoder and the refinement ------------------------------------------------------------------------------

class WSConv(nn.Conv2d):
    """A weight-standardized convolution (each filter's weights to zero mean and unit std, + 1e-5)."""

    def forward(self, x):
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.reshape(w.shape[0], -1).std(dim=1).reshape(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class UpSample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self._net = nn.Sequential(WSConv(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.LeakyReLU(),
                                  WSConv(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.LeakyReLU())

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self._net(torch.cat([x, skip], dim=1))


def _head(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                         nn.Conv2d(hidden, cout, 1))


class Decoder(nn.Module):
    """The published decoder is 2048 wide with 128-wide heads (``features``, ``head``: read from the file)."""

    def __init__(self, c8: int, c16: int, c32: int, features: int = 2048, head: int = 128, hidden: int = 64):
        super().__init__()
        self.conv2 = nn.Conv2d(c32 + 2, features, 1)
        self.up1 = UpSample(features + c16 + 2, features // 2)
        self.up2 = UpSample(features // 2 + c8 + 2, features // 4)
        width = features // 4 + 2
        self.normal_head, self.feature_head, self.hidden_head = _head(width, head, 3), _head(width, head, hidden), \
            _head(width, head, hidden)

    def forward(self, f8, f16, f32, uv8, uv16, uv32):
        x = self.conv2(torch.cat([f32, uv32], dim=1))
        x = self.up1(x, torch.cat([f16, uv16], dim=1))
        x = torch.cat([self.up2(x, torch.cat([f8, uv8], dim=1)), uv8], dim=1)
        return F.normalize(self.normal_head(x), dim=1), self.feature_head(x), self.hidden_head(x)


class ConvGRU(nn.Module):
    def __init__(self, hidden: int, cin: int, k: int = PATCH):
        super().__init__()
        self.convz = nn.Conv2d(hidden + cin, hidden, k, padding=k // 2)
        self.convr = nn.Conv2d(hidden + cin, hidden, k, padding=k // 2)
        self.convq = nn.Conv2d(hidden + cin, hidden, k, padding=k // 2)

    def forward(self, h, x):
        hx = torch.cat([h, x], dim=1)
        z, r = torch.sigmoid(self.convz(hx)), torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


def ray_relu(normal: torch.Tensor, ray: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """The normal with its component along the view ray kept at a cosine of at least ``eps`` (facing the camera)."""
    cos = torch.cosine_similarity(normal, ray, dim=1).unsqueeze(1)
    return F.normalize(normal + ray * (torch.relu(cos - eps) + eps) - ray * cos, dim=1)


def rotation_matrices(axis_angle: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis × angle -> (..., 3, 3) rotations, through the unit quaternion (as PyTorch3D's
    ``axis_angle_to_matrix``, with its series for angles under 1e-6)."""
    angle = torch.linalg.norm(axis_angle, dim=-1, keepdim=True)
    half = angle * 0.5
    small = angle.abs() < 1e-6
    ratio = torch.where(small, 0.5 - angle * angle / 48, torch.sin(half) / torch.where(small, torch.ones_like(angle),
                                                                                       angle))
    r, i, j, k = torch.cat([torch.cos(half), axis_angle * ratio], dim=-1).unbind(-1)
    two = 2.0 / (r * r + i * i + j * j + k * k)
    out = torch.stack([1 - two * (j * j + k * k), two * (i * j - k * r), two * (i * k + j * r),
                       two * (i * j + k * r), 1 - two * (i * i + k * k), two * (j * k - i * r),
                       two * (i * k - j * r), two * (j * k + i * r), 1 - two * (i * i + j * j)], dim=-1)
    return out.reshape(*axis_angle.shape[:-1], 3, 3)


def unfold(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size², H, W): each pixel's neighbourhood, edges replicated."""
    b, c, h, w = x.shape
    pad = (size - 1) // 2
    return F.unfold(F.pad(x, (pad, pad, pad, pad), mode="replicate"), size).view(b, c, size * size, h, w)


def convex_upsample(x: torch.Tensor, mask: torch.Tensor, k: int = DOWN) -> torch.Tensor:
    """×k: each fine pixel a softmax-weighted mix of its coarse pixel's 3×3 neighbours (edges replicated)."""
    b, c, h, w = x.shape
    weights = torch.softmax(mask.view(b, 1, 9, k, k, h, w), dim=2)
    patches = unfold(x, 3).view(b, c, 9, 1, 1, h, w)
    return (weights * patches).sum(dim=2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, k * h, k * w)


class DSINE(nn.Module):
    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        enc = {k[len("encoder.original_model."):]: v for k, v in shapes.items() if k.startswith("encoder.original_model.")}
        self.encoder = nn.Module()
        self.encoder.original_model = EfficientNet(enc)
        net = self.encoder.original_model
        hidden = feature = 64  # the GRU's state and the feature map (the refinement's heads are built for 64)
        self.decoder = Decoder(net.blocks[2][-1].bn3.num_features, net.blocks[4][-1].bn3.num_features,
                               net.conv_head.out_channels, shapes["decoder.conv2.weight"][0],
                               shapes["decoder.normal_head.0.weight"][0], hidden)
        self.gru = ConvGRU(hidden, feature + 2)
        self.prob_head = _head(hidden + 2, 64, PATCH * PATCH)
        self.xy_head = _head(hidden + 2, 64, PATCH * PATCH * 2)
        self.angle_head = _head(hidden + 2, 64, PATCH * PATCH)
        self.up_prob_head = _head(hidden + 2, 64, 9 * DOWN * DOWN)
        self.iterations = ITERATIONS

    @staticmethod
    def pixel_coords(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w): pixel centres (x + 0.5, y + 0.5, 1)."""
        y, x = torch.meshgrid(torch.arange(h, dtype=like.dtype, device=like.device),
                              torch.arange(w, dtype=like.dtype, device=like.device), indexing="ij")
        return torch.stack([x + 0.5, y + 0.5, torch.ones_like(x)])[None]

    def rays(self, intrins, h, w, full_h, full_w, uv_only: bool):
        fu = intrins[:, 0, 0][:, None, None] * (w / full_w)
        cu = intrins[:, 0, 2][:, None, None] * (w / full_w)
        fv = intrins[:, 1, 1][:, None, None] * (h / full_h)
        cv = intrins[:, 1, 2][:, None, None] * (h / full_h)
        ray = self.pixel_coords(h, w, intrins).repeat(intrins.shape[0], 1, 1, 1)
        ray[:, 0] = (ray[:, 0] - cu) / fu
        ray[:, 1] = (ray[:, 1] - cv) / fv
        return ray[:, :2] if uv_only else F.normalize(ray, dim=1)

    def refine(self, h, feat, normal, intrins, full_h, full_w, uv8, ray8):
        hh, ww = normal.shape[-2:]
        scale_w, scale_h = ww / full_w, hh / full_h
        fu = intrins[:, 0, 0][:, None, None, None] * scale_w
        cu = intrins[:, 0, 2][:, None, None, None] * scale_w
        fv = intrins[:, 1, 1][:, None, None, None] * scale_h
        cv = intrins[:, 1, 2][:, None, None, None] * scale_h
        h = self.gru(h, feat)
        cond = torch.cat([h, uv8], dim=1)
        prob = torch.sigmoid(self.prob_head(cond)).unsqueeze(1)
        near = unfold(normal, PATCH)
        xs, ys = self.xy_head(cond).split(PATCH * PATCH, dim=1)
        xy = F.normalize(torch.stack([xs, ys], dim=1), dim=1)
        angle = torch.sigmoid(self.angle_head(cond)).unsqueeze(1) * math.pi
        coords = unfold(self.pixel_coords(hh, ww, normal), PATCH)
        du, dv = xy[:, 0] / fu, xy[:, 1] / fv
        tu = (coords[:, 0] + xy[:, 0] - cu) / fu
        tv = (coords[:, 1] + xy[:, 1] - cv) / fv
        nx, ny, nz = near[:, 0], near[:, 1], near[:, 2]
        denom = tu * nx + tv * ny + nz
        tiny = denom.abs() < 1e-8
        denom = torch.where(tiny, 1e-8 * torch.sign(denom), denom)
        dz = -(du * nx + dv * ny) / denom
        axes = F.normalize(torch.stack([du + dz * tu, dv + dz * tv, dz], dim=1), dim=1)
        bad = (torch.isnan(axes) | torch.isinf(axes)).any(dim=1, keepdim=True)
        axes = torch.where(bad, torch.zeros_like(axes), axes)
        rot = rotation_matrices((axes * angle).permute(0, 2, 3, 4, 1))  # (B, P, h, w, 3, 3)
        turned = (rot @ near.permute(0, 2, 3, 4, 1).unsqueeze(-1)).squeeze(-1).permute(0, 4, 1, 2, 3)
        turned = F.normalize(turned, dim=1)
        turned = torch.stack([ray_relu(turned[:, :, i], ray8) for i in range(turned.shape[2])], dim=2)
        normal = F.normalize((prob * turned).sum(dim=2), dim=1)
        up = F.normalize(convex_upsample(normal, self.up_prob_head(torch.cat([h, uv8], dim=1))), dim=1)
        return h, normal, up

    def forward(self, img: torch.Tensor, intrins: torch.Tensor) -> torch.Tensor:
        """The last refinement's normals (B, 3, H, W) of a normalized image whose sides are multiples of 32."""
        f8, f16, f32 = self.encoder.original_model(img)
        _, _, full_h, full_w = img.shape
        intrins = intrins.clone()
        intrins[:, 0, 2] += 0.5
        intrins[:, 1, 2] += 0.5
        uv32 = self.rays(intrins, full_h // 32, full_w // 32, full_h, full_w, True)
        uv16 = self.rays(intrins, full_h // 16, full_w // 16, full_h, full_w, True)
        uv8 = self.rays(intrins, full_h // 8, full_w // 8, full_h, full_w, True)
        ray8 = self.rays(intrins, full_h // 8, full_w // 8, full_h, full_w, False)
        normal, feat, h = self.decoder(f8, f16, f32, uv8, uv16, uv32)
        normal = ray_relu(normal, ray8)
        feat = torch.cat([feat, uv8], dim=1)
        up = F.normalize(convex_upsample(normal, self.up_prob_head(torch.cat([h, uv8], dim=1))), dim=1)
        for _ in range(self.iterations):
            h, normal, up = self.refine(h, feat, normal, intrins, full_h, full_w, uv8, ray8)
        return up


# ---- the preprocessor ---------------------------------------------------------------------------------------------

def _build(weights: dict[str, torch.Tensor]) -> DSINE:
    try:
        return DSINE({k: tuple(v.shape) for k, v in weights.items()})
    except (KeyError, IndexError) as exc:
        raise ModelFileError(f"not a DSINE checkpoint (no {exc} among its EfficientNet encoder's tensors)") from None


def load(path) -> DSINE:
    return cached_network(path, "dsine", _build)


def padding_to_32(h: int, w: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) making ``h`` × ``w`` multiples of 32, split evenly (left / top the smaller)."""
    def split(n: int) -> tuple[int, int]:
        if n % 32 == 0:
            return 0, 0
        extra = 32 * (n // 32 + 1) - n
        return extra // 2, extra - extra // 2

    (left, right), (top, bottom) = split(w), split(h)
    return left, right, top, bottom


def intrinsics_from_fov(fov: float, h: int, w: int) -> torch.Tensor:
    f = (max(h, w) / 2.0) / math.tan(math.radians(fov / 2.0))
    return torch.tensor([[f, 0.0, w / 2.0 - 0.5], [0.0, f, h / 2.0 - 0.5], [0.0, 0.0, 1.0]], dtype=torch.float32)


@torch.no_grad()
def detect(model: DSINE, padded: np.ndarray, original: tuple[int, int], fov: float = FOV,
           iterations: int = ITERATIONS) -> np.ndarray:
    """The normal map (RGB uint8) of the resized, padded picture, as the extension makes it (module docstring);
    ``original``: the picture's (H, W) before resizing."""
    device = compute_device()
    model.to(device).iterations = int(iterations)
    h0, w0 = original
    left, _, top, _ = padding_to_32(h0, w0)
    x = torch.from_numpy(np.ascontiguousarray(padded)).float().div(255.0).permute(2, 0, 1)[None]
    x = ((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).to(device)
    intrins = intrinsics_from_fov(fov, h0, w0)[None].to(device)
    intrins[:, 0, 2] += left
    intrins[:, 1, 2] += top
    normal = ((model(x, intrins) + 1) * 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
    return (normal * 255.0).clip(0, 255).astype(np.uint8)
