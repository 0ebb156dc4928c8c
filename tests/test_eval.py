"""The shapes world and the quality harness: captions, renders, the shipped reader, the scores."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdstudio.eval import harness, shapes


def test_captions_plain_and_rich():
    s = shapes.Scene("blue", (shapes.Thing("red", "circle", "small", "left"),))
    assert shapes.caption(s) == "a red circle on a blue background"
    assert shapes.caption(s, rich=True) == "a small red circle on the left, blue background"
    two = shapes.Scene("orange", (shapes.Thing("white", "star", "small", "left"), shapes.Thing("white", "star", "small", "right"),
                                  shapes.Thing("green", "square", "medium", "top right")), stripes=True)
    assert shapes.caption(two) == "a white star on a striped orange background"
    assert shapes.caption(two, rich=True) == \
        "two small white stars and a medium green square in the top right corner, striped orange background"
    assert shapes.caption(shapes.Scene("orange", (shapes.Thing("orange", "circle"),))).startswith("an orange")


def test_renders_put_the_colours_where_the_scene_says():
    s = shapes.Scene("blue", (shapes.Thing("red", "square", "large", "center"),))
    arr = np.asarray(shapes.render(s, 64)).astype(int)
    assert np.abs(arr[2, 2] - shapes.COLOURS["blue"]).max() <= 2
    assert np.abs(arr[32, 32] - shapes.COLOURS["red"]).max() <= 2
    rng = np.random.default_rng(3)
    scenes = [shapes.random_scene(rng, 3) for _ in range(50)]
    assert all(t.colour != sc.background for sc in scenes for t in sc.things)
    assert shapes.render(scenes[0], 64) .size == (64, 64)


@pytest.fixture(scope="module")
def reader():
    return harness.load()


def test_the_shipped_reader_reads_renders(reader):
    items = harness.prompt_set(64, seed=5)
    predicted, feats = harness.read(reader, [shapes.render(p.scene, 256) for p in items])
    acc = harness.attribute_accuracy(predicted, [p.scene for p in items])
    assert acc["mean"] >= 0.9, acc
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in items]
    noise_acc = harness.attribute_accuracy(harness.read(reader, noise)[0], [p.scene for p in items])
    assert noise_acc["mean"] < 0.4
    more = harness.prompt_set(300, seed=6)
    feats = harness.read(reader, [shapes.render(p.scene, 64) for p in more])[1]
    same = harness.frechet_distance(feats[::2], feats[1::2])
    far = harness.frechet_distance(feats[::2], harness.read(reader, noise * 3)[1])
    assert far > 3 * same, (far, same)


def test_the_harness_runs_end_to_end_on_a_tiny_model(data_dir, tmp_path, capsys):
    from sdstudio.eval.__main__ import main

    out = tmp_path / "RESULTS.md"
    assert main(["--data-dir", str(data_dir), "--n", "8", "--size", "64", "--steps", "2", "--out", str(out)]) == 0
    text = out.read_text()
    for measure in ("renderer (upper bound)", "through the model's VAE", "CFG response", "negative prompt", "emphasis", "img2img", "inpaint",
                    "Fréchet"):
        assert measure in text
    inpaint = next(line for line in text.splitlines() if line.startswith("| inpaint"))
    assert inpaint.split("|")[2].strip().endswith("/ 0.0")  # outside the mask: untouched
