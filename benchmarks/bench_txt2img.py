"""Per-step time and peak memory of sdstudio's txt2img vs a plain diffusers StableDiffusionPipeline.

Same weights (a full-size SD 1.5-layout random checkpoint), same sampler (Euler / EulerDiscreteScheduler,
uniform "leading" timesteps), same size, CFG on, batch 1, float32 on the CPU (fp16 on CUDA): sdstudio runs
with ``--precision full`` here, like for like (its CPU bfloat16 default is measured by bench_bf16.py). Each side
runs in a fresh process, alternating which goes first, median of the repeats: per-step time = (T(steps_hi) - T(steps_lo)) / (steps_hi - steps_lo), which
cancels text encoding and VAE decoding; peak RSS is the process maximum.
It also times both loops inside one process (same memory state), which separates the cost of the
sampling loop from process-to-process variation. Goals: per-step ratio <= 1.05, peak RSS ratio <= 1.1.
Usage: python benchmarks/bench_txt2img.py [--size 256] [--lo 2] [--hi 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from common import config_folder, full_sd15, in_fresh_process

OURS = """
import time, json, resource, torch
from sdstudio.core.paths import DeviceOptions, Paths
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine.generate import Engine
engine = Engine(Paths({data!r}), DeviceOptions(precision={precision!r}))
req = Txt2ImgRequest(prompt="a red circle on a blue background", negative_prompt="blurry", sampler_name="Euler",
                     scheduler="Uniform", width={size}, height={size}, seed=1, cfg_scale=7)
engine.generate(req.replace(steps=1))  # load and warm up
times = {{}}
for steps in ({lo}, {hi}):
    t = time.perf_counter(); engine.generate(req.replace(steps=steps)); times[steps] = time.perf_counter() - t
print(json.dumps({{"per_step": (times[{hi}] - times[{lo}]) / ({hi} - {lo}),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

THEIRS = """
import time, json, resource, torch
from diffusers import StableDiffusionPipeline, EulerDiscreteScheduler
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
pipe = StableDiffusionPipeline.from_single_file({path!r}, config={config!r}, local_files_only=True, torch_dtype=dtype,
                                                safety_checker=None, requires_safety_checker=False).to(device)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
kw = dict(prompt="a red circle on a blue background", negative_prompt="blurry", width={size}, height={size},
          guidance_scale=7, generator=torch.Generator("cpu").manual_seed(1))
pipe(num_inference_steps=1, **kw)
times = {{}}
for steps in ({lo}, {hi}):
    t = time.perf_counter(); pipe(num_inference_steps=steps, **kw); times[steps] = time.perf_counter() - t
print(json.dumps({{"per_step": (times[{hi}] - times[{lo}]) / ({hi} - {lo}),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


SAME_PROCESS = """
import time, json, torch
from diffusers import StableDiffusionPipeline, EulerDiscreteScheduler
from sdstudio.core.paths import DeviceOptions, Paths
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine.generate import Engine
engine = Engine(Paths({data!r}), DeviceOptions(precision="full"))
req = Txt2ImgRequest(prompt="a red circle on a blue background", negative_prompt="blurry", sampler_name="Euler",
                     scheduler="Uniform", width={size}, height={size}, seed=1, cfg_scale=7)
engine.generate(req.replace(steps=1))
pipe = StableDiffusionPipeline.from_single_file({path!r}, config={config!r}, local_files_only=True,
                                                torch_dtype=engine.plan.dtype, safety_checker=None,
                                                requires_safety_checker=False).to(engine.plan.device)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
kw = dict(prompt="a red circle on a blue background", negative_prompt="blurry", width={size}, height={size},
          guidance_scale=7)
pipe(num_inference_steps=1, **kw)
def per_step(run):
    t = {{}}
    for n in ({lo}, {hi}):
        s = time.perf_counter(); run(n); t[n] = time.perf_counter() - s
    return (t[{hi}] - t[{lo}]) / ({hi} - {lo})
ours, theirs = [], []
for i in range({repeat}):  # alternate which loop runs first: neither gets the warmer allocator every time
    first, second = (ours, theirs) if i % 2 == 0 else (theirs, ours)
    for side in (first, second):
        if side is ours:
            ours.append(per_step(lambda n: engine.generate(req.replace(steps=n))))
        else:
            theirs.append(per_step(lambda n: pipe(num_inference_steps=n, **kw)))
print(json.dumps({{"ours": sorted(ours)[len(ours) // 2], "theirs": sorted(theirs)[len(theirs) // 2]}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--lo", type=int, default=2)
    parser.add_argument("--hi", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    path = full_sd15()
    data = Path(tempfile.mkdtemp())
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    (data / "models" / "Stable-diffusion" / path.name).symlink_to(path)
    fmt = {"size": args.size, "lo": args.lo, "hi": args.hi}
    ours, theirs = [], []
    for i in range(args.repeat):  # alternate which side runs first: page cache and memory state favour neither
        runs = [("ours", OURS.format(data=str(data), precision="full", **fmt)),
                ("theirs", THEIRS.format(path=str(path), config=str(config_folder(path)), **fmt))]
        for side, code in (runs if i % 2 == 0 else runs[::-1]):
            (ours if side == "ours" else theirs).append(in_fresh_process(code))
    same = in_fresh_process(SAME_PROCESS.format(data=str(data), path=str(path), config=str(config_folder(path)),
                                                repeat=args.repeat, **fmt))
    shutil.rmtree(data)
    o = statistics.median(r["per_step"] for r in ours)
    t = statistics.median(r["per_step"] for r in theirs)
    ro = statistics.median(r["peak_rss_mb"] for r in ours)
    rt = statistics.median(r["peak_rss_mb"] for r in theirs)
    result = {"size": args.size, "sdstudio_s_per_step": round(o, 3), "diffusers_s_per_step": round(t, 3),
              "step_ratio": round(o / t, 3), "sdstudio_peak_rss_mb": round(ro), "diffusers_peak_rss_mb": round(rt),
              "rss_ratio": round(ro / rt, 3), "same_process_sdstudio_s_per_step": round(same["ours"], 3),
              "same_process_diffusers_s_per_step": round(same["theirs"], 3),
              "same_process_step_ratio": round(same["ours"] / same["theirs"], 3)}
    print(json.dumps(result))
    print(f"per step at {args.size}x{args.size}: sdstudio {result['sdstudio_s_per_step']} s vs diffusers "
          f"{result['diffusers_s_per_step']} s -> ratio {result['step_ratio']} (goal <= 1.05); peak RSS "
          f"{result['sdstudio_peak_rss_mb']} MB vs {result['diffusers_peak_rss_mb']} MB -> ratio {result['rss_ratio']} "
          f"(goal <= 1.1)")
    print(f"per step, both in one process: sdstudio {result['same_process_sdstudio_s_per_step']} s vs diffusers "
          f"{result['same_process_diffusers_s_per_step']} s -> ratio {result['same_process_step_ratio']}")


if __name__ == "__main__":
    main()
