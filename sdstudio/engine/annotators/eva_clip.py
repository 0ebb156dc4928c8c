"""EVA02-CLIP-L-14-336's image tower, the ``EVA02-CLIP-L-14-336`` preprocessor that the extension's
``ip-adapter_pulid`` calls (supplied by the sd-webui-controlnet-evaclip extension): our own transformer loading
the published ``EVA02_CLIP_L_336_psz14_s6B.pt`` (QuanSun/EVA-CLIP on the Hugging Face hub).

The file is an EVA-CLIP training checkpoint: a state dict, possibly inside ``state_dict`` / ``model`` /
``module``, with the image tower under ``visual.`` (``visual.cls_token``, ``visual.pos_embed``,
``visual.patch_embed.proj.weight``, ``visual.blocks.N.norm1.weight``, ``visual.blocks.N.attn.q_proj.weight``,
``visual.blocks.N.attn.k_proj.weight``, ``visual.blocks.N.attn.v_proj.weight``, ``visual.blocks.N.attn.q_bias``,
``visual.blocks.N.attn.v_bias``, ``visual.blocks.N.attn.inner_attn_ln.weight``, ``visual.blocks.N.attn.proj.bias``,
``visual.blocks.N.norm2.bias``, ``visual.blocks.N.mlp.w1.weight`` / ``w2`` / ``w3``,
``visual.blocks.N.mlp.ffn_ln.weight``, ``visual.norm.weight``, ``visual.head.weight``). The text tower
(``text.*``, ``logit_scale``) and the rotary tables (``*.rope.freqs_cos`` / ``freqs_sin``, which EVA-CLIP
recomputes too) are not read; the rest loads strictly. Width, depth, patch size, image size (from
``pos_embed``'s grid), MLP width and output width come from the file's shapes; heads are 64 wide (EVA-CLIP's
``head_width``), so ViT-L's 1024 gives 16. The file is looked for in ``<annotators>/evaclip/`` (or
``<annotators>/``); the evaclip extension downloads it into its own ``models/`` folder as a Hugging Face cache
(``models--QuanSun--EVA-CLIP/snapshots/<revision>/``), which :func:`find_file` also reads when given that folder.

The network (EVA02-CLIP-L-14-336's config: ``rope``, ``intp_freq``, ``naiveswiglu``, ``subln``, no layer scale,
class-token pooling): 14×14 patches and a class token plus learned positions; 24 pre-norm blocks (layer norms
with eps 1e-6); attention with separate q / k / v projections (biases on q and v only), a 2D rotary embedding on
q and k of the patch tokens (the first half of each head's channels turned by the patch's row, the second half
by its column, adjacent channel pairs rotated by ``position × 10000^(-2k / 32)`` with positions on a 16-cell
grid stretched over the 24 patches), a layer norm on the heads' output before the projection; a SwiGLU MLP
(``silu(w1 x) · w2 x``, a layer norm, ``w3``); the final norm, the class token, the head to 768.

The preprocessor, as the evaclip extension's: the face features (:mod:`.face_parsing`, 1×3×H×W in [0, 1])
resized to 336×336 bicubic (torchvision's tensor resize, which in the 0.15-0.16 releases that A1111 1.x and PuLID
pin does not antialias), normalized with OpenAI CLIP's mean and std, through the tower with the hidden states
taken at the inputs of blocks 4, 8, 12, 16 and 20 (EVA-CLIP's ``return_hidden``: blocks ``0 < i <= 20`` with
``i % 4 == 0``); ``id_cond_vit`` is the head's output over its length (1×768), ``id_vit_hidden`` the five
1×577×1024 states. xformers' attention is computed with torch's scaled dot-product attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network, compute_device, count_indexed

FILE = AnnotatorFile("EVA02_CLIP_L_336_psz14_s6B.pt", "evaclip",
                     "QuanSun/EVA-CLIP on the Hugging Face hub (EVA02_CLIP_L_336_psz14_s6B.pt)")
HF_CACHE_FOLDER = "models--QuanSun--EVA-CLIP"  # where hf_hub_download puts it (the evaclip extension's models/)
HEAD_DIM = 64
PT_GRID = 16  # the grid the rotary embedding was trained on (224 / 14)
THETA = 10000.0
EPS = 1e-6
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)
HIDDEN_EVERY, HIDDEN_LAST = 4, 20


def hidden_indices(depth: int) -> list[int]:
    """The blocks whose inputs are returned as hidden states."""
    return [i for i in range(depth) if 0 < i <= HIDDEN_LAST and i % HIDDEN_EVERY == 0]


def rotary_tables(grid: int, head_dim: int, pt_grid: int = PT_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ((grid², head_dim), row-major patches) of the 2D rotary embedding: the first half of the
    channels by the row, the second by the column, each frequency on two adjacent channels."""
    half = head_dim // 2
    freqs = THETA ** (-torch.arange(0, half, 2, dtype=torch.float32) / half)
    pos = torch.arange(grid, dtype=torch.float32) / grid * pt_grid
    angles = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, half)
    table = torch.cat([angles[:, None].expand(grid, grid, half), angles[None].expand(grid, grid, half)], dim=-1)
    table = table.reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each adjacent channel pair (a, b) turned by the table's angle: (a cos - b sin, b cos + a sin)."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + turned * sin


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = self.k_proj(x)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q = torch.cat([q[:, :, :1], rotate(q[:, :, 1:], cos, sin)], dim=2)  # the class token is not turned
        k = torch.cat([k[:, :, :1], rotate(k[:, :, 1:], cos, sin)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=EPS)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=EPS)
        self.mlp = SwiGLU(width, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class EVAVisionTransformer(nn.Module):
    """EVA02-CLIP's image tower (module docstring) under the file's names (without ``visual.``).
    ``forward(x)``: (the head's output B×out_dim, not normalized; the hidden states, each B×(1 + grid²)×width)."""

    def __init__(self, width: int = 1024, depth: int = 24, heads: int = 16, patch: int = 14, image_size: int = 336,
                 hidden: int = 2730, out_dim: int = 768, pt_grid: int = PT_GRID):
        super().__init__()
        if image_size % patch or width % heads or (width // heads) % 4:
            raise ValueError(f"EVA02 ViT: image {image_size} / patch {patch}, width {width} / {heads} heads")
        self.image_size, self.grid = image_size, image_size // patch
        self.patch_embed = PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=EPS)
        self.head = nn.Linear(width, out_dim)
        self.head_dim, self.pt_grid = width // heads, pt_grid
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # made on first use (the tower may be built on meta)

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            self._rope = tuple(t.to(device) for t in rotary_tables(self.grid, self.head_dim, self.pt_grid))
        return self._rope

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"EVA02 ViT takes {self.image_size}×{self.image_size} pictures, got {tuple(x.shape[2:])}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        cos, sin = self.rope(x.device)
        keep = set(hidden_indices(len(self.blocks)))
        hidden = []
        for i, block in enumerate(self.blocks):
            if i in keep:
                hidden.append(x)
            x = block(x, cos.to(x.dtype), sin.to(x.dtype))
        return self.head(self.norm(x)[:, 0]), hidden

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], head_dim: int = HEAD_DIM) -> EVAVisionTransformer:
        width = shapes["cls_token"][-1]
        patch = shapes["patch_embed.proj.weight"][-1]
        tokens = shapes["pos_embed"][1] - 1
        grid = math.isqrt(tokens)
        if grid * grid != tokens or width % head_dim:
            raise ModelFileError(f"not an EVA02 vision tower ({tokens} positions, width {width})")
        return cls(width=width, depth=count_indexed(shapes, r"blocks\.(\d+)\."), heads=width // head_dim, patch=patch,
                   image_size=grid * patch, hidden=shapes["blocks.0.mlp.w1.weight"][0], out_dim=shapes["head.weight"][0])


def visual_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's tensors of an EVA-CLIP checkpoint (``visual.`` dropped; a bare tower's are kept), without
    the rotary tables."""
    prefix = "visual." if any(k.startswith("visual.") for k in weights) else ""
    return {k[len(prefix):]: v for k, v in weights.items()
            if k.startswith(prefix) and not k.endswith(("freqs_cos", "freqs_sin"))}


def _build(weights: dict[str, torch.Tensor]) -> EVAVisionTransformer:
    shapes = {k: tuple(v.shape) for k, v in visual_weights(weights).items()}
    try:
        with torch.device("meta"):  # no random init of ~300M parameters: the file's tensors are assigned
            return EVAVisionTransformer.from_shapes(shapes)
    except KeyError as exc:
        raise ModelFileError(f"not an EVA02-CLIP image tower (no visual.{exc.args[0]} among its tensors)") from None
    except (IndexError, ValueError) as exc:
        raise ModelFileError(f"not an EVA02-CLIP image tower ({exc})") from None


def load(path: Path) -> EVAVisionTransformer:
    return cached_network(Path(path), "eva02_clip", _build, wrappers=("state_dict", "model", "module"),
                          convert=visual_weights)


def find_file(annotators_dir: Path, *folders: Path, where: str = "EVA02-CLIP-L-14-336") -> Path:
    """The checkpoint: in ``<annotators>/evaclip/`` or ``<annotators>/`` (:data:`FILE`), else in any of ``folders``,
    directly or in a Hugging Face cache there (``models--QuanSun--EVA-CLIP/snapshots/*/``, the evaclip extension's
    ``models`` folder); a missing file is a :class:`ControlNetError` saying where to put it."""
    for folder in folders:
        folder = Path(folder)
        for path in [folder / FILE.name, *sorted((folder / HF_CACHE_FOLDER / "snapshots").glob(f"*/{FILE.name}"))]:
            if path.is_file():
                return path
    return FILE.locate(annotators_dir, where)


@dataclass
class EvaClipResult:
    """What ``ip-adapter_pulid`` takes from the tower: the normalized embedding (B×768) and the hidden states."""

    id_cond_vit: torch.Tensor
    id_vit_hidden: list[torch.Tensor]


def prepare(model: EVAVisionTransformer, image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The tower's input: B×3×H×W in [0, 1] (or an H×W×3 uint8 picture) resized bicubic to the tower's size
    (not antialiased), normalized with CLIP's mean and std, float32 on the tower's device."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).float().div(255.0).permute(2, 0, 1)[None]
    device = model.pos_embed.device
    x = image.to(device, torch.float32)
    size = (model.image_size, model.image_size)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=False)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(STD, device=device).view(1, 3, 1, 1)


@torch.no_grad()
def encode(model: EVAVisionTransformer, image: torch.Tensor | np.ndarray) -> EvaClipResult:
    """The evaclip extension's preprocessor on face features (see :func:`prepare`)."""
    pooled, hidden = model(prepare(model, image))
    return EvaClipResult(pooled / torch.norm(pooled, 2, 1, True), hidden)


def run(annotators_dir: Path, image: torch.Tensor | np.ndarray, *folders: Path,
        where: str = "EVA02-CLIP-L-14-336") -> EvaClipResult:
    """:func:`encode` with the checkpoint found by :func:`find_file`, on the compute device."""
    model = load(find_file(annotators_dir, *folders, where=where))
    return encode(model.to(compute_device()), image)
