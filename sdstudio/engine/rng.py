"""Seeded noise exactly as A1111 draws it.

Sources:
- ``CPU``: torch's CPU generator (``torch.manual_seed(seed); torch.randn(shape)``) — the same on any machine.
- ``NV``: a CPU re-implementation of what ``torch.randn`` gives on an NVIDIA GPU: Philox 4x32-10 with
  counter ``(offset, 0, index, 0)`` and key = the seed's two 32-bit halves, one Box-Muller output per
  number. It lets a CPU reproduce images made with A1111 on an NVIDIA card.
- ``GPU``: ``torch.randn`` on the CUDA device when there is one; elsewhere the NV imitation of it.

A :class:`NoiseGenerator` keeps drawing from one seed's stream, as A1111's per-image generators do for
ancestral samplers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)
_MASK32 = np.uint64(0xFFFFFFFF)


def _mulhilo(a: np.ndarray, m: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    product = a.astype(np.uint64) * m
    return (product >> np.uint64(32)).astype(np.uint32), (product & _MASK32).astype(np.uint32)


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32 on columns: ``counter`` is (4, n) uint32, ``key`` is (2, n) uint32."""
    c = counter.copy()
    k = key.copy()
    with np.errstate(over="ignore"):
        for i in range(rounds):
            hi0, lo0 = _mulhilo(c[0], _PHILOX_M[0])
            hi1, lo1 = _mulhilo(c[2], _PHILOX_M[1])
            c = np.stack([hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0])
            if i < rounds - 1:
                k = np.stack([k[0] + _PHILOX_W[0], k[1] + _PHILOX_W[1]])
    return c


def _box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    u = x * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """The NV source: each call draws a fresh block of numbers at the next counter offset."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(np.prod(shape))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.empty((2, n), dtype=np.uint32)
        key[0] = self.seed & 0xFFFFFFFF
        key[1] = (self.seed >> 32) & 0xFFFFFFFF
        out = philox4x32(counter, key)
        return torch.from_numpy(_box_muller(out[0], out[1]).reshape(shape))


class NoiseGenerator:
    """One image's noise stream for a given source; ``randn`` continues the stream."""

    def __init__(self, seed: int, source: str = "CPU", device: torch.device | None = None):
        self.source = source
        self.device = device or torch.device("cpu")
        if source == "GPU" and self.device.type == "cuda":
            self._torch = torch.Generator(device=self.device).manual_seed(int(seed))
            self._philox = None
        elif source in ("NV", "GPU"):
            self._torch, self._philox = None, PhiloxGenerator(seed)
        elif source == "CPU":
            self._torch, self._philox = torch.Generator(device="cpu").manual_seed(int(seed)), None
        else:
            raise ValueError(f"unknown RNG source {source!r}; use GPU, CPU or NV")

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """float32 noise on the CPU (CUDA source: on the device)."""
        if self._philox is not None:
            return self._philox.randn(tuple(shape))
        return torch.randn(tuple(shape), generator=self._torch, device=self._torch.device, dtype=torch.float32)


def randn(seed: int, shape: tuple[int, ...], source: str = "CPU") -> torch.Tensor:
    """The first latent noise A1111 draws for ``seed`` (float32, on the CPU)."""
    return NoiseGenerator(seed, source).randn(tuple(shape)).cpu()


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed blend of two noise tensors (norms taken along dim 1, as A1111 does)."""
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * low + \
        (torch.sin(strength * omega) / so).unsqueeze(1) * high


def image_noise(seed: int, shape: tuple[int, int, int], *, source: str = "CPU", subseed: int = 0,
                subseed_strength: float = 0.0, resize_from: tuple[int, int] | None = None,
                device: torch.device | None = None) -> tuple[torch.Tensor, NoiseGenerator]:
    """Initial latent noise for one image plus the generator that continues its stream.

    ``shape`` is (channels, height/8, width/8). ``resize_from`` (width, height in pixels) draws the
    noise at the old size and pastes it centred into the new one ("Resize seed from").
    """
    gen = NoiseGenerator(seed, source, device)
    noise_shape = shape
    if resize_from and resize_from[0] > 0 and resize_from[1] > 0:
        noise_shape = (shape[0], resize_from[1] // 8, resize_from[0] // 8)
    sub = None
    if subseed_strength != 0:
        sub = NoiseGenerator(subseed, source, device).randn(noise_shape)
    noise = gen.randn(noise_shape) if noise_shape == shape else NoiseGenerator(seed, source, device).randn(noise_shape)
    if sub is not None:
        noise = slerp(subseed_strength, noise, sub.to(noise.device))
    if noise_shape != shape:
        x = gen.randn(shape)
        dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx, ty = max(dx, 0), max(dy, 0)
        sx, sy = max(-dx, 0), max(-dy, 0)
        x[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
        noise = x
    return noise, gen


class BrownianNoise:
    """Noise for the SDE samplers: one seeded Brownian tree per image over [sigma_min, sigma_max]
    (torchsde), sampled as increments, so the noise does not depend on the step count."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int]):
        import torchsde

        positive = sigmas[sigmas > 0]
        self.t0, self.t1 = positive.min().float(), sigmas.max().float()
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(self.t0, w0, self.t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = torch.as_tensor(sigma).float(), torch.as_tensor(sigma_next).float()
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        lo, hi = torch.clamp(lo, self.t0, self.t1), torch.clamp(hi, self.t0, self.t1)
        with warnings.catch_warnings():  # torchsde compares float32 ends in float64 and warns at the edges
            warnings.filterwarnings("ignore", message="Should have")
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return w / (b - a).abs().sqrt()
