"""X/Y/Z plot value syntax, axes and ordering (pure), and whole plots on the tiny model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sdstudio.core import infotext, scripts, xyz
from sdstudio.core.params import RequestError, Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.scripts import Studio
from sdstudio.scripts.plots import a1111_axis_label


@pytest.mark.parametrize("text, kind, expected", [
    ("1, 2, 3", int, [1, 2, 3]),
    ("1-5", int, [1, 2, 3, 4, 5]),
    ("1-5 (+2)", int, [1, 3, 5]),
    ("10-1 (-3)", int, [10, 7, 4]),  # A1111 adds 1 to the end whatever the direction
    ("10-100 [5]", int, [10, 32, 55, 77, 100]),
    ("-5-5 (+5)", int, [-5, 0, 5]),
    ("1-3, 7, 10-12", int, [1, 2, 3, 7, 10, 11, 12]),
    (" 4 ,, 8 ", int, [4, 8]),  # empty items are skipped
    ("0.5-2 (+0.5)", float, [0.5, 1.0, 1.5, 2.0]),
    ("1-2 [3]", float, [1.0, 1.5, 2.0]),
    ("7, 3.5", float, [7.0, 3.5]),
    ("1-2", float, [1.0, 2.0]),
    ('Euler a, "DPM++ 2M, Karras", DDIM', str, ["Euler a", "DPM++ 2M, Karras", "DDIM"]),
    ("  cat ,dog  ", str, ["cat", "dog"]),
])
def test_expand_values_like_a1111(text, kind, expected):
    assert xyz.expand_values(text, kind) == pytest.approx(expected) if kind is float else \
        xyz.expand_values(text, kind) == expected


@pytest.mark.parametrize("text, kind, needle", [
    ("1, two", int, "'two' is not an integer"), ("1.5", int, "not an integer"), ("x-y", float, "not a number"),
    ("1-5 (+0)", int, "never ends"), ("0-100000", int, "more than"),
])
def test_bad_values_are_named(text, kind, needle):
    with pytest.raises(xyz.AxisError, match=needle):
        xyz.expand_values(text, kind)


def test_axes_seeds_permutations_and_labels():
    seeds = xyz.axis_values(xyz.axis("Seed"), "-1, 5, -1")
    assert seeds[1] == 5 and -1 not in seeds
    assert xyz.axis_values(xyz.axis("seed"), "-1", keep_random_seeds=True) == [-1]  # names ignore case
    perms = xyz.axis_values(xyz.axis("Prompt order"), "cat, dog, hat")
    assert len(perms) == 6 and perms[0] == ("cat", "dog", "hat")
    assert xyz.label(xyz.axis("CFG Scale"), 7.0) == "CFG Scale: 7"
    assert xyz.label(xyz.axis("Sampler"), "Euler a") == "Euler a"
    assert xyz.label(xyz.axis("Prompt order"), ("dog", "cat")) == "dog, cat"
    with pytest.raises(xyz.AxisError, match="unknown axis type 'Colour'"):
        xyz.axis("Colour")


def test_apply_functions():
    req = Txt2ImgRequest(prompt="a cat in a hat, <lora:style:0.5> <lora:b:1:0.3>", negative_prompt="cat food")
    sr = xyz.axis("Prompt S/R")
    out = sr.apply(req, "dog", ["cat", "dog"])
    assert out.prompt.startswith("a dog in a hat") and out.negative_prompt == "dog food"
    with pytest.raises(xyz.AxisError, match="did not find 'cow'"):
        sr.apply(req, "x", ["cow", "x"])
    ordered = xyz.axis("Prompt order").apply(Txt2ImgRequest(prompt="a cat, a dog, a hat"), ("a hat", "a cat", "a dog"), [])
    assert ordered.prompt == "a hat, a cat, a dog"
    assert xyz.axis("Size").apply(req, "640x384", []).width == 640
    assert xyz.axis("LoRA weight").apply(req, 0.8, []).prompt.endswith("<lora:style:0.8> <lora:b:0.8>")
    with pytest.raises(xyz.AxisError, match="no <lora"):
        xyz.axis("LoRA weight").apply(Txt2ImgRequest(prompt="a cat"), 0.8, [])
    assert xyz.axis("Styles").apply(req.replace(styles=["a"]), "b, c", []).styles == ["a", "b", "c"]
    face = xyz.axis("Face restore")
    assert face.apply(req, "true", []).restore_faces and not face.apply(req, "false", []).restore_faces
    gfpgan = face.apply(req, "GFPGAN", [])
    assert gfpgan.restore_faces and gfpgan.face_restoration_model == "GFPGAN"
    with pytest.raises(xyz.AxisError, match="not true, false, CodeFormer or GFPGAN"):
        face.apply(req, "RestoreFormer", [])


def test_cell_order_puts_costly_axes_outside():
    plain = xyz.cell_order((2, 2, 1), (0, 0, 0))
    assert plain == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]  # Z, then Y, then X (innermost)
    models_on_x = xyz.cell_order((3, 4, 1), (2, 0, 0))
    xs = [c[0] for c in models_on_x]
    assert sum(1 for a, b in itertools.pairwise(xs) if a != b) == 2  # the checkpoint changes twice: 3 loads
    assert sorted(models_on_x) == sorted(xyz.cell_order((3, 4, 1), (0, 0, 0)))  # the same cells


def test_a1111_positional_args_and_infotext_round_trip():
    args = scripts.builtin().from_a1111_list("X/Y/Z plot", [6, "3,7", [], 4, "2-4", [], 0, "", [], True, False,
                                                            False, False, False, False, False, 8, False], {},
                                             "txt2img")
    assert (args["x_type"], args["y_type"], args["z_type"], args["margin_size"]) == ("CFG Scale", "Steps", "Nothing", 8)
    assert scripts.builtin().from_a1111_list("X/Y/Z plot", ["Sampler", "", ["Euler", "DDIM"]], {}, "txt2img")["x_values"] == \
        "Euler,DDIM"  # a dropdown axis sends its list
    pairs = scripts.builtin().infotext_pairs("X/Y/Z plot", args)
    assert pairs == {"Script": "X/Y/Z plot", "X Type": "CFG Scale", "X Values": "3,7", "Y Type": "Steps",
                     "Y Values": "2-4", "XYZ margin": 8}
    back = scripts.builtin().from_infotext_pairs({k: str(v) for k, v in pairs.items()})[0]
    assert back == ("X/Y/Z plot", {"x_type": "CFG Scale", "x_values": "3,7", "y_type": "Steps", "y_values": "2-4",
                                   "margin_size": 8})
    with pytest.raises(scripts.ScriptError, match="out of range"):
        a1111_axis_label(99, "txt2img")
    assert a1111_axis_label(5, "txt2img") == "Hires steps" and a1111_axis_label(7, "img2img") == \
        "Prompt S/R"


@pytest.fixture(scope="module")
def engine(make_data_root):
    from sdstudio.testing.synthetic import write_checkpoint

    root = make_data_root("xyz", {"a": "sd1"})
    for name, seed in (("b", 8), ("c", 9)):
        write_checkpoint(root / "models" / "Stable-diffusion" / f"{name}.safetensors", "sd1", "tiny", seed=seed)
    return Studio(Engine(Paths(root)))


BASE = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler"}


def plot(engine, **args):
    jobs = []
    req = Txt2ImgRequest(**BASE, script_name="X/Y/Z plot", script_args=args)
    return engine.generate(req.validate(), on_progress=lambda p: jobs.append((p.job_no, p.job_count))), jobs


def test_checkpoints_load_once_each_and_cells_match_single_runs(engine):
    before = engine.engine.models.loads
    result, jobs = plot(engine, x_type="Checkpoint name", x_values="a, b, c", y_type="CFG Scale", y_values="3-9 [4]",
                        include_lone_images=True)
    assert engine.engine.models.loads - before == 3  # 12 cells, each checkpoint loaded once
    assert jobs[-1] == (11, 12)
    grid, *cells = result.images
    assert grid.grid and len(cells) == 12 and not any(c.grid for c in cells)
    assert grid.image.width > 3 * 64 and grid.image.height > 4 * 64  # legend margins
    one = infotext.parse(cells[0].infotext)
    assert "Script" not in one  # a cell's infotext describes that image alone
    alone = engine.generate(from_infotext(cells[5].infotext))
    assert np.array_equal(np.asarray(alone.images[0].image), np.asarray(cells[5].image))
    fields = infotext.parse(grid.infotext)
    assert fields["X Type"] == "Checkpoint name" and fields["Y Values"] == "3-9 [4]"


def test_the_grid_re_creates_the_whole_plot(engine):
    result, _ = plot(engine, x_type="Seed", x_values="-1, 3", y_type="Steps", y_values="1, 2", z_type="Sampler",
                     z_values="Euler, DDIM", include_sub_grids=True)
    z_grid, sub_a, _sub_b = result.images
    assert all(g.grid for g in result.images)
    assert z_grid.image.width >= sub_a.image.width * 2
    drawn = infotext.parse(z_grid.infotext)["X Values"]
    assert "-1" not in drawn and drawn.endswith("3")  # the random seed, written down
    again = engine.generate(from_infotext(z_grid.infotext))
    assert np.array_equal(np.asarray(again.images[0].image), np.asarray(z_grid.image))


def test_bad_plots_fail_before_any_image(engine):
    for args, needle in [({"x_type": "Sampler", "x_values": "Euler, Nope"}, "'Nope'"),
                         ({"x_type": "Checkpoint name", "x_values": "a, zzz"}, "'zzz'"),
                         ({"x_type": "Steps", "x_values": "2, x"}, "Steps: 'x'"),
                         ({"x_type": "Prompt S/R", "x_values": "blue, green"}, "did not find 'blue'"),
                         ({"x_type": "Size", "x_values": "64x64, 65x64"}, "multiple of 8")]:
        steps: list = []
        with pytest.raises(RequestError, match=needle):
            engine.generate(Txt2ImgRequest(**BASE, script_name="X/Y/Z plot", script_args=args),
                           on_progress=steps.append)
        assert steps == [], args


def test_interrupt_keeps_what_is_done(engine):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 6  # a few steps in: the first cells are done

    req = Txt2ImgRequest(**BASE, script_name="X/Y/Z plot", script_args={"x_type": "CFG Scale", "x_values": "1-8"})
    result = engine.generate(req, should_stop=stop)
    assert result.interrupted and len(result.images) == 1 and result.images[0].grid


def test_prompt_matrix_grid_and_images(engine):
    req = Txt2ImgRequest(**{**BASE, "prompt": "a cat|in a hat|wearing boots|red"}, script_name="Prompt matrix",
                         script_args={"different_seeds": True})
    result = engine.generate(req.validate())
    grid, *images = result.images
    assert grid.grid and len(images) == 8
    assert [infotext.parse(g.infotext)[infotext.PROMPT] for g in images[:4]] == [
        "a cat", "a cat, in a hat", "a cat, wearing boots", "a cat, in a hat, wearing boots"]
    assert [g.seed for g in images] == list(range(1, 9))
    assert grid.image.width > 4 * 64 and grid.image.height > 2 * 64  # 4 columns, 2 rows, labels
    at_start = engine.generate(req.replace(script_args={"put_at_start": True, "variations_delimiter": "space"}))
    assert infotext.parse(at_start.images[2].infotext)[infotext.PROMPT] == "in a hat a cat"
    with pytest.raises(RequestError, match="separate the variable parts"):
        engine.generate(req.replace(prompt="a cat"))


def test_prompts_from_file(engine):
    text = 'a cat\n\n--prompt "a dog" on grass --steps 3 --seed 9 --sampler_name "euler a"\n--negative_prompt ugly\n'
    req = Txt2ImgRequest(**{**BASE, "prompt": "photo", "seed": -1}, script_name="Prompts from file or textbox",
                         script_args={"prompt_txt": text, "prompt_position": "end"})
    result = engine.generate(req.validate())
    fields = [infotext.parse(g.infotext) for g in result.images]
    assert [f[infotext.PROMPT] for f in fields] == ["photo a cat", "photo a dog on grass", "photo"]
    assert fields[1]["Steps"] == "3" and fields[1]["Seed"] == "9" and fields[1]["Sampler"] == "Euler a"
    assert fields[2].get(infotext.NEGATIVE) == "ugly"
    assert fields[0]["Seed"] != fields[2]["Seed"]  # -1: a seed of its own per line
    same = engine.generate(req.replace(script_args={"prompt_txt": "a\nb", "checkbox_iterate_batch": True}))
    assert same.images[0].seed == same.images[1].seed
    iterate = engine.generate(req.replace(seed=5, script_args={"prompt_txt": "a\nb", "checkbox_iterate": True}))
    assert [g.seed for g in iterate.images] == [5, 6]
    with pytest.raises(RequestError, match="line 2: unknown option --colour.*line 3: --steps: 'x'"):
        req.replace(script_args={"prompt_txt": "ok\n--colour red\n--steps x"}).validate()


def test_discard_penultimate_sigma_and_extra_noise(engine, tmp_path):

    def px(r):
        return np.asarray(r.images[0].image)

    plain = engine.generate(Txt2ImgRequest(**BASE))
    discard = engine.generate(Txt2ImgRequest(**BASE, always_discard_next_to_last_sigma=True))
    assert not np.array_equal(px(plain), px(discard))
    assert "Discard penultimate sigma: True" in discard.images[0].infotext
    assert np.array_equal(px(engine.generate(from_infotext(discard.images[0].infotext))), px(discard))
    dpm2 = {**BASE, "sampler_name": "DPM2"}  # discards already: the option changes nothing
    assert np.array_equal(px(engine.generate(Txt2ImgRequest(**dpm2))),
                          px(engine.generate(Txt2ImgRequest(**dpm2, always_discard_next_to_last_sigma=True))))
    plain.images[0].image.save(tmp_path / "init.png")
    from sdstudio.core.params import Img2ImgRequest

    i2i = {**BASE, "init_images": [str(tmp_path / "init.png")], "denoising_strength": 0.5}
    base, noisy = (engine.img2img(Img2ImgRequest(**i2i, extra_noise=e)) for e in (0.0, 0.5))
    assert not np.array_equal(px(base), px(noisy)) and "Extra noise: 0.5" in noisy.images[0].infotext
    assert "Extra noise" not in base.images[0].infotext and "Extra noise" not in plain.images[0].infotext
    result, _ = plot(engine, x_type="Always discard next-to-last sigma", x_values="False, True", y_type="Extra noise",
                     y_values="0, 0.2")
    assert result.images[0].grid
