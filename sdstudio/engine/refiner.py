"""A1111's refiner: a second checkpoint takes over part-way through sampling, inside one job.

The switch is decided as A1111 decides it, at each denoiser call: by default from the noise level
(the model timestep nearest to the current sigma, ``completed = (999 - t) / 1000``), or, with the
option ``refiner_switch_by_sample_steps``, from the denoiser's call count over the pass's steps; the
refiner takes over once ``completed >= refiner_switch_at``. It keeps the sampler's state (a multistep
sampler's history, ancestral noise): only the model, its conditioning and its SDXL size/aesthetic
conditioning change. Hooks that feed the first model's UNet (ControlNet residuals, reference,
IP-Adapter) stop at the switch, since their inputs fit that UNet only; guidance hooks go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.detect import ModelSpec
from .schedules import DiscreteSchedule

HIRES_REFINER_PASSES = ("first pass", "second pass", "both passes")  # A1111's option hires_fix_refiner_pass


@dataclass(frozen=True)
class SwitchTarget:
    """What the denoiser carries on with: the refiner's UNet and the conditioning its encoders made."""

    unet: torch.nn.Module
    prediction: str
    cond: list  # per image, as SamplingPlan.cond
    uncond: list
    time_ids: tuple[torch.Tensor, torch.Tensor] | None  # (positive, negative) SDXL conditioning
    in_channels: int


class RefinerSwitch:
    """Decides when to switch (see the module's docstring) and builds the target once, when it is due."""

    def __init__(self, at: float, schedule: DiscreteSchedule, total_steps: int, make: Callable[[], SwitchTarget],
                 *, by_steps: bool = False):
        self.at, self.schedule, self.total_steps, self.by_steps = at, schedule, max(total_steps, 1), by_steps
        self._make = make
        self.switched = False

    def completed(self, sigma: torch.Tensor, denoiser_step: int) -> float:
        if self.by_steps:
            return denoiser_step / self.total_steps
        t = int(torch.argmin((self.schedule.sigmas - sigma.float().max().cpu()).abs()))
        return (999 - t) / 1000

    def due(self, sigma: torch.Tensor, denoiser_step: int) -> bool:
        return not self.switched and self.completed(sigma, denoiser_step) >= self.at

    def target(self) -> SwitchTarget:
        self.switched = True
        return self._make()


def sdxl_time_ids(spec: ModelSpec, width: int, height: int, crop: tuple[int, int] = (0, 0),
                  aesthetic: tuple[float, float] = (6.0, 2.5)) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SDXL's micro-conditioning for the (positive, negative) prompts, as A1111 builds it: original size and
    target size are the pass's (height, width), the crop comes from the options ``sdxl_crop_top`` /
    ``sdxl_crop_left``; the refiner takes an aesthetic score instead of the target size (options
    ``sdxl_refiner_high_aesthetic_score`` 6.0 for the prompt, ``..._low_...`` 2.5 for the negative)."""
    if not spec.is_sdxl:
        return None
    top, left = crop
    if spec.family == "sdxl_refiner":
        pos, neg = ([[height, width, top, left, score]] for score in aesthetic)
        return torch.tensor(pos, dtype=torch.float32), torch.tensor(neg, dtype=torch.float32)
    ids = torch.tensor([[height, width, top, left, height, width]], dtype=torch.float32)
    return ids, ids
