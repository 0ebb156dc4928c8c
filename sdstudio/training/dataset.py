"""A training set as kohya's sd-scripts reads one: images with captions, repeat folders, aspect buckets.

Layout: a folder of ``N_name`` sub-folders (kohya's DreamBooth layout: each image is seen N times an
epoch; ``name`` is the class tokens, the caption of an image that has no caption file), or a plain folder
of images (repeats 1). A caption is the first line of ``<image stem><caption_extension>`` beside the image
(kohya's default extension is ``.caption``; ``.txt`` when asked).

Buckets follow kohya's ``BucketManager``: the resolutions of area <= resolution² from ``min_bucket_reso`` to
``max_bucket_reso`` in ``bucket_reso_steps`` steps; an image goes to the bucket of the nearest aspect ratio,
scaled to cover it and centre-cropped (with ``bucket_no_upscale`` an image is only ever shrunk, to at most
resolution² pixels, and its bucket is its own size floored to the step).

Everything random (epoch order, flips, caption shuffles and dropouts) is drawn from generators seeded with
``(seed, epoch[, batch])``, so batch ``b`` of epoch ``e`` is the same whenever it is asked for: a resumed
run sees exactly the batches an uninterrupted one would.

Latent caching (kohya's ``cache_latents``): :meth:`TrainingDataset.cache_latents` encodes every picture once
(and its mirror image when flipping is on, as kohya caches ``latents_flipped``) and keeps the VAE's latent
distribution, mean and spread; batches then carry those instead of pixels. The trainer still draws a new
latent sample from that distribution at each step, as it does from a fresh encoding, so a cached run computes
the losses an uncached one does (up to float rounding of one-by-one against batched encoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """A training folder that cannot be used (no images, no such folder)."""


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int
    folder: str  # the sub-folder's name: the key of ss_tag_frequency / ss_dataset_dirs
    size: tuple[int, int]  # (width, height) of the file
    bucket: tuple[int, int] = (0, 0)  # (width, height) it trains at
    resized: tuple[int, int] = (0, 0)  # the size it is scaled to before the centre crop


@dataclass
class Batch:
    pixels: torch.Tensor | None  # [B, 3, H, W] in [-1, 1]; None when the latents are cached
    captions: list[str]
    original_sizes: list[tuple[int, int]]  # (height, width), as SDXL's size conditioning takes them
    crops: list[tuple[int, int]]  # (top, left) of the crop, in the resized image
    flipped: list[bool]
    paths: list[Path]
    latents: tuple[torch.Tensor, torch.Tensor] | None = None  # cached: the VAE's (mean, std), [B, C, h, w] each
    size: tuple[int, int] = (0, 0)  # (height, width) of the pictures (the bucket)


def bucket_resolutions(resolution: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                       step: int = 64) -> list[tuple[int, int]]:
    """kohya's predefined buckets (``model_util.make_bucket_resolutions``): the square of area <= w*h and
    every width from ``min_size`` to ``max_size`` with the largest height in range that keeps the area."""
    max_area = resolution[0] * resolution[1]
    width = int(math.sqrt(max_area) // step) * step
    resos = {(width, width)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def _round_to_steps(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def select_bucket(width: int, height: int, resos: list[tuple[int, int]], *, no_upscale: bool, max_area: int,
                  step: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized size) of an image, as kohya's ``BucketManager.select_bucket``."""
    aspect = width / height
    if not no_upscale:
        reso = (width, height)
        if reso not in resos:
            ratios = np.array([w / h for w, h in resos])
            reso = resos[int(np.abs(ratios - aspect).argmin())]
        scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    elif width * height > max_area:
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw = _round_to_steps(rw, step)
        bh_w = _round_to_steps(bw / aspect, step)
        bh = _round_to_steps(rh, step)
        bw_h = _round_to_steps(bh * aspect, step)
        if abs(bw / bh_w - aspect) < abs(bw_h / bh - aspect):
            resized = (bw, int(bw / aspect + 0.5))
        else:
            resized = (int(bh * aspect + 0.5), bh)
    else:
        resized = (width, height)
    if no_upscale:
        reso = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    return reso, resized


def _repeats_folder(name: str) -> tuple[int, str] | None:
    """kohya's ``N_name`` -> (N, class tokens); None when the name does not start with a count."""
    head, _, rest = name.partition("_")
    try:
        n = int(head)
    except ValueError:
        return None
    return n, rest


def read_caption(image: Path, extension: str) -> str | None:
    """The first line of the caption file beside ``image`` (kohya also tries the name without a face-crop
    suffix ``_a_b_c_d``), or None."""
    stem = str(image.with_suffix(""))
    tokens = stem.split("_")
    candidates = [stem + extension]
    if len(tokens) >= 5:
        candidates.append("_".join(tokens[:-4]) + extension)
    for c in candidates:
        p = Path(c)
        if p.is_file():
            lines = p.read_text(encoding="utf-8").splitlines()
            return lines[0].strip() if lines else ""
    return None


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """``{folder: {tag: count}}`` as kohya's ``set_tag_frequency``: comma-separated, stripped, lower-cased,
    each image once (not per repeat)."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        freq = out.setdefault(item.folder, {})
        for tag in item.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return out


@dataclass
class CaptionOptions:
    shuffle: bool = False  # shuffle the comma-separated tags (after the first keep_tokens)
    keep_tokens: int = 0  # the first N tags stay in place and are never dropped
    tag_dropout: float = 0.0  # each other tag left out with this probability
    dropout: float = 0.0  # the whole caption left empty with this probability
    separator: str = ","


def process_caption(caption: str, opts: CaptionOptions, rng: np.random.Generator) -> str:
    """kohya's ``process_caption``: caption dropout first, then (when shuffling or dropping tags) the tags
    split on the separator, the first ``keep_tokens`` fixed, the rest shuffled and dropped, joined by ", "."""
    if opts.dropout > 0 and rng.random() < opts.dropout:
        return ""
    caption = caption.split("\n")[0]
    if not (opts.shuffle or opts.tag_dropout > 0):
        return caption
    tokens = [t.strip() for t in caption.strip().split(opts.separator)]
    fixed, flex = tokens[:opts.keep_tokens], tokens[opts.keep_tokens:]
    if opts.shuffle:
        flex = [flex[i] for i in rng.permutation(len(flex))]
    if opts.tag_dropout > 0:
        flex = [t for t in flex if rng.random() >= opts.tag_dropout]
    return ", ".join(fixed + flex)


@dataclass
class TrainingDataset:
    """Images, captions and buckets of one training folder. Build with :meth:`from_folder`."""

    items: list[ImageItem]
    resolution: tuple[int, int]
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    seed: int = 0
    root: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, why) of unusable images
    folders: dict[str, tuple[int, int]] = field(default_factory=dict)  # folder -> (repeats, image count)
    cache_images: bool = True
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(cls, root: str | Path, *, resolution: int | tuple[int, int] = 512,
                    caption_extension: str = ".caption", enable_bucket: bool = True, min_bucket_reso: int = 256,
                    max_bucket_reso: int = 1024, bucket_reso_steps: int = 64, bucket_no_upscale: bool = False,
                    flip_aug: bool = False, shuffle_caption: bool = False, keep_tokens: int = 0,
                    caption_tag_dropout_rate: float = 0.0, caption_dropout_rate: float = 0.0,
                    caption_separator: str = ",", seed: int = 0, cache_images: bool = True) -> TrainingDataset:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: not a folder")
        if not caption_extension.startswith("."):
            caption_extension = "." + caption_extension
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        subsets: list[tuple[Path, int, str]] = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            parsed = _repeats_folder(sub.name)
            if parsed and parsed[0] >= 1:
                subsets.append((sub, parsed[0], parsed[1]))
        if not subsets:  # a plain folder (or one N_name folder given directly)
            parsed = _repeats_folder(root.name)
            subsets = [(root, parsed[0], parsed[1]) if parsed and parsed[0] >= 1 else (root, 1, "")]
        items, skipped, folders = [], [], {}
        for folder, repeats, class_tokens in subsets:
            count = 0
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
                try:
                    with Image.open(path) as im:
                        im.load()  # a truncated file fails here, not mid-training
                        size = im.size
                except Exception as exc:  # noqa: BLE001 - any unreadable image is reported and skipped
                    skipped.append((str(path.relative_to(root)) if path.is_relative_to(root) else path.name,
                                    f"{type(exc).__name__}: {exc}"))
                    continue
                caption = read_caption(path, caption_extension)
                items.append(ImageItem(path, class_tokens if caption is None else caption, repeats, folder.name, size))
                count += 1
            folders[folder.name] = (repeats, count)
        if not items:
            raise DatasetError(f"{root}: no usable images" + (f" ({len(skipped)} unreadable)" if skipped else ""))
        ds = cls(items, res, CaptionOptions(shuffle_caption, keep_tokens, caption_tag_dropout_rate,
                                            caption_dropout_rate, caption_separator),
                 flip_aug, enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale,
                 seed, root, skipped, folders, cache_images)
        ds.assign_buckets()
        return ds

    def assign_buckets(self) -> None:
        if not self.enable_bucket:
            for item in self.items:
                w, h = item.size
                scale = max(self.resolution[0] / w, self.resolution[1] / h)
                item.bucket = self.resolution
                item.resized = (max(self.resolution[0], int(w * scale + 0.5)), max(self.resolution[1], int(h * scale + 0.5)))
            return
        resos = bucket_resolutions(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)
        for item in self.items:
            item.bucket, item.resized = select_bucket(*item.size, resos, no_upscale=self.bucket_no_upscale,
                                                      max_area=self.resolution[0] * self.resolution[1],
                                                      step=self.bucket_reso_steps)

    # ---- what kohya's metadata records --------------------------------------------------------------
    @property
    def num_train_images(self) -> int:
        """Images x repeats (kohya's ``num_train_images``)."""
        return sum(item.repeats for item in self.items)

    @property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        return tag_frequency(self.items)

    @property
    def bucket_info(self) -> dict:
        """kohya's ``ss_bucket_info``: ``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}``."""
        counts: dict[tuple[int, int], int] = {}
        for item in self.items:
            counts[item.bucket] = counts.get(item.bucket, 0) + item.repeats
        errors = [abs(i.bucket[0] / i.bucket[1] - i.size[0] / i.size[1]) for i in self.items]
        return {"buckets": {i: {"resolution": list(r), "count": counts[r]} for i, r in enumerate(sorted(counts))},
                "mean_img_ar_error": float(np.mean(errors))}

    # ---- epochs and batches ---------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """The batches of one epoch as lists of item indices: each item ``repeats`` times, grouped by bucket,
        shuffled within buckets, cut into batches, and the batches shuffled (kohya's order of work)."""
        rng = np.random.default_rng([self.seed, epoch])
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([i] * item.repeats)
        batches = []
        for reso in sorted(by_bucket):
            members = by_bucket[reso]
            members = [members[j] for j in rng.permutation(len(members))]
            batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
        return [batches[j] for j in rng.permutation(len(batches))]

    def batches_per_epoch(self, batch_size: int) -> int:
        counts: dict[tuple[int, int], int] = {}
        for item in self.items:
            counts[item.bucket] = counts.get(item.bucket, 0) + item.repeats
        return sum(-(-n // batch_size) for n in counts.values())

    def _pixels(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The item resized and centre-cropped to its bucket (uint8 HxWx3) and the crop's (top, left)."""
        item = self.items[index]
        bw, bh = item.bucket
        rw, rh = item.resized
        top, left = (rh - bh) // 2, (rw - bw) // 2
        if index in self._cache:
            return self._cache[index], (top, left)
        with Image.open(item.path) as im:
            im = im.convert("RGB")
            if (rw, rh) != im.size:
                im = im.resize((rw, rh), Image.Resampling.LANCZOS)
            arr = np.asarray(im)[top:top + bh, left:left + bw].copy()
        if self.cache_images:
            self._cache[index] = arr
        return arr, (top, left)

    def picture(self, index: int, flip: bool = False) -> torch.Tensor:
        """Item ``index`` as the trainer sees it ([3, H, W] in [-1, 1]), mirrored when ``flip``."""
        arr = self._pixels(index)[0]
        arr = arr[:, ::-1] if flip else arr
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1

    @property
    def latents_cached(self) -> bool:
        return bool(self._latents)

    def cache_latents(self, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Encode every picture once (its mirror image too when flipping is on): ``encode(pixels [1, 3, H, W])``
        gives the VAE's latent (mean, std); they are kept on the CPU and the pictures are dropped."""
        latents = {}
        for i in range(len(self.items)):
            for flip in (False, True) if self.flip_aug else (False,):
                mean, std = encode(self.picture(i, flip)[None])
                latents[(i, flip)] = (mean[0].detach().cpu(), std[0].detach().cpu())
        self._latents = latents
        self._cache.clear()

    def load_batch(self, indices: list[int], epoch: int, batch: int) -> Batch:
        """One batch with its augmentations (flips, caption processing) drawn for (seed, epoch, batch); with
        cached latents it carries them instead of the pixels (the same draws either way)."""
        rng = np.random.default_rng([self.seed, epoch, batch, 1])
        pictures, captions, sizes, crops, flips, paths = [], [], [], [], [], []
        for i in indices:
            item = self.items[i]
            bw, bh = item.bucket
            rw, rh = item.resized
            flip = bool(self.flip_aug and rng.random() < 0.5)
            pictures.append(self._latents[(i, flip)] if self._latents else self.picture(i, flip))
            captions.append(process_caption(item.caption, self.captions, rng))
            w, h = item.size
            sizes.append((h, w))
            crops.append(((rh - bh) // 2, (rw - bw) // 2))
            flips.append(flip)
            paths.append(item.path)
        size = (self.items[indices[0]].bucket[1], self.items[indices[0]].bucket[0])
        if self._latents:
            latents = (torch.stack([m for m, _ in pictures]), torch.stack([s for _, s in pictures]))
            return Batch(None, captions, sizes, crops, flips, paths, latents, size)
        return Batch(torch.stack(pictures), captions, sizes, crops, flips, paths, None, size)
