"""Random-weight live preview decoder files in their real layouts, for tests and benchmarks.

:func:`reference_decoder` is madebyollin's TAESD decoder as its files describe it: an ``nn.Sequential`` whose
module 0 is the clamp, then the latent convolution, plain residual blocks and nearest 2× upsampling (output in
[0, 1]); its state dict has his key names (``1.weight``, ``3.conv.0.weight``...). The loader
(:mod:`sdstudio.models.taesd`) must give the same pixels from such a file. Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def reference_decoder(latent_channels: int = 4, width: int = 64, blocks: tuple[int, ...] = (3, 3, 3, 1),
                      seed: int = 0) -> nn.Sequential:
    """madebyollin's ``Decoder()`` (64 wide, 3-3-3-1 blocks: his published size) with random weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [Clamp(), nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU()]
    for i, n in enumerate(blocks):
        layers += [Block(width) for _ in range(n)]
        if i < len(blocks) - 1:
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1, bias=False)]
    layers.append(nn.Conv2d(width, 3, 3, padding=1))
    return nn.Sequential(*layers).eval()


def write_state(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """``state`` as a .safetensors file, or pickled by torch for any other suffix (.pth, .pt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    else:
        torch.save(state, path)
    return path
