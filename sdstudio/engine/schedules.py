"""Noise schedules: small functions returning a descending tensor of sigmas that ends in 0 (KL Optimal,
as in A1111, ends at sigma_min).

Sigmas live in the k-diffusion parametrisation ``x = x0 + sigma * eps``; the model's own discrete
schedule (:class:`DiscreteSchedule`) converts between sigmas and the UNet's timesteps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.names import UNI_PC_SKIP_TYPES


class DiscreteSchedule:
    """The 1000-step DDPM schedule of Stable Diffusion ("scaled linear" betas 0.00085 -> 0.012)."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000):
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=np.float64) ** 2
        self.alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for a sigma, by interpolating log-sigmas (as k-diffusion does)."""
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas.to(sigma.device)[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        log_sigmas = self.log_sigmas.to(sigma.device)
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def uniform(n: int, model: DiscreteSchedule) -> torch.Tensor:
    t = torch.linspace(len(model.sigmas) - 1, 0, n)
    return _append_zero(model.t_to_sigma(t))


def karras(n: int, model: DiscreteSchedule, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = model.sigma_min ** (1 / rho), model.sigma_max ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(n: int, model: DiscreteSchedule) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(model.sigma_max), math.log(model.sigma_min), n).exp())


def polyexponential(n: int, model: DiscreteSchedule, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    lo, hi = math.log(model.sigma_min), math.log(model.sigma_max)
    return _append_zero(torch.exp(ramp * (hi - lo) + lo))


def sgm_uniform(n: int, model: DiscreteSchedule) -> torch.Tensor:
    start = model.sigma_to_t(torch.tensor(model.sigma_max))
    end = model.sigma_to_t(torch.tensor(model.sigma_min))
    return _append_zero(torch.stack([model.t_to_sigma(t) for t in torch.linspace(float(start), float(end), n + 1)[:-1]]))


def normal(n: int, model: DiscreteSchedule) -> torch.Tensor:
    start = model.sigma_to_t(torch.tensor(model.sigma_max))
    end = model.sigma_to_t(torch.tensor(model.sigma_min))
    return _append_zero(torch.stack([model.t_to_sigma(t) for t in torch.linspace(float(start), float(end), n)]))


def kl_optimal(n: int, model: DiscreteSchedule) -> torch.Tensor:
    """A1111's KL Optimal: n + 1 sigmas from sigma_max down to sigma_min itself, with no trailing zero
    (so its images keep sigma_min's noise, as A1111's do)."""
    alpha_min = torch.arctan(torch.tensor(model.sigma_min))
    alpha_max = torch.arctan(torch.tensor(model.sigma_max))
    idx = torch.arange(n + 1)
    return torch.tan(idx / n * alpha_min + (1.0 - idx / n) * alpha_max)


def simple(n: int, model: DiscreteSchedule) -> torch.Tensor:
    ss = len(model.sigmas) / n
    return _append_zero(torch.tensor([float(model.sigmas[-(1 + int(x * ss))]) for x in range(n)]))


def ddim(n: int, model: DiscreteSchedule) -> torch.Tensor:
    ss = max(len(model.sigmas) // n, 1)
    sigs = [float(model.sigmas[x]) for x in range(1, len(model.sigmas), ss)]
    return _append_zero(torch.tensor(sigs[::-1]))


_AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
_AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def align_your_steps(n: int, model: DiscreteSchedule, *, sdxl: bool = False) -> torch.Tensor:
    """NVIDIA's published 10-step sigmas, log-linearly interpolated to ``n`` steps."""
    base = _AYS_SDXL if sdxl else _AYS_SD1
    if n == len(base):
        return _append_zero(torch.tensor(base))
    xs = np.linspace(0, 1, len(base))
    ys = np.log(base[::-1])
    interp = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
    return _append_zero(torch.tensor(interp, dtype=torch.float32))


def beta(n: int, model: DiscreteSchedule, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    from scipy import stats  # only this schedule needs scipy

    ts = [stats.beta.ppf(x, alpha, beta_) for x in 1 - np.linspace(0, 1, n)]
    return _append_zero(torch.tensor([model.sigma_min + x * (model.sigma_max - model.sigma_min) for x in ts],
                                     dtype=torch.float32))


SCHEDULE_FUNCTIONS = {
    "uniform": uniform, "karras": karras, "exponential": exponential, "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform, "normal": normal, "kl_optimal": kl_optimal, "simple": simple, "ddim": ddim,
    "align_your_steps": align_your_steps, "beta": beta,
}


def get_sigmas(schedule: str, steps: int, model: DiscreteSchedule, *, discard_next_to_last: bool = False,
               sdxl: bool = False) -> torch.Tensor:
    """Sigmas for ``steps`` sampling steps; with ``discard_next_to_last`` one extra step is planned
    and the next-to-last sigma dropped, as A1111 does for DPM2-family samplers."""
    n = steps + 1 if discard_next_to_last else steps
    fn = SCHEDULE_FUNCTIONS[schedule]
    sigmas = fn(n, model, sdxl=sdxl) if schedule == "align_your_steps" else fn(n, model)
    if discard_next_to_last:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.float()


def ddim_timesteps(steps: int) -> torch.Tensor:
    """A1111's timesteps for DDIM/PLMS: 1, 1+1000//steps, ... (ascending)."""
    return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)


def unipc_sigmas(steps: int, model: DiscreteSchedule, skip_type: str = "time_uniform",
                 t_start: float | None = None) -> torch.Tensor:
    """A1111's noise levels for UniPC, ``steps + 1`` of them, which UniPC chooses itself: A1111 hands it only
    the number of steps (and, in img2img, where to start).

    UniPC reads the 1000-step table as a function of continuous time: timestep n sits at t = (n + 1) / 1000,
    and log(alpha) = log(alphas_cumprod) / 2 is interpolated linearly in t between them. The levels run from
    ``t_start`` (default 1, the last timestep) down to t = 1/1000 (timestep 0), uniformly in t
    (``time_uniform``), in sqrt(t) (``time_quadratic``) or in log-SNR (``logSNR``). The last one is
    sigma_min, not 0: UniPC stops there, without a final denoising step. The UNet's timestep for a level is
    (t - 1/1000) * 1000, which our sigma -> timestep conversion (by log-sigma, not log-alpha, interpolation)
    gives back to within 1e-3 down to timestep 100 and within 0.02 below it."""
    n = len(model.alphas_cumprod)
    grid = np.arange(1, n + 1, dtype=np.float64) / n
    log_alpha = 0.5 * np.log(model.alphas_cumprod.double().numpy())
    t_end, t_first = 1.0 / n, 1.0 if t_start is None else float(t_start)

    def log_snr(t: float) -> float:  # lambda = log(alpha / sigma_vp) = -log(sigma)
        a = float(np.interp(t, grid, log_alpha))
        return a - 0.5 * math.log(1 - math.exp(2 * a))

    if skip_type == "logSNR":
        sigmas = np.exp(-np.linspace(log_snr(t_first), log_snr(t_end), steps + 1))
    else:
        if skip_type == "time_uniform":
            t = np.linspace(t_first, t_end, steps + 1)
        elif skip_type == "time_quadratic":
            t = np.linspace(t_first ** 0.5, t_end ** 0.5, steps + 1) ** 2
        else:
            raise ValueError(f"UniPC skip type must be one of {', '.join(UNI_PC_SKIP_TYPES)}, not {skip_type!r}")
        sigmas = np.sqrt(np.exp(-2 * np.interp(t, grid, log_alpha)) - 1)
    return torch.tensor(sigmas, dtype=torch.float32)
