"""The extension's batch tab (a unit's ``input_mode: "batch"``): a server folder of control pictures, one
generation each, with the same seed; masks from ``batch_mask_dir``; ``output_dir`` named after the pictures;
``loopback`` feeding each generation's first image to the unit; each generation a unit of the job (paused and
resumed between); the folders checked before queueing and, for a caller from the network, inside the data dir."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi import HTTPException
from PIL import Image
from starlette.requests import Request

from sdstudio.core import controlnet as cn
from sdstudio.core.errors import RequestError
from sdstudio.core.params import Txt2ImgRequest

COLORS = {"a-red.png": (220, 30, 30), "b-blue.png": (30, 30, 220), "c-green.jpg": (30, 200, 30)}


def _picture(color, size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), color)
    for x in range(8, size - 8, 16):  # some structure, so the pictures' maps differ beyond their colour
        image.paste((255, 255, 255), (x, 8, x + 4, size - 8))
    return image


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures")
    for name, color in COLORS.items():
        _picture(color).save(path / name)
    (path / ".hidden.png").write_bytes(b"not listed")
    (path / "notes.txt").write_text("not a picture")
    (path / "sub.png").mkdir()  # a folder named like a picture is not one
    return path


UNIT = {"enabled": True, "module": "none", "model": "tiny-canny", "weight": 1.0}


def _req(*units, **fields) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a cat", "seed": 5, "steps": 2, "width": 64, "height": 64,
                             "sampler_name": "Euler", "alwayson_scripts": {"ControlNet": {"units": list(units)}},
                             **fields})


def _pixels(result) -> list[np.ndarray]:
    return [np.asarray(g.image.convert("RGB"), np.int16) for g in result.images]


def test_the_folder_listing(folder, tmp_path_factory):
    unit = cn.unit_from_dict({**UNIT, "input_mode": "batch", "batch_images": str(folder)})
    assert unit.input_mode == "batch" and unit.batch_images == str(folder)
    assert cn.unit_from_dict(unit.to_dict()) == unit  # a queued job keeps it
    files = cn.batch_files(unit)
    assert [p.rsplit("/", 1)[-1] for p, _ in files] == ["a-red.png", "b-blue.png", "c-green.jpg"]  # by name
    assert all(m is None for _, m in files)
    masks = tmp_path_factory.mktemp("masks")
    Image.new("L", (64, 64), 255).save(masks / "m0.png")
    one = cn.batch_files(unit.replace(batch_mask_dir=str(masks)))
    assert {m for _, m in one} == {str(masks / "m0.png")}  # fewer masks than pictures: the first for all
    for i in (1, 2):
        Image.new("L", (64, 64), 255).save(masks / f"m{i}.png")
    assert [m for _, m in cn.batch_files(unit.replace(batch_mask_dir=str(masks)))] == \
        [str(masks / f"m{i}.png") for i in range(3)]  # the i-th with the i-th
    listed = cn.unit_from_dict({**UNIT, "input_mode": 1, "batch_images": [str(folder / "b-blue.png")]})
    assert listed.input_mode == "batch" and cn.batch_files(listed) == [(str(folder / "b-blue.png"), None)]
    assert listed.to_dict()["batch_images"] == [str(folder / "b-blue.png")]


def test_bad_batch_fields_name_the_problem(folder, tmp_path):
    with pytest.raises(cn.ControlNetError, match=r"unit 1.batch_images: input_mode batch needs the folder"):
        cn.unit_from_dict({**UNIT, "input_mode": "batch"}, 1)
    with pytest.raises(cn.ControlNetError, match=r"unit 0.batch_images: expected a folder .* got int"):
        cn.unit_from_dict({**UNIT, "input_mode": "batch", "batch_images": 3})
    assert cn.unit_from_dict({"input_mode": "batch", "batch_images": ""}).input_mode == "batch"  # off: not needed
    with pytest.raises(cn.ControlNetError, match=r"unit 2.batch_images: cannot read the folder .*nowhere"):
        cn.batch_files(cn.ControlUnit(input_mode="batch", batch_images=str(tmp_path / "nowhere")), 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(cn.ControlNetError, match=r"holds no pictures \(png, jpg"):
        cn.batch_files(cn.ControlUnit(input_mode="batch", batch_images=str(empty)))


def test_one_generation_per_picture_each_as_a_single_image_run(controlnet_studio, folder):
    studio = controlnet_studio
    result = studio.generate(_req({**UNIT, "input_mode": "batch", "batch_images": str(folder)}))
    got = _pixels(result)
    assert len(got) == 3 and not any(g.extra for g in result.images)  # no detected maps in batch, as the extension
    assert [g.seed for g in result.images] == [5, 5, 5]  # the same seed for every picture
    for name, pixels in zip(COLORS, got, strict=True):
        alone = studio.generate(_req({**UNIT, "image": _b64(Image.open(folder / name).convert("RGB"))}))
        assert np.array_equal(pixels, _pixels(alone)[0]), name
    assert not np.array_equal(got[0], got[1])
    assert "ControlNet 0: \"Module: none, Model: tiny-canny" in result.images[0].infotext


def test_two_batch_units_run_as_many_times_as_the_shorter_folder_has_pictures(controlnet_studio, folder,
                                                                              tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    _picture((200, 200, 0)).save(other / "x.png")
    _picture((0, 200, 200)).save(other / "y.png")
    plain = {**UNIT, "image": _b64(_picture((90, 90, 90)))}
    result = controlnet_studio.generate(_req({**UNIT, "input_mode": "batch", "batch_images": str(folder)},
                                             {**UNIT, "input_mode": "batch", "batch_images": str(other),
                                              "weight": 0.5}, plain))
    assert len(result.images) == 2
    second = controlnet_studio.generate(_req(
        {**UNIT, "image": _b64(Image.open(folder / "b-blue.png").convert("RGB"))},
        {**UNIT, "image": _b64(Image.open(other / "y.png").convert("RGB")), "weight": 0.5}, plain))
    assert np.array_equal(_pixels(result)[1], _pixels(second)[0])


def test_output_dir_names_the_pictures_after_their_control_pictures(controlnet_studio, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = controlnet_studio.generate(_req({**UNIT, "input_mode": "batch", "batch_images": str(folder),
                                              "output_dir": str(out / "made")}, batch_size=2))
    assert len(result.images) == 6
    names = sorted(p.name for p in (out / "made").iterdir())
    assert names == ["a-red-1.png", "a-red.png", "b-blue-1.png", "b-blue.png", "c-green-1.jpg", "c-green.jpg"]
    saved = np.asarray(Image.open(out / "made" / "b-blue-1.png").convert("RGB"), np.int16)
    assert np.array_equal(saved, _pixels(result)[3])  # the second picture's second image
    assert Image.open(out / "made" / "c-green.jpg").format == "JPEG"


def test_loopback_sends_each_generation_to_the_unit(controlnet_studio, folder):
    studio = controlnet_studio
    start = _picture((120, 60, 200))
    units = ({**UNIT, "input_mode": "batch", "batch_images": str(folder)},
             {**UNIT, "image": _b64(start), "loopback": True, "weight": 0.8})
    result = studio.generate(_req(*units))
    first = result.images[0]
    fed = studio.generate(_req({**UNIT, "image": _b64(Image.open(folder / "b-blue.png").convert("RGB"))},
                               {**UNIT, "image": _b64(first.image), "weight": 0.8}))
    assert np.array_equal(_pixels(result)[1], _pixels(fed)[0])
    unfed = studio.generate(_req({**UNIT, "image": _b64(Image.open(folder / "b-blue.png").convert("RGB"))},
                                 {**UNIT, "image": _b64(start), "weight": 0.8}))
    assert not np.array_equal(_pixels(result)[1], _pixels(unfed)[0])


def test_a_batch_pauses_between_pictures_and_resumes_where_it_stopped(controlnet_studio, folder):
    studio = controlnet_studio
    req = _req({**UNIT, "input_mode": "batch", "batch_images": str(folder)})
    whole = _pixels(studio.generate(req))
    stored, given = {}, []
    first = studio.generate(req, should_pause=lambda: True, on_unit=lambda n, images: stored.update({n: images}),
                            on_batch=lambda n, images: given.extend(images))
    assert first.paused and len(given) == 1 and list(stored) == [0]
    from sdstudio.scripts.studio import UnitResult

    rest = studio.generate(req, first_batch=first.batches_done, units={n: UnitResult(v) for n, v in stored.items()},
                           on_batch=lambda n, images: given.extend(images))
    assert not rest.paused and len(given) == 3
    assert all(np.array_equal(np.asarray(g.image.convert("RGB"), np.int16), w) for g, w in zip(given, whole, strict=True))


def test_an_unreadable_picture_names_the_file(controlnet_studio, folder):
    (folder / "d-broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(RequestError, match=r"ControlNet unit 0: .*d-broken.png: not an image that can be read"):
        controlnet_studio.generate(_req({**UNIT, "input_mode": "batch", "batch_images": str(folder)}))


def _network_request(host: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/sdapi/v1/txt2img", "headers": [],
                    "client": (host, 40000), "query_string": b""})


def test_the_api_checks_the_folders_before_queueing(service, folder, data_dir):
    from sdstudio.api.a1111 import Txt2ImgBody, queue_job, to_request

    write_tiny_controlnet(data_dir)
    service.engine.registry.refresh()

    def queue(unit: dict, host: str):
        body = Txt2ImgBody(prompt="a cat", steps=2, width=64, height=64,
                           alwayson_scripts={"controlnet": {"args": [unit]}})
        from sdstudio.api.a1111 import script_fields

        req = to_request(body, {}, **script_fields(body, service.studio.catalog, [], "txt2img"))
        return queue_job(body, req, {}, service, None, _network_request(host))

    batch = {**UNIT, "input_mode": "batch", "batch_images": str(folder)}
    assert queue(batch, "127.0.0.1").request.alwayson_scripts["ControlNet"]["units"][0]["batch_images"] == str(folder)
    with pytest.raises(HTTPException) as refused:  # from the network: only inside the data dir
        queue(batch, "10.1.2.3")
    assert refused.value.status_code == 403 and "ControlNet unit 0.batch_images" in refused.value.detail
    inside = data_dir / "control-pictures"
    inside.mkdir()
    _picture((1, 2, 3)).save(inside / "p.png")
    assert queue({**batch, "batch_images": str(inside)}, "10.1.2.3") is not None
    with pytest.raises(HTTPException) as written:
        queue({**batch, "batch_images": str(inside), "output_dir": str(folder)}, "10.1.2.3")
    assert written.value.status_code == 403 and "unit 0.output_dir" in written.value.detail
    with pytest.raises(HTTPException) as missing:
        queue({**batch, "batch_images": str(data_dir / "nowhere")}, "127.0.0.1")
    assert missing.value.status_code == 422 and "cannot read the folder" in missing.value.detail


def write_tiny_controlnet(root) -> None:
    from sdstudio.testing.controlnet_files import write_controlnet

    write_controlnet(root / "models" / "ControlNet" / "tiny-canny.safetensors", "sd1", "tiny", seed=3)


def test_the_seed_moves_on_per_picture_with_the_extensions_setting(controlnet_studio, folder):
    studio = controlnet_studio
    unit = {**UNIT, "input_mode": "batch", "batch_images": str(folder)}
    same = studio.generate(_req(unit, batch_size=2))
    assert [g.seed for g in same.images] == [5, 6] * 3
    moved = studio.generate(_req(unit, batch_size=2, controlnet_increment_seed_during_batch=True))
    assert [g.seed for g in moved.images] == [5, 6, 7, 8, 9, 10]
    assert np.array_equal(_pixels(moved)[0], _pixels(same)[0])  # the first picture is unchanged
    alone = studio.generate(_req({**UNIT, "image": _b64(Image.open(folder / "b-blue.png").convert("RGB"))},
                                 seed=7, batch_size=2))
    assert np.array_equal(_pixels(moved)[2], _pixels(alone)[0])  # the second picture, seeds 7 and 8
    from sdstudio.core.params import option_fields

    assert option_fields({"controlnet_increment_seed_during_batch": True}) == \
        {"controlnet_increment_seed_during_batch": True}  # the setting reaches the job
