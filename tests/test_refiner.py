"""A1111's refiner on tiny SDXL base + refiner checkpoints: when it takes over, what it is conditioned
on, Hires. fix passes, infotext round trip, X/Y/Z, and bad combinations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sdstudio.core import infotext
from sdstudio.core.errors import RequestError
from sdstudio.core.outputs import read_infotext
from sdstudio.core.params import Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.engine.schedules import DiscreteSchedule, get_sigmas
from sdstudio.models.errors import ModelNotFoundError

BASE = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 6, "width": 64, "height": 64, "seed": 3,
        "sampler_name": "Euler", "model": "base"}


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner")
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    for stem, family in (("base", "sdxl"), ("refiner", "sdxl_refiner"), ("sd1", "sd1")):
        os.link(tiny_dir / f"tiny-{family}.safetensors", folder / f"{stem}.safetensors")
    return Engine(Paths(root), cache_size=3)


def gen(engine, **kw):
    return engine.generate(Txt2ImgRequest(**{**BASE, **kw}))


def px(result, i=0):
    return np.asarray(result.images[i].image)


class Calls:
    """Which UNet each denoiser call reached, and the SDXL time ids it got (forward pre-hooks, no mocks)."""

    def __init__(self, engine):
        self.log: list[tuple[str, torch.Tensor]] = []
        self.handles = []
        for name in ("base", "refiner"):
            unet = engine.load(name)[1].unet
            self.handles.append(unet.register_forward_pre_hook(
                lambda m, args, kwargs, n=name: self.log.append((n, kwargs["added_cond_kwargs"]["time_ids"].clone())),
                with_kwargs=True))

    def names(self) -> list[str]:
        return [n for n, _ in self.log]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def expected_switch_call(steps: int, at: float) -> int:
    """A1111's rule, written out: the model timestep nearest to the call's sigma, (999 - t) / 1000 >= at."""
    schedule = DiscreteSchedule()
    sigmas = get_sigmas("uniform", steps, schedule)  # Euler's Automatic schedule
    for i, s in enumerate(sigmas[:-1]):  # Euler: one denoiser call per step
        t = int(torch.argmin((schedule.sigmas - s).abs()))
        if (999 - t) / 1000 >= at:
            return i
    return steps


@pytest.mark.parametrize("at", [0.3, 0.8])
def test_refiner_takes_over_where_a1111_switches(engine, at):
    with Calls(engine) as calls:
        r = gen(engine, refiner_checkpoint="refiner", refiner_switch_at=at)
    k = expected_switch_call(6, at)
    assert 0 < k < 6
    assert calls.names() == ["base"] * k + ["refiner"] * (6 - k)
    p = infotext.parse(r.images[0].infotext)
    refiner_file = engine.registry.checkpoint("refiner")
    assert p["Refiner"] == f"refiner [{refiner_file.short_hash}]" and p["Refiner switch at"] == str(at)
    assert p["Model"] == "base"


def test_switch_by_sampling_steps_option(engine):
    with Calls(engine) as calls:
        r = gen(engine, refiner_checkpoint="refiner", refiner_switch_at=0.5, refiner_switch_by_sample_steps=True)
    assert calls.names() == ["base"] * 3 + ["refiner"] * 3  # 3 of 6 calls done = 0.5
    assert infotext.parse(r.images[0].infotext)["Refiner switch by sampling steps"] == "True"


def test_time_ids_base_crop_and_refiner_aesthetic_scores(engine):
    with Calls(engine) as calls:
        gen(engine, refiner_checkpoint="refiner", refiner_switch_at=0.5, width=64, height=96, sdxl_crop_top=8,
            sdxl_crop_left=16, sdxl_refiner_high_aesthetic_score=7.0, sdxl_refiner_low_aesthetic_score=1.5)
    base = next(ids for n, ids in calls.log if n == "base")
    refiner = next(ids for n, ids in calls.log if n == "refiner")
    # rows: the prompt, then the negative prompt (batch-invariant CPU path: one image per call)
    assert base.tolist() == [[96, 64, 8, 16, 96, 64]] * 2  # (height, width) as A1111 builds them
    assert refiner.tolist() == [[96, 64, 8, 16, 7.0], [96, 64, 8, 16, 1.5]]


def test_never_switching_and_switching_at_once_are_the_two_models_alone(engine):
    """switch at 1: completed never reaches 1 (timestep 0 gives 0.999): the base's own picture.
    switch at 0: the refiner from the first call: the refiner's own picture."""
    assert np.array_equal(px(gen(engine, refiner_checkpoint="refiner", refiner_switch_at=1.0)), px(gen(engine)))
    whole = gen(engine, refiner_checkpoint="refiner", refiner_switch_at=0.0)
    assert np.array_equal(px(whole), px(gen(engine, model="refiner")))
    assert not np.array_equal(px(whole), px(gen(engine)))
    assert "Refiner" not in infotext.parse(gen(engine, refiner_checkpoint="refiner", refiner_switch_at=1.0)
                                           .images[0].infotext)


def test_refiner_job_recreated_from_its_infotext(engine):
    r = gen(engine, refiner_checkpoint="refiner", refiner_switch_at=0.5, sampler_name="DPM++ 2M", n_iter=2)
    for i, image in enumerate(r.images):
        req = from_infotext(image.infotext)
        assert req.refiner_switch_at == 0.5 and req.refiner_checkpoint.startswith("refiner [")
        assert np.array_equal(px(engine.generate(req)), px(r, i))  # the second batch starts on the base again


def test_hires_fix_uses_the_refiner_in_the_second_pass_by_default(engine):
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6, "hr_second_pass_steps": 4}
    with Calls(engine) as calls:
        r = gen(engine, refiner_checkpoint="refiner", refiner_switch_at=0.2, **hires)
    names = calls.names()
    assert names[:6] == ["base"] * 6 and "refiner" in names[6:]  # first pass on the base alone
    assert "Hires refiner" not in infotext.parse(r.images[0].infotext)
    with Calls(engine) as calls:
        r = gen(engine, refiner_checkpoint="refiner", refiner_switch_at=0.5, hires_fix_refiner_pass="first pass",
                **hires)
    names = calls.names()
    assert names[:6] == ["base"] * 3 + ["refiner"] * 3 and set(names[6:]) == {"refiner"}
    assert infotext.parse(r.images[0].infotext)["Hires refiner"] == "first pass"


def test_refiner_that_is_the_checkpoint_itself_is_ignored(engine):
    r = gen(engine, refiner_checkpoint="base", refiner_switch_at=0.5)
    assert np.array_equal(px(r), px(gen(engine))) and "Refiner" not in infotext.parse(r.images[0].infotext)
    assert np.array_equal(px(gen(engine, refiner_checkpoint="None")), px(gen(engine)))


def test_bad_refiners_are_named(engine):
    with pytest.raises(ModelNotFoundError):
        gen(engine, refiner_checkpoint="no-such-model")
    with pytest.raises(RequestError, match="latent space"):
        gen(engine, refiner_checkpoint="sd1")
    with pytest.raises(RequestError, match="refiner_switch_at"):
        gen(engine, refiner_checkpoint="refiner", refiner_switch_at=1.5)
    with pytest.raises(RequestError, match="hires_fix_refiner_pass"):
        gen(engine, refiner_checkpoint="refiner", hires_fix_refiner_pass="third pass")


def test_xyz_refiner_axes(engine):
    from sdstudio.scripts.studio import Studio

    studio = Studio(engine)
    req = Txt2ImgRequest(**BASE, script_name="X/Y/Z plot", script_args={
        "x_type": "Refiner checkpoint", "x_values": "None, refiner", "y_type": "Refiner switch at",
        "y_values": "0.3, 1.0", "include_lone_images": True})
    _grid, *cells = studio.generate(req.validate()).images
    texts = [infotext.parse(c.infotext) for c in cells]
    switched = [i for i, t in enumerate(texts) if "Refiner" in t]
    assert len(cells) == 4 and len(switched) == 1  # only (refiner, 0.3) switches; 1.0 never does
    assert texts[switched[0]]["Refiner switch at"] == "0.3"
    assert np.array_equal(np.asarray(cells[switched[0]].image),
                          px(gen(engine, refiner_checkpoint="refiner", refiner_switch_at=0.3)))


def test_api_and_cli_take_a1111s_fields(engine, capsys):
    from fastapi.testclient import TestClient

    from sdstudio.cli import build_parser, main
    from sdstudio.server import create_app

    root = engine.paths.data_dir
    args = build_parser().parse_args(["serve", "--data-dir", str(root), "--api", "--nowebui"])
    client = TestClient(create_app(args))
    body = {k: v for k, v in BASE.items() if k != "model"}
    body.update(refiner_checkpoint="refiner", refiner_switch_at=0.5,
                override_settings={"sd_model_checkpoint": "base", "sdxl_refiner_high_aesthetic_score": 6.5})
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Refiner: refiner [" in info["infotexts"][0] and "Refiner switch at: 0.5" in info["infotexts"][0]
    bad = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"hires_fix_refiner_pass": "x"}})
    assert bad.status_code == 422 and "hires_fix_refiner_pass" in bad.text
    code = main(["txt2img", "a red circle", "--model", "base", "--refiner", "refiner", "--refiner-switch-at", "0.5",
                 "--steps", "6", "--sampler", "Euler", "--size", "64x64", "--seed", "3", "--data-dir", str(root)])
    out = capsys.readouterr().out
    assert code == 0
    png = next(line.strip() for line in out.splitlines() if line.strip().endswith(".png"))
    assert "Refiner switch at: 0.5" in read_infotext(png)
