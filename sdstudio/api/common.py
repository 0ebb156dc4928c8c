"""What every API router shares: who the caller is, limits on what a request may carry, images in and out."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from fastapi import HTTPException
from PIL import Image
from starlette.requests import Request

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
    try:
        image = Image.open(io.BytesIO(raw))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise HTTPException(422, f"{field}: not an image PIL can read") from None
    w, h = image.size
    if w * h > MAX_INPUT_PIXELS:
        raise HTTPException(413, f"{field}: {w}x{h} is over the limit of {MAX_INPUT_PIXELS // 2**20} megapixels")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise HTTPException(422, f"{field}: the image is damaged ({exc})") from None
    return image


def encode_file(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def inside(base: Path, requested: str | None, field: str, what: str = "the outputs folder") -> Path | None:
    """A folder a request names, which must lie inside ``base`` (relative paths are taken from it)."""
    if not requested:
        return None
    base = Path(base).resolve()
    target = (base / requested).resolve()
    if target != base and base not in target.parents:
        raise HTTPException(403, f"{field}: {requested!r} is outside {what} {base}")
    return target
