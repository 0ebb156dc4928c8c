"""Preparing training folders: A1111's Preprocess images (crop and resize, flipped copies, split oversized
pictures, auto-sized crop, BLIP / DeepBooru captions combined with existing ones, bad files reported by name)
as a library, as ``POST /sdapi/v1/preprocess`` and as the Train tab's sub-tab, and captioning a kohya folder in
place, with the tiny random-weight interrogators; a clear message when their weights are missing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from train_fixtures import api_client

from sdstudio.engine.interrogate import Interrogators
from sdstudio.testing.synthetic import _CAPTION_WORDS, _TAGGER_TAGS, write_interrogators
from sdstudio.training import TrainingDataset, TrainingError
from sdstudio.training.preprocess import (
    AutoCrop,
    caption_folder,
    center_crop,
    combine_caption,
    interrogator_captioners,
    preprocess_images,
    split_picture,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def interrogators(tmp_path_factory):
    return Interrogators(write_interrogators(tmp_path_factory.mktemp("interrogate") / "models"), CPU)


def _picture(w, h, colour=(200, 30, 30)):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3] = colour  # the left third coloured: a flip shows
    a[: h // 4] = (20, 200, 20)  # and the top quarter green
    return Image.fromarray(a)


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _picture(96, 96).save(src / "b-square.png")
    (src / "b-square.txt").write_text("old words")
    _picture(256, 64).save(src / "a-wide.jpg")  # 4:1, over the split threshold
    (src / "c-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "d-notes.md").write_text("not a picture")
    return src


def test_combine_caption_follows_a1111s_actions():
    assert combine_caption("a cat", "tags", "ignore") == "a cat"
    assert combine_caption("a cat", "tags", "copy") == "tags"
    assert combine_caption("a cat", "tags", "prepend") == "tags a cat"
    assert combine_caption("a cat", "tags", "append") == "a cat tags"
    assert combine_caption(" a cat ", None, "copy") == "a cat"  # no existing caption: the generated one


def test_split_cuts_overlapping_tiles_end_to_end():
    im = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (64, 1, 3)))  # x ramp
    tiles = list(split_picture(im, 64, 64, 0.2))
    # A1111's count: ceil((256 - 64 * 0.2) / (64 * 0.8)) = 5 tiles of 64x64, the first and last at the ends
    assert len(tiles) == 5 and all(t.size == (64, 64) for t in tiles)
    assert np.asarray(tiles[0])[0, 0, 0] == 0 and np.asarray(tiles[-1])[0, -1, 0] == 255
    starts = [int(np.asarray(t)[0, 0, 0]) for t in tiles]
    assert starts == [0, 48, 96, 144, 192]  # steps of (256 - 64) / 4: overlapping by 16 (0.25)
    tall = list(split_picture(im.transpose(Image.Transpose.TRANSPOSE), 64, 64, 0.2))
    assert len(tall) == 5 and all(t.size == (64, 64) for t in tall)


def test_preprocess_resizes_flips_splits_captions_and_reports_bad_files(source, tmp_path, interrogators):
    captioners = interrogator_captioners(interrogators, blip=True, deepbooru=True)
    seen = []
    result = preprocess_images(source, tmp_path / "dst", 64, 64, txt_action="prepend", flip=True, split=True,
                               captioners=captioners, on_progress=lambda i, n, name: seen.append(name))
    dst = tmp_path / "dst"
    # A1111's names: index in the sorted listing (caption files count), subindex per saved picture
    names = sorted(p.name for p in dst.glob("*.png"))
    assert names == [*[f"00000-{k}-a-wide.png" for k in range(10)], "00001-0-b-square.png", "00001-1-b-square.png"]
    assert all(Image.open(dst / n).size == (64, 64) for n in names)
    assert sorted(n for n, _ in result.skipped) == ["c-broken.png", "d-notes.md"]
    assert "c-broken.png" in result.info and "d-notes.md" in result.info
    assert seen == ["a-wide.jpg", "b-square.png", "c-broken.png", "d-notes.md"]
    assert len(result.written) == 12
    # crop and resize of a square: a plain resize; the flipped copy is its mirror image
    first, mirrored = (np.asarray(Image.open(dst / f"00001-{k}-b-square.png"), np.int16) for k in (0, 1))
    assert np.array_equal(np.asarray(ImageOps.mirror(Image.open(dst / "00001-0-b-square.png")), np.int16), mirrored)
    assert first[40, 5, 0] > 150 and mirrored[40, -6, 0] > 150  # the red third: left, then right
    # captions: the existing .txt first (prepend), then BLIP's caption, then the tags
    text = (dst / "00001-0-b-square.txt").read_text()
    assert text.startswith("old words ")
    blip, _, tags = text.removeprefix("old words ").partition(", ")
    assert blip and set(blip.split()) <= set(_CAPTION_WORDS)
    assert tags == "" or set(tags.split(", ")) <= {t.replace("_", " ") for t in _TAGGER_TAGS}
    assert not (dst / "00000-0-a-wide.txt").read_text().startswith("old words")  # its own source had none


def test_preprocess_keeps_the_size_and_copies_captions(source, tmp_path):
    result = preprocess_images(source, tmp_path / "kept", 64, 64, keep_original_size=True, txt_action="copy")
    assert Image.open(tmp_path / "kept" / "00000-0-a-wide.png").size == (256, 64)
    assert (tmp_path / "kept" / "00001-0-b-square.txt").read_text() == "old words"
    assert not (tmp_path / "kept" / "00000-0-a-wide.txt").exists()  # no captioner, nothing to copy: no file
    assert len(result.written) == 2


def test_bad_options_and_missing_weights_are_clear_errors(source, tmp_path):
    with pytest.raises(TrainingError, match="source directory"):
        preprocess_images(tmp_path / "nowhere", tmp_path / "d")
    with pytest.raises(TrainingError, match="destination must differ"):
        preprocess_images(source, source)
    with pytest.raises(TrainingError, match="caption action 'merge'"):
        preprocess_images(source, tmp_path / "d", txt_action="merge")
    empty = Interrogators(tmp_path / "no-models", CPU)
    with pytest.raises(TrainingError, match=r"Use BLIP for caption: .*models/BLIP"):
        interrogator_captioners(empty, blip=True)
    with pytest.raises(TrainingError, match=r"Use deepbooru for caption: .*deepbooru"):
        interrogator_captioners(empty, deepbooru=True)
    assert interrogator_captioners(empty) == []  # nothing asked, nothing loaded


def test_caption_folder_fills_missing_captions_the_dataset_reads(tmp_path, interrogators):
    root = tmp_path / "set"
    sub = root / "3_sks dog"
    sub.mkdir(parents=True)
    _picture(64, 64).save(sub / "0.png")
    _picture(64, 64, (30, 30, 200)).save(sub / "1.png")
    (sub / "1.caption").write_text("kept caption")
    (sub / "2.png").write_bytes(b"broken")
    tagger = interrogator_captioners(interrogators, deepbooru=True)
    result = caption_folder(root, tagger)
    assert result.written == [sub / "0.png"] and result.skipped[0][0] == "3_sks dog/2.png"
    assert (sub / "1.caption").read_text() == "kept caption"
    ds = TrainingDataset.from_folder(root, resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    captions = {item.path.name: item.caption for item in ds.items}
    assert captions["1.png"] == "kept caption"
    assert captions["0.png"] == interrogators.get("deepdanbooru").interrogate(Image.open(sub / "0.png").convert("RGB"))
    assert [n for n, _ in ds.skipped] == ["3_sks dog/2.png"]  # the dataset reports the bad picture by name too
    assert caption_folder(root, tagger).written == []  # nothing left to caption
    assert len(caption_folder(root, tagger, overwrite=True).written) == 2
    with pytest.raises(TrainingError, match="at least one captioner"):
        caption_folder(root, [])


# ---- Auto-sized crop ------------------------------------------------------------------------------------
def test_auto_sized_crop_picks_the_size_a1111_picks():
    crop = AutoCrop(mindim=64, maxdim=256, minarea=64 * 64, maxarea=256 * 256, objective="Maximize area", threshold=0.1)
    # 145x100 (1.45): 192x128 (1.5, error 0.033) and 256x192 (1.33, error 0.081) are within 0.1
    assert crop.size(145, 100) == (256, 192)
    assert dataclasses.replace(crop, objective="Minimize error").size(145, 100) == (192, 128)
    assert dataclasses.replace(crop, maxarea=30000).size(145, 100) == (192, 128)  # the larger is over the area
    assert crop.size(256, 64) == (256, 64) and crop.size(96, 96) == (256, 256)
    assert dataclasses.replace(crop, threshold=0.01).size(145, 100) is None
    with pytest.raises(TrainingError, match="resizing objective"):
        AutoCrop(objective="Biggest")


def test_center_crop_keeps_the_middle_of_the_picture():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100] = (250, 0, 0)
    a[:, 100:150] = (0, 250, 0)
    a[:, 150:200] = (0, 0, 250)
    a[:, 200:] = (250, 250, 250)
    out = np.asarray(center_crop(Image.fromarray(a), 64, 64), np.int16)
    assert out.shape == (64, 64, 3)
    assert tuple(out[32, 8]) == (0, 250, 0) and tuple(out[32, 56]) == (0, 0, 250)  # the middle 100x100: green | blue


def test_preprocess_with_auto_sized_crop_reports_the_misses(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _picture(145, 100).save(src / "a.png")
    _picture(100, 500).save(src / "b.png")  # 1:5: 64x256 (1:4) is the closest, error 0.2
    crop = AutoCrop(mindim=64, maxdim=256, minarea=64 * 64, maxarea=256 * 256, threshold=0.1)
    result = preprocess_images(src, tmp_path / "dst", 64, 64, multicrop=crop)
    assert [p.name for p in result.written] == ["00000-0-a.png"]
    assert Image.open(tmp_path / "dst" / "00000-0-a.png").size == (256, 192)
    assert result.skipped == [("b.png", "auto-sized crop: no size within the error threshold for 100x500")]


# ---- the route and the tab ------------------------------------------------------------------------------
PREPROCESS_BODY = {"id_task": "task(1)", "process_width": 64, "process_height": 64, "preprocess_txt_action": "append",
                   "process_keep_original_size": False, "process_flip": True, "process_split": False,
                   "process_caption": True, "process_caption_deepbooru": True}


def test_the_a1111_preprocess_route(data_dir, source):
    """``POST /sdapi/v1/preprocess`` with A1111's fields runs as a queue job: pictures, flips and captions in the
    destination, A1111's answer; bad fields and folders outside the data dir (for a caller from the network) are
    refused (the focal point crop itself: test_train_focal)."""
    from tests.test_server import AUTH

    write_interrogators(data_dir / "models")
    client = api_client(data_dir)
    body = {**PREPROCESS_BODY, "process_src": str(source), "process_dst": str(data_dir / "out")}
    r = client.post("/sdapi/v1/preprocess", headers=AUTH, json=body)
    assert r.status_code == 200
    info = r.json()["info"]
    assert info.startswith("preprocess complete; skipped 2: c-broken.png") and "d-notes.md" in info
    out = data_dir / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-0-a-wide.png", "00000-1-a-wide.png",
                                                         "00001-0-b-square.png", "00001-1-b-square.png"]
    caption = (out / "00001-1-b-square.txt").read_text()
    assert caption.endswith(" old words")  # BLIP's caption, the tags, then the source's .txt (append)
    blip = caption.removesuffix(" old words").partition(", ")[0]
    assert blip and set(blip.split()) <= set(_CAPTION_WORDS)

    def info_of(**change) -> str:
        reply = client.post("/sdapi/v1/preprocess", headers=AUTH, json={**body, **change})
        assert reply.status_code == 200
        return reply.json()["info"]

    assert info_of(bogus=1) == "preprocess error: preprocess() got an unexpected keyword argument 'bogus'"
    assert info_of(process_focal_crop=True, process_focal_crop_face_weight="x") == \
        "preprocess error: process_focal_crop_face_weight must be a number, got 'x'"
    assert info_of(process_src=str(data_dir / "nowhere")).startswith("preprocess error: Preprocess: source directory")
    assert info_of(process_multicrop=True, process_multicrop_objective="x").startswith(
        "preprocess error: Preprocess: resizing objective")
    outside = client.post("/sdapi/v1/preprocess", headers=AUTH, json={**body, "process_dst": "/tmp/elsewhere"})
    assert outside.status_code == 403 and "data folder" in outside.text  # TestClient is a caller from the network


A1111_PREPROCESS_IDS = {"train_process_src", "train_process_dst", "train_process_width", "train_process_height",
                        "train_preprocess_txt_action", "train_process_keep_original_size", "train_process_flip",
                        "train_process_split", "train_process_focal_crop", "train_process_multicrop",
                        "train_process_caption", "train_process_caption_deepbooru", "train_process_split_threshold",
                        "train_process_overlap_ratio", "train_process_focal_crop_face_weight",
                        "train_process_focal_crop_entropy_weight", "train_process_focal_crop_edges_weight",
                        "train_process_focal_crop_debug", "train_process_multicrop_mindim",
                        "train_process_multicrop_maxdim", "train_process_multicrop_minarea",
                        "train_process_multicrop_maxarea", "train_process_multicrop_objective",
                        "train_process_multicrop_threshold", "train_interrupt_preprocessing", "train_run_preprocess"}


def test_the_tab_preprocesses_and_refuses_folders_when_shared(service, data_dir, source):
    """The Preprocess images sub-tab (A1111's ids), its button's function queueing the job (a relative
    destination from the data dir); refused when the server is shared over the network."""
    from types import SimpleNamespace

    import gradio as gr

    from sdstudio.core.settings import Settings
    from sdstudio.ui.train import TrainTab

    title = service.engine.registry.checkpoint(None).title
    shell = SimpleNamespace(service=service, checkpoint_titles=lambda: [title], allow_folders=True,
                            settings=Settings(data_dir / "config.json", {"sd_model_checkpoint": title}))
    with gr.Blocks() as page:
        tab = TrainTab(shell).build()
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert A1111_PREPROCESS_IDS <= ids, sorted(A1111_PREPROCESS_IDS - ids)
    values = {"src": str(source), "dst": "tab-out", "width": 64, "height": 64, "txt_action": "copy", "keep": False,
              "flip": False, "split": True, "caption": False, "deepbooru": False, "split_threshold": 0.5,
              "overlap": 0.2, "focal": False, "face": 0.9, "entropy": 0.15, "edges": 0.5, "debug": False,
              "multicrop": False, "mindim": 384, "maxdim": 768, "minarea": 4096, "maxarea": 409600,
              "objective": "Maximize area", "threshold": 0.1}
    *_, (_, text, extra) = tab.run_preprocess("ui:test", *values.values())
    assert text == "Preprocessing finished." and "c-broken.png" in extra and "d-notes.md" in extra
    out = data_dir / "tab-out"
    assert len(list(out.glob("00000-*-a-wide.png"))) == 5  # split into A1111's overlapping tiles
    assert (out / "00001-0-b-square.txt").read_text() == "old words"
    with pytest.raises(gr.Error, match="process_focal_crop_edges_weight: must be 0 or more"):
        next(tab.run_preprocess("ui:test", *{**values, "focal": True, "edges": -0.5}.values()))
    shell.allow_folders = False
    with pytest.raises(gr.Error, match="--listen"):
        next(tab.run_preprocess("ui:test", *values.values()))


def test_blip_captions_load_the_blip_model_alone(tmp_path, interrogators):
    """Use BLIP for caption takes BLIP's caption, not the CLIP interrogation: it works without a CLIP folder,
    gives the caption the CLIP interrogator starts with (the same BLIP weights), and one BLIP model serves both."""
    import shutil

    from sdstudio.models.errors import ModelNotFoundError

    models = write_interrogators(tmp_path / "models")  # seed 0: the weights of the module's interrogators
    shutil.rmtree(models / "CLIP")
    blip_only = Interrogators(models, CPU)
    [caption] = interrogator_captioners(blip_only, blip=True)
    picture = _picture(64, 64)
    assert caption(picture) and caption(picture) == interrogators.get("clip").caption(picture)
    with pytest.raises(ModelNotFoundError, match="CLIP"):
        blip_only.get("clip")
    assert interrogators.get("clip").captioner is interrogators.get("blip")


# ---- captions at training time (caption_missing) ---------------------------------------------------------
def test_caption_missing_loads_nothing_when_all_are_captioned_and_names_the_folder(tmp_path, interrogators):
    from sdstudio.training.preprocess import caption_missing, check_caption_missing

    root = tmp_path / "set"
    sub = root / "2_sks dog"
    sub.mkdir(parents=True)
    _picture(64, 64).save(sub / "0.png")
    (sub / "0.caption").write_text("has one")
    empty = Interrogators(tmp_path / "no-models", CPU)
    assert caption_missing(empty, root, "both").written == []  # nothing to caption: no weights needed
    _picture(64, 64, (30, 30, 200)).save(sub / "1.png")
    with pytest.raises(TrainingError, match=r"caption_missing \(blip\): .*BLIP.* in .*no-models/BLIP"):
        caption_missing(empty, root, "blip")
    with pytest.raises(TrainingError, match=r"caption_missing \(deepbooru\): .*no-models/deepbooru"):
        caption_missing(empty, root, "deepbooru")
    assert not (sub / "1.caption").exists()
    seen = []
    result = caption_missing(interrogators, root, "both", on_text=seen.append)
    assert result.written == [sub / "1.png"] and seen == ["Captioning [1/1]: 2_sks dog/1.png"]
    caption = (sub / "1.caption").read_text().strip()
    blip = interrogators.get("blip").interrogate(Image.open(sub / "1.png").convert("RGB"))
    assert caption.startswith(blip)  # BLIP's caption, then the tags
    assert (sub / "0.caption").read_text() == "has one"
    assert check_caption_missing("") is None and check_caption_missing("both") == "both"
    with pytest.raises(TrainingError, match="caption_missing: 'clip' is not one of blip, deepbooru, both"):
        check_caption_missing("clip")


def test_a_lora_job_captions_the_pictures_without_captions_first(service, data_dir):
    """The LoRA route's body with ``caption_missing`` -> its job -> the run: the uncaptioned picture gets the
    tagger's caption before training reads it (kohya's ss_tag_frequency counts its tags)."""
    import json

    from safetensors import safe_open

    from sdstudio.api.train import LoraTrainBody, lora_job
    from sdstudio.training.lora import run_job

    write_interrogators(data_dir / "models")
    sub = data_dir / "set" / "2_sks"
    sub.mkdir(parents=True)
    _picture(64, 64).save(sub / "0.png")
    _picture(64, 64, (30, 30, 200)).save(sub / "1.png")
    (sub / "1.caption").write_text("blue, kept")
    body = LoraTrainBody(train_data_dir=str(data_dir / "set"), output_name="cap", network_dim=2, max_train_steps=2,
                         resolution=64, caption_missing="deepbooru")
    job = lora_job(service, body, None)
    assert job["caption_missing"] == "deepbooru"
    texts = []
    result = run_job(service.engine, job, on_text=texts.append)
    assert result["captioned"] == ["2_sks/0.png"] and texts[0] == "Captioning [1/1]: 2_sks/0.png"
    tags = (sub / "0.caption").read_text().strip()
    assert tags == service.engine.interrogators.get("deepdanbooru").interrogate(Image.open(sub / "0.png").convert("RGB"))
    assert (sub / "1.caption").read_text() == "blue, kept"
    with safe_open(result["path"], "pt") as f:
        frequency = json.loads(f.metadata()["ss_tag_frequency"])["2_sks"]
    assert frequency["kept"] == 1 and all(frequency[t.strip().lower()] >= 1 for t in tags.split(",") if t.strip())
    assert "cap" in {m.name for m in service.engine.registry.loras}


def test_the_dreambooth_route_captions_first_and_fails_clearly_without_weights(data_dir):
    from train_fixtures import wait_job

    from tests.test_server import AUTH

    client = api_client(data_dir)
    sub = data_dir / "set" / "1_sks"
    sub.mkdir(parents=True)
    _picture(64, 64).save(sub / "0.png")
    body = {"train_data_dir": "set", "model": "tiny-sd1", "output_name": "capdb", "max_train_steps": 1,
            "resolution": 64, "caption_missing": "blip"}
    r = client.post("/sdstudio/v1/train/dreambooth", headers=AUTH, json=body)
    assert r.status_code == 202, r.text
    failed = wait_job(client, r.json()["id"], AUTH)
    assert failed["status"] == "failed" and "caption_missing (blip)" in failed["error"]
    assert str(data_dir / "models" / "BLIP") in failed["error"] and not (sub / "0.caption").exists()
    bad = client.post("/sdstudio/v1/train/dreambooth", headers=AUTH, json={**body, "caption_missing": "clip"})
    assert bad.status_code == 422 and "caption_missing" in bad.text
    write_interrogators(data_dir / "models")
    r = client.post("/sdstudio/v1/train/dreambooth", headers=AUTH, json=body)
    done = wait_job(client, r.json()["id"], AUTH)
    assert done["status"] == "done", done
    assert done["result"]["captioned"] == ["1_sks/0.png"] and (sub / "0.caption").read_text().strip()
    assert (data_dir / "models" / "Stable-diffusion" / "capdb.safetensors").is_file()
