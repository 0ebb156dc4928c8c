"""The T2I style adapter (TencentARC's ``t2iadapter_style_sd14v1.pth``): a few transformer layers that turn the
hidden states of a CLIP image encoder into context tokens, which sd-webui-controlnet appends to the prompt's.

Module names are the file's own (``style_embedding``, ``ln_pre``, ``transformer_layes.N.attn.in_proj_weight``,
``ln_1``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_2``, ``ln_post``, ``proj``), so the file loads without renaming.
Shapes give the widths, the layer and token counts; the head count is not in the file: 8 for the published
1024-wide adapter (the extension's fixed config), ``width // 128`` otherwise.

Forward: the image encoder's last hidden states (N, L, width) with the learned style tokens appended, LayerNorm,
the residual attention layers (pre-norm attention and a QuickGELU MLP, as CLIP's), LayerNorm of the style
tokens' rows, ``@ proj`` → (N, tokens, context width). LayerNorms compute in float32.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from .errors import ModelFileError

Shapes = Mapping[str, tuple[int, ...]]
PUBLISHED_WIDTH, PUBLISHED_HEADS = 1024, 8


def heads_for(width: int) -> int:
    return PUBLISHED_HEADS if width == PUBLISHED_WIDTH else max(1, width // 128)


def style_config(shapes: Shapes) -> dict:
    """``{width, context_dim, heads, layers, tokens}`` from a style adapter's ``{key: shape}``."""
    embedding = shapes.get("style_embedding")
    proj = shapes.get("proj")
    if embedding is None or len(embedding) != 3 or proj is None or len(proj) != 2:
        raise ModelFileError("T2I style adapter without style_embedding (1, tokens, width) and proj (width, context)")
    _, tokens, width = embedding
    if proj[0] != width:
        raise ModelFileError(f"T2I style adapter: proj is {proj}, its first size must be the width {width}")
    layers = len({k.split(".")[1] for k in shapes if k.startswith("transformer_layes.")})
    if layers == 0:
        raise ModelFileError("T2I style adapter without transformer_layes")
    return {"width": width, "context_dim": proj[1], "heads": heads_for(width), "layers": layers, "tokens": tokens}


class _LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = _LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = _LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    def __init__(self, width: int = 1024, context_dim: int = 768, heads: int = 8, layers: int = 3, tokens: int = 8):
        super().__init__()
        self.tokens = tokens
        self.transformer_layes = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.style_embedding = nn.Parameter(torch.zeros(1, tokens, width))
        self.ln_post = _LayerNorm(width)
        self.ln_pre = _LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, context_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        style = self.style_embedding.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([hidden, style], dim=1))
        x = self.transformer_layes(x)
        return self.ln_post(x[:, -self.tokens:, :]) @ self.proj
