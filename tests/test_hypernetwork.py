"""A1111 hypernetworks on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.engine.hypernetwork import Hypernetwork
from sdstudio.models.errors import ModelFileError

BASE = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 42}


def a1111_hypernetwork(path, widths=(64, 32), dropout_layout=False, seed=0):
    """The A1111 file layout: per width a [k, v] pair of state dicts of linear.N.* entries."""
    g = torch.Generator().manual_seed(seed)
    data = {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
            "weight_initialization": "Normal", "use_dropout": dropout_layout, "activate_output": False,
            "last_layer_dropout": False, "name": path.stem, "step": 1000}
    second = 3 if dropout_layout else 2  # Linear, ReLU, [Dropout,] Linear
    for w in widths:
        pair = []
        for _ in range(2):
            pair.append({"linear.0.weight": torch.randn(2 * w, w, generator=g) * 0.3, "linear.0.bias": torch.zeros(2 * w),
                         f"linear.{second}.weight": torch.randn(w, 2 * w, generator=g) * 0.3,
                         f"linear.{second}.bias": torch.zeros(w)})
        data[w] = pair
    torch.save(data, path)
    return path


@pytest.fixture
def engine(data_dir):
    (data_dir / "models" / "hypernetworks").mkdir(parents=True)
    return Engine(Paths(data_dir))


def px(engine, **kw):
    return np.asarray(engine.generate(Txt2ImgRequest(**{**BASE, **kw})).images[0].image)


def test_strength_and_cleanup(engine):
    a1111_hypernetwork(engine.paths.hypernetwork_dir / "anime.pt")
    engine.registry.refresh()
    plain = px(engine)
    assert np.array_equal(px(engine, prompt="a red circle <hypernet:anime:0>"), plain)
    strong = px(engine, prompt="a red circle <hypernet:anime:1>")
    assert not np.array_equal(strong, plain)
    assert not np.array_equal(px(engine, prompt="a red circle <hypernet:anime:0.5>"), strong)
    assert np.array_equal(px(engine), plain)  # hooks are gone after the job
    _, model = engine.load(None)
    assert all(not m._forward_pre_hooks for m in model.unet.modules())


def test_dropout_layout_loads_the_same_weights(tmp_path):
    a = Hypernetwork(a1111_hypernetwork(tmp_path / "a.pt", seed=1))
    b = Hypernetwork(a1111_hypernetwork(tmp_path / "b.pt", seed=1, dropout_layout=True))
    x = torch.randn(2, 5, 64)
    assert torch.equal(a.layers[64][0](x), b.layers[64][0](x))


def test_errors_name_the_problem(engine, tmp_path):
    r = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "<hypernet:ghost:1>"}))
    assert len(r.images) == 1 and "no hypernetwork named 'ghost'" in r.warnings[0]
    torch.save({"something": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(ModelFileError, match="odd.pt: not an A1111 hypernetwork"):
        Hypernetwork(tmp_path / "odd.pt")
