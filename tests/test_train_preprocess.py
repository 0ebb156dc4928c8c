"""Preparing training folders: A1111's Preprocess images (crop and resize, flipped copies, split oversized
pictures, BLIP / DeepBooru captions combined with existing ones, bad files reported by name) and captioning a
kohya folder in place, with the tiny random-weight interrogators; a clear message when their weights are
missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sdstudio.engine.interrogate import Interrogators
from sdstudio.testing.synthetic import _CAPTION_WORDS, _TAGGER_TAGS, write_interrogators
from sdstudio.training import TrainingDataset, TrainingError
from sdstudio.training.preprocess import (
    caption_folder,
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
