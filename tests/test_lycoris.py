"""LyCORIS network kinds merged into the tiny model, against their definitions computed here.

References (LyCORIS, and A1111's built-in Lora extension that applies its files), with ``m`` the
multiplier and the scale alpha / rank only where the kind has a rank:
- LoHa: W + m * (w1a @ w1b) * (w2a @ w2b) * alpha / rank, rank = rows of hada_w1_b; for convs either
  flattened factors or the Tucker form t[i, j, kh, kw] * a[i, out] * b[j, in] summed over i, j.
- LoKr: W + m * kron(w1, w2) (w1 = w1a @ w1b, w2 = w2a @ w2b when factored; w2 Tucker for convs);
  scale alpha / rank only when a factor is low-rank, else 1 whatever alpha says.
- (IA)^3: W * (1 + m * weight), per output channel (rows), or per input channel with on_input.
- Full diff: W + m * diff, bias + m * diff_b.
Kronecker products are written out element-wise here; the module's ``torch.kron`` is not reused.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.engine.lora import LoraFile, applied
from sdstudio.models.loader import load_checkpoint

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # [32, 64]: not square
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # [256, 32], has a bias
CONV = "conv_in"  # [32, 4, 3, 3]
CONV_SQ = "down_blocks.0.resnets.0.conv1"  # [32, 32, 3, 3]
TE = "encoder.layers.0.self_attn.q_proj"  # text encoder, [64, 64]


@pytest.fixture(scope="module")
def model(tiny_sd1):
    return load_checkpoint(tiny_sd1)


def kohya(name: str) -> str:
    """The kohya key of a UNet module (diffusers path, dots as underscores) or of a text encoder one."""
    if name.startswith("encoder."):
        return "lora_te_text_model_" + name.replace(".", "_")
    return "lora_unet_" + name.replace(".", "_")


def module(model, name):
    root = model.text_encoders[0] if name.startswith("encoder.") else model.unet
    return dict(root.named_modules())[name]


def merged(model, tmp_path, state, te=1.0, unet=1.0, attr="weight"):
    """The weights (and biases) of the state's modules while the network is applied; checks they are
    back to the originals afterwards."""
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    names = {k.rsplit(".", 1)[0] for k in state}
    targets = {n: module(model, n) for n in (LINEAR, FF, CONV, CONV_SQ, TE) if kohya(n) in names}
    before = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
              for n, m in targets.items()}
    with applied(model, [(LoraFile(path, model), te, unet)]):
        during = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                  for n, m in targets.items()}
    for n, m in targets.items():
        assert torch.equal(m.weight, before[n][0])
    return before, during


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * 0.2


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product of two matrices, element by element: out[i*p + k, j*q + l] = a[i, j] * b[k, l]."""
    (m, n), (p, q) = a.shape, b.shape
    out = torch.empty(m * p, n * q)
    for i in range(m):
        for j in range(n):
            out[i * p:(i + 1) * p, j * q:(j + 1) * q] = a[i, j] * b
    return out


def tucker(t, a, b):
    """sum over i, j of t[i, j, :, :] * a[i, out] * b[j, in] -> [out, in, kh, kw], with explicit loops."""
    r1, r2, kh, kw = t.shape
    out = torch.zeros(a.shape[1], b.shape[1], kh, kw)
    for i in range(r1):
        for j in range(r2):
            out += a[i][:, None, None, None] * b[j][None, :, None, None] * t[i, j][None, None]
    return out


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mult", [1.0, 0.6, -1.5])
def test_loha_linear(model, tmp_path, mult):
    rank, alpha = 4, 2.0
    w1a, w1b, w2a, w2b = rnd(32, rank), rnd(rank, 64, seed=1), rnd(32, rank, seed=2), rnd(rank, 64, seed=3)
    k = kohya(LINEAR)
    before, during = merged(model, tmp_path, {k + ".hada_w1_a": w1a, k + ".hada_w1_b": w1b, k + ".hada_w2_a": w2a,
                                              k + ".hada_w2_b": w2b, k + ".alpha": torch.tensor(alpha)}, unet=mult)
    want = before[LINEAR][0] + mult * (w1a @ w1b) * (w2a @ w2b) * alpha / rank
    assert close(during[LINEAR][0], want)


def test_loha_without_alpha_has_scale_one(model, tmp_path):
    w1a, w1b, w2a, w2b = rnd(256, 2), rnd(2, 32, seed=1), rnd(256, 2, seed=2), rnd(2, 32, seed=3)
    k = kohya(FF)
    before, during = merged(model, tmp_path, {k + ".hada_w1_a": w1a, k + ".hada_w1_b": w1b,
                                              k + ".hada_w2_a": w2a, k + ".hada_w2_b": w2b})
    assert close(during[FF][0], before[FF][0] + (w1a @ w1b) * (w2a @ w2b))
    assert torch.equal(during[FF][1], before[FF][1])  # the bias is left alone


@pytest.mark.parametrize("four_d", [False, True])
def test_loha_conv_flattened_factors(model, tmp_path, four_d):
    rank, alpha = 3, 1.5
    w1a, w2a = rnd(32, rank), rnd(32, rank, seed=2)
    w1b, w2b = rnd(rank, 4, 3, 3, seed=1), rnd(rank, 4, 3, 3, seed=3)
    k = kohya(CONV)
    stored = (lambda t: t) if four_d else (lambda t: t.reshape(t.shape[0], -1))
    before, during = merged(model, tmp_path, {k + ".hada_w1_a": w1a, k + ".hada_w1_b": stored(w1b),
                                              k + ".hada_w2_a": w2a, k + ".hada_w2_b": stored(w2b),
                                              k + ".alpha": torch.tensor(alpha)})
    d1 = (w1a @ w1b.reshape(rank, -1)).reshape(32, 4, 3, 3)
    d2 = (w2a @ w2b.reshape(rank, -1)).reshape(32, 4, 3, 3)
    assert close(during[CONV][0], before[CONV][0] + d1 * d2 * alpha / rank)


def test_loha_conv_tucker(model, tmp_path):
    rank, alpha = 3, 2.0
    t1, t2 = rnd(rank, rank, 3, 3), rnd(rank, rank, 3, 3, seed=4)
    w1a, w1b, w2a, w2b = rnd(rank, 32), rnd(rank, 4, seed=1), rnd(rank, 32, seed=2), rnd(rank, 4, seed=3)
    k = kohya(CONV)
    before, during = merged(model, tmp_path, {k + ".hada_t1": t1, k + ".hada_t2": t2, k + ".hada_w1_a": w1a,
                                              k + ".hada_w1_b": w1b, k + ".hada_w2_a": w2a, k + ".hada_w2_b": w2b,
                                              k + ".alpha": torch.tensor(alpha)}, unet=0.8)
    want = before[CONV][0] + 0.8 * tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b) * alpha / rank
    assert close(during[CONV][0], want)


@pytest.mark.parametrize("alpha", [None, 3.0])
def test_lokr_full_factors_ignore_alpha(model, tmp_path, alpha):
    w1, w2 = rnd(4, 8), rnd(8, 8, seed=1)  # kron -> [32, 64]
    k = kohya(LINEAR)
    state = {k + ".lokr_w1": w1, k + ".lokr_w2": w2}
    if alpha is not None:
        state[k + ".alpha"] = torch.tensor(alpha)
    before, during = merged(model, tmp_path, state, unet=0.7)
    assert close(during[LINEAR][0], before[LINEAR][0] + 0.7 * kron(w1, w2))


def test_lokr_low_rank_w2_is_scaled_by_alpha_over_rank(model, tmp_path):
    rank, alpha = 2, 1.0
    w1, w2a, w2b = rnd(2, 4), rnd(16, rank, seed=1), rnd(rank, 16, seed=2)  # [2*16, 4*16] = [32, 64]
    k = kohya(LINEAR)
    before, during = merged(model, tmp_path, {k + ".lokr_w1": w1, k + ".lokr_w2_a": w2a, k + ".lokr_w2_b": w2b,
                                              k + ".alpha": torch.tensor(alpha)})
    assert close(during[LINEAR][0], before[LINEAR][0] + kron(w1, w2a @ w2b) * alpha / rank)


def test_lokr_both_factored(model, tmp_path):
    rank, alpha = 2, 4.0
    w1a, w1b = rnd(8, rank), rnd(rank, 2, seed=1)
    w2a, w2b = rnd(32, rank, seed=2), rnd(rank, 16, seed=3)  # [8*32, 2*16] = [256, 32]
    k = kohya(FF)
    before, during = merged(model, tmp_path, {k + ".lokr_w1_a": w1a, k + ".lokr_w1_b": w1b, k + ".lokr_w2_a": w2a,
                                              k + ".lokr_w2_b": w2b, k + ".alpha": torch.tensor(alpha)}, unet=-0.5)
    assert close(during[FF][0], before[FF][0] - 0.5 * kron(w1a @ w1b, w2a @ w2b) * alpha / rank)


def kron_conv(w1, w2):
    """A1111's make_kron for convs: kron(w1[:, :, None, None], w2) -> [o1*o2, i1*i2, kh, kw]."""
    (o1, i1), (o2, i2, kh, kw) = w1.shape, w2.shape
    out = torch.empty(o1 * o2, i1 * i2, kh, kw)
    for a in range(o1):
        for b in range(i1):
            out[a * o2:(a + 1) * o2, b * i2:(b + 1) * i2] = w1[a, b] * w2
    return out


def test_lokr_conv_full_w2(model, tmp_path):
    w1, w2 = rnd(4, 2), rnd(8, 2, 3, 3, seed=1)  # [32, 4, 3, 3]
    k = kohya(CONV)
    before, during = merged(model, tmp_path, {k + ".lokr_w1": w1, k + ".lokr_w2": w2})
    assert close(during[CONV][0], before[CONV][0] + kron_conv(w1, w2))


def test_lokr_conv_tucker_w2(model, tmp_path):
    rank, alpha = 2, 1.0
    w1, t2 = rnd(4, 4), rnd(rank, rank, 3, 3, seed=1)
    w2a, w2b = rnd(rank, 8, seed=2), rnd(rank, 8, seed=3)  # w2 [8, 8, 3, 3] -> [32, 32, 3, 3]
    k = kohya(CONV_SQ)
    before, during = merged(model, tmp_path, {k + ".lokr_w1": w1, k + ".lokr_t2": t2, k + ".lokr_w2_a": w2a,
                                              k + ".lokr_w2_b": w2b, k + ".alpha": torch.tensor(alpha)})
    want = before[CONV_SQ][0] + kron_conv(w1, tucker(t2, w2a, w2b)) * alpha / rank
    assert close(during[CONV_SQ][0], want)


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_scales_the_right_axis(model, tmp_path, on_input):
    w = rnd(64 if on_input else 32)
    k = kohya(LINEAR)
    before, during = merged(model, tmp_path, {k + ".weight": w, k + ".on_input": torch.tensor(on_input)}, unet=0.5)
    base = before[LINEAR][0]
    factor = (1 + 0.5 * w)[None, :] if on_input else (1 + 0.5 * w)[:, None]
    assert close(during[LINEAR][0], base * factor)


def test_ia3_on_a_conv_scales_output_channels(model, tmp_path):
    w = rnd(32)
    k = kohya(CONV)
    before, during = merged(model, tmp_path, {k + ".weight": w, k + ".on_input": torch.tensor(False)})
    assert close(during[CONV][0], before[CONV][0] * (1 + w)[:, None, None, None])


def test_full_diff_with_bias(model, tmp_path):
    diff, diff_b = rnd(256, 32), rnd(256, seed=1)
    k = kohya(FF)
    before, during = merged(model, tmp_path, {k + ".diff": diff, k + ".diff_b": diff_b}, unet=0.25)
    assert close(during[FF][0], before[FF][0] + 0.25 * diff)
    assert close(during[FF][1], before[FF][1] + 0.25 * diff_b)


def test_text_encoder_and_unet_take_their_own_multipliers(model, tmp_path):
    rank, alpha = 2, 1.0
    te = {kohya(TE) + ".hada_w1_a": rnd(64, rank), kohya(TE) + ".hada_w1_b": rnd(rank, 64, seed=1),
          kohya(TE) + ".hada_w2_a": rnd(64, rank, seed=2), kohya(TE) + ".hada_w2_b": rnd(rank, 64, seed=3),
          kohya(TE) + ".alpha": torch.tensor(alpha)}
    diff = rnd(32, 64, seed=4)
    before, during = merged(model, tmp_path, {**te, kohya(LINEAR) + ".diff": diff}, te=0.3, unet=2.0)
    k = kohya(TE)
    loha = (te[k + ".hada_w1_a"] @ te[k + ".hada_w1_b"]) * (te[k + ".hada_w2_a"] @ te[k + ".hada_w2_b"]) * alpha / rank
    assert close(during[TE][0], before[TE][0] + 0.3 * loha)
    assert close(during[LINEAR][0], before[LINEAR][0] + 2.0 * diff)
