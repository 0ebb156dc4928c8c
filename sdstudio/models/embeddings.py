"""Textual-inversion embeddings: reading every common file format, and finding them in token streams.

Formats: A1111 ``.pt`` (``string_to_param`` -> ``{"*": [n, width]}``), ``.safetensors`` with
``emb_params`` (or SDXL ``clip_l`` [n, 768] + ``clip_g`` [n, 1280]), and diffusers ``.bin``
(``{token: [width]}``). An embedding is used by its file name; its vectors are matched to a text
encoder by width, so an SD 1.x embedding is skipped (with a warning) on an SDXL model, not a crash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelFileError
from .files import sha256_file
from .safe_load import load_pickle, open_state_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedding:
    name: str
    path: Path
    vectors: tuple[torch.Tensor, ...]  # one [n, width] tensor per text encoder it was trained for

    @property
    def count(self) -> int:
        return self.vectors[0].shape[0]

    def for_width(self, width: int) -> torch.Tensor | None:
        return next((v for v in self.vectors if v.shape[-1] == width), None)

    @property
    def short_hash(self) -> str:
        """The ``TI hashes:`` value: first 12 hex digits of the file's sha256."""
        return sha256_file(self.path)[:12]


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().float()
    return t[None] if t.ndim == 1 else t


def load_embedding(path: Path) -> Embedding:
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        data = dict(open_state_dict(path).items())
    else:
        data = load_pickle(path)
    if "string_to_param" in data:
        params = data["string_to_param"]
        vectors = (_as_2d(next(iter(params.values()))),)
    elif "clip_l" in data or "clip_g" in data:
        vectors = tuple(_as_2d(data[k]) for k in ("clip_l", "clip_g") if k in data)
    elif "emb_params" in data:
        vectors = (_as_2d(data["emb_params"]),)
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ModelFileError(f"{path.name}: not a textual-inversion embedding")
        vectors = (_as_2d(tensors[0]),)
    return Embedding(path.stem, path, vectors)


class EmbeddingLibrary:
    """The embeddings in a folder, loaded once, looked up by the token ids of their names."""

    SUFFIXES = (".pt", ".safetensors", ".bin")

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._by_name: dict[str, Embedding] = {}
        self._stamp: tuple = ()
        self._warned: set[tuple] = set()

    def refresh(self) -> None:
        files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in self.SUFFIXES) \
            if self.folder.is_dir() else []
        stamp = tuple((str(p), p.stat().st_mtime) for p in files)
        if stamp == self._stamp:
            return
        self._stamp, loaded = stamp, {}
        for p in files:
            try:
                emb = load_embedding(p)
            except ModelFileError as exc:
                log.warning("skipping embedding %s", exc)
                continue
            loaded[emb.name] = emb
        self._by_name = loaded

    def get(self, name: str) -> Embedding:
        return self._by_name[name]

    def names(self) -> list[str]:
        self.refresh()
        return sorted(self._by_name)

    def usable(self, widths: list[int], wanted_hashes: dict[str, str] | None = None) -> dict[str, Embedding]:
        """The embeddings that fit a model whose text encoders have these widths. ``wanted_hashes``
        (a pasted infotext's ``TI hashes``) also makes a renamed file answer to its old name."""
        self.refresh()
        fitting = {}
        by_hash = {}
        if wanted_hashes and any(name not in self._by_name for name in wanted_hashes):
            by_hash = {e.short_hash: e for e in self._by_name.values()}
        for name, short_hash in (wanted_hashes or {}).items():
            if name not in self._by_name and short_hash.lower() in by_hash:
                found = by_hash[short_hash.lower()]
                if all(found.for_width(w) is not None for w in widths):
                    fitting[name] = Embedding(name, found.path, found.vectors)
        for name, emb in self._by_name.items():
            if all(emb.for_width(w) is not None for w in widths):
                fitting[name] = emb
            elif (name, tuple(widths)) not in self._warned:
                self._warned.add((name, tuple(widths)))
                log.warning("embedding %s does not fit this model (vector widths %s, model needs %s); skipped",
                            name, [v.shape[-1] for v in emb.vectors], widths)
        return fitting
