"""A1111's speed options measured: what each costs in quality on the harness and what it saves in time.

``--unet``: seconds per sampling step (one CFG denoiser call) of the full-size SD 1.5-layout random UNet at
512² (a 64×64 latent), float32 on this machine: plain CFG (prompt and negative prompt in one batch of 2),
a DeepCache shallow call, token merging at 0.3 and 0.5, a call whose negative pass NGMS skips (batch 1),
and a prompt / negative prompt of different lengths run as two calls (unpadded) or as one padded batch. The variants are timed
interleaved, ``--reps`` rounds, median per variant; the ratios to plain CFG are what to read (the machine
is shared).

``--quality``: the quality harness (:mod:`sdstudio.eval.harness`) on the demo model: ``--n`` prompts x
seeds at 128², 20 steps, Euler a, CFG 7, per option: attribute accuracy, Fréchet distance of the reader's
features to the renderer's, mean pixel change from the plain picture (of 255), time per picture as a ratio
to the plain run (the long-prompt rows: to the unpadded long prompt).
Usage: python benchmarks/bench_speed_options.py [--unet] [--quality] [--reps 3] [--n 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import demo_data_root, full_sd15


def unet_rows(reps: int) -> list[tuple[str, float, float]]:
    from sdstudio.engine.deepcache import DeepCache
    from sdstudio.engine.tome import TokenMerging
    from sdstudio.models.loader import load_checkpoint

    unet = load_checkpoint(full_sd15(), dtype=torch.float32).unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    t = torch.full((2,), 500.0)
    short, long = torch.randn(2, 77, 768, generator=g), torch.randn(2, 154, 768, generator=g)

    def call(rows: int, hidden: torch.Tensor):
        unet(x[:rows], t[:rows], encoder_hidden_states=hidden[:rows])

    def tome(ratio: float):
        def run():
            with TokenMerging(ratio).applied(unet):
                call(2, short)
        return run

    cache = DeepCache(2)
    with torch.no_grad():
        cache(unet, 0, 1, x, t, short)  # keeps the deep features

    variants = {
        "plain CFG (batch 2, 77 tokens)": lambda: call(2, short),
        "DeepCache shallow call (batch 2)": lambda: cache(unet, 1, 1, x, t, short),
        "token merging 0.3": tome(0.3),
        "token merging 0.5": tome(0.5),
        "NGMS-skipped call (batch 1)": lambda: call(1, short),
        "77 / 154 tokens, unpadded (two calls)": lambda: (call(1, short), call(1, long)),
        "77 / 154 tokens, Pad conds (batch 2, 154)": lambda: call(2, long),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        call(1, short)  # warm-up
        for _ in range(reps):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain CFG (batch 2, 77 tokens)"])
    return [(name, statistics.median(v), statistics.median(v) / base) for name, v in times.items()]


QUALITY = {
    "plain": {},
    "NGMS 1.0 (every other call below sigma 1)": {"s_min_uncond": 1.0},
    "NGMS 1.0, all steps": {"s_min_uncond": 1.0, "s_min_uncond_all": True},
    "NGMS 3.0, all steps": {"s_min_uncond": 3.0, "s_min_uncond_all": True},
    "token merging 0.3": {"token_merging_ratio": 0.3},
    "token merging 0.5": {"token_merging_ratio": 0.5},
    "DeepCache interval 2": {"deepcache_interval": 2},
    "DeepCache interval 3": {"deepcache_interval": 3},
    # a prompt of two 75-token chunks against the empty negative prompt's one: two UNet calls, or one padded
    "long prompt, unpadded": {"long": True},
    "long prompt, Pad conds": {"long": True, "pad_cond_uncond": True},
}


def _long(caption: str) -> str:
    return ", ".join([caption] * 10)  # ~90 tokens: two chunks


def quality_rows(n: int) -> list[tuple[str, str, str, str, str]]:
    """Pictures are made prompt by prompt, every option in turn, so a busy machine slows them all alike."""
    from sdstudio.core.params import Txt2ImgRequest
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.eval import harness, shapes

    reader = harness.load()
    items = harness.prompt_set(n)
    scenes = [p.scene for p in items]
    _, render_feats = harness.read(reader, [shapes.render(s, 128) for s in scenes])
    pictures: dict[str, list] = {name: [] for name in QUALITY}
    seconds: dict[str, float] = dict.fromkeys(QUALITY, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Paths(demo_data_root(Path(tmp))))
        for i, p in enumerate(items):
            for name, kw in QUALITY.items():
                kw = dict(kw)
                prompt = _long(p.prompt) if kw.pop("long", False) else p.prompt
                req = Txt2ImgRequest(prompt=prompt, seed=p.seed, steps=20, sampler_name="Euler a", cfg_scale=7.0,
                                     width=128, height=128, **kw).validate()
                start = time.perf_counter()
                pictures[name].append(engine.txt2img(req).images[0].image)
                seconds[name] += time.perf_counter() - start
            if i % 10 == 0:
                print(f"prompt {i + 1}/{n}", flush=True)
    rows = []
    for name, images in pictures.items():
        predicted, feats = harness.read(reader, images)
        acc = harness.attribute_accuracy(predicted, scenes)["mean"]
        fd = harness.frechet_distance(feats, render_feats)
        ref = pictures["long prompt, unpadded" if name.startswith("long") else "plain"]
        change = float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                                for a, b in zip(images, ref)]))
        ratio = seconds[name] / seconds["long prompt, unpadded" if name.startswith("long") else "plain"]
        rows.append((name, f"{100 * acc:.1f} %", f"{fd:.0f}", f"{change:.1f}", f"{ratio:.2f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    if not (args.unet or args.quality):
        args.unet = args.quality = True
    print(f"torch threads: {torch.get_num_threads()}")
    if args.quality:
        rows = quality_rows(args.n)
        print("| option | accuracy | Fréchet distance | pixel change | time ratio |\n| --- | --- | --- | --- | --- |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    if args.unet:
        print("| full SD 1.5 UNet, 512², float32 | s / step | ratio to plain CFG |\n| --- | --- | --- |")
        for name, seconds, ratio in unet_rows(args.reps):
            print(f"| {name} | {seconds:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
