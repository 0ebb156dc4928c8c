"""The model files every worker can use, listed without torch: what the API process checks requests
against when generation runs elsewhere (Ray workers), and what the scheduler's affinity reads.

Built on :class:`~sdstudio.models.registry.ModelRegistry` (file scanning and names only; importing this
module imports neither torch nor the engine). The workers see the same folders (shared storage or the
same files at the same paths), so a name the catalog finds is a name a worker finds.
"""

from __future__ import annotations

from pathlib import Path

from ..core.extra_networks import extract, lora_uses
from ..core.params import RequestError
from ..core.paths import Paths
from ..models.errors import ModelFileError, ModelNotFoundError
from ..models.pickle_scan import unsafe_warning
from ..models.registry import ModelRegistry


class ModelCatalog:
    def __init__(self, source: Paths | ModelRegistry):
        self.registry = source if isinstance(source, ModelRegistry) else ModelRegistry(source)

    def refresh(self) -> None:
        self.registry.refresh()

    def listing(self) -> dict[str, list[str]]:
        """Every kind's titles / names (what a worker could load)."""
        r = self.registry
        return {"checkpoints": [m.title for m in r.checkpoints], "vaes": [m.filename for m in r.vaes],
                "loras": [m.name for m in r.loras], "hypernetworks": [m.name for m in r.hypernetworks],
                "controlnets": r.controlnet_titles()}

    def check(self, req) -> None:
        """The request's checkpoint, VAE and refiner exist (an unknown one: :class:`ModelNotFoundError`
        naming it, as the engine's lookup would say on the worker), and the checkpoint is no pickle the
        worker's safe loader would refuse (:class:`ModelFileError`, A1111's picklescan words). LoRA tags are not checked: a missing
        LoRA is a warning in A1111, and so on the worker."""
        file = self.registry.checkpoint(req.model)
        if warning := unsafe_warning(file.path):  # the worker's safe loader would refuse it: say so now
            raise ModelFileError(warning)
        self.registry.vae_for(file, req.vae)
        refiner = getattr(req, "refiner_checkpoint", None)
        if refiner and refiner != "None":
            self.registry.checkpoint(refiner)

    def resources(self, kind: str, request: dict) -> set[str]:
        """The model files (resolved paths) a queued job will load: its checkpoint, its LoRAs and its
        ControlNet models. A worker that has them loaded already is preferred (affinity)."""
        out: set[str] = set()
        req = request.get("request") if kind in ("txt2img", "img2img") else None
        model = (req or {}).get("model") if req is not None else request.get("model")
        if kind in ("txt2img", "img2img", "load", "deforum"):
            try:
                out.add(_resolved(self.registry.checkpoint(model or None).path))
            except ModelNotFoundError:
                pass
        if req is not None:
            for prompt in (req.get("prompt") or "", req.get("negative_prompt") or ""):
                try:
                    tags = extract(prompt)[1]
                    uses = lora_uses(tags)
                except RequestError:
                    continue
                for use in uses:
                    try:
                        out.add(_resolved(self.registry.lora(use.name).path))
                    except ModelNotFoundError:
                        pass
            for model_name in _controlnet_models(req):
                try:
                    out.add(_resolved(self.registry.controlnet(model_name).path))
                except ModelNotFoundError:
                    pass
        return out


def _controlnet_models(req: dict) -> list[str]:
    """The ControlNet model names a stored request's units name (scripts' args under ``alwayson``/``script``;
    any dict with ``model`` and ``module`` keys is a unit)."""
    found: list[str] = []

    def walk(value, depth: int = 0) -> None:
        if depth > 6:
            return
        if isinstance(value, dict):
            if isinstance(value.get("model"), str) and "module" in value and value.get("enabled", True):
                found.append(value["model"])
            for v in value.values():
                walk(v, depth + 1)
        elif isinstance(value, list):
            for v in value:
                walk(v, depth + 1)

    walk({k: v for k, v in req.items() if k not in ("prompt", "negative_prompt", "init_images", "mask")})
    return [m for m in found if m and m != "None"]


def _resolved(path: Path) -> str:
    return str(Path(path).resolve())
