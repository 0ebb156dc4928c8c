"""The shipped demo model and its companions do what the README says, scored by the shipped reader.

Pictures are 128x128 (the demo model's size) from fixed prompts and seeds (the quality harness's prompt
set), read back with ``sdstudio/eval/reader.safetensors``. Bounds sit well inside what these exact
pictures score (printed with ``-s``) and far from chance (1 in 8 for a colour or a background); the full
harness (``python -m sdstudio.eval``, README) measures the same things on 200 prompts.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import link_shipped
from PIL import Image

from sdstudio.eval import harness, shapes

SHIPPED = ["models/Stable-diffusion/sdstudio-demo.safetensors", "models/Stable-diffusion/sdstudio-inpainting.safetensors",
           "models/Lora/demo-zebra.safetensors", "embeddings/demo-red.safetensors",
           "models/VAE-approx/sdstudio-demo-taesd.safetensors"]
SIZE, STEPS, CFG, SAMPLER = 128, 10, 7.0, "Euler a"
N = 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine

    return Engine(Paths(link_shipped(tmp_path_factory.mktemp("demo"), SHIPPED)), cache_size=2)


@pytest.fixture(scope="module")
def reader():
    return harness.load()


@pytest.fixture(scope="module")
def items():
    return harness.prompt_set(N, seed=1234)  # "a red circle on a blue background"-style captions, with seeds


def generate(engine, prompt: str, seed: int, steps: int = STEPS, **kw):
    from sdstudio.core.params import Txt2ImgRequest

    req = Txt2ImgRequest(prompt=prompt, seed=seed, steps=steps, sampler_name=SAMPLER, cfg_scale=CFG, width=SIZE,
                         height=SIZE, model="sdstudio-demo", **kw)
    return engine.generate(req).images[0]


def colours(reader, images) -> list[str]:
    return [r["colour"] for r in harness.read(reader, [im.image for im in images])[0]]


def share(found: list[str], wanted: list[str]) -> float:
    return float(np.mean([f == w for f, w in zip(found, wanted)]))


@pytest.fixture(scope="module")
def plain(engine, items):
    return [generate(engine, p.prompt, p.seed) for p in items]


def test_colours_and_backgrounds_follow_the_prompt(reader, items, plain):
    predicted = harness.read(reader, [im.image for im in plain])[0]
    acc = harness.attribute_accuracy(predicted, [p.scene for p in items])
    print("accuracy", acc)
    assert acc["background"] >= 0.75, acc  # chance: 0.125
    assert acc["colour"] >= 0.6, acc


def test_a_negative_prompt_naming_the_colour_lowers_it(engine, reader, items, plain):
    wanted = [p.scene.main.colour for p in items]
    negated = [generate(engine, p.prompt, p.seed, negative_prompt=c) for p, c in zip(items, wanted)]
    before, after = share(colours(reader, plain), wanted), share(colours(reader, negated), wanted)
    print(f"objects in the prompt's colour: {before:.3f} -> {after:.3f} with it as the negative prompt")
    assert after <= before - 3 / N


def test_the_zebra_lora_raises_the_stripe_score(engine, items):
    """At the harness's 20 steps (the LoRA's stripes are faint: README, 1.9 -> 5.2 over 50 prompts)."""
    from sdstudio.eval.__main__ import stripe_score

    without = [generate(engine, f"zebra, {p.prompt}", p.seed, steps=20) for p in items]
    with_lora = [generate(engine, f"zebra, {p.prompt} <lora:demo-zebra:1>", p.seed, steps=20) for p in items]
    assert all("Lora hashes" in im.infotext for im in with_lora)
    a, b = [stripe_score(im.image) for im in without], [stripe_score(im.image) for im in with_lora]
    print("stripe scores without / with the LoRA:", np.round(a, 1), np.round(b, 1), np.mean(a), np.mean(b))
    assert np.mean(b) > 1.3 * np.mean(a)


def test_the_demo_red_embedding_moves_the_colour_to_red(engine, reader, items):
    # "a green circle on a blue background" -> "a circle on ..." and "a demo-red circle on ..."
    scenes = [p for p in items if p.scene.background != "red"]
    rest = [p.prompt.split(" ", 2)[2] for p in scenes]
    bare = [generate(engine, f"a {r}", p.seed) for r, p in zip(rest, scenes)]
    named = [generate(engine, f"a demo-red {r}", p.seed) for r, p in zip(rest, scenes)]
    assert all("TI hashes" in im.infotext and "demo-red" in im.infotext for im in named)
    red = ["red"] * len(scenes)
    before, after = share(colours(reader, bare), red), share(colours(reader, named), red)
    print(f"red objects: 'a ...' {before:.3f}, 'a demo-red ...' {after:.3f}")
    assert after >= before + 0.25


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Each pixel's nearest colour of the shapes world (names)."""
    names = list(shapes.COLOURS)
    palette = np.array([shapes.COLOURS[n] for n in names], float)
    return np.array(names)[np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)]


def test_the_inpainting_model_keeps_the_unmasked_area_and_repaints_the_masked(engine, tmp_path):
    from sdstudio.core.params import Img2ImgRequest

    init = shapes.render(shapes.Scene("blue", (shapes.Thing("red", "circle", "large", "center"),)), SIZE)
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (32, 32, 96, 96))  # the circle's middle
    mask.save(tmp_path / "mask.png")
    inside = np.asarray(mask) > 0
    before = np.asarray(init, float)
    assert np.mean(_nearest_colour(before[inside]) == "red") > 0.5
    for seed in (1, 2):
        req = Img2ImgRequest(prompt="a yellow square on a blue background", seed=seed, steps=STEPS,
                             sampler_name=SAMPLER, cfg_scale=CFG, width=SIZE, height=SIZE, model="sdstudio-inpainting",
                             init_images=[str(tmp_path / "init.png")], mask=str(tmp_path / "mask.png"), mask_blur=0,
                             denoising_strength=1.0)
        result = engine.generate(req)
        assert result.inpainting_model  # the 9-channel UNet
        after = np.asarray(result.images[0].image.convert("RGB"), float)
        change = np.abs(after - before).max(-1)
        found = _nearest_colour(after[inside])
        print(f"seed {seed}: change outside {change[~inside].max():.0f}, inside {change[inside].mean():.1f}; "
              f"inside red {np.mean(found == 'red'):.2f}, yellow {np.mean(found == 'yellow'):.2f}")
        assert change[~inside].max() == 0
        assert change[inside].mean() > 30
        assert np.mean(found == "red") < 0.1 and np.mean(found == "yellow") > 0.1
