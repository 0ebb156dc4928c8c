"""The CPU's bfloat16 path against float32, and against bare diffusers in float32, in one run.

Rows (each side in a fresh process, per-step time = (T(hi) - T(lo)) / (hi - lo), which cancels text
encoding and VAE decoding):
- a full-size SD 1.5-layout random checkpoint at 512² (and ``--small`` size): sdstudio bfloat16 (the
  default on CPUs with avx512_bf16 / amx_bf16), sdstudio ``--precision full``, diffusers float32.
  Goal: <= 2.5 s a step at 512² on the project's 2-core machine, >= 3x diffusers float32.
- the bundled demo model at its own size (128²): bfloat16 vs float32 per step, and the quality harness's
  attribute accuracy in both precisions (goal: within 1 point).
- the VAE decode of a 512² picture in float32 and bfloat16: time and the PSNR between them (the VAE runs in
  bfloat16 by default on such CPUs, float32 with ``--no-half-vae``).
``--cpu-time`` times each side by its process's CPU time (run with OMP_NUM_THREADS=1): a fair figure
when other work shares the cores, which wall time is not.
Usage: python benchmarks/bench_bf16.py [--size 512] [--small 128] [--lo 1] [--hi 3] [--n 60] [--skip-quality]
       [--cpu-time]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from bench_txt2img import OURS, THEIRS
from common import config_folder, demo_data_root, full_sd15, in_fresh_process

DEMO = """
import time, json, torch
from sdstudio.core.paths import DeviceOptions, Paths
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine.generate import Engine
engine = Engine(Paths({data!r}), DeviceOptions(precision={precision!r}))
req = Txt2ImgRequest(prompt="a red circle on a blue background", negative_prompt="blurry", sampler_name="Euler",
                     scheduler="Uniform", width=128, height=128, seed=1, cfg_scale=7)
engine.generate(req.replace(steps=1))
best = {{}}
for _ in range(3):
    for steps in ({lo}, {hi}):
        t = time.perf_counter(); engine.generate(req.replace(steps=steps)); d = time.perf_counter() - t
        best[steps] = min(best.get(steps, d), d)
print(json.dumps({{"per_step": (best[{hi}] - best[{lo}]) / ({hi} - {lo}), "dtype": str(engine.plan.dtype)}}))
"""

QUALITY = """
import json, types
from sdstudio.core.paths import DeviceOptions, Paths
from sdstudio.engine.generate import Engine
from sdstudio.eval import __main__ as ev, harness
engine = Engine(Paths({data!r}), DeviceOptions(precision={precision!r}))
args = types.SimpleNamespace(steps=20, sampler="Euler a", cfg=7.0, size=128, model=engine.registry.checkpoint(None).name)
reader = harness.load()
items = harness.prompt_set({n})
pictures = [ev._generate(engine, p.prompt, p.seed, args) for p in items]
acc = harness.attribute_accuracy(harness.read(reader, pictures)[0], [p.scene for p in items])
print(json.dumps({{"accuracy": acc["mean"]}}))
"""

VAE = """
import time, json, torch
from sdstudio.models.loader import load_checkpoint
vae = load_checkpoint({path!r}, torch.float32).vae
latent = torch.randn(1, 4, {size} // 8, {size} // 8, generator=torch.Generator().manual_seed(0))
out = {{}}
for dtype in (torch.float32, torch.bfloat16):
    v = vae.to(dtype)
    with torch.inference_mode():
        v.decode(latent.to(dtype))
        t = time.perf_counter(); img = v.decode(latent.to(dtype)).sample.float(); out[str(dtype)] = time.perf_counter() - t
    out["img_" + str(dtype)] = img
a, b = ((out.pop("img_" + k).clamp(-1, 1) + 1) * 127.5 for k in ("torch.float32", "torch.bfloat16"))
mse = ((a - b) ** 2).mean().item()
print(json.dumps({{"fp32_s": out["torch.float32"], "bf16_s": out["torch.bfloat16"],
                  "psnr_db": 10 * __import__("math").log10(255 ** 2 / max(mse, 1e-12))}}))
"""


def clocked(code: str, cpu_time: bool) -> str:
    return code.replace("time.perf_counter()", "time.process_time()") if cpu_time else code


def per_step(data: Path, path: Path, size: int, lo: int, hi: int, repeat: int, cpu_time: bool) -> dict[str, float]:
    fmt = {"size": size, "lo": lo, "hi": hi}
    runs = {"bf16": OURS.format(data=str(data), precision="autocast", **fmt),
            "fp32": OURS.format(data=str(data), precision="full", **fmt),
            "diffusers": THEIRS.format(path=str(path), config=str(config_folder(path)), **fmt)}
    got: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeat):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            got[name].append(in_fresh_process(clocked(runs[name], cpu_time))["per_step"])
    return {k: statistics.median(v) for k, v in got.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--small", type=int, default=128)
    parser.add_argument("--lo", type=int, default=1)
    parser.add_argument("--hi", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--n", type=int, default=60, help="harness prompts per precision")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time (one thread each)")
    args = parser.parse_args()
    path = full_sd15()
    data = Path(tempfile.mkdtemp())
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    (data / "models" / "Stable-diffusion" / path.name).symlink_to(path)
    result: dict[str, object] = {}
    for size in (args.size, args.small):
        r = per_step(data, path, size, args.lo, args.hi, args.repeat, args.cpu_time)
        result[f"sd15_{size}"] = {k: round(v, 3) for k, v in r.items()} | {
            "bf16_vs_fp32": round(r["fp32"] / r["bf16"], 2), "bf16_vs_diffusers_fp32": round(r["diffusers"] / r["bf16"], 2)}
        print(f"SD 1.5 layout {size}²: bf16 {r['bf16']:.2f} s/step, float32 {r['fp32']:.2f}, diffusers float32 "
              f"{r['diffusers']:.2f} -> bf16 is {r['fp32'] / r['bf16']:.2f}x our float32 and "
              f"{r['diffusers'] / r['bf16']:.2f}x diffusers", flush=True)
    shutil.rmtree(data)
    demo = demo_data_root(Path(tempfile.mkdtemp()))
    # "half" forces bfloat16 (autocast keeps this narrow UNet in float32, the "autocast" row)
    d = {p: in_fresh_process(clocked(DEMO.format(data=str(demo), precision=p, lo=args.lo + 4, hi=args.hi + 8),
                                     args.cpu_time))["per_step"] for p in ("half", "full", "autocast")}
    result["demo_128"] = {"bf16": round(d["half"], 4), "fp32": round(d["full"], 4), "autocast": round(d["autocast"], 4),
                          "bf16_vs_fp32": round(d["full"] / d["half"], 2)}
    print(f"demo model 128²: bf16 {d['half']:.3f} s/step, float32 {d['full']:.3f} -> {d['full'] / d['half']:.2f}x; "
          f"the default (autocast keeps it float32) {d['autocast']:.3f}", flush=True)
    if not args.skip_quality:
        q = {p: in_fresh_process(QUALITY.format(data=str(demo), precision=p, n=args.n))["accuracy"]
             for p in ("half", "full")}
        result["demo_quality"] = {"bf16": round(100 * q["half"], 1), "fp32": round(100 * q["full"], 1)}
        print(f"demo model harness accuracy ({args.n} prompts): bf16 {100 * q['half']:.1f} %, float32 "
              f"{100 * q['full']:.1f} % -> {100 * (q['half'] - q['full']):+.1f} points (goal: within 1)", flush=True)
    shutil.rmtree(demo)
    v = in_fresh_process(clocked(VAE.format(path=str(path), size=args.size), args.cpu_time))
    result["vae_decode"] = {k: round(x, 3) for k, x in v.items()}
    print(f"VAE decode {args.size}²: float32 {v['fp32_s']:.2f} s, bf16 {v['bf16_s']:.2f} s, PSNR between them "
          f"{v['psnr_db']:.1f} dB", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
