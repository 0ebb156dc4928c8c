"""Pictures as clients send them, good and bad, through the API's image decoding (``decode_image``, used by img2img,
masks, extras, PNG info, interrogate and ControlNet units): every mode a decoder gives is accepted as its pixels
say, EXIF orientation is applied, and what cannot be used (truncated files, decompression bombs, lying headers,
formats decoded by outside programs, random bytes) is refused with a 4xx naming the field, never a 5xx."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdstudio.api.common import MAX_INPUT_PIXELS, decode_image
from sdstudio.cli import build_parser
from sdstudio.engine.img2img import flatten
from sdstudio.server import create_app


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("bad-images")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    os.link(tiny_sd1, root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    args = build_parser().parse_args(["serve", "--data-dir", str(root), "--api", "--nowebui"])
    app = create_app(args)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.service.stop()


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def decoded(raw: bytes) -> Image.Image:
    return decode_image(b64(raw), "init_images[0]")


def refusal(raw: bytes) -> HTTPException:
    with pytest.raises(HTTPException) as info:
        decoded(raw)
    assert 400 <= info.value.status_code < 500 and "init_images[0]" in info.value.detail
    return info.value


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def lying_png(width: int, height: int, *extra: bytes) -> bytes:
    """A PNG whose header claims a size its few bytes of data do not have."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(extra) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        png_chunk(b"IEND", b"")


RNG = np.random.default_rng(0)
PICTURE = Image.fromarray((RNG.random((64, 64, 3)) * 255).astype(np.uint8))
GREY16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
TRANSLUCENT = PICTURE.convert("RGBA")
TRANSLUCENT.putalpha(Image.linear_gradient("L").resize((64, 64)))

# every mode a decoder gives, as the file a client would send: (file, the mode the engine receives)
MODES = {
    "RGB PNG": (encoded(PICTURE), "RGB"),
    "RGBA PNG": (encoded(PICTURE.convert("RGBA")), "RGBA"),
    "LA PNG": (encoded(PICTURE.convert("LA")), "LA"),
    "L PNG": (encoded(PICTURE.convert("L")), "L"),
    "1-bit PNG": (encoded(PICTURE.convert("1")), "1"),
    "palette PNG": (encoded(PICTURE.convert("P")), "P"),
    "palette PNG, transparent index": (encoded(PICTURE.convert("P"), transparency=0), "P"),
    "palette PNG, alpha per colour": (encoded(PICTURE.convert("P"), transparency=bytes([0, 128] + [255] * 254)),
                                      "RGBA"),
    "16-bit grey PNG (I;16)": (encoded(Image.fromarray(GREY16)), "L"),
    "32-bit grey TIFF (I)": (encoded(PICTURE.convert("I"), "TIFF"), "L"),
    "float TIFF (F)": (encoded(PICTURE.convert("F"), "TIFF"), "L"),
    "CMYK JPEG": (encoded(PICTURE.convert("CMYK"), "JPEG"), "RGB"),
    "CMYK TIFF": (encoded(PICTURE.convert("CMYK"), "TIFF"), "RGB"),
    "JPEG": (encoded(PICTURE, "JPEG"), "RGB"),
    "grey JPEG": (encoded(PICTURE.convert("L"), "JPEG"), "L"),
    "WebP": (encoded(PICTURE, "WEBP"), "RGB"),
    "WebP with alpha": (encoded(TRANSLUCENT, "WEBP", lossless=True), "RGBA"),
    "animated GIF": (encoded(PICTURE.convert("P"), "GIF", save_all=True, append_images=[PICTURE.convert("P")]), "P"),
    "BMP": (encoded(PICTURE, "BMP"), "RGB"),
    "1x1 PNG": (encoded(Image.new("RGB", (1, 1), (200, 0, 0))), "RGB"),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_decodes_to_one_the_engine_takes(name):
    raw, mode = MODES[name]
    image = decoded(raw)
    assert image.mode == mode
    image.convert("RGB")  # what the engine does next


def test_modes_keep_their_pixels():
    """16-bit grey is scaled (65535 is white), not clipped to white from 256 up as PIL's convert does; floats in
    0..1 are scaled to 0..255; CMYK comes back as its colours; a palette PNG's alpha per colour becomes RGBA
    (A1111's fix_png_transparency)."""
    grey = np.asarray(decoded(MODES["16-bit grey PNG (I;16)"][0]))
    assert np.array_equal(grey, np.rint(GREY16 / 257).astype(np.uint8))
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(8, 0)
    floats = np.asarray(decoded(encoded(Image.fromarray(ramp, "F"), "TIFF")))
    assert np.array_equal(floats, np.rint(ramp * 255).astype(np.uint8))
    eight_bit = np.asarray(decoded(MODES["32-bit grey TIFF (I)"][0]))
    assert np.array_equal(eight_bit, np.asarray(PICTURE.convert("L")))  # values of 0..255 are 8-bit already
    cmyk = np.asarray(decoded(MODES["CMYK TIFF"][0]))
    assert np.array_equal(cmyk, np.asarray(PICTURE))
    flat = Image.new("RGB", (32, 32), (200, 40, 90))
    assert np.abs(np.asarray(decoded(encoded(flat.convert("CMYK"), "JPEG", quality=95))).astype(int) -
                  np.asarray(flat)).max() <= 6
    palette = PICTURE.convert("P")
    alpha = np.asarray(decoded(MODES["palette PNG, alpha per colour"][0]))[..., 3]
    index = np.asarray(palette)
    assert np.array_equal(alpha, np.where(index == 0, 0, np.where(index == 1, 128, 255)))


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with EXIF orientation 6 (turn 90° clockwise) arrives upright, as A1111's
    images.read turns it; the orientation tag is gone, so nothing turns it twice."""
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = stored.getexif()
    exif[0x0112] = 6
    image = decoded(encoded(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (32, 64)
    assert image.getpixel((16, 8))[0] > 240 and image.getpixel((16, 56))[2] > 240  # red on top, blue below
    assert image.getexif().get(0x0112) is None


def test_infotext_survives_decoding():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 3, Seed: 1, Size: 64x64")
    raw = encoded(Image.fromarray(GREY16), pnginfo=info)
    assert decoded(raw).info["parameters"] == "a cat\nSteps: 3, Seed: 1, Size: 64x64"


def test_transparent_init_images_are_flattened_on_white():
    """A1111's images.flatten (img2img_background_color #ffffff): a transparent pixel is white to the model,
    not the black PIL's RGBA -> RGB conversion leaves."""
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = flatten(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (127, 127, 127)
    assert flatten(PICTURE).tobytes() == PICTURE.tobytes()


TRUNCATED = {
    "PNG cut after its header": encoded(PICTURE)[:33],
    "PNG cut in its data": encoded(PICTURE)[:300],
    "JPEG cut early": encoded(PICTURE, "JPEG")[:400],
    "JPEG cut late": encoded(PICTURE, "JPEG")[:-200],
    "WebP cut": encoded(PICTURE, "WEBP")[:200],
    "GIF cut": encoded(PICTURE.convert("P"), "GIF")[:100],
    "PNG with a bad checksum": encoded(PICTURE)[:29] + b"\0\0\0\0" + encoded(PICTURE)[33:],
    "zero-size PNG": lying_png(0, 0),
}


@pytest.mark.parametrize("name", list(TRUNCATED))
def test_damaged_files_are_422(name):
    assert refusal(TRUNCATED[name]).status_code == 422


def test_decompression_bombs_are_413_before_decoding():
    """A 16k×16k PNG of 32 KB, headers claiming 100,000² or just over the 64-megapixel limit: 413 from the header
    alone (nothing is decompressed); a PNG text chunk that inflates past PIL's limit: 422."""
    sixteen_k = encoded(Image.new("1", (16384, 16384)))
    assert len(sixteen_k) < 64 * 1024
    for raw in (sixteen_k, lying_png(100_000, 100_000), lying_png(65535, 65535)):
        exc = refusal(raw)
        assert exc.status_code == 413 and "megapixels" in exc.detail
    side = int(MAX_INPUT_PIXELS ** 0.5)
    exc = refusal(lying_png(side + 1, side))
    assert exc.status_code == 413 and f"{side + 1}x{side} is over the limit of 64 megapixels" in exc.detail
    text_bomb = png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"\0" * (64 << 20)))
    assert refusal(lying_png(8, 8, text_bomb)).status_code == 422
    gif = bytearray(encoded(PICTURE.convert("P"), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen: 4.3 gigapixels
    assert refusal(bytes(gif)).status_code == 413


def test_large_pictures_within_the_limit_are_accepted():
    raw = encoded(Image.new("RGB", (4096, 4096)))
    assert decoded(raw).size == (4096, 4096)


@pytest.mark.parametrize("raw", [b"hello", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                 b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", encoded(PICTURE, "TGA"),
                                 encoded(PICTURE, "PPM"), encoded(PICTURE, "ICO")],
                         ids=["text", "svg", "eps", "tga", "ppm", "ico"])
def test_other_formats_are_422(raw):
    """Only PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF: EPS would run Ghostscript wherever it is installed."""
    exc = refusal(raw)
    assert exc.status_code == 422 and "not a PNG, JPEG" in exc.detail


@given(st.sampled_from([m[0] for m in MODES.values()] + list(TRUNCATED.values())),
       st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), max_size=6), st.integers(8, 6000))
@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
def test_mutated_files_are_decoded_or_refused_with_4xx(raw, changes, cut):
    data = bytearray(raw[:cut])
    for pos, value in changes:
        if pos < len(data):
            data[pos] = value
    try:
        decoded(bytes(data)).convert("RGB")
    except HTTPException as exc:
        assert 400 <= exc.status_code < 500 and "init_images[0]" in exc.detail


# ---- through the server ----------------------------------------------------------------------------

SMALL = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "denoising_strength": 0.5, "seed": 1}


@pytest.mark.parametrize("name", ["CMYK JPEG", "float TIFF (F)", "16-bit grey PNG (I;16)", "LA PNG", "RGBA PNG",
                                  "palette PNG, transparent index", "animated GIF", "1x1 PNG", "WebP with alpha"])
def test_img2img_mask_and_extras_take_every_mode(client, name):
    """CMYK and float pictures made /img2img fail with a 500 (the queue could not store them as PNG)."""
    raw = b64(MODES[name][0])
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [raw]})
    assert r.status_code == 200, r.text
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(MODES["RGB PNG"][0])], "mask": raw})
    assert r.status_code == 200, r.text
    r = client.post("/sdapi/v1/extra-single-image", json={"image": raw, "upscaling_resize": 1})
    assert r.status_code == 200, r.text
    assert client.post("/sdapi/v1/png-info", json={"image": raw}).status_code == 200


@pytest.mark.parametrize("name", ["JPEG cut early", "PNG cut in its data", "WebP cut"])
def test_damaged_uploads_are_422_naming_the_field(client, name):
    raw = b64(TRUNCATED[name])
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(MODES["RGB PNG"][0]), raw]})
    assert r.status_code == 422 and "init_images[1]" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(MODES["RGB PNG"][0])], "mask": raw})
    assert r.status_code == 422 and "mask" in r.json()["detail"]
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": raw, "name": "a.png"}]})
    assert r.status_code == 422 and "imageList[0]" in r.json()["detail"]


def test_bombs_are_413_through_the_server(client):
    raw = b64(encoded(Image.new("1", (16384, 16384))))
    for path, body in (("/sdapi/v1/img2img", {**SMALL, "init_images": [raw]}),
                       ("/sdapi/v1/extra-single-image", {"image": raw}), ("/sdapi/v1/png-info", {"image": raw})):
        r = client.post(path, json=body)
        assert r.status_code == 413 and "megapixels" in r.json()["detail"], (path, r.text)


def test_controlnet_unit_images_use_the_upload_formats():
    # a unit's image sent in a job body skips the API's decoder: the engine's own must refuse EPS & co. too
    import base64

    from sdstudio.core.controlnet import ControlNetError
    from sdstudio.engine.controlnet import decode_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(ControlNetError, match="unit 0 image: not an image that can be read"):
        decode_image(base64.b64encode(eps).decode(), "unit 0 image")
