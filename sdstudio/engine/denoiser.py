"""The denoiser the samplers call: ``D(x, sigma) -> denoised``.

It wraps the UNet with the model's parametrisation (epsilon or v), classifier-free guidance
(negative prompt and CFG scale) and everything that varies per step: prompt schedules give a
condition per step. Always-on scripts hook in through the sampling plan's per-step hooks
(:mod:`sdstudio.engine.hooks`), so samplers never change when they arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import Conditioning
from .flow import flow_c_in, flow_denoised, flow_timestep
from .hooks import Guidance, SamplingPlan, Step, UNetCall


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
    ``denoised = uncond + sum_i w_i * cfg * (cond_i - uncond)``, with the plan's hooks around it
    (:mod:`sdstudio.engine.hooks`)."""

    def __init__(self, plan: SamplingPlan):
        self.plan = plan
        self.step = 0  # counts denoiser calls, as A1111 does for prompt editing (Heun advances it twice)
        self.sampling_step = 0  # the sampler's step, advanced by ``after_step`` (hook windows use it)
        self.uncond_denoised: torch.Tensor | None = None  # the last call's unguided predictions (CFG++)

    @property
    def v_prediction(self) -> bool:
        return self.plan.prediction == "v_prediction"  # read per call: the refiner may have another

    def _step(self, sigma: torch.Tensor) -> Step:
        return Step(self.sampling_step, self.plan.steps, sigma, self.plan.pass_name)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, conds: list[Conditioning], owners: list[int],
              uncond: list[bool], step: Step) -> torch.Tensor:
        plan = self.plan
        hidden = torch.cat([c.crossattn for c in conds]).to(plan.device, plan.dtype)
        extra = {}
        if plan.add_time_ids is not None:
            pooled = torch.cat([c.pooled for c in conds]).to(plan.device, plan.dtype)
            negative = plan.add_time_ids if plan.add_time_ids_uncond is None else plan.add_time_ids_uncond
            time_ids = torch.cat([negative if u else plan.add_time_ids for u in uncond])
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(plan.device, plan.dtype)}
        elif plan.prediction == "flow":  # SD 3.x / Flux.1: the pooled text embedding, no size conditioning
            extra["added_cond_kwargs"] = {"text_embeds": torch.cat([c.pooled for c in conds]).to(plan.device, plan.dtype)}
        x, t = x.to(plan.dtype), t.to(plan.device)
        if plan.hooks:
            extra.update(plan.unet_inputs(UNetCall(x, t, hidden, owners, uncond, step, extra.get("added_cond_kwargs"))))
        return plan.unet(x, t, encoder_hidden_states=hidden, **extra).sample.float()

    def _model_outputs(self, x_in: torch.Tensor, t: torch.Tensor, images: range, step: Step):
        """UNet outputs for the given images: (per image [(output, weight)...], per image uncond output)."""
        conds, owners, weights = [], [], []
        for i in images:
            for sched, w in self.plan.cond[i].parts:
                conds.append(sched.at(self.step))
                owners.append(i)
                weights.append(w)
        conds = _pad_to_longest(conds)
        unconds = [self.plan.uncond[i].at(self.step) for i in images]
        xs_c = torch.stack([x_in[i] for i in owners])
        ts_c = torch.stack([t[i] for i in owners])
        xs_u, ts_u = x_in[images.start:images.stop], t[images.start:images.stop]
        mine = list(images)
        if all(c.crossattn.shape == unconds[0].crossattn.shape for c in conds + unconds):
            out = self._unet(torch.cat([xs_c, xs_u]), torch.cat([ts_c, ts_u]), conds + unconds, owners + mine,
                             [False] * len(conds) + [True] * len(mine), step)
            out_c, out_u = out[:len(conds)], out[len(conds):]
        else:  # different token lengths: run separately, as A1111 does without cond/uncond padding
            out_c = self._unet(xs_c, ts_c, conds, owners, [False] * len(conds), step)
            out_u = self._unet(xs_u, ts_u, unconds, mine, [True] * len(mine), step)
        per_image: dict[int, list] = {i: [] for i in images}
        for out, owner, w in zip(out_c, owners, weights):
            per_image[owner].append((out, w))
        return [per_image[i] for i in images], list(out_u)

    def _to_denoised(self, x: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.plan.prediction == "flow":
            return flow_denoised(x, out, s)
        if self.v_prediction:
            return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5
        return x - out * s

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan.should_stop is not None and plan.should_stop():
            raise Interrupted
        batch = x.shape[0]
        sigma = sigma.reshape(-1).expand(batch) if sigma.numel() == 1 else sigma
        if plan.switch is not None and plan.switch.due(sigma, self.step):
            plan.switch_model(plan.switch.target())
        s = sigma.float().to(x.device)[:, None, None, None]
        step = self._step(sigma)
        if plan.prediction == "flow":  # x_f = x / (1 + s) at flow time σ = s / (1 + s) (engine.flow)
            t = flow_timestep(sigma.float().cpu())
            x_in = (x * flow_c_in(s)).to(plan.device)
        else:
            t = plan.schedule.sigma_to_t(sigma.float().cpu())
            x_in = (x / (s ** 2 + 1) ** 0.5).to(plan.device)
        if plan.image_cond is not None:
            x_in = torch.cat([x_in, plan.image_cond.to(x_in.device, x_in.dtype)], dim=1)
        groups = [range(i, i + 1) for i in range(batch)] if plan.batch_invariant else [range(batch)]
        results, unguided = [], []
        for images in groups:
            conds, unconds = self._model_outputs(x_in, t, images, step)
            for i, parts, out_u in zip(images, conds, unconds):
                d_u = self._to_denoised(x[i], out_u.to(x.device), s[i])
                guidance = Guidance(x[i], s[i, 0, 0, 0], d_u,
                                    [(self._to_denoised(x[i], out_c.to(x.device), s[i]), w) for out_c, w in parts],
                                    plan.cfg_scale, step, i,
                                    lambda out, xi=x[i], si=s[i]: self._to_denoised(xi, out.to(xi.device), si))
                results.append(plan.combine(guidance) if plan.hooks else guidance.cfg())
                unguided.append(d_u)
        self.step += 1
        denoised = torch.stack(results)
        self.uncond_denoised = torch.stack(unguided)
        if plan.latent_mask is not None:
            denoised = plan.latent_mask.blend(denoised, s)
            self.uncond_denoised = plan.latent_mask.blend(self.uncond_denoised, s)
        return denoised

    def after_step(self, x: torch.Tensor, i: int, sigma: torch.Tensor) -> torch.Tensor:
        """Called by the sampler after step ``i``: the hooks' ``after_step``, then the next step begins."""
        if self.plan.hooks:
            x = self.plan.after_step(Step(i, self.plan.steps, sigma.reshape(-1), self.plan.pass_name), x)
        self.sampling_step = i + 1
        return x
