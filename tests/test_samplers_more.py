"""DPM fast, DPM adaptive, Restart, UniPC and DDIM CFG++ against independent answers.

The data are N(MU, S^2), whose ideal denoiser and exact probability-flow ODE solution are known (see
tests/test_samplers.py): x at sigma_a maps to MU + (x - MU) * sqrt(S^2 + sigma_b^2) / sqrt(S^2 + sigma_a^2)
at sigma_b. UniPC is also compared with diffusers' UniPCMultistepScheduler, DDIM CFG++ with A1111's
formula in its own (variance-preserving, noise-prediction) form, written out here.
"""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from sdstudio.core.names import SAMPLERS, get_sampler
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine.samplers import SAMPLER_FUNCTIONS
from sdstudio.engine.schedules import DiscreteSchedule, ddim_timesteps, get_sigmas

MU, S = 0.7, 0.5


def ideal(mu, s):
    def denoise(x, sigma):
        return (x * s ** 2 + mu * sigma ** 2) / (s ** 2 + sigma ** 2)
    return denoise


denoiser = ideal(MU, S)


class Counting:
    """The ideal denoiser, counting calls and remembering the sigmas it was called at."""

    def __init__(self):
        self.sigmas: list[float] = []

    def __call__(self, x, sigma):
        self.sigmas.append(float(sigma))
        return denoiser(x, sigma)


def flow(x, sigma_from, sigma_to):
    """The exact probability-flow ODE map for N(MU, S^2) data."""
    return MU + (x - MU) * math.sqrt((S ** 2 + float(sigma_to) ** 2) / (S ** 2 + float(sigma_from) ** 2))


def sample(name, x, sigmas, noise_seed=0, **options):
    g = torch.Generator().manual_seed(noise_seed)
    return SAMPLER_FUNCTIONS[name](denoiser if "model" not in options else options.pop("model"), x, sigmas,
                                   noise=lambda a, b: torch.randn(x.shape, generator=g, dtype=x.dtype), **options)


X = torch.randn(4, 2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def sigmas_for(steps, schedule="karras"):
    return get_sigmas(schedule, steps, DiscreteSchedule()).double()


# --- the table rows ------------------------------------------------------------------------------------------

A1111_ORDER = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
               "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
               "PLMS", "UniPC", "LCM"]


def test_rows_as_a1111():
    assert [s.label for s in SAMPLERS] == A1111_ORDER  # A1111 1.10's dropdown order
    rows = {alias: get_sampler(alias) for alias in ("k_dpm_fast", "k_dpm_ad", "restart", "ddim_cfgpp", "unipc")}
    assert [r.label for r in rows.values()] == ["DPM fast", "DPM adaptive", "Restart", "DDIM CFG++", "UniPC"]
    assert rows["k_dpm_fast"].uses_ensd and rows["k_dpm_ad"].uses_ensd and not rows["restart"].uses_ensd
    assert rows["restart"].scheduler == "karras" and rows["restart"].second_order
    assert rows["ddim_cfgpp"].timesteps and rows["unipc"].timesteps and not rows["k_dpm_fast"].timesteps
    assert rows["ddim_cfgpp"].cfg_scale_multiplier == pytest.approx(1 / 12.5)
    assert all(r.cfg_scale_multiplier == 1.0 for r in SAMPLERS if r.label != "DDIM CFG++")


# --- UniPC ---------------------------------------------------------------------------------------------------

def diffusers_unipc(x_ve, variant, order, lower_order_final, karras, steps=12):
    """diffusers' UniPC on the ideal denoiser (its samples are variance-preserving: x_ve / sqrt(1 + sigma^2))."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        solver_order=order, solver_type=variant, lower_order_final=lower_order_final,
                                        use_karras_sigmas=karras, final_sigmas_type="zero" if karras else "sigma_min")
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    x = x_ve * sigmas[0] / (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(scheduler.timesteps):
        s = sigmas[i]
        x_in = x * (1 + s ** 2) ** 0.5
        eps = (x_in - denoiser(x_in, s)) / s
        x = scheduler.step(eps, t, x).prev_sample
    return x * (1 + sigmas[-1] ** 2) ** 0.5, sigmas


# karras: diffusers' schedule ending in 0 (bh1 is NaN there in diffusers: B(h) = -h is infinite on the step to 0);
# linspace: its timestep spacing ending at sigma_min, with and without lower-order final steps
CASES = [(v, o, lof, karras) for v in ("bh1", "bh2") for o in (1, 2, 3)
         for lof, karras in ((True, True), (True, False), (False, False)) if not (v == "bh1" and karras)]


@pytest.mark.parametrize("variant, order, lower_order_final, karras", CASES)
def test_unipc_matches_diffusers(variant, order, lower_order_final, karras):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want, sigmas = diffusers_unipc(x, variant, order, lower_order_final, karras)
    got = sample("unipc", x * sigmas[0], sigmas, order=order, variant=variant, lower_order_final=lower_order_final)
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_unipc_one_model_call_per_step():
    model = Counting()
    sigmas = sigmas_for(10)
    sample("unipc", X * sigmas[0], sigmas, model=model)
    assert len(model.sigmas) == 10  # the corrector's call is the next step's model value; none at sigma 0


def test_unipc_vary_coeff_first_order_step_as_published():
    """UniC-1 ("vary_coeff"): the predicted point's model value corrects the step with weight
    h * phi_2(h) = (h - 1 + e^-h) / h (lambda = -log sigma); the last step is predictor-only."""
    sigmas = torch.tensor([8.0, 1.5, 0.2], dtype=torch.float64)
    x0 = X * sigmas[0]
    s0, s1, s2 = (float(s) for s in sigmas)
    h1, h2 = math.log(s0 / s1), math.log(s1 / s2)
    m0 = denoiser(x0, s0)
    x_pred = s1 / s0 * x0 + (1 - math.exp(-h1)) * m0
    m1 = denoiser(x_pred, s1)
    x1 = x_pred + (h1 - 1 + math.exp(-h1)) / h1 * (m1 - m0)
    want = s2 / s1 * x1 + (1 - math.exp(-h2)) * m1
    got = sample("unipc", x0, sigmas, order=1, variant="vary_coeff")
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_vary_coeff_converges(order):
    """Higher orders of "vary_coeff" converge only at first order, as in A1111 (the UniPC reference code
    weights the corrector's new value with one row of C^-1): still an ODE solver, checked as one."""
    def error(steps):
        sigmas = sigmas_for(steps, "exponential")[:-1]  # end at sigma_min: no final jump to 0
        got = sample("unipc", X * sigmas[0], sigmas, order=order, variant="vary_coeff")
        return float((got - flow(X * sigmas[0], sigmas[0], sigmas[-1])).abs().max())
    coarse, fine = error(40), error(160)
    assert fine < coarse / 2.5 and fine < 0.02


def test_unipc_rejects_an_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        sample("unipc", X, sigmas_for(5), variant="bh3")


def test_unipc_grid_is_a1111s():
    """UniPC's own levels (A1111 gives it only a step count): on whole timesteps they are the table's sigmas;
    every level maps back to its timestep (t - 1/1000) * 1000; logSNR is uniform in log sigma; all end at
    sigma_min (timestep 0), not 0."""
    from sdstudio.engine.schedules import unipc_sigmas

    table = DiscreteSchedule()
    uniform = unipc_sigmas(27, table)  # 999, 962, ..., 0: whole timesteps
    assert torch.allclose(uniform, table.sigmas[list(range(999, -1, -37))], rtol=1e-5)
    for skip, t_cont in (("time_uniform", np.linspace(1, 1e-3, 21)),
                         ("time_quadratic", np.linspace(1, 1e-3 ** 0.5, 21) ** 2)):
        sig = unipc_sigmas(20, table, skip)
        assert len(sig) == 21 and float(sig[-1]) == pytest.approx(table.sigma_min, rel=1e-6)
        back = table.sigma_to_t(sig.double()).numpy()  # log-sigma vs log-alpha interpolation: near 0 they part
        assert np.allclose(back, (t_cont - 1e-3) * 1000, atol=0.05) and np.allclose(back[:10], (t_cont[:10] - 1e-3) * 1000,
                                                                                   atol=2e-3), skip
    log_snr = unipc_sigmas(20, table, "logSNR").double().log()
    assert np.allclose(np.diff(log_snr.numpy()), float(log_snr[-1] - log_snr[0]) / 20, atol=1e-5)
    assert float(log_snr[0].exp()) == pytest.approx(table.sigma_max, rel=1e-5)
    start = unipc_sigmas(10, table, t_start=0.452)  # img2img: from timestep 451
    assert float(start[0]) == pytest.approx(float(table.sigmas[451]), rel=1e-5)
    with pytest.raises(ValueError, match="skip type"):
        unipc_sigmas(5, table, "cosine")


def test_unipc_steps_follow_a1111s_timestep_count(session_engine):
    """A1111 runs UniPC for len(DDIM timesteps) steps: 30 requested steps are 31 (range(0, 1000, 33))."""
    engine = session_engine
    req = Txt2ImgRequest(prompt="x", steps=30, sampler_name="UniPC")
    sampler = get_sampler("UniPC")
    assert len(engine._timestep_sigmas(req, sampler, 30, None)) == 32
    assert len(engine._timestep_sigmas(req, get_sampler("DDIM"), 30, None)) == 31  # DDIM: 30 steps between them
    skipped = engine._timestep_sigmas(req.replace(uni_pc_skip_type="logSNR"), sampler, 30, None)
    assert not torch.allclose(skipped, engine._timestep_sigmas(req, sampler, 30, None))


def a1111_ddim_img2img(init, noise, eps, timesteps, t_enc, alphas):
    """A1111's DDIM img2img in its own (variance-preserving, noise-prediction) form: the picture noised to
    timesteps[t_enc], then DDIM over timesteps[:t_enc] from the top, whose first step reads it as if it were at
    timesteps[t_enc - 1]."""
    a = alphas[timesteps[t_enc]]
    x = init * a.sqrt() + noise * (1 - a).sqrt()
    sched = timesteps[:t_enc]
    for index in range(len(sched) - 1, 0, -1):
        a_t, a_prev = alphas[sched[index]], alphas[sched[index - 1]]
        e = eps(x, a_t)
        pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e
    return x


@pytest.mark.parametrize("strength, steps", [(0.5, 20), (0.3, 7), (0.75, 30)])
def test_timestep_img2img_starts_as_a1111(session_engine, strength, steps):
    """img2img with a timestep sampler: the noise level, the start and the levels the sampler runs over are
    A1111's, so DDIM through our sampler function gives A1111's DDIM formula's result (the ideal denoiser of
    N(MU, S^2) data stands in for the UNet)."""
    from sdstudio.core.params import Img2ImgRequest

    engine = session_engine
    req = Img2ImgRequest(prompt="x", steps=steps, denoising_strength=strength, sampler_name="DDIM")
    total, run = req.steps_to_run()
    sampler = get_sampler("DDIM")
    sigmas = engine._timestep_sigmas(req, sampler, total, run).double()
    init, noise = X[:, :100] * 0.3 + MU, X[:, 100:200]
    start = engine._timestep_img2img_start(req, total, run, init, noise, float(sigmas[0]))
    got = SAMPLER_FUNCTIONS["ddim"](denoiser, start, sigmas) / (1 + sigmas[-1] ** 2) ** 0.5

    alphas = engine.schedule.alphas_cumprod.double()

    def eps(x_vp, a_t):  # the ideal denoiser, asked in A1111's space
        sigma = ((1 - a_t) / a_t).sqrt()
        x_ve = x_vp / a_t.sqrt()
        return (x_ve - denoiser(x_ve, sigma)) / sigma

    t_enc = int(min(strength, 0.999) * steps)
    want = a1111_ddim_img2img(init, noise, eps, ddim_timesteps(steps), t_enc, alphas)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


# --- DPM fast / DPM adaptive -------------------------------------------------------------------------------

def test_dpm_fast_solves_the_ode_at_third_order():
    def error(steps):
        sigmas = sigmas_for(steps)
        got = sample("dpm_fast", X * sigmas[0], sigmas, eta=0.0)
        return float((got - flow(X * sigmas[0], sigmas[0], sigmas[-2])).abs().max())  # it stops at sigma_min
    coarse, fine = error(20), error(80)
    assert fine < coarse / 30 and fine < 2e-4


@pytest.mark.parametrize("steps, expected_orders", [(9, [3, 3, 2, 1]), (10, [3, 3, 3, 1]), (11, [3, 3, 3, 2])])
def test_dpm_fast_spends_the_step_count_on_model_calls(steps, expected_orders):
    """n model calls in steps equally spaced in log sigma (k-diffusion: third order, then n % 3, or 2 + 1)."""
    model, hooks = Counting(), []
    sigmas = sigmas_for(steps)
    sample("dpm_fast", X * sigmas[0], sigmas, eta=0.0, model=model,
           after_step=lambda x, i, s: hooks.append((i, float(s))) or x)
    orders = expected_orders
    assert len(model.sigmas) == steps == sum(orders)
    grid = np.exp(np.linspace(math.log(sigmas[0]), math.log(sigmas[-2]), len(orders) + 1))
    assert [i for i, _ in hooks] == list(range(len(orders)))
    assert np.allclose([s for _, s in hooks], grid[1:], rtol=1e-6)  # the hooks get the sigma reached


def test_dpm_adaptive_error_follows_its_tolerance():
    sigmas = sigmas_for(20)
    exact = flow(X * sigmas[0], sigmas[0], sigmas[-2])
    for order in (2, 3):
        loose, tight = Counting(), Counting()
        a = sample("dpm_adaptive", X * sigmas[0], sigmas, eta=0.0, order=order, model=loose)
        b = sample("dpm_adaptive", X * sigmas[0], sigmas, eta=0.0, order=order, model=tight, rtol=5e-4, atol=5e-5)
        err_loose, err_tight = float((a - exact).abs().max()), float((b - exact).abs().max())
        assert err_tight < err_loose / 20 and err_tight < 2e-3, order
        assert len(tight.sigmas) > len(loose.sigmas)


def test_dpm_adaptive_ignores_the_step_count_and_clamps_its_index():
    few, many = sigmas_for(5), sigmas_for(50)  # same ends
    seen, hooks = [], []
    a = sample("dpm_adaptive", X * few[0], few, eta=0.0, callback=lambda d: seen.append(d["i"]),
               after_step=lambda x, i, s: hooks.append((i, float(s))) or x)
    b = sample("dpm_adaptive", X * many[0], many, eta=0.0)
    assert torch.equal(a, b)
    assert len(seen) > 5 and max(seen) == 4 and max(i for i, _ in hooks) == 4
    assert hooks[-1][1] == pytest.approx(float(few[-2]), rel=1e-6)  # it ends at sigma_min


# --- Restart ---------------------------------------------------------------------------------------------------

def test_restart_without_restarts_is_a_second_order_ode_solver():
    def error(steps):
        sigmas = sigmas_for(steps)
        got = sample("restart", X * sigmas[0], sigmas, restart_list={})
        return float((got - flow(X * sigmas[0], sigmas[0], 0.0)).abs().max())
    assert error(10) > 4 * error(20)


@pytest.mark.parametrize("steps, restarts", [(10, 0), (19, 0), (20, 1), (35, 1), (36, 2), (60, 2)])
def test_restart_default_plan(steps, restarts):
    """A1111's default: 20+ steps one restart (36+: two) from sigma ~0.1 back up to ~2, re-noised; Heun steps
    (two calls, one for the last step to 0) adding up to the requested step count."""
    model, seen = Counting(), []
    sigmas = sigmas_for(steps)
    sample("restart", X * sigmas[0], sigmas, model=model, callback=lambda d: seen.append((d["i"], float(d["sigma"]))))
    assert [i for i, _ in seen] == list(range(steps))
    assert len(model.sigmas) == 2 * steps - 1
    starts = [s for _, s in seen]
    jumps = [(a, b) for a, b in pairwise(starts) if b > a]
    assert len(jumps) == restarts
    for low, high in jumps:  # the schedule's sigmas nearest 0.1 and 2
        assert 0.05 < low < 0.2 and 1.3 < high < 3.0


def test_restart_renoises_to_the_right_distribution():
    x = torch.randn(1, 40_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas = sigmas_for(30)  # one restart
    out = sample("restart", x * sigmas[0], sigmas, noise_seed=3)
    assert float(out.mean()) == pytest.approx(MU, abs=0.01)
    assert float(out.std()) == pytest.approx(S, abs=0.01)


# --- DDIM CFG++ ------------------------------------------------------------------------------------------------

class Guided:
    """CFG over two ideal denoisers, exposing the unguided prediction as the engine's denoiser does."""

    def __init__(self, cfg=3.0):
        self.cfg, self.cond, self.uncond = cfg, ideal(MU, S), ideal(-0.3, 0.8)
        self.uncond_denoised = None

    def __call__(self, x, sigma):
        self.uncond_denoised = self.uncond(x, sigma)
        return self.uncond_denoised + self.cfg * (self.cond(x, sigma) - self.uncond_denoised)


def a1111_ddim_cfgpp(model, x_ve, sigmas, eta=0.0, noises=()):
    """A1111's ddim_cfgpp in its own form: alphas_cumprod a = 1 / (1 + sigma^2), noise predictions, the
    guided one for pred_x0 and the unguided one for the direction to x_t."""
    noises = iter(noises)
    x = x_ve / (1 + sigmas[0] ** 2) ** 0.5
    for sigma, sigma_prev in pairwise(sigmas):
        a_t, a_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_prev ** 2)
        x_in = x / a_t ** 0.5
        e_t = (x_in - model(x_in, sigma)) / sigma
        uncond = getattr(model, "uncond_denoised", None)
        e_uncond = e_t if uncond is None else (x_in - uncond) / sigma
        sigma_t = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        x = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma_t ** 2) ** 0.5 * e_uncond
        if eta:
            x = x + sigma_t * next(noises)
    return x * (1 + sigmas[-1] ** 2) ** 0.5


TIMESTEP_SIGMAS = DiscreteSchedule().sigmas[ddim_timesteps(10)].flip(0).double()


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_cfgpp_is_a1111s_formula(eta):
    x = X * (TIMESTEP_SIGMAS[0] ** 2 + 1) ** 0.5
    noises = [torch.randn(X.shape, generator=torch.Generator().manual_seed(9 + i), dtype=X.dtype) for i in range(9)]
    want = a1111_ddim_cfgpp(Guided(), x, TIMESTEP_SIGMAS, eta, noises)
    it = iter(noises)
    got = SAMPLER_FUNCTIONS["ddim_cfgpp"](Guided(), x, TIMESTEP_SIGMAS, noise=lambda a, b: next(it), eta=eta)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    plain_ddim = a1111_ddim_cfgpp(lambda x_, s: Guided()(x_, s), x, TIMESTEP_SIGMAS, eta, noises)
    assert float((got - plain_ddim).abs().max()) > 0.1  # the unguided direction matters here


def test_ddim_cfgpp_without_an_unguided_prediction_is_ddim():
    x = X * (TIMESTEP_SIGMAS[0] ** 2 + 1) ** 0.5
    model = Guided()

    def plain(x_, s):  # no uncond_denoised attribute
        return model(x_, s)

    want = a1111_ddim_cfgpp(plain, x, TIMESTEP_SIGMAS)
    assert torch.allclose(SAMPLER_FUNCTIONS["ddim_cfgpp"](plain, x, TIMESTEP_SIGMAS), want, rtol=1e-9, atol=1e-9)
    assert torch.allclose(SAMPLER_FUNCTIONS["ddim"](plain, x, TIMESTEP_SIGMAS), want, rtol=1e-9, atol=1e-9)


# --- through the engine ----------------------------------------------------------------------------------------

BASE = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64, "seed": 42}


@pytest.mark.parametrize("sampler", ["DPM fast", "DPM adaptive", "Restart", "UniPC", "DDIM CFG++"])
def test_new_samplers_run_in_the_engine(session_engine, sampler):
    steps = []
    r = session_engine.generate(Txt2ImgRequest(**{**BASE, "sampler_name": sampler}),
                                on_progress=lambda p: steps.append(p.step))
    pixels = np.asarray(r.images[0].image)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    assert steps and max(steps) <= BASE["steps"]
    assert f"Sampler: {sampler}," in r.images[0].infotext


def test_ddim_cfgpp_in_the_engine_uses_the_unguided_prediction(session_engine):
    def image(sampler, negative):
        req = Txt2ImgRequest(**{**BASE, "sampler_name": sampler, "negative_prompt": negative, "cfg_scale": 7})
        return np.asarray(session_engine.generate(req).images[0].image).astype(int)
    same = BASE["prompt"]  # prompt == negative prompt: guided == unguided, so CFG++ is DDIM (up to rounding)
    assert np.abs(image("DDIM CFG++", same) - image("DDIM", same)).max() <= 1
    assert np.abs(image("DDIM CFG++", "blurry") - image("DDIM", "blurry")).mean() > 0.5


def test_unipc_settings_reach_the_sampler(session_engine):
    """UniPC's A1111 settings (order, variant, lower order final) are request fields the engine passes on;
    order 1 is DDIM's Euler step with a corrector, so it differs from order 3, as bh2 from bh1."""
    def image(**kw):
        req = Txt2ImgRequest(**{**BASE, "steps": 6, "sampler_name": "UniPC", **kw})
        return np.asarray(session_engine.generate(req).images[0].image).astype(int)

    default = image()
    assert np.array_equal(default, image(uni_pc_order=3, uni_pc_variant="bh1", uni_pc_lower_order_final=True))
    for changed in ({"uni_pc_order": 1}, {"uni_pc_variant": "bh2"}, {"uni_pc_lower_order_final": False}):
        assert not np.array_equal(default, image(**changed)), changed
    lms = Txt2ImgRequest(**{**BASE, "sampler_name": "LMS", "uni_pc_order": 1})  # LMS keeps its own order 4
    assert np.array_equal(np.asarray(session_engine.generate(lms).images[0].image),
                          np.asarray(session_engine.generate(lms.replace(uni_pc_order=3)).images[0].image))
