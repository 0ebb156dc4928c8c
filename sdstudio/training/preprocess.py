"""Preparing a training folder: A1111's "Preprocess images" (resize, flipped copies, split oversized pictures,
focal point and auto-sized crops, captions by BLIP and/or DeepBooru) and auto-captioning a kohya folder in
place.

:func:`preprocess_images` follows A1111's ``textual_inversion/preprocess.py``: every file of the source folder
(sorted, case-insensitively) that opens as a picture is brought to width x height by "Crop and resize"
(or kept at its size, or cut into overlapping tiles when it is much longer than the target's shape), saved
as ``<index:05>-<subindex>-<name>.png`` in the destination with a ``.txt`` caption: the captioners' text
(BLIP's caption, then the DeepBooru tags after ", "), combined with an existing ``<name>.txt`` beside the
source as ``txt_action`` says (``ignore``, ``copy``, ``prepend``, ``append``); with ``flip`` a mirrored copy
follows each picture. Files that are not pictures are reported by name and skipped, never fatal.

:func:`caption_folder` writes a caption file beside every picture of a kohya folder (``N_name`` sub-folders
included) that has none, as kohya's ``make_captions.py`` / ``tag_images_by_wd14_tagger.py`` do; the LoRA and
Dreambooth jobs' ``caption_missing`` option (``blip``, ``deepbooru`` or ``both``) runs it on the dataset folder
before training (:func:`caption_job_dataset`).

Captioners are plain ``picture -> text`` callables; :func:`interrogator_captioners` makes them from the
engine's interrogators (:mod:`sdstudio.engine.interrogate`), and says clearly which model folder is missing
when their weights are not installed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from ..core.imageops import resize_image
from .dataset import IMAGE_EXTENSIONS, _repeats_folder
from .focal import FocalCrop, retinaface_detector
from .loop import TrainingError

log = logging.getLogger(__name__)

TXT_ACTIONS = ("ignore", "copy", "prepend", "append")
CAPTION_SUFFIXES = (".txt", ".caption")
Captioner = Callable[[Image.Image], str]


@dataclass
class PreprocessResult:
    written: list[Path] = field(default_factory=list)  # the pictures saved (their captions lie beside them)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, why) of unusable files
    interrupted: bool = False

    @property
    def info(self) -> str:
        """A1111's reply, with what was skipped."""
        text = "Preprocess finished" if not self.interrupted else "Preprocess interrupted"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(f"{n} ({why})" for n, why in self.skipped)
        return text


def interrogator_captioners(interrogators, *, blip: bool = False, deepbooru: bool = False,
                            option: str | None = None) -> list[Captioner]:
    """A1111's "Use BLIP for caption" / "Use deepbooru for caption" as captioners, loaded now: a model that is
    not installed raises :class:`TrainingError` naming the option (A1111's label, or ``option``) and the folder
    to fill."""
    from ..models.errors import ModelFileError, ModelNotFoundError

    out: list[Captioner] = []
    for wanted, backend, label in ((blip, "blip", "Use BLIP for caption"),
                                   (deepbooru, "deepdanbooru", "Use deepbooru for caption")):
        if not wanted:
            continue
        try:
            model = interrogators.get(backend)  # "blip": the BLIP caption model alone, not CLIP's ranking
        except (ModelNotFoundError, ModelFileError) as exc:
            raise TrainingError(f"{option or label}: {exc}") from None
        out.append(model.interrogate)
    return out


def _caption(picture: Image.Image, captioners: list[Captioner]) -> str:
    return ", ".join(t for t in (c(picture).strip() for c in captioners) if t)


def combine_caption(caption: str, existing: str | None, action: str) -> str:
    """A1111's "Existing Caption txt Action" on the generated caption and the source's ``.txt``."""
    if existing:
        if action == "prepend":
            caption = f"{existing} {caption}"
        elif action == "append":
            caption = f"{caption} {existing}"
        elif action == "copy":
            caption = existing
    return caption.strip()


def split_picture(image: Image.Image, width: int, height: int, overlap_ratio: float) -> Iterator[Image.Image]:
    """A1111's ``split_pic``: a picture much longer than the target's shape, scaled to the target's short side
    and cut along its long side into tiles of the target's size that overlap by about ``overlap_ratio``."""
    inverse = image.height <= image.width  # landscape: cut along x
    from_w, from_h = (image.height, image.width) if inverse else (image.width, image.height)
    to_w, to_h = (height, width) if inverse else (width, height)
    h = from_h * to_w // from_w
    image = image.resize((h, to_w) if inverse else (to_w, h))
    count = max(2, math.ceil((h - to_h * overlap_ratio) / (to_h * (1.0 - overlap_ratio))))
    step = (h - to_h) / (count - 1)
    for i in range(count):
        y = int(step * i)
        yield image.crop((y, 0, y + to_h, to_w) if inverse else (0, y, to_w, y + to_h))


MULTICROP_OBJECTIVES = ("Maximize area", "Minimize error")


@dataclass
class AutoCrop:
    """A1111's "Auto-sized crop": each picture centre-cropped to the size (multiples of 64 from ``mindim`` to
    ``maxdim``, area from ``minarea`` to ``maxarea``) whose shape is closest to the picture's, the error
    ``1 - min(r, 1/r)`` of the aspect ratios' ratio at most ``threshold``: of those the largest
    (``Maximize area``) or the closest in shape (``Minimize error``)."""

    mindim: int = 384
    maxdim: int = 768
    minarea: int = 64 * 64
    maxarea: int = 640 * 640
    objective: str = "Maximize area"
    threshold: float = 0.1

    def __post_init__(self) -> None:
        if self.objective not in MULTICROP_OBJECTIVES:
            raise TrainingError(f"Preprocess: resizing objective {self.objective!r} is not one of "
                                f"{', '.join(MULTICROP_OBJECTIVES)}")
        if not 64 <= self.mindim <= self.maxdim <= 8192:
            raise TrainingError(f"Preprocess: dimension bounds must be 64 <= lower <= upper <= 8192, got "
                                f"{self.mindim}, {self.maxdim}")

    def size(self, width: int, height: int) -> tuple[int, int] | None:
        """The crop's (width, height) for a ``width`` x ``height`` picture, None when no size is close enough."""
        def error(w: int, h: int) -> float:
            r = (width / height) / (w / h)
            return 1 - (r if r < 1 else 1 / r)

        sizes = [(w, h) for w in range(self.mindim, self.maxdim + 1, 64) for h in range(self.mindim, self.maxdim + 1, 64)
                 if self.minarea <= w * h <= self.maxarea and error(w, h) <= self.threshold]
        if not sizes:
            return None
        if self.objective == "Maximize area":
            return max(sizes, key=lambda wh: (wh[0] * wh[1], -error(*wh)))
        return max(sizes, key=lambda wh: (-error(*wh), wh[0] * wh[1]))


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centred region of ``width:height`` shape (fractional edges), resized to that size (Lanczos)."""
    iw, ih = image.size
    if ih / height < iw / width:  # wider than the target: the sides go
        w = width * ih / height
        box = ((iw - w) / 2, 0, (iw + w) / 2, ih)
    else:
        h = height * iw / width
        box = (0, (ih - h) / 2, iw, (ih + h) / 2)
    return image.resize((width, height), Image.Resampling.LANCZOS, box)


def _listing(folder: Path) -> list[Path]:
    """A1111's ``listfiles``: the folder's files, sorted case-insensitively, dot-files left out."""
    return [p for p in sorted(folder.iterdir(), key=lambda p: p.name.lower())
            if p.is_file() and not p.name.startswith(".")]


def preprocess_images(src: str | Path, dst: str | Path, width: int = 512, height: int = 512, *,
                      txt_action: str = "ignore", keep_original_size: bool = False, flip: bool = False,
                      split: bool = False, split_threshold: float = 0.5, overlap_ratio: float = 0.2,
                      focal: FocalCrop | None = None, multicrop: AutoCrop | None = None,
                      captioners: list[Captioner] | None = None,
                      on_progress: Callable[[int, int, str], None] | None = None,
                      should_stop: Callable[[], bool] | None = None) -> PreprocessResult:
    """A1111's Preprocess images from ``src`` into ``dst`` (see the module's text), in its order: split
    oversized pictures, the focal point crop of a picture that is not square (``focal``, to width x height:
    :mod:`sdstudio.training.focal`; its debug picture follows the crop), the auto-sized crop (``multicrop``),
    the original size; the crop and resize when none of these applied. ``on_progress(i, n, name)`` before each file; ``should_stop`` ends the run after the
    current file."""
    src, dst = Path(src), Path(dst)
    if not str(src) or not src.is_dir():
        raise TrainingError(f"Preprocess: source directory {src} does not exist")
    if src.resolve() == dst.resolve():
        raise TrainingError("Preprocess: the destination must differ from the source")
    if txt_action not in TXT_ACTIONS:
        raise TrainingError(f"Preprocess: existing caption action {txt_action!r} is not one of {', '.join(TXT_ACTIONS)}")
    if not (64 <= int(width) <= 8192 and 64 <= int(height) <= 8192):
        raise TrainingError(f"Preprocess: width and height must be 64 to 8192, got {width}x{height}")
    if not 0 <= overlap_ratio < 1 or not 0 <= split_threshold <= 1:
        raise TrainingError("Preprocess: split threshold must be in [0, 1] and overlap ratio in [0, 1)")
    dst.mkdir(parents=True, exist_ok=True)
    captioners = captioners or []
    result = PreprocessResult()
    files = _listing(src)
    for index, path in enumerate(files):
        if path.suffix.lower() in CAPTION_SUFFIXES:
            continue
        if should_stop is not None and should_stop():
            result.interrupted = True
            break
        if on_progress is not None:
            on_progress(index, len(files), path.name)
        try:
            with Image.open(path) as im:
                img = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any file that is not a readable picture is reported and skipped
            result.skipped.append((path.name, f"not a readable picture ({type(exc).__name__}: {exc})"))
            log.warning("preprocess: skipping %s (%s)", path.name, exc)
            continue
        txt = path.with_suffix(".txt")
        existing = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        if img.height > img.width:
            ratio = (img.width * height) / (img.height * width)
        else:
            ratio = (img.height * width) / (img.width * height)
        pictures: list[Image.Image] = []
        resize = True  # A1111: the plain crop and resize only when no other way applied
        if split and ratio < 1.0 and ratio <= split_threshold:
            pictures += split_picture(img, width, height, overlap_ratio)
            resize = False
        if focal is not None and img.height != img.width:
            pictures += focal.crop(img)
            resize = False
        if multicrop is not None:
            size = multicrop.size(img.width, img.height)
            if size is None:
                why = f"auto-sized crop: no size within the error threshold for {img.width}x{img.height}"
                result.skipped.append((path.name, why))
            else:
                pictures.append(center_crop(img, *size))
            resize = False
        if keep_original_size:
            pictures.append(img)
            resize = False
        if resize:
            pictures.append(resize_image(1, img, int(width), int(height)))
        if flip:
            pictures = [p for pic in pictures for p in (pic, ImageOps.mirror(pic))]
        for subindex, pic in enumerate(pictures):
            base = dst / f"{index:05}-{subindex}-{path.stem}"
            pic.save(base.with_suffix(".png"))
            caption = combine_caption(_caption(pic, captioners), existing, txt_action)
            if caption:
                base.with_suffix(".txt").write_text(caption, encoding="utf-8")
            result.written.append(base.with_suffix(".png"))
    return result


def uncaptioned(root: str | Path, extension: str = ".caption", *, overwrite: bool = False) -> list[Path]:
    """The pictures of a training folder, and of its ``N_name`` sub-folders, without a ``<stem><extension>``
    caption beside them (all of them with ``overwrite``)."""
    root = Path(root)
    if not root.is_dir():
        raise TrainingError(f"{root}: not a folder")
    extension = extension if extension.startswith(".") else "." + extension
    folders = [root] + [p for p in sorted(root.iterdir()) if p.is_dir() and _repeats_folder(p.name)]
    return [path for folder in folders
            for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if overwrite or not path.with_suffix(extension).exists()]


def caption_folder(root: str | Path, captioners: list[Captioner], *, extension: str = ".caption",
                   overwrite: bool = False, on_progress: Callable[[int, int, str], None] | None = None
                   ) -> PreprocessResult:
    """A caption file (``<stem><extension>``, the first line kohya reads) beside each picture of a training
    folder, and of its ``N_name`` sub-folders, that has none (every picture with ``overwrite``); pictures that
    cannot be read are reported by name and skipped. ``written`` lists the captioned pictures;
    ``on_progress(i, n, name)`` comes before each."""
    root = Path(root)
    if not captioners:
        raise TrainingError("captioning needs at least one captioner (BLIP or DeepBooru)")
    extension = extension if extension.startswith(".") else "." + extension
    result = PreprocessResult()
    pictures = uncaptioned(root, extension, overwrite=overwrite)
    for i, path in enumerate(pictures):
        name = str(path.relative_to(root))
        if on_progress is not None:
            on_progress(i, len(pictures), name)
        try:
            with Image.open(path) as im:
                picture = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - reported and skipped, as the dataset does
            result.skipped.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        path.with_suffix(extension).write_text(_caption(picture, captioners) + "\n", encoding="utf-8")
        result.written.append(path)
    return result


# ---- captions at training time (the LoRA and Dreambooth jobs' caption_missing) ---------------------------
CAPTION_MISSING = {"blip": (True, False), "deepbooru": (False, True), "both": (True, True)}


def check_caption_missing(value: str | None) -> str | None:
    """The ``caption_missing`` training option: None or "" (off), ``blip`` (BLIP's caption), ``deepbooru``
    (DeepBooru's tags) or ``both`` (the caption, then the tags)."""
    if value in (None, ""):
        return None
    if value not in CAPTION_MISSING:
        raise TrainingError(f"caption_missing: {value!r} is not one of {', '.join(CAPTION_MISSING)} (or empty: off)")
    return value


def caption_missing(interrogators, root: str | Path, which: str, *, extension: str = ".caption",
                    on_text: Callable[[str], None] | None = None) -> PreprocessResult:
    """Training-time auto-captioning: a caption written beside each picture of the training folder (and its
    ``N_name`` sub-folders) that has none, by BLIP, DeepBooru or both (``which``, see
    :func:`check_caption_missing`), as kohya's ``make_captions.py`` writes them before a run. The
    interrogators load only when some picture lacks a caption; their weights missing is a
    :class:`TrainingError` naming the folder to fill. ``on_text`` hears "Captioning [i/n]: name"."""
    which = check_caption_missing(which)
    if which is None or not uncaptioned(root, extension):
        return PreprocessResult()
    blip, deepbooru = CAPTION_MISSING[which]
    captioners = interrogator_captioners(interrogators, blip=blip, deepbooru=deepbooru,
                                         option=f"caption_missing ({which})")
    progress = None if on_text is None else (lambda i, n, name: on_text(f"Captioning [{i + 1}/{n}]: {name}"))
    return caption_folder(root, captioners, extension=extension, on_progress=progress)


def caption_job_dataset(engine, spec: dict, on_text: Callable[[str], None] | None = None) -> list[str]:
    """A LoRA / Dreambooth job's ``caption_missing`` done on its dataset folder with the engine's
    interrogators, before the run reads the captions: the pictures captioned (paths inside the folder)."""
    which = spec.get("caption_missing")
    if not which:
        return []
    dataset = spec["dataset"]
    root = Path(dataset["root"])
    result = caption_missing(engine.interrogators, root, which, extension=dataset.get("caption_extension", ".caption"),
                             on_text=on_text)
    return [str(p.relative_to(root)) for p in result.written]


# ---- queue jobs -----------------------------------------------------------------------------------------
@dataclass
class PreprocessProgress:
    """A preprocess job's progress, as the ``train`` job's worker reads it (step, total, textinfo, preview:
    :class:`~sdstudio.training.loop.TrainProgress`'s names)."""

    step: int  # the file being read, 0-based as A1111 counts it
    total: int
    name: str
    preview: Image.Image | None = None

    @property
    def textinfo(self) -> str:
        return f"Preprocessing [Image {self.step}/{self.total}]"


def run_job(engine, request: dict, *, on_progress: Callable[[PreprocessProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
    """A ``train`` job with ``what`` "preprocess": ``kwargs`` are :func:`preprocess_images`' (folders
    already checked by the caller), with ``blip`` / ``deepbooru`` for the captioners (the engine's
    interrogators, loaded now), ``multicrop`` an :class:`AutoCrop`'s fields or None and ``focal`` a
    :class:`~sdstudio.training.focal.FocalCrop`'s weights and ``debug`` or None (faces by face restoration's
    RetinaFace file when installed; ``note`` says when it is not)."""
    kwargs = dict(request.get("kwargs") or {})
    captioners = interrogator_captioners(engine.interrogators, blip=bool(kwargs.pop("blip", False)),
                                         deepbooru=bool(kwargs.pop("deepbooru", False)))
    multicrop = kwargs.pop("multicrop", None)
    focal, note = focal_crop(engine, kwargs.pop("focal", None), int(kwargs.get("width", 512)),
                             int(kwargs.get("height", 512)))
    progress = None if on_progress is None else (lambda i, n, name: on_progress(PreprocessProgress(i, n, name)))
    result = preprocess_images(kwargs.pop("src"), kwargs.pop("dst"), captioners=captioners, focal=focal,
                               multicrop=AutoCrop(**multicrop) if multicrop else None, on_progress=progress,
                               should_stop=should_stop, **kwargs)
    return {"info": result.info, "written": [str(p) for p in result.written],
            "skipped": [list(s) for s in result.skipped], "interrupted": result.interrupted, "note": note}


def focal_crop(engine, options: dict | None, width: int, height: int) -> tuple[FocalCrop | None, str]:
    """The job's focal point crop (``options``: ``face_weight``, ``entropy_weight``, ``edges_weight``,
    ``debug``) with the engine's face detector, and a note when faces count but no detector is installed."""
    if not options:
        return None, ""
    crop = FocalCrop(width, height, **options)
    if crop.face_weight <= 0:
        return crop, ""
    from ..models.errors import ModelFileError

    detector = engine.faces.detector_file("CodeFormer")  # either face restoration folder
    if detector is None:
        folders = " or ".join(str(p) for p in engine.paths.face_restorer_dirs.values())
        return crop, (f"Auto focal point crop: faces not scored (no face detector: put facexlib's "
                      f"detection_Resnet50_Final.pth in {folders})")
    try:
        crop.faces = retinaface_detector(detector, engine.plan.device)
    except ModelFileError as exc:
        raise TrainingError(f"Auto focal point crop: {exc}") from None
    return crop, ""
