"""The model files a session can use: checkpoints and VAEs found under the configured folders."""

from __future__ import annotations

from ..core.paths import Paths
from .errors import ModelNotFoundError
from .files import CHECKPOINT_SUFFIXES, VAE_SUFFIXES, HashCache, ModelFile, find, scan

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
VAE_BESIDE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")


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
