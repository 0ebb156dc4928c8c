"""A1111 hypernetworks: the file layouts A1111 writes and what its HypernetworkModule computes.

Reference (A1111's modules/hypernetworks/hypernetwork.py, written out here): per width, two MLPs whose
Sequential holds, for each step of ``layer_structure``, Linear(int(w * s[i]), int(w * s[i + 1])), then
the activation (not after the last Linear unless ``activate_output``, which defaults to True when the
file lacks the key), then LayerNorm when ``is_layer_norm``, then Dropout where ``dropout_structure`` (or,
without it, parse_dropout_structure from ``use_dropout`` / ``last_layer_dropout``) says; the file's keys
are ``linear.<index in that Sequential>.*``. The attention input becomes ``x + mlp(x) * strength`` for
to_k and to_v, chained over the hypernetworks in use. Activations here are the formulas themselves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.engine.hypernetwork import Hypernetwork, applied
from sdstudio.models.errors import ModelFileError
from sdstudio.models.loader import load_checkpoint

BASE = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 42}
ATTN2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # to_k / to_v take the 64-wide text context
ATTN1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # self-attention, 32 wide


def _selu(h):
    return 1.0507009873554805 * torch.where(h > 0, h, 1.6732632423543772 * (torch.exp(h) - 1))


ACTIVATIONS = {  # name in the file -> the function, from its definition
    "relu": lambda h, a: h.clamp(min=0),
    "leakyrelu": lambda h, a: torch.where(h > 0, h, 0.01 * h),
    "elu": lambda h, a: torch.where(h > 0, h, torch.exp(h) - 1),
    "swish": lambda h, a: h * (h + 3).clamp(0, 6) / 6,  # A1111's "swish" is Hardswish
    "tanh": lambda h, a: (torch.exp(2 * h) - 1) / (torch.exp(2 * h) + 1),
    "sigmoid": lambda h, a: 1 / (1 + torch.exp(-h)),
    "softsign": lambda h, a: h / (1 + h.abs()),
    "mish": lambda h, a: h * torch.tanh(torch.log1p(torch.exp(h))),
    "gelu": lambda h, a: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "silu": lambda h, a: h / (1 + torch.exp(-h)),
    "softplus": lambda h, a: torch.log1p(torch.exp(h)),
    "selu": lambda h, a: _selu(h),
    "celu": lambda h, a: h.clamp(min=0) + (torch.exp(h) - 1).clamp(max=0),
    "relu6": lambda h, a: h.clamp(0, 6),
    "hardtanh": lambda h, a: h.clamp(-1, 1),
    "hardsigmoid": lambda h, a: (h / 6 + 0.5).clamp(0, 1),
    "tanhshrink": lambda h, a: h - torch.tanh(h),
    "logsigmoid": lambda h, a: -torch.log1p(torch.exp(-h)),
    "prelu": lambda h, a: torch.where(h > 0, h, a * h),  # its slope is a weight in the file
}


def dropout_structure(structure, use_dropout, last_layer_dropout):
    """A1111's parse_dropout_structure: a probability per entry of layer_structure."""
    if not use_dropout:
        return [0] * len(structure)
    return [0] + [0.3] * (len(structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


def layout(width, structure, activation, layer_norm, activate_output, dropouts):
    """A1111's Sequential as (kind, features) entries; an entry's position is its index in the keys."""
    entries, n = [], len(structure) - 1
    for i in range(n):
        out = int(width * structure[i + 1])
        entries.append(("linear", int(width * structure[i]), out))
        if activation not in (None, "linear") and (i < n - 1 or activate_output):
            entries.append(("act", out, out))
        if layer_norm:
            entries.append(("norm", out, out))
        if dropouts[i + 1] > 0:
            entries.append(("dropout", out, out))
    return entries


def random_state(entries, g):
    state = {}
    for idx, (kind, d_in, d_out) in enumerate(entries):
        if kind == "linear":
            state[f"linear.{idx}.weight"] = torch.randn(d_out, d_in, generator=g) * (1.5 / math.sqrt(d_in))
            state[f"linear.{idx}.bias"] = torch.randn(d_out, generator=g) * 0.3
        elif kind == "norm":
            state[f"linear.{idx}.weight"] = 1 + 0.2 * torch.randn(d_out, generator=g)
            state[f"linear.{idx}.bias"] = 0.2 * torch.randn(d_out, generator=g)
    return state


def reference_mlp(x, entries, state, activation):
    h = x
    for idx, (kind, _, d_out) in enumerate(entries):
        if kind == "linear":
            h = h @ state[f"linear.{idx}.weight"].T + state[f"linear.{idx}.bias"]
        elif kind == "act":
            h = ACTIVATIONS[activation](h, state.get(f"linear.{idx}.weight"))
        elif kind == "norm":
            mean = h.mean(-1, keepdim=True)
            var = ((h - mean) ** 2).mean(-1, keepdim=True)
            h = (h - mean) / torch.sqrt(var + 1e-5) * state[f"linear.{idx}.weight"] + state[f"linear.{idx}.bias"]
    return h  # dropout: nothing at inference


def write(path, widths=(64,), structure=(1, 2, 1), activation="relu", layer_norm=False, use_dropout=False,
          last_layer_dropout=False, activate_output=False, explicit_dropout=None, drop_keys=(), seed=0):
    """An A1111 hypernetwork file, and per width the (layout, k state, v state) it holds."""
    structure = list(structure)
    dropouts = explicit_dropout or dropout_structure(structure, use_dropout, last_layer_dropout)
    data = {"layer_structure": structure, "activation_func": activation, "is_layer_norm": layer_norm,
            "weight_initialization": "Normal", "use_dropout": use_dropout, "activate_output": activate_output,
            "last_layer_dropout": last_layer_dropout, "name": path.stem, "step": 1000}
    if explicit_dropout is not None:
        data["dropout_structure"] = explicit_dropout
    for key in drop_keys:
        del data[key]
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for w in widths:
        entries = layout(w, structure, activation, layer_norm, data.get("activate_output", True), dropouts)
        pair = []
        for _ in range(2):
            state = random_state(entries, g)
            for idx, (kind, _, _) in enumerate(entries):
                if kind == "act" and activation == "prelu":
                    state[f"linear.{idx}.weight"] = torch.rand(1, generator=g) * 0.5 + 0.1
            pair.append(state)
        data[w] = tuple(pair)
        parts[w] = (entries, *pair)
    torch.save(data, path)
    return path, parts, activation


@pytest.fixture(scope="module")
def unet(tiny_sd1):
    return load_checkpoint(tiny_sd1).unet


def attention(unet, name):
    return dict(unet.named_modules())[name]


def check_applied(unet, path, parts, activation, strength=0.7):
    """to_k / to_v under the hypernetwork equal the projections of x + strength * reference_mlp(x)."""
    hn = Hypernetwork(path)
    for name, width in ((ATTN2, 64), (ATTN1, 32)):
        attn = attention(unet, name)
        x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(width)) * 2
        with torch.no_grad(), applied(unet, [(hn, strength)]):
            k, v = attn.to_k(x), attn.to_v(x)
        if width in parts:
            entries, sk, sv = parts[width]
            x_k = x + strength * reference_mlp(x, entries, sk, activation)
            x_v = x + strength * reference_mlp(x, entries, sv, activation)
        else:
            x_k = x_v = x  # no layers of this width: the attention is left alone
        assert torch.allclose(k, x_k @ attn.to_k.weight.T, rtol=1e-4, atol=1e-5), (name, activation)
        assert torch.allclose(v, x_v @ attn.to_v.weight.T, rtol=1e-4, atol=1e-5), (name, activation)


@pytest.mark.parametrize("activate_output", [False, True])
@pytest.mark.parametrize("activation", ["linear", *ACTIVATIONS])
def test_each_activation(unet, tmp_path, activation, activate_output):
    check_applied(unet, *write(tmp_path / "h.pt", activation=activation, activate_output=activate_output))


@pytest.mark.parametrize("activation", ["relu", "mish", "prelu"])
@pytest.mark.parametrize("use_dropout,last_layer_dropout", [(False, False), (True, False), (True, True)])
def test_layer_norm_and_dropout_layouts(unet, tmp_path, activation, use_dropout, last_layer_dropout):
    check_applied(unet, *write(tmp_path / "h.pt", widths=(64, 32), structure=(1, 1.5, 0.5, 1), activation=activation,
                               layer_norm=True, use_dropout=use_dropout, last_layer_dropout=last_layer_dropout))


def test_explicit_dropout_structure(unet, tmp_path):
    path, parts, act = write(tmp_path / "h.pt", structure=(1, 2, 2, 1), activation="elu", layer_norm=True,
                             explicit_dropout=[0, 0.1, 0.2, 0])
    assert [kind for kind, _, _ in parts[64][0]].count("dropout") == 2
    check_applied(unet, path, parts, act)


def test_missing_activate_output_means_true(unet, tmp_path):
    path, parts, act = write(tmp_path / "h.pt", activation="tanh", drop_keys=("activate_output",))
    assert [kind for kind, _, _ in parts[64][0]] == ["linear", "act", "linear", "act"]
    check_applied(unet, path, parts, act)


def test_first_format_linear1_linear2(unet, tmp_path):
    g = torch.Generator().manual_seed(3)
    pair = [{"linear1.weight": torch.randn(128, 64, generator=g) * 0.2, "linear1.bias": torch.randn(128, generator=g),
             "linear2.weight": torch.randn(64, 128, generator=g) * 0.2, "linear2.bias": torch.randn(64, generator=g)}
            for _ in range(2)]
    torch.save({64: pair}, tmp_path / "old.pt")
    entries = [("linear", 64, 128), ("linear", 128, 64)]  # no layer_structure, no activation
    renamed = [{k.replace("linear1", "linear.0").replace("linear2", "linear.1"): v for k, v in s.items()} for s in pair]
    check_applied(unet, tmp_path / "old.pt", {64: (entries, *renamed)}, None)


def test_two_hypernetworks_chain(unet, tmp_path):
    p1, parts1, a1 = write(tmp_path / "a.pt", activation="relu", seed=1)
    p2, parts2, a2 = write(tmp_path / "b.pt", activation="gelu", layer_norm=True, seed=2)
    attn = attention(unet, ATTN2)
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), applied(unet, [(Hypernetwork(p1), 0.5), (Hypernetwork(p2), 1.2)]):
        k = attn.to_k(x)
    h = x + 0.5 * reference_mlp(x, parts1[64][0], parts1[64][1], a1)
    h = h + 1.2 * reference_mlp(h, parts2[64][0], parts2[64][1], a2)
    assert torch.allclose(k, h @ attn.to_k.weight.T, rtol=1e-4, atol=1e-5)


@pytest.fixture
def engine(data_dir):
    (data_dir / "models" / "hypernetworks").mkdir(parents=True)
    return Engine(Paths(data_dir))


def px(engine, **kw):
    return np.asarray(engine.generate(Txt2ImgRequest(**{**BASE, **kw})).images[0].image)


def test_strength_and_cleanup(engine):
    write(engine.paths.hypernetwork_dir / "anime.pt", widths=(64, 32))
    engine.registry.refresh()
    plain = px(engine)
    assert np.array_equal(px(engine, prompt="a red circle <hypernet:anime:0>"), plain)
    strong = px(engine, prompt="a red circle <hypernet:anime:1>")
    assert not np.array_equal(strong, plain)
    assert not np.array_equal(px(engine, prompt="a red circle <hypernet:anime:0.5>"), strong)
    assert np.array_equal(px(engine), plain)  # hooks are gone after the job
    _, model = engine.load(None)
    assert all(not m._forward_pre_hooks for m in model.unet.modules())


def test_dropout_flags_that_disagree_with_the_indices_still_load(tmp_path):
    # use_dropout without last_layer_dropout puts no Dropout in a [1, 2, 1] network, yet such files
    # with the second Linear at index 3 exist: the weights are mapped onto the layers in order.
    path, parts, _ = write(tmp_path / "a.pt", use_dropout=True, last_layer_dropout=True, seed=1)
    data = torch.load(path)
    data["last_layer_dropout"] = False
    torch.save(data, tmp_path / "b.pt")
    x = torch.randn(2, 5, 64)
    a, b = Hypernetwork(path), Hypernetwork(tmp_path / "b.pt")
    assert torch.equal(a.layers[64][0](x), b.layers[64][0](x))
    assert torch.allclose(a.layers[64][0](x), reference_mlp(x, parts[64][0], parts[64][1], "relu"), atol=1e-5)


def test_errors_name_the_problem(engine, tmp_path):
    r = engine.generate(Txt2ImgRequest(**{**BASE, "prompt": "<hypernet:ghost:1>"}))
    assert len(r.images) == 1 and "no hypernetwork named 'ghost'" in r.warnings[0]
    torch.save({"something": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(ModelFileError, match="odd.pt: not an A1111 hypernetwork"):
        Hypernetwork(tmp_path / "odd.pt")
    write(tmp_path / "weird.pt", activation="nosuchthing")  # the writer only lays out Linears for it
    with pytest.raises(ModelFileError, match="unknown hypernetwork activation 'nosuchthing'"):
        Hypernetwork(tmp_path / "weird.pt")
