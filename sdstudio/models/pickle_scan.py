"""Which pickled model files the safe loader would refuse, found without loading them (pure Python, no torch).

A1111 runs picklescan-style checks and warns that a file "may be malicious"; our loader reads pickles with
torch's weights-only unpickler (:func:`sdstudio.models.safe_load.load_pickle`), which refuses any pickle
opcode outside a small set and any global outside an allow-list. This module reads the same opcodes
statically (:mod:`pickletools`; nothing is unpickled, nothing imported) and applies the same two rules, so
a model list can mark a file before anyone tries to load it:

- a torch zip checkpoint: every ``.pkl`` member (torch reads ``<folder>/data.pkl``; a second, hostile
  member is flagged too, as picklescan does) and zips inside members, two levels deep;
- any other file: the pickles at its start, as torch's legacy format reads them (the magic number, the
  protocol, the system info, the data, the storage keys), the first of which must be the magic number.

A file is ``unsafe`` when a pickle imports a global outside the allow-list (``os.system``,
``builtins.eval``...) or uses an opcode the weights-only unpickler refuses (``STACK_GLOBAL``, ``INST``,
``EXT1``...), and ``unreadable`` when it is no pickle or zip the loader can read. Results are cached by
the file's path, size and modification time.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Globals an old checkpoint's training state may name, loaded as inert stand-ins (safe_load).
STANDIN_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)

_TENSOR_TYPES = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_STORAGE_ONLY = ("ComplexDouble", "ComplexFloat", "QUInt8", "QInt8", "QInt32", "QUInt4x2", "QUInt2x4")
# torch's weights-only allow-list (torch._weights_only_unpickler._get_allowed_globals; tests keep it equal).
TORCH_ALLOWED_GLOBALS = frozenset({
    "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device", "_codecs.encode",
    "builtins.bytearray", "builtins.set", "builtins.complex", "torch._tensor._rebuild_from_type_v2",
    "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
    *(f"torch.{d}" for d in (
        "float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128", "bool", "qint8",
        "quint8", "qint32", "quint4x2", "quint2x4", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
        *(f"int{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64)),
        *(f"uint{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64)),
        "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
        "per_channel_affine_float_qparams")),
    *(f"{m}.{t}Tensor" for m in ("torch", "torch.cuda") for t in _TENSOR_TYPES),
    *(f"{m}.{t}Tensor" for m in ("torch.sparse", "torch.cuda.sparse") for t in _TENSOR_TYPES if t != "Bool"),
    *(f"{m}.{t}Storage" for m in ("torch", "torch.cuda") for t in _TENSOR_TYPES),
    *(f"torch.{t}Storage" for t in _STORAGE_ONLY),
    *(f"torch.cuda.{t}Storage" for t in _STORAGE_ONLY[:2]),
    *(f"torch._utils._rebuild_{f}" for f in (
        "parameter", "parameter_with_state", "qtensor", "tensor", "tensor_v2", "tensor_v3", "sparse_tensor",
        "meta_tensor_no_storage", "nested_tensor", "wrapper_subclass", "device_tensor_from_numpy",
        "device_tensor_from_cpu_tensor")),
})
ALLOWED_GLOBALS = TORCH_ALLOWED_GLOBALS | frozenset(STANDIN_GLOBALS)

# The opcodes torch's weights-only unpickler reads (its Unpickler.load); any other one is refused.
ALLOWED_OPCODES = frozenset({
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET",
    "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP",
})
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy format
_MAX_ARGUMENT = 64 << 20  # a longer string or bytes argument is not read (no checkpoint pickle has one)
_MAX_NESTING = 2  # zips inside zip members, as deep as this


@dataclass(frozen=True)
class PickleScan:
    """``status``: ``safe``, ``unsafe`` or ``unreadable`` (``not a pickle``: a .safetensors / .gguf file);
    ``reasons``: what made it so, e.g. ``imports os.system`` (at most a few, the first found first)."""

    status: str
    reasons: tuple[str, ...] = ()

    @property
    def unsafe(self) -> bool:
        return self.status == "unsafe"

    def warning(self, name: str) -> str | None:
        """One line for the model list (None for a safe file), in A1111's words where it has some."""
        if self.status == "unsafe":
            return (f"{name}: the file may be malicious, so it will not be read ({'; '.join(self.reasons)}); "
                    "convert it to .safetensors from a source you trust")
        if self.status == "unreadable":
            return f"{name}: cannot be read as a checkpoint ({'; '.join(self.reasons)})"
        return None


class _TooLong(Exception):
    pass


class _Capped(io.RawIOBase):
    """A file whose reads refuse arguments over _MAX_ARGUMENT (pickletools would read them whole)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > _MAX_ARGUMENT:
            raise _TooLong(n)
        return self.f.read(n)

    def readline(self, limit: int = -1) -> bytes:
        return self.f.readline(_MAX_ARGUMENT)

    def tell(self) -> int:
        return self.f.tell()


def _global_name(module: str, name: str) -> str:
    """As torch reads a GLOBAL (Python 2 names mapped to Python 3's)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _Found:
    """What the pickles of one file hold that the weights-only unpickler refuses."""

    def __init__(self):
        self.imports: list[str] = []
        self.opcodes: list[str] = []
        self.broken: list[str] = []

    def imported(self, name: str) -> None:
        if name not in self.imports:
            self.imports.append(name)

    def opcode(self, name: str) -> None:
        if name not in self.opcodes:
            self.opcodes.append(name)

    def result(self) -> PickleScan | None:
        """unsafe (the globals first, then the opcodes), unreadable, or None when nothing was found. A pickle
        that breaks off is unreadable unless it imported something first (the opcodes of noise mean nothing)."""
        if self.imports or (self.opcodes and not self.broken):
            reasons = [f"imports {', '.join(self.imports[:3])}"] if self.imports else []
            if self.opcodes:
                reasons.append(f"uses the pickle opcode{'s' if len(self.opcodes) > 1 else ''} "
                               f"{', '.join(self.opcodes[:4])}, which weights-only loading refuses")
            return PickleScan("unsafe", tuple(reasons))
        if self.broken:
            return PickleScan("unreadable", tuple(self.broken[:2]))
        return None


def _scan_pickle(f, found: _Found) -> object:
    """Read one pickle's opcodes from ``f``, noting in ``found`` what the weights-only unpickler would refuse;
    returns the pickle's value when it is one LONG1 integer (torch's magic number), else None.
    Raises ValueError (or _TooLong) when ``f`` holds no complete pickle here."""
    strings: list[str | None] = []  # what recent opcodes pushed, to name a STACK_GLOBAL's operands
    memo: dict[int, str | None] = {}
    ops = []
    for op, arg, _pos in pickletools.genops(_Capped(f)):
        name = op.name
        ops.append((name, arg))
        if name not in ALLOWED_OPCODES:
            if name == "STACK_GLOBAL" and len(strings) >= 2 and all(isinstance(x, str) for x in strings[-2:]):
                found.imported(_global_name(*strings[-2:]))
            elif name == "INST":
                found.imported(_global_name(*str(arg).split(" ", 1)))
            found.opcode(name)
        if name == "GLOBAL":
            full = _global_name(*str(arg).split(" ", 1))
            if full not in ALLOWED_GLOBALS:
                found.imported(full)
        if name in _STRINGS:
            strings.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None)
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = strings[-1] if strings else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            strings.append(memo.get(arg))
        elif name not in ("FRAME", "PROTO", "STOP"):
            strings.append(None)
        del strings[:-8]
    if [n for n, _ in ops if n != "PROTO"] == ["LONG1", "STOP"]:
        return next(a for n, a in ops if n == "LONG1")
    return None


def _scan_zip(zf: zipfile.ZipFile, found: _Found, depth: int) -> bool:
    """Scan a zip's ``.pkl`` members (and zips inside members); False when it has no readable pickle."""
    pickles = False
    for info in zf.infolist():
        if info.is_dir():
            continue
        with zf.open(info) as member:
            if info.filename.endswith(".pkl"):
                try:
                    _scan_pickle(io.BufferedReader(member), found)
                except (ValueError, _TooLong, EOFError):
                    found.broken.append(f"its member {info.filename} is not a complete pickle")
                pickles = True
            elif depth < _MAX_NESTING and member.read(4) == b"PK\x03\x04":
                try:
                    with zf.open(info) as again, zipfile.ZipFile(again) as inner:
                        pickles = _scan_zip(inner, found, depth + 1) or pickles
                except (zipfile.BadZipFile, OSError, ValueError):
                    pass
    return pickles


def scan_file(path: str | Path) -> PickleScan:
    """What the weights-only loader would make of ``path`` (see the module's notes); never raises."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return PickleScan("not a pickle")
    found = _Found()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if not _scan_zip(zf, found, 0):
                    found.broken.append("a zip without a data.pkl")
        else:
            with open(path, "rb") as f:
                if _scan_pickle(f, found) != _TORCH_MAGIC:
                    found.broken.append("not a torch checkpoint: no magic number")
                else:
                    for _ in range(4):  # protocol, system info, the data, the storage keys
                        _scan_pickle(f, found)
    except (ValueError, _TooLong, EOFError, zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        detail = f"an argument of {exc.args[0]} bytes" if isinstance(exc, _TooLong) else \
            str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        found.broken.append(f"not a complete pickle: {detail}")
    return found.result() or PickleScan("safe")


def scan_cached(path: str | Path) -> PickleScan:
    """:func:`scan_file`, remembered while the file's size and modification time stay the same."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return PickleScan("unreadable", ("no such file",))
    return _scan_cached(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=1024)
def _scan_cached(path: str, _size: int, _mtime: int) -> PickleScan:
    return scan_file(path)


def unsafe_warning(path: str | Path) -> str | None:
    """The model list's warning line for ``path`` (None when it is safe or not a pickle)."""
    return scan_cached(path).warning(Path(path).name)
