"""Hostile and broken model files, made on the spot, for tests of safe loading.

Every file that tries to run code does so by creating a marker file (the sentinel the tests look for): a loader
that lets one through leaves the marker behind. :func:`write_corpus` writes the whole set into a folder:

- pickles that call ``os.system`` / ``posix.system``, ``builtins.exec`` / ``eval`` / ``getattr``,
  ``subprocess.Popen``, ``importlib.import_module``, ``pickle.loads`` of a second pickle, ``functools.partial``,
  ``runpy``, ``operator.methodcaller``, through the opcodes that call (GLOBAL or STACK_GLOBAL with REDUCE, INST,
  OBJ); each is checked to really run its code under a plain ``pickle.loads`` (tests/test_hostile_models.py);
- those pickles as torch's zip checkpoints (``archive/data.pkl``), in the legacy (non-zip) torch format, with
  the payload beside the weights, nested inside a zip member, and under the names A1111 scans (``.ckpt``,
  ``.pt``, ``.pth``, ``.bin``);
- safetensors files that lie: a header length past the file, offsets past the end, overlapping or backwards
  offsets, a shape that does not match its bytes, an unknown dtype, a header that is a list or nested 100,000
  deep, metadata that is not text, a truncated file;
- weights that load but cannot be used: NaN / Inf values, integer and bool dtypes, shapes that do not fit the
  architecture.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path


class SystemCall:
    """Pickled, this asks the unpickler to run ``touch MARKER`` through ``os.system``: a loader that lets it
    through leaves the marker file behind (the sentinel the tests look for)."""

    def __init__(self, marker: str | Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _text(value: str) -> bytes:
    """A protocol-0 string argument (``S'...'``)."""
    return b"S" + repr(value).encode() + b"\n"


def payloads(marker: Path) -> dict[str, bytes]:
    """Raw pickles that each try to create ``marker``, by name of the trick."""
    touch = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').close()"
    inner = pickle.dumps(SystemCall(marker), protocol=2)
    return {
        "os.system (GLOBAL + REDUCE)": b"cos\nsystem\n(" + _text(touch) + b"tR.",
        "posix.system (pickle's own spelling)": pickle.dumps(SystemCall(marker), protocol=4),
        "builtins.exec": b"cbuiltins\nexec\n(" + _text(py) + b"tR.",
        "builtins.eval": b"cbuiltins\neval\n(" + _text(f"__import__('os').system({touch!r})") + b"tR.",
        "__builtin__.eval (Python 2 name)": b"c__builtin__\neval\n(" + _text(f"__import__('os').system({touch!r})") +
                                            b"tR.",
        "builtins.getattr chain": (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(" + _text("os") + b"tR" +
                                   _text("system") + b"tR(" + _text(touch) + b"tR."),
        "importlib.import_module": (b"cbuiltins\ngetattr\n(cimportlib\nimport_module\n(" + _text("os") + b"tR" +
                                    _text("system") + b"tR(" + _text(touch) + b"tR."),
        "subprocess.Popen": b"csubprocess\nPopen\n((" + _text("touch") + _text(str(marker)) + b"ltR.",
        "pickle.loads of a second pickle": b"cpickle\nloads\n(C" + struct.pack("<B", len(inner)) + inner + b"tR."
        if len(inner) < 256 else b"cpickle\nloads\n(B" + struct.pack("<I", len(inner)) + inner + b"tR.",
        "functools.partial": b"cfunctools\npartial\n(cos\nsystem\n" + _text(touch) + b"tR)R.",
        "runpy._run_code": b"crunpy\n_run_code\n(" + _text(py) + b"}tR.",
        "INST opcode": b"(" + _text(touch) + b"ios\nsystem\n.",
        "OBJ opcode": b"(cos\nsystem\n" + _text(touch) + b"o.",
        "STACK_GLOBAL + TUPLE1 + REDUCE (protocol 4)": (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" +
                                                        bytes([len(touch)]) + touch.encode() + b"\x85R."),
        "operator.methodcaller on an imported module": (b"coperator\nmethodcaller\n(" + _text("system") +
                                                        _text(touch) + b"tR(cimportlib\nimport_module\n(" +
                                                        _text("os") + b"tRtR."),
    }


def torch_zip(pkl: bytes, *, name: str = "archive", extra: dict[str, bytes] | None = None) -> bytes:
    """A torch zip checkpoint whose ``data.pkl`` is ``pkl`` (what ``torch.load`` unpickles)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", pkl)
        z.writestr(f"{name}/version", b"3\n")
        z.writestr(f"{name}/byteorder", b"little")
        for member, data in (extra or {}).items():
            z.writestr(f"{name}/{member}", data)
    return buf.getvalue()


def safetensors_bytes(header: object, data: bytes = b"", *, header_len: int | None = None) -> bytes:
    """A safetensors file with exactly this header (any JSON, even a lying one) and these data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


@dataclass(frozen=True)
class Hostile:
    path: Path
    runs_code: bool  # the file tries to create the marker when loaded carelessly


def write_corpus(folder: Path, marker: Path, good: bytes | None = None) -> dict[str, Hostile]:
    """Write every hostile or broken file into ``folder``; ``good`` (a real checkpoint's bytes) is the base of the
    truncated file. Returns them by description."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Hostile] = {}

    def put(name: str, filename: str, data: bytes, runs_code: bool) -> None:
        path = folder / filename
        path.write_bytes(data)
        out[name] = Hostile(path, runs_code)

    for i, (trick, pkl) in enumerate(payloads(marker).items()):
        suffix = (".ckpt", ".pt", ".pth", ".bin")[i % 4]
        put(f"raw pickle: {trick}", f"raw-{i:02d}{suffix}", pkl, True)
        put(f"torch zip data.pkl: {trick}", f"zip-{i:02d}{suffix}", torch_zip(pkl), True)
    evil = payloads(marker)["os.system (GLOBAL + REDUCE)"]
    put("torch zip, payload inside a dict beside weights-like data",
        "beside.ckpt", torch_zip(b"\x80\x02}(X\x0a\x00\x00\x00state_dict}X\x07\x00\x00\x00payload" + evil[:-1] + b"u."),
        True)
    put("torch zip under another folder name", "renamed.ckpt", torch_zip(evil, name="model"), True)
    put("torch zip with a second, hostile member", "member.ckpt",
        torch_zip(pickle.dumps({"state_dict": {}}, protocol=2), extra={"data/evil.pkl": evil}), False)
    put("a zip inside a zip member", "nested.ckpt", torch_zip(evil, extra={"inner.zip": torch_zip(evil)}), True)
    legacy = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2) + evil
    put("legacy (non-zip) torch format", "legacy.pt", legacy, True)
    put("not a zip, not a pickle", "noise.ckpt", os.urandom(4096), False)
    put("empty .ckpt", "empty.ckpt", b"", False)

    f32 = struct.pack("<4f", 1, 2, 3, 4)
    put("safetensors: header length past the file", "long-header.safetensors",
        safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32, header_len=1 << 40),
        False)
    put("safetensors: offsets past the end", "past-end.safetensors",
        safetensors_bytes({"w": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}}, f32), False)
    put("safetensors: overlapping offsets", "overlap.safetensors",
        safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, f32 * 2), False)
    put("safetensors: backwards offsets", "backwards.safetensors",
        safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, f32), False)
    put("safetensors: shape that does not match its bytes", "shape-lie.safetensors",
        safetensors_bytes({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}, f32), False)
    put("safetensors: unknown dtype", "dtype.safetensors",
        safetensors_bytes({"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, f32), False)
    put("safetensors: header is a list", "list-header.safetensors", safetensors_bytes([1, 2, 3]), False)
    put("safetensors: header nested 100,000 deep", "deep-header.safetensors",
        safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), False)
    put("safetensors: entry without offsets", "no-offsets.safetensors",
        safetensors_bytes({"w": {"dtype": "F32", "shape": [4]}}, f32), False)
    put("safetensors: offsets that are not numbers", "text-offsets.safetensors",
        safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, f32), False)
    put("safetensors: metadata that is not text", "metadata.safetensors",
        safetensors_bytes({"__metadata__": {"a": {"b": 1}}, "w": {"dtype": "F32", "shape": [4],
                                                                  "data_offsets": [0, 16]}}, f32), False)
    put("safetensors: header not UTF-8", "latin.safetensors", safetensors_bytes(b'{"\xff": 1}'), False)
    if good is not None:
        put("safetensors: truncated", "truncated.safetensors", good[: len(good) // 2], False)
        put("safetensors: cut inside its header", "cut-header.safetensors", good[:20], False)
    return out


def unusable_checkpoints(folder: Path, family: str = "sd1") -> dict[str, Path]:
    """Checkpoints that load as files but whose weights cannot make a picture: NaN, Inf, integer and bool dtypes,
    a tensor with a shape the architecture does not have. Made from the tiny synthetic checkpoint."""
    import torch
    from safetensors.torch import save_file

    from .synthetic import make_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    base = make_checkpoint(family, "tiny")
    conv = next(k for k in base if k.endswith("input_blocks.0.0.weight"))
    out = {}
    for name, change in {
        "nan": lambda sd: sd[conv].fill_(float("nan")),
        "inf": lambda sd: sd[conv].fill_(float("inf")),
        "int64": lambda sd: sd.__setitem__(conv, sd[conv].to(torch.int64)),
        "bool": lambda sd: sd.__setitem__(conv, sd[conv] > 0),
        "shape": lambda sd: sd.__setitem__(conv, torch.zeros(*sd[conv].shape[:-1], sd[conv].shape[-1] + 2)),
    }.items():
        sd = {k: v.clone() for k, v in base.items()}
        change(sd)
        path = folder / f"unusable-{name}.safetensors"
        save_file(sd, str(path))
        out[name] = path
    return out


def save_lightning_checkpoint(path: Path, state_dict: dict) -> Path:
    """A harmless real-world pickle: an SD 1.x ``.ckpt`` as the original training code saved it, with a
    pytorch_lightning ``ModelCheckpoint`` callback pickled beside the weights (a class our loaders allow as
    inert data). pytorch_lightning need not be installed: a stand-in module is registered while saving."""
    import sys
    import types

    import torch

    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__)
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[mod.__name__] = mod
    try:
        torch.save({"state_dict": state_dict, "callbacks": {ModelCheckpoint: ModelCheckpoint()},
                    "global_step": 470000}, path)
    finally:
        for name in names:
            sys.modules.pop(name, None)
    return path
