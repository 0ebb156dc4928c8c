"""Finding model files in A1111's folder layout and hashing them as A1111 does.

Hashes: ``sha256`` of the whole file (its first 10 hex digits are A1111's short hash, shown in
titles and written as ``Model hash``), and the legacy 8-hex "model hash" of the 64 KiB window at
offset 1 MiB. Full hashes are cached in ``<data dir>/cache/hashes.json`` keyed by path, size and
modification time, so a multi-gigabyte file is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".gguf")  # .gguf: quantized Flux / SD 3.x (Forge)
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
NETWORK_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")  # stand-alone networks: upscalers, face restorers


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def legacy_model_hash(path: Path) -> str:
    """A1111's old "model hash": sha256 of the 64 KiB at offset 0x100000, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def addnet_hash(path: Path) -> str:
    """The LoRA hash in ``Lora hashes:``: sha256 of a safetensors file after its header, 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


class HashCache:
    """Hashes per file (sha256, and the LoRA "addnet" hash), persisted as JSON; an entry is trusted
    while the file's size and mtime are unchanged."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._data: dict[str, dict] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._data = {}

    def sha256(self, file: Path) -> str:
        return self._get(file, "sha256", sha256_file)

    def addnet(self, file: Path) -> str:
        return self._get(file, "addnet", addnet_hash)

    def _get(self, file: Path, kind: str, compute) -> str:
        st = file.stat()
        key = str(file.resolve())
        with self._lock:
            entry = self._data.get(key)
            if not entry or entry.get("size") != st.st_size or entry.get("mtime") != st.st_mtime:
                entry = {"size": st.st_size, "mtime": st.st_mtime}
            if kind in entry:
                return entry[kind]
        value = compute(file)
        with self._lock:
            self._data[key] = {**entry, kind: value}
            self._save()
        return value

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._data, indent=1))
        os.replace(tmp, self.path)


@dataclass
class ModelFile:
    """One model file found on disk. ``name`` is the file stem, as in the infotext ``Model:`` field."""

    path: Path
    root: Path
    cache: HashCache

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def filename(self) -> str:
        """Path relative to its folder, as A1111 shows it (sub-folders kept)."""
        return str(self.path.relative_to(self.root))

    @property
    def sha256(self) -> str:
        return self.cache.sha256(self.path)

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def legacy_hash(self) -> str:
        return legacy_model_hash(self.path)

    @property
    def title(self) -> str:
        """A1111's checkpoint title: ``name.safetensors [3c0c2bc02c]``."""
        return f"{self.filename} [{self.short_hash}]"


def scan(roots: list[Path], suffixes: tuple[str, ...], cache: HashCache, *, exclude_vae: bool = False) -> list[ModelFile]:
    """All model files under ``roots`` (recursively), sorted by relative path, first root wins on a name clash."""
    found: dict[str, ModelFile] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in suffixes:
                continue
            if exclude_vae and path.name.lower().endswith((".vae.safetensors", ".vae.pt", ".vae.ckpt")):
                continue
            entry = ModelFile(path, root, cache)
            found.setdefault(entry.filename, entry)
    return sorted(found.values(), key=lambda m: m.filename.lower())


def find(models: list[ModelFile], query: str) -> ModelFile | None:
    """Look a model up the ways A1111 users name one: title, file name, stem, or hash prefix."""
    query = query.strip()
    for attr in ("title", "filename", "name"):
        for m in models:
            if getattr(m, attr) == query:
                return m
    stem = Path(query.split(" [")[0]).stem
    for m in models:
        if m.name == stem:
            return m
    if len(query) >= 8 and all(c in "0123456789abcdef" for c in query.lower()):
        for m in models:
            if m.sha256.startswith(query.lower()) or m.legacy_hash == query.lower():
                return m
    return None
