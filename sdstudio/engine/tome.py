"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023), A1111's "Token merging ratio".

In the self-attention of the UNet's highest-resolution transformer blocks, similar tokens are merged
before the attention and copied back after it, so the attention (quadratic in the token count) works on
fewer tokens. The algorithm is the paper's bipartite soft matching on a 2D grid, with the settings A1111
runs it with (``modules/sd_models.apply_token_merging``): blocks at most ``max_downsample = 1`` levels
down (the full latent resolution), strides ``sx = sy = 2``, only the self-attention merged (not the
cross-attention, not the feed-forward), and no random choice of the destination tokens (A1111 passes
``use_rand=False``: the top-left token of every 2×2 cell is a destination).

For one block with input ``x`` (B×N×C, N = h·w tokens) and ratio ``q``:

1. the grid is cut into ``sy × sx`` cells; one token per cell is a destination (``dst``), the rest are
   sources (``src``);
2. each source's best match is the destination with the highest cosine similarity of their ``x``;
3. the ``r = int(N · q)`` sources with the best matches (at most all of them) are merged into their
   destinations (the mean of the destination and the sources merged into it); the others stay;
4. the block's self-attention runs on the N - r tokens (its input is the normalised ``x``, merged the
   same way), and each output token is copied back to every token merged into it.

The matching is computed on the block's input (as tomesd does), taken by a forward pre-hook on the
transformer block; the merge and unmerge are an attention processor wrapped around the one the layer had,
so whatever attention implementation runs (SDPA, a plug-in's) keeps running on the merged tokens. Nothing
is patched: ``applied(unet)`` installs the processors and hooks for one pass and removes them after.

``use_rand=True`` (tomesd's own default, not A1111's) picks each cell's destination at random; the choices
come from one generator per image, seeded from the image's seed, so a picture is the same alone or in a
batch and from run to run. As in tomesd, an image whose rows in a UNet call are odd in number (its
negative prompt not in the same call) gets no random choice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch

from .hooks import StepHook, UNetCall

Merge = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def destination_choice(batch: int, h: int, w: int, sx: int, sy: int,
                       generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Per row, which token of each ``sy × sx`` cell is the destination: ``[B, h // sy, w // sx]`` in
    ``[0, sx·sy)``. A row without a generator takes token 0 (the top-left one)."""
    hsy, wsx = h // sy, w // sx
    rows = []
    for g in generators or [None] * batch:
        rows.append(torch.zeros(hsy, wsx, dtype=torch.int64) if g is None else
                    torch.randint(sy * sx, (hsy, wsx), generator=g))
    return torch.stack(rows)


def bipartite_soft_matching_2d(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int,
                               choice: torch.Tensor | None = None) -> tuple[Merge, Merge]:
    """The (merge, unmerge) pair for tokens ``metric`` (B×N×C, N = h·w in row-major order): ``r`` source
    tokens merged into the destinations ``choice`` names (see :func:`destination_choice`; None: the
    top-left token of each cell, for every row)."""
    b, n, _ = metric.shape
    if r <= 0:
        return _identity, _identity
    hsy, wsx = h // sy, w // sx
    device = metric.device
    if choice is None:
        choice = torch.zeros(1, hsy, wsx, dtype=torch.int64)
    rows = choice.shape[0]
    cells = torch.zeros(rows, hsy, wsx, sy * sx, dtype=torch.int64)
    cells.scatter_(3, choice[..., None], -1)  # -1 marks the destination of each cell
    grid = cells.view(rows, hsy, wsx, sy, sx).transpose(2, 3).reshape(rows, hsy * sy, wsx * sx)
    if hsy * sy < h or wsx * sx < w:  # the ragged last row / column of cells: all sources
        full = torch.zeros(rows, h, w, dtype=torch.int64)
        full[:, :hsy * sy, :wsx * sx] = grid
        grid = full
    order = grid.reshape(rows, n).argsort(dim=1, stable=True)[..., None].to(device)  # destinations first
    num_dst = hsy * wsx
    a_idx, b_idx = order[:, num_dst:], order[:, :num_dst]  # sources, destinations

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[-1]
        return (x.gather(1, a_idx.expand(x.shape[0], n - num_dst, c)),
                x.gather(1, b_idx.expand(x.shape[0], num_dst, c)))

    with torch.no_grad():
        normed = metric / metric.norm(dim=-1, keepdim=True)
        a, bb = split(normed)
        scores = a @ bb.transpose(-1, -2)
        r = min(a.shape[1], r)
        node_max, node_idx = scores.max(dim=-1)
        edges = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx, src_idx = edges[:, r:], edges[:, :r]  # sources that stay, sources merged
        dst_idx = node_idx[..., None].gather(1, src_idx)  # where each merged source goes
    a_full = a_idx.expand(b, n - num_dst, 1)
    unm_pos, src_pos = a_full.gather(1, unm_idx), a_full.gather(1, src_idx)  # their places in the grid

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        rows_, t1, c = src.shape
        unm = src.gather(1, unm_idx.expand(rows_, t1 - r, c))
        moved = src.gather(1, src_idx.expand(rows_, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(rows_, r, c), moved, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[:, :unm_len], x[:, unm_len:]
        c = x.shape[-1]
        src = dst.gather(1, dst_idx.expand(b, r, c))
        out = torch.zeros(b, n, c, device=x.device, dtype=x.dtype)
        out.scatter_(1, b_idx.expand(b, num_dst, c), dst)
        out.scatter_(1, unm_pos.expand(b, unm_len, c), unm)
        out.scatter_(1, src_pos.expand(b, r, c), src)
        return out

    return merge, unmerge


def transformer_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's transformer blocks with a self-attention (diffusers' ``BasicTransformerBlock``)."""
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock) and not m.only_cross_attention]


class _MergedSelfAttention:
    """The processor of a merged block's ``attn1``: merge, the processor it replaced, unmerge."""

    def __init__(self, owner: TokenMerging, attn: torch.nn.Module, inner):
        self.owner, self.attn, self.inner = owner, attn, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        merge, unmerge = self.owner.pairs.pop(id(self.attn), (_identity, _identity))
        if encoder_hidden_states is not None or attention_mask is not None:  # not a plain self-attention
            merge, unmerge = _identity, _identity
        out = self.inner(attn, merge(hidden_states), encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, **kwargs)
        return unmerge(out)


class TokenMerging(StepHook):
    """ToMe for one sampling pass (see the module's docstring). ``seeds``: one per image of the batch, for
    ``use_rand``'s generators."""

    owner = "Token merging"

    def __init__(self, ratio: float, *, max_downsample: int = 1, sx: int = 2, sy: int = 2, use_rand: bool = False,
                 seeds: Sequence[int] = ()):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"token merging ratio must be from 0 to below 1, got {ratio!r}")
        self.ratio, self.max_downsample, self.sx, self.sy, self.use_rand = ratio, max_downsample, sx, sy, use_rand
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.size: tuple[int, int] | None = None  # the latent's (h, w) of the UNet call under way
        self.rows: list[int] | None = None  # per row of the UNet call under way: its image
        self.pairs: dict[int, tuple[Merge, Merge]] = {}  # id(attn1) -> this block call's merge / unmerge
        self.merged_tokens: list[tuple[int, int]] = []  # (tokens in, tokens attended) per merged block call

    def unet_inputs(self, call: UNetCall):
        self.rows = list(call.images)

    def _choice(self, batch: int, h: int, w: int) -> torch.Tensor | None:
        if not self.use_rand:
            return None
        rows = self.rows if self.rows is not None and len(self.rows) == batch else [0] * batch
        drawn: dict[int, torch.Tensor] = {}
        for image in dict.fromkeys(rows):
            g = self.generators[image] if image < len(self.generators) else None
            if g is not None and rows.count(image) % 2 == 0:  # tomesd: no random choice for odd batches
                drawn[image] = destination_choice(1, h, w, self.sx, self.sy, [g])[0]
        if not drawn:
            return None
        zero = destination_choice(1, h, w, self.sx, self.sy)[0]
        return torch.stack([drawn.get(image, zero) for image in rows])

    def _block_input(self, block: torch.nn.Module):
        def hook(module, args, kwargs):
            self.pairs.pop(id(block.attn1), None)
            x = args[0] if args else kwargs.get("hidden_states")
            if x is not None and x.ndim == 3 and self.size is not None:
                self._prepare(block.attn1, x)

        return hook

    def _prepare(self, attn: torch.nn.Module, x: torch.Tensor) -> None:
        """tomesd's ``compute_merge``: a block at most ``max_downsample`` levels down merges ``int(N · ratio)``."""
        height, width = self.size
        tokens = x.shape[1]
        downsample = math.ceil(math.sqrt(height * width // tokens)) if tokens else 0
        if downsample == 0 or downsample > self.max_downsample:
            return
        h, w = math.ceil(height / downsample), math.ceil(width / downsample)
        r = int(tokens * self.ratio)
        if h * w != tokens or r <= 0:
            return
        self.pairs[id(attn)] = bipartite_soft_matching_2d(x, w, h, self.sx, self.sy, r,
                                                          self._choice(x.shape[0], h, w))
        self.merged_tokens.append((tokens, tokens - min(r, tokens - (h // self.sy) * (w // self.sx))))

    def _unet_input(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self.size = tuple(sample.shape[-2:])

    @contextlib.contextmanager
    def applied(self, unet):
        if self.ratio <= 0.0:
            yield
            return
        blocks = transformer_blocks(unet)
        handles, swapped = [unet.register_forward_pre_hook(self._unet_input, with_kwargs=True)], []
        try:
            for block in blocks:
                handles.append(block.register_forward_pre_hook(self._block_input(block), with_kwargs=True))
                inner = block.attn1.processor
                block.attn1.set_processor(_MergedSelfAttention(self, block.attn1, inner))
                swapped.append((block.attn1, inner))
            yield
        finally:
            for attn, inner in reversed(swapped):
                if isinstance(attn.processor, _MergedSelfAttention) and attn.processor.owner is self:
                    attn.set_processor(inner)
            for handle in handles:
                handle.remove()
            self.pairs.clear()
            self.size = self.rows = None
