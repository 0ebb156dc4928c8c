"""Reading tensors from model files without running code from them.

``.safetensors`` files are opened lazily (memory-mapped; nothing is read until a tensor is asked
for). With ``mapped=True`` a tensor is a view into a private (copy-on-write) map of the file: reading
it costs no copy, and converting it to the model's dtype reads the file's pages once (the checkpoint
loader does so). Whoever asks for views copies what it keeps (``Tensor.to(dtype, copy=True)``): a
file replaced in place under a live map would change, or fault, weights that still point into it.

``.ckpt``/``.pt``/``.pth``/``.bin`` files are pickles: they are read with torch's ``weights_only``
unpickler, which builds tensors and plain containers and refuses everything else, so a file that
tries to run code is refused before anything runs. Old SD 1.x checkpoints pickle a
pytorch-lightning ``ModelCheckpoint`` object in their training state; an inert stand-in is allowed
under that one name so those files still load.
"""

from __future__ import annotations

import json
import mmap
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import ModelFileError
from .pickle_scan import STANDIN_GLOBALS

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class _InertObject:
    """Stands in for harmless training-state classes pickled inside old checkpoints."""

    def __setstate__(self, state: object) -> None:
        self.state = state


_ALLOWED_STANDINS = [(_InertObject, name) for name in STANDIN_GLOBALS]  # pickle_scan's allow-list names them too


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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _mapped_views(path: Path, header: dict, header_len: int):
    """``name -> tensor`` getter reading views of a private map of the file; names it cannot view
    (an unknown dtype, a misaligned offset) return None and are read by safetensors instead."""
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):  # an empty file, or a file system without mmap
            return lambda key: None
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    base = 8 + header_len

    def view(key: str) -> torch.Tensor | None:
        info = header[key]
        dtype = _ST_DTYPES.get(info.get("dtype"))
        start, end = info["data_offsets"]
        if dtype is None or (base + start) % dtype.itemsize:
            return None
        try:
            return data[base + start: base + end].view(dtype).view(info["shape"])
        except (RuntimeError, TypeError, ValueError):  # offsets that do not fit the shape: safetensors says why
            return None

    return view


def _check_safetensors_header(path: Path) -> tuple[dict, int]:
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
        except (ValueError, RecursionError):
            raise ModelFileError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name}: corrupt safetensors header (a {type(header).__name__}, not a table of tensors)")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ModelFileError(f"{path.name}: corrupt safetensors header ({key[:80]!r} has no valid data_offsets)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelFileError(
            f"{path.name}: file is truncated ({size} bytes, the header needs {8 + header_len + end})")
    return header, header_len


def open_safetensors(path: Path, mapped: bool = False) -> LazyStateDict:
    header, header_len = _check_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 - not a dict
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path.name}: cannot read safetensors file ({exc})") from None
    if not mapped:
        return LazyStateDict(path, shapes, handle.get_tensor, metadata)
    view = _mapped_views(path, header, header_len)

    def get(key: str) -> torch.Tensor:
        tensor = view(key)
        return handle.get_tensor(key) if tensor is None else tensor

    return LazyStateDict(path, shapes, get, metadata)


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
    except Exception as exc:  # noqa: BLE001 - the unpickler meets garbage with KeyError, IndexError, struct.error...
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFileError(f"{path.name}: corrupt or truncated checkpoint ({detail})") from None


def _flatten_tensors(obj: dict) -> dict[str, torch.Tensor]:
    """Checkpoints nest the weights under ``state_dict`` (or ``module``; BasicSR upscalers under
    ``params_ema`` / ``params``); keep only the tensors."""
    for wrapper in ("state_dict", "params_ema", "params", "module", "model"):
        inner = obj.get(wrapper) if isinstance(obj, dict) else None
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor``. Its sum is non-finite whenever it holds one (the quick test, one
    reduction); a sum that overflowed on finite values is told apart by the exact minimum and maximum. A meta
    tensor (a layout built without data) has no values to check."""
    if tensor.is_meta:
        return True
    return bool(torch.isfinite(tensor.sum())) or (tensor.numel() > 0 and all(
        bool(torch.isfinite(x)) for x in torch.aminmax(tensor)))


_HALVES = (torch.float16, torch.bfloat16)
_CHUNK = 1 << 18  # elements per step of a half -> half conversion (a 1 MB float32 scratch, measured best)


def _converted(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool | None]:
    """A copy of ``tensor`` in ``dtype``, and whether it is all finite when that came for free (else None).

    float16 <-> bfloat16 goes through float32 a chunk at a time: PyTorch's direct conversion between the two
    half types is scalar, the two halves of the detour are vectorized (an SD 1.5 file loads in 0.83 s instead
    of 1.26 s, page faults included) and round the same way (the same bits). From float16 each float32 chunk's
    sum, which cannot overflow for float16 values in chunks of this size, tells whether the copy is finite
    while the chunk is in cache (bfloat16's range holds every float16); from bfloat16 the copy may overflow,
    so it is checked as it comes out."""
    if tensor.dtype not in _HALVES or dtype not in _HALVES or tensor.dtype == dtype or tensor.is_meta:
        return tensor.to(dtype, copy=True), None
    out = torch.empty(tensor.shape, dtype=dtype)
    src, dst = tensor.reshape(-1), out.view(-1)
    widening = tensor.dtype == torch.float16
    finite = True
    for start in range(0, src.numel(), _CHUNK):
        chunk = src[start:start + _CHUNK].float()
        if widening:
            finite = finite and bool(torch.isfinite(chunk.sum()))
        dst[start:start + _CHUNK].copy_(chunk)
    return out, finite if widening else None


def usable_weight(what: str, key: str, tensor: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` from a file, converted for the module tensor ``like`` (a copy: see the module's notes): to
    ``dtype`` where ``like`` is floating point, to ``like``'s own dtype where it is not (integer buffers).

    Refused (ModelFileError naming ``what`` and ``key``): integer or bool data where the module holds
    floating-point weights, and NaN or infinite values. The finiteness check is one sum over the converted
    copy, which the conversion has just brought into memory."""
    if not like.is_floating_point():
        return tensor.to(like.dtype, copy=True)
    if not tensor.is_floating_point():
        raise ModelFileError(f"{what}: {key} holds {str(tensor.dtype).removeprefix('torch.')} data where the model "
                             "has floating-point weights (a damaged or mislabelled file)")
    out, finite = _converted(tensor, dtype)
    if not (finite if finite is not None else _finite(out)):
        if tensor.dtype != dtype and _finite(tensor):
            raise ModelFileError(f"{what}: {key} has values beyond {str(dtype).removeprefix('torch.')}'s range "
                                 "(load it in float32: --no-half / --precision full)")
        raise ModelFileError(f"{what}: {key} holds NaN or infinite values (the file is damaged; it cannot make a "
                             "picture)")
    return out


def open_state_dict(path: str | Path, mapped: bool = False) -> LazyStateDict:
    """Open any supported weights file as a lazy ``name -> tensor`` mapping (``mapped``: tensors of a
    ``.safetensors`` file are views into its map, see the module's notes; pickles are always maps)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return open_safetensors(path, mapped)
    if suffix in PICKLE_SUFFIXES:
        tensors = _flatten_tensors(load_pickle(path))
        return LazyStateDict(path, {k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__, {})
    raise ModelFileError(f"{path.name}: unsupported file type {suffix!r} (use .safetensors, .ckpt, .pt, .pth or .bin)")
