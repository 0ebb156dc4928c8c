"""The training dataset reads folders as kohya's sd-scripts does: repeats, captions, buckets, augmentations."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sdstudio.training.dataset import (
    CaptionOptions,
    DatasetError,
    TrainingDataset,
    bucket_resolutions,
    process_caption,
    select_bucket,
)


def _image(path, w, h, colour=(200, 30, 30)):
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = colour
    a[:, : w // 2, 1] = 255  # left half differs: flips are visible
    Image.fromarray(a).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    a, b = root / "3_sks dog", root / "1_cat"
    a.mkdir(parents=True)
    b.mkdir()
    _image(a / "one.png", 64, 64)
    (a / "one.caption").write_text("sks dog, Red Collar, grass\nsecond line ignored")
    _image(a / "two.jpg", 128, 64)  # wide
    (a / "two.txt").write_text("a txt caption")  # not read with the default extension
    _image(b / "three.png", 64, 128)  # tall
    (b / "three.caption").write_text("cat, grass")
    (root / "notes").mkdir()  # no repeat count: ignored, as kohya does
    _image(root / "notes" / "x.png", 64, 64)
    (b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (b / "readme.md").write_text("not an image")
    return root


def test_repeat_folders_captions_and_class_tokens(folder):
    ds = TrainingDataset.from_folder(folder, resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    by_name = {i.path.name: i for i in ds.items}
    assert set(by_name) == {"one.png", "two.jpg", "three.png"}
    assert by_name["one.png"].caption == "sks dog, Red Collar, grass"  # first line only
    assert by_name["two.jpg"].caption == "sks dog"  # no .caption file: the folder's class tokens
    assert by_name["one.png"].repeats == 3 and by_name["three.png"].repeats == 1
    assert ds.num_train_images == 3 + 3 + 1
    assert ds.folders == {"3_sks dog": (3, 2), "1_cat": (1, 1)}
    txt = TrainingDataset.from_folder(folder, resolution=64, caption_extension="txt",
                                      min_bucket_reso=64, max_bucket_reso=128)
    assert {i.path.name: i.caption for i in txt.items}["two.jpg"] == "a txt caption"
    assert {i.path.name: i.caption for i in txt.items}["one.png"] == "sks dog"


def test_tag_frequency_as_kohya_counts_it(folder):
    ds = TrainingDataset.from_folder(folder, resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    # per folder, lower-cased, each image once whatever its repeats; class tokens count as a caption
    assert ds.tag_frequency == {"3_sks dog": {"sks dog": 2, "red collar": 1, "grass": 1},
                                "1_cat": {"cat": 1, "grass": 1}}


def test_bad_images_are_reported_by_name_and_skipped(folder):
    ds = TrainingDataset.from_folder(folder, resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    assert [name for name, _ in ds.skipped] == ["1_cat/broken.png"]
    assert "broken.png" not in {i.path.name for i in ds.items}


def test_plain_folder_and_errors(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    _image(plain / "a.png", 64, 64)
    ds = TrainingDataset.from_folder(plain, resolution=64, min_bucket_reso=64)
    assert ds.items[0].repeats == 1 and ds.items[0].caption == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no usable images"):
        TrainingDataset.from_folder(empty)
    with pytest.raises(DatasetError, match="not a folder"):
        TrainingDataset.from_folder(tmp_path / "missing")


def test_bucket_resolutions_are_kohyas_defaults():
    resos = bucket_resolutions((512, 512))
    assert (512, 512) in resos and (256, 1024) in resos and (1024, 256) in resos
    assert all(256 <= w <= 1024 and 256 <= h <= 1024 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert all(w * h <= 512 * 512 for w, h in resos)
    # kohya's list for 512²: width w from 256 step 64, height = floor(512²/w to 64), both orientations
    expected = set()
    for w in range(256, 1025, 64):
        h = min(1024, (512 * 512 // w) // 64 * 64)
        if h >= 256:
            expected |= {(w, h), (h, w)}
    assert set(resos) == expected | {(512, 512)}
    assert resos == sorted(resos)


def test_select_bucket_nearest_aspect_and_no_upscale():
    resos = bucket_resolutions((512, 512))
    bucket, resized = select_bucket(1000, 500, resos, no_upscale=False, max_area=512 * 512, step=64)
    ratios = [abs(w / h - 2.0) for w, h in resos]
    assert abs(bucket[0] / bucket[1] - 2.0) == min(ratios)
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]  # scaled to cover, then cropped
    assert resized[0] == bucket[0] or resized[1] == bucket[1]
    # a small image is scaled up into a bucket normally, and only floored to the step without upscaling
    assert select_bucket(300, 200, resos, no_upscale=False, max_area=512 * 512, step=64)[0] in resos
    bucket, resized = select_bucket(300, 200, resos, no_upscale=True, max_area=512 * 512, step=64)
    assert resized == (300, 200) and bucket == (256, 192)
    bucket, resized = select_bucket(2000, 1000, resos, no_upscale=True, max_area=512 * 512, step=64)
    assert bucket[0] * bucket[1] <= 512 * 512 and bucket[0] % 64 == 0 and resized[0] * resized[1] <= 512 * 512 * 1.01


def test_batches_stay_in_buckets_repeat_and_are_seeded(folder):
    ds = TrainingDataset.from_folder(folder, resolution=128, min_bucket_reso=64, max_bucket_reso=256,
                                     bucket_reso_steps=32, seed=3)
    assert {i.path.name: i.bucket for i in ds.items} == {"one.png": (128, 128), "two.jpg": (160, 96),
                                                        "three.png": (96, 160)}  # square, wide, tall
    batches = ds.epoch_batches(0, 2)
    assert len(batches) == ds.batches_per_epoch(2)
    assert Counter(i for b in batches for i in b) == Counter({i: it.repeats for i, it in enumerate(ds.items)})
    for b in batches:
        assert len({ds.items[i].bucket for i in b}) == 1
        batch = ds.load_batch(b, 0, 0)
        w, h = ds.items[b[0]].bucket
        assert batch.pixels.shape == (len(b), 3, h, w) and batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    assert ds.epoch_batches(0, 2) == batches  # same seed and epoch: same order
    orders = {tuple(map(tuple, ds.epoch_batches(e, 1))) for e in range(6)}
    assert len(orders) > 1  # epochs are shuffled differently
    info = ds.bucket_info
    assert sum(b["count"] for b in info["buckets"].values()) == ds.num_train_images


def test_flip_augmentation(folder):
    ds = TrainingDataset.from_folder(folder / "3_sks dog", resolution=64, min_bucket_reso=64, max_bucket_reso=128,
                                     flip_aug=True)
    i = next(k for k, it in enumerate(ds.items) if it.path.name == "one.png")
    seen = {}
    for batch_index in range(12):
        b = ds.load_batch([i], 0, batch_index)
        seen[b.flipped[0]] = b.pixels[0]
    assert set(seen) == {True, False}
    assert seen[True].flip(-1).equal(seen[False]) and not seen[True].equal(seen[False])
    plain = TrainingDataset.from_folder(folder / "3_sks dog", resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    assert not any(plain.load_batch([i], 0, k).flipped[0] for k in range(12))


def test_caption_shuffle_keep_tokens_and_dropouts():
    caption = "sks, dog, red, grass, sky, tree"
    tags = [t.strip() for t in caption.split(",")]
    shuffled = {process_caption(caption, CaptionOptions(shuffle=True, keep_tokens=2), np.random.default_rng(s))
                for s in range(30)}
    assert len(shuffled) > 5
    for c in shuffled:
        parts = c.split(", ")
        assert parts[:2] == ["sks", "dog"] and sorted(parts) == sorted(tags)
    # tag dropout: about the rate, never the kept tokens
    rng = np.random.default_rng(0)
    kept = [process_caption(caption, CaptionOptions(tag_dropout=0.5, keep_tokens=1), rng).split(", ") for _ in range(400)]
    assert all(k[0] == "sks" for k in kept)
    rate = 1 - np.mean([len(k) - 1 for k in kept]) / 5
    assert 0.4 < rate < 0.6
    # caption dropout: the whole caption empty
    dropped = [process_caption(caption, CaptionOptions(dropout=0.25), rng) for _ in range(400)]
    assert 0.15 < dropped.count("") / 400 < 0.35 and set(dropped) == {"", caption}
    assert process_caption(caption, CaptionOptions(), rng) == caption  # untouched without options


def test_caption_options_reach_the_batches(folder):
    ds = TrainingDataset.from_folder(folder / "3_sks dog", resolution=64, min_bucket_reso=64, max_bucket_reso=128,
                                     shuffle_caption=True, keep_tokens=1, seed=5)
    i = next(k for k, it in enumerate(ds.items) if it.path.name == "one.png")
    captions = {ds.load_batch([i], 0, k).captions[0] for k in range(20)}
    assert len(captions) > 1 and all(c.startswith("sks dog, ") for c in captions)
    assert ds.load_batch([i], 0, 3).captions == ds.load_batch([i], 0, 3).captions  # seeded per batch
