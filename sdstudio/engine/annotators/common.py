"""What every weight-based preprocessor shares: finding its file, reading it safely, building the network
once per process, and the image steps the extension applies around each network.

Files are the published annotator files (lllyasviel/Annotators and the other sources the extension downloads
from), looked for in ``annotators_dir/<subfolder>/<file>`` (the extension's ``annotator/downloads`` layout)
and then in ``annotators_dir/<file>``; a ``.safetensors`` copy under the same stem is accepted too. Nothing
downloads: a missing file is a :class:`ControlNetError` saying which file to put in which folder.

Networks run on CUDA when it is there, else on the CPU, in float32 (the extension's precision for them).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from ...core.controlnet import ControlNetError
from ...models.errors import ModelFileError
from ...models.safe_load import load_pickle, open_safetensors
from ..preprocessors import hwc3, resize_with_pad  # noqa: F401 - the extension's frame, shared with the weight-free

HUB = "lllyasviel/Annotators on the Hugging Face hub"


@dataclass(frozen=True)
class AnnotatorFile:
    """One published file: its name, the extension's subfolder for it and where people get it."""

    name: str
    subfolder: str
    source: str = HUB
    also: tuple[str, ...] = ()  # other published names of the same weights (e.g. the original .pth)
    safetensors: bool = True  # a .safetensors copy under the same stem is accepted (not for ONNX graphs)

    def candidates(self, folder: Path) -> list[Path]:
        out = []
        for base in (folder / self.subfolder, folder):
            for name in (self.name, *self.also):
                paths = [base / name] + ([base / f"{Path(name).stem}.safetensors"] if self.safetensors else [])
                out += [path for path in paths if path not in out]
        return out

    def locate(self, folder: Path, module: str) -> Path:
        for path in self.candidates(Path(folder)):
            if path.is_file():
                return path
        raise ControlNetError(
            f"{module} needs {self.name}: put {self.name} in {Path(folder) / self.subfolder} (or in {folder}); "
            f"get it from {self.source}")


def compute_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def read_weights(path: Path, wrappers: Iterable[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """The tensors of a file, through the safe loader; a training checkpoint's weights are taken from the first
    of ``wrappers`` it has, and a DataParallel ``module.`` prefix is dropped."""
    if path.suffix.lower() == ".safetensors":
        lazy = open_safetensors(path)
        data: dict = {k: lazy[k] for k in lazy}
    else:
        data = load_pickle(path)
        if not isinstance(data, dict):
            raise ModelFileError(f"{path.name}: not a state dict (a {type(data).__name__})")
        for wrapper in wrappers:
            inner = data.get(wrapper)
            if isinstance(inner, dict):
                data = inner
                break
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    if not tensors:
        raise ModelFileError(f"{path.name}: holds no weights")
    return tensors


def load_into(net: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Strict loading, except BatchNorm's ``num_batches_tracked`` counters (unused in eval) may be absent; a
    file whose keys or shapes differ is a ModelFileError naming the file and the first differences."""
    own = net.state_dict()
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in own]
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(own[k].shape)})" for k in own
             if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{label}: {', '.join(items[:4])}{' …' if len(items) > 4 else ''}")
        raise ModelFileError(f"{path.name}: not the expected network ({'; '.join(parts)})")
    on_meta = any(t.is_meta for t in net.state_dict().values())  # built without memory: take the file's tensors
    net.load_state_dict(weights, strict=False, assign=on_meta)
    return net.eval()


_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def cached(path: Path, kind: str, build: Callable[[Path], object]) -> object:
    """``build(path)`` on first use, then kept for the process (a file replaced on disk is built again), for
    what is not a torch network of weights (an ONNX session)."""
    stat = path.stat()
    key = (kind, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        found = _CACHE.get(key)
        if found is None:
            for old in [k for k in _CACHE if k[:2] == key[:2]]:
                del _CACHE[old]
            found = _CACHE[key] = build(path)
        return found


def cached_network(path: Path, kind: str, build: Callable[[dict[str, torch.Tensor]], nn.Module],
                   wrappers: Iterable[str] = ("state_dict", "model"),
                   convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """The network of ``path`` built by ``build(weights)`` and loaded with the weights (renamed by ``convert``
    first, for a network whose names differ from the file's), on first use, then kept for the process (a file
    replaced on disk is read again). The lock makes concurrent first calls load it once."""
    stat = path.stat()
    key = (kind, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        net = _CACHE.get(key)
        if net is None:
            for old in [k for k in _CACHE if k[:2] == key[:2]]:
                del _CACHE[old]
            weights = read_weights(path, wrappers)
            try:
                net = build(weights)
            except ModelFileError as exc:  # the builder read the shapes: say which file they came from
                message = str(exc)
                raise ModelFileError(message if message.startswith(path.name) else f"{path.name}: {message}") from None
            if convert is not None:
                weights = convert(weights)
            net = load_into(net, weights, path).to(compute_device(), torch.float32)
            _CACHE[key] = net
        return net


def clear_cache() -> None:
    """Drop every loaded network (frees their memory; the next run loads again)."""
    with _LOCK:
        _CACHE.clear()


# --- image steps ---------------------------------------------------------------------------------------------

def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """The "safe" soft edge: values in [0, 1] quantized to ``step`` + 1 levels (truncating), over ``step``."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def nms(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Thin a soft edge map: blur, keep pixels that are the maximum along any of the four directions
    (horizontal, vertical, two diagonals), then binarize above ``threshold``."""
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kernels = (np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8),
               np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
               np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.uint8),
               np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], np.uint8))
    kept = np.zeros_like(x)
    for kernel in kernels:
        np.putmask(kept, cv2.dilate(x, kernel=kernel) == x, x)
    out = np.zeros(kept.shape, np.uint8)
    out[kept > threshold] = 255
    return out


def scribble(edge: np.ndarray) -> np.ndarray:
    """Soft edges to the scribble preprocessors' bold binary strokes: NMS at 127 (σ 3), blurred (σ 3),
    every pixel above 4 white."""
    out = cv2.GaussianBlur(nms(edge, 127, 3.0), (0, 0), 3.0)
    return np.where(out > 4, 255, 0).astype(np.uint8)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 0-255 (truncating, as ``astype`` does)."""
    return (x * 255.0).clip(0, 255).astype(np.uint8)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×C numpy → 1×C×H×W float32 on the compute device (values unchanged)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).float()
    return t.permute(2, 0, 1)[None].to(compute_device())


def renamed_weights(weights: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:
    """A published state dict in another library's names: ``rename(key)`` gives the new name, None (a
    tensor the other layout does not keep) or a list of three names (a fused q/k/v projection, split in
    thirds along its first dimension)."""
    out = {}
    for key, value in weights.items():
        name = rename(key)
        if name is None:
            continue
        if isinstance(name, list):
            for part, chunk in zip(name, value.chunk(3, dim=0)):
                out[part] = chunk
        else:
            out[name] = value
    return out


def count_indexed(weights: dict, pattern: str) -> int:
    """How many numbered modules (blocks, stages...) the keys hold: one more than the largest number that
    ``pattern``'s first group matches, 0 when no key matches."""
    found = {int(m[1]) for k in weights if (m := re.match(pattern, k))}
    return 1 + max(found) if found else 0

