"""Reading tensors from model files without running code from them.

``.safetensors`` files are opened lazily (memory-mapped; nothing is read until a tensor is asked
for). ``.ckpt``/``.pt``/``.pth``/``.bin`` files are pickles: they are read with torch's
``weights_only`` unpickler, which builds tensors and plain containers and refuses everything else,
so a file that tries to run code is refused before anything runs. Old SD 1.x checkpoints pickle a
pytorch-lightning ``ModelCheckpoint`` object in their training state; an inert stand-in is allowed
under that one name so those files still load.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import ModelFileError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class _InertObject:
    """Stands in for harmless training-state classes pickled inside old checkpoints."""

    def __setstate__(self, state: object) -> None:
        self.state = state


_ALLOWED_STANDINS = [
    (_InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_InertObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
]


class LazyStateDict(Mapping):
    """A read-only ``name -> tensor`` mapping over a model file; tensors load on access."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], getter, metadata: dict[str, str]):
        self.path = path
        self.shapes = shapes
        self.metadata = metadata
        self._get = getter

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path.name}: file is empty or truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise ModelFileError(f"{path.name}: corrupt safetensors header (claims {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise ModelFileError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelFileError(
            f"{path.name}: file is truncated ({size} bytes, the header needs {8 + header_len + end})")


def open_safetensors(path: Path) -> LazyStateDict:
    _check_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 - not a dict
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path.name}: cannot read safetensors file ({exc})") from None
    return LazyStateDict(path, shapes, handle.get_tensor, metadata)


def load_pickle(path: Path) -> dict:
    """Load a pickled checkpoint with the restricted unpickler; refuse anything that is not data."""
    if not zipfile.is_zipfile(path) and path.stat().st_size < 16:
        raise ModelFileError(f"{path.name}: file is empty or truncated")
    try:
        with torch.serialization.safe_globals(_ALLOWED_STANDINS):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("\n")[0]
        raise ModelFileError(
            f"{path.name}: refused to load: the pickle asks to run code or build objects that are not "
            f"model weights ({detail[:200]}). Convert it to .safetensors from a source you trust.") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{path.name}: corrupt or truncated checkpoint ({str(exc).splitlines()[0][:200]})") from None


def _flatten_tensors(obj: dict) -> dict[str, torch.Tensor]:
    """Checkpoints nest the weights under ``state_dict`` (or ``module``; BasicSR upscalers under
    ``params_ema`` / ``params``); keep only the tensors."""
    for wrapper in ("state_dict", "params_ema", "params", "module", "model"):
        inner = obj.get(wrapper) if isinstance(obj, dict) else None
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def open_state_dict(path: str | Path) -> LazyStateDict:
    """Open any supported weights file as a lazy ``name -> tensor`` mapping."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return open_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        tensors = _flatten_tensors(load_pickle(path))
        return LazyStateDict(path, {k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__, {})
    raise ModelFileError(f"{path.name}: unsupported file type {suffix!r} (use .safetensors, .ckpt, .pt, .pth or .bin)")
