"""txt2img behaviour on tiny random-weight models: seeds, reproduction from infotext, options."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sdstudio.core import infotext
from sdstudio.core.params import Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine

BASE = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64, "seed": 42}


def px(result, i=0):
    return np.asarray(result.images[i].image)


def assert_recreated(engine, again, original):
    """The CPU path is batch-invariant: exact pixels. On CUDA, batched fp16 GEMMs round differently from
    a batch of one (as in A1111), so an image re-created alone is only nearly the same."""
    if engine.plan.device.type == "cpu":
        assert np.array_equal(again, original)
    else:
        diff = np.abs(again.astype(int) - original.astype(int))
        print(f"re-created alone vs in its batch on {engine.plan.device}: mean {diff.mean():.3f}, max {diff.max()}")
        assert diff.mean() < 1


def gen(engine, **kw):
    return engine.generate(Txt2ImgRequest(**{**BASE, **kw}))


def test_batch_seeds_and_infotext(session_engine):
    r = gen(session_engine, n_iter=2, batch_size=2, sampler_name="Euler a")
    assert r.all_seeds == [42, 43, 44, 45] and [g.seed for g in r.images] == [42, 43, 44, 45]
    p = infotext.parse(r.images[1].infotext)
    assert p["Seed"] == "43" and p["Sampler"] == "Euler a" and p["Size"] == "64x64"
    assert p["Model"] == "tiny-sd1" and len(p["Model hash"]) == 10 and p["Negative prompt"] == "blurry"
    assert p["Schedule type"] == "Uniform"


def test_every_image_of_a_batch_is_recreated_exactly_from_its_infotext(session_engine):
    r = gen(session_engine, batch_size=3, sampler_name="DPM++ 2M SDE", rng="NV")
    for i, g in enumerate(r.images):
        again = session_engine.generate(from_infotext(g.infotext))
        assert_recreated(session_engine, px(again), px(r, i))


def test_random_seed_is_made_concrete(session_engine):
    r = gen(session_engine, seed=-1)
    seed = int(infotext.parse(r.images[0].infotext)["Seed"])
    assert seed == r.request.seed and seed >= 0
    assert np.array_equal(px(gen(session_engine, seed=seed)), px(r))


@pytest.mark.parametrize("change", [
    {"seed": 43}, {"rng": "CPU"}, {"cfg_scale": 2.0}, {"clip_skip": 2}, {"prompt": "a blue square"},
    {"negative_prompt": ""}, {"sampler_name": "Euler a"}, {"scheduler": "Exponential"}, {"steps": 4},
    {"subseed": 5, "subseed_strength": 0.5}, {"seed_resize_from_w": 128, "seed_resize_from_h": 128},
])
def test_each_parameter_changes_the_image(session_engine, change):
    assert not np.array_equal(px(gen(session_engine, **change)), px(gen(session_engine)))


def test_variation_strength_zero_is_the_plain_seed(session_engine):
    assert np.array_equal(px(gen(session_engine, subseed=5, subseed_strength=0.0)), px(gen(session_engine)))


def test_tiling_is_per_job(session_engine):
    tiled = gen(session_engine, tiling=True)
    assert "Tiling: True" in tiled.images[0].infotext
    assert not np.array_equal(px(tiled), px(gen(session_engine)))
    _file, model = session_engine.load(None)
    assert all(m.padding_mode == "zeros" for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d))


def test_interrupt_keeps_finished_images(session_engine):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3  # the first batch (3 steps, one UNet call each) finishes; the second stops

    r = session_engine.generate(Txt2ImgRequest(**{**BASE, "n_iter": 3}), should_stop=should_stop)
    assert r.interrupted and len(r.images) == 1


def test_progress_reports_every_step(session_engine):
    seen = []
    session_engine.generate(Txt2ImgRequest(**{**BASE, "n_iter": 2}), on_progress=lambda p: seen.append((p.job_no, p.step)))
    assert seen == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]


def test_vae_choice_is_per_job_and_recorded(data_dir, tiny_dir):
    from safetensors.torch import save_file

    from sdstudio.testing.synthetic import make_checkpoint

    vae_dir = data_dir / "models" / "VAE"
    vae_dir.mkdir(parents=True)
    other = make_checkpoint("sd1", "tiny", seed=99)
    save_file({k.removeprefix("first_stage_model."): v for k, v in other.items() if k.startswith("first_stage_model.")},
              str(vae_dir / "other-vae.safetensors"))
    engine = Engine(Paths(data_dir))
    plain = gen(engine)
    with_vae = gen(engine, vae="other-vae")
    p = infotext.parse(with_vae.images[0].infotext)
    assert p["VAE"] == "other-vae" and len(p["VAE hash"]) == 10
    assert not np.array_equal(px(plain), px(with_vae))
    assert np.array_equal(px(gen(engine)), px(plain))  # the next job uses the checkpoint's own VAE again
    assert np.array_equal(px(engine.generate(from_infotext(with_vae.images[0].infotext))), px(with_vae))
    # "Automatic" picks NAME.vae.safetensors beside the checkpoint
    os.link(vae_dir / "other-vae.safetensors", data_dir / "models" / "Stable-diffusion" / "tiny-sd1.vae.safetensors")
    engine.registry.refresh()
    assert np.array_equal(px(gen(engine, vae="Automatic")), px(with_vae))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_generate(family, tiny_dir, tmp_path):
    ckpt = tmp_path / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    os.link(tiny_dir / f"tiny-{family}.safetensors", ckpt / f"tiny-{family}.safetensors")
    engine = Engine(Paths(tmp_path))
    r = gen(engine, width=64, height=96)
    assert r.images[0].image.size == (64, 96)
    assert np.asarray(r.images[0].image).std() > 0
    assert np.array_equal(px(engine.generate(from_infotext(r.images[0].infotext))), px(r))


def test_long_prompt_uses_more_chunks(session_engine):
    long = ", ".join(["a red circle on a blue background"] * 30)  # ~ 250 tokens
    assert not np.array_equal(px(gen(session_engine, prompt=long)), px(gen(session_engine)))


def test_prompt_of_ten_thousand_tokens_works(session_engine):
    r = gen(session_engine, prompt="red " * 10_000, steps=1)
    assert len(r.images) == 1


def test_renamed_checkpoint_found_by_model_hash(data_dir):
    engine = Engine(Paths(data_dir))
    text = gen(engine).images[0].infotext
    ckpt = data_dir / "models" / "Stable-diffusion"
    (ckpt / "tiny-sd1.safetensors").rename(ckpt / "renamed.safetensors")
    engine.registry.refresh()
    again = engine.generate(from_infotext(text))
    assert infotext.parse(again.images[0].infotext)["Model"] == "renamed"
    legacy = text.replace(infotext.parse(text)["Model hash"], engine.registry.checkpoint("renamed").legacy_hash)
    assert infotext.parse(engine.generate(from_infotext(legacy)).images[0].infotext)["Model"] == "renamed"


def test_half_precision_vae_nan_is_retried_in_float32():
    from diffusers import AutoencoderKL

    from sdstudio.engine import vae as vae_ops

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4)
    with torch.no_grad():
        vae.post_quant_conv.weight.fill_(6e4)  # overflows float16 (max 65504) to inf -> NaN; fine in float32
    vae = vae.half()
    images = vae_ops.decode(vae, torch.full((1, 4, 8, 8), 0.18215 * 10), torch.device("cpu"))
    assert not torch.isnan(images).any() and vae.dtype == torch.float32


@pytest.mark.parametrize("a, b, same", [
    ("a (red:1.0) circle", "a red circle", True),
    ("a (red) circle", "a red circle", False),
    ("a [red] circle", "a red circle", False),
    ("a [red:blue:0.5] circle", "a red circle", False),
    ("a [red:blue:0.5] circle", "a blue circle", False),
    ("a [red:blue:0] circle", "a blue circle", True),  # switches before the first step
    ("a [red:blue:99] circle", "a red circle", True),  # never switches
    ("a [red|blue] circle", "a red circle", False),
    ("a red circle AND a blue square", "a red circle", False),
    # a zero-weight part contributes nothing (it only changes the UNet batch, so the last bit may differ)
    ("a red circle :1 AND a red circle :0", "a red circle", "close"),
    ("a red circle BREAK on a blue background", "a red circle on a blue background", False),
])
def test_prompt_language_reaches_the_image(session_engine, a, b, same):
    pa, pb = px(gen(session_engine, prompt=a)), px(gen(session_engine, prompt=b))
    if same == "close":
        assert np.abs(pa.astype(int) - pb.astype(int)).max() <= 1
    else:
        assert np.array_equal(pa, pb) is same


def test_prompt_editing_with_second_order_sampler_and_batch(session_engine):
    r = gen(session_engine, prompt="a [red:blue:2] circle AND square :0.5", sampler_name="Heun", batch_size=2)
    again = session_engine.generate(from_infotext(r.images[1].infotext))
    assert_recreated(session_engine, px(again), px(r, 1))


def test_emphasis_modes_and_novelai_braces(session_engine):
    weighted = "a (red:1.6) circle"
    original = gen(session_engine, prompt=weighted)
    no_norm = gen(session_engine, prompt=weighted, emphasis="No norm")
    ignored = gen(session_engine, prompt=weighted, emphasis="None")
    assert np.array_equal(px(ignored), px(gen(session_engine, prompt="a red circle")))
    assert len({px(original).tobytes(), px(no_norm).tobytes(), px(ignored).tobytes()}) == 3
    assert "Emphasis: No norm" in no_norm.images[0].infotext
    assert np.array_equal(px(session_engine.generate(from_infotext(no_norm.images[0].infotext))), px(no_norm))
    braces = gen(session_engine, prompt="a {red} circle", novelai_braces=True)
    assert "NovelAI braces: True" in braces.images[0].infotext
    assert np.array_equal(px(braces), px(gen(session_engine, prompt="a (red:1.05) circle")))
    assert not np.array_equal(px(braces), px(gen(session_engine, prompt="a {red} circle")))
