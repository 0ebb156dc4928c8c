"""A1111's Auto focal point crop (sdstudio.training.focal) in Preprocess images: the crop goes to the detailed
part of a picture, the weights choose between corners, entropy and faces, the entropy of every sliding window
is its histogram's, the picture is covered without black strips, the debug picture follows the crop; and the
route and the tab run it as a job (faces by face restoration's RetinaFace file, or a note saying they were not
scored). Faces: the OpenCV here has no Haar cascades, and a random-weight RetinaFace finds no real faces, so
the face maths is tested with a small detector of the picture's red blob, and the RetinaFace wiring by a job
that loads a random-weight detector file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from train_fixtures import api_client

from sdstudio.training.focal import FocalCrop, edge_points, entropy_point, window_entropies
from sdstudio.training.preprocess import preprocess_images

NO_FACES = {"face_weight": 0.0}


def detail_at_right() -> Image.Image:
    """512x256 flat grey with a 96² patch of noise whose centre is at x = 428 (far right of centre)."""
    a = np.full((256, 512, 3), 90, np.uint8)
    a[80:176, 380:476] = np.random.default_rng(0).integers(0, 256, (96, 96, 3))
    return Image.fromarray(a)


def corners_left_ramp_right() -> Image.Image:
    """512x256: a black-and-white checkerboard (many corners, two grey levels) in x 16..144 and a smooth
    left-to-right ramp over every grey level (no corners, high entropy) in x 320..512, full height."""
    a = np.full((256, 512), 128, np.uint8)
    yy, xx = np.mgrid[64:192, 16:144]
    a[64:192, 16:144] = np.where(((yy // 16) + (xx // 16)) % 2 == 0, 0, 255)
    a[:, 320:512] = np.linspace(0, 255, 192).astype(np.uint8)[None, :]
    return Image.fromarray(np.stack([a] * 3, axis=-1))


def red_blob_detector(picture: Image.Image) -> list[tuple[float, float, float, float]]:
    """A "face detector" for the tests' pictures: the bounding box of the pure red pixels, if any."""
    a = np.asarray(picture.convert("RGB")).astype(int)
    mask = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    if not mask.any():
        return []
    ys, xs = np.nonzero(mask)
    return [(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))]


def test_the_crop_goes_to_the_detailed_region():
    picture = detail_at_right()
    crop = FocalCrop(256, 256, **NO_FACES)  # scaled 1:1 (the height is the target's): the crop slides along x
    focus = crop.focal_point(picture)
    assert 380 <= focus.x <= 476 and set(focus.points) == {"edges", "entropy"}
    box = crop.box(picture, focus)
    assert box[0] <= 380 and box[2] >= 476 and box[2] - box[0] == 256  # the whole patch inside
    [out] = crop.crop(picture)
    assert out.size == (256, 256)
    assert np.array_equal(np.asarray(out), np.asarray(picture.crop(box)))
    centre = picture.crop((128, 0, 384, 256))  # what a centre crop would keep: hardly any of the patch
    assert np.asarray(out).std() > 2 * np.asarray(centre).std()
    assert crop.focal_point(Image.new("RGB", (512, 256), (90, 90, 90))).x == 256  # nothing found: the centre


def test_the_weights_choose_between_corners_and_entropy():
    picture = corners_left_ramp_right()
    corners = edge_points(picture)
    # the ramp has no corners (but where its edge meets the grey band A1111 paints over the bottom tenth)
    assert len(corners) > 50 and sum(x > 160 for x, _ in corners) <= 1
    x, _ = entropy_point(picture, 256, 256)
    assert x > 300  # the window holding the ramp's many grey levels
    by_corners = FocalCrop(256, 256, edges_weight=1.0, entropy_weight=0.0, face_weight=0.0)
    entropy = FocalCrop(256, 256, edges_weight=0.0, entropy_weight=1.0, face_weight=0.0)
    assert by_corners.box(picture, by_corners.focal_point(picture))[0] == 0  # the checkerboard's side
    assert entropy.box(picture, entropy.focal_point(picture))[2] >= 448
    both = FocalCrop(256, 256, edges_weight=0.5, entropy_weight=0.5, face_weight=0.0).focal_point(picture)
    assert both.shares == {"edges": 0.5, "entropy": 0.5}
    edges_x = np.mean([p[0] for p in both.points["edges"]])
    assert both.x == round((edges_x + both.points["entropy"][0][0]) / 2)  # the weighted mean of the centroids


def test_faces_count_by_their_weight():
    a = np.asarray(corners_left_ramp_right()).copy()
    a[100:160, 200:240] = (230, 20, 20)  # the "face": box x 200..240, y 100..160
    picture = Image.fromarray(a)
    faces = FocalCrop(256, 256, face_weight=0.9, entropy_weight=0.0, edges_weight=0.0, faces=red_blob_detector)
    focus = faces.focal_point(picture)
    assert (focus.x, focus.y) == (220, round(100 + 60 * 0.33)) and focus.shares == {"faces": 1.0}
    mixed = FocalCrop(256, 256, face_weight=0.9, entropy_weight=0.0, edges_weight=0.1, faces=red_blob_detector)
    point = mixed.focal_point(picture)
    assert point.shares == pytest.approx({"faces": 0.9, "edges": 0.1})
    edges_x = np.mean([p[0] for p in point.points["edges"]])
    assert point.x == round(0.9 * 220 + 0.1 * edges_x)
    off = FocalCrop(256, 256, face_weight=0.0, entropy_weight=0.0, edges_weight=0.1, faces=red_blob_detector)
    assert "faces" not in off.focal_point(picture).points


def test_window_entropies_are_the_windows_histograms():
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 40, (40, 150, 3), dtype=np.uint8))
    starts, entropy = window_entropies(picture, 40, 40, step=4)
    assert starts == [*range(0, 111, 4), 110]  # in steps of 4, the last flush with the end
    grey = np.asarray(picture.convert("L"))
    for start, value in zip(starts, entropy):
        counts = np.bincount(grey[:, start:start + 40].reshape(-1), minlength=256)
        p = counts[counts > 0] / counts.sum()
        assert value == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-9)
    tall = picture.transpose(Image.Transpose.TRANSPOSE)
    assert np.allclose(window_entropies(tall, 40, 40, step=4)[1], entropy)  # the same along y


def test_the_picture_is_covered_and_the_debug_picture_follows():
    picture = detail_at_right().resize((300, 250))  # relatively narrower than the 192x128 target
    crop = FocalCrop(192, 128, debug=True, **NO_FACES)
    assert crop.scaled(picture).size == (192, 160)  # covers it: no black strip (A1111's would be 153 wide)
    out, debug = crop.crop(picture)
    assert out.size == (192, 128) and debug.size == (192, 160)
    d = np.asarray(debug).astype(int)
    assert ((d[..., 1] == 255) & (d[..., 0] == 0) & (d[..., 2] == 0)).any()  # the green crop rectangle


def test_preprocess_crops_pictures_that_are_not_square(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    detail_at_right().save(src / "wide.png")
    Image.new("RGB", (300, 300), (10, 200, 10)).save(src / "square.png")
    result = preprocess_images(src, tmp_path / "dst", 256, 256, focal=FocalCrop(256, 256, debug=True, **NO_FACES))
    names = sorted(p.name for p in result.written)
    assert names == ["00000-0-square.png", "00001-0-wide.png", "00001-1-wide.png"]  # crop, then its debug picture
    assert Image.open(tmp_path / "dst" / "00000-0-square.png").size == (256, 256)  # square: the plain resize
    wide = np.asarray(Image.open(tmp_path / "dst" / "00001-0-wide.png"))
    assert wide.std() > 25  # the patch's noise, not the flat grey
    assert Image.open(tmp_path / "dst" / "00001-1-wide.png").size == (512, 256)


def test_the_route_crops_with_or_without_a_face_detector(data_dir):
    from sdstudio.engine import retinaface
    from tests.test_server import AUTH

    src = data_dir / "src"
    src.mkdir()
    detail_at_right().save(src / "wide.png")
    client = api_client(data_dir)
    body = {"process_src": "src", "process_dst": "out", "process_width": 256, "process_height": 256,
            "process_focal_crop": True, "process_focal_crop_debug": True}
    info = client.post("/sdapi/v1/preprocess", headers=AUTH, json=body).json()["info"]
    assert info.startswith("preprocess complete; Auto focal point crop: faces not scored (no face detector")
    assert "detection_Resnet50_Final.pth" in info and str(data_dir / "models" / "GFPGAN") in info
    assert sorted(p.name for p in (data_dir / "out").glob("*.png")) == ["00000-0-wide.png", "00000-1-wide.png"]
    assert np.asarray(Image.open(data_dir / "out" / "00000-0-wide.png")).std() > 25
    bad = client.post("/sdapi/v1/preprocess", headers=AUTH, json={**body, "process_focal_crop_edges_weight": -1})
    assert bad.json()["info"] == "preprocess error: process_focal_crop_edges_weight: must be 0 or more, got -1.0"
    # a detector file where face restoration looks: loaded and run, no note
    (data_dir / "models" / "GFPGAN").mkdir(parents=True, exist_ok=True)
    torch.save(retinaface.RetinaFace("mobilenet0.25").state_dict(),
               data_dir / "models" / "GFPGAN" / "detection_mobilenet0.25_Final.pth")
    info = client.post("/sdapi/v1/preprocess", headers=AUTH, json={**body, "process_dst": "out2"}).json()["info"]
    assert info == "preprocess complete"
    assert (data_dir / "out2" / "00000-0-wide.png").is_file()


def test_the_tab_crops(service, data_dir):
    from types import SimpleNamespace

    import gradio as gr

    from sdstudio.core.settings import Settings
    from sdstudio.ui.train import TrainTab

    src = data_dir / "src"
    src.mkdir()
    detail_at_right().save(src / "wide.png")
    title = service.engine.registry.checkpoint(None).title
    shell = SimpleNamespace(service=service, checkpoint_titles=lambda: [title], allow_folders=True,
                            settings=Settings(data_dir / "config.json", {"sd_model_checkpoint": title}))
    with gr.Blocks():
        tab = TrainTab(shell).build()
    values = {"src": str(src), "dst": "tab-out", "width": 256, "height": 256, "txt_action": "ignore", "keep": False,
              "flip": False, "split": False, "caption": False, "deepbooru": False, "split_threshold": 0.5,
              "overlap": 0.2, "focal": True, "face": 0.0, "entropy": 0.15, "edges": 0.5, "debug": False,
              "multicrop": False, "mindim": 384, "maxdim": 768, "minarea": 4096, "maxarea": 409600,
              "objective": "Maximize area", "threshold": 0.1}
    *_, (_, text, extra) = tab.run_preprocess("ui:test", *values.values())
    assert text == "Preprocessing finished." and extra == ""  # face weight 0: no detector needed, no note
    assert [p.name for p in (data_dir / "tab-out").glob("*.png")] == ["00000-0-wide.png"]
