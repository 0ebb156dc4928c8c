"""A long script in the queue: it yields to another client between its units of work (X/Y/Z cells) and
resumes from the stored units, with the same pixels as an uninterrupted run."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.scripts import Studio
from sdstudio.service.jobs import JobService, Txt2ImgJob
from sdstudio.service.queue import SQLiteJobQueue

PLOT = Txt2ImgRequest(prompt="a red circle", width=64, height=64, steps=3, seed=9, sampler_name="Euler",
                      script_name="X/Y/Z plot", script_args={"x_type": "CFG Scale", "x_values": "3, 5, 7",
                                                             "include_lone_images": True})
SINGLE = Txt2ImgRequest(prompt="a blue square", width=64, height=64, steps=2, seed=1, sampler_name="Euler")


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_an_xyz_plot_lets_another_clients_image_go_between_cells(data_dir):
    engine = Engine(Paths(data_dir))
    service = JobService(engine, SQLiteJobQueue(data_dir / "jobs.sqlite3"))
    plot = service.submit("alice", Txt2ImgJob(PLOT, save_images=False))
    single = service.submit("bob", Txt2ImgJob(SINGLE, save_images=False))  # waiting before the plot starts
    service.start()
    try:
        done_plot, done_single = service.wait(plot.id, 600), service.wait(single.id, 600)
    finally:
        service.stop()
    assert done_plot.status == done_single.status == "done", (done_plot.error, done_single.error)
    assert done_single.finished < done_plot.finished  # bob's image did not wait for the whole plot
    assert done_single.started < done_plot.finished
    assert "units" not in done_plot.result  # only kept while the plot was paused

    # the same plot without anyone else in the queue: the same grid and cells, pixel for pixel
    alone = Studio(engine).generate(PLOT)
    grid = next(g for g in alone.images if g.grid)
    cells = [g for g in alone.images if not g.grid]
    (grid_entry,) = done_plot.result["grids"]
    assert np.array_equal(pixels(grid_entry["path"]), np.asarray(grid.image))
    assert [pixels(im["path"]).tolist() for im in done_plot.result["images"]] == \
        [np.asarray(c.image).tolist() for c in cells]
    assert grid_entry["infotext"] == grid.infotext


def test_a_paused_script_resumes_from_its_stored_units(data_dir):
    """The studio's own pause: stop after the first unit, resume with the units it handed out."""
    studio = Studio(Engine(Paths(data_dir)))
    units, given = {}, []
    first = studio.generate(PLOT, should_pause=lambda: True, on_unit=lambda n, images: units.update({n: images}),
                            on_batch=lambda n, images: given.extend(images))
    assert first.paused and list(units) == [0] and given == []  # one cell made, nothing given yet
    from sdstudio.scripts import UnitResult

    ran = []
    rest = studio.generate(PLOT, units={n: UnitResult(images) for n, images in units.items()},
                           on_unit=lambda n, images: ran.append(n), first_batch=first.batches_done)
    assert not rest.paused and ran == [1, 2]  # the stored cell is not made again
    alone = studio.generate(PLOT)
    assert [np.asarray(g.image).tolist() for g in rest.images] == [np.asarray(g.image).tolist() for g in alone.images]
