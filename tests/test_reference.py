"""ControlNet's reference units (sdstudio.engine.reference) on tiny random UNets: the layers that take part
(against the extension's lists and weights on the real SD 1.5 and SDXL layouts), the attention and AdaIN
formulas against direct computations for one layer, the noised reference, the style fidelity rules (SDXL's
cube, the control modes, Hires. fix), several units, batch independence, the processors given back, and a
whole request on the tiny checkpoint."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdstudio.core.controlnet import ControlNetError, ControlUnit
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine import reference as ref
from sdstudio.engine import vae as vae_ops
from sdstudio.engine.controlnet import PreparedUnit
from sdstudio.engine.hooks import HookError, SamplingPlan, Step, UNetCall
from sdstudio.engine.preprocessors import WEIGHT_FREE
from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.testing.synthetic import tiny_unet, unet_config

torch.set_num_threads(1)

SIZE = 128  # pixels: a 16×16 latent, 2×2 at the tiny UNet's deepest level
SCHEDULE = DiscreteSchedule()
CPU = torch.device("cpu")
TOKENS = 8


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet("sd1")


@pytest.fixture(scope="module")
def unet_xl() -> UNet2DConditionModel:
    return tiny_unet("sdxl", seed=1)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=[32, 32, 64, 64], layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         latent_channels=4).eval()


def _encoder(vae):
    def encode(rgb: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        return vae_ops.encode(vae, pixels, CPU)

    return encode


def _image(seed: int = 5, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], axis=2)
    return np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)


def _prepared(module: str = "reference_only", index: int = 0, image: np.ndarray | None = None, **unit) -> PreparedUnit:
    pre = next(p for p in WEIGHT_FREE if p.name == module)
    fields = {"enabled": True, "module": module, "weight": 1.0, "threshold_a": 0.5, **unit}
    return PreparedUnit(index, ControlUnit(**fields), pre, _image() if image is None else image, None)


def _hook(vae, module: str = "reference_only", is_sdxl: bool = False, index: int = 0, **unit) -> ref.ReferenceHook:
    return ref.reference_hook(_prepared(module, index, **unit), _encoder(vae), SCHEDULE, CPU, torch.float32, is_sdxl)


def _call(family: str = "sd1", images=(0, 0), uncond=(False, True), t: float = 500.7, seed: int = 7,
          pass_name: str = "first", channels: int = 4) -> UNetCall:
    g = torch.Generator().manual_seed(seed)
    rows = len(images)
    width = {"sd1": 64, "sdxl": 192}[family]
    x = torch.randn(rows, channels, SIZE // 8, SIZE // 8, generator=g)
    hidden = torch.randn(rows, TOKENS, width, generator=g)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(rows, 128, generator=g),
                 "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * rows, dtype=torch.float32)}
    return UNetCall(x, torch.full((rows,), t), hidden, list(images), list(uncond),
                    Step(0, 10, torch.ones(rows), pass_name), added)


def _forward(unet, call: UNetCall, extra: dict | None = None) -> torch.Tensor:
    kwargs = dict(extra or {})
    if call.added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = call.added_cond_kwargs
    with torch.no_grad():
        return unet(call.x, call.timestep, encoder_hidden_states=call.encoder_hidden_states, **kwargs).sample


def _run(unet, hooks, call: UNetCall) -> torch.Tensor:
    """One UNet call as the denoiser makes it: the plan's hooks around the pass, their inputs, the call."""
    plan = SamplingPlan(unet, SCHEDULE, "epsilon", [], [], 5.0, torch.float32, CPU, steps=10, hooks=list(hooks))
    with plan.applied():
        extra = plan.unet_inputs(call)
        return _forward(unet, call, extra)


@contextlib.contextmanager
def _recording(module: torch.nn.Module, inputs: bool = True):
    """Each call's first positional input (or output) of ``module``, as torch's own hooks see it."""
    seen: list = []
    if inputs:
        handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def _direct_attention(attn, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Multi-head softmax attention written out: queries from ``x``, keys and values from ``context``."""
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    b, n, c = q.shape
    heads = attn.heads
    d = c // heads

    def split(t):
        return t.reshape(b, -1, heads, d).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d ** 0.5, dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, n, c)
    return attn.to_out[1](attn.to_out[0](out))


def _names(unet) -> dict[int, str]:
    return {id(m): name for name, m in unet.named_modules()}


# ---- the rules -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, sdxl, cfg, soft, hires, expected", [
    (0.5, False, False, False, False, 0.5),
    (0.5, True, False, False, False, 0.125),  # SDXL: cubed
    (0.8, True, False, False, False, 0.8 ** 3),
    (1.7, False, False, False, False, 1.0),  # clamped
    (-0.3, False, False, False, False, 0.0),
    (0.5, False, True, True, False, 1.0),  # ControlNet is more important
    (0.5, True, True, True, True, 1.0),  # ... also on SDXL and in Hires. fix
    (0.5, False, False, True, False, 0.0),  # My prompt is more important
    (0.5, False, False, False, True, 0.0),  # Hires. fix pass
])
def test_style_fidelity_rules(a, sdxl, cfg, soft, hires, expected):
    got = ref.style_fidelity(a, is_sdxl=sdxl, cfg_injection=cfg, soft_injection=soft, hires=hires)
    assert got == pytest.approx(expected, abs=1e-12)


def _meta_unet(family: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config(family, "full"))


def test_attention_sites_on_the_sd15_layout():
    unet = _meta_unet("sd1")
    names = _names(unet)
    sites = ref.attention_sites(unet)
    assert len(sites) == 16
    assert [th for _, th in sites] == [i / 16 for i in range(16)]
    order = [names[id(b)].split(".transformer_blocks")[0] for b, _ in sites]
    # widest first (1280, 640, 320), each width in the original UNet's order: input, middle, output blocks
    assert order == ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0",
                     "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
                     "down_blocks.1.attentions.0", "down_blocks.1.attentions.1",
                     "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2",
                     "down_blocks.0.attentions.0", "down_blocks.0.attentions.1",
                     "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2"]


def test_attention_sites_on_the_sdxl_layout():
    unet = _meta_unet("sdxl")
    sites = ref.attention_sites(unet)
    names = [_names(unet)[id(b)] for b, _ in sites]
    assert len(sites) == 2 * 10 + 10 + 3 * 10 + 2 * 2 + 3 * 2  # 1280: down 2×10, mid 10, up 3×10; 640: 2×2 + 3×2
    assert names[:20] == [f"down_blocks.2.attentions.{a}.transformer_blocks.{t}" for a in (0, 1) for t in range(10)]
    assert names[20:30] == [f"mid_block.attentions.0.transformer_blocks.{t}" for t in range(10)]
    assert names[60:64] == [f"down_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in (0, 1) for t in range(2)]
    assert names[64:] == [f"up_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in range(3) for t in range(2)]


def test_adain_sites_are_the_extensions_blocks_and_weights():
    sd1 = _meta_unet("sd1")
    got = [(_names(sd1)[id(m)], th) for m, th in ref.adain_sites(sd1)]
    # LDM middle; input blocks 4, 5, 7, 8, 10, 11 at 2(1 - w/6); output blocks 0-7 at 2w/8 (2, 5 end in an upsampler)
    expected = [("mid_block", 0.0),
                ("down_blocks.1.attentions.0", 2.0), ("down_blocks.1.attentions.1", 2 * 5 / 6),
                ("down_blocks.2.attentions.0", 2 * 4 / 6), ("down_blocks.2.attentions.1", 2 * 3 / 6),
                ("down_blocks.3.resnets.0", 2 * 2 / 6), ("down_blocks.3.resnets.1", 2 * 1 / 6),
                ("up_blocks.0.resnets.0", 0.0), ("up_blocks.0.resnets.1", 0.25), ("up_blocks.0.upsamplers.0", 0.5),
                ("up_blocks.1.attentions.0", 0.75), ("up_blocks.1.attentions.1", 1.0),
                ("up_blocks.1.upsamplers.0", 1.25),
                ("up_blocks.2.attentions.0", 1.5), ("up_blocks.2.attentions.1", 1.75)]
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert [th for _, th in got] == pytest.approx([th for _, th in expected])

    xl = _meta_unet("sdxl")
    got = [(_names(xl)[id(m)], th) for m, th in ref.adain_sites(xl)]
    # input blocks 4, 5, 7, 8 at 2(1 - w/4); output blocks 0-5 at 2w/6
    expected = [("mid_block", 0.0),
                ("down_blocks.1.attentions.0", 2.0), ("down_blocks.1.attentions.1", 1.5),
                ("down_blocks.2.attentions.0", 1.0), ("down_blocks.2.attentions.1", 0.5),
                ("up_blocks.0.attentions.0", 0.0), ("up_blocks.0.attentions.1", 1 / 3),
                ("up_blocks.0.upsamplers.0", 2 / 3),
                ("up_blocks.1.attentions.0", 1.0), ("up_blocks.1.attentions.1", 4 / 3),
                ("up_blocks.1.upsamplers.0", 5 / 3)]
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert [th for _, th in got] == pytest.approx([th for _, th in expected])


# ---- on a UNet -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ref.REFERENCE_MODULES)
def test_weight_zero_is_the_plain_unet(unet, vae, module):
    call = _call()
    plain = _forward(unet, call)
    with _recording(unet.conv_in) as passes:
        out = _run(unet, [_hook(vae, module, weight=0.0)], call)
    assert torch.equal(out, plain)
    assert len(passes) == 1  # no write pass: no layer would record anything


@pytest.mark.parametrize("module", ref.REFERENCE_MODULES)
def test_each_module_changes_the_output(unet, vae, module):
    call = _call()
    plain = _forward(unet, call)
    with _recording(unet.conv_in) as passes:
        out = _run(unet, [_hook(vae, module)], call)
    assert len(passes) == 2  # the write pass, then the real call
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-3


def test_the_kinds_act_where_they_should(unet, vae):
    """reference_only leaves the block statistics alone; reference_adain the self-attention."""
    call = _call()
    with _recording(unet.mid_block, inputs=False) as raw:  # registered first: the block's own output
        plan = SamplingPlan(unet, SCHEDULE, "epsilon", [], [], 5.0, torch.float32, CPU, hooks=[_hook(vae)])
        with plan.applied(), _recording(unet.mid_block, inputs=False) as final:
            _forward(unet, call, plan.unet_inputs(call))
    assert torch.equal(raw[1], final[1])
    first_attn = ref.attention_sites(unet)[0][0].attn1  # upstream of every AdaIN block that weight 1 reaches
    with _recording(first_attn, inputs=False) as outs:
        _forward(unet, call)
        _run(unet, [_hook(vae, "reference_adain")], call)
    assert torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("family, control_mode, a, fidelity", [
    ("sd1", "Balanced", 0.5, 0.5),
    ("sd1", "Balanced", 0.0, 0.0),
    ("sdxl", "Balanced", 0.5, 0.125),  # the SDXL cube reaches the mix
    ("sd1", "ControlNet is more important", 0.3, 1.0),
    ("sd1", "My prompt is more important", 0.9, 0.0),
])
def test_attention_of_one_block_against_a_direct_computation(unet, unet_xl, vae, family, control_mode, a, fidelity):
    model = unet if family == "sd1" else unet_xl
    call = _call(family, images=(0, 1, 0, 1), uncond=(False, False, True, True))
    sites = ref.attention_sites(model)
    (first, _), (second, _) = sites[0], sites[1]
    weight = sites[1][1]  # exactly the second block's threshold: it does not take part (weight > threshold)
    assert weight == 1 / len(sites)
    hook = ref.reference_hook(_prepared(weight=weight, threshold_a=a, control_mode=control_mode), _encoder(vae),
                              SCHEDULE, CPU, torch.float32, family == "sdxl")
    with _recording(first.attn1) as ins, _recording(first.attn1, inputs=False) as outs, \
            _recording(second.attn1) as ins2, _recording(second.attn1, inputs=False) as outs2:
        _run(model, [hook], call)
    assert len(ins) == len(outs) == 2  # the write pass, then the real call
    reference, x = ins[0][0][0], ins[1][0][0]
    with torch.no_grad():
        referenced = _direct_attention(first.attn1, x, torch.cat([x, reference], dim=1))
        plain = _direct_attention(first.attn1, x, x)
        expected = referenced.clone()
        expected[2:] = fidelity * plain[2:] + (1 - fidelity) * referenced[2:]  # rows 2, 3: the negative prompt's
        assert torch.allclose(outs[1], expected, atol=2e-5)
        assert (referenced - plain).abs().max() > 1e-3  # the reference matters here
        # the weight reaches only the first block (threshold 0): the second attends over itself alone
        x2 = ins2[1][0][0]
        assert torch.allclose(outs2[1], _direct_attention(second.attn1, x2, x2), atol=2e-5)


def test_adain_of_one_block_against_a_direct_computation(unet, vae):
    call = _call(images=(0, 0), uncond=(False, True))
    # weight 0.25: the middle block and output block 0 (threshold 0); output block 1 sits at exactly 0.25: out
    hook = _hook(vae, "reference_adain", weight=0.25, threshold_a=0.3)
    second = unet.up_blocks[0].resnets[1]
    with _recording(unet.mid_block, inputs=False) as raw, _recording(second, inputs=False) as raw2:
        plan = SamplingPlan(unet, SCHEDULE, "epsilon", [], [], 5.0, torch.float32, CPU, steps=10, hooks=[hook])
        with plan.applied(), _recording(unet.mid_block, inputs=False) as final, \
                _recording(second, inputs=False) as final2:  # registered after the reference's own hooks
            _forward(unet, call, plan.unet_inputs(call))
    written, x = raw[0], raw[1]
    assert torch.equal(final[0], written)  # the write pass leaves its outputs alone
    assert torch.equal(final2[1], raw2[1])  # output block 1 is not renormalised

    def stats(t):
        mean = t.mean(dim=(2, 3), keepdim=True)
        var = ((t - mean) ** 2).mean(dim=(2, 3), keepdim=True)
        return mean, torch.sqrt(torch.clamp(var, min=1e-6))

    mean_r, std_r = stats(written)
    mean, std = stats(x)
    expected = (x - mean) / std * std_r + mean_r
    expected[1] = 0.3 * x[1] + 0.7 * expected[1]  # the negative row: style fidelity 0.3
    assert torch.allclose(final[1], expected, atol=1e-5)
    got_mean, got_std = stats(final[1][:1])
    assert torch.allclose(got_mean, mean_r[:1], atol=1e-5) and torch.allclose(got_std, std_r[:1], atol=1e-4)


def test_adain_with_fidelity_zero_renormalises_every_row():
    x = torch.randn(2, 3, 4, 4) * 3 + 1
    mean_r, var_r = torch.randn(2, 3, 1, 1), torch.rand(2, 3, 1, 1) + 0.1
    y = ref.adain(x, [mean_r], [var_r], 0.0, [1])
    assert torch.allclose(y.mean(dim=(2, 3), keepdim=True), mean_r, atol=1e-5)
    assert torch.allclose(y.var(dim=(2, 3), keepdim=True, correction=0), var_r, atol=1e-4)
    # two banks: their statistics averaged
    y2 = ref.adain(x, [mean_r, mean_r + 2], [var_r, var_r + 0.2], 0.0, [])
    assert torch.allclose(y2.mean(dim=(2, 3), keepdim=True), mean_r + 1, atol=1e-5)
    assert torch.allclose(y2.var(dim=(2, 3), keepdim=True, correction=0), var_r + 0.1, atol=1e-4)


def test_the_write_pass_is_the_reference_noised_to_the_calls_timestep(unet, vae):
    call = _call(t=500.7)  # rounds to 501 (not 500)
    hook = _hook(vae)
    with _recording(unet) as passes:
        _run(unet, [hook], call)
    (x_ref, t_ref), kwargs = passes[0]
    assert torch.equal(t_ref, call.timestep)
    assert torch.equal(kwargs["encoder_hidden_states"], call.encoder_hidden_states)
    latent = _encoder(vae)(_image())
    a = SCHEDULE.alphas_cumprod[501].double()
    expected = a.sqrt() * latent.double() + (1 - a).sqrt() * hook.noise(call, 4).double()
    assert torch.allclose(x_ref.double(), expected, atol=1e-5)
    assert torch.equal(passes[1][0][0], call.x)  # then the real call, untouched


def test_the_reference_is_fitted_to_the_pass_size(vae):
    hook = _hook(vae, image=_image(size=SIZE * 2)[:, :SIZE])  # 256×128: Crop and Resize keeps the middle
    latent = hook.latent(SIZE, SIZE)
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert hook.latent(SIZE, SIZE) is latent  # once per size
    assert hook.latent(SIZE * 2, SIZE).shape == (1, 4, SIZE // 4, SIZE // 8)


def test_an_inpainting_unet_gets_an_empty_mask_and_the_reference_latent(vae):
    unet9 = tiny_unet("sd1", in_channels=9, seed=3)
    call = _call(channels=9)
    with _recording(unet9.conv_in) as passes:
        out = _run(unet9, [_hook(vae)], call)
    x_ref = passes[0][0][0]
    latent = _encoder(vae)(_image())
    assert torch.equal(x_ref[:, 4], torch.zeros_like(x_ref[:, 4]))
    assert torch.allclose(x_ref[:, 5:], latent.expand(2, -1, -1, -1))
    assert torch.isfinite(out).all()


def test_sdxl_unit_runs_with_the_size_conditioning(unet_xl, vae):
    call = _call("sdxl")
    plain = _forward(unet_xl, call)
    out = _run(unet_xl, [_hook(vae, "reference_adain+attn", is_sdxl=True)], call)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_two_units_add_their_keys_and_average_their_fidelities(unet, vae):
    call = _call(images=(0, 0), uncond=(False, True))
    first = ref.attention_sites(unet)[0][0].attn1
    hooks = [_hook(vae, weight=0.001, threshold_a=0.2, index=0),
             _hook(vae, weight=0.001, threshold_a=0.8, index=1, image=_image(9))]
    with _recording(first) as ins, _recording(first, inputs=False) as outs:
        _run(unet, hooks, call)
    assert len(ins) == 3  # two write passes, the real call
    ref1, ref2, x = ins[0][0][0], ins[1][0][0], ins[2][0][0]
    with torch.no_grad():
        referenced = _direct_attention(first, x, torch.cat([x, ref1, ref2], dim=1))
        plain = _direct_attention(first, x, x)
    expected = referenced.clone()
    expected[1] = 0.5 * plain[1] + 0.5 * referenced[1]  # (0.2 + 0.8) / 2
    assert torch.allclose(outs[2], expected, atol=2e-5)


def test_mixed_units_keep_each_others_banks(unet, vae):
    """An AdaIN unit's write pass after an attention unit's leaves the attention banks to the real call."""
    call = _call()
    only = _run(unet, [_hook(vae, "reference_only")], call)
    both = _run(unet, [_hook(vae, "reference_only"), _hook(vae, "reference_adain", index=1)], call)
    adain = _run(unet, [_hook(vae, "reference_adain", index=1)], call)
    plain = _forward(unet, call)
    assert (both - only).abs().max() > 1e-4 and (both - adain).abs().max() > 1e-4
    assert (both - plain).abs().max() > 1e-3


def test_a_rows_noise_does_not_depend_on_its_batch_mates(vae):
    hook = _hook(vae)
    alone = _call(images=(0, 0), uncond=(False, True))
    g = torch.Generator().manual_seed(99)
    other = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    batch = UNetCall(torch.cat([alone.x[:1], other, alone.x[1:], other]), torch.full((4,), 500.7),
                     torch.cat([alone.encoder_hidden_states] * 2), [0, 1, 0, 1], [False, False, True, True], alone.step)
    n_alone, n_batch = hook.noise(alone, 4), hook.noise(batch, 4)
    assert torch.equal(n_batch[0], n_alone[0]) and torch.equal(n_batch[2], n_alone[1])
    assert not torch.equal(n_alone[0], n_alone[1])  # the prompt's row and the negative one differ
    assert not torch.equal(_hook(vae, index=1).noise(alone, 4), n_alone)  # so do two units
    assert abs(float(n_alone.std()) - 1.0) < 0.1


def test_the_unet_is_given_back_after_the_pass(unet, vae):
    call = _call()
    before = _forward(unet, call)
    processors = dict(unet.attn_processors)
    _run(unet, [_hook(vae, "reference_adain+attn"), _hook(vae, "reference_only", index=1)], call)
    with pytest.raises(RuntimeError):  # an error inside the pass: given back as well
        plan = SamplingPlan(unet, SCHEDULE, "epsilon", [], [], 5.0, torch.float32, CPU, hooks=[_hook(vae)])
        with plan.applied():
            plan.unet_inputs(call)
            raise RuntimeError("boom")
    assert {k: id(v) for k, v in unet.attn_processors.items()} == {k: id(v) for k, v in processors.items()}
    assert not any(m._forward_hooks for m in unet.modules())
    assert not hasattr(unet, "_sdstudio_reference")
    assert torch.equal(_forward(unet, call), before)


def test_window_and_hires_options(vae):
    hook = _hook(vae, guidance_start=0.2, guidance_end=0.6)
    assert [hook.active(Step(i, 10, torch.ones(1))) for i in range(10)] == [i in (2, 3, 4, 5, 6) for i in range(10)]
    low = ref.reference_hook(_prepared(hr_option="Low res only"), _encoder(vae), SCHEDULE, CPU, torch.float32, False,
                             hires_job=True)
    assert low.active(Step(0, 10, torch.ones(1), "first")) and not low.active(Step(0, 10, torch.ones(1), "hires"))
    assert low.fidelity(hires=False) == 0.5 and low.fidelity(hires=True) == 0.0


def test_hires_pass_uses_fidelity_zero(unet, vae):
    call = _call(images=(0, 0), uncond=(False, True), pass_name="hires")
    first = ref.attention_sites(unet)[0][0].attn1
    with _recording(first) as ins, _recording(first, inputs=False) as outs:
        _run(unet, [_hook(vae, weight=0.001)], call)
    x, reference = ins[1][0][0], ins[0][0][0]
    with torch.no_grad():
        referenced = _direct_attention(first, x, torch.cat([x, reference], dim=1))
    assert torch.allclose(outs[1], referenced, atol=2e-5)  # the negative row also referenced


def test_bad_inputs_are_named(unet, vae):
    with pytest.raises(ControlNetError, match="not a reference preprocessor"):
        ref.reference_hook(PreparedUnit(0, ControlUnit(module="canny"), WEIGHT_FREE[1], _image(), None),
                           _encoder(vae), SCHEDULE, CPU, torch.float32, False)
    unet8 = tiny_unet("sd1", in_channels=8, seed=4)
    with pytest.raises(HookError, match="4-channel and inpainting UNets"):
        _run(unet8, [_hook(vae)], _call(channels=8))
    wrong = ref.reference_hook(_prepared(), lambda rgb: torch.zeros(1, 4, 3, 3), SCHEDULE, CPU, torch.float32, False)
    with pytest.raises(HookError, match="reference latent is"):
        _run(unet, [wrong], _call())
    with pytest.raises(ControlNetError, match="outside its pass"):
        _hook(vae).unet_inputs(_call())


# ---- a whole request -------------------------------------------------------------------------------------
def test_a_whole_request_on_the_tiny_checkpoint(session_engine):
    base = {"prompt": "a red circle", "negative_prompt": "blur", "width": 64, "height": 64, "steps": 4, "seed": 3,
            "sampler_name": "Euler", "cfg_scale": 5.0, "batch_size": 2}
    _, model = session_engine.load(None)
    device = session_engine.plan.device

    def encode(rgb):
        return vae_ops.encode(model.vae, torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1, device)

    def hook(**unit):
        prepared = _prepared(image=_image(size=64), **unit)
        return ref.reference_hook(prepared, encode, session_engine.schedule, device, session_engine.plan.dtype, False)

    def px(result):
        return [np.asarray(im.image).astype(int) for im in result.images]

    plain = px(session_engine.generate(Txt2ImgRequest(**base)))
    zero = px(session_engine.generate(Txt2ImgRequest(**base), hooks=[hook(weight=0.0)]))
    on = px(session_engine.generate(Txt2ImgRequest(**base), hooks=[hook(weight=1.0)]))
    after = px(session_engine.generate(Txt2ImgRequest(**base)))
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero))
    assert all(np.abs(a - b).max() > 0 for a, b in zip(plain, on))
    assert all(np.array_equal(a, b) for a, b in zip(plain, after))
    assert not hasattr(model.unet, "_sdstudio_reference")
