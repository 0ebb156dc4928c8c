"""The denoiser the samplers call: ``D(x, sigma) -> denoised``.

It wraps the UNet with the model's parametrisation (epsilon or v), classifier-free guidance
(negative prompt and CFG scale) and everything that varies per step: prompt schedules give a
condition per step. Always-on scripts hook in through the sampling plan's per-step hooks
(:mod:`sdstudio.engine.hooks`), so samplers never change when they arrive.

A1111's two guidance speed options (:class:`SpeedOptions`) act here, as in A1111's
``sd_samplers_cfg_denoiser``, and our DeepCache-style feature reuse (:mod:`sdstudio.engine.deepcache`):

- "Negative Guidance minimum sigma" (``s_min_uncond``, infotext ``NGMS``): at a denoiser call whose first
  image's sigma is below it, and whose call count (Heun's two calls a step count twice) is odd, the
  negative prompt's UNet pass is skipped; with "all steps" (``s_min_uncond_all``) every such call skips
  it. The first AND part's prediction stands in for the unconditioned one and guidance runs at scale 1,
  so a call with one prompt part gives that part's prediction;
- "Pad prompt/negative prompt" (``pad_cond_uncond``, infotext ``Pad conds``): when the prompt and the
  negative prompt encode to different token lengths (75-token chunks), the shorter side is padded with
  chunks of the empty prompt's encoding so both go through the UNet in one batch; the "v0" variant
  (``pad_cond_uncond_v0``, A1111's DDIM/PLMS padding before 1.6) pads the negative prompt by repeating
  its last vector, or cuts it to the prompt's length. Without either, the two run as separate UNet calls;
- DeepCache (``deepcache_interval``, ours): every N-th denoiser call runs the whole UNet, the calls between
  reuse its deep features and run only the outer level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import Conditioning
from .deepcache import DeepCache
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


@dataclass(frozen=True)
class SpeedOptions:
    """The speed options of one sampling pass (see the module's docstring)."""

    s_min_uncond: float = 0.0  # "Negative Guidance minimum sigma"; 0: off
    s_min_uncond_all: bool = False  # skip at every call below it, not every other one
    pad_cond_uncond: bool = False
    pad_cond_uncond_v0: bool = False  # wins over pad_cond_uncond, as in A1111
    empty: Conditioning | None = None  # the empty prompt's encoding (pad_cond_uncond's filler)
    empty_after_switch: Conditioning | None = None  # the refiner's, once it takes over
    deepcache_interval: int = 0  # the whole UNet every N-th denoiser call, the outer level in between; 0/1: off

    def skips_uncond(self, call: int, sigma: float) -> bool:
        """A1111's rule: odd denoiser calls (or all of them) below ``s_min_uncond`` skip the negative pass."""
        return self.s_min_uncond > 0 and bool(call % 2 or self.s_min_uncond_all) and sigma < self.s_min_uncond


def _with_crossattn(c: Conditioning, crossattn: torch.Tensor) -> Conditioning:
    return Conditioning(crossattn, c.pooled)


def pad_cond_uncond(conds: list[Conditioning], unconds: list[Conditioning], empty: Conditioning
                    ) -> tuple[list[Conditioning], list[Conditioning], bool]:
    """A1111's "Pad prompt/negative prompt": the shorter side gets as many chunks of the empty prompt's
    encoding as its length lacks (whole chunks: lengths are multiples of 77). Returns (conds, unconds,
    whether anything was padded)."""
    chunk = empty.crossattn.shape[1]
    repeats = (conds[0].crossattn.shape[1] - unconds[0].crossattn.shape[1]) // chunk

    def padded(cs: list[Conditioning], n: int) -> list[Conditioning]:
        filler = empty.crossattn.repeat(1, n, 1)
        return [_with_crossattn(c, torch.cat([c.crossattn, filler.to(c.crossattn)], dim=1)) for c in cs]

    if repeats < 0:
        return padded(conds, -repeats), unconds, True
    if repeats > 0:
        return conds, padded(unconds, repeats), True
    return conds, unconds, False


def pad_cond_uncond_v0(conds: list[Conditioning], unconds: list[Conditioning]
                       ) -> tuple[list[Conditioning], list[Conditioning], bool]:
    """A1111's "Pad prompt/negative prompt (v0)": the negative prompt is brought to the prompt's length by
    repeating its last vector, or cut to it when longer; the prompt is never changed."""
    length = conds[0].crossattn.shape[1]
    out = []
    for u in unconds:
        have = u.crossattn.shape[1]
        if have < length:
            u = _with_crossattn(u, torch.cat([u.crossattn, u.crossattn[:, -1:].repeat(1, length - have, 1)], dim=1))
        elif have > length:
            u = _with_crossattn(u, u.crossattn[:, :length])
        out.append(u)
    return conds, out, any(u.crossattn.shape[1] != length for u in unconds)


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

    def __init__(self, plan: SamplingPlan, options: SpeedOptions | None = None):
        self.plan = plan
        self.options = options or SpeedOptions()
        self.step = 0  # counts denoiser calls, as A1111 does for prompt editing (Heun advances it twice)
        self.sampling_step = 0  # the sampler's step, advanced by ``after_step`` (hook windows use it)
        self.uncond_denoised: torch.Tensor | None = None  # the last call's unguided predictions (CFG++)
        self._empty = self.options.empty
        self.deepcache = DeepCache(self.options.deepcache_interval) if self.options.deepcache_interval > 1 else None
        self._slot = 0  # UNet calls so far in this denoiser call (DeepCache keeps features per place)
        # for the infotext, as A1111 records them: whether the last call padded ("Pad conds" / "Pad conds
        # v0"), and whether any call skipped the negative pass under "NGMS all steps"
        self.padded = self.padded_v0 = False
        self.skipped_all_steps = False

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
            hidden = extra.pop("encoder_hidden_states", hidden)
        if self.deepcache is not None:
            self._slot += 1
            return self.deepcache(plan.unet, self.step, self._slot, x, t, hidden, **extra).sample.float()
        return plan.unet(x, t, encoder_hidden_states=hidden, **extra).sample.float()

    def _pad(self, conds: list[Conditioning], unconds: list[Conditioning]):
        """A1111's cond/uncond padding, when one of its options is on and the token lengths differ."""
        opts = self.options
        if conds[0].crossattn.shape[1] == unconds[0].crossattn.shape[1]:
            return conds, unconds
        if opts.pad_cond_uncond_v0:
            conds, unconds, self.padded_v0 = pad_cond_uncond_v0(conds, unconds)
        elif opts.pad_cond_uncond and self._empty is not None and \
                self._empty.crossattn.shape[-1] == conds[0].crossattn.shape[-1]:
            conds, unconds, self.padded = pad_cond_uncond(conds, unconds, self._empty)
        return conds, unconds

    def _model_outputs(self, x_in: torch.Tensor, t: torch.Tensor, images: range, step: Step, skip_uncond: bool = False):
        """UNet outputs for the given images: (per image [(output, weight)...], per image uncond output).
        With ``skip_uncond`` the negative prompt is not evaluated: each image's first part stands in for it."""
        conds, owners, weights = [], [], []
        for i in images:
            for sched, w in self.plan.cond[i].parts:
                conds.append(sched.at(self.step))
                owners.append(i)
                weights.append(w)
        conds = _pad_to_longest(conds)
        unconds = [self.plan.uncond[i].at(self.step) for i in images]
        conds, unconds = self._pad(conds, unconds)
        xs_c = torch.stack([x_in[i] for i in owners])
        ts_c = torch.stack([t[i] for i in owners])
        xs_u, ts_u = x_in[images.start:images.stop], t[images.start:images.stop]
        mine = list(images)
        if skip_uncond:
            out_c = self._unet(xs_c, ts_c, conds, owners, [False] * len(conds), step)
            out_u = torch.stack([out_c[owners.index(i)] for i in mine])  # A1111's stand-in: the first part
        elif all(c.crossattn.shape == unconds[0].crossattn.shape for c in conds + unconds):
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
            self._empty = self.options.empty_after_switch
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
        skip_uncond = self.options.skips_uncond(self.step, float(sigma[0]))
        self._slot = 0
        self.padded = self.padded_v0 = False
        self.skipped_all_steps |= skip_uncond and self.options.s_min_uncond_all
        results, unguided = [], []
        for images in groups:
            conds, unconds = self._model_outputs(x_in, t, images, step, skip_uncond)
            for i, parts, out_u in zip(images, conds, unconds):
                d_u = self._to_denoised(x[i], out_u.to(x.device), s[i])
                guidance = Guidance(x[i], s[i, 0, 0, 0], d_u,
                                    [(self._to_denoised(x[i], out_c.to(x.device), s[i]), w) for out_c, w in parts],
                                    1.0 if skip_uncond else plan.cfg_scale, step, i,
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
