"""CodeFormer (``codeformer-v0.1.0.pth``, A1111's default face restorer), built without basicsr.

A VQGAN encoder reads a 512² aligned face down to 16×16 features; a transformer predicts, for each of the
256 places, which of the codebook's entries belongs there; the codebook entries (their statistics matched
to the encoder's features) go through the VQGAN generator back to 512². ``fidelity`` (A1111's "CodeFormer
weight", w) mixes the encoder's features into the generator at 32–256 px through learnt scale-and-shift
blocks: 0 gives the codebook's face, 1 stays closest to the input. Module names are those of the published
file, so its ``params_ema`` loads strictly; the widths are read from the file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSED_SIZES = (32, 64, 128, 256)  # where the encoder's features may enter the generator


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if c % 32 == 0 else 1, c, eps=1e-6)


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.conv_out = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_out(x) if self.conv_out is not None else x)


class _Attn(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class _Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Blocks(nn.Module):
    """A flat list of blocks (the files' ``encoder.blocks.N`` / ``generator.blocks.N``) and, per side
    length, the index after which the features are taken (encoder) or fused (generator)."""

    def __init__(self, blocks: list[nn.Module], taps: dict[int, int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.taps = taps


def _encoder(nf: int, mult: list[int], emb: int, size: int = 512) -> _Blocks:
    blocks: list[nn.Module] = [nn.Conv2d(3, nf, 3, 1, 1)]
    taps = {}
    cin, side = nf, size
    for i, m in enumerate(mult):
        for _ in range(2):
            blocks.append(_Res(cin, nf * m))
            cin = nf * m
            taps[side] = len(blocks) - 1  # after the level's last residual block
            if side == 16:
                blocks.append(_Attn(cin))
        if i != len(mult) - 1:
            blocks.append(_Down(cin))
            side //= 2
    blocks += [_Res(cin, cin), _Attn(cin), _Res(cin, cin), _norm(cin), nn.Conv2d(cin, emb, 3, 1, 1)]
    return _Blocks(blocks, taps)


def _generator(nf: int, mult: list[int], emb: int, size: int = 512) -> _Blocks:
    cin = nf * mult[-1]
    side = size // 2 ** (len(mult) - 1)
    blocks: list[nn.Module] = [nn.Conv2d(emb, cin, 3, 1, 1), _Res(cin, cin), _Attn(cin), _Res(cin, cin)]
    taps = {}
    for i in reversed(range(len(mult))):
        for j in range(2):
            blocks.append(_Res(cin, nf * mult[i]))
            cin = nf * mult[i]
            if j == 0:
                taps[side] = len(blocks) - 1  # after the level's first residual block
            if side == 16:
                blocks.append(_Attn(cin))
        if i != 0:
            blocks.append(_Up(cin))
            side *= 2
    blocks += [_norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)]
    return _Blocks(blocks, taps)


class _TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.linear1, self.linear2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, pos):
        h = self.norm1(x)
        x = x + self.self_attn(h + pos, h + pos, value=h, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class _Fuse(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.encode_enc = _Res(2 * c, c)
        self.scale = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))
        self.shift = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, enc, dec, w: float):
        enc = self.encode_enc(torch.cat([enc, dec], 1))
        return dec + w * (dec * self.scale(enc) + self.shift(enc))


def _adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``content`` with each channel's mean and standard deviation replaced by ``style``'s."""
    def stats(t):
        flat = t.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]

    cm, cs = stats(content)
    sm, ss = stats(style)
    return (content - cm) / cs * ss + sm


class CodeFormer(nn.Module):
    def __init__(self, nf: int = 64, mult: tuple[int, ...] = (1, 2, 2, 4, 4, 8), emb: int = 256,
                 codebook: int = 1024, dim: int = 512, heads: int = 8, layers: int = 9):
        super().__init__()
        self.encoder = _encoder(nf, list(mult), emb)
        self.generator = _generator(nf, list(mult), emb)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codebook, emb)
        self.position_emb = nn.Parameter(torch.zeros(256, dim))
        self.feat_emb = nn.Linear(emb, dim)
        self.ft_layers = nn.Sequential(*(_TransformerLayer(dim, heads, dim * 2) for _ in range(layers)))
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, codebook, bias=False))
        sides = {512 // 2 ** i: nf * m for i, m in enumerate(mult)}
        self.fuse_convs_dict = nn.ModuleDict({str(s): _Fuse(sides[s]) for s in FUSED_SIZES})

    def forward(self, x: torch.Tensor, fidelity: float = 0.5) -> torch.Tensor:
        """Faces in [-1, 1] (N×3×512×512, RGB) to restored faces (not clamped)."""
        taps = {}
        tap_at = {i: s for s, i in self.encoder.taps.items() if s in FUSED_SIZES}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in tap_at:
                taps[tap_at[i]] = x
        lq = x
        b = x.shape[0]
        query = self.feat_emb(lq.flatten(2).permute(2, 0, 1))  # (places, batch, dim)
        pos = self.position_emb[:, None].expand(-1, b, -1)
        for layer in self.ft_layers:
            query = layer(query, pos)
        codes = self.idx_pred_layer(query).argmax(-1).permute(1, 0)  # (batch, places)
        side = lq.shape[-1]
        x = self.quantize.embedding(codes).view(b, side, side, -1).permute(0, 3, 1, 2)
        x = _adain(x, lq)  # A1111 runs CodeFormer with adain=True
        fuse_at = {i: s for s, i in self.generator.taps.items() if s in FUSED_SIZES}
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in fuse_at and fidelity > 0:
                s = fuse_at[i]
                x = self.fuse_convs_dict[str(s)](taps[s], x, fidelity)
        return x

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> CodeFormer:
        if "quantize.embedding.weight" not in sd or "fuse_convs_dict.32.scale.0.weight" not in sd:
            raise KeyError("not a CodeFormer network")
        nf = sd["encoder.blocks.0.weight"].shape[0]
        codebook, emb = sd["quantize.embedding.weight"].shape
        dim = sd["feat_emb.weight"].shape[0]
        layers = len({k.split(".")[1] for k in sd if k.startswith("ft_layers.")})
        widths = [sd[k].shape[0] for k in sorted((k for k in sd if k.startswith("encoder.blocks.")
                                                  and k.endswith(".conv2.weight")),
                                                 key=lambda k: int(k.split(".")[2]))]
        mult = tuple(w // nf for w in widths[:-2][::2])  # two residual blocks per level, then the middle's two
        heads = 8 if dim % 8 == 0 else 1
        model = cls(nf, mult, emb, codebook, dim, heads, layers)
        model.load_state_dict(sd, strict=True)
        return model.eval()
