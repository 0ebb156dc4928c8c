"""ControlNet-LLLite (kohya-ss): small per-layer networks that nudge the inputs of a UNet's attention projections
by the control image, as sd-webui-controlnet loads them (``kohya_controllllite_xl_*.safetensors``).

A file holds one module per projection, named after the LDM UNet's layer (``lllite_unet_input_blocks_4_1_
transformer_blocks_0_attn1_to_q``), each with ``conditioning1`` (the control image down to the latent's size
or smaller: a 4×4 stride-4 convolution, then a 2×2 stride-2 one at depth 1, 4×4 stride-4 at depth 2, both at
depth 3), ``down`` (the projection's input to ``mlp_dim``), ``mid`` (the two concatenated) and ``up`` (back to
the input's width); linear layers for a transformer's tokens, 1×1 convolutions for conv projections. Module
names are the file's, so a file loads as it is (:class:`LLLite` is a ``ModuleDict`` of them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .errors import ModelFileError

PREFIX = "lllite_unet_"
_NAME = re.compile(r"lllite_unet_(input|output|middle)_blocks?_(\d+)_1_transformer_blocks_(\d+)_(attn[12])_to_(q|k|v|out_0)$")


class LLLiteModule(nn.Module):
    def __init__(self, conv: bool, in_dim: int, depth: int, cond_emb_dim: int, mlp_dim: int):
        super().__init__()
        half = cond_emb_dim // 2
        layers: list[nn.Module] = [nn.Conv2d(3, half, 4, 4)]
        if depth == 1:
            layers += [nn.ReLU(), nn.Conv2d(half, cond_emb_dim, 2, 2)]
        elif depth == 2:
            layers += [nn.ReLU(), nn.Conv2d(half, cond_emb_dim, 4, 4)]
        elif depth == 3:
            layers += [nn.ReLU(), nn.Conv2d(half, half, 4, 4), nn.ReLU(), nn.Conv2d(half, cond_emb_dim, 2, 2)]
        else:
            raise ValueError(f"LLLite depth must be 1-3, not {depth}")
        self.conditioning1 = nn.Sequential(*layers)
        self.conv, self.depth = conv, depth
        if conv:
            self.down = nn.Sequential(nn.Conv2d(in_dim, mlp_dim, 1), nn.ReLU())
            self.mid = nn.Sequential(nn.Conv2d(mlp_dim + cond_emb_dim, mlp_dim, 1), nn.ReLU())
            self.up = nn.Sequential(nn.Conv2d(mlp_dim, in_dim, 1))
        else:
            self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU())
            self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), nn.ReLU())
            self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim))

    def condition(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The control image (1, 3, H, W) in -1…1 embedded and brought to ``size`` (the layer's h, w) by
        nearest-exact interpolation; tokens (1, h·w, C) for a linear module."""
        cx = self.conditioning1(image)
        if tuple(cx.shape[-2:]) != tuple(size):
            cx = nn.functional.interpolate(cx, size, mode="nearest-exact")
        if not self.conv:
            cx = cx.flatten(2).transpose(1, 2)
        return cx

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The nudge for input ``x`` (rows share ``cond``, the embedded control image)."""
        cond = cond.expand(x.shape[0], *cond.shape[1:])
        return self.up(self.mid(torch.cat([cond, self.down(x)], dim=1 if self.conv else 2)))


class LLLite(nn.ModuleDict):
    """Every module of a file, under its name."""


def layer_of(name: str) -> tuple[str, int, int, str, str]:
    """(root, block, transformer, attention, projection) of a module name: ``input``/``output``/``middle``, the
    LDM block number, the transformer block, ``attn1``/``attn2``, ``q``/``k``/``v``/``out_0``."""
    m = _NAME.match(name.replace("middle_block_", "middle_blocks_0_"))
    if m is None:
        raise ModelFileError(f"LLLite module {name!r} does not name an attention projection of the UNet")
    root, block, transformer, attn, proj = m.groups()
    return root, int(block), int(transformer), attn, proj


def build(shapes: Mapping[str, tuple[int, ...]]) -> LLLite:
    """An :class:`LLLite` with a module per name in ``{key: shape}`` (the extension's reading of depth, widths
    and kind from the shapes)."""
    names = sorted({k.split(".", 1)[0] for k in shapes})
    out = LLLite()
    for name in names:
        layer_of(name)  # a name that fits no layer is refused before anything is built

        def shape(key: str, name: str = name) -> tuple[int, ...]:
            found = shapes.get(f"{name}.{key}")
            if found is None:
                raise ModelFileError(f"LLLite module {name}: no {key}")
            return tuple(found)

        if f"{name}.conditioning1.4.weight" in shapes:
            depth = 3
        else:
            depth = 2 if shape("conditioning1.2.weight")[-1] == 4 else 1
        down = shape("down.0.weight")
        out[name] = LLLiteModule(conv=len(down) == 4, in_dim=down[1], depth=depth,
                                 cond_emb_dim=shape("conditioning1.0.weight")[0] * 2, mlp_dim=down[0])
    return out


def is_lllite(keys) -> bool:
    return any(str(k).startswith(PREFIX) for k in keys)
