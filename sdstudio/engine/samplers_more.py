"""The rest of A1111's samplers: DPM fast, DPM adaptive, Restart, UniPC and DDIM CFG++.

Same shape as :mod:`sdstudio.engine.samplers` (``sample_NAME(model, x, sigmas, *, noise, callback,
after_step, **options)``). DPM fast, DPM adaptive and Restart step over their own grid of noise levels,
not over ``sigmas`` one by one: their callback and hook index counts their own steps, clamped to the last
index of ``sigmas`` (so progress never passes 100 % and hook windows stay in range), and the hooks get the
noise level each step really reached.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _end_own_step(after_step, x, i: int, last: int, sigma_next: torch.Tensor):
    """The per-step hooks for a sampler with its own step grid: index clamped to ``last``, real sigma."""
    return x if after_step is None else after_step(x, min(i, last), sigma_next)


def _last_nonzero(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]


# --- DPM-Solver (Lu et al. 2022), as k-diffusion's sample_dpm_fast / sample_dpm_adaptive -------------------
# Written in t = -log(sigma) with the noise prediction eps = (x - D(x, sigma)) / sigma.

def _eps(model, x, t):
    return _denoised_eps(model, x, t)[1]


def _denoised_eps(model, x, t):
    sigma = _sigma(t)
    denoised = model(x, sigma)
    return denoised, (x - denoised) / sigma


def _dpm_1(x, t, t_next, eps):
    return x - _sigma(t_next) * (t_next - t).expm1() * eps


def _dpm_2(model, x, t, t_next, eps, r1=0.5):
    """DPM-Solver-2; also returns eps at the intermediate point (DPM-Solver-3 with the same r1 reuses it)."""
    h = t_next - t
    s1 = t + r1 * h
    u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
    eps_1 = _eps(model, u1, s1)
    x_next = x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_1 - eps)
    return x_next, eps_1


def _dpm_3(model, x, t, t_next, eps, eps_1=None, r1=1 / 3, r2=2 / 3):
    h = t_next - t
    s1, s2 = t + r1 * h, t + r2 * h
    if eps_1 is None:
        eps_1 = _eps(model, x - _sigma(s1) * (r1 * h).expm1() * eps, s1)
    u2 = (x - _sigma(s2) * (r2 * h).expm1() * eps
          - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_1 - eps))
    eps_2 = _eps(model, u2, s2)
    return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_2 - eps)


def _ancestral_target(t, t_next, t_end, eta):
    """Where an ancestral DPM step lands (t) and how much noise brings it back to sigma(t_next)."""
    if not eta:
        return t_next, None
    sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_down = torch.minimum(t_end, _t(sigma_down))
    return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2) ** 0.5


def sample_dpm_fast(model, x, sigmas, *, noise=None, callback=None, after_step=None, eta=1.0, s_noise=1.0, n=None,
                    **_):
    """DPM-Solver-fast: ``n`` model calls (A1111: the step count) in third-order steps, equally spaced in
    log-sigma from sigma_max to sigma_min, ending with a lower-order one. Like A1111 it stops at sigma_min.
    ``eta`` defaults to A1111's ancestral eta (1), which makes it stochastic."""
    last = len(sigmas) - 2
    nfe = len(sigmas) - 1 if n is None else int(n)
    t_start, t_end = _t(sigmas[0]), _t(_last_nonzero(sigmas))
    m = nfe // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, dtype=sigmas.dtype, device=sigmas.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_down, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        denoised, eps = _denoised_eps(model, x, t)
        _report(callback, x, min(i, last), _sigma(t), denoised)
        if order == 1:
            x = _dpm_1(x, t, t_down, eps)
        elif order == 2:
            x = _dpm_2(model, x, t, t_down, eps)[0]
        else:
            x = _dpm_3(model, x, t, t_down, eps)
        if sigma_up is not None:
            x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * sigma_up
        x = _end_own_step(after_step, x, i, last, _sigma(t_next))
    return x


class _PIDStepSize:
    """The PID step-size controller of DPM-Solver's adaptive mode (Söderlind's digital filters)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inv_errors: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + self.eps)
        if not self.inv_errors:
            self.inv_errors = [inv, inv, inv]
        self.inv_errors[0] = inv
        e0, e1, e2 = self.inv_errors
        factor = 1 + math.atan(e0 ** self.b1 * e1 ** self.b2 * e2 ** self.b3 - 1)  # a smooth limiter
        accept = factor >= self.accept_safety
        if accept:
            self.inv_errors = [e0, e0, e1]
        self.h *= factor
        return accept


def sample_dpm_adaptive(model, x, sigmas, *, noise=None, callback=None, after_step=None, eta=1.0, s_noise=1.0,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, **_):
    """DPM-Solver-12/23 with adaptive steps from sigma_max to sigma_min (the step count is not used): each
    step compares an order-``order`` solution with one order lower and a PID controller sizes the next."""
    if order not in (2, 3):
        raise ValueError("DPM adaptive: order must be 2 or 3")
    last = len(sigmas) - 2
    s, t_end = _t(sigmas[0]), _t(_last_nonzero(sigmas))
    pid = _PIDStepSize(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_prev = x
    attempt = 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        t_down, sigma_up = _ancestral_target(s, t, t_end, eta)
        # recomputed after a rejection, as k-diffusion does (prompt editing counts the denoiser's calls)
        denoised, eps = _denoised_eps(model, x, s)
        _report(callback, x, min(attempt, last), _sigma(s), denoised)
        if order == 2:
            x_low = _dpm_1(x, s, t_down, eps)
            x_high = _dpm_2(model, x, s, t_down, eps)[0]
        else:
            x_low, eps_1 = _dpm_2(model, x, s, t_down, eps, r1=1 / 3)
            x_high = _dpm_3(model, x, s, t_down, eps, eps_1)
        delta = (rtol * torch.maximum(x_low.abs(), x_prev.abs())).clamp_min(atol)
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        if not math.isfinite(error):
            raise FloatingPointError("DPM adaptive: the error estimate is not finite")
        if pid.propose(error):
            x_prev = x_low
            x = x_high
            if sigma_up is not None:
                x = x + noise(_sigma(s), _sigma(t)) * s_noise * sigma_up
            s = t
            x = _end_own_step(after_step, x, attempt, last, _sigma(t))
        attempt += 1
    return x


# --- Restart (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), as A1111 runs it ------

def _karras(n: int, sigma_min: float, sigma_max: float, like: torch.Tensor, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels between explicit ends, with a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=like.dtype, device=like.device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, like.new_zeros([1])])


def _restart_plan(sigmas: torch.Tensor, restart_list: dict | None):
    """(sigmas, [(sigma_from, sigma_to), ...]): the Heun steps, with each restart segment's steps inserted
    after the step that reaches its ``min_sigma``. ``restart_list`` is A1111's
    ``{min_sigma: [restart_steps, restart_times, max_sigma]}``; None picks A1111's default for the step count
    (20+ steps: one restart of 9 steps from 0.1 up to 2, on a Karras schedule with as many steps fewer;
    36+: two restarts of steps // 4), which keeps the total number of steps equal to the requested one."""
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = _karras(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]), sigmas)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    at = {int(torch.argmin((sigmas - key).abs())): value for key, value in restart_list.items()}
    plan = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            restart_steps, restart_times, restart_max = at[i + 1]
            lo, hi = i + 1, int(torch.argmin((sigmas - restart_max).abs()))
            if hi < lo:
                segment = _karras(restart_steps, float(sigmas[lo]), float(sigmas[hi]), sigmas)[:-1]
                plan.extend(list(pairwise(segment)) * restart_times)
    return sigmas, plan


def sample_restart(model, x, sigmas, *, noise, callback=None, after_step=None, s_noise=1.0, restart_list=None, **_):
    """Heun steps down the schedule; at each restart point the latent is re-noised up to a higher sigma
    (fresh noise) and solved back down again, which contracts the error accumulated so far."""
    last = len(sigmas) - 2
    _, plan = _restart_plan(sigmas, restart_list)
    last_sigma = None
    for i, (sigma, sigma_next) in enumerate(plan):
        if last_sigma is not None and last_sigma < sigma:
            x = x + noise(last_sigma, sigma) * s_noise * (sigma ** 2 - last_sigma ** 2) ** 0.5
        denoised = model(x, sigma)
        d = (x - denoised) / sigma
        _report(callback, x, min(i, last), sigma, denoised)
        dt = sigma_next - sigma
        x_next = x + d * dt
        if sigma_next > 0:  # Heun's correction; the last step to 0 stays Euler
            d_next = (x_next - model(x_next, sigma_next)) / sigma_next
            x_next = x + (d + d_next) / 2 * dt
        x = _end_own_step(after_step, x_next, i, last, sigma_next)
        last_sigma = sigma_next
    return x


# --- UniPC (Zhao et al. 2023): multistep predictor-corrector, data prediction, over sigmas ------------------
# In the k-diffusion parametrisation (x = x0 + sigma * eps) the half-log-SNR is lambda = -log(sigma) and the
# exponential integrator reads x_t = sigma_t / sigma_s * x_s - expm1(-h) * x0 + higher-order terms.
# A1111's "UniPC skip type" (time_uniform / time_quadratic / logSNR) chooses where its timesteps lie; here the
# noise levels are the ones we are given (A1111's DDIM-style timesteps for this timestep sampler), so that
# setting has no counterpart in this function.

def _unipc_bh(x, m_prev, sig_prev, sigma_next, order, variant, model, corrector):
    """One UniPC step (B(h) variants) from sig_prev[-1] to sigma_t: predictor, then (if ``corrector``) one
    model call at the prediction and the corrector, whose model value the next step reuses."""
    sigma_t = float(sigma_next)
    h = math.log(sig_prev[-1]) - math.log(sigma_t)
    rks = [(math.log(sig_prev[-1]) - math.log(sig_prev[-(i + 1)])) / h for i in range(1, order)]
    m0 = m_prev[-1]
    d1s = [(m_prev[-(i + 1)] - m0) / rk for i, rk in zip(range(1, order), rks)]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks_all = np.array(rks + [1.0])
    r_mat = np.stack([rks_all ** (k - 1) for k in range(1, order + 1)])
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    b = np.array(b)
    x_base = (sigma_t / sig_prev[-1]) * x - h_phi_1 * m0
    x_t = x_base
    if d1s:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1])
        x_t = x_base - b_h * sum(float(r) * d for r, d in zip(rhos_p, d1s))
    if not corrector:
        return x_t, None
    model_t = model(x_t, sigma_next)
    rhos_c = [0.5] if order == 1 else np.linalg.solve(r_mat, b)
    corr = sum(float(r) * d for r, d in zip(rhos_c[:-1], d1s)) + float(rhos_c[-1]) * (model_t - m0)
    return x_base - b_h * corr, model_t


def _unipc_vary(x, m_prev, sig_prev, sigma_next, order, model, corrector):
    """One UniPC step, "vary_coeff" variant, with the same coefficients as A1111's (the UniPC reference
    code's): Taylor coefficients from the inverse of C[i][j] = r_i^j / (j+1)!."""
    sigma_t = float(sigma_next)
    h = math.log(sig_prev[-1]) - math.log(sigma_t)
    rks = [(math.log(sig_prev[-1]) - math.log(sig_prev[-(i + 1)])) / h for i in range(1, order)]
    m0 = m_prev[-1]
    d1s = [(m_prev[-(i + 1)] - m0) / rk for i, rk in zip(range(1, order), rks)]
    rks_all = np.array(rks + [1.0])
    size = len(rks_all)
    c_mat = np.stack([rks_all ** j / math.factorial(j + 1) for j in range(size)], axis=1)
    hh = -h
    h_phi = [math.expm1(hh)]
    for k in range(1, size + 1):
        h_phi.append(h_phi[-1] / hh - 1 / math.factorial(k))
    x_base = (sigma_t / sig_prev[-1]) * x - h_phi[0] * m0
    x_t = x_base
    if d1s:
        a_p = np.linalg.inv(c_mat[:-1, :-1])
        for k in range(size - 1):
            x_t = x_t - h_phi[k + 1] * sum(float(a) * d for a, d in zip(a_p[k], d1s))
    if not corrector:
        return x_t, None
    model_t = model(x_t, sigma_next)
    a_c = np.linalg.inv(c_mat)
    x_t = x_base
    for k in range(size - 1):
        x_t = x_t - h_phi[k + 1] * sum(float(a) * d for a, d in zip(a_c[k][:-1], d1s))
    row = max(size - 2, 0)  # the reference code weights the new value with the row its loop ended on
    return x_t - h_phi[size] * float(a_c[row][-1]) * (model_t - m0), model_t


def sample_unipc(model, x, sigmas, *, noise=None, callback=None, after_step=None, order=3, variant="bh1",
                 lower_order_final=True, **_):
    """UniPC multistep (A1111 settings: "UniPC order" ``order``, "UniPC variant" ``variant`` = bh1 / bh2 /
    vary_coeff, "UniPC lower order final"). One model call per step: the corrector's call at the predicted
    point is the next step's model value. The first steps warm up at orders 1, 2, ...; a step to sigma 0
    is the first-order one, x = denoised (the higher-order terms have no limit there)."""
    if variant not in ("bh1", "bh2", "vary_coeff"):
        raise ValueError(f"UniPC variant must be bh1, bh2 or vary_coeff, not {variant!r}")
    steps = len(sigmas) - 1
    order = max(1, min(int(order), steps))  # A1111 requires order <= steps
    sig = [float(s) for s in sigmas]
    m_prev = [model(x, sigmas[0])]
    sig_prev = [sig[0]]
    for i in range(steps):
        _report(callback, x, i, sigmas[i], m_prev[-1])
        step = i + 1
        if step < order:
            step_order = step  # warm-up
        else:
            step_order = min(order, steps + 1 - step) if lower_order_final else order
        corrector = step < steps
        if sig[step] == 0:
            x, model_t = m_prev[-1], None
        elif variant == "vary_coeff":
            x, model_t = _unipc_vary(x, m_prev, sig_prev, sigmas[step], step_order, model, corrector)
        else:
            x, model_t = _unipc_bh(x, m_prev, sig_prev, sigmas[step], step_order, variant, model, corrector)
        if step < steps:
            m_prev = (m_prev + [model_t if model_t is not None else model(x, sigmas[step])])[-order:]
            sig_prev = (sig_prev + [sig[step]])[-order:]
        x = _end_step(after_step, x, i, sigmas)
    return x


# --- DDIM CFG++ (Chung et al. 2024), as A1111 1.10's "DDIM CFG++" --------------------------------------------

def sample_ddim_cfgpp(model, x, sigmas, *, noise=None, callback=None, after_step=None, eta=0.0, **_):
    """DDIM whose re-noising direction is the *unguided* prediction: x_next = denoised + sigma_next *
    (x - uncond_denoised) / sigma. The denoiser exposes its last unguided prediction as
    ``model.uncond_denoised``; without it this is plain DDIM. (A1111 also scales CFG by 1/12.5 for this
    sampler: that is the denoiser's business, see ``SamplerInfo.cfg_scale_multiplier``.)"""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        uncond = getattr(model, "uncond_denoised", None)
        if uncond is None:
            uncond = denoised
        _report(callback, x, i, sigma, denoised)
        eps_uncond = (x - uncond) / sigma
        if eta:
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            x = denoised + eps_uncond * sigma_down + noise(sigma, sigma_next) * sigma_up
        else:
            x = denoised + eps_uncond * sigma_next
        x = _end_step(after_step, x, i, sigmas)
    return x


SAMPLER_FUNCTIONS_MORE = {
    "dpm_fast": sample_dpm_fast, "dpm_adaptive": sample_dpm_adaptive, "restart": sample_restart,
    "unipc": sample_unipc, "ddim_cfgpp": sample_ddim_cfgpp,
}

# Imported last, on purpose: samplers.py merges SAMPLER_FUNCTIONS_MORE into SAMPLER_FUNCTIONS at its own end,
# so with this import here either module can be imported first without a circular-import error.
from .samplers import _end_step, _report, ancestral_step
