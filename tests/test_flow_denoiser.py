"""The engine's CFGDenoiser with prediction "flow" (SD 3.x / Flux.1) against diffusers' own pipelines on the
same tiny random-weight components, noise and sigmas."""

from __future__ import annotations

import pytest
import torch
from test_flow import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    _noise,
    _sd3_pipeline,
    _vae,
    make_flux_parts,
    make_sd3_parts,
)

from sdstudio.engine.denoiser import CFGDenoiser, ComposedConditioning, ScheduledConditioning
from sdstudio.engine.flow import (
    FlowConditioner,
    FlowSchedule,
    FlowTextEncoders,
    FluxCall,
    SD3Call,
    flow_timestep,
    pack_latents,
    t5_tokenizer,
    unpack_latents,
)
from sdstudio.engine.hooks import SamplingPlan
from sdstudio.engine.samplers import SAMPLER_FUNCTIONS
from sdstudio.models.loader import clip_tokenizer


def run(call, schedule, cond, uncond, cfg, sigmas, noise, batch_invariant=False):
    plan = SamplingPlan(call, schedule, "flow", [ComposedConditioning([(ScheduledConditioning([(10**9, cond)]), 1.0)])],
                        [ScheduledConditioning([(10**9, uncond)])], cfg, torch.float32, torch.device("cpu"),
                        steps=len(sigmas) - 1, batch_invariant=batch_invariant)
    d = CFGDenoiser(plan)
    return SAMPLER_FUNCTIONS["euler"](d, noise * sigmas[0], sigmas, after_step=d.after_step)


@pytest.mark.parametrize("batch_invariant", [False, True])
@torch.no_grad()
def test_sd3_denoiser_matches_the_sd3_pipeline(batch_invariant):
    parts = make_sd3_parts()
    clip_l, clip_g, t5, tr = parts
    c = FlowConditioner(FlowTextEncoders("sd3", clip_l, clip_g, t5), torch.device("cpu"))
    prompt, cfg, steps = "a photo of a cat, oil painting", 4.5, 8
    sched = FlowSchedule(3.0)
    sigmas = sched.sigmas_for("uniform", steps)
    noise = _noise(1)
    fs = flow_timestep(sigmas.double()).float()
    ref = _sd3_pipeline(parts)(prompt, negative_prompt="", num_inference_steps=steps, sigmas=fs[:-1].tolist(),
                               guidance_scale=cfg, latents=noise * fs[0], output_type="latent", height=8, width=8,
                               max_sequence_length=77).images
    ours = run(SD3Call(tr), sched, c.encode(prompt), c.encode(""), cfg, sigmas, noise, batch_invariant)
    assert (ours - ref).abs().max() < 5e-4  # measured 1.5e-4: float32 cancellation in the first step (s0 = 9999)


@torch.no_grad()
def test_flux_denoiser_matches_the_flux_pipeline_with_and_without_true_cfg():
    clip_l, t5, tr = make_flux_parts()
    c = FlowConditioner(FlowTextEncoders("flux", clip_l, t5=t5, t5_tokens=512), torch.device("cpu"))
    prompt, steps = "a photo of a cat, oil painting", 8
    sched = FlowSchedule.flux(64, 64)
    sigmas = sched.sigmas_for("simple", steps)
    noise = _noise(2)
    cond = c.encode(prompt)
    fs = flow_timestep(sigmas.double()).float()
    pipe = FluxPipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(),
                        text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer())
    common = {"num_inference_steps": steps, "sigmas": fs[:-1].tolist(), "guidance_scale": 3.5,
              "latents": pack_latents(noise * fs[0]), "output_type": "latent", "height": 8, "width": 8,
              "max_sequence_length": 512}
    ours = run(FluxCall(tr, 3.5), sched, cond, c.encode(""), 1.0, sigmas, noise)
    ref = unpack_latents(pipe(prompt, **common).images, 8, 8)
    assert (ours - ref).abs().max() < 5e-4
    ours = run(FluxCall(tr, 3.5), sched, cond, c.encode("blurry"), 2.0, sigmas, noise)
    ref = unpack_latents(pipe(prompt, negative_prompt="blurry", true_cfg_scale=2.0, **common).images, 8, 8)
    assert (ours - ref).abs().max() < 5e-4
