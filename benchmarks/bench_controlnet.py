"""Per-step cost of ControlNet units on the full-size SD 1.5 layout (random weights).

The engine's denoiser (CFGDenoiser over a SamplingPlan, as a job runs it) does Euler steps with 0, 1 and 3
ControlNet units (each a full-size SD 1.5 ControlNet: the UNet's encoder and middle block copied, as
``ControlNetModel.from_unet`` makes it), alternating repeats, median seconds per step.
Goals (issue 18): 1 unit <= 1.5x, 3 units <= 2.5x the step without.

Usage: python benchmarks/bench_controlnet.py [--size 256] [--steps 3] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from sdstudio.core import controlnet as cn
from sdstudio.engine.conditioning import Conditioning
from sdstudio.engine.controlnet import ControlHook, PreparedUnit
from sdstudio.engine.denoiser import CFGDenoiser, ComposedConditioning, ScheduledConditioning
from sdstudio.engine.devices import plan_devices
from sdstudio.engine.hooks import SamplingPlan
from sdstudio.engine.samplers import sample_euler
from sdstudio.engine.schedules import DiscreteSchedule, get_sigmas
from sdstudio.models.controlnet import ControlModel, ControlSpec
from sdstudio.testing.controlnet_files import controlnet_for
from sdstudio.testing.synthetic import unet_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: what the engine picks)")
    a = ap.parse_args()
    from sdstudio.core.paths import DeviceOptions

    plan_ = plan_devices(DeviceOptions(use_cpu=True) if a.device == "cpu" else None)
    device, dtype = plan_.device, plan_.dtype
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("sd1", "full")).eval()
    controls = [controlnet_for(unet, seed=i).to(device, dtype).eval() for i in range(3)]
    unet = unet.to(device, dtype)
    schedule = DiscreteSchedule()
    gen = torch.Generator().manual_seed(0)
    cond_t, uncond_t = (torch.randn(1, 77, 768, generator=gen) for _ in range(2))
    cond = [ComposedConditioning([(ScheduledConditioning([(a.steps, Conditioning(cond_t))]), 1.0)])]
    uncond = [ScheduledConditioning([(a.steps, Conditioning(uncond_t))])]
    sigmas = get_sigmas("karras", a.steps, schedule)
    x0 = torch.randn((1, 4, a.size // 8, a.size // 8), generator=gen) * sigmas[0]
    detected = np.random.default_rng(0).integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)

    def hooks(n: int):
        out = []
        for i in range(n):
            unit = cn.unit_from_dict({"enabled": True, "module": "none", "model": f"bench-{i}"})
            model = ControlModel(ControlSpec("controlnet", "sd1", "diffusers", {}, ""), controls[i], None, f"bench-{i}")
            out.append(ControlHook(PreparedUnit(i, unit, cn.Preprocessor("none"), detected, model), device, dtype,
                                   False))
        return out

    def run(n: int) -> float:
        den = CFGDenoiser(SamplingPlan(unet, schedule, "epsilon", cond, uncond, 7.0, dtype, device, steps=a.steps,
                                       batch_invariant=device.type == "cpu", hooks=hooks(n)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            sample_euler(den, x0.clone(), sigmas, after_step=den.after_step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / a.steps

    counts = (0, 1, 3)
    for n in counts:  # warm-up
        run(n)
    times = {n: [] for n in counts}
    for _ in range(a.repeats):
        for n in counts:
            times[n].append(run(n))
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"SD 1.5 full-size layout (random weights), {a.size}², Euler, CFG (cond + uncond), {device}/{dtype}, "
          f"{torch.get_num_threads()} threads, {a.repeats} repeats of {a.steps} steps")
    for n in counts:
        print(f"  {n} unit(s) {med[n]:8.3f} s/step  ratio {med[n] / med[0]:.3f}")
    print(f"goals: 1 unit <= 1.5 (got {med[1] / med[0]:.3f}), 3 units <= 2.5 (got {med[3] / med[0]:.3f})")


if __name__ == "__main__":
    main()
