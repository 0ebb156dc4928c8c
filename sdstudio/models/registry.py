"""The model files a session can use: checkpoints, VAEs, networks and ControlNets found under the configured
folders."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.paths import Paths
from .errors import ModelNotFoundError
from .files import CHECKPOINT_SUFFIXES, VAE_SUFFIXES, HashCache, ModelFile, find, legacy_model_hash, scan

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
VAE_BESIDE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")
CONTROLNET_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")  # the extension's CN_MODEL_EXTS
# Folders under models/ControlNet that hold preprocessor weights, not control models: ours, and the
# extension's own annotator download folders.
CONTROLNET_SKIP_DIRS = ("annotators", "annotator", "downloads")
_CONTROL_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                           "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_TRAILING_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]$")


@dataclass
class ControlNetFile(ModelFile):
    """A ControlNet / T2I-Adapter: a single file or a diffusers folder (config.json + weights). Listed as the
    extension lists it, ``name [legacy 8-hex hash]``; a folder's hash is its weights file's."""

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    @property
    def weights(self) -> Path:
        """The file holding the tensors (the folder's diffusion_pytorch_model.* for a folder)."""
        if self.is_folder:
            return next((self.path / n for n in _CONTROL_FOLDER_WEIGHTS if (self.path / n).is_file()),
                        self.path / _CONTROL_FOLDER_WEIGHTS[0])
        return self.path

    @property
    def name(self) -> str:
        return self.path.name if self.is_folder else self.path.stem

    @property
    def sha256(self) -> str:
        return self.cache.sha256(self.weights)

    @property
    def legacy_hash(self) -> str:
        return legacy_model_hash(self.weights)

    @property
    def title(self) -> str:
        """The extension's model title: ``control_v11p_sd15_canny [d14c016b]``."""
        return f"{self.name} [{self.legacy_hash}]"


def _is_control_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / n).is_file() for n in _CONTROL_FOLDER_WEIGHTS)


def scan_controlnets(root: Path, cache: HashCache) -> list[ControlNetFile]:
    """ControlNet files and diffusers folders under ``root`` (recursively, skipping annotator folders), in the
    extension's order: by file name as Python sorts strings; a file named ``None`` is never listed (it would
    read as "no model")."""
    found: list[ControlNetFile] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                if entry.name.lower() in CONTROLNET_SKIP_DIRS:
                    continue
                if _is_control_folder(entry):
                    found.append(ControlNetFile(entry, root, cache))
                else:
                    walk(entry)
            elif entry.is_file() and entry.suffix.lower() in CONTROLNET_SUFFIXES:
                found.append(ControlNetFile(entry, root, cache))

    if root.is_dir():
        walk(root)
    found = [m for m in found if m.name != "None"]
    return sorted(found, key=lambda m: m.path.name)


class ModelRegistry:
    def __init__(self, paths: Paths):
        self.paths = paths
        self.hashes = HashCache(paths.cache_dir / "hashes.json")
        self.refresh()

    def refresh(self) -> None:
        self.checkpoints: list[ModelFile] = scan(self.paths.ckpt_dirs, CHECKPOINT_SUFFIXES, self.hashes,
                                                 exclude_vae=True)
        self.vaes: list[ModelFile] = scan([self.paths.vae_dir], VAE_SUFFIXES, self.hashes)
        self.hypernetworks: list[ModelFile] = scan([self.paths.hypernetwork_dir], (".pt",), self.hashes)
        self.loras: list[ModelFile] = scan([self.paths.lora_dir, self.paths.lora_dir.parent / "LyCORIS"],
                                           LORA_SUFFIXES, self.hashes)
        self.controlnets: list[ControlNetFile] = scan_controlnets(self.paths.controlnet_dir, self.hashes)

    def controlnet_titles(self) -> list[str]:
        """``name [hash]`` per ControlNet, in the extension's order (what /controlnet/model_list answers,
        without the leading "None")."""
        return [m.title for m in self.controlnets]

    def controlnet(self, query: str | None) -> ControlNetFile:
        """The extension's lookup: the exact ``name [hash]`` title; then the name (compared in lower case,
        ignoring a trailing `` [hash]``, so a pasted infotext finds a file whose hash changed); then the shortest
        name containing the query. "None" or nothing is not a model."""
        folder = self.paths.controlnet_dir
        query = (query or "").strip()
        if not query or query == "None":
            raise ModelNotFoundError(f"no ControlNet model chosen (model is {query or 'empty'!r}); "
                                     f"put ControlNet models in {folder}")
        for m in self.controlnets:
            if m.title == query:
                return m
        wanted = _TRAILING_HASH.sub("", query).lower()
        by_name = {m.name.lower(): m for m in self.controlnets}  # a later file of the same name wins, as there
        if wanted in by_name:
            return by_name[wanted]
        close = sorted((n for n in by_name if wanted in n), key=len)
        if close:
            return by_name[close[0]]
        names = ", ".join(m.name for m in self.controlnets[:30]) or "(none)"
        raise ModelNotFoundError(f"no ControlNet model named {query!r}; available: {names}; "
                                 f"put ControlNet models in {folder}")

    def checkpoint(self, name: str | None) -> ModelFile:
        """Look up by name/title/hash; ``None`` = the first checkpoint (alphabetical, as A1111)."""
        if not self.checkpoints:
            raise ModelNotFoundError(
                f"no checkpoints found; put .safetensors or .ckpt files in {self.paths.ckpt_dirs[-1]}")
        if not name:
            return self.checkpoints[0]
        found = find(self.checkpoints, name)
        if found is None:
            names = ", ".join(m.name for m in self.checkpoints[:20])
            raise ModelNotFoundError(f"no checkpoint named {name!r}; available: {names}")
        return found

    def hypernetwork(self, name: str) -> ModelFile:
        found = find(self.hypernetworks, name)
        if found is None:
            names = ", ".join(m.name for m in self.hypernetworks) or f"(none; put .pt files in {self.paths.hypernetwork_dir})"
            raise ModelNotFoundError(f"no hypernetwork named {name!r}; available: {names}")
        return found

    def lora(self, name: str, addnet_hash: str | None = None) -> ModelFile:
        """By name; failing that by the ``Lora hashes`` value of a pasted infotext (the file was renamed)."""
        found = find(self.loras, name)
        if found is None and addnet_hash:
            found = next((m for m in self.loras if self.hashes.addnet(m.path) == addnet_hash.lower()), None)
        if found is None:
            names = ", ".join(m.name for m in self.loras[:30]) or f"(none; put LoRA files in {self.paths.lora_dir})"
            raise ModelNotFoundError(f"no LoRA named {name!r}; available: {names}")
        return found

    def vae_for(self, checkpoint: ModelFile, choice: str | None) -> ModelFile | None:
        """The VAE file to use, or None for the checkpoint's own. "Automatic" = ``NAME.vae.*`` beside
        the checkpoint, then a VAE in models/VAE with the checkpoint's name; "None" = the checkpoint's own."""
        if not choice or choice == "None":
            return None
        if choice == "Automatic":
            for suffix in VAE_BESIDE_SUFFIXES:
                beside = checkpoint.path.with_name(checkpoint.path.stem + suffix)
                if beside.is_file():
                    return ModelFile(beside, checkpoint.root, self.hashes)
            for vae in self.vaes:
                if vae.name.removesuffix(".vae") == checkpoint.name:
                    return vae
            return None
        return self.vae(choice)

    def vae(self, name: str) -> ModelFile:
        """A VAE file of models/VAE by name, title or hash (``NAME`` finds ``NAME.vae.safetensors`` too)."""
        found = find(self.vaes, name) or find(self.vaes, name + ".vae")
        if found is None:
            names = ", ".join(v.name for v in self.vaes) or "(none)"
            raise ModelNotFoundError(f"no VAE named {name!r}; available: Automatic, None, {names}")
        return found
