"""Euler and DPM++ 2M with CFG, for noise- and v-prediction, against diffusers' own schedulers.

Our side runs through the public API (``Engine.generate``); the reference is diffusers'
``StableDiffusionPipeline`` with ``EulerDiscreteScheduler`` / ``DPMSolverMultistepScheduler`` (or, where
the pipeline cannot compute what A1111 computes, that scheduler's ``step`` driven by hand over the same
UNet). Both start from the same noise (A1111's "CPU" RNG: ``torch.manual_seed(seed); torch.randn``), the
same prompt and negative prompt (diffusers encodes them itself: CLIP's last hidden state, as clip skip 1)
and CFG 5; the compared quantity is the final latent (the denoised estimate at the last step, where the
schedule reaches sigma 0; the hand-driven case also every step's denoised estimate), to 1e-4 of its
largest value.

A1111 vs diffusers, and how the comparison makes them compute the same thing:

- Schedules: A1111 spaces timesteps uniformly over 999..0 and reads sigmas off the training schedule by
  interpolating log-sigmas; diffusers' Euler ("linspace" spacing) interpolates sigma linearly. With 4 steps
  the timesteps are integers (999, 666, 333, 0), where both read the table itself. DPM-Solver's own
  "linspace" spacing (999, 749, 500, 250) is not A1111's, so the pipeline is given those 4 timesteps.
- Karras: same formula (rho 7, the training schedule's sigma min/max), final sigma 0 on both sides.
  A1111 feeds the UNet the fractional timestep of each sigma (k-diffusion's ``sigma_to_t``); diffusers'
  Euler does too, but DPM-Solver rounds it, so for DPM++ 2M Karras the reference drives
  ``DPMSolverMultistepScheduler.step`` by hand with diffusers' own unrounded ``_sigma_to_t``.
- Start: A1111 starts at ``noise * sigma_max`` in k-diffusion's space (x = x0 + sigma * eps); Euler's
  pipeline does the same (``init_noise_sigma``); DPM-Solver works on x / sqrt(1 + sigma^2) and starts at
  unit noise, so it is given ``noise * sigma_max / sqrt(1 + sigma_max^2)``, the same point.

The model is the shipped demo model at 64x64 (its ``v_pred`` key: v-prediction; beside it a hard link with
a ``.yaml`` saying eps, read as noise prediction). A random-weight UNet is no use here: with CFG 5 it is
chaotic (moving the start by 1e-6 moves the result of 4 steps by 0.5 %, and float32 vs float64 by 3 %), so
two correct implementations differ by more than any useful tolerance; the trained UNet is smooth (1e-6).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

DEMO = Path(__file__).parents[1] / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"
PROMPT, NEGATIVE = "a red circle on a blue background", "a green square"
SEED, STEPS, CFG, SIZE = 1234, 4, 5.0, 64
UNIFORM_TIMESTEPS = [999, 666, 333, 0]  # A1111's uniform schedule for 4 steps: linspace(999, 0, 4)
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
PREDICTIONS = {"epsilon": "demo-eps", "v_prediction": "demo-v"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine

    root = tmp_path_factory.mktemp("reference")
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    for name in PREDICTIONS.values():
        try:
            os.link(DEMO, folder / f"{name}.safetensors")
        except OSError:
            shutil.copy(DEMO, folder / f"{name}.safetensors")
    (folder / "demo-eps.yaml").write_text('model:\n  params:\n    parameterization: "eps"\n')
    return Engine(Paths(root), cache_size=2)


@pytest.fixture(scope="module")
def reference_models(engine):
    """Separate copies of the checkpoints (nothing shared with the engine's), read by our loader."""
    from sdstudio.models.loader import load_checkpoint

    models = {pred: load_checkpoint(engine.paths.data_dir / "models" / "Stable-diffusion" / f"{name}.safetensors")
              for pred, name in PREDICTIONS.items()}
    for pred, model in models.items():
        assert model.spec.prediction == pred
    return models


def ours(engine, prediction: str, sampler: str, schedule: str) -> list[torch.Tensor]:
    """Each step's denoised estimate from ``Engine.generate`` (the last one is the final latent)."""
    from sdstudio.core.params import Txt2ImgRequest

    estimates = []
    req = Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=CFG, width=SIZE,
                         height=SIZE, sampler_name=sampler, scheduler=schedule, rng="CPU",
                         model=PREDICTIONS[prediction])
    engine.generate(req, on_progress=lambda p: estimates.append(p.latent.detach().clone().float()))
    assert len(estimates) == STEPS
    return estimates


def start_noise() -> torch.Tensor:
    """A1111's "CPU" RNG: the torch CPU generator seeded with the image's seed."""
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(SEED))


def pipeline(model, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                   unet=model.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    assert err <= rel * scale, f"{what}: max difference {err:.3g} of {scale:.3g} (relative {err / scale:.2e})"


@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("schedule", ["Automatic", "Karras"])  # Euler's Automatic is Uniform
def test_euler_matches_diffusers_pipeline(engine, reference_models, prediction, schedule):
    from diffusers import EulerDiscreteScheduler

    model = reference_models[prediction]
    scheduler = EulerDiscreteScheduler(**BETAS, prediction_type=prediction, timestep_spacing="linspace",
                                       use_karras_sigmas=schedule == "Karras", final_sigmas_type="zero",
                                       steps_offset=1)  # steps_offset: only "leading" spacing reads it
    with torch.no_grad():
        want = pipeline(model, scheduler)(prompt=PROMPT, negative_prompt=NEGATIVE, latents=start_noise(),
                                          num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE,
                                          output_type="latent").images
    if schedule == "Automatic":
        assert scheduler.timesteps.tolist() == UNIFORM_TIMESTEPS
    assert float(scheduler.sigmas[-1]) == 0.0
    got = ours(engine, prediction, "Euler", schedule)[-1]
    assert_close(got, want, f"Euler {schedule}, {prediction}")


@pytest.mark.parametrize("prediction", list(PREDICTIONS))
def test_dpmpp_2m_uniform_matches_diffusers_pipeline(engine, reference_models, prediction):
    from diffusers import DPMSolverMultistepScheduler

    model = reference_models[prediction]
    scheduler = DPMSolverMultistepScheduler(**BETAS, prediction_type=prediction, algorithm_type="dpmsolver++",
                                            solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
                                            steps_offset=1)
    sigma_max = float(((1 - scheduler.alphas_cumprod[-1]) / scheduler.alphas_cumprod[-1]) ** 0.5)
    with torch.no_grad():
        want = pipeline(model, scheduler)(prompt=PROMPT, negative_prompt=NEGATIVE,
                                          latents=start_noise() * sigma_max / (1 + sigma_max ** 2) ** 0.5,
                                          timesteps=UNIFORM_TIMESTEPS, guidance_scale=CFG, height=SIZE, width=SIZE,
                                          output_type="latent").images
    assert float(scheduler.sigmas[-1]) == 0.0
    got = ours(engine, prediction, "DPM++ 2M", "Uniform")[-1]
    assert_close(got, want, f"DPM++ 2M Uniform, {prediction}")


@pytest.mark.parametrize("prediction", list(PREDICTIONS))
def test_dpmpp_2m_karras_matches_diffusers_scheduler_steps(engine, reference_models, prediction):
    """DPM++ 2M's Automatic schedule (Karras), every step: diffusers' ``step`` over the same UNet, with
    the CFG combination of the pipeline (uncond + scale * (cond - uncond) on the model output)."""
    from diffusers import DPMSolverMultistepScheduler

    model = reference_models[prediction]
    scheduler = DPMSolverMultistepScheduler(**BETAS, prediction_type=prediction, algorithm_type="dpmsolver++",
                                            solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
                                            use_karras_sigmas=True, steps_offset=1)
    scheduler.set_timesteps(STEPS)
    log_sigmas = np.log(((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt().numpy())
    pipe = pipeline(model, scheduler)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        sigma_max = float(scheduler.sigmas[0])
        x = start_noise() * sigma_max / (1 + sigma_max ** 2) ** 0.5  # DPM-Solver's sample: x / sqrt(1 + sigma^2)
        want = []
        for i, timestep in enumerate(scheduler.timesteps):
            t = float(scheduler._sigma_to_t(np.array(float(scheduler.sigmas[i])), log_sigmas))  # not rounded
            out = model.unet(torch.cat([x, x]), torch.tensor([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_uncond, out_cond = out.chunk(2)
            x = scheduler.step(out_uncond + CFG * (out_cond - out_uncond), timestep, x).prev_sample
            want.append(scheduler.model_outputs[-1].clone())  # this step's denoised estimate
    assert float(scheduler.sigmas[-1]) == 0.0
    got = ours(engine, prediction, "DPM++ 2M", "Automatic")
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, f"DPM++ 2M Karras, {prediction}, step {i}")
    assert_close(got[-1], x, f"DPM++ 2M Karras, {prediction}, final latent")


UNIPC_STEPS = 26  # A1111's UniPC runs one step per DDIM timestep: range(0, 1000, 1000 // 26) holds 27 of them


class FinalLatent:
    """A step hook keeping the sampler's latent after its last step (k-diffusion space, x = x0 + sigma * eps)."""

    def __new__(cls):
        from sdstudio.engine.hooks import StepHook

        class Keep(StepHook):
            latent = None

            def after_step(self, step, x):
                if step.index == step.steps - 1:
                    self.latent = x.detach().clone().float()
                return x

        return Keep()


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_diffusers_on_a1111s_own_grid(engine, reference_models, variant):
    """A1111's UniPC chooses its own noise levels: 27 steps uniform in UniPC's continuous time from timestep
    999 to 0, ending at sigma_min (no final denoising). With 27 steps they fall on whole timesteps (999, 962,
    ... 37, 0): diffusers' UniPC with "linspace" spacing and a sigma_min final step, the same grid."""
    from diffusers import UniPCMultistepScheduler

    from sdstudio.core.params import Txt2ImgRequest
    from sdstudio.engine.schedules import ddim_timesteps

    assert len(ddim_timesteps(UNIPC_STEPS)) == 27
    model = reference_models["epsilon"]
    scheduler = UniPCMultistepScheduler(**BETAS, solver_order=3, solver_type=variant, lower_order_final=True,
                                        predict_x0=True, timestep_spacing="linspace", final_sigmas_type="sigma_min")
    with torch.no_grad():
        want = pipeline(model, scheduler)(prompt=PROMPT, negative_prompt=NEGATIVE, latents=start_noise(),
                                          num_inference_steps=27, guidance_scale=CFG, height=SIZE, width=SIZE,
                                          output_type="latent").images
    assert scheduler.timesteps.tolist() == list(range(999, 0, -37))
    keep = FinalLatent()
    req = Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=UNIPC_STEPS, cfg_scale=CFG,
                         width=SIZE, height=SIZE, sampler_name="UniPC", rng="CPU", model=PREDICTIONS["epsilon"],
                         uni_pc_variant=variant)
    engine.generate(req, hooks=[keep])
    sigma_min = float(scheduler.sigmas[-1])
    assert sigma_min > 0.02
    assert_close(keep.latent / (1 + sigma_min ** 2) ** 0.5, want, f"UniPC {variant}, 27 steps")
