"""Splitting a script job's units (X/Y/Z cells, prompt-file lines) as workers do, in one process on the tiny SD1
model: units made in ranges and then put together by the script's own run (making none) give the pictures,
the grid and the infotexts of one uninterrupted run; a range's run gives no outputs; a missing unit counts
as an interrupt. The same on Ray workers: test_ray_workers.py."""

from __future__ import annotations

import numpy as np
import pytest

from sdstudio.core.params import Img2ImgRequest, Txt2ImgRequest
from sdstudio.core.paths import DeviceOptions, Paths
from sdstudio.engine.generate import Engine
from sdstudio.scripts import Studio, UnitResult
from sdstudio.service.queue import Job
from sdstudio.service.shards import split_of, split_ranges

BASE = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 11, "subseed": 99,
        "sampler_name": "Euler"}  # the seeds a queued job has (concrete when it was submitted)
XYZ = {"x_type": "Seed", "x_values": "-1, 7", "y_type": "Steps", "y_values": "1, 2", "z_type": "CFG Scale",
       "z_values": "3, 7", "include_lone_images": True, "include_sub_grids": True}
LINES = "a blue square\n--prompt \"a green dot\" --steps 1\n--prompt \"a yellow star\" --seed 5"


@pytest.fixture(scope="module")
def studio(make_data_root):
    return Studio(Engine(Paths(make_data_root("shards")), DeviceOptions(precision="full")))


def xyz(**kw) -> Txt2ImgRequest:
    return Txt2ImgRequest(**BASE, script_name="X/Y/Z plot", script_args={**XYZ, **kw})


def lines() -> Txt2ImgRequest:
    return Txt2ImgRequest(**BASE, script_name="Prompts from file or textbox", script_args={"prompt_txt": LINES})


def same(a, b) -> bool:
    return (np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.infotext == b.infotext
            and (a.seed, a.subseed, a.grid) == (b.seed, b.subseed, b.grid))


def test_count_units_and_what_splits(studio):
    assert studio.count_units(xyz()) == 8 and studio.count_units(lines()) == 3
    matrix = Txt2ImgRequest(**{**BASE, "prompt": "a cat|in a hat|wearing boots"}, script_name="Prompt matrix")
    assert studio.count_units(matrix) == 4
    assert studio.count_units(Txt2ImgRequest(**BASE)) == 0
    from PIL import Image

    loopback = Img2ImgRequest(**BASE, init_images=[Image.new("RGB", (64, 64))], script_name="Loopback",
                              script_args={"loops": 3})
    assert studio.count_units(loopback) == 0  # each loop starts from the last one's picture: not split

    def job(request, result=None) -> Job:
        return Job("j", "c", "txt2img", "running", {"request": request.to_dict()}, result or {})

    assert split_of(job(xyz()), studio).__dict__ == {"mode": "units", "start": 0, "end": 8}
    done = {"units": {str(n): [] for n in (0, 1, 2, 4)}}  # made before a pause: the rest splits
    assert split_of(job(xyz(), done), studio).__dict__ == {"mode": "units", "start": 3, "end": 8}
    assert split_of(job(xyz()), None) is None  # no studio to count with
    assert split_of(job(Txt2ImgRequest(**BASE, n_iter=3)), None).__dict__ == {"mode": "batches", "start": 0, "end": 3}
    assert split_of(job(Txt2ImgRequest(**BASE, n_iter=1)), None) is None


def made_in_ranges(studio, req, parts: int) -> dict[int, UnitResult]:
    """The units of ``req`` made by ``parts`` range runs, as shards on as many workers make them."""
    units: dict[int, UnitResult] = {}
    outputs = []
    for start, end in split_ranges(0, studio.count_units(req), parts):
        out = studio.generate(req, unit_range=(start, end), on_batch=lambda n, b: outputs.append(b),
                              on_unit=lambda n, images: units.__setitem__(n, UnitResult(list(images))))
        assert out.images == [] and out.paused  # its units, no outputs
    assert outputs == []
    return units


@pytest.mark.parametrize("make", [xyz, lines], ids=["xyz", "prompts-from-file"])
def test_units_made_apart_and_put_together_are_one_runs_outputs(studio, make):
    req = make()
    alone = studio.generate(req)
    units = made_in_ranges(studio, req, 3)
    assert sorted(units) == list(range(studio.count_units(req)))
    steps = []
    whole = studio.generate(req, units=units, make_units=False, on_progress=steps.append)
    assert steps == []  # nothing was generated: the units are put together
    assert len(whole.images) == len(alone.images) and not whole.interrupted
    assert all(same(a, b) for a, b in zip(whole.images, alone.images, strict=True))
    if make is xyz:  # the Z grid, two sub grids, then the eight cells
        assert [g.grid for g in whole.images] == [True] * 3 + [False] * 8


def test_a_unit_missing_when_put_together_is_an_interrupt(studio):
    req = lines()
    units = made_in_ranges(studio, req, 3)
    del units[1]
    whole = studio.generate(req, units=units, make_units=False)
    assert whole.interrupted and [g.infotext for g in whole.images] == [g.infotext for g in units[0].images]

