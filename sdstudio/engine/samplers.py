"""Samplers as plain functions over a denoiser ``model(x, sigma) -> denoised``.

Every sampler has the same shape: ``sample_NAME(model, x, sigmas, *, noise, callback, **options)``.
It knows nothing of prompts, CFG or VAEs: those live in the denoiser it is given. ``noise(sigma,
sigma_next)`` returns fresh noise shaped like ``x`` (drawn from the per-image seeded streams);
``callback`` receives ``{"x", "i", "sigma", "denoised"}`` after every step, which is where progress,
live previews and interruption hang; ``after_step(x, i, sigma_next)``, when given, returns the latent the
next step starts from (the per-step hooks of :mod:`sdstudio.engine.hooks`). The maths is that of k-diffusion / A1111, so the same seed gives
the same image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None] | None


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma for a denoised estimate."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up): where to step deterministically, and how much noise to add back."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _report(callback: Callback, x, i, sigma, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})


def _end_step(after_step, x, i, sigmas):
    """The latent after step ``i`` through the denoiser's per-step hooks (``after_step(x, i, sigma_next)``)."""
    return x if after_step is None else after_step(x, i, sigmas[i + 1])


def _churn(x, sigma, n, noise, s_churn, s_tmin, s_tmax, s_noise):
    gamma = min(s_churn / (n - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


def sample_euler(model, x, sigmas, *, noise=None, callback=None, after_step=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                 s_noise=1.0, **_):
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas), noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        _report(callback, x, i, sigmas[i], denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_euler_ancestral(model, x, sigmas, *, noise, callback=None, after_step=None, eta=1.0, s_noise=1.0, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_heun(model, x, sigmas, *, noise=None, callback=None, after_step=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                s_noise=1.0, **_):
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas), noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_dpm_2(model, x, sigmas, *, noise=None, callback=None, after_step=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                 s_noise=1.0, **_):
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas), noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_dpm_2_ancestral(model, x, sigmas, *, noise, callback=None, after_step=None, eta=1.0, s_noise=1.0, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x = _end_step(after_step, x, i, sigmas)
    return x


def _lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the j-th Lagrange basis polynomial through t_i, t_{i-1}, ..."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    antiderivative = poly.integ()
    return float(antiderivative(t[i + 1]) - antiderivative(t[i]))


def sample_lms(model, x, sigmas, *, noise=None, callback=None, after_step=None, order=4, **_):
    sigmas_np = sigmas.detach().cpu().double().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _report(callback, x, i, sigmas[i], denoised)
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(cur, sigmas_np, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_dpmpp_2s_ancestral(model, x, sigmas, *, noise, callback=None, after_step=None, eta=1.0, s_noise=1.0, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s))
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_dpmpp_2m(model, x, sigmas, *, noise=None, callback=None, after_step=None, **_):
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_dpmpp_sde(model, x, sigmas, *, noise, callback=None, after_step=None, eta=1.0, s_noise=1.0, r=0.5, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            x = _end_step(after_step, x, i, sigmas)
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(_sigma_fn(t), _sigma_fn(s)) * s_noise * su
        denoised_2 = model(x_2, _sigma_fn(s))
        sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(_sigma_fn(t), _sigma_fn(t_next)) * s_noise * su
        x = _end_step(after_step, x, i, sigmas)
    return x


def _dpmpp_2m_sde(model, x, sigmas, *, noise, callback, eta, s_noise, solver, after_step=None):
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_dpmpp_2m_sde(model, x, sigmas, *, noise, callback=None, after_step=None, eta=1.0, s_noise=1.0, **_):
    return _dpmpp_2m_sde(model, x, sigmas, noise=noise, callback=callback, eta=eta, s_noise=s_noise, solver="midpoint",
                         after_step=after_step)


def sample_dpmpp_2m_sde_heun(model, x, sigmas, *, noise, callback=None, after_step=None, eta=1.0, s_noise=1.0, **_):
    return _dpmpp_2m_sde(model, x, sigmas, noise=noise, callback=callback, eta=eta, s_noise=s_noise, solver="heun",
                         after_step=after_step)


def sample_dpmpp_3m_sde(model, x, sigmas, *, noise, callback=None, after_step=None, eta=1.0, s_noise=1.0, **_):
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (h_eta.neg().expm1() / h_eta + 1) * d
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_lcm(model, x, sigmas, *, noise, callback=None, after_step=None, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_ddim(model, x, sigmas, *, noise=None, callback=None, after_step=None, eta=0.0, **_):
    """DDIM over A1111's timesteps, written in sigma space (with eta 0 it is an Euler step per timestep)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if eta:
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma) + noise(sigma, sigma_next) * sigma_up
        else:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        x = _end_step(after_step, x, i, sigmas)
    return x


def sample_plms(model, x, sigmas, *, noise=None, callback=None, after_step=None, **_):
    """PLMS (pseudo linear multistep) over A1111's timesteps, in sigma space."""
    old_eps: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        e_t = to_d(x, sigma, denoised)
        _report(callback, x, i, sigma, denoised)
        if not old_eps:
            x_prev = x + e_t * (sigma_next - sigma)
            e_next = to_d(x_prev, sigma_next, model(x_prev, sigma_next))
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + e_prime * (sigma_next - sigma)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = _end_step(after_step, x, i, sigmas)
    return x


SAMPLER_FUNCTIONS = {
    "euler": sample_euler, "euler_ancestral": sample_euler_ancestral, "heun": sample_heun, "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral, "lms": sample_lms, "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2m": sample_dpmpp_2m, "dpmpp_sde": sample_dpmpp_sde, "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun, "dpmpp_3m_sde": sample_dpmpp_3m_sde, "lcm": sample_lcm,
    "ddim": sample_ddim, "plms": sample_plms,
}

from .samplers_more import SAMPLER_FUNCTIONS_MORE  # DPM fast/adaptive, Restart, UniPC, DDIM CFG++

SAMPLER_FUNCTIONS.update(SAMPLER_FUNCTIONS_MORE)
