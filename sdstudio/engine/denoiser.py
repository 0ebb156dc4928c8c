"""The denoiser the samplers call: ``D(x, sigma) -> denoised``.

It wraps the UNet with the model's parametrisation (epsilon or v), classifier-free guidance
(negative prompt and CFG scale) and everything that varies per step: prompt schedules give a
condition per step. ControlNet units and other per-step inputs will hang here too, so samplers
never change when they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .conditioning import Conditioning
from .schedules import DiscreteSchedule


class Interrupted(Exception):
    """Raised inside sampling when the user interrupts; the pipeline keeps what is finished."""


@dataclass
class ScheduledConditioning:
    """Conditions that change during sampling: ``[(end_step, cond), ...]``; step s uses the first
    entry with s <= end_step (A1111's prompt-editing rule)."""

    entries: list[tuple[int, Conditioning]]

    def at(self, step: int) -> Conditioning:
        for end, cond in self.entries:
            if step <= end:
                return cond
        return self.entries[-1][1]


class CFGDenoiser:
    def __init__(self, unet, schedule: DiscreteSchedule, prediction: str, cond: list[ScheduledConditioning],
                 uncond: list[ScheduledConditioning], cfg_scale: float, *, dtype: torch.dtype,
                 device: torch.device, add_time_ids: torch.Tensor | None = None,
                 should_stop: Callable[[], bool] | None = None, batch_invariant: bool = False):
        self.unet = unet
        self.schedule = schedule
        self.v_prediction = prediction == "v_prediction"
        self.cond, self.uncond = cond, uncond  # one schedule per image in the batch
        self.cfg_scale = cfg_scale
        self.dtype, self.device = dtype, device
        self.add_time_ids = add_time_ids
        self.should_stop = should_stop
        # One image per UNet call makes every image independent of its batch-mates, so an image
        # re-created alone from its infotext has the same pixels (batched GEMMs round differently).
        self.batch_invariant = batch_invariant
        self.step = 0

    def _unet(self, x: torch.Tensor, t: torch.Tensor, conds: list[Conditioning]) -> torch.Tensor:
        hidden = torch.cat([c.crossattn for c in conds]).to(self.device, self.dtype)
        extra = {}
        if self.add_time_ids is not None:
            pooled = torch.cat([c.pooled for c in conds]).to(self.device, self.dtype)
            extra["added_cond_kwargs"] = {"text_embeds": pooled,
                                          "time_ids": self.add_time_ids.repeat(len(conds), 1).to(self.device, self.dtype)}
        out = self.unet(x.to(self.dtype), t.to(self.device), encoder_hidden_states=hidden, **extra).sample
        return out.float()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted
        batch = x.shape[0]
        sigma = sigma.reshape(-1).expand(batch) if sigma.numel() == 1 else sigma
        s = sigma.float().to(x.device)[:, None, None, None]
        c_in = 1 / (s ** 2 + 1) ** 0.5
        t = self.schedule.sigma_to_t(sigma.float().cpu())
        conds = [c.at(self.step) for c in self.cond]
        unconds = [u.at(self.step) for u in self.uncond]
        x_in = (x * c_in).to(self.device)
        groups = [slice(i, i + 1) for i in range(batch)] if self.batch_invariant else [slice(0, batch)]
        outs_c, outs_u = [], []
        for g in groups:
            c, u, xg, tg = conds[g], unconds[g], x_in[g], t[g]
            if all(ci.crossattn.shape == ui.crossattn.shape for ci, ui in zip(c, u)):
                out = self._unet(torch.cat([xg, xg]), torch.cat([tg, tg]), c + u)
                n = xg.shape[0]
                outs_c.append(out[:n])
                outs_u.append(out[n:])
            else:  # different token lengths: run separately, as A1111 does without cond/uncond padding
                outs_c.append(self._unet(xg, tg, c))
                outs_u.append(self._unet(xg, tg, u))
        out_cond, out_uncond = torch.cat(outs_c), torch.cat(outs_u)
        out_cond, out_uncond = out_cond.to(x.device), out_uncond.to(x.device)
        if self.v_prediction:
            d_cond = x / (s ** 2 + 1) - out_cond * s / (s ** 2 + 1) ** 0.5
            d_uncond = x / (s ** 2 + 1) - out_uncond * s / (s ** 2 + 1) ** 0.5
        else:
            d_cond, d_uncond = x - out_cond * s, x - out_uncond * s
        self.step += 1
        return d_uncond + (d_cond - d_uncond) * self.cfg_scale
