"""Writing images the way A1111 names and tags them.

Folders: ``outputs/txt2img-images/YYYY-MM-DD/`` and ``outputs/txt2img-grids/YYYY-MM-DD/``.
Names: ``00000-<seed>.png`` for images and ``grid-0000.png`` for grids; the number continues from
the highest already in the folder, so nothing is ever overwritten. The infotext goes into the PNG
``parameters`` text chunk (EXIF UserComment for JPEG/WebP). Files are written to a temporary name,
flushed and renamed, so a crash never leaves a half-written image under a real name.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import math
import os
import threading
from pathlib import Path

from PIL import Image, PngImagePlugin

_EXIF_USER_COMMENT = 0x9286
_EXIF_IFD = 0x8769
_number_lock = threading.Lock()


def dated_dir(outputs_dir: Path, kind: str, when: _dt.date | None = None) -> Path:
    return Path(outputs_dir) / kind / (when or _dt.date.today()).isoformat()


def next_number(folder: Path, basename: str = "") -> int:
    """A1111's rule: one more than the highest leading number among files starting with ``basename``."""
    highest = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            if not name.startswith(basename):
                continue
            head = os.path.splitext(name[len(basename):])[0].lstrip("-").split("-")[0]
            if head.isdigit():
                highest = max(highest, int(head))
    return highest + 1


def _encode_exif_comment(text: str) -> bytes:
    return b"UNICODE\0" + text.encode("utf-16-be")


def _decode_exif_comment(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    if raw.startswith(b"UNICODE\0"):
        body = raw[8:]
        # Writers disagree on byte order; pick the one that decodes to mostly ASCII.
        be, le = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
        return be if sum(c.isascii() for c in be) >= sum(c.isascii() for c in le) else le
    if raw.startswith(b"ASCII\0\0\0"):
        return raw[8:].decode("ascii", "replace")
    return raw.decode("utf-8", "replace")


def save_image(image: Image.Image, folder: Path, *, infotext: str | None, basename: str = "",
               suffix: str = "", fmt: str = "png") -> Path:
    """Save with the next free number and the infotext embedded; returns the path written."""
    folder.mkdir(parents=True, exist_ok=True)
    with _number_lock:
        number = next_number(folder, basename)
        tmp = folder / f".{basename or 'image'}-{os.getpid()}-{threading.get_ident()}.{fmt}.tmp"
        try:
            write_image(image, tmp, infotext=infotext, fmt=fmt)
            while True:
                stem = f"{basename}-{number:04}" if basename else f"{number:05}"
                path = folder / f"{stem}{'-' + suffix if suffix else ''}.{fmt}"
                if _claim(tmp, path):
                    break
                number += 1  # taken: by an earlier file, or by another process writing the same folder
        finally:
            tmp.unlink(missing_ok=True)  # a failed write leaves no partial file behind
    return path


def _claim(tmp: Path, path: Path) -> bool:
    """Give the written file ``tmp`` the name ``path`` unless that name exists. A hard link claims the name
    atomically, so two processes (two workers writing one outputs folder) never take the same number;
    file systems without links fall back to check-then-rename."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        if path.exists():
            return False
        os.replace(tmp, path)
        return True


def write_image(image: Image.Image, path: Path, *, infotext: str | None, fmt: str = "png") -> None:
    fmt = fmt.lower()
    with open(path, "wb") as f:
        if fmt == "png":
            info = PngImagePlugin.PngInfo()
            if infotext:
                info.add_text("parameters", infotext)
            image.save(f, format="PNG", pnginfo=info)
        else:
            exif = Image.Exif()
            if infotext:
                exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = _encode_exif_comment(infotext)
            image.convert("RGB").save(f, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper(), exif=exif,
                                      quality=95)
        f.flush()
        os.fsync(f.fileno())


class NotAnImageError(ValueError):
    pass


def png_base64(image: Image.Image) -> str:
    """A picture as base64 PNG text: what the API answers with and what a ControlNet unit's ``image`` carries."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def read_infotext(path) -> str | None:
    """The generation parameters stored in an image (PNG text chunk or EXIF UserComment); None if none.
    ``path`` may also be a binary file object or an opened image."""
    if isinstance(path, Image.Image):
        return _infotext_of(path)
    try:
        with Image.open(path) as im:
            im.load()
            return _infotext_of(im)
    except (OSError, SyntaxError, ValueError) as exc:
        name = Path(path).name if isinstance(path, (str, Path)) else "the upload"
        raise NotAnImageError(f"{name}: not an image this program can read ({exc})") from None


def _infotext_of(im: Image.Image) -> str | None:
    text = im.info.get("parameters")
    if text:
        return str(text)
    comment = im.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    return _decode_exif_comment(comment) if comment else None


def grid_shape(n: int, batch_size: int = 1, n_rows: int = -1) -> tuple[int, int]:
    """(rows, cols) by A1111's rule: ``n_rows`` > 0 fixed, 0 = batch size, -1 = round(sqrt(n))."""
    if n_rows > 0:
        rows = n_rows
    elif n_rows == 0:
        rows = batch_size
    else:
        rows = round(math.sqrt(n))
    rows = max(1, min(rows, n))
    return rows, math.ceil(n / rows)


def image_grid(images: list[Image.Image], batch_size: int = 1, n_rows: int = -1) -> Image.Image:
    rows, cols = grid_shape(len(images), batch_size, n_rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def images_in(folder: Path) -> list[Path]:
    """The pictures of a batch folder, by name (img2img and extras batches from the CLI and the UI)."""
    from .params import RequestError

    found = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if Path(folder).is_dir() else []
    if not found:
        raise RequestError(f"{folder}: no images (png, jpg, webp) in it")
    return found


def mask_for(picture: Path, mask_dir: Path | str | None) -> str | None:
    """A batch's mask for ``picture``: the file with its name (any picture suffix) in ``mask_dir``."""
    if not mask_dir:
        return None
    found = sorted(m for m in Path(mask_dir).glob(Path(picture).stem + ".*") if m.suffix.lower() in IMAGE_SUFFIXES)
    return str(found[0]) if found else None

