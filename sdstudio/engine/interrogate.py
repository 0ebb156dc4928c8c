"""Interrogation: a prompt-like description of an image, by one of two backends with one interface.

- ``clip`` (A1111's "Interrogate CLIP"): a BLIP caption, then CLIP ranks the image against lists of
  media, art movements and descriptive terms (:mod:`sdstudio.core.interrogate_terms`) and the best are
  appended: ``"a red circle on a blue field, a digital painting, minimalism, flat colors, ..."``.
  Needs a BLIP captioning model folder in ``models/BLIP`` and a CLIP model folder in ``models/CLIP``
  (Hugging Face layout: ``config.json`` and weights; CLIP's tokenizer may be left out: ours is used).
- ``deepdanbooru`` (A1111's "Interrogate DeepBooru"): a multi-label image tagger, a Hugging Face
  image-classification folder in ``models/deepbooru`` whose labels are the tags; the tags scoring over
  the threshold, best first, joined by commas.

Both load from local folders only; a missing folder is a :class:`ModelNotFoundError` saying what to put
where. Everything runs under ``torch.no_grad`` on the engine's device.

Training's captions (A1111's "Use BLIP for caption" in Preprocess images, auto-captioning a kohya folder) take
the BLIP caption alone: :meth:`Interrogators.get` ``("blip")`` loads the BLIP model only (no CLIP folder
needed), and shares it with the ``clip`` backend when both are used.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from PIL import Image

from ..core.interrogate_terms import CATEGORIES
from ..models.errors import ModelFileError, ModelNotFoundError

BACKENDS = ("clip", "deepdanbooru")
CAPTIONER = "blip"  # the BLIP caption alone (not an interrogation backend of the API)


def _folder(path: Path, what: str, hint: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{what} is not installed: put a {hint} folder (config.json and weights) in {path}")
    return path


def _load(cls, folder: Path, what: str):
    try:
        return cls.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFileError(f"{what} in {folder} could not be loaded: {str(exc).splitlines()[0][:300]}") from None


class BlipCaptioner:
    """A BLIP caption of a picture, BLIP's model and processor only."""

    def __init__(self, blip_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32):
        from transformers import AutoProcessor, BlipForConditionalGeneration

        blip = _folder(blip_dir, "the BLIP caption model", "BLIP image-captioning")
        self.device, self.dtype = device, dtype
        self.model = _load(BlipForConditionalGeneration, blip, "the BLIP model").to(device, dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(str(blip), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"the BLIP folder {blip} lacks its processor/tokenizer files ({exc})") from None

    @torch.no_grad()
    def caption(self, image: Image.Image) -> str:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, num_beams=1, min_length=5, max_length=30, do_sample=False)
        return self.processor.decode(out[0], skip_special_tokens=True).strip()

    interrogate = caption


class ClipInterrogator:
    def __init__(self, blip_dir: Path, clip_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32,
                 captioner: BlipCaptioner | None = None):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from ..models.loader import clip_tokenizer

        self.captioner = captioner or BlipCaptioner(blip_dir, device, dtype)
        clip = _folder(clip_dir, "the CLIP model", "CLIP")
        self.device, self.dtype = device, dtype
        self.clip = _load(CLIPModel, clip, "the CLIP model").to(device, dtype)
        self.clip_images = CLIPImageProcessor.from_pretrained(str(clip), local_files_only=True) \
            if (clip / "preprocessor_config.json").is_file() else CLIPImageProcessor()
        self.clip_tokens = CLIPTokenizer.from_pretrained(str(clip), local_files_only=True) \
            if (clip / "vocab.json").is_file() else clip_tokenizer()
        self._terms: dict[str, torch.Tensor] = {}

    def caption(self, image: Image.Image) -> str:
        return self.captioner.caption(image)

    @torch.no_grad()
    def _text_features(self, name: str, terms: tuple[str, ...]) -> torch.Tensor:
        if name not in self._terms:
            tokens = self.clip_tokens(list(terms), padding="max_length", truncation=True, max_length=77,
                                      return_tensors="pt").to(self.device)
            feats = self.clip.get_text_features(**tokens)
            feats = getattr(feats, "pooler_output", feats)
            self._terms[name] = torch.nn.functional.normalize(feats.float(), dim=-1)
        return self._terms[name]

    @torch.no_grad()
    def rank(self, image: Image.Image) -> list[tuple[str, list[tuple[str, float]]]]:
        """Per category, its best terms with their similarity."""
        pixels = self.clip_images(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        feats = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        feats = torch.nn.functional.normalize(getattr(feats, "pooler_output", feats).float(), dim=-1)
        out = []
        for name, top, terms in CATEGORIES:
            sims = (feats @ self._text_features(name, terms).T)[0]
            best = torch.topk(sims, min(top, len(terms)))
            out.append((name, [(terms[i], float(s)) for s, i in zip(best.values, best.indices)]))
        return out

    def interrogate(self, image: Image.Image) -> str:
        parts = [self.caption(image)]
        for _, matches in self.rank(image):
            parts += [term for term, _ in matches]
        return ", ".join(p for p in parts if p)


class Tagger:
    """DeepBooru-style: every label of a multi-label classifier scoring over ``threshold``, best first."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype = torch.float32, threshold: float = 0.5):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        folder = _folder(folder, "the DeepBooru-style tagger", "multi-label image-classification")
        self.model = _load(AutoModelForImageClassification, folder, "the tagger").to(device, dtype)
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"the tagger folder {folder} lacks preprocessor_config.json ({exc})") from None
        self.device, self.dtype, self.threshold = device, dtype, threshold

    @torch.no_grad()
    def tags(self, image: Image.Image) -> list[tuple[str, float]]:
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        scores = torch.sigmoid(self.model(pixel_values=pixels.to(self.device, self.dtype)).logits.float())[0]
        labels = self.model.config.id2label
        found = [(labels[i].replace("_", " "), float(s)) for i, s in enumerate(scores) if s >= self.threshold]
        return sorted(found, key=lambda t: -t[1])

    def interrogate(self, image: Image.Image) -> str:
        return ", ".join(tag for tag, _ in self.tags(image))


class Interrogators:
    """The backends of a data dir, each loaded on first use and kept."""

    def __init__(self, models_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32):
        self.models_dir, self.device, self.dtype = models_dir, device, dtype
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, backend: str):
        """The loaded backend: ``clip``, ``deepdanbooru``, or ``blip`` (:class:`BlipCaptioner`: the caption
        alone, BLIP's model shared with ``clip``'s)."""
        if backend not in BACKENDS and backend != CAPTIONER:
            raise ModelNotFoundError(f"unknown interrogator {backend!r}; use one of {', '.join(BACKENDS)}")
        with self._lock:
            if backend not in self._loaded:
                clip = self._loaded.get("clip")
                if backend == CAPTIONER:
                    self._loaded[backend] = clip.captioner if clip is not None else \
                        BlipCaptioner(self.models_dir / "BLIP", self.device, self.dtype)
                elif backend == "clip":
                    self._loaded[backend] = ClipInterrogator(self.models_dir / "BLIP", self.models_dir / "CLIP",
                                                             self.device, self.dtype,
                                                             captioner=self._loaded.get(CAPTIONER))
                else:
                    self._loaded[backend] = Tagger(self.models_dir / "deepbooru", self.device, self.dtype)
            return self._loaded[backend]

    def interrogate(self, image: Image.Image, backend: str = "clip") -> str:
        interrogator = self.get(backend)
        with self._lock:  # one image at a time per backend's modules
            return interrogator.interrogate(image)
