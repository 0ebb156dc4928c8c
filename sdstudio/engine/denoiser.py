"""The denoiser the samplers call: ``D(x, sigma) -> denoised``.

It wraps the UNet with the model's parametrisation (epsilon or v), classifier-free guidance
(negative prompt and CFG scale) and everything that varies per step: prompt schedules give a
condition per step. ControlNet units and other per-step inputs will hang here too, so samplers
never change when they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .conditioning import Conditioning
from .schedules import DiscreteSchedule

if TYPE_CHECKING:
    from .img2img import LatentMask


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


@dataclass
class ComposedConditioning:
    """One image's positive prompt: its AND parts, each with its weight (``a :1.2 AND b``)."""

    parts: list[tuple[ScheduledConditioning, float]]


def _pad_to_longest(conds: list[Conditioning]) -> list[Conditioning]:
    """AND parts of different token lengths are padded by repeating their last vector (A1111)."""
    longest = max(c.crossattn.shape[1] for c in conds)
    out = []
    for c in conds:
        missing = longest - c.crossattn.shape[1]
        if missing:
            c = Conditioning(torch.cat([c.crossattn, c.crossattn[:, -1:].repeat(1, missing, 1)], dim=1), c.pooled)
        out.append(c)
    return out


class CFGDenoiser:
    """Classifier-free guidance over composable, per-step conditions:
    ``denoised = uncond + sum_i w_i * cfg * (cond_i - uncond)``."""

    def __init__(self, unet, schedule: DiscreteSchedule, prediction: str, cond: list[ComposedConditioning],
                 uncond: list[ScheduledConditioning], cfg_scale: float, *, dtype: torch.dtype,
                 device: torch.device, add_time_ids: torch.Tensor | None = None,
                 should_stop: Callable[[], bool] | None = None, batch_invariant: bool = False,
                 image_cond: torch.Tensor | None = None,
                 latent_mask: LatentMask | None = None):
        self.unet = unet
        self.schedule = schedule
        self.v_prediction = prediction == "v_prediction"
        self.cond, self.uncond = cond, uncond  # one entry per image in the batch
        self.cfg_scale = cfg_scale
        self.dtype, self.device = dtype, device
        self.add_time_ids = add_time_ids
        self.should_stop = should_stop
        # One image per UNet call makes every image independent of its batch-mates, so an image
        # re-created alone from its infotext has the same pixels (batched GEMMs round differently).
        self.batch_invariant = batch_invariant
        # 9-channel inpainting UNets: mask + masked-image latent, concatenated to the UNet input
        self.image_cond = image_cond
        # inpainting: blends each prediction with the original latent where the mask keeps it
        self.latent_mask = latent_mask
        self.step = 0  # counts denoiser calls, as A1111 does (second-order samplers advance it twice)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, conds: list[Conditioning]) -> torch.Tensor:
        hidden = torch.cat([c.crossattn for c in conds]).to(self.device, self.dtype)
        extra = {}
        if self.add_time_ids is not None:
            pooled = torch.cat([c.pooled for c in conds]).to(self.device, self.dtype)
            extra["added_cond_kwargs"] = {"text_embeds": pooled,
                                          "time_ids": self.add_time_ids.repeat(len(conds), 1).to(self.device, self.dtype)}
        out = self.unet(x.to(self.dtype), t.to(self.device), encoder_hidden_states=hidden, **extra).sample
        return out.float()

    def _model_outputs(self, x_in: torch.Tensor, t: torch.Tensor, images: range):
        """UNet outputs for the given images: (per image [(output, weight)...], per image uncond output)."""
        conds, owners, weights = [], [], []
        for i in images:
            for sched, w in self.cond[i].parts:
                conds.append(sched.at(self.step))
                owners.append(i)
                weights.append(w)
        conds = _pad_to_longest(conds)
        unconds = [self.uncond[i].at(self.step) for i in images]
        xs_c = torch.stack([x_in[i] for i in owners])
        ts_c = torch.stack([t[i] for i in owners])
        xs_u, ts_u = x_in[images.start:images.stop], t[images.start:images.stop]
        if all(c.crossattn.shape == unconds[0].crossattn.shape for c in conds + unconds):
            out = self._unet(torch.cat([xs_c, xs_u]), torch.cat([ts_c, ts_u]), conds + unconds)
            out_c, out_u = out[:len(conds)], out[len(conds):]
        else:  # different token lengths: run separately, as A1111 does without cond/uncond padding
            out_c, out_u = self._unet(xs_c, ts_c, conds), self._unet(xs_u, ts_u, unconds)
        per_image: dict[int, list] = {i: [] for i in images}
        for out, owner, w in zip(out_c, owners, weights):
            per_image[owner].append((out, w))
        return [per_image[i] for i in images], list(out_u)

    def _to_denoised(self, x: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.v_prediction:
            return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5
        return x - out * s

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted
        batch = x.shape[0]
        sigma = sigma.reshape(-1).expand(batch) if sigma.numel() == 1 else sigma
        s = sigma.float().to(x.device)[:, None, None, None]
        t = self.schedule.sigma_to_t(sigma.float().cpu())
        x_in = (x / (s ** 2 + 1) ** 0.5).to(self.device)
        if self.image_cond is not None:
            x_in = torch.cat([x_in, self.image_cond.to(x_in.device, x_in.dtype)], dim=1)
        groups = [range(i, i + 1) for i in range(batch)] if self.batch_invariant else [range(batch)]
        results = []
        for images in groups:
            conds, unconds = self._model_outputs(x_in, t, images)
            for i, parts, out_u in zip(images, conds, unconds):
                d_u = self._to_denoised(x[i], out_u.to(x.device), s[i])
                d = d_u.clone()
                for out_c, w in parts:
                    d += (self._to_denoised(x[i], out_c.to(x.device), s[i]) - d_u) * (w * self.cfg_scale)
                results.append(d)
        self.step += 1
        denoised = torch.stack(results)
        if self.latent_mask is not None:
            denoised = self.latent_mask.blend(denoised, s)
        return denoised
