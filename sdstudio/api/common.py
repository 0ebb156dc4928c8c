"""What every API router shares: who the caller is, limits on what a request may carry, images in and out."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from PIL import Image, ImageOps
from starlette.requests import Request

from ..core.imageops import UPLOAD_FORMATS

CLIENT_HEADER = "x-sdstudio-client"
MAX_INPUT_PIXELS = 64 * 1024 * 1024  # an uploaded image larger than 64 MP is refused before decoding
MAX_B64_CHARS = 96 * 1024 * 1024


def client_id(request: Request) -> str:
    """The caller a job belongs to: an explicit ``X-Sdstudio-Client`` id, else the API user, else the
    address. Interrupt, skip, cancel and ``/progress`` act on this caller's jobs only."""
    explicit = request.headers.get(CLIENT_HEADER, "").strip()
    if explicit:
        return "id:" + explicit[:128]
    user = getattr(request.state, "api_user", None)
    if user:
        return "user:" + user
    return "addr:" + (request.client.host if request.client else "unknown")


def decode_image(data: str, field: str = "image") -> Image.Image:
    """A base64 (optionally ``data:`` URL) image from a request, checked before it is decoded."""
    if not isinstance(data, str) or not data:
        raise HTTPException(422, f"{field}: expected a base64-encoded image")
    if len(data) > MAX_B64_CHARS:
        raise HTTPException(413, f"{field}: image data of {len(data)} characters is over the limit of {MAX_B64_CHARS}")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{field}: not valid base64") from None
    limit = f"the limit of {MAX_INPUT_PIXELS // 2**20} megapixels"
    Image.init()  # registers every plugin: open() given a format list looks only among those registered
    try:
        image = Image.open(io.BytesIO(raw), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own check, on the size the header claims
        raise HTTPException(413, f"{field}: the image is over {limit} ({exc})") from None
    except Exception:  # noqa: BLE001 - a decoder fed hostile bytes may raise anything; the client hears why
        raise HTTPException(422, f"{field}: not a {', '.join(UPLOAD_FORMATS[:-1])} or {UPLOAD_FORMATS[-1]} "
                                 "image (or damaged at its start)") from None
    w, h = image.size
    if w * h > MAX_INPUT_PIXELS:
        raise HTTPException(413, f"{field}: {w}x{h} is over {limit}")
    try:
        image.load()
        return upright(image)
    except MemoryError:
        raise HTTPException(413, f"{field}: {w}x{h} is too large to decode in this server's memory") from None
    except Exception as exc:  # noqa: BLE001 - as above
        raise HTTPException(422, f"{field}: the image is damaged ({exc})") from None


def upright(image: Image.Image) -> Image.Image:
    """A decoded upload as A1111's ``images.read`` gives it (turned as its EXIF orientation says; a PNG's
    transparent colour made alpha), and in a mode the queue can store and the engine can convert: CMYK, YCbCr,
    LAB, HSV to RGB; 16- and 32-bit grey and float to 8-bit grey, scaled (not clipped to white); PA to RGBA.
    The text chunks (its infotext) are kept."""
    image = ImageOps.exif_transpose(image)
    info = dict(image.info)  # after turning: its EXIF no longer says to turn
    mode = image.mode
    if mode in ("P", "RGB") and isinstance(image.info.get("transparency"), bytes) or mode in ("PA", "RGBa", "La"):
        image = image.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode == "F" or mode.startswith("I"):
        arr = np.asarray(image, dtype=np.float64)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        if mode == "F" and top <= 1.0:
            arr = arr * 255.0  # floats in 0..1
        elif mode.startswith("I;16") or top > 255:
            arr = arr / 257.0  # 16-bit samples: 65535 is white
        image = Image.fromarray(np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8), "L")
    for key, value in info.items():
        image.info.setdefault(key, value)
    return image


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def from_this_machine(request: Request) -> bool:
    """The caller runs on the server's machine (a server started without --listen has no other callers)."""
    host = request.client.host if request.client else ""
    return host in LOOPBACK or host.startswith("127.")


def server_file(request: Request, data_dir: Path, path: str, field: str) -> str:
    """A server file a request names for reading (a Deforum init video, a training folder): anywhere for a
    caller on this machine, as in A1111; for one from the network, an absolute path inside the data dir."""
    if from_this_machine(request):
        return path
    if not Path(path).is_absolute():
        raise HTTPException(403, f"{field}: {path!r}: give the file's full path inside the data folder "
                                 f"{Path(data_dir).resolve()} (this server is shared over the network)")
    return str(inside(data_dir, path, field, "the data folder (this server is shared over the network)"))


def encode_file(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def inside(base: Path, requested: str | None, field: str, what: str = "the outputs folder") -> Path | None:
    """A folder a request names, which must lie inside ``base`` (relative paths are taken from it)."""
    if not requested:
        return None
    base = Path(base).resolve()
    try:
        target = (base / requested).resolve()
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the file system
        raise HTTPException(422, f"{field}: {requested!r} is not a usable path ({exc})") from None
    if target != base and base not in target.parents:
        raise HTTPException(403, f"{field}: {requested!r} is outside {what} {base}")
    return target
