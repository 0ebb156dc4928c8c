"""LoRA cost: per-step time with 3 LoRAs active vs none, and the time to switch LoRA weights between
two requests. Goals: per-step ratio <= 1.15; switching <= 0.5 s on the demo model.

Our LoRAs are merged into per-job weight copies (originals swapped back after), so sampling runs on
plain weights; the cost is paid once per request when weights change. Usage:
    python benchmarks/bench_lora.py            # the bundled demo model, 256x256
    python benchmarks/bench_lora.py --full     # the full-size SD 1.5-layout random checkpoint
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import full_sd15
from safetensors.torch import save_file

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.engine.lora import _module_index

ROOT = Path(__file__).resolve().parents[1]


def write_lora(engine: Engine, path: Path, seed: int, rank: int = 16) -> None:
    """A kohya LoRA over every attention and feed-forward projection and the text encoder (~ a real one)."""
    _, model = engine.load(None)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (_, module) in _module_index(model).items():
        if not name.startswith("lora_") or "input_blocks" in name or "output_blocks" in name or "middle_block" in name:
            continue
        if not any(p in name for p in ("to_q", "to_k", "to_v", "to_out_0", "ff_net", "proj_in", "proj_out",
                                       "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
            continue
        w = module.weight
        sd[name + ".lora_down.weight"] = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.01
        sd[name + ".lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.01
        sd[name + ".alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp())
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    source = full_sd15() if args.full else ROOT / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"
    (ckpt_dir / source.name).symlink_to(source)
    (data / "models" / "Lora").mkdir(parents=True)
    engine = Engine(Paths(data))
    for i in range(3):
        write_lora(engine, data / "models" / "Lora" / f"l{i}.safetensors", seed=i)
    engine.registry.refresh()
    base = Txt2ImgRequest(prompt="a red circle", width=args.size, height=args.size, seed=1, sampler_name="Euler")
    three = "a red circle <lora:l0:0.8> <lora:l1:0.5> <lora:l2:0.3>"

    def timed(req):
        t = time.perf_counter()
        engine.generate(req)
        return time.perf_counter() - t

    def per_step(req, steps=5) -> float:
        """Median time between step callbacks: sampling only, without text encoding or LoRA merging."""
        stamps: list[float] = []
        engine.generate(req.replace(steps=steps), on_progress=lambda p: stamps.append(time.perf_counter()))
        return statistics.median(b - a for a, b in itertools.pairwise(stamps))

    timed(base.replace(steps=1))
    timed(base.replace(prompt=three, steps=1))  # parse and cache the LoRA files once
    plain, with_lora, switch = [], [], []
    for r in range(args.repeat):  # alternate the order so drifting machine state favours neither side
        if r % 2:
            with_lora.append(per_step(base.replace(prompt=three)))
            plain.append(per_step(base))
        else:
            plain.append(per_step(base))
            with_lora.append(per_step(base.replace(prompt=three)))
        other = f"a red circle <lora:l0:{0.2 + 0.1 * r}> <lora:l1:0.9> <lora:l2:{0.6 + 0.1 * r}>"
        switch.append(timed(base.replace(prompt=other, steps=1)) - timed(base.replace(steps=1)))
    result = {"model": source.name, "size": args.size, "plain_s_per_step": round(statistics.median(plain), 4),
              "three_loras_s_per_step": round(statistics.median(with_lora), 4),
              "step_ratio": round(statistics.median(with_lora) / statistics.median(plain), 3),
              "switch_weights_s": round(statistics.median(switch), 3)}
    print(json.dumps(result))
    print(f"3 LoRAs vs none: {result['three_loras_s_per_step']} vs {result['plain_s_per_step']} s/step -> ratio "
          f"{result['step_ratio']} (goal <= 1.15); switching weights costs {result['switch_weights_s']} s per request "
          f"(goal <= 0.5 s)")


if __name__ == "__main__":
    main()
