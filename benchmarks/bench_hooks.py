"""Per-step cost of the hook machinery (sdstudio.engine.hooks) on the bundled demo model.

Three denoisers run the same Euler sampling (same UNet, conditioning, sigmas and noise) at 128²:

(a) a bare loop written here: the UNet call on [cond, uncond] and the CFG arithmetic, nothing else
    (what the denoiser did before the sampling plan and its hooks existed);
(b) the engine's CFGDenoiser with its SamplingPlan and no hooks;
(c) the same with three no-op hooks overriding every method (unet_inputs, combine, after_cfg, after_step).

Alternating repeats, median seconds per step; goals (b)/(a) <= 1.01 and (c)/(a) <= 1.03.
Usage: python benchmarks/bench_hooks.py [--size 128] [--steps 20] [--repeats 7] [--batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sdstudio.core.paths import Paths
from sdstudio.engine.conditioning import Conditioning
from sdstudio.engine.denoiser import CFGDenoiser, ComposedConditioning, ScheduledConditioning
from sdstudio.engine.generate import Engine
from sdstudio.engine.hooks import SamplingPlan, StepHook
from sdstudio.engine.samplers import sample_euler
from sdstudio.engine.schedules import get_sigmas

ROOT = Path(__file__).resolve().parents[1]


class NoOp(StepHook):
    def unet_inputs(self, call):
        return {}

    def combine(self, guidance):
        return None

    def after_cfg(self, guidance, denoised):
        return denoised

    def after_step(self, step, x):
        return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    engine = Engine(Paths(ROOT))
    _, model = engine.load("sdstudio-demo")
    unet, device, dtype = model.unet, engine.plan.device, engine.plan.dtype
    width = model.spec.text_encoders[0].config["hidden_size"]
    gen = torch.Generator().manual_seed(0)
    cond_t, uncond_t = (torch.randn(1, 77, width, generator=gen) for _ in range(2))
    cond = [ComposedConditioning([(ScheduledConditioning([(a.steps, Conditioning(cond_t))]), 1.0)])] * a.batch
    uncond = [ScheduledConditioning([(a.steps, Conditioning(uncond_t))])] * a.batch
    sigmas = get_sigmas("karras", a.steps, engine.schedule)
    shape = (a.batch, model.spec.unet["out_channels"], a.size // 8, a.size // 8)
    x0 = torch.randn(shape, generator=gen) * sigmas[0]
    cfg = 7.0
    hidden = torch.cat([cond_t, uncond_t]).to(device, dtype)

    def bare(x, sigma):  # one image per UNet call (the engine does so on the CPU: batch-invariant pixels)
        s = sigma.reshape(1).float()
        t = engine.schedule.sigma_to_t(s)
        out = []
        for i in range(x.shape[0]):
            x_in = (x[i:i + 1] / (s ** 2 + 1) ** 0.5).to(device)
            eps = unet(torch.cat([x_in, x_in]).to(dtype), torch.cat([t, t]).to(device),
                       encoder_hidden_states=hidden).sample.float()
            d_c, d_u = x[i] - eps[0] * s, x[i] - eps[1] * s
            out.append(d_u + (d_c - d_u) * cfg)
        return torch.stack(out)

    def plan(hooks):
        return CFGDenoiser(SamplingPlan(unet, engine.schedule, "epsilon", cond, uncond, cfg, dtype, device,
                                        steps=a.steps, batch_invariant=device.type == "cpu", hooks=hooks))

    def run(kind: str) -> float:
        if kind == "bare":
            model_fn, after = bare, None
        else:
            den = plan([] if kind == "plan" else [NoOp(), NoOp(), NoOp()])
            model_fn, after = den, den.after_step
        start = time.perf_counter()
        with torch.no_grad():
            out = sample_euler(model_fn, x0.clone(), sigmas, after_step=after)
        elapsed = time.perf_counter() - start
        run.outputs[kind] = out
        return elapsed / a.steps

    run.outputs = {}
    kinds = ("bare", "plan", "hooks")
    times = {k: [] for k in kinds}
    for k in kinds:  # warm-up
        run(k)
    for _ in range(a.repeats):
        for k in kinds:
            times[k].append(run(k))
    same = torch.equal(run.outputs["bare"], run.outputs["plan"]) and torch.equal(run.outputs["plan"],
                                                                                  run.outputs["hooks"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"demo model {a.size}², {a.steps} Euler steps, batch {a.batch}, {device}/{dtype}, "
          f"{torch.get_num_threads()} threads, {a.repeats} repeats; identical latents: {same}")
    for k in kinds:
        print(f"  {k:6s} {med[k] * 1000:8.2f} ms/step")
    print(f"ratio plan/bare  {med['plan'] / med['bare']:.4f}  (goal <= 1.01)")
    print(f"ratio hooks/bare {med['hooks'] / med['bare']:.4f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
