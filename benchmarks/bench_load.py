"""Load time of a full-size SD 1.5-layout fp16 .safetensors: sdstudio vs diffusers ``from_single_file``.

Both run in fresh processes (imports excluded from the timing, and the full garbage collection they leave
due done before it, as a running server has), alternating, best of N, with the file in the page cache for
both. Goal: ratio <= 0.5, and a second load of the same model (cache) <= 0.1 s. Printed beside: the floor for
a loader that copies the weights out of the file (as sdstudio does, see safe_load), the copy alone.
``--cpu-time`` times by the process's CPU time (user + system; run with OMP_NUM_THREADS=1), fair when other
work shares the cores.
Usage: python benchmarks/bench_load.py [--repeat 3] [--cpu-time] [--dtypes bfloat16]
"""

from __future__ import annotations

import argparse
import json

from common import config_folder, full_sd15, in_fresh_process

OURS = """
import gc, time, json, torch
from sdstudio.models.loader import ModelCache
cache = ModelCache(1)
gc.collect()
t = time.perf_counter(); m = cache.get({path!r}, torch.{dtype}); first = time.perf_counter() - t
t = time.perf_counter(); cache.get({path!r}, torch.{dtype}); second = time.perf_counter() - t
print(json.dumps({{"first": first, "second": second}}))
"""

THEIRS = """
import gc, time, json, torch
from diffusers import StableDiffusionPipeline
gc.collect()
t = time.perf_counter()
pipe = StableDiffusionPipeline.from_single_file({path!r}, config={config!r}, local_files_only=True,
                                                torch_dtype=torch.{dtype})
print(json.dumps({{"first": time.perf_counter() - t}}))
"""


# The floor for a loader that copies: every tensor of the file converted into new memory, in file order,
# with nothing else (no modules, no key mapping, no checks). float16 <-> bfloat16 by sdstudio's own chunked
# conversion, the fastest found; others by one .to().
FLOOR = """
import gc, json, time, torch
from sdstudio.models.safe_load import _converted, open_state_dict
state = open_state_dict({path!r}, mapped=True)
gc.collect()
t = time.perf_counter()
weights = [_converted(state[k], torch.{dtype})[0] for k in state]
print(json.dumps({{"first": time.perf_counter() - t}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated, of the three below")
    args = parser.parse_args()

    def clocked(code: str) -> str:
        return code.replace("time.perf_counter()", "time.process_time()") if args.cpu_time else code

    path = full_sd15()
    config = config_folder(path)
    # float32: a CPU without native bfloat16 (every weight converted); bfloat16: a CPU with it (converted,
    # half the bytes written); float16: what runs on a GPU (same dtype as the file: one copy)
    for dtype in args.dtypes.split(","):
        ours, theirs, second, floor = [], [], [], []
        for _ in range(args.repeat):
            r = in_fresh_process(clocked(OURS.format(path=str(path), dtype=dtype)))
            ours.append(r["first"])
            second.append(r["second"])
            theirs.append(in_fresh_process(clocked(THEIRS.format(path=str(path), config=str(config), dtype=dtype)))["first"])
            floor.append(in_fresh_process(clocked(FLOOR.format(path=str(path), dtype=dtype)))["first"])
        result = {"file": "SD1.5 layout, fp16", "file_gb": round(path.stat().st_size / 1e9, 2), "model_dtype": dtype,
                  "sdstudio_s": round(min(ours), 3), "diffusers_s": round(min(theirs), 3),
                  "ratio": round(min(ours) / min(theirs), 3), "second_load_s": round(min(second), 4),
                  "copy_floor_s": round(min(floor), 3), "floor_ratio": round(min(floor) / min(theirs), 3)}
        print(json.dumps(result))
        print(f"load into {dtype}: sdstudio {result['sdstudio_s']} s vs diffusers from_single_file "
              f"{result['diffusers_s']} s -> ratio {result['ratio']} (goal <= 0.5); "
              f"second load {result['second_load_s']} s (goal <= 0.1); the copy alone {result['copy_floor_s']} s "
              f"({result['floor_ratio']} of diffusers)")


if __name__ == "__main__":
    main()
