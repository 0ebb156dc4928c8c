"""Noise schedules against their published definitions, written out here independently of our code.

References: the SD DDPM table (LDM's "scaled linear" betas, alphas_cumprod kept in float32);
k-diffusion's ``get_sigmas_karras`` / ``_exponential`` / ``_polyexponential`` and its ``DiscreteSchedule``
(``t_to_sigma`` / ``sigma_to_t`` = linear interpolation of log sigma over the table); A1111's
``modules/sd_schedulers.py`` for Uniform, SGM Uniform, Normal, Simple, Beta (alpha = beta = 0.6,
A1111's defaults), KL Optimal (n + 1 values ending at sigma_min, no zero) and Align Your Steps (NVIDIA's
published 11-value lists for SD1 and SDXL, log-linearly interpolated when the step count is not 11).
"""

import math

import numpy as np
import pytest
import torch
from scipy import special

from sdstudio.engine import schedules
from sdstudio.engine.schedules import DiscreteSchedule, get_sigmas

M = DiscreteSchedule()
STEP_COUNTS = (1, 2, 7, 10, 11, 20, 50)


def ddpm_table() -> np.ndarray:
    """SD's 1000 training sigmas, ascending (t = 0 .. 999)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


TABLE = ddpm_table()
S_MIN, S_MAX = TABLE[0], TABLE[-1]


def t_to_sigma(t):
    return np.exp(np.interp(t, np.arange(1000), np.log(TABLE)))


def sigma_to_t(sigma):
    return np.interp(np.log(sigma), np.log(TABLE), np.arange(1000))


def ref_karras(n, rho=7.0):
    ramp = np.linspace(0, 1, n)
    return np.append((S_MAX ** (1 / rho) + ramp * (S_MIN ** (1 / rho) - S_MAX ** (1 / rho))) ** rho, 0.0)


def ref_exponential(n):
    return np.append(S_MAX * (S_MIN / S_MAX) ** np.linspace(0, 1, n), 0.0)  # geometric from max to min


def ref_polyexponential(n, rho=1.0):
    ramp = np.linspace(1, 0, n) ** rho
    return np.append(np.exp(math.log(S_MIN) + ramp * (math.log(S_MAX) - math.log(S_MIN))), 0.0)


def ref_uniform(n):
    return np.append(t_to_sigma(np.linspace(999, 0, n)), 0.0)


def ref_sgm_uniform(n):
    return np.append(t_to_sigma(np.linspace(sigma_to_t(S_MAX), sigma_to_t(S_MIN), n + 1)[:-1]), 0.0)


def ref_normal(n):
    return np.append(t_to_sigma(np.linspace(sigma_to_t(S_MAX), sigma_to_t(S_MIN), n)), 0.0)


def ref_simple(n):
    return np.append([TABLE[-(1 + int(i * 1000 / n))] for i in range(n)], 0.0)


def ref_kl_optimal(n):
    i = np.arange(n + 1) / n
    return np.tan(i * math.atan(S_MIN) + (1 - i) * math.atan(S_MAX))


def ref_beta(n, a=0.6, b=0.6):
    quantiles = special.betaincinv(a, b, 1 - np.linspace(0, 1, n))  # the Beta(a, b) distribution's ppf
    return np.append(S_MIN + quantiles * (S_MAX - S_MIN), 0.0)


AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def ref_ays(n, published):
    """Interpolated along the ascending list, then reversed (so one step, as in A1111, is 0.029 -> 0)."""
    if n == len(published):
        return np.append(published, 0.0)
    logs = np.log(published[::-1])
    out = []
    for u in np.linspace(0, 1, n):  # position along the list, interpolated in log sigma
        pos = u * (len(logs) - 1)
        lo = min(math.floor(pos), len(logs) - 2)
        frac = pos - lo
        out.append(math.exp((1 - frac) * logs[lo] + frac * logs[lo + 1]))
    return np.append(out[::-1], 0.0)


REFERENCES = {
    "karras": ref_karras, "exponential": ref_exponential, "polyexponential": ref_polyexponential,
    "uniform": ref_uniform, "sgm_uniform": ref_sgm_uniform, "normal": ref_normal, "simple": ref_simple,
    "kl_optimal": ref_kl_optimal, "beta": ref_beta,
}


def test_model_sigmas_are_sd_values():
    assert M.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert M.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert np.allclose(M.sigmas.numpy(), TABLE, rtol=1e-6)


def test_sigma_t_round_trip():
    t = torch.tensor([0.0, 10.5, 500.0, 999.0])
    assert torch.allclose(M.sigma_to_t(M.t_to_sigma(t)), t, atol=1e-3)


def test_sigma_t_conversions_interpolate_log_sigma():
    t = np.array([0.0, 0.25, 10.5, 123.75, 500.0, 998.5, 999.0])
    assert np.allclose(M.t_to_sigma(torch.tensor(t, dtype=torch.float32)).numpy(), t_to_sigma(t), rtol=1e-5)
    sig = np.array([0.03, 0.1, 1.0, 3.3, 14.0])
    assert np.allclose(M.sigma_to_t(torch.tensor(sig, dtype=torch.float32)).numpy(), sigma_to_t(sig), atol=2e-3)


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_schedule_matches_its_definition(name, steps):
    got = get_sigmas(name, steps, M).double().numpy()
    want = REFERENCES[name](steps)
    assert got.shape == want.shape
    assert np.allclose(got, want, rtol=2e-5, atol=1e-7), f"{name} {steps}: {got} != {want}"


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("sdxl", [False, True])
def test_align_your_steps_is_nvidias_published_list(steps, sdxl):
    got = get_sigmas("align_your_steps", steps, M, sdxl=sdxl).double().numpy()
    want = ref_ays(steps, AYS_SDXL if sdxl else AYS_SD1)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-7), f"{steps}: {got} != {want}"


def test_align_your_steps_at_eleven_steps_is_the_list_itself():
    assert get_sigmas("align_your_steps", 11, M).tolist() == pytest.approx(AYS_SD1 + [0.0], rel=1e-6)
    assert get_sigmas("align_your_steps", 11, M, sdxl=True).tolist() == pytest.approx(AYS_SDXL + [0.0], rel=1e-6)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULE_FUNCTIONS))
def test_every_schedule_descends(name):
    s = get_sigmas(name, 10, M)
    assert torch.all(s[:-1] > 0) and torch.all(s[:-1] >= s[1:])
    if name == "kl_optimal":  # A1111's KL Optimal stops at sigma_min instead of appending a zero
        assert len(s) == 11 and float(s[-1]) == pytest.approx(M.sigma_min, rel=1e-5)
    elif name != "ddim":
        assert len(s) == 11 and s[-1] == 0


def test_discard_next_to_last():
    plain = get_sigmas("karras", 11, M)
    discard = get_sigmas("karras", 10, M, discard_next_to_last=True)
    assert len(discard) == 11 and torch.equal(discard, torch.cat([plain[:-2], plain[-1:]]))


def test_ddim_timesteps_as_a1111():
    assert schedules.ddim_timesteps(20).tolist() == list(range(1, 1000, 50))


def test_ddim_schedule_keeps_a1111_step_count_quirk():
    # A1111 steps through the 1000 timesteps with stride 1000 // n, so 12 steps give 13 sigmas.
    s = get_sigmas("ddim", 12, M)
    assert len(s) == 14 and s[-1] == 0
    assert np.allclose(s[:-1].double().numpy(), TABLE[1::1000 // 12][::-1], rtol=1e-6)
