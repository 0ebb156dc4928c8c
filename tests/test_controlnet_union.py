"""ControlNet++ union models (sdstudio.engine.controlnet_union): the unit's union_control_type field, detection in
both layouts, the control-type embedding against its formula, the extension's one-token union merge against
diffusers' ControlNetUnionModel where the two agree, Unknown as a plain hint, and whole requests on the tiny SDXL
checkpoint."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdstudio.core import controlnet as cn
from sdstudio.core import infotext
from sdstudio.core.errors import RequestError
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine import controlnet_union as cu
from sdstudio.engine.generate import Engine
from sdstudio.models.controlnet import detect_control_file, load_control_model
from sdstudio.scripts import Studio
from sdstudio.testing.controlnet_files import controlnet_union_for, write_controlnet_union
from sdstudio.testing.synthetic import tiny_unet

torch.set_num_threads(1)


# ---- the unit's field ------------------------------------------------------------------------------------------
def test_union_control_type_values():
    assert cn.ControlUnit().union_control_type == "Unknown"
    for given, expected in [("Hard Edge", "Hard Edge"), ("hard_edge", "Hard Edge"), ("HARDEDGE", "Hard Edge"),
                            ("canny", "Hard Edge"), ("mlsd", "Hard Edge"), ("scribble", "Soft Edge"),
                            ("OpenPose", "OpenPose"), ("normal map", "Normal Map"), ("blur", "Tile"),
                            ("unknown", "Unknown")]:
        assert cn.unit_from_dict({"union_control_type": given}).union_control_type == expected
    with pytest.raises(cn.ControlNetError, match="unit 2.union_control_type: 'Edges' is not a union control type; "
                                                 "one of OpenPose, Depth"):
        cn.unit_from_dict({"union_control_type": "Edges"}, 2)
    unit = cn.unit_from_dict({"enabled": True, "union_control_type": "Depth"})
    assert cn.unit_from_dict(unit.to_dict()) == unit
    assert "Union" not in unit.infotext()  # the extension's infotext has no such field
    assert [cu.type_index(t) for t in cn.UNION_TYPES] == list(range(8)) and cu.type_index("Unknown") is None


# ---- files ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("union")
    union = write_controlnet_union(d / "union-xl.safetensors", seed=3)
    write_controlnet_union(d / "union-xl-ldm.safetensors", layout="ldm", union=union)
    return d, union


def test_both_layouts_load_the_same_model(files):
    d, union = files
    spec = detect_control_file(d / "union-xl.safetensors")
    assert (spec.kind, spec.base, spec.layout) == ("controlnet_union", "sdxl", "diffusers")
    assert spec.describe() == "SDXL ControlNet Union"
    assert (spec.config["num_control_type"], spec.config["num_trans_layer"]) == (8, 1)
    expected = union.state_dict()
    for name in ("union-xl.safetensors", "union-xl-ldm.safetensors"):
        got = load_control_model(d / name).module.state_dict()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


# ---- the forward pass -------------------------------------------------------------------------------------------
def _inputs(union, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    hidden = torch.randn(rows, 6, union.config.cross_attention_dim, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g).expand(rows, -1, -1, -1)
    text = torch.randn(rows, union.config.projection_class_embeddings_input_dim - 6 * 256, generator=g)
    added = {"text_embeds": text, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * rows)}
    return x, torch.full((rows,), 700.0), hidden, hint, added


def test_control_type_embedding_formula(files):
    _, union = files
    for index in (None, 3):
        one_hot = torch.zeros(8)
        if index is not None:
            one_hot[index] = 1.0
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        args = one_hot[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(1, -1)  # ldm's timestep_embedding
        lin1, lin2 = union.control_add_embedding.linear_1, union.control_add_embedding.linear_2
        expected = lin2(torch.nn.functional.silu(lin1(features)))
        with torch.no_grad():
            assert torch.allclose(cu.control_type_embedding(union, index, 2, torch.float32), expected.expand(2, -1),
                                  atol=1e-5)


def test_a_known_type_matches_diffusers_forward(files):
    _, union = files
    x, t, hidden, hint, added = _inputs(union)
    for index in (0, 3, 7):
        with torch.no_grad():
            down, mid = cu.union_forward(union, x, t, hidden, hint, index, added)
            one_hot = torch.zeros(2, 8)
            one_hot[:, index] = 1.0
            ref_down, ref_mid = union(x, t, hidden, controlnet_cond=[hint], control_type=one_hot,
                                      control_type_idx=[index], added_cond_kwargs=added, return_dict=False)
        assert len(down) == len(ref_down)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(down, ref_down))
        assert torch.allclose(mid, ref_mid, atol=1e-4)


def test_unknown_is_a_plain_hint_with_the_empty_type_embedding(files):
    _, union = files
    x, t, hidden, hint, added = _inputs(union, seed=1)
    with torch.no_grad():
        sample = union.conv_in(x)
        guided = cu._guided(union, sample, hint, None)
        assert torch.allclose(guided, sample + union.controlnet_cond_embedding(hint))
        unknown = cu.union_forward(union, x, t, hidden, hint, None, added)
        known = cu.union_forward(union, x, t, hidden, hint, 3, added)
    assert not torch.allclose(unknown[1], known[1], atol=1e-4)


def test_a_type_beyond_the_models_count_is_named():
    six = controlnet_union_for(tiny_unet("sdxl", seed=1), num_control_type=6)  # the first published model
    with pytest.raises(cn.ControlNetError, match="knows 6 control types; Tile is number 6"):
        cu.control_type_embedding(six, 6, 1, torch.float32)


# ---- whole requests ------------------------------------------------------------------------------------------
def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _edges(size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(im).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline="white", width=2)
    return im


@pytest.fixture(scope="module")
def studio(make_data_root, files):
    root = make_data_root("union-requests", {"tiny-sdxl": "sdxl"})
    folder = root / "models" / "ControlNet"
    folder.mkdir()
    (folder / "union-xl.safetensors").write_bytes((files[0] / "union-xl.safetensors").read_bytes())
    return Studio(Engine(Paths(root)))


def _req(units=(), **kw) -> Txt2ImgRequest:
    args = {"prompt": "a square", "seed": 11, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", **kw}
    if units:
        args["alwayson_scripts"] = {"ControlNet": {"units": list(units)}}
    return Txt2ImgRequest(**args)


def _unit(**kw) -> dict:
    return {"enabled": True, "module": "none", "model": "union-xl", "image": _b64(_edges()), **kw}


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image.convert("RGB"), np.float32)


def test_requests_with_each_type(studio):
    plain = _pixels(studio.generate(_req()))
    hard = studio.generate(_req([_unit(union_control_type="Hard Edge")]))
    assert np.abs(_pixels(hard) - plain).mean() > 0.2
    depth = _pixels(studio.generate(_req([_unit(union_control_type="Depth")])))
    unknown = _pixels(studio.generate(_req([_unit()])))
    assert np.abs(depth - _pixels(hard)).mean() > 0.05 and np.abs(unknown - _pixels(hard)).mean() > 0.05
    assert "Model: union-xl [" in infotext.parse(hard.images[0].infotext)["ControlNet 0"]
    with pytest.raises(RequestError, match="union_control_type: 'edges' is not a union control type"):
        studio.generate(_req([_unit(union_control_type="edges")]))
